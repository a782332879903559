"""Static checks of the container files: compose.yaml and compose.cpu.yaml against the Dockerfile, the entrypoint
scripts and the code they run. Every module, command-line flag, path, port, route and environment variable that the
compose files name must exist where they say it does. The compose files are read as Compose resolves them
(`docker-compose config`), so the checks need docker-compose (.ci/run installs it before the tests); hadolint and
shellcheck run when installed (.ci/containers.sh installs them); the real builds and the CPU chain run in
.ci/containers.sh itself."""

from __future__ import annotations

import copy
import functools
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
FILES = {"default": ROOT / "compose.yaml", "cpu": ROOT / "compose.cpu.yaml"}
SERVICES = {"train", "export", "serve", "chat"}
IMAGE_DIR = "/app"  # where the Dockerfile puts configs/ and docker/
DATA, CACHE = "/data", "/cache"



INSTALLED_BY = {"docker-compose": ".ci/run", "hadolint": ".ci/containers.sh", "shellcheck": ".ci/containers.sh"}


def _tool(name: str) -> str:
    path = shutil.which(name)
    if not path:
        pytest.skip(f"{name} is not installed ({INSTALLED_BY[name]} installs it)")
    return path


@functools.lru_cache(maxsize=None)
def _config(kind: str, env: tuple[tuple[str, str], ...]) -> str:
    proc = subprocess.run([_tool("docker-compose"), "-f", str(FILES[kind]), "config"], capture_output=True,
                          text=True, cwd=ROOT, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **dict(env)})
    assert proc.returncode == 0 and not proc.stderr.strip(), f"docker-compose config of {FILES[kind]}: {proc.stderr}"
    return proc.stdout


def load(kind: str, env: dict[str, str] | None = None) -> dict:
    """The compose file as Compose resolves it (`docker-compose config`: variables interpolated from `env` alone,
    anchors merged, paths absolute, ports with their protocol); fails on any error or warning."""
    return yaml.safe_load(_config(kind, tuple(sorted((env or {}).items()))))


@pytest.fixture(params=sorted(FILES), scope="module")
def compose(request) -> tuple[str, dict]:
    return request.param, load(request.param)


# ---- the Dockerfile, parsed just enough ------------------------------------------------------------------------

def global_args() -> dict[str, str]:
    """The build arguments declared before the first FROM, with their defaults: what a FROM line may name."""
    out = {}
    for line in DOCKERFILE.read_text().splitlines():
        if re.match(r"FROM\s", line, re.I):
            break
        m = re.match(r"ARG\s+([A-Za-z_][A-Za-z0-9_]*)(?:=(\S*))?", line)
        if m:
            out[m.group(1)] = (m.group(2) or "").strip('"')
    return out


def stages() -> dict[str, list[str]]:
    """Each build stage's instructions (continuation lines joined, comments dropped), by stage name; NAME:from is
    what its FROM line says, NAME:parent that with the build arguments' defaults put in (an image or an earlier
    stage)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    defaults = global_args()
    out: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.I)
        if m:
            current = m.group(2) or m.group(1)
            out[current] = [line]
            out[current + ":from"] = [m.group(1)]
            out[current + ":parent"] = [re.sub(r"\$\{(\w+)\}", lambda a: defaults[a.group(1)], m.group(1))]
        elif current:
            out[current].append(line)
    return out


def stage_names() -> list[str]:
    return [name for name in stages() if ":" not in name]


def built_from(target: str) -> set[str]:
    """The stages a target's image is built from: its FROM parents and the stages it copies from, all the way down."""
    all_stages, seen, todo = stages(), set(), [target]
    while todo:
        name = todo.pop()
        if name in seen or name not in all_stages:
            continue
        seen.add(name)
        todo.append(all_stages[name + ":parent"][0])
        todo += [m.group(1) for line in all_stages[name] if (m := re.match(r"COPY\s+--from=(\S+)", line, re.I))]
    return seen


def lineage(name: str) -> list[str]:
    """The stage and its ancestors' instructions, nearest first."""
    all_stages = stages()
    out = []
    while name in all_stages:
        out.append(name)
        name = all_stages[name + ":parent"][0]
    return [line for s in out for line in all_stages[s]]


