#!/usr/bin/env bash
# The balancer's container health check: exit 0 while HAProxy says at least one replica is up (its monitor URI,
# /ready on the balancer's own port), else 1. bash's /dev/tcp, since the image has no HTTP client.
#
#   bash healthcheck.sh [PORT]      (default 8404)
set -uo pipefail
port=${1:-8404}
exec 3<>"/dev/tcp/127.0.0.1/$port" || { echo "balancer: nothing listens on port $port"; exit 1; }
printf 'GET /ready HTTP/1.0\r\nHost: localhost\r\n\r\n' >&3
read -r -t 5 _ status _ <&3 || { echo "balancer: no answer on port $port"; exit 1; }
exec 3<&-
if [ "$status" != 200 ]; then
    echo "balancer: no replica is up (/ready answered $status)"
    exit 1
fi
