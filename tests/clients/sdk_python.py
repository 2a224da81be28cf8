"""One non-streamed and one streamed message through the relay with the
`anthropic` package of the interpreter running it (test_real_clients.py runs
it in each pinned SDK's virtualenv); prints what the SDK saw as one JSON line.

Usage: python sdk_python.py BASE_URL KEY MODEL"""

import json
import sys

import anthropic


def seen(message, text):
    usage = message.usage
    return {
        "text": text,
        "model": message.model,
        "usage": {
            "input_tokens": usage.input_tokens,
            "output_tokens": usage.output_tokens,
            "cache_creation_input_tokens": usage.cache_creation_input_tokens or 0,
            "cache_read_input_tokens": usage.cache_read_input_tokens or 0,
        },
    }


def main():
    base_url, key, model = sys.argv[1:4]
    # No retries: a refused request must fail the test, not be hidden by a second try.
    client = anthropic.Anthropic(base_url=base_url, api_key=key, max_retries=0)
    plain = client.messages.create(
        model=model, max_tokens=5, messages=[{"role": "user", "content": "say hello"}]
    )
    with client.messages.stream(
        model=model, max_tokens=9, messages=[{"role": "user", "content": "say hello, streamed"}]
    ) as stream:
        text = "".join(stream.text_stream)
        streamed = stream.get_final_message()
    print(
        json.dumps(
            {
                "version": anthropic.__version__,
                "plain": seen(plain, "".join(b.text for b in plain.content if b.type == "text")),
                "streamed": seen(streamed, text),
            },
            ensure_ascii=False,
        )
    )


if __name__ == "__main__":
    main()
