"""What a served model costs in memory, against its weights: each stage
server's resident memory once loaded (target: at most 1.1 x its weights +
64 MiB) and the coordinator's peak while it takes the upload and deploys
it (target: under 256 MiB whatever the model's size).

    bazel build -c opt //server/coordinator:coordinator //server/stage:stage_server
    /usr/bin/python3 bench/memory.py --gib 4

Builds an MLP of 8192-wide float32 layers (bias-free Linear + ReLU) that
weighs --gib GiB, exports it, uploads it to a coordinator with the local
launcher cut into 4 stages, runs one request, and prints a table. The
coordinator's peak is its VmHWM (the kernel's high-water mark of resident
memory, start-up included).
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
sys.path[:0] = [HERE, os.path.join(ROOT, "client/python")]

import numpy as np  # noqa: E402
import torch  # noqa: E402

import pipeserve  # noqa: E402
from transformer import Coordinator, rss_of_children  # noqa: E402

MIB = 1 << 20
WIDTH = 8192


def status_kib(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--gib", type=float, default=4)
    p.add_argument("--stages", type=int, default=4)
    a = p.parse_args()
    layers = max(a.stages, round(a.gib * (1 << 30) / (WIDTH * WIDTH * 4)))
    tmp = tempfile.mkdtemp(prefix="pipeserve-memory-")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # GiBs of model files
    path = os.path.join(tmp, "mlp.psm")
    t = time.perf_counter()
    mods = []
    with torch.no_grad():
        for _ in range(layers):
            lin = torch.nn.Linear(WIDTH, WIDTH, bias=False)
            lin.weight.normal_(0, 1 / WIDTH ** 0.5)
            mods += [lin, torch.nn.ReLU()]
    model = torch.nn.Sequential(*mods).eval()
    pipeserve.export(model, (torch.randn(2, WIDTH),), path)
    size = os.path.getsize(path)
    print(f"{layers} layers of {WIDTH}x{WIDTH} float32: {size / (1 << 30):.2f} GiB file, "
          f"built and exported in {time.perf_counter() - t:.0f} s")
    x = torch.randn(3, WIDTH)
    with torch.no_grad():
        want = model(x).numpy()
    del model, mods

    with Coordinator(tmp) as c:
        t = time.perf_counter()
        c.client.upload("mlp", path, num_stages=a.stages)
        took = time.perf_counter() - t
        coord_peak = status_kib(c.proc.pid, "VmHWM")
        coord_now = status_kib(c.proc.pid, "VmRSS")
        plan = c.client.plan("mlp")
        weights = [sum(q.byte_size for q in s.graph.params) for s in plan.plan.stages]
        rss = rss_of_children(c.proc.pid)
        (out,) = c.client.infer("mlp", [x.numpy()])
        err = float(np.abs(out - want).max() / max(1e-30, np.abs(want).max()))
        rss_after = rss_of_children(c.proc.pid)

    print(f"uploaded and deployed in {took:.1f} s; one request's max error "
          f"{err:.1e} of the largest output")
    print(f"\n{'':28} {'weights MiB':>12} {'RSS MiB':>9} {'bound MiB':>10} {'RSS / bound':>12}")
    # Stage servers in pid order are the launcher's slots 0..n-1: stage i.
    pids = sorted(rss)
    for i, w in enumerate(weights):
        r = rss[pids[i]] if i < len(pids) else 0
        bound = 1.1 * w + 64 * MIB
        print(f"{'stage ' + str(i) + ' after load':28} {w / MIB:12.0f} {r / MIB:9.0f} "
              f"{bound / MIB:10.0f} {r / bound:12.2f}")
    print(f"{'stage servers after a request':28} {sum(weights) / MIB:12.0f} "
          f"{sum(rss_after.values()) / MIB:9.0f}")
    print(f"{'coordinator peak (VmHWM)':28} {size / MIB:12.0f} {coord_peak / MIB:9.0f} "
          f"{256:10.0f} {coord_peak / (256 * MIB):12.2f}   (model file size; target < 256 MiB)")
    print(f"{'coordinator after deploy':28} {'':12} {coord_now / MIB:9.0f}")
    os.remove(path)


if __name__ == "__main__":
    main()
