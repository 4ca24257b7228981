// OpenAI's own Node client against pipeserve's /v1 routes, for
// tests/pytorch/openai_test.py: runs what argv[2] (JSON) asks and prints
// one JSON object of what came back.
//
//   node run.mjs '{"base_url": "http://127.0.0.1:8000/v1", "model": "gpt2", ...}'
import OpenAI from "openai";

const args = JSON.parse(process.argv[2]);
const client = new OpenAI({ baseURL: args.base_url, apiKey: args.api_key ?? "none", maxRetries: 0 });
const out = {};

const completion = await client.completions.create({
  model: args.model, prompt: args.prompt, max_tokens: args.max_tokens, temperature: 0.8,
  seed: args.seed,
});
out.completion = { text: completion.choices[0].text, finish_reason: completion.choices[0].finish_reason,
                   usage: completion.usage };

const stream = await client.completions.create({
  model: args.model, prompt: args.prompt, max_tokens: args.max_tokens, temperature: 0.8,
  seed: args.seed, stream: true,
});
out.stream = { text: "", chunks: 0, finish_reason: null, usage: null };
for await (const chunk of stream) {
  out.stream.chunks += 1;
  for (const c of chunk.choices) {
    out.stream.text += c.text;
    if (c.finish_reason) out.stream.finish_reason = c.finish_reason;
  }
  if (chunk.usage) out.stream.usage = chunk.usage;
}

if (args.chat_model) {
  const messages = [{ role: "user", content: args.chat }];
  const chat = await client.chat.completions.create({
    model: args.chat_model, messages, max_tokens: args.max_tokens, temperature: 0.8, seed: args.seed,
  });
  out.chat = { content: chat.choices[0].message.content, role: chat.choices[0].message.role,
               finish_reason: chat.choices[0].finish_reason };
  const chat_stream = await client.chat.completions.create({
    model: args.chat_model, messages, max_tokens: args.max_tokens, temperature: 0.8,
    seed: args.seed, stream: true, stream_options: { include_usage: true },
  });
  out.chat_stream = { content: "", usage: null };
  for await (const chunk of chat_stream) {
    for (const c of chunk.choices) out.chat_stream.content += c.delta.content ?? "";
    if (chunk.usage) out.chat_stream.usage = chunk.usage;
  }
}

try {
  await client.completions.create({ model: "no-such-model", prompt: "x" });
  out.missing = "no error";
} catch (e) {
  out.missing = { status: e.status, message: e.message };
}

const models = await client.models.list();
out.models = models.data.map((m) => m.id).sort();

console.log(JSON.stringify(out));
