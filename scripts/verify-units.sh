#!/usr/bin/env bash
# Checks systemd/*.{service,socket} with systemd-analyze, pointing them at this checkout's venv instead of the
# installed one in /opt/activator/venv
# (the unit refuses a missing ExecStart binary). Works without systemd running as PID 1.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
command -v systemd-analyze >/dev/null || { log "systemd-analyze not installed; skipping unit check"; exit 0; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
for u in "$here"/systemd/*.service "$here"/systemd/*.socket; do
    sed -e "s|/opt/activator/venv/|$here/.venv/|g" -e "s|/opt/activator|$here|g" "$u" >"$tmp/$(basename "$u")"
done
out=$(SYSTEMD_LOG_LEVEL=warning systemd-analyze verify --man=no "$tmp"/* 2>&1 | grep -v "^$" || true)
[ -z "$out" ] || die "systemd units do not verify: $out"
log "systemd units verify"
