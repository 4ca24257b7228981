// GPT-2's BPE as npm gpt-3-encoder encodes it: reads JSON lines
// {"text": "..."} on stdin, prints {"text": ..., "ids": [...]} for each, and
// fails (exit 1) when decode(encode(text)) is not the text.
//   npm ci && node oracle.js < inputs.jsonl
const { encode, decode } = require('gpt-3-encoder');
const readline = require('readline');
const rl = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
let bad = 0;
rl.on('line', (line) => {
  if (!line.trim()) return;
  const { text } = JSON.parse(line);
  const ids = encode(text);
  if (decode(ids) !== text) {
    bad++;
    process.stderr.write('round trip failed: ' + JSON.stringify(text) + '\n');
  }
  process.stdout.write(JSON.stringify({ text, ids }) + '\n');
});
rl.on('close', () => { process.exitCode = bad ? 1 : 0; });