def image_env(target: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in reversed(lineage(target)):
        if line.upper().startswith("ENV "):
            for k, v in re.findall(r"([A-Z_][A-Z0-9_]*)=(\S+)", line[4:]):
                env[k] = v
    return env


def image_entrypoint(target: str) -> list[str]:
    for line in lineage(target):
        if line.upper().startswith("ENTRYPOINT "):
            import json
            return json.loads(line.split(None, 1)[1])
    raise AssertionError(f"Dockerfile target {target} has no ENTRYPOINT")


def copied_into(target: str) -> dict[str, str]:
    """Image path -> repository path of each file COPY'd from the build context into the target's lineage."""
    out = {}
    for line in lineage(target):
        m = re.match(r"COPY\s+(?!--from)(.+)", line, re.I)
        if not m:
            continue
        parts = m.group(1).split()
        *sources, dest = parts
        for src in sources:
            image_path = dest + Path(src).name if dest.endswith("/") and not src.endswith("/") else dest
            out[image_path.rstrip("/")] = src.rstrip("/")
    return out


def in_image(target: str, path: str) -> Path:
    """The repository file that `path` in the target's image comes from (asserts there is one)."""
    for image_path, src in copied_into(target).items():
        if path == image_path or path.startswith(image_path + "/"):
            repo = ROOT / src / path[len(image_path):].lstrip("/") if path != image_path else ROOT / src
            assert repo.exists(), f"{path} in the {target} image comes from {repo}, which does not exist"
            return repo
    raise AssertionError(f"nothing in the Dockerfile copies {path} into the {target} image")


# ---- the code, searched just enough -----------------------------------------------------------------------------

def module_file(module: str) -> Path:
    base = ROOT / module.replace(".", "/")
    for p in (base / "__main__.py", base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    raise AssertionError(f"python -m {module}: no {base}.py or {base}/__main__.py in the repository")


def module_source(module: str) -> str:
    p = module_file(module)
    files = [p] + (sorted(p.parent.glob("*.py")) if p.name in ("__main__.py", "__init__.py") else [])
    return "\n".join(f.read_text() for f in files)


def assert_flags(module: str, args: list[str]) -> None:
    """Each --flag (and each subcommand word before the first flag) is defined by the module's command line."""
    src = module_source(module)
    for a in args:
        if a.startswith("--"):
            flag = a.split("=", 1)[0]
            assert re.search(rf"""["']{re.escape(flag)}["']""", src), f"python -m {module}: no option {flag}"
    words = []
    for a in args:
        if a.startswith("-"):
            break
        words.append(a)
    for w in words:
        assert re.search(rf"""add_parser\(\s*["']{re.escape(w)}["']""", src), f"python -m {module}: no command {w}"


def script_commands(script: Path) -> list[list[str]]:
    """The `python -m MODULE args...` commands a shell script runs (its exec lines), as words."""
    text = re.sub(r"\\\n", " ", script.read_text())
    cmds = []
    for line in text.splitlines():
        m = re.search(r"""exec\s+"\$python"\s+-m\s+(.*)""", line)
        if m:
            cmds.append([w.strip('"') for w in m.group(1).split()])
    assert cmds, f"{script}: no `exec \"$python\" -m ...` line"
    return cmds


def env_vars_read() -> str:
    """All the text where the project reads environment variables: its Python packages and docker/ scripts."""
    files = [p for d in ("aegis", "train", "export", "serve", "docker") for p in (ROOT / d).rglob("*")
             if p.suffix in (".py", ".sh")]
    return "\n".join(p.read_text() for p in files)


def package_reads(package: str, var: str) -> bool | None:
    """Whether an installed package's source names the variable (None: package not installed)."""
    import importlib.util
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations)))
    return any(var in p.read_text(errors="ignore") for p in root.rglob("*.py"))


# ---- tests: structure ------------------------------------------------------------------------------------------

