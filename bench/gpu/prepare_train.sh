#!/usr/bin/env bash
# Training benchmark kit, part 1 of 2: prepare here (PyPI reachable), copy, run on a GPU machine without internet.
#
#   bash bench/gpu/prepare_train.sh [DIR]      # DIR defaults to .gpudeps/train (keep it out of git)
#
# The GPU machine's image is assumed to hold Python 3.12, torch 2.11 + CUDA 13, transformers 5.17, peft 0.21,
# accelerate 1.15, huggingface_hub 1.x and the usual ML stack, but no bitsandbytes and no Unsloth. This puts into
# DIR only what the two training benchmarks need on top of that, trimmed to travel light:
#   DIR/wheels/*.whl     ours (bench/train_throughput.py): transformers 5.25 (ours needs >= 5.21) with the
#                        huggingface_hub 2.x, httpx2 and kernels it requires, and the small pure-Python packages
#                        those need newer than an image may have
#   DIR/bnb/             bitsandbytes, its CPU and CUDA 13.x libraries only (both benchmarks; a folder for PYTHONPATH,
#                        dist-info kept so that transformers and Unsloth see its version)
#   DIR/unsloth.tar.xz   Unsloth's own site folder (bench/train_unsloth.py): Unsloth pins transformers <= 5.17, so it
#                        runs on the image's transformers in its own process, never beside 5.25
#   DIR/CONTENTS.txt     what each holds, and the third-party modules they import at import time that the kit does not
#                        carry (the image must have them)
# Then: copy the repository and DIR to the GPU machine and run `bash bench/gpu/train.sh OUTDIR DIR` there.
# Idempotent: what is already in DIR is kept; downloads are cached beside it (DIR-cache: not to be copied).
set -euo pipefail
cd "$(dirname "$0")/../.."
DIR=${1:-.gpudeps/train}
CACHE=${CACHE:-${DIR%/}-cache}
PY=${PYTHON:-python3}
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
mkdir -p "$DIR/wheels" "$CACHE"

# the GPU machine's interpreter and platform, whatever this one is
TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
    --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
    --platform manylinux2014_x86_64)

# ours: the transformers of requirements.lock and what it needs newer than the image's transformers 5.17 did
# (huggingface_hub 2.x, which moved to httpx2; kernels, which transformers >= 5.2x requires). anyio, idna, h11,
# typing_extensions and tomlkit are small, and their floors (httpx2: anyio >= 4.10, idna >= 3.18) are newer than
# some images carry. Versions as in requirements.lock.
OURS=(transformers==5.25.0 huggingface_hub==2.4.0 httpx2==2.17.0 httpcore2==2.17.0 truststore==0.10.5
    kernels==0.19.1 tomlkit==0.14.0 anyio==4.16.0 idna==3.21 h11==0.16.0 typing_extensions==4.16.0)
BNB=bitsandbytes==0.50.2
BNB_LIBS=(libbitsandbytes_cpu.so libbitsandbytes_cuda130.so libbitsandbytes_cuda132.so)
# Unsloth's site: its pins accept the image (transformers <= 5.17, peft >= 0.18, accelerate >= 0.34.1,
# torch < 2.15; trl <= 1.15). datasets 4.8.5 wants fsspec <= 2026.2.0 and typeguard typing_extensions >= 4.14, so
# both travel too. Not carried, expected from the image: pandas, pyarrow, pydantic, requests, httpx, psutil, pillow,
# jinja2, protobuf, regex, pyyaml, tqdm, filelock, packaging, sentencepiece, tokenizers, safetensors, triton.
UNSLOTH=(unsloth==2026.10.9 unsloth_zoo==2026.10.9 trl==1.15.0 datasets==4.8.5 torchao==0.17.0 tyro==1.0.17
    cut_cross_entropy==25.1.1 dill==0.4.1 multiprocess==0.70.19 json5==0.17.3 structlog==26.1.0 nest_asyncio==1.6.0
    docstring_parser==0.18.0 typeguard==4.6.1 einops==0.8.2 msgspec==0.23.0 xxhash==4.1.0 fsspec==2026.2.0
    typing_extensions==4.16.0)
