# shellcheck shell=bash
# Shared helpers for infra/dynamodb-local.sh and infra/moto.sh: a local
# emulator is a background process tracked by a pid file and a port file in a
# state dir, started detached and stopped by that PID only (never by name).
#
# Sourced, not executed. Callers run under `set -euo pipefail`.

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE_ROOT="$REPO_ROOT/.cache"

# RELAY_STATE_DIR lets several sets of emulators run side by side (make local
# uses .cache/run-local, make test .cache/run-test). A relative path is taken
# from the current directory, as usual.
STATE_DIR="${RELAY_STATE_DIR:-$CACHE_ROOT/run}"
case "$STATE_DIR" in
    /*) ;;
    *) STATE_DIR="$PWD/$STATE_DIR" ;;
esac

log() { printf '%s: %s\n' "${LOG_NAME:-infra}" "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

need_cmd() { # need_cmd CMD HINT
    command -v "$1" >/dev/null 2>&1 || die "'$1' not found on PATH. $2"
}

# A free TCP port on 127.0.0.1, picked by the kernel (bind to port 0). There
# is a small window before the server binds it; a clash shows up as a start
# failure with the server's own log.
free_port() {
    need_cmd python3 "Install Python 3 (e.g. apt-get install python3) or pass a PORT."
    python3 -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()'
}

valid_port() { [[ "$1" =~ ^[0-9]+$ ]] && ((10#$1 >= 1 && 10#$1 <= 65535)); }

# True when something already accepts TCP connections on 127.0.0.1:PORT.
# Checked before starting, or a server already on that port would answer our
# readiness poll and pass for the one we just started.
# shellcheck disable=SC2016 # $1 is the inner shell's, on purpose
port_in_use() { timeout 3 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"' _ "$1" 2>/dev/null; }

# True when PID is a live (non-zombie) process whose command line contains
# PATTERN. The pattern guards against a stale pid file whose PID has been
# reused by an unrelated process: we must never signal that one.
pid_is_ours() { # pid_is_ours PID PATTERN
    local pid=$1 pattern=$2 state cmdline
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    if [[ -r "/proc/$pid/stat" ]]; then
        # Field 3 of /proc/PID/stat is the state; Z = zombie (already dead).
        state=$(sed -E 's/^.*\) ([A-Za-z]).*$/\1/' "/proc/$pid/stat" 2>/dev/null || true)
        [[ "$state" != Z ]] || return 1
    fi
    if [[ -r "/proc/$pid/cmdline" ]]; then
        cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)
        [[ "$cmdline" == *"$pattern"* ]] || return 1
    fi
    return 0
}

# PID recorded in NAME.pid if that process is alive and ours; else fails.
running_pid() { # running_pid NAME PATTERN
    local pidfile="$STATE_DIR/$1.pid" pid
    [[ -f "$pidfile" ]] || return 1
    pid=$(<"$pidfile")
    pid_is_ours "$pid" "$2" || return 1
    printf '%s\n' "$pid"
}

# One HTTP exchange over bash's /dev/tcp: succeeds when the server accepts the
# connection and sends back an HTTP status line, whatever the status.
http_answers() { # http_answers PORT METHOD PATH
    local port=$1 method=$2 path=$3 line=""
    # The subshell keeps fd 3 local; `timeout` bounds a server that accepts
    # but never answers.
    # shellcheck disable=SC2016 # $1..$3 are the inner shell's, on purpose
    line=$(timeout 5 bash -c '
        exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
        printf "%s %s HTTP/1.0\r\nHost: 127.0.0.1:%s\r\nContent-Type: application/x-amz-json-1.0\r\nContent-Length: 0\r\nConnection: close\r\n\r\n" "$2" "$3" "$1" >&3
        IFS= read -r -t 4 l <&3 && printf "%s" "$l"
    ' _ "$port" "$method" "$path" 2>/dev/null) || return 1
    [[ "$line" == HTTP/* ]]
}

# Starts CMD... detached (own session, so a terminal's Ctrl-C reaches only the
# foreground job, whose trap then stops us by PID), stdout/stderr to
# NAME.log, and records its PID in NAME.pid. The child writes its own PID
# before exec'ing, so the pid file is right even if setsid had to fork.
spawn_detached() { # spawn_detached NAME WORKDIR CMD...
    local name=$1 workdir=$2
    shift 2
    local pidfile="$STATE_DIR/$name.pid" logfile="$STATE_DIR/$name.log" setsid_cmd=()
    rm -f "$pidfile"
    if command -v setsid >/dev/null 2>&1; then setsid_cmd=(setsid); fi
    (
        cd "$workdir" || exit 1
        exec 9>&- # never hand the install lock to the server
        # shellcheck disable=SC2016 # $$ and $1 are the inner shell's, on purpose
        exec nohup "${setsid_cmd[@]}" bash -c 'echo $$ >"$1"; shift; exec "$@"' _ "$pidfile" "$@" \
            </dev/null >"$logfile" 2>&1
    ) &
    local i
    for ((i = 0; i < 50; i++)); do
        [[ -s "$pidfile" ]] && return 0
        sleep 0.1
    done
    die "$name did not start (no pid file after 5 s); see $logfile"
}

# Polls until the server answers HTTP on PORT, or it dies, or TIMEOUT seconds
# pass; on failure shows the tail of its log.
wait_ready() { # wait_ready NAME PATTERN PORT METHOD PATH TIMEOUT
    local name=$1 pattern=$2 port=$3 method=$4 path=$5 timeout=$6
    local pid logfile="$STATE_DIR/$1.log" deadline=$((SECONDS + $6))
    pid=$(<"$STATE_DIR/$name.pid")
    while :; do
        if http_answers "$port" "$method" "$path"; then
            return 0
        fi
        if ! pid_is_ours "$pid" "$pattern"; then
            log "error: $name (pid $pid) exited before answering on port $port. Last lines of $logfile:"
            tail -n 30 "$logfile" >&2 || true
            rm -f "$STATE_DIR/$name.pid" "$STATE_DIR/$name.port"
            exit 1
        fi
        if ((SECONDS >= deadline)); then
            log "error: $name (pid $pid) did not answer HTTP on 127.0.0.1:$port within ${timeout}s. Last lines of $logfile:"
            tail -n 30 "$logfile" >&2 || true
            stop_service "$name" "$pattern" >/dev/null 2>&1 || true
            exit 1
        fi
        sleep 0.25
    done
}

# Stops the process recorded in NAME.pid: SIGTERM, up to 15 s to exit, then
# SIGKILL. No error when it is not running. Removes the pid and port files.
stop_service() { # stop_service NAME PATTERN
    local name=$1 pattern=$2 pidfile="$STATE_DIR/$1.pid" pid i
    if [[ ! -f "$pidfile" ]]; then
        log "$name is not running (no $pidfile)"
        rm -f "$STATE_DIR/$name.port"
        return 0
    fi
    pid=$(<"$pidfile")
    if pid_is_ours "$pid" "$pattern"; then
        log "stopping $name (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 150; i++)); do
            pid_is_ours "$pid" "$pattern" || break
            sleep 0.1
        done
        if pid_is_ours "$pid" "$pattern"; then
            log "$name (pid $pid) ignored SIGTERM for 15 s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            for ((i = 0; i < 50; i++)); do
                pid_is_ours "$pid" "$pattern" || break
                sleep 0.1
            done
        fi
    else
        log "$name is not running (stale pid file, pid $pid)"
    fi
    rm -f "$pidfile" "$STATE_DIR/$name.port"
}

# Shared `start` logic: reuse a live instance, else pick a port, spawn, wait.
# Prints the endpoint as the last line of stdout.
start_service() { # start_service NAME PATTERN PORT METHOD PATH TIMEOUT WORKDIR CMD... ({PORT} is replaced)
    local name=$1 pattern=$2 port=$3 method=$4 path=$5 timeout=$6 workdir=$7
    shift 7
    local pid running_port
    mkdir -p "$STATE_DIR"
    if pid=$(running_pid "$name" "$pattern"); then
        running_port=$(cat "$STATE_DIR/$name.port" 2>/dev/null || true)
        if valid_port "$running_port"; then
            if [[ -n "$port" && "$port" != "$running_port" ]]; then
                log "warning: $name already running (pid $pid) on port $running_port, not the requested $port; reusing it (stop it first to change port)"
            else
                log "$name already running (pid $pid) on port $running_port; reusing it"
            fi
            printf 'http://127.0.0.1:%s\n' "$running_port"
            return 0
        fi
        log "$name (pid $pid) has no port file; restarting it"
        stop_service "$name" "$pattern"
    fi
    rm -f "$STATE_DIR/$name.pid" "$STATE_DIR/$name.port"
    if [[ -z "$port" ]]; then
        port=$(free_port)
    fi
    valid_port "$port" || die "invalid port '$port'"
    if port_in_use "$port"; then
        die "port $port on 127.0.0.1 is already in use by another process; pick another PORT or leave it out to get a free one"
    fi
    local args=() a
    for a in "$@"; do args+=("${a//\{PORT\}/$port}"); done
    log "starting $name on 127.0.0.1:$port (log: $STATE_DIR/$name.log)"
    local t0=$SECONDS
    spawn_detached "$name" "$workdir" "${args[@]}"
    printf '%s\n' "$port" >"$STATE_DIR/$name.port"
    wait_ready "$name" "$pattern" "$port" "$method" "$path" "$timeout"
    log "$name ready (pid $(<"$STATE_DIR/$name.pid")) after $((SECONDS - t0))s"
    printf 'http://127.0.0.1:%s\n' "$port"
}

print_endpoint() { # print_endpoint NAME PATTERN
    local port
    if running_pid "$1" "$2" >/dev/null && port=$(cat "$STATE_DIR/$1.port" 2>/dev/null) && valid_port "$port"; then
        printf 'http://127.0.0.1:%s\n' "$port"
    else
        log "$1 is not running (state dir $STATE_DIR)"
        return 1
    fi
}