def test_services_and_build_targets(compose):
    kind, c = compose
    assert set(c["services"]) == SERVICES
    all_stages = stages()
    for name, svc in c["services"].items():
        build = svc["build"]
        assert build["context"] == str(ROOT)
        assert build["target"] in all_stages, f"{kind}/{name}: no Dockerfile stage {build['target']}"
        assert svc["image"].startswith("aegis-")
        assert set(build.get("args", {})) <= set(re.findall(r"^\s*ARG\s+([A-Z_]+)", DOCKERFILE.read_text(), re.M))
    serve, chat = c["services"]["serve"], c["services"]["chat"]
    assert chat["build"]["target"] == "serve"  # the UI needs no GPU
    if kind == "cpu":
        assert serve["build"]["target"] == "serve" and chat["image"] == serve["image"]
    else:  # the GPU chain's API: the same target on NVIDIA's images, llama.cpp compiled with CUDA, a GPU reserved
        assert serve["build"]["target"] == "serve" and serve["image"] != chat["image"]
        assert serve["deploy"] == c["services"]["train"]["deploy"]
        args = serve["build"]["args"]
        nvidia = r"docker\.io/nvidia/cuda:(\d+\.\d+\.\d+)-{}-(ubuntu\d+\.\d+)"
        runtime = re.fullmatch(nvidia.format("runtime"), args["BASE_IMAGE"])
        devel = re.fullmatch(nvidia.format("devel"), args["LLAMA_BUILD_IMAGE"])
        # one CUDA release and one Ubuntu (the same glibc and CUDA libraries) for the compile and the image it goes in
        assert runtime and devel and runtime.groups() == devel.groups(), args
        cmake = dict(a[2:].split("=", 1) for a in args["LLAMA_CMAKE_ARGS"].split())
        assert cmake["GGML_CUDA"] == "on" and cmake["GGML_NATIVE"] == "OFF", cmake
        assert "86" in cmake["CMAKE_CUDA_ARCHITECTURES"].split(";")  # the RTX 3060 the seed recipe was sized for
    # the arguments reach the image: serve is built on BASE_IMAGE, its llama-cpp-python compiled on LLAMA_BUILD_IMAGE
    # with LLAMA_CMAKE_ARGS
    assert {"base", "llama-build"} <= built_from("serve")
    assert all_stages["base:from"] == ["${BASE_IMAGE}"] and all_stages["llama-build:from"] == ["${LLAMA_BUILD_IMAGE}"]
    assert any(line.startswith('RUN CMAKE_ARGS="$LLAMA_CMAKE_ARGS" ') for line in all_stages["llama-build"])
    # every other service builds with the defaults: llama.cpp compiled for the CPU on the base stage
    for name, svc in c["services"].items():
        if (kind, name) != ("default", "serve"):
            assert not {"LLAMA_BUILD_IMAGE", "LLAMA_CMAKE_ARGS"} & set(svc["build"]["args"]), f"{kind}/{name}"


def test_base_image_pinned_and_overridable(compose):
    kind, c = compose
    m = re.search(r"^ARG BASE_IMAGE=(\S+)", DOCKERFILE.read_text(), re.M)
    assert m, "Dockerfile: no ARG BASE_IMAGE default"
    default = m.group(1)
    assert re.fullmatch(r"docker\.io/library/debian:bookworm-\d{8}-slim(@sha256:[0-9a-f]{64})?", default), default
    for name, svc in c["services"].items():
        if (kind, name) == ("default", "serve"):  # the GPU API: NVIDIA's CUDA runtime image, pinned by release
            assert re.fullmatch(r"docker\.io/nvidia/cuda:\d+\.\d+\.\d+-runtime-ubuntu\d+\.\d+",
                                svc["build"]["args"]["BASE_IMAGE"])
            continue
        assert svc["build"]["args"]["BASE_IMAGE"] == default
    overridden = load(kind, {"AEGIS_BASE_IMAGE": "localhost/x"})["services"]
    assert overridden["train"]["build"]["args"]["BASE_IMAGE"] == "localhost/x"
    assert overridden["serve"]["build"]["args"]["BASE_IMAGE"] == c["services"]["serve"]["build"]["args"][
        "BASE_IMAGE"].replace(default, "localhost/x")
    assert "FROM ${BASE_IMAGE} AS base" in DOCKERFILE.read_text()


