// llama.cpp CPU baseline: loads a GGUF with node-llama-cpp (prebuilt llama.cpp
// binaries from npm, never built or downloaded here), GPU off, N threads, and
// measures on token ids (no text, no tokenizer):
//   decode:  a --decode-prompt token prompt, then --tokens greedy tokens;
//            tokens/s over the tokens after the first one.
//   prefill: a fresh --prompt token prompt; time to the first generated token.
// Prints one JSON line on stdout; llama.cpp's errors (all its logs, per-step
// times and the generated ids with --verbose) go to stderr. decode_cpu_share
// and prefill_cpu_share near 1 mean the threads had their cores to themselves;
// near 0.5, something else on the machine took one and the numbers are off.
//
//   node bench.mjs MODEL.gguf [--threads 2] [--prompt 512] [--tokens 32]
//        [--decode-prompt 16] [--flash-attention auto|on|off] [--seed 0] [--verbose]
import fs from "node:fs";
import os from "node:os";
import {parseArgs} from "node:util";
import {getLlama, LlamaLogLevel} from "node-llama-cpp";

const nlcVersion = JSON.parse(fs.readFileSync(
    new URL("./node_modules/node-llama-cpp/package.json", import.meta.url), "utf8")).version;

const {values: opts, positionals} = parseArgs({
    allowPositionals: true,
    options: {
        threads: {type: "string", default: "2"},
        prompt: {type: "string", default: "512"},
        tokens: {type: "string", default: "32"},
        "decode-prompt": {type: "string", default: "16"},
        "flash-attention": {type: "string", default: "auto"},
        seed: {type: "string", default: "0"},
        verbose: {type: "boolean", default: false},
    },
});
if (positionals.length !== 1) {
    console.error("usage: node bench.mjs MODEL.gguf [--threads N] [--prompt P] [--tokens T] " +
        "[--decode-prompt D] [--flash-attention auto|on|off] [--seed S]");
    process.exit(2);
}
const modelPath = positionals[0];
const threads = parseInt(opts.threads, 10);
const prefillLen = parseInt(opts.prompt, 10);
const genTokens = parseInt(opts.tokens, 10);
const decodePromptLen = parseInt(opts["decode-prompt"], 10);
const flashAttention = {auto: "auto", on: true, off: false}[opts["flash-attention"]];
if (!(threads > 0 && prefillLen > 0 && genTokens >= 2 && decodePromptLen > 0) || flashAttention === undefined) {
    console.error("bad arguments: need threads>0, prompt>0, tokens>=2, decode-prompt>0, flash-attention auto|on|off");
    process.exit(2);
}

// llama.cpp logs at debug level while loading, kept to report the CPU
// backend variant it picks (the best libggml-cpu-<arch>.so of the prebuilt
// set) and whether "auto" flash attention came out on; warnings only once
// timing starts (everything, on stderr, with --verbose).
const logLines = [];
const llama = await getLlama({
    gpu: false,
    build: "never",            // never compile llama.cpp
    skipDownload: true,        // never fetch its sources from GitHub
    usePrebuiltBinaries: true,
    progressLogs: false,
    maxThreads: threads,
    logLevel: LlamaLogLevel.debug,
    logger(level, message) {
        logLines.push(message);
        if (opts.verbose || level === LlamaLogLevel.error || level === LlamaLogLevel.fatal)
            process.stderr.write(message.endsWith("\n") ? message : message + "\n");
    },
});
const phase = (name) => opts.verbose && process.stderr.write(`--- bench.mjs: ${name}\n`);

const model = await llama.loadModel({modelPath, gpuLayers: 0});
const nVocab = Number(model.fileInfo.metadata?.llama?.vocab_size ??
    model.fileInfo.metadata?.tokenizer?.ggml?.tokens?.length);
if (!(nVocab > 259))
    throw new Error("cannot read the vocabulary size from the GGUF");

