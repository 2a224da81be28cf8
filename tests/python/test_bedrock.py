"""The official Anthropic Python SDK through a relay whose only upstream is
Amazon Bedrock (the fake Bedrock runtime, reached with SigV4 by the AWS SDK
inside the relay): the SDK reads the Bedrock answers as it reads
Anthropic's, and the usage it reports is what lands in DynamoDB."""

import json
import subprocess
from pathlib import Path

import anthropic
import pytest

from conftest import admin_of, binary, free_port, running_relay, wait_until
from test_sdk import usage_logs

MODEL = "claude-sonnet-5"
FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures"
# Each Anthropic model the tests ask for, and a Bedrock id for it.
MODEL_MAP = {
    MODEL: "us.anthropic.claude-sonnet-5-v1:0",
    "claude-opus-5-5": "us.anthropic.claude-opus-5-5-v1:0",
    "claude-haiku-5-5": "us.anthropic.claude-haiku-5-5-v1:0",
}


@pytest.fixture(scope="module")
def bedrock_relay(binaries, tmp_path_factory):
    logs = tmp_path_factory.mktemp("bedrock")
    port = free_port()
    fake = subprocess.Popen(
        [str(binary("fake-bedrock")), "--port", str(port), "--usage", "1200,340"],
        stdout=open(logs / "bedrock.out", "w"),
        stderr=subprocess.STDOUT,
    )
    upstreams = [
        {
            "name": "bedrock-us",
            "kind": "bedrock",
            "region": "us-east-1",
            "endpoint_url": f"http://127.0.0.1:{port}",
            "model_map": MODEL_MAP,
        }
    ]
    try:
        wait_until(lambda: (logs / "bedrock.out").read_text().startswith("listening"), "fake-bedrock")
        with running_relay(binaries, logs, [], {"UPSTREAMS": json.dumps(upstreams)}) as running:
            yield running
    finally:
        fake.terminate()
        fake.wait(timeout=10)


def test_the_sdk_reads_bedrock_answers_as_anthropic_ones_and_usage_lands_exactly(bedrock_relay):
    created = admin_of(bedrock_relay)("POST", "/admin/api-keys", {"name": "py-bedrock"})
    client = anthropic.Anthropic(base_url=bedrock_relay["base"], api_key=created["api_key"], max_retries=0)
    request = dict(model=MODEL, max_tokens=512, messages=[{"role": "user", "content": "hi"}])

    with client.messages.stream(**request) as stream:
        texts = [text for text in stream.text_stream]
        streamed = stream.get_final_message()
    whole = client.messages.create(**request)

    for message in (streamed, whole):
        # The model the client asked for, not Bedrock's id.
        assert message.model == MODEL
        assert message.role == "assistant"
        assert message.stop_reason == "end_turn"
        assert message.content[0].text == "Hello, héllo ✓"
        assert (message.usage.input_tokens, message.usage.output_tokens) == (1200, 340)
    assert "".join(texts) == "Hello, héllo ✓"

    logs = usage_logs(bedrock_relay, created["id"], 2)
    assert len(logs) == 2
    for log in logs:
        assert (int(log["input_tokens"]), int(log["output_tokens"])) == (1200, 340)
        assert log["upstream"] == "bedrock-us"
        # Sonnet 5: $2 in, $10 out per million.
        assert int(log["cost_micro_usd"]) == 1200 * 2 + 340 * 10


@pytest.mark.parametrize(
    "fixture", ["claude-code-2.1.330-messages-stream.json", "sdk-python-2.12.0-messages-stream.json"]
)
def test_real_client_requests_go_through_bedrock_and_read_back_as_anthropic_streams(bedrock_relay, fixture):
    """A real Claude Code (and SDK) request, betas and all, through the
    Bedrock path: the SDK parses what comes back to a whole message."""
    captured = json.loads((FIXTURES / fixture).read_text())
    body = dict(captured["body"])
    betas = {name: value for name, value in captured["headers"] if name.lower() == "anthropic-beta"}
    created = admin_of(bedrock_relay)("POST", "/admin/api-keys", {"name": f"py-{fixture}"})
    client = anthropic.Anthropic(base_url=bedrock_relay["base"], api_key=created["api_key"], max_retries=0)
    known = {name: body.pop(name) for name in ("model", "max_tokens", "messages")}
    body.pop("stream", None)
    with client.messages.stream(**known, extra_body=body, extra_headers=betas) as stream:
        message = stream.get_final_message()
    assert message.model == known["model"]
    assert message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (1200, 340)
    logs = usage_logs(bedrock_relay, created["id"], 1)
    assert (int(logs[0]["input_tokens"]), int(logs[0]["output_tokens"])) == (1200, 340)
