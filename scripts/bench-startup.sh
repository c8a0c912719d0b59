#!/usr/bin/env bash
# Start-up to serving, for BENCHMARKS.md: the time from exec until the gRPC port accepts
# connections. The service binds it only after opening the store, running migrations and
# loading the signing keys, so this is the time to being able to serve.
#
#   cd <directory holding the service's data/> && /path/to/repo/scripts/bench-startup.sh [runs]
#
# Runs the release build in dev mode (`token-service serve`), on 127.0.0.1:50051, which
# must be free. Prints each run and the median.
set -euo pipefail
bin=${TOKEN_SERVICE_BIN:-$(cd "$(dirname "$0")/.." && pwd)/target/release/token-service}
runs=${1:-5}
times=()
for i in $(seq "$runs"); do
    t0=$(date +%s%N)
    RUST_LOG=warn "$bin" serve >/dev/null 2>&1 &
    pid=$!
    until (exec 3<>/dev/tcp/127.0.0.1/50051) 2>/dev/null; do
        kill -0 "$pid" 2>/dev/null || { echo "the service exited during start-up" >&2; exit 1; }
        sleep 0.001
    done
    t1=$(date +%s%N)
    ms=$(( (t1 - t0) / 1000000 ))
    times+=("$ms")
    echo "run $i: ${ms} ms"
    kill -TERM "$pid"
    wait "$pid" || true
done
median=$(printf '%s\n' "${times[@]}" | sort -n | sed -n "$(( (runs + 1) / 2 ))p")
echo "median: ${median} ms over ${runs} runs"