def test_dependency_chain(compose):
    _, c = compose
    s = c["services"]
    assert "depends_on" not in s["train"]
    assert s["export"]["depends_on"] == {"train": {"condition": "service_completed_successfully"}}
    assert s["serve"]["depends_on"] == {"export": {"condition": "service_completed_successfully"}}
    assert s["chat"]["depends_on"] == {"serve": {"condition": "service_healthy"}}


def test_one_shared_data_volume(compose):
    kind, c = compose
    named = set(c["volumes"])
    data_volumes = set()
    for name, svc in c["services"].items():
        mounts = {v.split(":")[1]: v.split(":")[0] for v in svc["volumes"]}
        assert DATA in mounts, f"{kind}/{name} does not mount the data volume at {DATA}"
        data_volumes.add(mounts[DATA])
        for target, source in mounts.items():
            if not source.startswith("/"):
                assert source in named, f"{kind}/{name}: volume {source} is not declared"
            else:
                assert Path(source).exists(), f"{kind}/{name}: bind source {source} does not exist"
    assert len(data_volumes) == 1 and data_volumes <= named
    # train and export share the Hugging Face / tiny-model cache (export merges onto the same base)
    caches = {next(v.split(":")[0] for v in c["services"][n]["volumes"] if v.split(":")[1] == CACHE)
              for n in ("train", "export")}
    assert len(caches) == 1 and caches <= named
    # the mount points are where the images keep runs and caches
    for target in ("train", "export", "serve"):
        env = image_env(target)
        assert env["AEGIS_RUNS"].startswith(DATA + "/")
        assert env["HF_HOME"].startswith(CACHE + "/") and env["AEGIS_CACHE"].startswith(CACHE + "/")
    assert re.search(rf"mkdir -p {DATA}/runs {CACHE}/huggingface {CACHE}/aegis", DOCKERFILE.read_text())
    # the config bind mount replaces the configs the image has
    train = c["services"]["train"]
    assert f"{ROOT}/configs:{IMAGE_DIR}/configs:ro" in train["volumes"]
    in_image("train", f"{IMAGE_DIR}/configs")


