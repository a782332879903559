"""Static checks of the Dockerfile and what it builds from: which packages each role image gets (no torch in
serve), the build context .dockerignore lets in, the stages (one per job, none repeating another, the llama.cpp
compile cached apart from what changes often), and hadolint and shellcheck where installed (.ci/containers.sh
installs them). The compose files against the Dockerfile are tests/test_compose.py's."""

from __future__ import annotations

import re
import subprocess

from support.containers import DOCKERFILE, ROOT, global_args, lineage, stage_names, stages, tool

# ---- tests: what goes into the images ---------------------------------------------------------------------------


def test_images_keep_torch_out_of_serve():
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    serve_venv = "\n".join(stages()["serve-venv"])
    assert 'requirements.py /app/deps/pyproject.toml "$@"' in serve_venv and "set -- serve &&" in serve_venv
    assert "set -- serve train" in serve_venv and 'SERVE_TRANSFORMERS" = 1' in serve_venv
    import sys

    sys.path.insert(0, str(ROOT / "docker"))
    try:
        from requirements import requirements
    finally:
        sys.path.pop(0)
    names = {
        re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower()
        for r in requirements(str(ROOT / "pyproject.toml"), ["serve"])
    }
    assert "torch" not in names and "transformers" not in names
    assert {"litestar", "gradio", "llama-cpp-python"} <= names
    train = {
        re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower()
        for r in requirements(str(ROOT / "pyproject.toml"), ["train"])
    }
    assert {"torch", "bitsandbytes"} <= train
    export = {
        re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower()
        for r in requirements(str(ROOT / "pyproject.toml"), ["export"])
    }
    assert {"gguf", "llama-cpp-python"} <= export
    # the non-root user in each role image
    for target in ("train", "export", "serve"):
        users = [line for line in lineage(target) if line.upper().startswith("USER ")]
        assert users and users[0] == "USER 1000:1000", target
    assert "useradd --uid 1000" in text


def test_dockerignore_lets_in_what_the_dockerfile_copies():
    lines = [
        ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")
    ]
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
    proc = subprocess.run([tool("hadolint"), "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_shellcheck_clean():
    scripts = sorted(str(p) for p in (ROOT / "docker").glob("*.sh")) + [str(ROOT / ".ci" / "containers.sh")]
    proc = subprocess.run([tool("shellcheck"), *scripts], capture_output=True, text=True)
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
    # (and `app`, from nothing: it only gathers the files every role image adds, with no setup of its own)
    assert outside == {"base": "${BASE_IMAGE}", "llama-build": "${LLAMA_BUILD_IMAGE}", "app": "scratch"}, outside
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
            run = tuple(body[k : k + 4])
            assert runs.setdefault(run, n) == n, f"stages {runs[run]} and {n} both run {run}"
