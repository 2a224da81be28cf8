"""The official Anthropic Python SDK against the relay: streaming and not,
with Authorization: Bearer (current SDKs) and x-api-key (older ones); the
usage the SDK reports is exactly what lands in DynamoDB."""

import time

import anthropic
import boto3
import pytest

from conftest import admin_of, running_relay

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


def test_sdk_batch_created_polled_and_read_through_the_relay_is_charged_once(relay, admin):
    created = admin("POST", "/admin/api-keys", {"name": "batch sdk", "token_limit": 1_000_000})
    client = anthropic.Anthropic(base_url=relay["base"], api_key=created["api_key"], max_retries=0)
    batch = client.messages.batches.create(
        requests=[
            {"custom_id": f"q{i}", "params": {"model": MODEL, "max_tokens": 7, "messages": [{"role": "user", "content": f"question {i}"}]}}
            for i in range(3)
        ]
    )
    assert batch.id.startswith("msgbatch_")
    deadline = time.monotonic() + 10
    while batch.processing_status != "ended":
        assert time.monotonic() < deadline, "the batch never ended"
        time.sleep(0.1)
        batch = client.messages.batches.retrieve(batch.id)
    # results_url points at the relay, so the SDK reads the results through it.
    assert batch.results_url == f"/v1/messages/batches/{batch.id}/results"
    results = list(client.messages.batches.results(batch.id))
    assert sorted(r.custom_id for r in results) == ["q0", "q1", "q2"]
    usage = [r.result.message.usage for r in results]
    assert all(r.result.type == "succeeded" for r in results)
    # Read twice: charged once.
    assert len(list(client.messages.batches.results(batch.id))) == 3
    listed = client.messages.batches.list()
    assert [b.id for b in listed.data] == [batch.id]

    logs = usage_logs(relay, created["id"], 1)
    assert len(logs) == 1 and logs[0]["kind"] == "batch"
    key = admin("GET", f"/admin/api-keys/{created['id']}")
    assert key["tokens_used"] == sum(billed(u) for u in usage)
    assert key["tokens_reserved"] == 0


def test_sdk_uploads_lists_and_reads_a_file_only_with_its_own_key(relay, admin):
    owner = anthropic.Anthropic(
        base_url=relay["base"], api_key=admin("POST", "/admin/api-keys", {"name": "files"})["api_key"], max_retries=0
    )
    other = anthropic.Anthropic(
        base_url=relay["base"], api_key=admin("POST", "/admin/api-keys", {"name": "other"})["api_key"], max_retries=0
    )
    content = b"col1,col2\r\n1,2\r\n"
    uploaded = owner.beta.files.upload(file=("data.csv", content, "text/csv"))
    assert uploaded.filename == "data.csv" and uploaded.size_bytes == len(content)
    assert owner.beta.files.retrieve_metadata(uploaded.id).id == uploaded.id
    assert [f.id for f in owner.beta.files.list().data] == [uploaded.id]
    assert owner.beta.files.download(uploaded.id).read() == content

    assert other.beta.files.list().data == []
    try:
        other.beta.files.retrieve_metadata(uploaded.id)
    except anthropic.NotFoundError:
        pass
    else:
        raise AssertionError("another key read the file")

    owner.beta.files.delete(uploaded.id)
    assert owner.beta.files.list().data == []


def counting_client(relay, api_key, max_retries):
    """An SDK client that counts the HTTP attempts it makes (through the
    SDK's own HTTP client class, whatever library it is built on)."""
    attempts = []
    http_client = anthropic.DefaultHttpxClient(
        event_hooks={"request": [lambda request: attempts.append(request.url.path)]}
    )
    client = anthropic.Anthropic(
        base_url=relay["base"], api_key=api_key, max_retries=max_retries, http_client=http_client
    )
    return client, attempts


def test_sdk_stops_on_a_spent_dollar_limit_and_retries_a_tokens_per_minute_429(relay, admin):
    # A spent dollar limit: one attempt, no retry, the message names it.
    spent = admin(
        "POST",
        "/admin/api-keys",
        {"name": "tiny budget", "dollar_limits": [{"window": "day", "limit_usd": 0.000001}]},
    )
    client, attempts = counting_client(relay, spent["api_key"], max_retries=3)
    client.messages.create(model=MODEL, max_tokens=3, messages=[{"role": "user", "content": "hi"}])
    attempts.clear()
    try:
        client.messages.create(model=MODEL, max_tokens=3, messages=[{"role": "user", "content": "hi"}])
    except anthropic.RateLimitError as error:
        assert "dollar limit reached" in error.message
        assert error.response.headers["x-should-retry"] == "false"
    else:
        raise AssertionError("the spent dollar limit was not enforced")
    assert len(attempts) == 1, f"the SDK retried a final refusal: {attempts}"

    # A tier whose minute of tokens one request spends: the next is a 429
    # with retry-after (the seconds left in the minute), which the SDK
    # waits out and retries, then succeeds.
    admin("PUT", "/admin/tiers/one-per-minute", {"requests": 1000, "period": 60, "tokens_per_minute": 1})
    tight = admin("POST", "/admin/api-keys", {"name": "tpm", "rate_limit_tier": "one-per-minute"})
    client, attempts = counting_client(relay, tight["api_key"], max_retries=1)
    client.messages.create(model=MODEL, max_tokens=3, messages=[{"role": "user", "content": "hi"}])
    attempts.clear()
    answer = client.messages.create(model=MODEL, max_tokens=3, messages=[{"role": "user", "content": "hi"}])
    assert answer.usage.output_tokens == 3
    assert len(attempts) == 2, f"refused once for the minute, then admitted: {attempts}"


@pytest.fixture(scope="module")
def capped_relay(binaries, tmp_path_factory):
    """A relay whose host cuts responses at 3 s (API Gateway's 15 minutes,
    shortened), in front of an answer that takes 6 s."""
    with running_relay(
        binaries,
        tmp_path_factory.mktemp("capped"),
        ["--chunks", "20", "--event-delay-ms", "300"],
        {"STREAM_CAP_SECONDS": "3", "STREAM_CAP_MARGIN_SECONDS": "1"},
    ) as running:
        yield running


def test_sdk_raises_a_retryable_overloaded_error_when_a_stream_reaches_the_cap(capped_relay):
    created = admin_of(capped_relay)("POST", "/admin/api-keys", {"name": "py-cap"})
    client = anthropic.Anthropic(base_url=capped_relay["base"], api_key=created["api_key"], max_retries=0)
    started = time.monotonic()
    with pytest.raises(anthropic.APIStatusError) as raised:
        with client.messages.stream(
            model=MODEL, max_tokens=100, messages=[{"role": "user", "content": "hi"}]
        ) as stream:
            for _ in stream:
                pass
    assert time.monotonic() - started < 5
    error = raised.value
    # What the SDK raises for the API's own mid-stream overload: an
    # APIStatusError whose body's type is overloaded_error, which Claude
    # Code retries.
    assert error.body["type"] == "error"
    assert error.body["error"]["type"] == "overloaded_error"
    assert "15-minute limit" in error.body["error"]["message"]
    logs = usage_logs(capped_relay, created["id"], 1)
    assert len(logs) == 1
    assert logs[0]["error_type"] == "overloaded_error"
    assert logs[0]["estimated"] is True
