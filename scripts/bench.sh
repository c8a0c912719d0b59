#!/usr/bin/env bash
# Every token-load scenario against a fresh release-mode service, printed as the
# markdown table of BENCHMARKS.md, with each row's ratio to the no-op baseline of the
# same run.
#
#   cargo build --release -p token-service -p token-load
#   scripts/bench.sh [duration] [warm-up]          # defaults: 10s 2s
#
# The service runs in dev mode in a temporary directory on 127.0.0.1:50051/50052 (which
# must be free): first on SQLite (`store.sync = normal`, then `full`; then, for `issue`
# against `issue-idp`, with a config file that also trusts the identity provider
# token-load serves on 127.0.0.1:50070: Keycloak-shaped realms found by discovery and a
# platform-shaped HTTP permission source), then on
# PostgreSQL in a database of its own, `jobtoken_bench`, dropped and created here. Set
# BENCH_PG_URL to the server (default postgres://postgres@127.0.0.1:5432, database
# appended), or SKIP_PG=1 to skip those rows. Needs jq, and psql for PostgreSQL.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
svc=$repo/target/release/token-service
load=$repo/target/release/token-load
duration=${1:-10s}
warmup=${2:-2s}
pg_server=${BENCH_PG_URL:-postgres://postgres@127.0.0.1:5432}
work=$(mktemp -d)
pid=
cleanup() {
    [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

start() { # env assignments for the service
    # One load generator is one module: lift its rate limits (they stay on the path).
    (cd "$work" && exec env JOBTOKEN_GRANTS_PER_SECOND=10000000 \
        JOBTOKEN_RENEWALS_PER_SECOND=10000000 JOBTOKEN_INTROSPECTIONS_PER_SECOND=10000000 \
        "$@" RUST_LOG=warn "$svc" serve >>"$work/service.log" 2>&1) &
    pid=$!
    for _ in $(seq 500); do
        (exec 3<>/dev/tcp/127.0.0.1/50051) 2>/dev/null && return 0
        kill -0 "$pid" 2>/dev/null || { cat "$work/service.log" >&2; exit 1; }
        sleep 0.01
    done
    echo "the service did not start" >&2
    exit 1
}

stop() {
    kill -TERM "$pid"
    wait "$pid" || true
    pid=
}

baseline=
row() { # scenario store [token-load options]
    local json
    json=$(cd "$work" && "$load" --scenario "$1" --duration "$duration" --warmup "$warmup" --json "${@:3}")
    local rps errors
    rps=$(jq -r '.rps' <<<"$json")
    errors=$(jq -r '.errors | to_entries | map("\(.key) \(.value)") | join(", ")' <<<"$json")
    [ "$1" = noop ] && [ -z "$baseline" ] && baseline=$rps
    jq -r --arg store "$2" --arg base "$baseline" --arg errors "${errors:-none}" \
        '"| \(.scenario) | \($store) | \(.rps | floor) | \(.p50_ms) | \(.p90_ms) | \(.p99_ms) | \(.max_ms) | \(if $base == "" then "—" else ((.rps / ($base | tonumber) * 1000 | round) / 1000 | tostring) end) | \($errors) |"' \
        <<<"$json"
}

echo "| scenario | store | req/s | p50 ms | p90 ms | p99 ms | max ms | vs no-op | errors |"
echo "|---|---|---:|---:|---:|---:|---:|---:|---|"
start
for scenario in noop refresh introspect issue mixed churn; do
    row "$scenario" "SQLite, sync = normal"
done
stop
# The identity-provider rows: one service (config file, SQLite normal) trusting both the
# dev issuer (`issue`) and token-load's realms (`issue-idp`), so the two compare alike.
keys=$("$svc" gen-key)
head -n1 <<<"$keys" >"$work/idp-module.key"
cat >"$work/idp.toml" <<EOF
data_dir = "$work/idp-data"
[[modules]]
id = "load-module"
key_sha256 = "$(sed -n 2p <<<"$keys")"
delegable = ["*"]
[[trusted_issuers]]
issuer = "https://dev-issuer.jobtoken.invalid"
public_key_file = "$work/data/dev-issuer-pub.pem"
algorithm = "EdDSA"
[[trusted_issuers]]
issuer_pattern = "http://127.0.0.1:50070/realms/{tenant}"
discovery = true
subject_claim = "user_id"
[trusted_issuers.permission_source]
kind = "http"
url = "http://127.0.0.1:50070/permissions/users/{user_id}"
EOF
start JOBTOKEN_CONFIG="$work/idp.toml"
for scenario in issue issue-idp; do
    row "$scenario" "SQLite, normal, IdP config" --module-key-file "$work/idp-module.key"
done
stop
start JOBTOKEN_STORE_SYNC=full
for scenario in refresh issue; do
    row "$scenario" "SQLite, sync = full"
done
stop
if [ "${SKIP_PG:-0}" != 1 ]; then
    psql "$pg_server/postgres" -qc "DROP DATABASE IF EXISTS jobtoken_bench" >/dev/null
    psql "$pg_server/postgres" -qc "CREATE DATABASE jobtoken_bench" >/dev/null
    start "JOBTOKEN_STORE_URL=$pg_server/jobtoken_bench"
    for scenario in refresh introspect issue; do
        row "$scenario" "PostgreSQL"
    done
    stop
    psql "$pg_server/postgres" -qc "DROP DATABASE jobtoken_bench" >/dev/null
fi
