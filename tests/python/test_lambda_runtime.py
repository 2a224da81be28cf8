"""The three real function binaries under the Lambda Runtime API.

Each binary (relay-admin, relay-usage, relay-proxy: the `bootstrap` of its
function) runs against its own `cargo lambda watch --only-lambda-apis`, the
Lambda Runtime API and Invoke API emulator, and gets the sample API Gateway
REST events of events/ exactly as Lambda hands them over: lambda_runtime
polls /next, lambda_http parses the event, the proxy posts Lambda's
streaming response (JSON prelude, eight NUL bytes, the body as it comes),
which the emulator turns into status, headers and a streamed body as API
Gateway does. Each function gets the environment template.yaml gives it
(variable names read from the template), pointing at a table created from
template.yaml's RelayTable, a secret on moto with the JSON keys the stack's
secret has, and the fake-upstream binary.

Why --only-lambda-apis, with the test starting the binaries: plain
`cargo lambda watch` compiles and runs each function with
`cargo run --bin <name>`, a package selection of its own, so Cargo resolves
other features for the shared dependencies (reqwest, the AWS SDK…) than
conftest.py's build and compiles a second debug copy of them: minutes on a
fresh CI machine. Here the functions are built in the same `cargo build` as
conftest.py's binaries, sharing every dependency artifact. Function URLs
(watch's HTTP front) are not used either: they produce API Gateway v2
events, and the functions accept REST (v1) events only.

Needs DYNAMODB_ENDPOINT and SECRETSMANAGER_ENDPOINT (`make test` exports
both) and .venv/bin/cargo-lambda (`make venv`).
"""

import base64
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import boto3
import pytest
import yaml

from conftest import REPO, free_port, wait_until
from conftest import binary as built_binary

EVENTS = REPO / "events"
VENV = Path(os.environ.get("RELAY_VENV", REPO / ".venv"))
CARGO_LAMBDA = VENV / "bin" / "cargo-lambda"
UPSTREAM_KEY = "sk-ant-lambda-runtime-test-upstream"
# The password in events/admin-login.json's Basic header, and its bcrypt
# hash at the lowest cost (the test checks the flow, not the cost).
ADMIN_PASSWORD = "correct horse battery staple"
ADMIN_PASSWORD_HASH = "$2b$04$A222l.XARKggvHUtCDrL1uOeX8ioEQITYlScY3BxzZdKfcnZi5XGG"
EVENT_IP = "203.0.113.7"


