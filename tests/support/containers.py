"""Reading the container files for the tests of tests/test_compose.py and tests/test_dockerfile.py: the compose
files as Compose resolves them (`docker-compose config`), the Dockerfile parsed just enough (stages, their lineage,
what each copies from the build context), and the code the images run searched just enough (modules, their
command-line flags, the environment variables read)."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
FILES = {"default": ROOT / "compose.yaml", "cpu": ROOT / "compose.cpu.yaml"}
SERVICES = {"train", "export", "serve", "chat"}
IMAGE_DIR = "/app"  # where the Dockerfile puts configs/ and docker/
DATA, CACHE = "/data", "/cache"

INSTALLED_BY = {"docker-compose": ".ci/run", "hadolint": ".ci/containers.sh", "shellcheck": ".ci/containers.sh"}


def tool(name: str) -> str:
    path = shutil.which(name)
    if not path:
        pytest.skip(f"{name} is not installed ({INSTALLED_BY[name]} installs it)")
    return path


@functools.cache
def _config(kind: str, env: tuple[tuple[str, str], ...]) -> str:
    proc = subprocess.run(
        [tool("docker-compose"), "-f", str(FILES[kind]), "config"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **dict(env)},
    )
    assert proc.returncode == 0 and not proc.stderr.strip(), f"docker-compose config of {FILES[kind]}: {proc.stderr}"
    return proc.stdout


def load(kind: str, env: dict[str, str] | None = None) -> dict:
    """The compose file as Compose resolves it (`docker-compose config`: variables interpolated from `env` alone,
    anchors merged, paths absolute, ports with their protocol); fails on any error or warning."""
    import yaml  # the test modules that call this skip without it

    return yaml.safe_load(_config(kind, tuple(sorted((env or {}).items()))))


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
    """Image path -> repository path of each file COPY'd from the build context into the target's lineage, also
    through a stage it copies from (COPY --from=STAGE)."""
    out, all_stages = {}, stages()
    for line in lineage(target):
        m = re.match(r"COPY\s+(?:--from=(\S+)\s+)?(.+)", line, re.I)
        if not m:
            continue
        *sources, dest = m.group(2).split()
        if m.group(1):
            inner = copied_into(m.group(1)) if m.group(1) in all_stages else {}  # else an outside image
            for src in (x.rstrip("/") for x in sources):
                out.update(
                    {
                        dest.rstrip("/") + path[len(src) :]: repo
                        for path, repo in inner.items()
                        if path == src or path.startswith(src + "/")
                    }
                )
            continue
        for src in sources:
            image_path = dest + Path(src).name if dest.endswith("/") and not src.endswith("/") else dest
            out[image_path.rstrip("/")] = src.rstrip("/")
    return out


def in_image(target: str, path: str) -> Path:
    """The repository file that `path` in the target's image comes from (asserts there is one)."""
    for image_path, src in copied_into(target).items():
        if path == image_path or path.startswith(image_path + "/"):
            repo = ROOT / src / path[len(image_path) :].lstrip("/") if path != image_path else ROOT / src
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


def assert_flags(module: str, args: list[str]) -> None:
    """Each --flag (and each subcommand word before the first flag) is in the module's own --help."""
    words = []
    for a in args:
        if a.startswith("-"):
            break
        words.append(a)
    proc = subprocess.run(
        [sys.executable, "-m", module, *words, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"python -m {module} {' '.join(words)}: {proc.stderr.strip()[-500:]}"
    for a in args:
        if a.startswith("--"):
            flag = a.split("=", 1)[0]
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", proc.stdout), (
                f"python -m {module}: no option {flag}"
            )


def script_commands(script: Path) -> list[list[str]]:
    """The `python -m MODULE args...` commands a shell script runs (its exec lines), as words."""
    text = re.sub(r"\\\n", " ", script.read_text())
    cmds = []
    for line in text.splitlines():
        m = re.search(r"""exec\s+"\$python"\s+-m\s+(.*)""", line)
        if m:
            cmds.append([w.strip('"') for w in m.group(1).split()])
    assert cmds, f'{script}: no `exec "$python" -m ...` line'
    return cmds


def env_vars_read() -> str:
    """All the text where the project reads environment variables: its Python packages and docker/ scripts."""
    files = [
        p
        for d in ("aegis", "train", "export", "serve", "docker")
        for p in (ROOT / d).rglob("*")
        if p.suffix in (".py", ".sh")
    ]
    return "\n".join(p.read_text() for p in files)


def package_reads(package: str, var: str) -> bool | None:
    """Whether an installed package's source names the variable (None: package not installed)."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations)))
    return any(var in p.read_text(errors="ignore") for p in root.rglob("*.py"))
