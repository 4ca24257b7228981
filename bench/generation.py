"""Generation: a Llama-style model (tests/pytorch/transformer_models.Llama,
random weights) exported with generation=True, cut into 4 stages on this
machine and asked for tokens through pipeserve.Client.generate, against
PyTorch eager decoding with a KV cache (the reference loop below, on the
same 2 threads) and the memory-bandwidth bound measured in the same run
(bytes of weights read per token / read bandwidth of 2 threads).

    bazel build -c opt //server/coordinator:coordinator //server/stage:stage_server \
        //bench:read_bandwidth
    /usr/bin/python3 bench/generation.py [--shape small|tinyllama] [--dtype bfloat16]
        [--llama_cpp] [--hops]

Prints the CPU, then one table: single-sequence decode tokens/s, time to
first token of a --prompt-token prompt (median of 3, after a warm-up), and
tokens/s of --batch sequences
at once, for PyTorch, pipeserve with the model in 4 stages and uncut, and
with --llama_cpp llama.cpp in F16 and BF16 (npm node-llama-cpp: run
`npm ci` in bench/llama_cpp first). Checks that pipeserve generates
PyTorch's greedy tokens. --hops adds what the stage hops cost per token on
a GPT-2-small-shaped model (4 stages against uncut, float32).
"""
import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, ".."))
sys.path[:0] = [HERE, os.path.join(ROOT, "client/python"), os.path.join(ROOT, "tests/pytorch")]

# The baseline runs on 2 threads: OpenBLAS's pool is sized from the
# environment when torch loads, not by torch.set_num_threads.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "2"

import torch  # noqa: E402

import pipeserve  # noqa: E402
import transformer_models  # noqa: E402
from transformer import Coordinator, rss_of_children  # noqa: E402

SHAPES = {
    "small": dict(vocab=32000, d=512, heads=8, kv_heads=2, hidden=1408, layers=8),
    "tinyllama": dict(vocab=32000, d=2048, heads=32, kv_heads=4, hidden=5632, layers=22),
}


# The 4 stage servers share this machine's cores: by default a generation
# model's stages then take turns (one step in flight, every stage on all
# cores). The second row computes decode steps with oneDNN's GEMM instead
# of pipeserve's AVX512-BF16 loop (runtime/cpu/gemv_bf16.h); the third is
# the model uncut, on one stage server: the difference is what the stage
# hops cost. (name, stages, environment of the servers)
CONFIGS = [
    ("pipeserve, 4 stages", 4, {}),
    ("pipeserve, 4 stages, oneDNN only", 4, {"PIPESERVE_GEMV": "onednn"}),
    ("pipeserve, 1 stage", 1, {}),
]


def cpu_model():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def read_bandwidth():
    """GB/s 2 threads read: the larger of PyTorch summing 1 GiB of float32
    and bench/read_bandwidth (64-byte loads, 8 lanes), medians; with how
    each measured."""
    x = torch.ones(1 << 28)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    by_torch = x.numel() * 4 / sorted(times)[2] / 1e9
    del x
    tool = os.path.join(ROOT, "bazel-bin/bench/read_bandwidth")
    by_tool = float("nan")
    if os.path.exists(tool):
        by_tool = float(subprocess.run([tool, "--threads", "2"], capture_output=True, text=True,
                                       check=True).stdout)
    how = f"torch sum {by_torch:.1f} GB/s, bench/read_bandwidth {by_tool:.1f} GB/s"
    return max(by_torch, by_tool if by_tool == by_tool else 0), how


class TorchDecoder:
    """PyTorch eager decoding with a KV cache over the model's own modules:
    each step runs the new tokens only, attending over the cached keys and
    values (concatenated along the sequence)."""

    def __init__(self, model):
        self.m = model

    def step(self, ids, start, cache):
        m = self.m
        b, t = ids.shape
        x = m.embed_tokens(ids)
        cos, sin = m.cos_cached[start:start + t], m.sin_cached[start:start + t]
        for i, layer in enumerate(m.layers):
            a = layer.self_attn
            h = layer.input_layernorm(x)
            q = a.q_proj(h).view(b, t, a.heads, a.hd).transpose(1, 2)
            k = a.k_proj(h).view(b, t, a.kv_heads, a.hd).transpose(1, 2)
            v = a.v_proj(h).view(b, t, a.kv_heads, a.hd).transpose(1, 2)
            q = q * cos + transformer_models.rotate_half(q) * sin
            k = k * cos + transformer_models.rotate_half(k) * sin
            if cache[i] is not None:
                k, v = torch.cat((cache[i][0], k), 2), torch.cat((cache[i][1], v), 2)
            cache[i] = (k, v)
            rep = a.heads // a.kv_heads
            kk, vv = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
            att = torch.matmul(q, kk.transpose(2, 3)) / math.sqrt(a.hd)
            if t > 1:  # causal within the new tokens, aligned to the end
                att = att + torch.full((t, start + t), float("-inf")).triu(start + 1)
            att = torch.softmax(att.float(), -1).type_as(q)
            y = torch.matmul(att, vv).transpose(1, 2).reshape(b, t, -1)
            x = x + a.o_proj(y)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return m.lm_head(m.norm(x[:, -1:]))[:, 0].float()

    def generate(self, prompts, n):
        """Greedy tokens for equal-length prompts [B, P]; (tokens, time to
        first token, seconds for the rest)."""
        cache = [None] * len(self.m.layers)
        with torch.no_grad():
            t0 = time.perf_counter()
            nxt = self.step(prompts, 0, cache).argmax(-1)
            first = time.perf_counter() - t0
            out = [nxt]
            for i in range(1, n):
                nxt = self.step(nxt[:, None], prompts.shape[1] + i - 1, cache).argmax(-1)
                out.append(nxt)
            rest = time.perf_counter() - t0 - first
        return torch.stack(out, 1), first, rest


