#!/usr/bin/env bash
# A Dask cluster on this machine for `lassfuzz fuzz --cluster`: a scheduler on 127.0.0.1 and
# N single-threaded worker processes, all from the project's venv (.venv, or $LASSFUZZ_VENV).
# Prints the scheduler address on stdout once every worker has joined, then runs until
# Ctrl-C or SIGTERM, which stop the scheduler and the workers.
#
# usage: scripts/cluster-local.sh [-n WORKERS] [-p PORT]
#   -n  worker processes (default: all cores)
#   -p  scheduler port (default: 8786; 0 picks a free one)
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${LASSFUZZ_VENV:-$root/.venv}"
workers="$(nproc)"
port=8786
while getopts "n:p:" option; do
    case "$option" in
        n) workers="$OPTARG" ;;
        p) port="$OPTARG" ;;
        *) sed -n '2,9s/^# \{0,1\}//p' "$0" >&2; exit 2 ;;
    esac
done
if [[ ! "$workers" =~ ^[1-9][0-9]*$ ]]; then
    echo "cluster-local: -n needs a positive number of workers" >&2
    exit 2
fi
if [[ ! -x "$venv/bin/dask" ]]; then
    echo "cluster-local: $venv/bin/dask not found; install the extra: pip install -e '.[cluster]'" >&2
    exit 2
fi

state="$(mktemp -d "${TMPDIR:-/tmp}/lassfuzz-cluster.XXXXXX")"
trap 'kill $(jobs -p) 2>/dev/null || true; wait; rm -rf "$state"' EXIT
trap 'exit 130' INT TERM

fail() {
    echo "cluster-local: $1; last log lines:" >&2
    tail -n 5 "$state"/*.log >&2 || true
    exit 2
}

"$venv/bin/dask" scheduler --host 127.0.0.1 --port "$port" --no-dashboard \
    --scheduler-file "$state/scheduler.json" >"$state/scheduler.log" 2>&1 &
scheduler=$!
for _ in $(seq 300); do
    [[ -s "$state/scheduler.json" ]] && break
    kill -0 "$scheduler" 2>/dev/null || fail "the scheduler did not start"
    sleep 0.1
done
address="$("$venv/bin/python" -c 'import json, sys; print(json.load(open(sys.argv[1]))["address"])' \
    "$state/scheduler.json")" || fail "the scheduler did not write its address"

"$venv/bin/dask" worker "$address" --nworkers "$workers" --nthreads 1 --host 127.0.0.1 \
    --no-dashboard >"$state/workers.log" 2>&1 &
"$venv/bin/python" -c '
import sys
from distributed import Client
with Client(sys.argv[1], timeout=10) as client:
    client.wait_for_workers(int(sys.argv[2]), timeout=60)
' "$address" "$workers" 2>/dev/null || fail "the workers did not join"

echo "$address"
wait