// Random ids from the normal-piece range: above <unk>, <s>, </s> and the 256
// byte tokens, so no special or control token is fed or hit.
let rngState = (parseInt(opts.seed, 10) >>> 0) || 0x9e3779b9;
function randomToken() {
    rngState ^= rngState << 13; rngState >>>= 0;
    rngState ^= rngState >>> 17;
    rngState ^= rngState << 5; rngState >>>= 0;
    return 259 + (rngState % (nVocab - 259));
}
const randomTokens = (n) => Array.from({length: n}, randomToken);

const contextSize = Math.max(prefillLen, decodePromptLen + genTokens) + 16;
const context = await model.createContext({
    contextSize,
    batchSize: Math.max(prefillLen, decodePromptLen, 1),
    sequences: 1,
    threads: {ideal: threads, min: threads},
    flashAttention,
});
const sequence = context.getSequence();
const greedy = {temperature: 0};

// Feeds `prompt` and takes `n` greedy tokens; returns the time each arrived
// and the share of `threads` cores this process got meanwhile (ggml's
// threads spin, so about 1 unless other work on the machine took cores).
async function generate(prompt, n) {
    await sequence.clearHistory();
    const times = [];
    const out = [];
    const c0 = process.cpuUsage();
    const t0 = performance.now();
    for await (const token of sequence.evaluate(prompt, greedy)) {
        times.push(performance.now() - t0);
        out.push(token);
        if (out.length >= n)
            break;
    }
    const wallMs = performance.now() - t0;
    const c = process.cpuUsage(c0);
    return {times, out, cpuShare: (c.user + c.system) / 1000 / wallMs / threads};
}

phase("warm-up");
// Warm-up: touches every weight page (mmap) and the compute buffers.
await generate(randomTokens(Math.min(decodePromptLen, 8)), 3);
await new Promise((resolve) => setTimeout(resolve, 100)); // let queued logs arrive
if (!opts.verbose)
    llama.logLevel = LlamaLogLevel.warn;

phase("decode");
const dec = await generate(randomTokens(decodePromptLen), genTokens);
if (dec.out.length < genTokens)
    throw new Error(`generation stopped after ${dec.out.length} tokens`);
const decodeS = (dec.times[genTokens - 1] - dec.times[0]) / 1000;
const steps = dec.times.slice(1).map((t, i) => t - dec.times[i]);
const median = (xs) => {
    const s = [...xs].sort((a, b) => a - b);
    return (s[(s.length - 1) >> 1] + s[s.length >> 1]) / 2;
};
if (opts.verbose)
    process.stderr.write("--- bench.mjs: generated ids: " + dec.out.join(" ") + "\n");
if (opts.verbose)
    process.stderr.write("--- bench.mjs: decode step ms: " + steps.map((t) => t.toFixed(1)).join(" ") + "\n");

phase("prefill");
const pre = await generate(randomTokens(prefillLen), 1);
const ttftMs = pre.times[0];

phase("done");
const lastMatch = (re) => logLines.map((l) => l.match(re)).filter(Boolean).pop();
const backend = lastMatch(/loaded CPU backend from (\S+)/);
const fa = lastMatch(/flash attention\b.*?\b(enabled|disabled)\b/i);
const result = {
    decode_tok_s: (genTokens - 1) / decodeS,
    prefill_tok_s: prefillLen / (ttftMs / 1000),
    ttft_ms: ttftMs,
    threads,
    llama_cpp_build: `${llama.llamaCppRelease.repo}@${llama.llamaCppRelease.release}` +
        ` (${llama.buildType}, node-llama-cpp ${nlcVersion})`,
    cpu_backend: backend ? backend[1].replace(/^.*\//, "") : null,
    flash_attention: fa ? fa[1] === "enabled" : context.flashAttention,
    decode_prompt: decodePromptLen,
    decode_tokens: genTokens,
    prefill_tokens: prefillLen,
    context_size: context.contextSize,
    batch_size: context.batchSize,
    // A slow step now and then means the 2 threads lost their cores to
    // something else on the machine: then this sits well above the mean's.
    decode_step_ms_median: median(steps),
    decode_cpu_share: dec.cpuShare,
    prefill_cpu_share: pre.cpuShare,
    first_decode_token_ms: dec.times[0],
    cpus: os.cpus().length,
};
console.log(JSON.stringify(result));

await context.dispose();
await model.dispose();
await llama.dispose();
