#!/usr/bin/env bash
# The README walk-through ("Walk-through with grpcurl"), run and checked step by step.
#
# It starts token-service in dev mode in a fresh temporary directory, runs the same
# commands as the README (with "$TS" where the README says `cargo run -q -p token-service --`),
# checks each result, and stops the server on exit.
#
#   cargo build -p token-service && scripts/walkthrough.sh
#   TOKEN_SERVICE_BIN=/path/to/token-service scripts/walkthrough.sh
#
# Needs grpcurl, jq and curl. Ports: JOBTOKEN_GRPC_LISTEN / JOBTOKEN_HTTP_LISTEN if set,
# otherwise the first free ports from 50061 up. The temp directory is removed on success
# and kept (with the server log) on failure.
set -euo pipefail

TS=${TOKEN_SERVICE_BIN:-target/debug/token-service}
case $TS in /*) ;; *) TS="$PWD/$TS" ;; esac
if [[ ! -x $TS ]]; then
    echo "walkthrough: $TS is not executable; run 'cargo build -p token-service' or set TOKEN_SERVICE_BIN" >&2
    exit 2
fi
for tool in grpcurl jq curl; do
    command -v "$tool" >/dev/null || { echo "walkthrough: $tool is not on PATH" >&2; exit 2; }
done

step() { printf '\n== %s\n' "$*"; }
ok() { printf 'ok: %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }
# expect_error OUTPUT CODE REASON: OUTPUT is grpcurl's error text.
expect_error() {
    grep -q "Code: $2\$" <<<"$1" || fail "expected code $2, got: $1"
    grep -q "\"reason\":\"$3\"" <<<"$1" || fail "expected reason $3, got: $1"
    ok "$2 with reason $3"
}

# A port nothing listens on, from $1 up.
free_port() {
    local port=$1
    while (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do port=$((port + 1)); done
    echo "$port"
}

# Dev mode: no config, and none of the other overrides from the caller's environment.
unset JOBTOKEN_CONFIG JOBTOKEN_DATA_DIR JOBTOKEN_STORE_PATH JOBTOKEN_MASTER_KEY_FILE \
    JOBTOKEN_ACCESS_TOKEN_TTL JOBTOKEN_IDLE_TIMEOUT JOBTOKEN_ADMIN_KEY_SHA256
if [[ -z ${JOBTOKEN_GRPC_LISTEN:-} ]]; then
    export JOBTOKEN_GRPC_LISTEN="127.0.0.1:$(free_port 50061)"
fi
if [[ -z ${JOBTOKEN_HTTP_LISTEN:-} ]]; then
    export JOBTOKEN_HTTP_LISTEN="127.0.0.1:$(free_port $((${JOBTOKEN_GRPC_LISTEN##*:} + 1)))"
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/jobtoken-walkthrough.XXXXXX")
SERVER_PID=
cleanup() {
    local status=$?
    if [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    if [[ $status -eq 0 ]]; then
        rm -rf "$WORK"
    else
        echo "walkthrough failed; files and server.log kept in $WORK" >&2
        tail -n 20 "$WORK/server.log" >&2 2>/dev/null || true
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
cd "$WORK"

step "1. Start the service in dev mode (README: cargo run -p token-service -- serve)"
"$TS" serve >server.log 2>&1 &
SERVER_PID=$!
GRPC=$JOBTOKEN_GRPC_LISTEN
HTTP=$JOBTOKEN_HTTP_LISTEN
for _ in $(seq 1 100); do
    curl -sf "http://$HTTP/healthz" >/dev/null && break
    kill -0 "$SERVER_PID" 2>/dev/null || fail "the server exited during start-up"
    sleep 0.1
done
curl -sf "http://$HTTP/healthz" >/dev/null || fail "the server did not come up on $HTTP"
ok "serving gRPC on $GRPC, HTTP on $HTTP, data in $WORK/data"

step "2. List the services (server reflection)"
SERVICES=$(grpcurl -plaintext $GRPC list)
echo "$SERVICES"
for s in jobtoken.v1.JobTokenService jobtoken.v1.AdminService grpc.health.v1.Health \
    grpc.reflection.v1.ServerReflection grpc.reflection.v1alpha.ServerReflection; do
    grep -qx "$s" <<<"$SERVICES" || fail "$s is not listed"
done
ok "all five services listed"

step "3. Dev credentials and a user's (subject) token"
MK=$(cat data/dev-module.key)
AK=$(cat data/dev-admin.key)
TOKEN=$("$TS" dev-token --user alice --tenant diku --permissions inventory.read,inventory.write,users.read)
[[ $MK == mk_* && $AK == ak_* ]] || fail "dev keys have an unexpected form"
[[ $(tr -cd . <<<"$TOKEN") == .. ]] || fail "dev-token did not print a JWT"
ok "module key, admin key and subject token ready"

step "4. IssueJobToken"
ISSUE=$(jq -n --arg token "$TOKEN" \
    '{subject_token: $token, job_id: "import-42", permissions: ["inventory.read", "inventory.write"], max_lifetime: "21600s"}' |
    grpcurl -plaintext -H "x-module-key: $MK" -d @ $GRPC jobtoken.v1.JobTokenService/IssueJobToken)
jq '{lease: .lease | {leaseId, jobId, tenant, subject, actor, grantedPermissions, state}, grantedLifetime, refreshToken: .tokens.refreshToken}' <<<"$ISSUE"
LEASE=$(jq -r .lease.leaseId <<<"$ISSUE")
RT=$(jq -r .tokens.refreshToken <<<"$ISSUE")
[[ $(jq -r .lease.state <<<"$ISSUE") == LEASE_STATE_ACTIVE ]] || fail "lease is not active"
[[ $(jq -c .lease.grantedPermissions <<<"$ISSUE") == '["inventory.read","inventory.write"]' ]] || fail "wrong permissions"
[[ $(jq -r .lease.actor <<<"$ISSUE") == dev-module ]] || fail "wrong actor"
[[ $(jq -r .grantedLifetime <<<"$ISSUE") == 21600s ]] || fail "wrong lifetime"
[[ $RT == jrt1.0.* ]] || fail "first refresh token is not generation 0: $RT"
ok "lease $LEASE granted"

step "5. RefreshJobToken"
REFRESH=$(jq -n --arg lease "$LEASE" --arg rt "$RT" '{lease_id: $lease, refresh_token: $rt}' |
    grpcurl -plaintext -H "x-module-key: $MK" -d @ $GRPC jobtoken.v1.JobTokenService/RefreshJobToken)
jq '{state: .lease.state, refreshToken: .tokens.refreshToken, accessTokenExpiresIn: .tokens.accessTokenExpiresIn}' <<<"$REFRESH"
AT=$(jq -r .tokens.accessToken <<<"$REFRESH")
RT2=$(jq -r .tokens.refreshToken <<<"$REFRESH")
[[ $RT2 == jrt1.1.* ]] || fail "refresh token did not rotate to generation 1: $RT2"
ok "rotated to a new refresh token"

step "6. IntrospectToken"
INTRO=$(jq -n --arg token "$AT" '{token: $token}' |
    grpcurl -plaintext -H "x-module-key: $MK" -d @ $GRPC jobtoken.v1.JobTokenService/IntrospectToken)
echo "$INTRO"
[[ $(jq -r .active <<<"$INTRO") == true ]] || fail "token is not active"
[[ $(jq -r '.claims | "\(.sub) \(.tenant) \(.actor) \(.jobId) \(.leaseId)"' <<<"$INTRO") == "alice diku dev-module import-42 $LEASE" ]] ||
    fail "unexpected claims"
ok "active, with the user, tenant, actor, job and lease"

step "7. RevokeJobToken (the job is done)"
REVOKE=$(jq -n --arg lease "$LEASE" '{lease_id: $lease, outcome: "JOB_OUTCOME_SUCCEEDED", detail: "imported 500 records"}' |
    grpcurl -plaintext -H "x-module-key: $MK" -d @ $GRPC jobtoken.v1.JobTokenService/RevokeJobToken)
jq '.lease | {state, endReason, endedBy, endDetail}' <<<"$REVOKE"
[[ $(jq -r .lease.endReason <<<"$REVOKE") == END_REASON_RELEASED ]] || fail "lease not released"
ok "released"

step "8. A refresh after the revoke fails with LEASE_RELEASED"
if OUT=$(jq -n --arg lease "$LEASE" --arg rt "$RT2" '{lease_id: $lease, refresh_token: $rt}' |
    grpcurl -plaintext -H "x-module-key: $MK" -d @ $GRPC jobtoken.v1.JobTokenService/RefreshJobToken 2>&1); then
    fail "refresh after revoke succeeded: $OUT"
fi
echo "$OUT"
expect_error "$OUT" FailedPrecondition LEASE_RELEASED
INTRO=$(jq -n --arg token "$AT" '{token: $token}' |
    grpcurl -plaintext -emit-defaults -H "x-module-key: $MK" -d @ $GRPC jobtoken.v1.JobTokenService/IntrospectToken)
echo "$INTRO"
[[ $(jq -r .active <<<"$INTRO") == false ]] || fail "token of a released lease is still active"
ok "the access token of the released lease is inactive"

step "9. AdminService/GetLease with the admin key"
GETLEASE=$(jq -n --arg lease "$LEASE" '{lease_id: $lease}' |
    grpcurl -plaintext -H "x-admin-key: $AK" -d @ $GRPC jobtoken.v1.AdminService/GetLease)
jq '{state: .lease.state, endReason: .lease.endReason, refreshCount, events}' <<<"$GETLEASE"
[[ $(jq -r .refreshCount <<<"$GETLEASE") == 1 ]] || fail "refreshCount is not 1"
[[ $(jq -r '[.events[].kind] | join(",")' <<<"$GETLEASE") == issued,ended ]] || fail "unexpected events"
if OUT=$(jq -n --arg lease "$LEASE" '{lease_id: $lease}' |
    grpcurl -plaintext -d @ $GRPC jobtoken.v1.AdminService/GetLease 2>&1); then
    fail "GetLease without the admin key succeeded"
fi
expect_error "$OUT" Unauthenticated ADMIN_UNAUTHENTICATED

step "10. The JWKS document"
JWKS=$(curl -s http://$HTTP/.well-known/jwks.json)
jq . <<<"$JWKS"
KID=$(jq -r '.keys[0].kid' <<<"$JWKS")
TOKEN_KID=$(jq -Rr 'split(".")[0] | gsub("-"; "+") | gsub("_"; "/") | . + ("=" * ((4 - length % 4) % 4)) | @base64d | fromjson | .kid' <<<"$AT")
[[ $KID == "$TOKEN_KID" ]] || fail "JWKS kid $KID is not the token's kid $TOKEN_KID"
[[ $(jq -r '.keys[0] | "\(.kty) \(.crv) \(.alg) \(.use)"' <<<"$JWKS") == "OKP Ed25519 EdDSA sig" ]] || fail "unexpected key type"
ok "the key that signed the access token ($KID) is published"

step "11. Rotation: a retry within the grace window, then reuse of an old token"
refresh() { # LEASE REFRESH_TOKEN
    jq -n --arg lease "$1" --arg rt "$2" '{lease_id: $lease, refresh_token: $rt}' |
        grpcurl -plaintext -H "x-module-key: $MK" -d @ $GRPC jobtoken.v1.JobTokenService/RefreshJobToken
}
ISSUE=$(jq -n --arg token "$TOKEN" '{subject_token: $token, job_id: "import-43"}' |
    grpcurl -plaintext -H "x-module-key: $MK" -d @ $GRPC jobtoken.v1.JobTokenService/IssueJobToken)
LEASE=$(jq -r .lease.leaseId <<<"$ISSUE")
R0=$(jq -r .tokens.refreshToken <<<"$ISSUE")
R1=$(refresh "$LEASE" "$R0" | jq -r .tokens.refreshToken)
AGAIN=$(refresh "$LEASE" "$R0" | jq -r .tokens.refreshToken)
echo "R1=$R1"
echo "retry of R0 returned $AGAIN"
[[ $AGAIN == "$R1" ]] || fail "a retry within the grace window did not return the same successor"
ok "a retry of the previous token converges on the same successor"
R2=$(refresh "$LEASE" "$R1" | jq -r .tokens.refreshToken)
if OUT=$(refresh "$LEASE" "$R0" 2>&1); then fail "reuse of R0 succeeded"; fi
echo "$OUT"
expect_error "$OUT" Unauthenticated REFRESH_TOKEN_REUSED
if OUT=$(refresh "$LEASE" "$R2" 2>&1); then fail "the lease survived reuse detection"; fi
echo "$OUT"
expect_error "$OUT" FailedPrecondition REFRESH_TOKEN_REUSED

step "12. Resume after a restart"
ISSUE=$(jq -n --arg token "$TOKEN" '{subject_token: $token, job_id: "import-44"}' |
    grpcurl -plaintext -H "x-module-key: $MK" -d @ $GRPC jobtoken.v1.JobTokenService/IssueJobToken)
LEASE=$(jq -r .lease.leaseId <<<"$ISSUE")
R0=$(jq -r .tokens.refreshToken <<<"$ISSUE")
RESUMED=$(jq -n '{tenant: "diku", job_id: "import-44"}' |
    grpcurl -plaintext -H "x-module-key: $MK" -d @ $GRPC jobtoken.v1.JobTokenService/ResumeJobToken)
jq '{leaseId: .lease.leaseId, state: .lease.state, refreshToken: .tokens.refreshToken}' <<<"$RESUMED"
[[ $(jq -r .lease.leaseId <<<"$RESUMED") == "$LEASE" ]] || fail "resume returned another lease"
if OUT=$(refresh "$LEASE" "$R0" 2>&1); then fail "the pre-resume refresh token still works"; fi
echo "$OUT"
expect_error "$OUT" Unauthenticated REFRESH_TOKEN_INVALID
refresh "$LEASE" "$(jq -r .tokens.refreshToken <<<"$RESUMED")" | jq .lease.state
ok "the resumed lease renews with its new refresh token"

step "13. Administrator revokes every lease of the job; WatchRevocations replays the ends"
jq -n '{tenant: "diku", job_id: "import-44", reason: "user asked"}' |
    grpcurl -plaintext -H "x-admin-key: $AK" -d @ $GRPC jobtoken.v1.AdminService/RevokeJob
WATCH=$(grpcurl -plaintext -max-time 2 -H "x-module-key: $MK" -d '{"after_cursor": 0}' \
    $GRPC jobtoken.v1.JobTokenService/WatchRevocations 2>&1 || true)
echo "$WATCH"
for reason in END_REASON_RELEASED END_REASON_REFRESH_TOKEN_REUSED END_REASON_REVOKED; do
    grep -q "\"reason\": \"$reason\"" <<<"$WATCH" || fail "WatchRevocations did not send $reason"
done
ok "released, reused and revoked leases all streamed"

step "14. Operations: health, metrics"
grpcurl -plaintext -d '{"service": "jobtoken.v1.JobTokenService"}' $GRPC grpc.health.v1.Health/Check | grep -q SERVING ||
    fail "gRPC health is not SERVING"
[[ $(curl -s http://$HTTP/healthz) == ok ]] || fail "/healthz is not ok"
[[ $(curl -s http://$HTTP/readyz) == ready ]] || fail "/readyz is not ready"
METRICS=$(curl -s http://$HTTP/metrics)
grep -q '^# TYPE jobtoken_renewals_total counter$' <<<"$METRICS" || fail "plain /metrics is not Prometheus text 0.0.4"
METRICS=$(curl -s -H 'Accept: application/openmetrics-text' http://$HTTP/metrics)
grep -E '^jobtoken_(grants|renewals|lease_ends)_total' <<<"$METRICS"
grep -q '^jobtoken_renewals_total{result="REFRESH_TOKEN_REUSED"} 2$' <<<"$METRICS" || fail "renewal metrics"
grep -q '^jobtoken_lease_ends_total{reason="revoked"} 1$' <<<"$METRICS" || fail "lease end metrics"
grep -q '^# EOF$' <<<"$METRICS" || fail "metrics are not OpenMetrics"
ok "health SERVING, ready, metrics count the walk-through in both formats"

step "15. Graceful shutdown on SIGTERM"
kill -TERM "$SERVER_PID"
wait "$SERVER_PID" && status=0 || status=$?
SERVER_PID=
[[ $status -eq 0 ]] || fail "the server exited with status $status"
grep -q "shutting down" server.log || fail "no shutdown line in the log"
if grep -E 'jrt1\.[0-9]+\.|(mk|ak)_[A-Za-z0-9_-]{43}' server.log; then fail "a secret reached the log"; fi
grep -q 'audit' server.log || fail "no audit events in the log"
ok "exited 0; the log has audit events and no refresh tokens or keys"

printf '\nwalkthrough: all steps passed\n'
