// One streamed message through the relay with the @anthropic-ai/sdk installed
// in INSTALL_DIR (test_real_clients.py runs it once per pinned SDK version);
// prints what the SDK saw as one JSON line.
//
// Usage: node sdk_js.cjs INSTALL_DIR BASE_URL KEY MODEL

const { createRequire } = require('node:module');
const path = require('node:path');

const [installDir, baseURL, apiKey, model] = process.argv.slice(2);
// Resolve the SDK from its install dir, not from this script's location.
const fromInstall = createRequire(path.join(path.resolve(installDir), 'package.json'));
const sdk = fromInstall('@anthropic-ai/sdk');
const Anthropic = sdk.default ?? sdk.Anthropic;

async function main() {
  // No retries: a refused request must fail the test, not be hidden by a second try.
  const client = new Anthropic({ baseURL, apiKey, maxRetries: 0 });
  const stream = client.messages.stream({
    model,
    max_tokens: 7,
    messages: [{ role: 'user', content: 'say hello, streamed' }],
  });
  let text = '';
  stream.on('text', (delta) => {
    text += delta;
  });
  const message = await stream.finalMessage();
  const usage = message.usage;
  process.stdout.write(
    JSON.stringify({
      text,
      model: message.model,
      usage: {
        input_tokens: usage.input_tokens,
        output_tokens: usage.output_tokens,
        cache_creation_input_tokens: usage.cache_creation_input_tokens ?? 0,
        cache_read_input_tokens: usage.cache_read_input_tokens ?? 0,
      },
    }) + '\n',
  );
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
