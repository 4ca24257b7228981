"""Generation: a Llama-style model (tests/pytorch/transformer_models.Llama,
random weights) exported with generation=True, cut into 4 stages on this
machine and asked for tokens through pipeserve.Client.generate, against
PyTorch eager decoding with a KV cache (the reference loop below, on the
same 2 threads) and the memory-bandwidth bound measured in the same run
(bytes of weights read per token / read bandwidth of 2 threads).

    bazel build -c opt //server/coordinator:coordinator //server/stage:stage_server
    /usr/bin/python3 bench/generation.py [--shape small|tinyllama] [--dtype bfloat16]

Prints the CPU, then one table: single-sequence decode tokens/s, time to
first token of a --prompt-token prompt, and tokens/s of --batch sequences
at once. Checks that both sides generate the same greedy tokens first.
"""
import argparse
import math
import os
import shutil
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
from transformer import Coordinator  # noqa: E402

SHAPES = {
    "small": dict(vocab=32000, d=512, heads=8, kv_heads=2, hidden=1408, layers=8),
    "tinyllama": dict(vocab=32000, d=2048, heads=32, kv_heads=4, hidden=5632, layers=22),
}


# The 4 stage servers share this machine's cores. By default the coordinator
# keeps stages + 1 steps in flight (right when each stage has its own
# machine) and gives each stage cores / stages threads; the second row runs
# one step at a time with every stage on 2 threads.
CONFIGS = [
    ("pipeserve, 4 stages, defaults", ()),
    ("pipeserve, 4 stages, 1 step, 2 threads", ("--generation_steps_in_flight=1", "--cores=8")),
]


def cpu_model():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def read_bandwidth():
    """GB/s of 2 threads summing 1 GiB (median of 5)."""
    x = torch.ones(1 << 28)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    return x.numel() * 4 / sorted(times)[2] / 1e9


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


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", choices=sorted(SHAPES), default="small")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--batch", type=int, default=32)
    a = p.parse_args()
    torch.set_num_threads(2)
    dtype = getattr(torch, a.dtype)
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; shape {a.shape}, {a.dtype}")
    torch.manual_seed(0)
    model = transformer_models.Llama(**SHAPES[a.shape], max_len=2048, cut=False, tie=False).eval()
    for param in model.parameters():  # scaled so deep stacks stay finite
        param.data.mul_(0.5)
    model = model.to(dtype)
    weights = sum(q.numel() * q.element_size() for name, q in model.named_parameters()
                  if not name.startswith("embed_tokens"))  # one embedding row per token
    bandwidth = read_bandwidth()
    tmp = tempfile.mkdtemp(prefix="pipeserve-generation-")
    try:
        path = os.path.join(tmp, "m.psm")
        split = {f"layers.{SHAPES[a.shape]['layers'] * i // 4}": pipeserve.SplitPoint.BEGINNING
                 for i in (1, 2, 3)}
        pipeserve.export(model, (torch.randint(0, 32000, (1, 5)),), path, generation=True,
                         split_spec=split)
        torch.manual_seed(1)
        one = torch.randint(0, 32000, (1, 16))
        long = torch.randint(0, 32000, (1, a.prompt))
        many = torch.randint(0, 32000, (a.batch, 16))
        dec = TorchDecoder(model)
        ref, _, _ = dec.generate(one, a.tokens)
        rows = []
        _, _, rest = dec.generate(one, a.tokens)
        t1 = (a.tokens - 1) / rest
        _, ttft, _ = dec.generate(long, 1)
        _, first, rest = dec.generate(many, a.tokens)
        tn = a.batch * (a.tokens - 1) / rest
        rows.append(("PyTorch eager + KV cache, 2 threads", t1, ttft, tn))
        same = True
        for i, (name, flags) in enumerate(CONFIGS):
            home = os.path.join(tmp, f"config{i}")  # its own repository
            os.makedirs(home)
            with Coordinator(home, timeout=1200, flags=flags) as c:
                c.client.upload("m", path)
                got, _, _ = served(c.client, one.tolist(), a.tokens)
                same = same and got[0] == ref[0].tolist()
                _, _, rest = served(c.client, one.tolist(), a.tokens)
                s1 = (a.tokens - 1) / rest
                _, sttft, _ = served(c.client, long.tolist(), 1)
                _, _, rest = served(c.client, many.tolist(), a.tokens)
                sn = a.batch * (a.tokens - 1) / rest
            rows.append((name, s1, sttft, sn))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    bound = bandwidth * 1e9 / weights
    print(f"weights read per token {weights / 1e9:.3f} GB; read bandwidth (2 threads) "
          f"{bandwidth:.1f} GB/s; bound {bound:.1f} tokens/s; greedy tokens equal: {same}")
    print(f"| {'':38} | 1 sequence tok/s (% of bound) | TTFT {a.prompt} tokens | "
          f"{a.batch} sequences tok/s |")
    print("| --- | --- | --- | --- |")
    for name, t1_, ttft_, tn_ in rows:
        print(f"| {name:38} | {t1_:8.2f} ({100 * t1_ / bound:4.0f}%) | {ttft_ * 1000:8.0f} ms |"
              f" {tn_:8.1f} |")
    for row in rows[1:]:
        print(f"{row[0]} / PyTorch: 1 sequence {row[1] / rows[0][1]:.2f}x, TTFT "
              f"{rows[0][2] / row[2]:.2f}x faster, {a.batch} sequences "
              f"{row[3] / rows[0][3]:.2f}x")


if __name__ == "__main__":
    main()