def wait_for_port(port: int, what: str, process: subprocess.Popen, log: Path, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on {port}:\n{log.read_text()[-3000:]}")


def descendants(pid: int) -> list[int]:
    """Every process below pid (from /proc)."""
    found = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
        children = [int(c) for task in tasks for c in (task / "children").read_text().split()]
    except OSError:
        return found
    for child in children:
        found.append(child)
        found.extend(descendants(child))
    return found


def stop(process: subprocess.Popen):
    """Stops a process this test started, and anything it started, by PID."""
    if process.poll() is None:
        below = descendants(process.pid)
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        for pid in below:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class CfnLoader(yaml.SafeLoader):
    """PyYAML reading CloudFormation's short-form tags (!Ref, !Sub, !If …)
    as {"!Tag": value}."""


def _tagged(loader, tag, node):
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    return {tag: value}


CfnLoader.add_multi_constructor("!", _tagged)


def template() -> dict:
    return yaml.load((REPO / "template.yaml").read_text(), Loader=CfnLoader)


def create_table(client, name: str):
    """The table as template.yaml's RelayTable defines it."""
    definition = template()["Resources"]["RelayTable"]["Properties"]
    client.create_table(
        TableName=name,
        BillingMode="PAY_PER_REQUEST",
        AttributeDefinitions=definition["AttributeDefinitions"],
        KeySchema=definition["KeySchema"],
        GlobalSecondaryIndexes=[
            {"IndexName": i["IndexName"], "KeySchema": i["KeySchema"], "Projection": i["Projection"]}
            for i in definition["GlobalSecondaryIndexes"]
        ],
    )
    client.get_waiter("table_exists").wait(TableName=name, WaiterConfig={"Delay": 0.2, "MaxAttempts": 100})
    ttl = definition["TimeToLiveSpecification"]
    client.update_time_to_live(
        TableName=name,
        TimeToLiveSpecification={"AttributeName": ttl["AttributeName"], "Enabled": ttl["Enabled"]},
    )


def functions_in_template() -> dict[str, dict[str, object]]:
    """binary name -> the environment template.yaml gives that function
    (Globals' variables, then its own), values as written there."""
    doc = template()
    common = doc["Globals"]["Function"]["Environment"]["Variables"]
    functions = {}
    for resource in doc["Resources"].values():
        if resource.get("Type") != "AWS::Serverless::Function":
            continue
        binary = resource["Metadata"]["BuildProperties"]["Binary"]
        own = resource["Properties"].get("Environment", {}).get("Variables", {})
        functions[binary] = {**common, **own}
    return functions


@pytest.fixture(scope="module")
def runtime(binaries, tmp_path_factory):
    dynamodb = os.environ.get("DYNAMODB_ENDPOINT")
    secretsmanager = os.environ.get("SECRETSMANAGER_ENDPOINT")
    if not dynamodb or not secretsmanager:
        pytest.fail("DYNAMODB_ENDPOINT and SECRETSMANAGER_ENDPOINT must be set: run these tests with `make test`")
    if not CARGO_LAMBDA.exists():
        pytest.fail(f"{CARGO_LAMBDA} is missing: run `make venv`")
    logs = tmp_path_factory.mktemp("lambda-runtime")

    region = os.environ.get("AWS_REGION", "us-east-1")
    credentials = {
        "AWS_ACCESS_KEY_ID": os.environ.get("AWS_ACCESS_KEY_ID", "test"),
        "AWS_SECRET_ACCESS_KEY": os.environ.get("AWS_SECRET_ACCESS_KEY", "test"),
    }
    aws = dict(
        region_name=region,
        aws_access_key_id=credentials["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=credentials["AWS_SECRET_ACCESS_KEY"],
    )
    dynamo_client = boto3.client("dynamodb", endpoint_url=dynamodb, **aws)
    secrets_client = boto3.client("secretsmanager", endpoint_url=secretsmanager, **aws)
    # moto serves SNS on the same endpoint: the budget alert topic.
    sns_client = boto3.client("sns", endpoint_url=secretsmanager, **aws)
    alert_topic = sns_client.create_topic(Name=f"relay-alerts-{uuid.uuid4().hex}")["TopicArn"]
    table = f"relay-lambda-{uuid.uuid4().hex}"
    create_table(dynamo_client, table)
    secret_arn = secrets_client.create_secret(
        Name=f"relay-lambda-{uuid.uuid4().hex}",
        SecretString=json.dumps(
            {
                "upstream_api_key": UPSTREAM_KEY,
                "admin_password_hash": ADMIN_PASSWORD_HASH,
                "jwt_secret": uuid.uuid4().hex,
            }
        ),
    )["ARN"]

    processes = []
    try:
        upstream_port = free_port()
        upstream_log = logs / "fake-upstream.log"
        upstream = subprocess.Popen(
            [str(built_binary("fake-upstream")), "--port", str(upstream_port), "--api-key", UPSTREAM_KEY],
            stdout=open(upstream_log, "w"),
            stderr=subprocess.STDOUT,
        )
        processes.append(upstream)
        wait_for_port(upstream_port, "fake-upstream", upstream, upstream_log)

        # What the template's !Ref / !If values become here.
        values = {
            "TABLE_NAME": table,
            "RELAY_SECRET_ARN": secret_arn,
            "RUST_LOG": "info",
            "UPSTREAM_BASE_URL": f"http://127.0.0.1:{upstream_port}",
            "LOG_RETENTION_DAYS": "30",
            "PASSTHROUGH_PATH_PREFIXES": "",
            "ADMIN_ALLOWED_CIDRS": "",
            "BUDGET_ALERT_TOPIC_ARN": alert_topic,
        }
        functions = {}
        for binary, variables in functions_in_template().items():
            env = {
                "PATH": os.environ["PATH"],
                "HOME": os.environ.get("HOME", "/tmp"),
                "AWS_REGION": region,
                **credentials,
                "DYNAMODB_ENDPOINT": dynamodb,
                "SECRETSMANAGER_ENDPOINT": secretsmanager,
                "SNS_ENDPOINT": secretsmanager,
            }
            for name, value in variables.items():
                if isinstance(value, str):
                    env[name] = value
                elif name in values:
                    env[name] = values[name]
                else:
                    pytest.fail(f"template.yaml gives {binary} {name}={value}: teach this test its local value")
            port = free_port()
            emulator_log = logs / f"{binary}-emulator.log"
            emulator = subprocess.Popen(
                [str(CARGO_LAMBDA), "lambda", "watch", "--only-lambda-apis", "-A", "127.0.0.1", "-P", str(port)],
                cwd=REPO,
                stdout=open(emulator_log, "w"),
                stderr=subprocess.STDOUT,
            )
            processes.append(emulator)
            wait_for_port(port, f"{binary}'s runtime emulator", emulator, emulator_log)
            env.update(
                AWS_LAMBDA_RUNTIME_API=f"http://127.0.0.1:{port}/.rt",
                AWS_LAMBDA_FUNCTION_NAME=binary,
                AWS_LAMBDA_FUNCTION_VERSION="$LATEST",
                AWS_LAMBDA_FUNCTION_MEMORY_SIZE="256",
            )
            stdout_log, stderr_log = logs / f"{binary}.stdout", logs / f"{binary}.stderr"
            function = subprocess.Popen(
                [str(built_binary(binary))], env=env, stdout=open(stdout_log, "w"), stderr=open(stderr_log, "w")
            )
            processes.append(function)
            functions[binary] = {
                "port": port,
                "invoke": f"http://127.0.0.1:{port}/2015-03-31/functions/_/invocations",
                "stdout": stdout_log,
                "stderr": stderr_log,
                "process": function,
            }
        assert set(functions) == {"relay-admin", "relay-usage", "relay-proxy"}
        yield {"functions": functions, "table": table, "dynamodb": dynamo_client}
    finally:
        for process in reversed(processes):
            stop(process)
        try:
            dynamo_client.delete_table(TableName=table)
        except Exception:
            pass
        try:
            secrets_client.delete_secret(SecretId=secret_arn, ForceDeleteWithoutRecovery=True)
        except Exception:
            pass


def load_event(name: str, key: str | None = None, token: str | None = None) -> dict:
    event = json.loads((EVENTS / f"{name}.json").read_text())
    headers = {}
    if key is not None:
        headers["x-api-key"] = key
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    for header, value in headers.items():
        event["headers"][header] = value
        event["multiValueHeaders"][header] = [value]
    return event


def diagnostics(runtime, binary: str) -> str:
    function = runtime["functions"][binary]
    return f"\n--- {binary} stderr:\n{function['stderr'].read_text()[-3000:]}"


def invoke(runtime, binary: str, event: dict, timeout: float = 60.0):
    """The Invoke API, as API Gateway calls it: (HTTP status, headers, payload)."""
    function = runtime["functions"][binary]
    assert function["process"].poll() is None, f"{binary} exited{diagnostics(runtime, binary)}"
    request = urllib.request.Request(
        function["invoke"],
        data=json.dumps(event).encode(),
        method="POST",
        headers={"content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as error:
        return error.code, {k.lower(): v for k, v in error.headers.items()}, error.read()


def proxy_response(runtime, binary: str, payload: bytes) -> tuple[int, dict, bytes]:
    """An API Gateway proxy response (what a buffered function returns)."""
    try:
        payload = json.loads(payload)
    except ValueError:
        raise AssertionError(f"{binary}: not a proxy response: {payload[:300]!r}{diagnostics(runtime, binary)}")
    body = payload.get("body") or ""
    body = base64.b64decode(body) if payload.get("isBase64Encoded") else body.encode()
    headers = {k.lower(): v for k, v in (payload.get("headers") or {}).items()}
    for name, values in (payload.get("multiValueHeaders") or {}).items():
        headers[name.lower()] = values[0]
    return payload["statusCode"], headers, body


def buffered(runtime, binary: str, event: dict) -> tuple[int, dict, bytes]:
    """A buffered function's answer: the proxy response it returned."""
    status, headers, payload = invoke(runtime, binary, event)
    assert status == 200, f"invoke {binary}: {status} {payload!r}{diagnostics(runtime, binary)}"
    assert "lambda-runtime-function-response-mode" not in headers, "buffered, not streamed"
    return proxy_response(runtime, binary, payload)


def streamed(runtime, binary: str, event: dict) -> tuple[int, dict, bytes]:
    """A streaming function's answer: the emulator, like API Gateway, makes
    the prelude the HTTP status and headers and streams the body."""
    status, headers, body = invoke(runtime, binary, event)
    assert headers.get("lambda-runtime-function-response-mode") == "streaming", (
        f"{binary} did not answer in streaming mode: {status} {headers} {body[:300]!r}{diagnostics(runtime, binary)}"
    )
    return status, headers, body


def sse_event_names(body: bytes) -> list[str]:
    return [line.split(":", 1)[1].strip() for line in body.decode().splitlines() if line.startswith("event:")]


@pytest.fixture(scope="module")
def key(runtime):
    """Admin: log in with the admin-login event, create a key with the
    admin-create-key event (allowed only from the events' sourceIp)."""
    status, _, body = buffered(runtime, "relay-admin", load_event("admin-login"))
    assert status == 200, body
    token = json.loads(body)["access_token"]
    status, _, body = buffered(runtime, "relay-admin", load_event("admin-create-key", token=token))
    assert status == 201, body
    created = json.loads(body)
    assert created["allowed_ips"] == ["203.0.113.0/24"]
    return created


def test_admin_logs_in_and_creates_a_key(key):
    assert key["api_key"].startswith("sk-proxy-")
    assert key["name"] == "alice laptop"


def test_usage_answers_health_and_quota(runtime, key):
    # The event file as it is, through `cargo lambda invoke --data-file`.
    port = runtime["functions"]["relay-usage"]["port"]
    completed = subprocess.run(
        [
            str(CARGO_LAMBDA), "lambda", "invoke", "-A", "127.0.0.1", "-P", str(port),
            "--data-file", str(EVENTS / "usage-health.json"), "--output-format", "json",
        ],
        cwd=REPO,
        capture_output=True,
        check=True,
        timeout=60,
    )
    status, headers, body = proxy_response(runtime, "relay-usage", completed.stdout)
    assert status == 200, body
    assert json.loads(body) == {"status": "ok", "dynamodb": "ok", "secrets": "ok", "upstream_key_configured": True}
    assert headers["content-type"].startswith("application/json")

    status, _, body = buffered(runtime, "relay-usage", load_event("usage-quota", key=key["api_key"]))
    assert status == 200, body
    assert json.loads(body)["token_limit"] == 5_000_000


def test_proxy_says_hello_and_streams_a_message(runtime, key):
    status, _, body = streamed(runtime, "relay-proxy", load_event("proxy-hello-head"))
    assert (status, body) == (200, b"")

    # The sample event's placeholder key: Anthropic's error, status included.
    status, _, body = streamed(runtime, "relay-proxy", load_event("proxy-messages-stream"))
    assert status == 401, body
    assert json.loads(body)["error"]["type"] == "authentication_error"

    status, headers, body = streamed(runtime, "relay-proxy", load_event("proxy-messages-stream", key=key["api_key"]))
    assert status == 200, body
    assert headers["content-type"].startswith("text/event-stream")
    request_id = headers.get("x-relay-request-id", "")
    assert request_id.startswith("relay_")
    names = sse_event_names(body)
    assert names[0] == "message_start" and names[-1] == "message_stop", names

    # The emulator speaks the Extensions API, so this is the deployed path.
    stderr = runtime["functions"]["relay-proxy"]["stderr"].read_text()
    assert "settle extension registered" in stderr, stderr[-3000:]

    # Settled (just after the stream closed, the settle extension holding
    # the invocation open until then), with the event's address.
    def usage_logs():
        return runtime["dynamodb"].query(
            TableName=runtime["table"],
            KeyConditionExpression="pk = :pk AND begins_with(sk, :log)",
            ExpressionAttributeValues={":pk": {"S": f"KEY#{key['id']}"}, ":log": {"S": "LOG#"}},
            ConsistentRead=True,
        )["Items"]

    wait_until(usage_logs, "the message's usage log", timeout=10)
    logs = usage_logs()
    assert len(logs) == 1
    assert logs[0]["client_ip"]["S"] == EVENT_IP
    assert int(logs[0]["output_tokens"]["N"]) > 0

    # Its EMF document on stdout, as CloudWatch will read it.
    documents = [
        json.loads(line)
        for line in runtime["functions"]["relay-proxy"]["stdout"].read_text().splitlines()
        if line.startswith("{") and '"_aws"' in line
    ]
    mine = [d for d in documents if d.get("request_id") == request_id]
    assert len(mine) == 1, documents
    directive = mine[0]["_aws"]["CloudWatchMetrics"][0]
    assert directive["Namespace"] == "ClaudeRelay"
    assert mine[0]["Function"] == "proxy" and mine[0]["Requests"] == 1
    assert mine[0]["OutputTokens"] == int(logs[0]["output_tokens"]["N"])
