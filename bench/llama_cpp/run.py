"""llama.cpp baseline for bench/generation.py: writes a random-weight Llama
GGUF (gguf_writer.py) to a temporary folder, runs bench.mjs on it with
node-llama-cpp's prebuilt CPU llama.cpp, and returns its JSON result.

One-time setup (the npm registry only; llama.cpp is neither downloaded from
GitHub nor built):

    cd bench/llama_cpp && npm ci

    /usr/bin/python3 bench/llama_cpp/run.py --shape small --dtype f16
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from gguf_writer import write_llama_gguf  # noqa: E402

SHAPES = {
    "small": dict(vocab=32000, d=512, heads=8, kv_heads=2, hidden=1408, layers=8),
    "tinyllama": dict(vocab=32000, d=2048, heads=32, kv_heads=4, hidden=5632, layers=22),
}

# Accepts the torch spellings generation.py uses as well.
_DTYPES = {"f16": "f16", "float16": "f16", "bf16": "bf16", "bfloat16": "bf16"}


def llama_cpp(shape, dtype, prompt, tokens, threads=2, decode_prompt=16,
              flash_attention="auto", timeout=600, seed=0):
    """llama.cpp decode tokens/s (a decode_prompt-token prompt, then `tokens`
    greedy tokens, timing those after the first) and prefill of a
    `prompt`-token prompt (time to first token), on `threads` threads.

    Returns bench.mjs's dict (decode_tok_s, prefill_tok_s, ttft_ms, threads,
    llama_cpp_build, ...) or None, after printing why, when it cannot run.
    """
    node = shutil.which("node")
    if node is None:
        print("llama.cpp baseline skipped: `node` not found on PATH")
        return None
    if not os.path.isdir(os.path.join(HERE, "node_modules", "node-llama-cpp")):
        print("llama.cpp baseline skipped: no node_modules; run `npm ci` in bench/llama_cpp")
        return None
    gguf_dtype = _DTYPES.get(str(dtype).replace("torch.", ""))
    if gguf_dtype is None:
        print("llama.cpp baseline skipped: dtype %r is not f16 or bf16" % (dtype,))
        return None

    tmp = tempfile.mkdtemp(prefix="llama_cpp_bench_")
    try:
        path = os.path.join(tmp, "model-%s.gguf" % gguf_dtype)
        t0 = time.time()
        size = write_llama_gguf(path, shape, gguf_dtype, seed=seed)
        print("llama.cpp: wrote %.2f GB GGUF (%s) in %.1f s"
              % (size / 1e9, gguf_dtype, time.time() - t0), flush=True)
        cmd = [node, os.path.join(HERE, "bench.mjs"), path,
               "--threads", str(threads), "--prompt", str(prompt),
               "--tokens", str(tokens), "--decode-prompt", str(decode_prompt),
               "--flash-attention", flash_attention, "--seed", str(seed)]
        env = dict(os.environ, NODE_LLAMA_CPP_SKIP_DOWNLOAD="true")
        try:
            p = subprocess.run(cmd, cwd=HERE, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, universal_newlines=True,
                               timeout=timeout)
        except subprocess.TimeoutExpired:
            print("llama.cpp baseline failed: bench.mjs ran past %d s" % timeout)
            return None
        if p.returncode != 0:
            print("llama.cpp baseline failed (exit %d):\n%s"
                  % (p.returncode, p.stderr.strip()[-3000:]))
            return None
        lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
        if not lines:
            print("llama.cpp baseline failed: no JSON from bench.mjs:\n%s%s"
                  % (p.stdout[-2000:], p.stderr[-2000:]))
            return None
        return json.loads(lines[-1])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="llama.cpp baseline on a random-weight Llama")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--dtype", choices=["f16", "bf16"], default="f16")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--flash-attention", choices=["auto", "on", "off"], default="auto")
    a = ap.parse_args()
    r = llama_cpp(SHAPES[a.shape], a.dtype, a.prompt, a.tokens, a.threads,
                  flash_attention=a.flash_attention)
    print(json.dumps(r))
    sys.exit(0 if r else 1)
