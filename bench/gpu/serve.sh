#!/usr/bin/env bash
# The serving benchmarks on one GPU machine without internet, in one command from the repository root, within a
# deadline. Prepare the kit with bench/gpu/prepare_serve.sh where there is internet, copy the repository with it,
# then there:
#
#   bench/gpu/serve.sh OUTDIR [DIR]          DIR: the kit (default .gpudeps/serve)
#
# It builds llama.cpp with CUDA from the kit's source (libllama and libmtmd for llama-cpp-python, llama-server and
# llama-batched-bench) in the background while it makes a Phi-3.5-mini-shaped model with random weights
# (bench/random_model.py) and exports it to a q8_0 GGUF with our exporter; then, each under its own time limit:
#   a  bench/schema_load.py load        constrained requests beside free ones (16 clients, 8 with a JSON schema)
#   b  bench/serve_bench.py             ours against llama-server and llama-batched-bench, one call per client level
#                                       (so a run cut short keeps the levels done), merged into one serve.json
#   c  bench/engine_overhead.py         the engine's own cost per decode step, profiled
#   d  bench/speculate_bench.py         prompt-lookup speculation on and off: on the GGUF above (what drafting costs
#                                       at Phi-3.5-mini's size, free chat's rows), then, where the kit holds it, on
#                                       COPY_GGUF, the tiny model that copies (bench/copy_model.py; the grounded rows),
#                                       and on DIR/quickstart-q8_0.gguf (prepare_serve.sh's; free chat that does not
#                                       loop, unlike a random model's)
# OUTDIR gets run.txt (versions, each step's command, exit status and seconds), schema_load.json, serve.json,
# engine.json, speculate.json, speculate_copy.json, speculate_chat.json and logs.tar.xz (every log: build, model,
# steps, servers).
# COPY_GGUF (default DIR/copy-tiny-q8_0.gguf): trained on a GPU by `PARTS=copymodel bench/gpu/train.sh`, exported
# here by `python bench/copy_model.py --model-dir` and copied into the kit.
#
# The machine needs Python 3.12 with torch and transformers (numpy, pydantic, pyyaml, jinja2, requests, packaging
# beside them), a CUDA toolkit with nvcc, cmake and ninja. Everything else comes from the kit: its site folder is
# unpacked to /tmp/aegis-serve-site (first on PYTHONPATH) and the built shared libraries go into its llama_cpp/lib.
# The llama.cpp build and the GGUF stay in WORKDIR: a second run on the same machine rebuilds nothing and makes no
# model, so STEPS=c,d after a first run cut short has the whole time for those.
#
# Environment: LIMIT seconds from the start (default 550; every step runs under `timeout`, so the script ends in time
# and keeps what it got), STEPS (default a,b,c,d), LEVELS (serve_bench's client levels, default 1,4,16,64), CHATS
# (serve_bench's prefix-reuse chats after the levels, default 0: none), WORKDIR (default build/gpu-serve, ignored by
# git), BUILD (llama.cpp's build folder, default WORKDIR/llama.cpp-build), GGUF (default WORKDIR/phi35-q8_0.gguf,
# made when missing), PYTHON (default python3), JOBS (build jobs, default all cores), CUDA (ON; OFF builds for the
# CPU alone, for a trial without a GPU), CUDA_ARCH (default 90: H100, H200), MODEL_ARGS (more bench/random_model.py
# arguments, e.g. "--layers 2 --hidden 384" for a trial), PROFILE=1 (py-spy profiles of ours during serve_bench's
# loads, into logs.tar.xz's profiles/), REQUESTS (serve_bench's requests per client, default 2), DRY=1 (print the
# commands, run nothing).
set -uo pipefail  # no -e: a failed step is recorded and the next one runs

OUTDIR=${1:?usage: bench/gpu/serve.sh OUTDIR [DIR]}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT" || exit 1
KIT=${2:-.gpudeps/serve}
LIMIT=${LIMIT:-550}
STEPS=${STEPS:-a,b,c,d}
LEVELS=${LEVELS:-1,4,16,64}
CHATS=${CHATS:-0}
WORKDIR=${WORKDIR:-build/gpu-serve}
BUILD=${BUILD:-$WORKDIR/llama.cpp-build}
GGUF=${GGUF:-$WORKDIR/phi35-q8_0.gguf}
PYTHON=${PYTHON:-python3}
JOBS=${JOBS:-$(nproc)}
CUDA=${CUDA:-ON}
CUDA_ARCH=${CUDA_ARCH:-90}
MODEL_ARGS=${MODEL_ARGS:-}
COPY_GGUF=${COPY_GGUF:-$KIT/copy-tiny-q8_0.gguf}
DRY=${DRY:-0}
SITE=/tmp/aegis-serve-site
SRC=$WORKDIR/llama.cpp
RESERVE=20  # seconds kept at the end: a step's SIGINT grace (10 s), stopping what still runs, packing the logs
MIN_STEP=30  # a step with less time than this left is skipped
START=$SECONDS