def served(client, prompts, n):
    """Greedy tokens of each prompt, generated at once; (tokens, mean time
    to first token, wall seconds after the last first token)."""
    results, firsts = [None] * len(prompts), [None] * len(prompts)
    t0 = time.perf_counter()

    def run(i):
        tokens = []
        for tok in client.generate("m", prompts[i], max_tokens=n):
            if not tokens:
                firsts[i] = time.perf_counter()
            tokens.append(tok)
        results[i] = tokens

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    end = time.perf_counter()
    return results, sum(f - t0 for f in firsts) / len(firsts), end - max(firsts)


def export(model, path, stages, layer_prefix, layers):
    """Exports `model` for generation, cut before evenly spaced layers."""
    split = {f"{layer_prefix}.{layers * i // stages}": pipeserve.SplitPoint.BEGINNING
             for i in range(1, stages)}
    pipeserve.export(model, (torch.randint(0, 100, (1, 5)),), path, generation=True,
                     split_spec=split)


def warm_ttft(first_token_s, prompts):
    """The median time to first token over prompts[1:], after prompts[0]
    (first runs of a shape pay for kernels made and memory first touched)."""
    first_token_s(prompts[0])
    return sorted(first_token_s(p) for p in prompts[1:])[(len(prompts) - 1) // 2]


def torch_row(model, one, long, many, tokens):
    """(name, 1-sequence tok/s, TTFT s, many-sequence tok/s), and the
    greedy tokens of `one`."""
    dec = TorchDecoder(model)
    ref, _, _ = dec.generate(one, tokens)
    _, _, rest = dec.generate(one, tokens)
    ttft = warm_ttft(lambda prompt: dec.generate(prompt[None], 1)[1], long)
    _, _, rest_n = dec.generate(many, tokens)
    return ("PyTorch eager + KV cache, 2 threads", (tokens - 1) / rest, ttft,
            many.shape[0] * (tokens - 1) / rest_n), ref[0].tolist()


def served_row(name, home, path, one, long, many, tokens):
    """The same figures from a coordinator serving `path`; and whether
    its greedy tokens of `one` (first run) were `ref`."""
    os.makedirs(home)
    with Coordinator(home, timeout=1200) as c:
        c.client.upload("m", path)
        got, _, _ = served(c.client, one.tolist(), tokens)
        _, _, rest = served(c.client, one.tolist(), tokens)
        ttft = warm_ttft(lambda prompt: served(c.client, [prompt.tolist()], 1)[1], long)
        _, _, rest_n = served(c.client, many.tolist(), tokens)
        print_rss(name, c)
    return (name, (tokens - 1) / rest, ttft, many.shape[0] * (tokens - 1) / rest_n), got[0]


def print_rss(name, c, cache_mib=256):
    """Each stage server's RSS after the runs, against its weights + its KV
    cache budget (--kv_cache_mb, 256 MiB by default) + 64 MiB, largest with
    largest (which server holds which stage is not known here)."""
    plan = c.client.plan("m")
    weights = sorted(sum(p.byte_size for p in s.graph.params) for s in plan.plan.stages)
    rss = sorted(rss_of_children(c.proc.pid).values())[-len(weights):]
    bounds = [w + (cache_mib + 64) * 2**20 for w in weights]
    print(f"{name}: stage servers' RSS {[r >> 20 for r in rss]} MiB; weights + {cache_mib} MiB "
          f"cache + 64 MiB {[b >> 20 for b in bounds]} MiB; within: "
          f"{all(r <= b for r, b in zip(rss, bounds))}")


def llama_cpp_rows(shape, prompt, tokens):
    """llama.cpp (npm node-llama-cpp) on the same shape, F16 and BF16, 2
    threads; none when it is not installed (`npm ci` in bench/llama_cpp)."""
    try:
        from llama_cpp.run import llama_cpp
    except ImportError as e:
        print(f"llama.cpp: not run ({e})")
        return []
    rows = []
    for dtype in ("f16", "bf16"):
        r = llama_cpp(SHAPES[shape], dtype, prompt, tokens, threads=2)
        if r is not None:
            rows.append((f"llama.cpp {dtype.upper()}, 2 threads", r["decode_tok_s"],
                         r["ttft_ms"] / 1000, float("nan")))
    return rows


def print_table(rows, bound, a):
    print(f"| {'':38} | 1 sequence tok/s (% of bound) | TTFT {a.prompt} tokens | "
          f"{a.batch} sequences tok/s |")
    print("| --- | --- | --- | --- |")
    for name, t1_, ttft_, tn_ in rows:
        print(f"| {name:38} | {t1_:8.2f} ({100 * t1_ / bound:4.0f}%) | {ttft_ * 1000:8.0f} ms |"
              f" {tn_:8.1f} |")
    base = rows[0]
    for row in rows[1:]:
        if row[0].startswith("pipeserve"):
            print(f"{row[0]} / PyTorch: 1 sequence {row[1] / base[1]:.2f}x, TTFT "
                  f"{base[2] / row[2]:.2f}x faster, {a.batch} sequences "
                  f"{row[3] / base[3]:.2f}x; {a.batch} sequences / 1 sequence "
                  f"{row[3] / row[1]:.1f}x")


def hop_cost(tmp, tokens):
    """GPT-2-small-shaped (float32), one sequence: seconds per token cut
    into 4 stages and uncut; the difference is what the hops cost."""
    torch.manual_seed(0)
    model = transformer_models.Gpt2(vocab=50257, d=768, heads=12, layers=12, max_len=1024,
                                    cut=False).eval()
    one = torch.randint(0, 50257, (1, 16))
    per_token = {}
    for stages in (1, 4):
        path = os.path.join(tmp, f"gpt2-{stages}.psm")
        export(model, path, stages, "h", 12)
        home = os.path.join(tmp, f"gpt2-{stages}")
        os.makedirs(home)
        with Coordinator(home, timeout=1200) as c:
            c.client.upload("m", path)
            runs = []
            for _ in range(5):
                _, _, rest = served(c.client, one.tolist(), tokens)
                runs.append(rest / (tokens - 1))
        per_token[stages] = sorted(runs)[2]
    hops = per_token[4] - per_token[1]
    print(f"GPT-2-small shape, float32, 1 sequence, median of 5 runs of {tokens} tokens: "
          f"{per_token[1] * 1000:.2f} ms per token uncut, {per_token[4] * 1000:.2f} ms in 4 "
          f"stages; the 3 hops add {hops * 1000:.2f} ms ({100 * hops / per_token[4]:.1f}% of "
          f"the per-token time)")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", choices=sorted(SHAPES), default="small")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--llama_cpp", action="store_true", help="add llama.cpp's rows")
    p.add_argument("--hops", action="store_true", help="also measure the hop cost (GPT-2 small)")
    a = p.parse_args()
    torch.set_num_threads(2)
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; shape {a.shape}, {a.dtype}")
    torch.manual_seed(0)
    model = transformer_models.Llama(**SHAPES[a.shape], max_len=2048, cut=False, tie=False).eval()
    for param in model.parameters():  # scaled so deep stacks stay finite
        param.data.mul_(0.5)
    model = model.to(getattr(torch, a.dtype))
    weights = sum(q.numel() * q.element_size() for name, q in model.named_parameters()
                  if not name.startswith("embed_tokens"))  # one embedding row per token
    bandwidth, how = read_bandwidth()
    torch.manual_seed(1)
    one = torch.randint(0, 32000, (1, 16))
    long = torch.randint(0, 32000, (4, a.prompt))  # a warm-up, then 3 timed
    many = torch.randint(0, 32000, (a.batch, 16))
    base, ref = torch_row(model, one, long, many, a.tokens)
    rows, same = [base], True
    tmp = tempfile.mkdtemp(prefix="pipeserve-generation-")
    try:
        for i, (name, stages, env) in enumerate(CONFIGS):
            path = os.path.join(tmp, f"m{stages}.psm")
            if not os.path.exists(path):
                export(model, path, stages, "layers", SHAPES[a.shape]["layers"])
            os.environ.update(env)  # the coordinator's stage servers inherit it
            try:
                row, got = served_row(name, os.path.join(tmp, f"config{i}"), path, one, long,
                                      many, a.tokens)
            finally:
                for var in env:
                    del os.environ[var]
            rows.append(row)
            same = same and got == ref
        if a.llama_cpp:
            rows += llama_cpp_rows(a.shape, a.prompt, a.tokens)
        bound = bandwidth * 1e9 / weights
        print(f"weights read per token {weights / 1e9:.3f} GB; read bandwidth (2 threads) "
              f"{bandwidth:.1f} GB/s ({how}); bound {bound:.1f} tokens/s; greedy tokens "
              f"equal: {same}")
        print_table(rows, bound, a)
        if a.hops:
            hop_cost(tmp, a.tokens)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
