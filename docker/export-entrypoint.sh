#!/usr/bin/env bash
# The export container's entrypoint: python -m export all on the newest finished run (merge -> GGUF -> parity ->
# Modelfile, into RUN/export/), plus any arguments given (compose's `command:`, e.g. --type q8_0).
# Steps whose outputs are up to date are skipped, so starting it again is cheap.
#
#   AEGIS_RUNS        where runs are (default /data/runs, the shared volume)
#   AEGIS_RUN         export this run directory instead of the newest one with a final/ checkpoint
#   AEGIS_EXPORT_ARGS extra arguments, split on spaces (in front of the command line's own)
#   PYTHON            the interpreter (default: python on PATH)
set -euo pipefail

runs=${AEGIS_RUNS:-/data/runs}
run=${AEGIS_RUN:-}
python=${PYTHON:-python}

if [ -z "$run" ]; then
    # newest first by the time final/ was written (train commits it last, by a rename)
    run=$(find "$runs" -mindepth 2 -maxdepth 2 -type d -name final -printf '%T@ %h\n' 2>/dev/null \
        | sort -rn | head -n 1 | cut -d ' ' -f 2- || true)
fi
if [ -z "$run" ] || [ ! -d "$run" ]; then
    echo "export: no finished run (RUN/final/) under $runs; train first, or set AEGIS_RUN" >&2
    exit 1
fi
read -r -a extra <<<"${AEGIS_EXPORT_ARGS:-}"
echo "export: $run -> $run/export"
exec "$python" -m export all --run "$run" --no-progress "${extra[@]}" "$@"
