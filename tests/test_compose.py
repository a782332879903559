"""Static checks of the container files: compose.yaml and compose.cpu.yaml against the Dockerfile, the entrypoint
scripts and the code they run. Every module, command-line flag, path, port, route and environment variable that the
compose files name must exist where they say it does. The compose files are read as Compose resolves them
(`docker-compose config`), so the checks need docker-compose (.ci/run installs it before the tests). The pins the
images install with are tests/test_lock.py's. The Dockerfile on its own (stages,
build context, hadolint, shellcheck) is tests/test_dockerfile.py's; the real builds and the CPU chain run in
.ci/containers.sh itself."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest

from support.containers import (
    CACHE,
    DATA,
    DOCKERFILE,
    FILES,
    IMAGE_DIR,
    ROOT,
    SERVICES,
    assert_flags,
    built_from,
    env_vars_read,
    image_entrypoint,
    image_env,
    in_image,
    load,
    module_file,
    package_reads,
    script_commands,
    stages,
)

pytest.importorskip("yaml")


@pytest.fixture(params=sorted(FILES), scope="module")
def compose(request) -> tuple[str, dict]:
    return request.param, load(request.param)


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
            assert re.fullmatch(
                r"docker\.io/nvidia/cuda:\d+\.\d+\.\d+-runtime-ubuntu\d+\.\d+", svc["build"]["args"]["BASE_IMAGE"]
            )
            continue
        assert svc["build"]["args"]["BASE_IMAGE"] == default
    overridden = load(kind, {"AEGIS_BASE_IMAGE": "localhost/x"})["services"]
    assert overridden["train"]["build"]["args"]["BASE_IMAGE"] == "localhost/x"
    assert overridden["serve"]["build"]["args"]["BASE_IMAGE"] == c["services"]["serve"]["build"]["args"][
        "BASE_IMAGE"
    ].replace(default, "localhost/x")
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
        for source in mounts.values():
            if not source.startswith("/"):
                assert source in named, f"{kind}/{name}: volume {source} is not declared"
            else:
                assert Path(source).exists(), f"{kind}/{name}: bind source {source} does not exist"
    assert len(data_volumes) == 1 and data_volumes <= named
    # train and export share the Hugging Face / tiny-model cache (export merges onto the same base)
    caches = {
        next(v.split(":")[0] for v in c["services"][n]["volumes"] if v.split(":")[1] == CACHE)
        for n in ("train", "export")
    }
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
        g["volumes"] = [rename.get(v.split(":")[0], v.split(":")[0]) + v[len(v.split(":")[0]) :] for v in g["volumes"]]
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
        "0.0.0.0:18000:8000/tcp"
    ]
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
    assert re.search(
        r"HEALTHCHECK .*CMD \[\"python\", \"/app/docker/healthcheck.py\"\]",
        re.sub(r"\\\n", " ", DOCKERFILE.read_text()),
    )
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
