"""Real clients, current and old, through the relay as the README starts it
(`make local`) in front of the fake Anthropic upstream: Claude Code 2.1.330
(its native binary, model discovery on), 2.1.112 and 1.0.128 (cli.js on
node), the Python SDK 2.12 and 0.125 and the JS SDK 1.12 and 0.137. `make
clients` installs each into .cache/clients/<name> from its pins in
tests/clients/<name>. Each run must end cleanly with the fake's answer, and
the key's usage must show every message that reached the upstream with
exactly the tokens the upstream reported."""

import json
import os
import subprocess
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from conftest import REPO, admin_of, running_make_local

CLIENTS = REPO / ".cache" / "clients"
SCRIPTS = REPO / "tests" / "clients"
# The fake upstream's default answer (tests/src/fake_upstream.rs).
ANSWER = "Hello, world! héllo ✓ 🌍"
MODEL = "claude-haiku-5-5"
# What keeps Claude Code off every host but the relay and never waiting on a person.
CLAUDE_CODE_OFFLINE = {
    "DISABLE_TELEMETRY": "1",
    "DISABLE_ERROR_REPORTING": "1",
    "DISABLE_AUTOUPDATER": "1",
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
}
CLIENT_TIMEOUT_S = 120


def installed(name: str) -> Path:
    """The install dir of the pinned client `name` (a tests/clients dir)."""
    path = CLIENTS / name
    if not (path / ".installed").exists():
        pytest.fail(f"{name} is not installed in {path}: run `make clients`")
    return path


def claude_code_command(version: str) -> list:
    """How to start Claude Code `version`: its package's `claude` bin, a
    native executable (2.1.x from some release on) or cli.js for node."""
    package = installed(f"claude-code-{version}") / "node_modules" / "@anthropic-ai" / "claude-code"
    program = package / json.loads((package / "package.json").read_text())["bin"]["claude"]
    return ["node", str(program)] if program.suffix in (".js", ".mjs", ".cjs") else [str(program)]


def run_claude_code(version: str, prompt: str, env_extra: dict, model=None) -> subprocess.CompletedProcess:
    """Claude Code `version` run once as `claude -p PROMPT` (plus `--model
    MODEL` when given), in an empty temporary HOME that is also its working
    directory, with only PATH, the offline settings and `env_extra` in its
    environment (`env_extra` brings ANTHROPIC_BASE_URL and a credential).
    Returns the finished process, stdout and stderr as text."""
    with tempfile.TemporaryDirectory(prefix=f"claude-code-{version}-") as home:
        env = {"PATH": os.environ["PATH"], "HOME": home, "LANG": "C.UTF-8", **CLAUDE_CODE_OFFLINE, **env_extra}
        command = [*claude_code_command(version), "-p", prompt]
        if model is not None:
            command += ["--model", model]
        return subprocess.run(
            command,
            cwd=home,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            encoding="utf-8",
            timeout=CLIENT_TIMEOUT_S,
        )


# An alias admins define, as Claude Code's model picker would offer it.
ALIAS = {"alias": "claude-team-default", "model": "claude-sonnet-5-5", "display_name": "Team default"}


@pytest.fixture(scope="module")
def local(binaries, tmp_path_factory):
    with running_make_local(binaries, tmp_path_factory.mktemp("make-local")) as running:
        # Before any request: the relay reads the aliases with the price
        # table on an instance's first message, then every PRICE_CACHE_SECONDS.
        admin_of(running)("PUT", "/admin/model-aliases", {"aliases": [ALIAS]})
        yield running


def new_key(relay, name: str) -> str:
    return admin_of(relay)("POST", "/admin/api-keys", {"name": name})["api_key"]


def upstream_log(relay) -> list:
    """Every request the fake upstream got so far, oldest first."""
    path = relay["upstream_log"]
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


class UpstreamWatch:
    """The requests that reach the fake upstream from now on (the tests of
    this module run one client at a time)."""

    def __init__(self, relay):
        self.relay = relay
        self.seen = len(upstream_log(relay))

    def requests(self) -> list:
        return upstream_log(self.relay)[self.seen :]

    def messages(self) -> list:
        return [r for r in self.requests() if r["method"] == "POST" and r["path"] == "/v1/messages"]


def usage_api(relay, key: str, path: str):
    request = urllib.request.Request(relay["base"] + path, headers={"x-api-key": key})
    with urllib.request.urlopen(request) as response:
        return json.loads(response.read())


def usage_rows(relay, key: str, expected: int) -> list:
    """The key's usage log (GET /api/usage/logs) once it has `expected` rows:
    the relay settles an answer just after it ends."""
    deadline = time.monotonic() + 10
    while True:
        rows = usage_api(relay, key, "/api/usage/logs")["data"]
        if len(rows) >= expected or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


TOKEN_FIELDS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")


def billed(model, stream, usage) -> tuple:
    return (model, stream, *(usage[field] for field in TOKEN_FIELDS))


def assert_billed_exactly(relay, key: str, upstream_messages: list, user_agent_prefix: str):
    """Each message the upstream answered is one usage row of the key with
    the upstream's model, stream flag and tokens, sent by the expected
    client; the key's totals are their sum."""
    assert upstream_messages, "no message reached the upstream"
    assert all(m["status"] == 200 for m in upstream_messages), upstream_messages
    rows = usage_rows(relay, key, len(upstream_messages))
    assert Counter(billed(r["model"], r["stream"], r) for r in rows) == Counter(
        billed(m["model"], m["stream"], m["usage"]) for m in upstream_messages
    )
    assert all(r["estimated"] is False for r in rows), rows
    agents = [r["user_agent"] for r in rows]
    assert all(agent.startswith(user_agent_prefix) for agent in agents), agents
    summary = usage_api(relay, key, "/api/usage")
    assert summary["requests"] == len(upstream_messages)
    assert summary["tokens"] == sum(sum(m["usage"][f] for f in TOKEN_FIELDS) for m in upstream_messages)


