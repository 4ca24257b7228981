"""A TinyLlama-1.1B-shaped model (22 layers, d 2048, 32 heads, 4 KV heads,
MLP 5632, vocab 32000, untied lm_head; random weights;
tests/pytorch/transformer_models.Llama) exported in bfloat16 (a model file
over 2 GiB), uploaded to a coordinator, cut into 4 stages on this machine
and queried through the KServe API, against PyTorch eager on the same cores.

    bazel build //server/coordinator:coordinator //server/stage:stage_server
    /usr/bin/python3 bench/tinyllama.py [--seq 32]

Needs about 12 GiB of memory and 7 GiB of disk in $TMPDIR.
"""
import argparse
import atexit
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, ".."))
sys.path[:0] = [HERE, os.path.join(ROOT, "client/python"), os.path.join(ROOT, "tests/pytorch")]

# The baseline runs on 2 threads: OpenBLAS's pool is sized from the
# environment when torch loads, not by torch.set_num_threads.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "2"

import numpy as np  # noqa: E402
import torch  # noqa: E402

import pipeserve  # noqa: E402
import transformer_models  # noqa: E402
from transformer import Coordinator, rss_of_children  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seq", type=int, default=32)
    a = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="pipeserve-tinyllama-")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # GiBs of model files
    torch.manual_seed(0)
    t = time.perf_counter()
    model = transformer_models.Llama(vocab=32000, d=2048, heads=32, kv_heads=4, hidden=5632,
                                     layers=22, max_len=2048, cut=False, tie=False).eval()
    for param in model.parameters():  # scaled so 22 layers stay finite
        param.data.mul_(0.5)
    model = model.to(torch.bfloat16)
    print(f"built in {time.perf_counter() - t:.0f} s: "
          f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters")
    path = os.path.join(tmp, "tinyllama_bf16.psm")
    t = time.perf_counter()
    pipeserve.export(model, (torch.randint(0, 32000, (1, 5)),), path,
                     dynamic_dims={"input_ids": [1]})
    size = os.path.getsize(path)
    print(f"exported in {time.perf_counter() - t:.0f} s: {size / 2**30:.2f} GiB")
    ids = torch.randint(0, 32000, (1, a.seq))
    torch.set_num_threads(2)
    with torch.no_grad():
        model(ids)
        t = time.perf_counter()
        ref = model(ids).float().numpy()
        torch_s = time.perf_counter() - t
    with Coordinator(tmp, timeout=1200) as c:
        client = c.client
        t = time.perf_counter()
        client.upload("tinyllama", path, num_stages=4)
        upload_s = time.perf_counter() - t
        plan = client.plan("tinyllama")
        weights = [sum(p.byte_size for p in s.graph.params) for s in plan.plan.stages]
        rss = rss_of_children(c.proc.pid)
        client.infer("tinyllama", {"input_ids": ids.numpy()})
        t = time.perf_counter()
        (logits,) = client.infer("tinyllama", {"input_ids": ids.numpy()})
        served_s = time.perf_counter() - t
        err = np.linalg.norm(logits - ref) / np.linalg.norm(ref)
        same = float(np.mean(logits[0].argmax(-1) == ref[0].argmax(-1)))
    mib = lambda xs: [round(x / 2**20) for x in sorted(xs)]  # noqa: E731
    print(f"upload + partition + deploy of {size / 2**30:.2f} GiB: {upload_s:.0f} s "
          f"({size / upload_s / 2**20:.0f} MiB/s)")
    print(f"4 stages: weights MiB {mib(weights)}; stage server RSS after load MiB "
          f"{mib(rss.values())} (bound 1.1 x weights + 64: "
          f"{mib([1.1 * w + 64 * 2**20 for w in weights])})")
    print(f"batch 1 x {a.seq} tokens: pipeserve bf16, 4 stages over gRPC {served_s:.2f} s "
          f"({a.seq / served_s:.1f} tokens/s); PyTorch eager bf16, 2 threads, in process "
          f"{torch_s:.2f} s ({a.seq / torch_s:.1f} tokens/s)")
    print(f"logits against PyTorch bf16: relative error {err:.2e}, same argmax at "
          f"{100 * same:.0f}% of positions")


if __name__ == "__main__":
    main()
