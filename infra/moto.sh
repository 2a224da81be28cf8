#!/usr/bin/env bash
# moto_server as a local AWS Secrets Manager emulator for tests. moto comes
# from PyPI (moto[server] in requirements-dev.txt) in the Makefile-managed
# virtualenv: run `make venv` first.
#
# Usage: infra/moto.sh start [PORT] | stop | endpoint | status
#
# Env:
#   RELAY_STATE_DIR        where pid/port/log files live (default .cache/run)
#   RELAY_VENV             virtualenv holding moto_server (default .venv)
#   MOTO_START_TIMEOUT     seconds to wait for it to answer (default 30)
set -euo pipefail

LOG_NAME=moto
# shellcheck source=infra/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

VENV="${RELAY_VENV:-$REPO_ROOT/.venv}"
MOTO_SERVER="$VENV/bin/moto_server"
NAME=moto
# Matched against /proc/PID/cmdline so a reused PID is never signalled.
PATTERN=moto_server

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '/^set -euo/d' -e 's/^# \{0,1\}//' >&2
    exit 2
}

cmd_start() {
    local port=${1:-}
    [[ -z "$port" ]] || valid_port "$port" || die "invalid port '$port'"
    [[ -x "$MOTO_SERVER" ]] ||
        die "$MOTO_SERVER not found: run 'make venv' (installs moto[server] from requirements-dev.txt)"
    # -H 127.0.0.1: loopback only. No --reload, so the PID we record is the
    # server itself, not a reloader parent.
    start_service "$NAME" "$PATTERN" "$port" GET /moto-api/ "${MOTO_START_TIMEOUT:-30}" "$STATE_DIR" \
        "$MOTO_SERVER" -H 127.0.0.1 -p '{PORT}'
}

case "${1:-}" in
    start) cmd_start "${2:-}" ;;
    stop) stop_service "$NAME" "$PATTERN" ;;
    endpoint) print_endpoint "$NAME" "$PATTERN" ;;
    status) print_endpoint "$NAME" "$PATTERN" >/dev/null && log "running (pid $(<"$STATE_DIR/$NAME.pid"))" ;;
    *) usage ;;
esac
