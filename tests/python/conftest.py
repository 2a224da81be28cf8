"""Fixtures: the relay as `make local` runs it (relay-local) in front of the
fake Anthropic upstream binary, both on free loopback ports, stopped by PID."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ADMIN_PASSWORD = "python-sdk-test-password"
UPSTREAM_KEY = "sk-ant-python-test-upstream"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception as exc:  # not up yet
            last = exc
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not come up: {last}")


def binary(name: str) -> Path:
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    return target / "debug" / name


# Every binary the Python tests run, in one `cargo build`: the functions ask
# for no feature relay-local lacks, so all share the dependency artifacts.
PACKAGES = ["relay-local", "relay-tests", "relay-proxy", "relay-admin", "relay-usage"]
BINARIES = ["relay-local", "fake-upstream", "fake-bedrock", "relay-proxy", "relay-admin", "relay-usage"]


@pytest.fixture(scope="session")
def binaries():
    command = ["cargo", "build", "-q"]
    for package in PACKAGES:
        command += ["-p", package]
    for name in BINARIES:
        command += ["--bin", name]
    subprocess.run(command, cwd=REPO, check=True)
    return binary("relay-local"), binary("fake-upstream")


@contextlib.contextmanager
def running_relay(binaries, logs, upstream_args=(), extra_env=None):
    """relay-local in front of the fake upstream (started with
    `upstream_args`), with `extra_env` on top of `make local`'s settings."""
    dynamodb = os.environ.get("DYNAMODB_ENDPOINT")
    if not dynamodb:
        pytest.fail("DYNAMODB_ENDPOINT is not set: run these tests with `make test`")
    relay_bin, upstream_bin = binaries
    upstream_port, relay_port = free_port(), free_port()
    upstream = subprocess.Popen(
        [str(upstream_bin), "--port", str(upstream_port), "--api-key", UPSTREAM_KEY, *upstream_args],
        stdout=open(logs / "upstream.out", "w"),
        stderr=subprocess.STDOUT,
    )
    table = f"relay-py-{uuid.uuid4().hex}"
    env = dict(
        os.environ,
        PORT=str(relay_port),
        TABLE_NAME=table,
        ADMIN_PASSWORD=ADMIN_PASSWORD,
        UPSTREAM_BASE_URL=f"http://127.0.0.1:{upstream_port}",
        UPSTREAM_API_KEY=UPSTREAM_KEY,
        AWS_REGION=os.environ.get("AWS_REGION", "us-east-1"),
        AWS_ACCESS_KEY_ID=os.environ.get("AWS_ACCESS_KEY_ID", "test"),
        AWS_SECRET_ACCESS_KEY=os.environ.get("AWS_SECRET_ACCESS_KEY", "test"),
        **(extra_env or {}),
    )
    server = subprocess.Popen(
        [str(relay_bin)], env=env, stdout=open(logs / "relay.out", "w"), stderr=subprocess.STDOUT
    )
    base = f"http://127.0.0.1:{relay_port}"
    try:
        wait_until(lambda: urllib.request.urlopen(f"{base}/health").status == 200, "relay-local")
        yield {"base": base, "table": table, "dynamodb": dynamodb, "logs": logs}
    finally:
        for process in (server, upstream):
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()


