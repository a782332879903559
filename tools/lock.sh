#!/usr/bin/env bash
# Renew requirements.lock: every release `pip install -e '.[all]'` installs, resolved from pyproject.toml for Linux
# x86-64 and Python 3.11 (the images' and CI's), pinned. CI, `make test` and the images install with
# `pip install -c requirements.lock`, so all three get the same releases; tests/test_lock.py fails when pyproject.toml
# and the lock disagree.
#
#     bash tools/lock.sh              # keep the pins that still fit pyproject.toml, resolve only what must change
#     bash tools/lock.sh --upgrade    # the newest releases pyproject.toml allows
#
# torch is resolved as PyPI publishes it (its CUDA build, with the nvidia-* runtime packages it needs); a CPU build of
# the same release (torch==2.13.0+cpu from docker/wheels/ or PyTorch's CPU index) satisfies the same pin and needs
# none of them. Needs uv (`pip install uv`), which reads the pins already in the lock as preferences.
set -euo pipefail
cd "$(dirname "$0")/.."
uv=${UV:-uv}
command -v "$uv" >/dev/null 2>&1 || { echo "lock.sh: uv not found (pip install uv, or UV=/path/to/uv)" >&2; exit 2; }
"$uv" pip compile pyproject.toml --all-extras --python-version 3.11 --python-platform x86_64-unknown-linux-gnu \
    --index-url https://pypi.org/simple --no-emit-package aegis-soul \
    --custom-compile-command "bash tools/lock.sh" --output-file requirements.lock "$@"
