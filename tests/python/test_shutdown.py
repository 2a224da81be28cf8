"""relay-local stopped by SIGTERM (what systemd, containers and `kill` send)
or SIGINT (Ctrl-C) with streamed answers in flight: the answers run to their
end, every one is settled, and the process exits 0. Without the graceful
stop, SIGTERM's default action ends the process and the usage of every
request in flight is lost.

Each test runs its own relay-local (on its own table) in front of a slow
fake upstream, both on free loopback ports, stopped by PID."""

import base64
import http.client
import json
import os
import signal
import subprocess
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import boto3
import pytest
from boto3.dynamodb.conditions import Key

from conftest import ADMIN_PASSWORD, call, free_port, wait_until

UPSTREAM_KEY = "sk-ant-shutdown-test-upstream"
MODEL = "claude-haiku-5-5"
STREAMS = 20
# The fake's default message has ten SSE events: nine pauses of this length
# keep every stream open for several seconds after it has begun, long after
# the signal is sent (the test sends it once all have begun).
EVENT_DELAY_MS = 500


@pytest.fixture(scope="module")
def slow_upstream(binaries, tmp_path_factory):
    _, upstream_bin = binaries
    log = tmp_path_factory.mktemp("shutdown") / "upstream.out"
    port = free_port()
    upstream = subprocess.Popen(
        [
            str(upstream_bin),
            "--port", str(port),
            "--api-key", UPSTREAM_KEY,
            "--event-delay-ms", str(EVENT_DELAY_MS),
        ],
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(lambda: "listening on" in log.read_text(), "fake upstream")
        yield f"http://127.0.0.1:{port}"
    finally:
        upstream.terminate()
        try:
            upstream.wait(timeout=10)
        except subprocess.TimeoutExpired:
            upstream.kill()


class Relay:
    """One relay-local process on a table of its own."""

    def __init__(self, relay_bin: Path, upstream: str, table: str, log: Path, extra_env=None):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = dict(
            os.environ,
            PORT=str(self.port),
            TABLE_NAME=table,
            ADMIN_PASSWORD=ADMIN_PASSWORD,
            UPSTREAM_BASE_URL=upstream,
            UPSTREAM_API_KEY=UPSTREAM_KEY,
            AWS_REGION=os.environ.get("AWS_REGION", "us-east-1"),
            AWS_ACCESS_KEY_ID=os.environ.get("AWS_ACCESS_KEY_ID", "test"),
            AWS_SECRET_ACCESS_KEY=os.environ.get("AWS_SECRET_ACCESS_KEY", "test"),
            **(extra_env or {}),
        )
        self.process = subprocess.Popen(
            [str(relay_bin)], env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT
        )
        wait_until(lambda: urllib.request.urlopen(f"{self.base}/health").status == 200, "relay-local")
        basic = base64.b64encode(f"admin:{ADMIN_PASSWORD}".encode()).decode()
        self.token = call("POST", f"{self.base}/admin/login", headers={"authorization": f"Basic {basic}"})[
            "access_token"
        ]

    def admin(self, method, path, body=None):
        return call(method, self.base + path, body, {"authorization": f"Bearer {self.token}"})

    def stop(self):
        """Only if a test failed before stopping it itself."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


class Stream(threading.Thread):
    """One streamed request: flags `begun` once its first SSE event arrived
    (the relay admitted it and the upstream answers), then reads to the end
    and keeps the usage the answer reported."""

    def __init__(self, port: int, api_key: str, begun: threading.Semaphore):
        super().__init__(daemon=True)
        self.port, self.api_key, self.begun = port, api_key, begun
        self.usage = {}
        self.ended = False
        self.error = None

    def run(self):
        try:
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            body = {"model": MODEL, "max_tokens": 9, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
            connection.request(
                "POST",
                "/v1/messages",
                body=json.dumps(body),
                headers={"x-api-key": self.api_key, "content-type": "application/json"},
            )
            response = connection.getresponse()
            assert response.status == 200, response.read()
            flagged = False
            while line := response.readline():
                if not line.startswith(b"data:"):
                    continue
                if not flagged:
                    self.begun.release()
                    flagged = True
                event = json.loads(line[len(b"data:") :])
                if event["type"] == "message_start":
                    self.usage.update(event["message"]["usage"])
                elif event["type"] == "message_delta":
                    self.usage.update(event["usage"])
                elif event["type"] == "message_stop":
                    self.ended = True
        except Exception as exc:  # reported by the test
            self.error = exc
            self.begun.release()

    def billed(self) -> int:
        return self.usage.get("input_tokens", 0) + self.usage.get("output_tokens", 0)


def begin_streams(relay: Relay, api_key: str, count: int) -> list:
    """`count` streamed requests, returned once every one has begun."""
    begun = threading.Semaphore(0)
    streams = [Stream(relay.port, api_key, begun) for _ in range(count)]
    for stream in streams:
        stream.start()
    for _ in streams:
        assert begun.acquire(timeout=60), "a stream never began"
    assert [s.error for s in streams if s.error] == []
    return streams


def usage_log_items(table_name: str, key_id: str) -> list:
    table = boto3.resource(
        "dynamodb", endpoint_url=os.environ["DYNAMODB_ENDPOINT"], region_name="us-east-1"
    ).Table(table_name)
    return table.query(
        KeyConditionExpression=Key("pk").eq(f"KEY#{key_id}") & Key("sk").begins_with("LOG#"),
        ConsistentRead=True,
    )["Items"]


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_lets_the_streams_in_flight_end_and_settles_them_all(
    binaries, slow_upstream, tmp_path, stop_signal
):
    if not os.environ.get("DYNAMODB_ENDPOINT"):
        pytest.fail("DYNAMODB_ENDPOINT is not set: run these tests with `make test`")
    relay_bin, _ = binaries
    table = f"relay-shutdown-{uuid.uuid4().hex}"
    relay = Relay(relay_bin, slow_upstream, table, tmp_path / "relay.out")
    try:
        created = relay.admin("POST", "/admin/api-keys", {"name": "stopped mid-stream"})
        streams = begin_streams(relay, created["api_key"], STREAMS)

        # Every request is admitted and mid-stream: stop the relay by PID.
        os.kill(relay.process.pid, stop_signal)
        for stream in streams:
            stream.join(timeout=120)
        exit_code = relay.process.wait(timeout=120)
        log = relay.log.read_text()
        assert exit_code == 0, log[-3000:]
        assert signal.Signals(stop_signal).name in log, "the log names the signal that stopped it"

        assert [s.error for s in streams if s.error] == []
        assert all(s.ended for s in streams), "every answer in flight ran to its end"
        per_request = {s.billed() for s in streams}
        assert len(per_request) == 1 and per_request != {0}, per_request
        (billed,) = per_request

        # Settled before the exit: the usage log has all of them, now.
        items = usage_log_items(table, created["id"])
        assert len(items) == STREAMS
        assert all(item["estimated"] is False for item in items)
        assert sum(int(item["input_tokens"]) + int(item["output_tokens"]) for item in items) == STREAMS * billed
    finally:
        relay.stop()

    # And a relay started again on the same table shows the key's counters.
    again = Relay(relay_bin, slow_upstream, table, tmp_path / "relay-again.out")
    try:
        key = again.admin("GET", f"/admin/api-keys/{created['id']}")
        assert key["tokens_used"] == STREAMS * billed
    finally:
        os.kill(again.process.pid, signal.SIGTERM)
        assert again.process.wait(timeout=60) == 0


def test_a_second_stop_signal_exits_at_once(binaries, slow_upstream, tmp_path):
    if not os.environ.get("DYNAMODB_ENDPOINT"):
        pytest.fail("DYNAMODB_ENDPOINT is not set: run these tests with `make test`")
    relay_bin, _ = binaries
    relay = Relay(relay_bin, slow_upstream, f"relay-shutdown-{uuid.uuid4().hex}", tmp_path / "relay.out")
    try:
        created = relay.admin("POST", "/admin/api-keys", {"name": "stopped twice"})
        streams = begin_streams(relay, created["api_key"], 2)
        os.kill(relay.process.pid, signal.SIGTERM)
        # Two signals sent back to back may arrive as one: the second is
        # sent once the relay has logged that the first began its stop.
        wait_until(lambda: "stopping" in relay.log.read_text(), "the graceful stop")
        os.kill(relay.process.pid, signal.SIGTERM)
        # Not 0: a graceful stop would have waited for the streams' ends.
        assert relay.process.wait(timeout=60) == 128 + signal.SIGTERM
        for stream in streams:
            stream.join(timeout=60)
    finally:
        relay.stop()


def test_requests_in_flight_when_the_relay_is_killed_are_charged_by_the_reconciler(
    binaries, slow_upstream, tmp_path
):
    """SIGKILL leaves no chance to settle: the restarted relay's reconciler
    (on a one-second timer, requests overdue after one second) charges each
    request that was in flight an estimate, once; the requests answered
    before the kill keep their exact usage."""
    if not os.environ.get("DYNAMODB_ENDPOINT"):
        pytest.fail("DYNAMODB_ENDPOINT is not set: run these tests with `make test`")
    relay_bin, _ = binaries
    table = f"relay-killed-{uuid.uuid4().hex}"
    relay = Relay(relay_bin, slow_upstream, table, tmp_path / "relay.out")
    try:
        created = relay.admin("POST", "/admin/api-keys", {"name": "killed mid-stream"})
        # Two answered in full before the kill: their usage is exact.
        finished = begin_streams(relay, created["api_key"], 2)
        for stream in finished:
            stream.join(timeout=60)
        assert all(s.ended for s in finished)
        wait_until(lambda: len(usage_log_items(table, created["id"])) == 2, "the first two settled")
        streams = begin_streams(relay, created["api_key"], STREAMS)
        os.kill(relay.process.pid, signal.SIGKILL)
        relay.process.wait(timeout=30)
        for stream in streams:
            stream.join(timeout=60)
        assert len(usage_log_items(table, created["id"])) == 2, "nothing settled the killed ones"
    finally:
        relay.stop()

    again = Relay(
        relay_bin,
        slow_upstream,
        table,
        tmp_path / "relay-again.out",
        {"RECONCILE_AFTER_SECONDS": "1", "BATCH_COLLECT_INTERVAL_SECONDS": "1"},
    )
    try:
        wait_until(
            lambda: len(usage_log_items(table, created["id"])) == 2 + STREAMS,
            "the reconciler charging every request that was in flight",
        )
        items = usage_log_items(table, created["id"])
        exact = [item for item in items if item["estimated"] is False]
        estimated = [item for item in items if item["estimated"] is True]
        assert len(exact) == 2 and len(estimated) == STREAMS
        # The estimate: the body at four bytes a token, all of max_tokens.
        assert {int(item["output_tokens"]) for item in estimated} == {9}
        assert all(int(item["status"]) == 0 for item in estimated)
        key = again.admin("GET", f"/admin/api-keys/{created['id']}")
        total = sum(int(item["input_tokens"]) + int(item["output_tokens"]) for item in items)
        assert key["tokens_used"] == total
        assert key["in_flight"] == 0, "every lease given back"
        # Exactly once: later passes charge nothing more.
        time.sleep(2.5)
        assert len(usage_log_items(table, created["id"])) == 2 + STREAMS
    finally:
        os.kill(again.process.pid, signal.SIGTERM)
        assert again.process.wait(timeout=60) == 0