def _alive(pid: int) -> bool:
    """Whether `pid` runs; a zombie (dead, not yet reaped by whoever
    inherited it) does not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@contextlib.contextmanager
def running_make_local(binaries, logs, upstream_args=()):
    """The relay started by the README's own command, `make local` (PORT,
    DYNAMODB_PORT and a state dir on its command line, ADMIN_PASSWORD and
    the upstream in its environment), in front of the fake upstream binary,
    which logs every request it gets to `upstream_log` (one JSON line each).
    Stopped as Ctrl-C stops it: a signal to make's process group; make's
    trap must then have stopped its DynamoDB Local (which runs in a session
    of its own, out of reach of the signal)."""
    _, upstream_bin = binaries  # built already, so `cargo run` inside make compiles nothing
    upstream_port, relay_port, dynamodb_port = free_port(), free_port(), free_port()
    upstream_log = logs / "upstream-requests.jsonl"
    upstream = subprocess.Popen(
        [
            str(upstream_bin), "--port", str(upstream_port), "--api-key", UPSTREAM_KEY,
            "--request-log", str(upstream_log), *upstream_args,
        ],
        stdout=open(logs / "upstream.out", "w"),
        stderr=subprocess.STDOUT,
    )
    state = logs / "make-local-state"
    # A make running the tests passes its jobserver and flags down; this
    # make is a user's, started afresh.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE") and k != "MFLAGS"}
    env.update(
        ADMIN_PASSWORD=ADMIN_PASSWORD,
        UPSTREAM_BASE_URL=f"http://127.0.0.1:{upstream_port}",
        UPSTREAM_API_KEY=UPSTREAM_KEY,
    )
    make_log = logs / "make-local.out"
    make = subprocess.Popen(
        ["make", "local", f"PORT={relay_port}", f"DYNAMODB_PORT={dynamodb_port}", f"LOCAL_STATE={state}"],
        cwd=REPO,
        env=env,
        stdout=open(make_log, "w"),
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{relay_port}"
    dynamodb_pid = None
    try:
        # Minutes only if `cargo run` has to build; a make that gave up fails at once.
        deadline = time.monotonic() + 180
        while True:
            if make.poll() is not None or time.monotonic() > deadline:
                status = "did not answer /health" if make.returncode is None else f"exited {make.returncode}"
                raise AssertionError(f"make local {status}:\n{make_log.read_text()[-3000:]}")
            try:
                if urllib.request.urlopen(f"{base}/health").status == 200:
                    break
            except OSError:  # not listening yet
                pass
            time.sleep(0.1)
        dynamodb_pid = int((state / "dynamodb-local.pid").read_text())
        yield {"base": base, "logs": logs, "upstream_log": upstream_log, "make_log": make_log}
    finally:
        try:
            os.killpg(make.pid, signal.SIGTERM)
            make.wait(timeout=60)
        except ProcessLookupError:  # make, and its whole group, already gone
            make.wait()
        except subprocess.TimeoutExpired:
            os.killpg(make.pid, signal.SIGKILL)
            make.wait()
        upstream.terminate()
        try:
            upstream.wait(timeout=10)
        except subprocess.TimeoutExpired:
            upstream.kill()
        dynamodb_left = dynamodb_pid is not None and _alive(dynamodb_pid)
        if dynamodb_left:
            # Whatever failed, leave no JVM behind.
            subprocess.run(
                [str(REPO / "infra" / "dynamodb-local.sh"), "stop"],
                env=dict(os.environ, RELAY_STATE_DIR=str(state)),
                check=False,
            )
    assert not dynamodb_left, f"make local's trap left DynamoDB Local (pid {dynamodb_pid}) running"


@pytest.fixture(scope="session")
def relay(binaries, tmp_path_factory):
    with running_relay(binaries, tmp_path_factory.mktemp("logs"), ["--chunks", "7"]) as running:
        yield running


def call(method: str, url: str, body=None, headers=None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        request.add_header("content-type", "application/json")
    with urllib.request.urlopen(request) as response:
        return json.loads(response.read() or b"null")


def admin_of(relay):
    """Calls the admin API of `relay`, logged in."""
    import base64

    basic = base64.b64encode(f"admin:{ADMIN_PASSWORD}".encode()).decode()
    token = call("POST", f"{relay['base']}/admin/login", headers={"authorization": f"Basic {basic}"})["access_token"]

    def admin_call(method, path, body=None):
        return call(method, relay["base"] + path, body, {"authorization": f"Bearer {token}"})

    return admin_call


@pytest.fixture
def admin(relay):
    return admin_of(relay)
