"""The demo's client side: sends ExampleCode inputs through a running
coordinator with pipeserve.Client (the KServe v2 API), compares the result
with PyTorch's, and measures latency and throughput.

    /usr/bin/python3 tools/demo_client.py ADDRESS MODEL CASE_DIR

CASE_DIR is written by tests/pytorch/make_fixtures.py. Exits 1 if the
outputs disagree (see tools/compare_outputs.py for the rule).
"""
import concurrent.futures
import os
import statistics
import sys
import time

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, "..", "client", "python"))
sys.path.insert(0, _HERE)

import pipeserve  # noqa: E402
from compare_outputs import ratio  # noqa: E402


def main(address, model, case_dir):
    client = pipeserve.Client(address)
    x = np.load(os.path.join(case_dir, "in_x.npy"))
    y = np.load(os.path.join(case_dir, "in_y.npy"))
    torch32 = np.load(os.path.join(case_dir, "out_0.npy")).astype(np.float64)
    exact = (np.load(os.path.join(case_dir, "out64hi_0.npy")).astype(np.float64)
             + np.load(os.path.join(case_dir, "out64lo_0.npy")))

    (out,) = client.infer(model, {"x": x, "y": y})
    ours_err, torch_err = ratio(out.astype(np.float64), exact), ratio(torch32, exact)
    good = out.shape == torch32.shape and ours_err <= max(1.0, 2.0 * torch_err)
    print(f"output {list(out.shape)}: max |pipeserve - PyTorch| = "
          f"{np.max(np.abs(out - torch32)):.3g} (max |value| {np.max(np.abs(exact)):.3g}); "
          f"error vs float64 in assert_close allowances: pipeserve {ours_err:.3g}, "
          f"PyTorch {torch_err:.3g} -> {'OK' if good else 'MISMATCH'}")

    batch = x.shape[0]
    latencies = []
    for _ in range(20):
        t0 = time.perf_counter()
        client.infer(model, {"x": x, "y": y})
        latencies.append((time.perf_counter() - t0) * 1e3)
    print(f"latency, one client, batch {batch}: median {statistics.median(latencies):.2f} ms, "
          f"p90 {sorted(latencies)[int(0.9 * len(latencies)) - 1]:.2f} ms")

    requests, clients = 64, 8
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(lambda _: client.infer(model, {"x": x, "y": y}), range(requests)))
    dt = time.perf_counter() - t0
    print(f"throughput, {clients} clients x {requests // clients} requests: "
          f"{requests / dt:.1f} requests/s, {requests * batch / dt:.0f} rows/s")
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
