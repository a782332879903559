#!/usr/bin/env bash
# The kit bench/gpu/serve.sh needs on a GPU machine without internet: prepare it here, copy the repository with it
# there, and run the serving benchmarks there in one command.
#
#   bench/gpu/prepare_serve.sh [DIR]        (default .gpudeps/serve; /.gpudeps/ goes into .git/info/exclude)
#
# It downloads llama-cpp-python's source (it vendors the llama.cpp our server loads; serve.sh builds that with CUDA,
# with llama-server and llama-batched-bench beside it) and the wheels the server, the exporter and the benchmarks
# import beyond what a CUDA PyTorch image already has (torch, transformers, numpy, pydantic, jinja2, pyyaml,
# requests, packaging), at the versions requirements.lock pins, built for CPython 3.12 on x86-64 Linux. It writes
#
#   DIR/llama.cpp.tar.xz    llama.cpp's source pruned to what a CPU + CUDA build of libllama, llama-server and
#                           llama-batched-bench reads (no models, docs, tests, examples, other backends)
#   DIR/serve-site.tar.xz   one site-packages folder: the wheels, plus llama-cpp-python's Python package without its
#                           shared libraries (serve.sh copies the ones it builds into llama_cpp/lib)
#   DIR/quickstart-q8_0.gguf  the GGUF of a short quickstart run of the embedded model (the tests' own, made or
#                           taken from the temp directory's cache): serve.sh's free-chat speculation rows
#   DIR/CONTENTS.txt        what they hold: versions, sizes, checksums
#
# Downloads are kept in KIT_CACHE (default ~/.cache/aegis-gpu-kit), so running it again only repacks; the archives
# are packed in a fixed order with fixed owners and times. Needs python3 with pip, tar and xz.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
DIR=${1:-.gpudeps/serve}
case $DIR in /*) ;; *) DIR=$ROOT/$DIR ;; esac
CACHE=${KIT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/aegis-gpu-kit}
PYTHON=${PYTHON:-python3}
LOCK=$ROOT/requirements.lock

# What the GPU machine gets as wheels: the server (litestar and what it requires, uvicorn with uvloop and httptools
# as the lock's uvicorn[standard] has them, prometheus-client, jsonschema/referencing for structured output, gguf),
# llama-cpp-python's own requirements (diskcache), the benchmarks' HTTP client (httpx), the tiny model's tokenizer
# trainer (sentencepiece, protobuf) and llguidance for bench/schema_coverage.py.
WHEELS=(
    litestar litestar-htmx msgspec multidict multipart polyfactory faker click rich-click rich markdown-it-py mdurl
    pygments anyio sniffio idna certifi typing-extensions
    uvicorn uvloop httptools h11 httpx httpcore
    prometheus-client jsonschema jsonschema-specifications referencing rpds-py attrs
    gguf tqdm diskcache sentencepiece protobuf llguidance
)
# and, pinned here (a profiler, not a dependency of the product): py-spy, for serve_bench --profile
TOOLS=(py-spy==0.4.3)
PLATFORM=(
    --python-version 3.12 --implementation cp --only-binary=:all:
    --platform manylinux_2_35_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
)

pin() {  # NAME -> NAME==VERSION from requirements.lock
    local line
    line=$(grep -i -m1 "^$1==" "$LOCK") || { echo "prepare_serve: $1 is not in requirements.lock" >&2; exit 1; }
    echo "$line"
}

pack() {  # ARCHIVE FOLDER NAME: FOLDER/NAME as a reproducible .tar.xz
    tar -C "$2" --sort=name --owner=0 --group=0 --numeric-owner --mtime='2000-01-01 00:00Z' -cf - "$3" \
        | xz -9 -T1 > "$1.part"
    mv "$1.part" "$1"
}

mkdir -p "$DIR" "$CACHE/wheels"
if exclude=$(git rev-parse --git-path info/exclude 2> /dev/null) && ! grep -qsx '/.gpudeps/' "$exclude"; then
    mkdir -p "$(dirname "$exclude")" && echo '/.gpudeps/' >> "$exclude"  # the kit is never committed
fi
LCP=$(pin llama-cpp-python)
LCP_VERSION=${LCP#*==}
SDIST=$CACHE/llama_cpp_python-$LCP_VERSION.tar.gz
if [[ ! -s $SDIST ]]; then
    echo "downloading $LCP (source)"
    "$PYTHON" -m pip download -q --no-deps --no-binary :all: -d "$CACHE" "$LCP"
fi
specs=()
for name in "${WHEELS[@]}"; do specs+=("$(pin "$name")"); done
specs+=("${TOOLS[@]}")
echo "downloading ${#specs[@]} wheels (kept ones are reused)"
"$PYTHON" -m pip download -q --no-deps "${PLATFORM[@]}" -d "$CACHE/wheels" "${specs[@]}"

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
tar -C "$WORK" -xzf "$SDIST"
SRC=$WORK/llama_cpp_python-$LCP_VERSION

# llama.cpp: what cmake reads for libllama, ggml (CPU, CUDA), mtmd, llama-server and llama-batched-bench. tools/ and
# app/ stay whole (tools/CMakeLists.txt adds every tool, the server needs tools/ui's templates), as do vendor/ (the
# server's HTTP and JSON libraries, mtmd's audio decoder) and the licenses the app embeds.
V=$SRC/vendor/llama.cpp
rm -rf "$V"/{models,docs,media,benches,tests,examples,pocs,gguf-py,conversion,requirements,grammars,skills,ci}
rm -rf "$V"/{.github,.devops,.gemini,.pi} "$V"/convert_*.py "$V"/build-xcframework.sh
rm -rf "$V"/tools/server/tests "$V"/tools/mtmd/tests "$V"/tools/mtmd/test-* "$V"/tools/ui/{src,tests}
find "$V/scripts" -mindepth 1 -maxdepth 1 -not -name '*.cmake' -not -name '*.sh' -exec rm -rf {} +
for backend in "$V"/ggml/src/ggml-*/; do
    case $(basename "$backend") in ggml-cpu | ggml-cuda) ;; *) rm -rf "$backend" ;; esac