@pytest.mark.parametrize(
    ("version", "credential", "extra"),
    [
        # The current release: Authorization: Bearer, and GET /v1/models first.
        ("2.1.330", "ANTHROPIC_AUTH_TOKEN", {"CLAUDE_CODE_ENABLE_GATEWAY_MODEL_DISCOVERY": "1"}),
        ("2.1.112", "ANTHROPIC_API_KEY", {}),
        ("1.0.128", "ANTHROPIC_API_KEY", {}),
    ],
)
def test_claude_code_answers_a_prompt_and_each_upstream_message_is_billed_exactly(local, version, credential, extra):
    key = new_key(local, f"claude code {version}")
    watch = UpstreamWatch(local)

    done = run_claude_code(version, "say hello", {"ANTHROPIC_BASE_URL": local["base"], credential: key, **extra})

    assert done.returncode == 0, f"stdout: {done.stdout}\nstderr: {done.stderr}"
    assert ANSWER in done.stdout
    assert_billed_exactly(local, key, watch.messages(), f"claude-cli/{version} ")


def test_claude_code_model_option_reaches_the_upstream_as_given(local):
    key = new_key(local, "claude code --model")
    watch = UpstreamWatch(local)
    env = {
        "ANTHROPIC_BASE_URL": local["base"],
        "ANTHROPIC_API_KEY": key,
        "CLAUDE_CODE_ENABLE_GATEWAY_MODEL_DISCOVERY": "1",
    }

    done = run_claude_code("2.1.330", "say hello", env, model="claude-sonnet-5-5")

    assert done.returncode == 0, f"stdout: {done.stdout}\nstderr: {done.stderr}"
    assert ANSWER in done.stdout
    messages = watch.messages()
    assert [m["model"] for m in messages] == ["claude-sonnet-5-5"] * len(messages)
    assert_billed_exactly(local, key, messages, "claude-cli/2.1.330 ")


def test_claude_code_discovers_the_models_of_its_key_and_an_alias_reaches_the_upstream_as_its_model(local):
    key = admin_of(local)("POST", "/admin/api-keys", {"name": "sonnet only", "allowed_models": ["claude-sonnet-*"]})[
        "api_key"
    ]
    # What discovery hands Claude Code: this key's models, the alias first.
    listed = usage_api(local, key, "/v1/models?limit=1000")
    assert [m["id"] for m in listed["data"]] == ["claude-team-default", "claude-sonnet-5-5", "claude-sonnet-4-5-20250929"]
    assert listed["data"][0]["display_name"] == "Team default"
    watch = UpstreamWatch(local)
    env = {
        "ANTHROPIC_BASE_URL": local["base"],
        "ANTHROPIC_AUTH_TOKEN": key,
        "CLAUDE_CODE_ENABLE_GATEWAY_MODEL_DISCOVERY": "1",
    }

    done = run_claude_code("2.1.330", "say hello", env, model=ALIAS["alias"])

    assert done.returncode == 0, f"stdout: {done.stdout}\nstderr: {done.stderr}"
    assert ANSWER in done.stdout
    messages = watch.messages()
    assert messages, "no message reached the upstream"
    assert {m["model"] for m in messages} == {"claude-sonnet-5-5"}
    assert_billed_exactly(local, key, messages, "claude-cli/2.1.330 ")
    rows = usage_rows(local, key, len(messages))
    assert {r.get("requested_model") for r in rows} == {ALIAS["alias"]}


@pytest.mark.parametrize("version", ["2.12.0", "0.125.0"])
def test_python_sdk_plain_and_streamed_messages_are_billed_as_the_sdk_reports(local, version):
    key = new_key(local, f"python sdk {version}")
    watch = UpstreamWatch(local)
    python = installed(f"sdk-python-{version}") / "bin" / "python"

    done = subprocess.run(
        [str(python), str(SCRIPTS / "sdk_python.py"), local["base"], key, MODEL],
        capture_output=True,
        encoding="utf-8",
        timeout=CLIENT_TIMEOUT_S,
    )

    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["version"] == version
    assert seen["plain"]["text"] == ANSWER
    assert seen["streamed"]["text"] == ANSWER
    messages = watch.messages()
    # What the SDK reports is what the upstream sent: nothing rewritten on the way.
    assert [(m["stream"], m["usage"]) for m in messages] == [
        (False, seen["plain"]["usage"]),
        (True, seen["streamed"]["usage"]),
    ]
    assert_billed_exactly(local, key, messages, f"Anthropic/Python {version}")


@pytest.mark.parametrize("version", ["1.12.0", "0.137.0"])
def test_js_sdk_streamed_message_is_billed_as_the_sdk_reports(local, version):
    key = new_key(local, f"js sdk {version}")
    watch = UpstreamWatch(local)
    install = installed(f"sdk-js-{version}")

    done = subprocess.run(
        ["node", str(SCRIPTS / "sdk_js.cjs"), str(install), local["base"], key, MODEL],
        capture_output=True,
        encoding="utf-8",
        timeout=CLIENT_TIMEOUT_S,
    )

    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["text"] == ANSWER
    messages = watch.messages()
    assert [(m["stream"], m["usage"]) for m in messages] == [(True, seen["usage"])]
    assert_billed_exactly(local, key, messages, f"Anthropic/JS {version}")
