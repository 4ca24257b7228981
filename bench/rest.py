"""KServe v2 REST (--http_port, JSON) against gRPC (the Python client) on
the same coordinator, in the same run: requests per second for a small
request (an 8-wide MLP, 1 row), one at a time and with 8 in flight, and
the bytes per second of a 4 MiB FP32 tensor (JSON: the binary extension
is not served yet). Both clients are Python, so both rates include their
client's cost.

    bazel build -c opt //server/coordinator:coordinator //server/stage:stage_server
    /usr/bin/python3 bench/rest.py [--seconds 5]
"""
import argparse
import http.client
import json
import os
import sys
import tempfile
import threading
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..", "client", "python")]

import pipeserve  # noqa: E402
from generation import cpu_model  # noqa: E402
from transformer import Coordinator  # noqa: E402


class Mlp(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.net1 = torch.nn.Linear(d, d)
        self.net2 = torch.nn.Linear(d, d)

    def forward(self, x):
        return self.net2(torch.relu(self.net1(x)))


def rate(call, seconds, threads):
    """Calls per second of `call` from `threads` threads for `seconds`."""
    done = [0] * threads
    end = time.time() + seconds

    def loop(i):
        while time.time() < end:
            call()
            done[i] += 1

    ts = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    start = time.time()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sum(done) / (time.time() - start)


def rest_caller(port, model, name, array):
    body = json.dumps({"inputs": [{"name": name, "datatype": "FP32", "shape": list(array.shape),
                                   "data": array.ravel().tolist()}]})
    local = threading.local()

    def call():
        if not hasattr(local, "conn"):
            local.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        local.conn.request("POST", f"/v2/models/{model}/infer", body,
                           {"Content-Type": "application/json"})
        resp = local.conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise RuntimeError(data)
        json.loads(data)
    return call


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=5)
    a = p.parse_args()
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores")
    tmp = tempfile.mkdtemp(prefix="pipeserve-rest-")
    with Coordinator(tmp, flags=["--http_port=0", f"--http_port_file={tmp}/http_port"]) as c:
        port = int(open(f"{tmp}/http_port").read())
        for name, d in (("small", 8), ("wide", 1024)):
            path = os.path.join(tmp, f"{name}.psm")
            pipeserve.export(Mlp(d).eval(), (torch.randn(2, d),), path)
            c.client.upload(name, path)
        small = np.random.RandomState(0).randn(1, 8).astype(np.float32)
        big = np.random.RandomState(1).randn(1024, 1024).astype(np.float32)  # 4 MiB
        rows = []
        for threads in (1, 8):
            g = rate(lambda: c.client.infer("small", [small]), a.seconds, threads)
            r = rate(rest_caller(port, "small", "x", small), a.seconds, threads)
            rows.append((f"small request, {threads} in flight (req/s)", g, r))
        mib = big.nbytes / 2**20
        g = rate(lambda: c.client.infer("wide", [big]), a.seconds, 1) * mib
        r = rate(rest_caller(port, "wide", "x", big), a.seconds, 1) * mib
        rows.append(("4 MiB FP32 tensor, JSON (MiB/s each way)", g, r))
    print(f"{'':44} {'gRPC':>10} {'REST':>10} {'REST/gRPC':>10}")
    for what, g, r in rows:
        print(f"{what:44} {g:10.1f} {r:10.1f} {r / g:10.2f}")


if __name__ == "__main__":
    main()