done
mv "$V" "$WORK/llama.cpp"
pack "$DIR/llama.cpp.tar.xz" "$WORK" llama.cpp

# the site folder: the wheels installed for CPython 3.12 (no scripts), plus llama_cpp's Python package
SITE=$WORK/site
"$PYTHON" -m pip install -q --no-deps --no-index --find-links "$CACHE/wheels" --target "$SITE" --no-compile \
    "${PLATFORM[@]}" "${specs[@]}"
find "$SITE/bin" -mindepth 1 -not -name py-spy -delete  # the scripts go, py-spy's executable stays
find "$SITE" -name __pycache__ -prune -exec rm -rf {} +
cp -r "$SRC/llama_cpp" "$SITE/llama_cpp"
rm -rf "$SITE/llama_cpp/lib"
mv "$SITE" "$WORK/serve-site"
pack "$DIR/serve-site.tar.xz" "$WORK" serve-site

# the quickstart run's GGUF (trained and exported here once, as the tests make it)
"$ROOT/.venv/bin/python" - "$DIR/quickstart-q8_0.gguf" <<'EOF'
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, ".")
from tests.support.serving import exported_run, find_gguf

shutil.copyfile(find_gguf(exported_run(Path(tempfile.gettempdir()) / "aegis-serve"), "q8_0"), sys.argv[1])
EOF

{
    echo "# the serving benchmarks' kit for bench/gpu/serve.sh (written by bench/gpu/prepare_serve.sh)"
    echo "llama.cpp.tar.xz: llama.cpp as $LCP $(basename "$SDIST") vendors it, pruned"
    echo "serve-site.tar.xz: CPython 3.12 x86-64 site folder: llama_cpp (Python, no libraries) from $LCP and"
    printf '    %s\n' "${specs[@]}"
    echo "quickstart-q8_0.gguf: a 20-step quickstart run of the embedded model, exported (tests/support/serving.py)"
    echo
    echo "# bytes  sha256  file"
    for f in llama.cpp.tar.xz serve-site.tar.xz quickstart-q8_0.gguf; do
        echo "$(stat -c %s "$DIR/$f")  $(sha256sum "$DIR/$f" | cut -d' ' -f1)  $f"
    done
} > "$DIR/CONTENTS.txt"
cat "$DIR/CONTENTS.txt"
du -ch "$DIR"/* | tail -1