# the image's versions that matter to those pins (what the kit is built for; train.sh prints the real ones)
IMAGE=(torch==2.11.0 transformers==5.17.0 peft==0.21.0 accelerate==1.15.0 huggingface_hub==1.33.0 numpy==2.5.0
    safetensors==0.8.0 tokenizers==0.23.1 sentencepiece==0.2.0)
# dropped from it: Unsloth's web app and CLI (studio/, unsloth_cli/, ~83 MB), scripts, torchao's tests and its
# SM90a CUTLASS library (12 MB; optional, loaded only if present). torchao's prototype/ stays: peft's torchao
# dispatch imports it.
DROP=(studio unsloth_cli bin test torchao/_C_cutlass_90a.abi3.so)

wheel() { # the wheel's path for SPEC in FOLDER, if there
    local name=${1%%==*} ver=${1#*==}
    name=${name,,}
    name=${name//[-.]/_}
    compgen -G "$2/${name}-${ver}-*.whl" | head -1 || true
}
have() { [ -n "$(wheel "$1" "$2")" ]; }
fetch() { # fetch SPEC FOLDER
    have "$1" "$2" && return 0
    echo "download $1"
    "$PY" -m pip download -q --no-deps "${TARGET[@]}" -d "$2" "$1" 2>&1 | grep -v "^WARNING: Location" || true
    have "$1" "$2" || { echo "no wheel for $1" >&2; exit 1; }
}

for s in "${OURS[@]}"; do fetch "$s" "$DIR/wheels"; done

if [ ! -f "$DIR/bnb/bitsandbytes/libbitsandbytes_cuda130.so" ]; then
    fetch "$BNB" "$CACHE"
    rm -rf "$DIR/bnb.tmp" && mkdir -p "$DIR/bnb.tmp"
    "$PY" -m zipfile -e "$(wheel "$BNB" "$CACHE")" "$DIR/bnb.tmp"
    for f in "$DIR"/bnb.tmp/bitsandbytes/lib*.so; do
        keep=0
        for k in "${BNB_LIBS[@]}"; do [ "$(basename "$f")" = "$k" ] && keep=1; done
        [ $keep = 1 ] || rm -f "$f"
    done
    rm -rf "$DIR/bnb" && mv "$DIR/bnb.tmp" "$DIR/bnb"
fi

SITE=$CACHE/unsloth-site
if [ ! -f "$DIR/unsloth.tar.xz" ] || { [ ! -f "$DIR/CONTENTS.txt" ] && [ ! -d "$SITE/unsloth" ]; }; then
    for s in "${UNSLOTH[@]}"; do fetch "$s" "$CACHE"; done
    rm -rf "$SITE"
    whls=()
    for s in "${UNSLOTH[@]}"; do whls+=("$(wheel "$s" "$CACHE")"); done
    "$PY" -m pip install -q --no-deps --no-compile "${TARGET[@]}" --target "$SITE" "${whls[@]}" 2>&1 |
        grep -v "^WARNING: Location" || true
    for d in "${DROP[@]}"; do rm -rf "${SITE:?}/$d"; done
    find "$SITE" -name __pycache__ -prune -exec rm -rf {} +
    if [ ! -f "$DIR/unsloth.tar.xz" ]; then
        echo "pack unsloth.tar.xz"
        XZ_OPT=-9e tar -C "$SITE" --owner=0 --group=0 --sort=name -cJf "$DIR/unsloth.tar.xz.tmp" .
        mv "$DIR/unsloth.tar.xz.tmp" "$DIR/unsloth.tar.xz"
    fi
fi

# CONTENTS.txt: the parts, and a static check of what they import when imported (module level, not inside
# functions) that the kit does not carry: each such module must come from the image. Guarded imports (inside a try
# that tolerates the failure) and conditional ones (under an `if`, mostly availability checks) are listed apart.
if [ ! -f "$DIR/CONTENTS.txt" ]; then
    cat >"$CACHE/imports.py" <<'EOF'
import ast
import sys
from pathlib import Path

paths = [Path(p) for p in sys.argv[1].split(":")]
stdlib = (set(sys.stdlib_module_names) | {"__future__", "__main__"}) - {"distutils", "imp", "asynchat", "asyncore"}
KINDS = ("required", "if", "try")  # unconditional; under an `if`; inside a try that swallows the ImportError


def find(mod):
    """(file or None, is_package); False when not found under the paths."""
    parts = mod.split(".")
    for base in paths:
        p = base.joinpath(*parts)
        if (p / "__init__.py").exists():
            return p / "__init__.py", True
        if p.with_suffix(".py").exists():
            return p.with_suffix(".py"), False
        if p.is_dir() or list(p.parent.glob(parts[-1] + ".*.so")):
            return None, p.is_dir()
    return False, False


def tolerates(h):
    types = h.type.elts if isinstance(h.type, ast.Tuple) else [h.type]
    names = [("BaseException" if t is None else getattr(t, "id", getattr(t, "attr", None))) for t in types]
    caught = any(n in ("ImportError", "ModuleNotFoundError", "Exception", "BaseException") for n in names)
    return caught and not any(isinstance(x, ast.Raise) for b in h.body for x in ast.walk(b))


def imports(tree, mod, is_pkg):
    out = []

    def walk(nodes, kind):
        for n in nodes:
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if isinstance(n, ast.Try):
                walk(n.body, 2 if all(tolerates(h) for h in n.handlers) else kind)
                for h in n.handlers:
                    walk(h.body, max(kind, 1))
                walk(n.orelse, kind)
                walk(n.finalbody, kind)
            elif isinstance(n, ast.If):
                t = n.test
                if getattr(t, "id", getattr(t, "attr", None)) != "TYPE_CHECKING":
                    walk(n.body, max(kind, 1))
                walk(n.orelse, max(kind, 1))
            elif isinstance(n, ast.Import):
                out.extend((a.name, kind) for a in n.names)
            elif isinstance(n, ast.ImportFrom):
                if n.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - (n.level - 1)]
                    prefix = ".".join(base + ([n.module] if n.module else []))
                else:
                    prefix = n.module
                out.append((prefix, kind))
                out.extend((f"{prefix}.{a.name}", kind) for a in n.names if a.name != "*")
            else:
                for field in ("body", "orelse", "finalbody"):
                    sub = getattr(n, field, None)
                    if isinstance(sub, list):
                        walk(sub, kind)

    walk(tree.body, 0)
    return out


seen, missing = {}, {}
queue = [(s, 0, "start") for s in sys.argv[2].split(",")]
while queue:
    mod, kind, by = queue.pop()
    root = mod.split(".")[0]
    if not mod or root in stdlib or (mod in seen and seen[mod] <= kind):
        continue
    f, is_pkg = find(mod)
    if f is False:
        if find(root)[0] is False and kind < missing.get(root, (9,))[0]:
            missing[root] = (kind, by)
        continue
    seen[mod] = kind
    parts = mod.split(".")
    queue += [(".".join(parts[:i]), kind, mod) for i in range(1, len(parts))]
    if f is not None:
        try:
            tree = ast.parse(f.read_bytes())
        except SyntaxError as e:
            print(f"  (not parsed here: {f}: {e.msg})")
            continue
        queue += [(name, max(kind, k), mod) for name, k in imports(tree, mod, is_pkg) if name]
for root, (kind, by) in sorted(missing.items(), key=lambda kv: (kv[1][0], kv[0])):
    print(f"  {KINDS[kind]:8s} {root:22s} first from {by}")
print(f"  ({len(seen)} modules followed; reached in the kit: {' '.join(sorted({m.split('.')[0] for m in seen}))})")
EOF
    OURS_SITE=$CACHE/ours-site
    rm -rf "$OURS_SITE"
    "$PY" -m pip install -q --no-deps --no-compile "${TARGET[@]}" --target "$OURS_SITE" "$DIR"/wheels/*.whl 2>&1 |
        grep -v "^WARNING: Location" || true
    {
        echo "# Training benchmark kit: made by bench/gpu/prepare_train.sh, used by bench/gpu/train.sh"
        echo
        echo "## wheels/ (ours: installed with pip --target; bytes)"
        (cd "$DIR/wheels" && stat -c '%s %n' -- *.whl)
        echo
        echo "## bnb/ (bitsandbytes, trimmed; on PYTHONPATH of both benchmarks)"
        (cd "$DIR/bnb" && stat -c '%s %n' -- *.dist-info bitsandbytes/*.so)
        echo
        echo "## unsloth.tar.xz ($(stat -c %s "$DIR/unsloth.tar.xz") bytes; unpacked $(du -sh "$SITE" | cut -f1))"
        (cd "$SITE" && ls -d -- *.dist-info)
        echo "dropped: ${DROP[*]}"
        echo
        echo "## pins: each Requires-Dist of Unsloth's site against its own packages, bitsandbytes and the image"
        "$PY" - "$SITE" "$DIR/bnb" "${IMAGE[@]}" <<'EOF'
import sys
from importlib.metadata import PathDistribution
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

env = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "implementation_name": "cpython",
    "os_name": "posix",
    "extra": "",
}
have, where = {}, {}
for folder in sys.argv[1:3]:
    for d in Path(folder).glob("*.dist-info"):
        dist = PathDistribution(d)
        have[canonicalize_name(dist.metadata["Name"])] = dist.version
        where[canonicalize_name(dist.metadata["Name"])] = "kit"
for spec in sys.argv[3:]:
    name, _, version = spec.partition("==")
    have.setdefault(canonicalize_name(name), version)
    where.setdefault(canonicalize_name(name), "image")
for top in ("unsloth", "unsloth_zoo", "trl", "datasets", "torchao", "bitsandbytes"):
    d = [p for f in sys.argv[1:3] for p in Path(f).glob(f"{top}-*.dist-info")][0]
    bad, unknown = [], []
    for text in PathDistribution(d).requires or []:
        r = Requirement(text)
        if r.marker and not r.marker.evaluate(env):
            continue
        n = canonicalize_name(r.name)
        if n not in have:
            unknown.append(r.name)
        elif r.specifier and not r.specifier.contains(have[n], prereleases=True):
            bad.append(f"{r} (has {have[n]}, {where[n]})")
    print(f"  {top}: {'ok' if not bad else 'CONFLICT ' + '; '.join(bad)}")
    print(f"    not checked (from the image, version not known here): {' '.join(sorted(set(unknown))) or '-'}")
EOF
        echo
        echo "## imported at import time, not in the kit (expected from the image)"
        echo "### ours: train (python -m train), bench/train_throughput.py, transformers' Phi-3 + bitsandbytes path"
        starts=(train.__main__ train.loop bench.train_throughput transformers transformers.modeling_utils
            transformers.models.phi3.modeling_phi3 transformers.integrations.bitsandbytes transformers.quantizers.auto
            huggingface_hub bitsandbytes)
        "$PY" "$CACHE/imports.py" "$OURS_SITE:$DIR/bnb:$PWD" "$(IFS=,; echo "${starts[*]}")"
        echo "### Unsloth: bench/train_unsloth.py, unsloth (its GPU path), unsloth_zoo, trl, datasets"
        starts=(bench.train_unsloth bench.llamafy unsloth unsloth._gpu_init unsloth.models unsloth_zoo trl datasets)
        "$PY" "$CACHE/imports.py" "$SITE:$DIR/bnb:$PWD" "$(IFS=,; echo "${starts[*]}")"
        echo
        echo "Read by hand (both lists): each 'if' entry is an availability check (wandb, comet_ml, flash_attn,"
        echo "nibabel, rich, mslk, habana_frameworks, hqq, torchao...) or another platform's branch (mlx);"
        echo "torchvision is optional for Unsloth (checked only where installed). 'required' ones outside the kit"
        echo "come from the image."
    } >"$DIR/CONTENTS.txt.tmp"
    mv "$DIR/CONTENTS.txt.tmp" "$DIR/CONTENTS.txt"
fi

echo "kit in $DIR:"
du -b --max-depth=1 "$DIR" | sort -n | awk '{printf "%8.2f MiB  %s\n", $1 / 1048576, $2}'
