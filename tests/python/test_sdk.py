"""The official Anthropic Python SDK against the relay: streaming and not,
with Authorization: Bearer (current SDKs) and x-api-key (older ones); the
usage the SDK reports is exactly what lands in DynamoDB."""

import time

import anthropic
import boto3

MODEL = "claude-haiku-5-5"


def usage_logs(relay, key_id, expected):
    """The key's usage log once `expected` items are there: the relay
    settles each answer just after it ends, in one transaction with the
    key's counters."""
    table = boto3.resource(
        "dynamodb", endpoint_url=relay["dynamodb"], region_name="us-east-1"
    ).Table(relay["table"])
    from boto3.dynamodb.conditions import Key

    deadline = time.monotonic() + 10
    while True:
        items = table.query(
            KeyConditionExpression=Key("pk").eq(f"KEY#{key_id}") & Key("sk").begins_with("LOG#"),
            ConsistentRead=True,
        )["Items"]
        if len(items) >= expected or time.monotonic() > deadline:
            return items
        time.sleep(0.1)


def billed(usage) -> int:
    return (
        usage.input_tokens
        + usage.output_tokens
        + (usage.cache_creation_input_tokens or 0)
        + (usage.cache_read_input_tokens or 0)
    )


def test_sdk_streams_and_non_streams_with_bearer_and_usage_lands_exactly(relay, admin):
    created = admin("POST", "/admin/api-keys", {"name": "python sdk"})
    client = anthropic.Anthropic(base_url=relay["base"], auth_token=created["api_key"], api_key=None, max_retries=0)

    with client.messages.stream(
        model=MODEL, max_tokens=9, messages=[{"role": "user", "content": "say hello"}]
    ) as stream:
        text = "".join(stream.text_stream)
        streamed = stream.get_final_message()
    assert text
    assert streamed.usage.output_tokens == 9

    plain = client.messages.create(
        model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "say hello again, at more length"}]
    )
    assert plain.usage.output_tokens == 5

    counted = client.messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert counted.input_tokens >= 0

    logs = usage_logs(relay, created["id"], 2)
    assert len(logs) == 2, "two messages billed; count_tokens is free"
    by_stream = {bool(log["stream"]): log for log in logs}
    for message, log in ((streamed, by_stream[True]), (plain, by_stream[False])):
        assert int(log["input_tokens"]) == message.usage.input_tokens
        assert int(log["output_tokens"]) == message.usage.output_tokens
        assert log["estimated"] is False
        assert log["user_agent"].startswith("Anthropic/Python")
    key = admin("GET", f"/admin/api-keys/{created['id']}")
    assert key["tokens_used"] == billed(streamed.usage) + billed(plain.usage)


def test_sdk_with_x_api_key_and_a_refused_key(relay, admin):
    created = admin("POST", "/admin/api-keys", {"name": "older sdk", "token_limit": 1})
    client = anthropic.Anthropic(base_url=relay["base"], api_key=created["api_key"], max_retries=2)
    first = client.messages.create(model=MODEL, max_tokens=3, messages=[{"role": "user", "content": "hi"}])
    assert first.usage.output_tokens == 3
    assert len(usage_logs(relay, created["id"], 1)) == 1

    # The quota is now spent: the SDK surfaces a 429 and, told not to, does not retry.
    try:
        client.messages.create(model=MODEL, max_tokens=3, messages=[{"role": "user", "content": "hi"}])
    except anthropic.RateLimitError as error:
        assert "quota" in error.message
        assert error.response.headers["x-should-retry"] == "false"
    else:
        raise AssertionError("the spent quota was not enforced")

    bad = anthropic.Anthropic(base_url=relay["base"], api_key="sk-proxy-not-a-real-key", max_retries=0)
    try:
        bad.messages.create(model=MODEL, max_tokens=3, messages=[{"role": "user", "content": "hi"}])
    except anthropic.AuthenticationError as error:
        assert error.status_code == 401
    else:
        raise AssertionError("a bad key was accepted")
