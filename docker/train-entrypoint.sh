#!/usr/bin/env bash
# The train container's entrypoint; also runs as it is outside a container (bash docker/train-entrypoint.sh).
#
# Trains one run: python -m train --config $AEGIS_CONFIG --run-dir $AEGIS_RUNS/$AEGIS_RUN_NAME --resume, plus any
# arguments given (compose's `command:`, e.g. --set schedule.total_steps=20). --resume makes it safe to start again:
# a finished run exits at once, an interrupted one continues from its newest checkpoint.
#
#   AEGIS_CONFIG     TOML recipe (default: configs/borea_rtx3060.toml next to this script's folder, the seed recipe;
#                    python -m train reads the same variable for --config, docs/configuration.md)
#   AEGIS_RUNS       where runs go (default /data/runs, the shared volume)
#   AEGIS_RUN_NAME   the run's folder name (default: the config's file name without .toml)
#   AEGIS_TRAIN_ARGS extra arguments, split on spaces (in front of the command line's own)
#   PYTHON           the interpreter (default: python on PATH)
#   HF_HOME, HF_TOKEN are read by huggingface-hub when the base model is downloaded.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
config=${AEGIS_CONFIG:-$here/../configs/borea_rtx3060.toml}
runs=${AEGIS_RUNS:-/data/runs}
name=${AEGIS_RUN_NAME:-$(basename "$config" .toml)}
python=${PYTHON:-python}

if [ ! -f "$config" ]; then
    echo "train: config $config not found (set AEGIS_CONFIG)" >&2
    exit 2
fi
mkdir -p "$runs"
read -r -a extra <<<"${AEGIS_TRAIN_ARGS:-}"
token="not set"
[ -n "${HF_TOKEN:-}" ] && token="set"
echo "train: $config -> $runs/$name (HF_HOME=${HF_HOME:-default}, HF_TOKEN $token)"
exec "$python" -m train --config "$config" --run-dir "$runs/$name" --resume --no-progress "${extra[@]}" "$@"
