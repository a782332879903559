#!/usr/bin/env bash
# The serve container's entrypoint: waits for an exported model, then python -m serve on it, listening on all of the
# container's addresses, plus any arguments given (compose's `command:`).
#
#   AEGIS_MODEL       the model to serve: a GGUF file ([NAME=]PATH, as serve's --model); default: from the newest
#                     RUN/export/export.json under AEGIS_RUNS (written by `python -m export all` after parity passed)
#   AEGIS_GGUF_TYPE   which of that export's GGUFs (default q8_0; else the smallest one)
#   AEGIS_RUNS        where runs are (default /data/runs, the shared volume)
#   AEGIS_WAIT        seconds to wait for an export to appear (default 0: wait as long as it takes)
#   AEGIS_PORT        the API's port (default 8000)
#   AEGIS_API_KEY     require this bearer key on /v1 (python -m serve reads it, as --api-key)
#   PYTHON            the interpreter (default: python on PATH)
set -euo pipefail

runs=${AEGIS_RUNS:-/data/runs}
python=${PYTHON:-python}
wait=${AEGIS_WAIT:-0}

newest_export() {
    "$python" - "$runs" "${AEGIS_GGUF_TYPE:-q8_0}" <<'PY'
import json, os, sys
from pathlib import Path

runs, want = Path(sys.argv[1]), sys.argv[2]
done = sorted(runs.glob("*/export/export.json"), key=lambda p: p.stat().st_mtime, reverse=True)
for summary in done:
    ggufs = {t: Path(p) for t, p in json.loads(summary.read_text()).get("gguf", {}).items()}
    ggufs = {t: p for t, p in ggufs.items() if p.is_file()}
    if ggufs:
        print(ggufs.get(want) or min(ggufs.values(), key=lambda p: p.stat().st_size))
        break
PY
}

model=${AEGIS_MODEL:-}
if [ -z "$model" ]; then
    start=$(date +%s)
    echo "serve: waiting for an exported model under $runs (RUN/export/export.json)"
    until model=$(newest_export) && [ -n "$model" ]; do
        if [ "$wait" -gt 0 ] && [ $(( $(date +%s) - start )) -ge "$wait" ]; then
            echo "serve: no exported model under $runs after ${wait}s" >&2
            exit 1
        fi
        sleep 5
    done
fi
echo "serve: $model on port ${AEGIS_PORT:-8000}"
exec "$python" -m serve --model "$model" --host 0.0.0.0 --port "${AEGIS_PORT:-8000}" "$@"