abs() { case $1 in /*) echo "$1" ;; *) echo "$ROOT/$1" ;; esac; }
OUTDIR=$(abs "$OUTDIR") KIT=$(abs "$KIT") WORKDIR=$(abs "$WORKDIR") SRC=$(abs "$SRC")
BUILD=$(abs "$BUILD") GGUF=$(abs "$GGUF") COPY_GGUF=$(abs "$COPY_GGUF")
LOGS=$(mktemp -d /tmp/aegis-serve-logs.XXXXXX)
PARTS=$LOGS/serve_bench_levels  # serve_bench's JSON per level, merged into OUTDIR/serve.json
RESULTS=(run.txt schema_load.json serve.json engine.json speculate.json speculate_copy.json speculate_chat.json
    logs.tar.xz)  # all this writes in OUTDIR
if [[ $DRY == 1 ]]; then
    RUN=$LOGS/run.txt
else
    mkdir -p "$OUTDIR" "$WORKDIR" "$PARTS" && (cd "$OUTDIR" && rm -f "${RESULTS[@]}")  # no result of an earlier run stays
    RUN=$OUTDIR/run.txt
fi
: > "$RUN"

left() { echo $((LIMIT - (SECONDS - START))); }
note() { echo "[$((SECONDS - START))s] $*" | tee -a "$RUN"; }
show() { printf '%q ' "$@"; }

export PATH=$PATH:$SITE/bin  # py-spy (serve_bench --profile)
export PYTHONPATH=$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}
export LD_LIBRARY_PATH=$SITE/llama_cpp/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
if ! command -v nvcc > /dev/null && [[ -x /usr/local/cuda/bin/nvcc ]]; then export PATH=$PATH:/usr/local/cuda/bin; fi

BG=()  # process groups of the background jobs (timeout leads its own group), stopped at the end
CURRENT=  # and the running step's
background() {  # NAME WHAT CMD...: CMD under timeout (the time left less the reserve) in the background, output to
    # its log; WHAT says what it runs
    local name=$1
    note "$name (background, log $name.log): $2"
    shift 2
    [[ $DRY == 1 ]] && return 0
    local t=$(($(left) - RESERVE))
    timeout -k 10 $((t > 1 ? t : 1)) "$@" > "$LOGS/$name.log" 2>&1 &
    BG+=($!)
    eval "PID_${name//-/_}=$!"
}

finish() {  # wait for background job NAME; 0 when it succeeded
    local name=$1 pid
    [[ $DRY == 1 ]] && return 0
    eval "pid=\${PID_${name//-/_}:-}"
    [[ -z $pid ]] && return 0
    wait "$pid"
    local rc=$? keep=() p
    for p in "${BG[@]}"; do [[ $p == "$pid" ]] || keep+=("$p"); done
    BG=("${keep[@]}")
    note "$name: exit $rc"
    if ((rc != 0)); then tail -n 30 "$LOGS/$name.log"; fi
    return $rc
}

step() {  # NAME CAP CMD...: CMD under timeout (CAP seconds or the time left less the reserve, the shorter), its
    # output to the terminal and NAME.log; SIGINT first (benchmarks stop their servers), SIGKILL 10 s later
    local name=$1 cap=$2 t rc t0 pid
    shift 2
    t=$(($(left) - RESERVE))
    ((cap < t)) && t=$cap
    if ((t < MIN_STEP)); then
        note "$name: skipped, ${t}s left"
        return 1
    fi
    note "$name (limit ${t}s): $(show "$@")"
    [[ $DRY == 1 ]] && return 0
    t0=$SECONDS
    timeout -s INT -k 10 "$t" "$@" > >(tee -a "$LOGS/$name.log") 2>&1 &
    pid=$!
    CURRENT=$pid
    wait "$pid"
    rc=$?
    kill -KILL -- "-$pid" 2> /dev/null  # a server the step left behind: it would hold the GPU's memory
    CURRENT=
    note "$name: exit $rc after $((SECONDS - t0))s"
    return $rc
}

cleanup() {
    local pid
    for pid in "${BG[@]}" $CURRENT; do kill -KILL -- "-$pid" 2> /dev/null; done
    if [[ $DRY == 1 ]]; then
        rm -rf "$LOGS"
        return
    fi
    cp "$RUN" "$LOGS/run.txt"
    if command -v xz > /dev/null; then
        tar -C "$LOGS" -cf - . | xz -6 -T0 > "$OUTDIR/logs.tar.xz"
    else
        "$PYTHON" -c 'import sys, tarfile
with tarfile.open(sys.argv[1], "w:xz") as t:
    t.add(sys.argv[2], ".")' "$OUTDIR/logs.tar.xz" "$LOGS"
    fi
    rm -rf "$LOGS"
    echo "results in $OUTDIR:"
    ls -l "$OUTDIR"
}
trap cleanup EXIT
trap 'note "interrupted"; exit 130' INT TERM

wants() { [[ ,$STEPS, == *,$1,* ]]; }

unpack() {  # ARCHIVE FOLDER: a .tar.xz, by tar and xz, else by Python's tarfile
    if command -v xz > /dev/null; then
        tar -C "$2" -xJf "$1"
    else
        "$PYTHON" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="data")' "$1" "$2"
    fi
}

# 1. llama.cpp's source (unpacked again only when the kit's differs, so the build folder stays valid), its build
sum=$(sha256sum "$KIT/llama.cpp.tar.xz" 2> /dev/null | cut -c1-64)
if [[ -z $sum ]]; then
    note "no $KIT/llama.cpp.tar.xz: run bench/gpu/prepare_serve.sh first"
    exit 1
fi
if [[ $(cat "$WORKDIR/llama.cpp.sha256" 2> /dev/null) != "$sum" ]]; then
    note "unpacking llama.cpp into $SRC"
    if [[ $DRY != 1 ]]; then
        rm -rf "$SRC" "$BUILD" "$WORKDIR/llama.cpp.sha256"
        unpack "$KIT/llama.cpp.tar.xz" "$WORKDIR" && echo "$sum" > "$WORKDIR/llama.cpp.sha256"
    fi
fi
cmake_args=(
    -S "$SRC" -B "$BUILD" -G "$(command -v ninja > /dev/null && echo Ninja || echo 'Unix Makefiles')"
    -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DGGML_CUDA="$CUDA"
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
)
[[ $CUDA == ON ]] && cmake_args+=(-DCMAKE_CUDA_ARCHITECTURES="$CUDA_ARCH")
targets=(llama llama-server llama-batched-bench)
# shellcheck disable=SC2016 # expanded by the inner shell
background build "cmake ${cmake_args[*]} && cmake --build $BUILD -j $JOBS --target ${targets[*]}" \
    bash -c 'cmake "${@:4}" && cmake --build "$1" -j "$2" --target $3' \
    _ "$BUILD" "$JOBS" "${targets[*]}" "${cmake_args[@]}"

# 2. the Python packages
note "unpacking $KIT/serve-site.tar.xz into $SITE"
if [[ $DRY != 1 ]]; then
    rm -rf "$SITE" "$SITE.part" && mkdir -p "$SITE.part" && unpack "$KIT/serve-site.tar.xz" "$SITE.part" \
        && mv "$SITE.part/serve-site" "$SITE" && rmdir "$SITE.part" || note "could not unpack the site folder"
fi

# 3. the model: random weights shaped like Phi-3.5-mini, our exporter's q8_0 (the server would hash the 4 GB file
# at every start against the record export writes beside it; the benchmarks time serving, so the record goes)
if [[ -s $GGUF ]]; then
    note "reusing $GGUF"
else
    model=${GGUF%.gguf}-hf
    export_args=(--type q8_0 --skip-parity --no-progress)
    # shellcheck disable=SC2016 # expanded by the inner shell
    background model "$PYTHON bench/random_model.py $model $MODEL_ARGS && $PYTHON -m export gguf --model $model \
--out $GGUF ${export_args[*]} && rm -rf $model $GGUF.sha256" \
        bash -c '"$1" bench/random_model.py "$2" $4 && "$1" -m export gguf --model "$2" --out "$3" "${@:5}" \
            && rm -rf "$2" "$3.sha256"' _ "$PYTHON" "$model" "$GGUF" "$MODEL_ARGS" "${export_args[@]}"
fi

# versions, while those run
{
    echo "date: $(date -u +%FT%TZ)"
    echo "gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2> /dev/null | head -1)"
    echo "cpus: $(nproc)"
    echo "python: $("$PYTHON" --version 2>&1)"
    echo "torch, cuda, transformers: $("$PYTHON" -c 'import torch, transformers
print(torch.__version__, torch.version.cuda, transformers.__version__)' 2>&1 | tail -1)"
    echo "nvcc: $(nvcc --version 2> /dev/null | tail -1)"
    echo "cmake: $(cmake --version 2> /dev/null | head -1)"
    echo "commit: $(git rev-parse --short HEAD 2> /dev/null || echo unknown)"
    echo "kit: $(grep -m1 '^llama.cpp.tar.xz:' "$KIT/CONTENTS.txt" 2> /dev/null)"
    echo "settings: LIMIT=$LIMIT STEPS=$STEPS LEVELS=$LEVELS CHATS=$CHATS CUDA=$CUDA JOBS=$JOBS MODEL_ARGS=$MODEL_ARGS"
} | tee -a "$RUN"

ok=1
finish build || ok=0
finish model || ok=0
if [[ $DRY != 1 && $ok == 1 ]]; then
    mkdir -p "$SITE/llama_cpp/lib"
    find "$BUILD" -path '*/CMakeFiles' -prune -o -name 'lib*.so*' -print0 | xargs -0 -r cp -a -t "$SITE/llama_cpp/lib"
    note "llama_cpp/lib: $(ls "$SITE/llama_cpp/lib" | tr '\n' ' ')"
    [[ -s $GGUF ]] || { note "no $GGUF"; ok=0; }
fi
if [[ $ok != 1 ]]; then
    note "the build or the model failed: no benchmarks (their logs are in logs.tar.xz)"
    exit 1
fi
note "ready; $(left)s left"

if wants a; then
    step schema_load 150 "$PYTHON" bench/schema_load.py load --gguf "$GGUF" --clients 16 --constrained 8 \
        --requests 2 --max-tokens 256 --out "$OUTDIR/schema_load.json" --logs "$LOGS/schema_load_servers"
fi

merge_serve() {  # serve_bench's JSON files (those there) as one result, with its table and ratios
    [[ $DRY == 1 ]] && return 0
    "$PYTHON" - "$OUTDIR/serve.json" "$@" << 'EOF'
import json
import sys
from pathlib import Path

sys.path.insert(0, "bench")
parts = [json.loads(Path(p).read_text()) for p in sys.argv[2:] if Path(p).is_file()]
if parts:
    out = dict(parts[0])
    for key in ("rows", "batched_bench", "failed"):
        out[key] = [x for p in parts for x in p[key]]
    out["ratios_ours_over"] = {k: v for p in parts for k, v in p["ratios_ours_over"].items()}
    out["prefix_cache_ttft_ms"] = next((p["prefix_cache_ttft_ms"] for p in parts if p["prefix_cache_ttft_ms"]), {})
    out["command"] = " ; ".join(p["command"] for p in parts)
    try:
        from serve_bench import markdown

        out["table"] = markdown(out["rows"], "GPU memory" if out["machine"]["gpu"] else "RSS")
    except Exception as e:  # the rows are there; the table is a convenience
        out["table"] = f"(no table: {e})"
    Path(sys.argv[1]).write_text(json.dumps(out, indent=1, ensure_ascii=False))
    print(out["table"])
EOF
}

if wants b; then
    common=(--gguf "$GGUF" --requests "${REQUESTS:-2}" --max-tokens 256 --ctx 1024 --baseline-levels=)
    parts=()
    for level in ${LEVELS//,/ }; do
        parts+=("$PARTS/level-$level.json")
        step "serve_bench-$level" 150 "$PYTHON" bench/serve_bench.py "${common[@]}" --clients "$level" \
            --llama-server "$BUILD/bin/llama-server" --batched-bench "$BUILD/bin/llama-batched-bench" --chats 0 \
            --logs "$LOGS/serve_bench_servers/level-$level" --out "${parts[-1]}" \
            ${PROFILE:+--profile "$LOGS/profiles"}
    done
    if ((CHATS > 0)); then
        parts+=("$PARTS/chats.json")
        step serve_bench-chats 120 "$PYTHON" bench/serve_bench.py "${common[@]}" --clients= --chats "$CHATS" \
            --logs "$LOGS/serve_bench_servers/chats" --out "${parts[-1]}"
    fi
    merge_serve "${parts[@]}" > "$LOGS/serve_merge.log" 2>&1
    cat "$LOGS/serve_merge.log" 2> /dev/null
fi

if wants c; then
    step engine_overhead 120 "$PYTHON" bench/engine_overhead.py --gguf "$GGUF" --profile --out "$OUTDIR/engine.json"
fi

if wants d; then
    step speculate 180 "$PYTHON" bench/speculate_bench.py --gguf "$GGUF" --out "$OUTDIR/speculate.json" \
        --logs "$LOGS/speculate_servers"
    if [[ -f $COPY_GGUF ]]; then
        step speculate-copy 120 "$PYTHON" bench/speculate_bench.py --gguf "$COPY_GGUF" \
            --out "$OUTDIR/speculate_copy.json" --logs "$LOGS/speculate_copy_servers"
    else
        note "no $COPY_GGUF: the speculation rows of a model that copies are not run"
    fi
    if [[ -f $KIT/quickstart-q8_0.gguf ]]; then
        step speculate-chat 120 "$PYTHON" bench/speculate_bench.py --gguf "$KIT/quickstart-q8_0.gguf" \
            --out "$OUTDIR/speculate_chat.json" --logs "$LOGS/speculate_chat_servers"
    fi
fi
note "done; $(left)s left"
