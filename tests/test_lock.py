"""requirements.lock against pyproject.toml and the places that install from it: every dependency of every extra is
pinned, inside pyproject.toml's bounds; the Makefile, the Dockerfile and the venv the tests run in take their
releases from the lock; ruff is one release everywhere; the commit-msg hook refuses a subject over 72 characters."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from importlib import metadata

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from support.containers import DOCKERFILE, ROOT

LOCK = ROOT / "requirements.lock"


def locked(text: str | None = None) -> dict[str, Version]:
    """The lock's pins: name -> release. Every line that is not a comment must be NAME==RELEASE."""
    pins: dict[str, Version] = {}
    for n, line in enumerate((LOCK.read_text() if text is None else text).splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        assert m, f"requirements.lock:{n}: {line!r} is not NAME==RELEASE"
        name = canonicalize_name(m.group(1))
        assert name not in pins, f"requirements.lock:{n}: {name} is pinned twice"
        pins[name] = Version(m.group(2))
    return pins


def declared() -> list[Requirement]:
    """pyproject.toml's dependencies and those of every extra, but the project's references to itself."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    return [r for r in map(Requirement, reqs) if canonicalize_name(r.name) != canonicalize_name(project["name"])]


def disagreements(requirements: list[Requirement], pins: dict[str, Version]) -> list[str]:
    out = []
    for req in requirements:
        name = canonicalize_name(req.name)
        if name not in pins:
            out.append(f"{req}: not in requirements.lock")
        elif not req.specifier.contains(pins[name], prereleases=True):
            out.append(f"{req}: requirements.lock pins {name}=={pins[name]}")
    return out


# ---- tests ---------------------------------------------------------------------------------------------------------


def test_every_dependency_is_locked_inside_its_bounds():
    assert disagreements(declared(), locked()) == []
    # the check itself: a dependency the lock lacks, and a pin below a lower bound, are both reported
    pins = locked()
    pins.pop("gradio")
    pins["transformers"] = Version("4.57.0")
    found = disagreements(declared(), pins)
    assert any(f.startswith("gradio") and "not in requirements.lock" in f for f in found), found
    assert any(f.startswith("transformers") and "4.57.0" in f for f in found), found
    with pytest.raises(AssertionError, match="not NAME==RELEASE"):
        locked("torch>=2.4\n")


def test_the_installs_take_their_releases_from_the_lock():
    """make's set-up (the README's commands, CI's) and every pip install of the images install with the lock as
    constraints; the llama-cpp-python the images compile is the locked release."""
    make = subprocess.run(["make", "-n", "-B", "setup"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert make.returncode == 0, make.stderr
    installs = [line for line in make.stdout.splitlines() if " install " in line]
    assert installs and all("-c requirements.lock" in line for line in installs), installs
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    pip = [line for line in text.splitlines() if re.search(r"\bpip install\b", line)]
    assert pip
    for line in pip:
        for cmd in re.findall(r"pip install\b[^&]*", line):
            assert "--no-deps" in cmd or re.search(r"-c \S+/requirements\.lock\b", cmd), cmd
    assert "constraints.txt" not in text
    m = re.search(r"^ARG LLAMA_CPP_PYTHON=(\S+)$", DOCKERFILE.read_text(), re.M)
    assert m and Version(m.group(1)) == locked()["llama-cpp-python"]


def test_the_tests_run_on_the_locked_releases():
    """The venv running this suite has the lock's release of every package both hold (a local build label such as
    torch's +cpu aside): what CI tested is what the images install."""
    pins = locked()
    off = []
    for dist in metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        if name in pins and Version(Version(dist.version).public) != pins[name]:
            off.append(f"{name} {dist.version} (lock: {pins[name]})")
    assert off == [], (
        "the venv differs from requirements.lock (pip install -c requirements.lock -e '.[all]'): " + ", ".join(off)
    )


def test_ruff_is_one_release_everywhere():
    pins = locked()
    dev = [r for r in declared() if canonicalize_name(r.name) == "ruff"]
    assert dev and str(dev[0].specifier) == f"=={pins['ruff']}"
    config = (ROOT / ".pre-commit-config.yaml").read_text()
    assert re.search(r"ruff-pre-commit\n\s+rev: v(\S+)", config).group(1) == str(pins["ruff"])


@pytest.mark.parametrize(
    ("message", "ok"),
    [
        ("x" * 72 + "\n\nA body line may be as long as it needs to be, " + "y" * 80 + "\n", True),
        ("# a comment git strips, longer than the subject may be " + "z" * 40 + "\nSubject\n", True),
        ("x" * 73 + "\n", False),
        ("Subject\ncontinued on a second line\n", False),
        ("\n# only comments\n", False),
    ],
)
def test_commit_subject_hook(tmp_path, message, ok):
    path = tmp_path / "COMMIT_EDITMSG"
    path.write_text(message, encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "commit_subject.py"), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (proc.returncode == 0) == ok, proc.stderr
    if not ok:
        assert proc.stderr.startswith(f"{path}: ") and len(proc.stderr.strip().splitlines()) == 1
