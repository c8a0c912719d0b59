#!/usr/bin/env bash
# Builds the Java example (build.sh) and runs it against the real token-service: dev mode,
# in a temporary directory, on free ports, with 2-second tokens. Exits non-zero unless the
# example granted a lease, saw it renew, released it and read LEASE_RELEASED from ErrorInfo.
#
#   cargo build -p token-service && clients/java/smoke.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
TS=${TOKEN_SERVICE_BIN:-$repo/target/debug/token-service}
case $TS in /*) ;; *) TS="$repo/$TS" ;; esac
[[ -x $TS ]] || { echo "java smoke: $TS is not executable; run 'cargo build -p token-service'" >&2; exit 2; }

free_port() {
    local port=$1
    while (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do port=$((port + 1)); done
    echo "$port"
}
unset JOBTOKEN_CONFIG JOBTOKEN_STORE_PATH JOBTOKEN_MASTER_KEY_FILE JOBTOKEN_IDLE_TIMEOUT JOBTOKEN_ADMIN_KEY_SHA256
GRPC_PORT=$(free_port 50161)
export JOBTOKEN_GRPC_LISTEN=127.0.0.1:$GRPC_PORT
export JOBTOKEN_HTTP_LISTEN=127.0.0.1:$(free_port $((GRPC_PORT + 1)))
export JOBTOKEN_ACCESS_TOKEN_TTL=2s
WORK=$(mktemp -d "${TMPDIR:-/tmp}/jobtoken-java.XXXXXX")
export JOBTOKEN_DATA_DIR=$WORK/data
SERVER_PID=
cleanup() {
    local status=$?
    if [[ -n $SERVER_PID ]]; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    if [[ $status -ne 0 ]]; then tail -n 20 "$WORK/server.log" >&2 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT

"$TS" serve >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$GRPC_PORT") 2>/dev/null && [[ -f $JOBTOKEN_DATA_DIR/dev-module.key ]] && break
    kill -0 "$SERVER_PID" 2>/dev/null || { echo "java smoke: the server exited during start-up" >&2; exit 1; }
    sleep 0.1
done
JOBTOKEN_MODULE_KEY=$(cat "$JOBTOKEN_DATA_DIR/dev-module.key")
SUBJECT_TOKEN=$("$TS" dev-token --user alice --tenant diku --permissions inventory.read,inventory.write)
export JOBTOKEN_MODULE_KEY SUBJECT_TOKEN
"$here/build.sh" run "$JOBTOKEN_GRPC_LISTEN" "java-smoke-$$" 5
echo "java smoke: ok"
