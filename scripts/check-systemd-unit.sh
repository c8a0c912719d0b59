#!/usr/bin/env bash
# Checks packaging/systemd/jobtoken.service: `systemd-analyze verify` must print nothing
# (it exits 0 even on unknown keys, so any output fails), and the hardening must keep
# `systemd-analyze security` exposure at or below 2.0. Works in a container without
# systemd running (both commands read unit files only). Needs the built binary, which
# stands in for /usr/local/bin/token-service.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$(realpath "${TOKEN_SERVICE_BIN:-target/debug/token-service}")
[[ -x $BIN ]] || { echo "check-systemd-unit: build $BIN first" >&2; exit 1; }
if ! command -v systemd-analyze >/dev/null; then
    apt-get update -qq && apt-get install -y -qq --no-install-recommends systemd >/dev/null
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
sed "s|/usr/local/bin/token-service|$BIN|" packaging/systemd/jobtoken.service >"$work/jobtoken.service"
out=$(systemd-analyze verify --man=no "$work/jobtoken.service" 2>&1) || { echo "$out" >&2; exit 1; }
if [[ -n $out ]]; then
    echo "systemd-analyze verify complained:" >&2
    echo "$out" >&2
    exit 1
fi
if ! systemd-analyze security --offline=yes --threshold=20 "$work/jobtoken.service" >"$work/security" 2>&1; then
    cat "$work/security" >&2
    echo "check-systemd-unit: exposure above 2.0" >&2
    exit 1
fi
tail -1 "$work/security"
echo "check-systemd-unit: ok"