def test_nvidia_reservation_only_in_compose_yaml():
    gpu = load("default")
    for name in ("train", "serve"):  # training, and the API's llama.cpp compiled with CUDA
        devices = gpu["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert sorted(n for n, s in gpu["services"].items() if "deploy" in s) == ["serve", "train"]
    cpu = load("cpu")
    assert not any("deploy" in s or "runtime" in s for s in cpu["services"].values())
    assert not set(cpu["volumes"]) & set(gpu["volumes"]), "the CPU chain's runs would mix with the GPU chain's"


def test_cpu_file_mirrors_compose_yaml():
    """compose.cpu.yaml is compose.yaml without the GPU: the differences are the listed ones only."""
    gpu, cpu = load("default"), load("cpu")
    rename = {"aegis-data": "aegis-cpu-data", "hf-cache": "aegis-cpu-cache"}
    assert set(gpu["volumes"]) == set(rename) and set(cpu["volumes"]) == set(rename.values())
    for name in SERVICES:
        g, c = copy.deepcopy(gpu["services"][name]), copy.deepcopy(cpu["services"][name])
        g.pop("deploy", None)
        g.pop("shm_size", None)
        g["volumes"] = [rename.get(v.split(":")[0], v.split(":")[0]) + v[len(v.split(":")[0]):] for v in g["volumes"]]
        for d in (g, c):
            d.pop("image")
            d["build"] = {k: v for k, v in d["build"].items() if k != "args"}
            d.get("environment", {}).pop("AEGIS_CONFIG", None)
        assert g == c, f"{name} differs between compose.yaml and compose.cpu.yaml"
    assert gpu["services"]["train"]["environment"]["AEGIS_CONFIG"].endswith("/borea_rtx3060.toml")
    assert cpu["services"]["train"]["environment"]["AEGIS_CONFIG"].endswith("/quickstart.toml")
    for name in SERVICES:
        assert "TORCH_INDEX_URL" in cpu["services"][name]["build"]["args"]
        assert "TORCH_INDEX_URL" not in gpu["services"][name]["build"]["args"]


# ---- tests: what the services run exists ------------------------------------------------------------------------

def test_train_runs_the_seed_recipe_by_default():
    train = load("default")["services"]["train"]
    config = train["environment"]["AEGIS_CONFIG"]
    repo = in_image("train", config)
    text = repo.read_text()
    assert 'base = "HODACHI/Borea-Phi-3.5-mini-Instruct-Jp"' in text
    assert "command" not in train and "entrypoint" not in train
    cpu = in_image("train", load("cpu")["services"]["train"]["environment"]["AEGIS_CONFIG"])
    assert 'base = "embedded"' in cpu.read_text()


@pytest.mark.parametrize("service", ["train", "export", "serve"])
def test_entrypoint_scripts_run_real_commands(service):
    """The image's entrypoint is a script in docker/; each `python -m` it runs exists with the flags it passes."""
    for kind in FILES:
        svc = load(kind)["services"][service]
        assert "entrypoint" not in svc
        target = svc["build"]["target"]
        ep = image_entrypoint(target)
        assert ep[0] == "bash" and len(ep) == 2
        script = in_image(target, ep[1])
        for words in script_commands(script):
            module, args = words[0], [w for w in words[1:] if not w.startswith("$")]
            assert module == {"train": "train", "export": "export", "serve": "serve"}[service]
            module_file(module)
            assert_flags(module, args)


def test_chat_runs_the_ui_against_serve_by_name(compose):
    kind, c = compose
    chat = c["services"]["chat"]
    ep, cmd = chat["entrypoint"], chat["command"]
    assert ep[:2] == ["python", "-m"]
    module = ep[2]
    module_file(module)  # serve.ui must exist in the repository
    assert_flags(module, cmd)
    api = cmd[cmd.index("--api") + 1]
    m = re.fullmatch(r"http://([a-z]+):(\d+)(/v1)", api)
    assert m, api
    assert m.group(1) in c["services"], f"{kind}: chat's --api host {m.group(1)} is not a service"
    assert m.group(2) == c["services"]["serve"]["environment"]["AEGIS_PORT"]
    assert '"/v1/chat/completions"' in (ROOT / "serve" / "app.py").read_text()


def test_ports_match_across_files(compose):
    kind, c = compose
    serve, chat = c["services"]["serve"], c["services"]["chat"]
    api_port = serve["environment"]["AEGIS_PORT"]
    assert api_port == "8000"
    assert serve["ports"] == [f"127.0.0.1:8000:{api_port}/tcp"]
    chat_port = chat["command"][chat["command"].index("--port") + 1]
    assert chat_port == "7860" and chat["ports"] == [f"127.0.0.1:7860:{chat_port}/tcp"]
    assert load(kind, {"AEGIS_API_PORT": "18000", "AEGIS_BIND": "0.0.0.0"})["services"]["serve"]["ports"] == [
        "0.0.0.0:18000:8000/tcp"]
    expose = re.search(r"^EXPOSE (.+)$", DOCKERFILE.read_text(), re.M).group(1).split()
    assert {api_port, chat_port} <= set(expose)
    # health checks: the API's readiness route and the UI's page, on the ports the processes listen on
    app = (ROOT / "serve" / "app.py").read_text()
    for svc, port, route in ((serve, api_port, "/ready"), (chat, chat_port, "/")):
        test = svc["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", f"{IMAGE_DIR}/docker/healthcheck.py"]
        assert test[3] == f"http://127.0.0.1:{port}{route}"
        in_image("serve", test[2])
    assert '@get("/ready"' in app and '@get("/health"' in app
    assert re.search(r"HEALTHCHECK .*CMD \[\"python\", \"/app/docker/healthcheck.py\"\]", re.sub(r"\\\n", " ",
                     DOCKERFILE.read_text()))
    assert image_env("serve")["AEGIS_PORT"] == api_port
    # serve's entrypoint listens on all addresses on AEGIS_PORT
    script = (ROOT / "docker" / "serve-entrypoint.sh").read_text()
    assert '--host 0.0.0.0 --port "${AEGIS_PORT:-8000}"' in script


def test_environment_variables_are_read(compose):
    kind, c = compose
    ours = env_vars_read()
    for name, svc in c["services"].items():
        for var in svc.get("environment", {}):
            if var.startswith("AEGIS_"):
                assert re.search(rf"\b{var}\b", ours), f"{kind}/{name}: nothing in the project reads {var}"
            elif var.startswith("HF_"):
                found = package_reads("huggingface_hub", var)
                if found is not None:
                    assert found, f"{kind}/{name}: huggingface_hub does not read {var}"
            elif var.startswith("GRADIO_"):
                found = package_reads("gradio", var)
                if found is not None:
                    assert found, f"{kind}/{name}: gradio does not read {var}"
            else:
                raise AssertionError(f"{kind}/{name}: unexpected variable {var}")
    # HF_TOKEN and AEGIS_API_KEY are passed through from the host, never given a value in the file
    for name in ("train", "export"):
        assert c["services"][name]["environment"]["HF_TOKEN"] is None
    assert c["services"]["serve"]["environment"]["AEGIS_API_KEY"] is None
    # every variable the file interpolates is documented
    docs = (ROOT / "docs" / "containers.md").read_text()
    for var in set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", FILES[kind].read_text())):
        assert var in docs, f"{kind}: ${{{var}}} is not described in docs/containers.md"


def test_images_keep_torch_out_of_serve():
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    serve_venv = "\n".join(stages()["serve-venv"])
    assert "requirements.py /app/deps/pyproject.toml \"$@\"" in serve_venv and "set -- serve &&" in serve_venv
    assert "set -- serve train" in serve_venv and 'SERVE_TRANSFORMERS" = 1' in serve_venv
    import sys
    sys.path.insert(0, str(ROOT / "docker"))
    try:
        from requirements import requirements
    finally:
        sys.path.pop(0)
    names = {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in requirements(str(ROOT / "pyproject.toml"),
                                                                                          ["serve"])}
    assert "torch" not in names and "transformers" not in names
    assert {"litestar", "gradio", "llama-cpp-python"} <= names
    train = {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower()
             for r in requirements(str(ROOT / "pyproject.toml"), ["train"])}
    assert {"torch", "bitsandbytes"} <= train
    export = {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower()
              for r in requirements(str(ROOT / "pyproject.toml"), ["export"])}
    assert {"gguf", "llama-cpp-python"} <= export
    # the non-root user in each role image
    for target in ("train", "export", "serve"):
        users = [line for line in lineage(target) if line.upper().startswith("USER ")]
        assert users and users[0] == "USER 1000:1000", target
    assert "useradd --uid 1000" in text


def test_constraints_lie_inside_pyproject_ranges():
    packaging = pytest.importorskip("packaging.requirements")
    from packaging.utils import canonicalize_name
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ranges: dict[str, list] = {}
    extras = project["optional-dependencies"]
    for r in project["dependencies"] + [r for e in ("train", "export", "serve") for r in extras[e]]:
        req = packaging.Requirement(r)
        ranges.setdefault(canonicalize_name(req.name), []).append(req.specifier)
    pins = {}
    for line in (ROOT / "docker" / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = packaging.Requirement(line)
            pins[canonicalize_name(req.name)] = next(iter(req.specifier)).version
    for name, specs in ranges.items():
        if name == "aegis-soul":
            continue
        assert name in pins, f"docker/constraints.txt pins no release of {name}"
        for spec in specs:
            assert spec.contains(pins[name], prereleases=True), f"{name}=={pins[name]} is outside {spec}"
    # the compiled llama-cpp-python is the pinned one
    m = re.search(r"^ARG LLAMA_CPP_PYTHON=(\S+)$", DOCKERFILE.read_text(), re.M)
    assert m and m.group(1) == pins["llama-cpp-python"]


def test_dockerignore_lets_in_what_the_dockerfile_copies():
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    for line in re.sub(r"\\\n", " ", DOCKERFILE.read_text()).splitlines():
        m = re.match(r"\s*COPY\s+(?!--from)(.+)", line)
        if m:
            sources = m.group(1).split()[:-1]
            for src in sources:
                top = src.split("/")[0]
                assert src.rstrip("/") in allowed or top in allowed, f".dockerignore keeps {src} out of the context"
                # a wildcard may match nothing (optional files) as long as something else in the COPY exists
                if "*" not in src:
                    assert (ROOT / src).exists(), f"Dockerfile copies {src}, which does not exist"
            assert any("*" not in src for src in sources), line
    # local wheels travel in the context but never in git
    assert (ROOT / "docker" / "wheels" / ".gitignore").read_text().splitlines()[1:] == ["*", "!.gitignore"]


# ---- tests: the linters, where installed ------------------------------------------------------------------------

def test_hadolint_clean():
    proc = subprocess.run([_tool("hadolint"), "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_shellcheck_clean():
    scripts = sorted(str(p) for p in (ROOT / "docker").glob("*.sh")) + [str(ROOT / ".ci" / "containers.sh")]
    proc = subprocess.run([_tool("shellcheck"), *scripts], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_llama_compile_depends_on_nothing_that_changes_often():
    """The llama.cpp compile (minutes) must not rebuild when pyproject.toml, the pins or the source change."""
    lines = lineage("llama-build")
    copies = [ln for ln in lines if ln.upper().startswith("COPY")]
    assert copies == ["COPY docker/wheels/.gitignore docker/wheels/llama_cpp_python-* /tmp/wheels/"], copies
    # by default it compiles on the base stage (the CUDA build names NVIDIA's devel image instead)
    assert stages()["llama-build:from"] == ["${LLAMA_BUILD_IMAGE}"] and stages()["llama-build:parent"] == ["base"]


def test_no_stage_repeats_another():
    """One stage per job, whatever image it starts from: the images' setup (packages, venv, user, environment) is the
    base stage's alone and the llama.cpp compile llama-build's alone; the GPU serve image differs by build arguments,
    not by stages of its own."""
    all_stages = stages()
    names = stage_names()
    # two stages start from an image outside the Dockerfile, each named by a build argument; the others from an
    # earlier stage
    outside = {n: all_stages[n + ":from"][0] for n in names if all_stages[n + ":from"][0] not in names}
    assert outside == {"base": "${BASE_IMAGE}", "llama-build": "${LLAMA_BUILD_IMAGE}"}, outside
    assert global_args()["LLAMA_BUILD_IMAGE"] == "base"
    for i, name in enumerate(names):
        parent = all_stages[name + ":parent"][0]
        assert parent not in names or names.index(parent) < i, f"{name} starts from a later stage"

    def where(pattern: str) -> list[str]:
        return [n for n in names if any(re.search(pattern, line) for line in all_stages[n])]

    assert where(r"\buseradd\b") == ["base"]
    assert where(r"\bpython3 -m venv /opt/aegis\b") == ["base"]
    assert where(r"^ENV .*\bVIRTUAL_ENV=") == ["base"]
    assert where(r"^WORKDIR ") == ["base"]
    assert where(r"\bapt-get install\b") == ["base", "llama-build"]
    assert where(r"\bpip wheel\b.*llama-cpp-python") == ["llama-build"]
    assert where(r"^(HEALTHCHECK|EXPOSE) ") == ["serve"]
    # CUDA comes in through build arguments only, and nothing names a Python minor version (Debian bookworm has 3.11,
    # NVIDIA's Ubuntu 24.04 images 3.12)
    text = "\n".join(line for n in names for line in all_stages[n])
    assert "CUDA" not in text
    assert not re.search(r"python3\.\d|/lib/python", text)
    # and no two stages share four instructions in a row (build arguments aside)
    runs: dict[tuple[str, ...], str] = {}
    for n in names:
        body = [line for line in all_stages[n][1:] if not line.upper().startswith("ARG ")]
        for k in range(len(body) - 3):
            run = tuple(body[k:k + 4])
            assert runs.setdefault(run, n) == n, f"stages {runs[run]} and {n} both run {run}"
