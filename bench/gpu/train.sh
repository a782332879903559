#!/usr/bin/env bash
# Training benchmark kit, part 2 of 2: on the GPU machine (no internet), from the repository root:
#
#   bash bench/gpu/train.sh OUTDIR [DIR]      # DIR: what bench/gpu/prepare_train.sh made (.gpudeps/train)
#
# Ours (bench/train_throughput.py) and Unsloth (bench/train_unsloth.py) side by side on one card, in one command of
# at most LIMIT seconds (default 550, counted from this script's start): every step runs under a timeout taken from
# what is left, and the benchmarks write their JSON row by row, so a step cut short still leaves what it measured.
# The two need different transformers (ours >= 5.21, Unsloth <= 5.17), so each runs in its own process with its
# own PYTHONPATH: ours on /tmp/aegis-site (DIR/wheels installed there, transformers 5.25) + DIR/bnb; Unsloth on
# /tmp/aegis-unsloth (DIR/unsloth.tar.xz) + DIR/bnb over the image's transformers.
#
# The work, most important rows first (times estimated from the scripts and earlier runs of ours on H100/H200):
#   setup   install the wheels, unpack Unsloth's site, print the versions             ~ 25 s
#   tests   the GPU-marked packing tests (flex attention's block mask against the additive mask, the captured
#           step), so the rows below are known to keep documents apart the way the tests check   ~ 40-70 s
#   ours    seed 1x512 and throughput 16x512, each with data.packing = concat and = documents (the packing cost)
#           as `python -m train` runs them: build the random Phi-3.5-mini snapshot (~40 s: 3.8 B parameters,
#           7.6 GB written), then 4 runs of ~35-45 s (start, 4-bit load, compile, STEPS=15 updates)  ~ 180-220 s
#   llama   Unsloth on the llamafied copy, seed + throughput (TP_BATCHES 16 then 32 x 512 while it gets
#           faster within 12 GiB): import ~25 s, llamafy ~25 s, 4-bit load ~35 s, checks, 3 + 5 steps per row
#           (the first compiles)                                                           ~ 110-140 s
#   fused   Unsloth on the checkpoint as shipped (fused qkv/gate_up), seed + throughput  ~ 90-110 s
#           and then, in the same load (its max_seq_length 131072), the long rows: one sequence, one step each,
#           LONG_START then twice it, then the budget's guess and one 8192 step either way (5-60 s each), as time
#           allows (bench/train_unsloth.py starts no row that would not end before its deadline)
#   ourslong  (not in the default PARTS: a call of its own, e.g. PARTS=ourslong,long) ours' longest sequence,
#           one per step as the memory plan decides, at OURS_LONG (default 131072) for 2 steps      ~ 150-200 s
#   copymodel (not in the default PARTS) bench/copy_model.py --steps COPY_STEPS (default 3000) --save: the tiny
#           model that copies, for the speculation bench (bench/speculate_bench.py), trained where steps are cheap;
#           OUTDIR/copy-tiny.tar comes back, and `python bench/copy_model.py --model-dir` exports it     ~ 120-200 s
#   table   bench/train_unsloth.py --table, the packing cost, logs packed                 ~ 5 s
# Expected: 400-490 s before the long rows. Unsloth's rows use LoRA dropout 0 (its own advice and fastest path;
# DROPOUTS=0,0.05 adds the seed recipe's 0.05 as a second load of each form, about 60-80 s more each).
#
# OUTDIR gets at most 8 files, no folders: train_ours.json, train_ours_long.json, unsloth_llama.json,
# unsloth_fused.json, copy-tiny.tar, table.md, run.log and logs.tar.xz (run.log, ours.log, unsloth.log), the last
# two packed only at the end.
# Exit status 1: a step failed or was cut by its timeout (run.log says which); what was measured is there anyway.
# Settings (environment): LIMIT, STEPS (ours' updates per run), TP_BATCHES, DROPOUTS, LONG_START, PARTS (a subset
# of tests,ours,llama,fused,long,ourslong,copymodel), OURS_LONG, COPY_STEPS; and Unsloth's own, passed through
# (UNSLOTH_COMPILE_DISABLE=1 runs its blocks uncompiled; its rows are then named "... compile off"), WORK (default /tmp/aegis-bench: the snapshots, 16 GB), DRY=1 (print the commands only).
set -uo pipefail
START=$(date +%s)
cd "$(dirname "$0")/../.." || exit 2
[ $# -ge 1 ] || { echo "usage: bash bench/gpu/train.sh OUTDIR [DIR]" >&2; exit 2; }
OUTDIR=$(realpath -m "$1")
DIR=$(realpath -m "${2:-.gpudeps/train}")
LIMIT=${LIMIT:-550}
STEPS=${STEPS:-15}
TP_BATCHES=${TP_BATCHES:-16,32}
DROPOUTS=${DROPOUTS:-0}
LONG_START=${LONG_START:-16384}
PARTS=${PARTS:-tests,ours,llama,fused,long}
WORK=${WORK:-/tmp/aegis-bench}
OURS_LONG=${OURS_LONG:-131072}
COPY_STEPS=${COPY_STEPS:-3000}
DRY=${DRY:-0}
END=$((START + LIMIT))
TAIL=12          # kept for the table and the packing of the logs
UNSLOTH_MIN=110  # an Unsloth step needs about this much to measure anything: import, load, one row
FUSED_KEEP=100   # the llama step stops starting rows this long before the end, so the fused one can run
SITE=/tmp/aegis-site
USITE=/tmp/aegis-unsloth
BNB=$DIR/bnb
OURS_PATH=$SITE:$BNB:$PWD
UNSLOTH_PATH=$USITE:$BNB:$PWD
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 DO_NOT_TRACK=1
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1

mkdir -p "$OUTDIR"
# this script's own files from an earlier run would mix into the table
[ "$DRY" = 1 ] || (cd "$OUTDIR" && rm -f copy-tiny.tar train_ours.json train_ours_long.json unsloth_llama.json unsloth_fused.json table.md run.log \
    ours.log unsloth.log logs.tar.xz)
has() { [[ ",$PARTS," == *",$1,"* ]]; }
left() { echo $((END - $(date +%s))); }
say() { echo "[$(date +%H:%M:%S) +$(($(date +%s) - START))s] $*" | tee -a "$OUTDIR/run.log"; }
STATUS=()
FAILED=0
# run NAME LOG SECONDS CMD...: CMD under a hard timeout (on its whole process group), its output appended to LOG
run() {
    local name=$1 log=$2 secs=$3 t0 rc what
    shift 3
    if [ "$secs" -lt 5 ]; then
        say "skipped $name: ${secs} s left"
        STATUS+=("$name: skipped, ${secs} s left")
        return 0
    fi
    say "$name (at most ${secs} s): $*"
    [ "$DRY" = 1 ] && return 0
    t0=$(date +%s)
    timeout -k 10 "$secs" "$@" 2>&1 | tee -a "$OUTDIR/$log"
    rc=${PIPESTATUS[0]}
    what="rc $rc"
    { [ "$rc" = 124 ] || [ "$rc" = 137 ]; } && what="cut by the time limit (rc $rc)"
    say "$name: $what after $(($(date +%s) - t0)) s"
    STATUS+=("$name: $what, $(($(date +%s) - t0)) s")
    [ "$rc" = 0 ] || FAILED=1
    return "$rc"
}

say "training benchmark: ours vs Unsloth; limit ${LIMIT} s; kit $DIR; work $WORK; parts $PARTS"
for f in "$DIR/unsloth.tar.xz" "$BNB/bitsandbytes/__init__.py"; do
    [ -e "$f" ] || { say "missing $f: run bench/gpu/prepare_train.sh first (and copy its folder)"; exit 2; }
done
compgen -G "$DIR/wheels/transformers-*.whl" >/dev/null || { say "no wheels in $DIR/wheels"; exit 2; }

# ---- setup: the card, then the two sites, then what each PYTHONPATH imports (read from metadata, not imported)
run gpu run.log 30 nvidia-smi --query-gpu=name,memory.total --format=csv
run torch run.log 60 python3 -c 'import sys, torch; p = torch.cuda.get_device_properties(0)
print("python", sys.version.split()[0], "| torch", torch.__version__, "CUDA", torch.version.cuda, "|", p.name,
      round(p.total_memory / 2**30, 1), "GiB")'
install_sites() {
    rm -rf "$SITE" "$USITE" && mkdir -p "$SITE" "$USITE" || return 1
    if python3 -m pip --version >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$DIR"/wheels/*.whl || return 1
    else  # no pip in the image: a wheel is a zip of what goes into the site folder
        for w in "$DIR"/wheels/*.whl; do python3 -m zipfile -e "$w" "$SITE" || return 1; done
    fi
    if command -v xz >/dev/null; then
        tar -xJf "$DIR/unsloth.tar.xz" -C "$USITE"
    else  # tar needs xz for .xz; Python's tarfile does not
        python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="data")' \
            "$DIR/unsloth.tar.xz" "$USITE"
    fi
}
say "install $DIR/wheels into $SITE, unpack $DIR/unsloth.tar.xz into $USITE"
if [ "$DRY" != 1 ]; then
    install_sites 2>&1 | tee -a "$OUTDIR/run.log"
    [ "${PIPESTATUS[0]}" = 0 ] || { say "setup failed"; exit 1; }
    say "installed: $(du -sh "$SITE" | cut -f1) and $(du -sh "$USITE" | cut -f1)"
fi
# versions and where each package comes from, as each PYTHONPATH sees them (metadata only: nothing is imported)
versions() {
    run "versions ($1)" run.log 60 env PYTHONPATH="$2" python3 - "${@:3}" <<'EOF'
import importlib.metadata as m
import importlib.util as u
import sys

for name in sys.argv[1:]:
    try:
        v = m.version(name)
    except m.PackageNotFoundError:
        v = "-"
    spec = u.find_spec(name)
    print(f"  {name:16s} {v:14s}", spec.origin if spec else "(not found)")
EOF
}
versions ours "$OURS_PATH" transformers huggingface_hub peft accelerate bitsandbytes kernels tokenizers safetensors
versions Unsloth "$UNSLOTH_PATH" unsloth unsloth_zoo transformers trl datasets torchao peft accelerate bitsandbytes \
    huggingface_hub triton xformers torchvision pyarrow pandas

# ---- the GPU-marked packing tests, on ours' site
if has tests; then
    run tests run.log 150 env PYTHONPATH="$OURS_PATH" python3 -m pytest -x -q -m gpu -p no:cacheprovider \
        tests/test_packing.py
fi

# ---- ours: seed and throughput, concat and documents packing; keeps UNSLOTH_MIN for the Unsloth steps
if has ours; then
    keep=0
    { has llama || has fused; } && keep=$UNSLOTH_MIN
    run ours ours.log $(($(left) - TAIL - keep)) env PYTHONPATH="$OURS_PATH" python3 bench/train_throughput.py \
        --work "$WORK" --which ours --settings seed,throughput --tp-batch 16 --steps "$STEPS" \
        --variant concat=data.packing=concat --variant documents=data.packing=documents \
        --out "$OUTDIR/train_ours.json"
fi

# ---- the copying tiny model for the speculation bench (its folder, packed as one file)
if has copymodel; then
    rm -rf /tmp/copy-tiny
    run "copy model" run.log $(($(left) - TAIL)) env PYTHONPATH="$OURS_PATH" python3 bench/copy_model.py \
        --steps "$COPY_STEPS" --save /tmp/copy-tiny &&
        { [ "$DRY" = 1 ] || tar -cf "$OUTDIR/copy-tiny.tar" -C /tmp copy-tiny; }
fi

# ---- ours' longest sequence (the memory plan's tiled MLP and attention, offload), beside Unsloth's long rows
if has ourslong; then
    keep=0
    has long && keep=$UNSLOTH_MIN
    run "ours long" ours.log $(($(left) - TAIL - keep)) env PYTHONPATH="$OURS_PATH" python3 bench/train_throughput.py \
        --work "$WORK" --which ours --settings long --long-lengths "$OURS_LONG" --long-steps 2 \
        --out "$OUTDIR/train_ours_long.json"
fi

# ---- Unsloth: llama form, then fused form (+ the long rows), on ours' snapshot in WORK (built there if absent)
unsloth() { # unsloth FORM SETTINGS KEEP: one process; starts no row or load later than KEEP s before the end
    local form=$1 settings=$2 keep=$3 secs
    secs=$(($(left) - TAIL))
    [ $((secs - keep)) -lt "$UNSLOTH_MIN" ] && keep=0 # too little for both: this one, the more important, takes all
    if [ "$secs" -lt "$UNSLOTH_MIN" ]; then
        say "skipped Unsloth $form: ${secs} s left, it needs about $UNSLOTH_MIN"
        STATUS+=("Unsloth $form: skipped, ${secs} s left")
        return 0
    fi
    run "Unsloth $form" unsloth.log "$secs" env PYTHONPATH="$UNSLOTH_PATH" python3 bench/train_unsloth.py \
        --work "$WORK" --form "$form" --dropouts "$DROPOUTS" --long-dropout "${DROPOUTS%%,*}" --settings "$settings" \
        --tp-batches "$TP_BATCHES" --long-start "$LONG_START" --deadline $((END - TAIL - keep)) \
        --out "$OUTDIR/unsloth_$form.json"
}
if has llama; then
    keep=0
    has fused && keep=$FUSED_KEEP
    unsloth llama seed,throughput "$keep"
fi
if has fused; then
    settings=seed,throughput
    has long && settings=$settings,long
    unsloth fused "$settings" 0
elif has long; then
    unsloth llama long 0
fi

# ---- the table for BENCHMARKS.md, and what documents packing costs against concat
tables=()
for f in train_ours train_ours_long unsloth_llama unsloth_fused; do tables+=("$OUTDIR/$f.json"); done
if [ "$DRY" = 1 ]; then
    say "would write $OUTDIR/table.md: bench/train_unsloth.py --table ${tables[*]}"
else
    {
        python3 bench/train_unsloth.py --table "${tables[@]}"
        python3 - "$OUTDIR/train_ours.json" <<'EOF'
import json
import sys
from pathlib import Path

p = Path(sys.argv[1])
rows = json.loads(p.read_text()).get("rows", []) if p.exists() else []
by = {(r["setting"], r["which"]): r for r in rows}
print()
for setting in ("seed", "throughput"):
    c, d = by.get((setting, "ours concat")), by.get((setting, "ours documents"))
    if c and d:
        print(
            f"- packing, {setting} {d['batch']}×{d['length']}: documents {d['tokens_per_s']:.0f} tokens/s "
            f"({d['peak_gib']:.2f} GiB) against concat {c['tokens_per_s']:.0f} ({c['peak_gib']:.2f} GiB): "
            f"**{d['tokens_per_s'] / c['tokens_per_s']:.2f}×**"
        )
EOF
    } >"$OUTDIR/table.md" 2>&1
    tee -a "$OUTDIR/run.log" <"$OUTDIR/table.md"
fi

ended="every step ended by itself"
[ "$FAILED" = 0 ] || ended="a step failed or was cut"
say "done in $(($(date +%s) - START)) s of $LIMIT ($ended)"
for s in "${STATUS[@]}"; do say "  $s"; done
if [ "$DRY" != 1 ]; then
    logs=()
    for f in run.log ours.log unsloth.log; do [ -f "$OUTDIR/$f" ] && logs+=("$f"); done
    (cd "$OUTDIR" && python3 -c 'import sys, tarfile
with tarfile.open("logs.tar.xz", "w:xz") as t:
    for f in sys.argv[1:]:
        t.add(f)' "${logs[@]}") && rm -f "$OUTDIR/ours.log" "$OUTDIR/unsloth.log"
fi
exit "$FAILED"
