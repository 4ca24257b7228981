"""KServe v2 REST (--http_port) against gRPC (the Python client) on the
same coordinator, in the same run: requests per second for a small JSON
request (an 8-wide MLP, 1 row), one at a time and with 8 in flight, and
the bytes per second of a 16 MiB FP32 tensor each way through Triton's
binary tensor extension (and of 1 MiB in JSON, for scale), and the time
per token of a streamed generation (a small GPT-2-style model, 64 greedy
tokens, median of 5): gRPC's Generate stream against the generate
extension's server-sent events. Both clients are Python, so both
figures include their client's cost.

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


def rest_binary_caller(port, model, name, array):
    header = json.dumps({"inputs": [{"name": name, "datatype": "FP32", "shape": list(array.shape),
                                     "parameters": {"binary_data_size": array.nbytes}}],
                         "parameters": {"binary_data_output": True}}).encode()
    body = header + array.tobytes()
    local = threading.local()

    def call():
        if not hasattr(local, "conn"):
            local.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        local.conn.request("POST", f"/v2/models/{model}/infer", body,
                           {"Inference-Header-Content-Length": str(len(header))})
        resp = local.conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise RuntimeError(data[:200])
        length = int(resp.getheader("Inference-Header-Content-Length"))
        np.frombuffer(data[length:], np.float32)
    return call


def per_token_ms(stream_tokens, n, runs=5):
    """Median over `runs` of the ms per token after the first of a stream."""
    times = []
    for _ in range(runs):
        first, count = None, 0
        for _ in stream_tokens():
            count += 1
            if first is None:
                first = time.time()
        times.append((time.time() - first) * 1000 / max(1, count - 1))
    return sorted(times)[len(times) // 2]


def sse_tokens(port, model, prompt, n):
    def stream():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        conn.request("POST", f"/v2/models/{model}/generate_stream",
                     json.dumps({"input_ids": prompt, "max_tokens": n}))
        resp = conn.getresponse()
        while True:
            line = resp.readline()
            if not line:
                break
            if line.startswith(b"data: "):
                yield json.loads(line[6:])["token_id"]
        conn.close()
    return stream


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=5)
    a = p.parse_args()
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores")
    tmp = tempfile.mkdtemp(prefix="pipeserve-rest-")
    with Coordinator(tmp, flags=["--http_port=0", f"--http_port_file={tmp}/http_port"]) as c:
        port = int(open(f"{tmp}/http_port").read())
        for name, d in (("small", 8), ("wide", 2048), ("json", 512)):
            path = os.path.join(tmp, f"{name}.psm")
            pipeserve.export(Mlp(d).eval(), (torch.randn(2, d),), path)
            c.client.upload(name, path)
        small = np.random.RandomState(0).randn(1, 8).astype(np.float32)
        big = np.random.RandomState(1).randn(2048, 2048).astype(np.float32)  # 16 MiB
        mid = np.random.RandomState(2).randn(512, 512).astype(np.float32)  # 1 MiB
        rows = []
        for threads in (1, 8):
            g = rate(lambda: c.client.infer("small", [small]), a.seconds, threads)
            r = rate(rest_caller(port, "small", "x", small), a.seconds, threads)
            rows.append((f"small JSON request, {threads} in flight (req/s)", g, r))
        mib = big.nbytes / 2**20
        g = rate(lambda: c.client.infer("wide", [big]), a.seconds, 1) * mib
        r = rate(rest_binary_caller(port, "wide", "x", big), a.seconds, 1) * mib
        rows.append(("16 MiB FP32, binary (MiB/s each way)", g, r))
        mib = mid.nbytes / 2**20
        g = rate(lambda: c.client.infer("json", [mid]), a.seconds, 1) * mib
        r = rate(rest_caller(port, "json", "x", mid), a.seconds, 1) * mib
        rows.append(("1 MiB FP32, JSON (MiB/s each way)", g, r))
        sys.path.insert(0, os.path.join(HERE, "..", "tests", "pytorch"))
        import transformer_models as tm
        path = os.path.join(tmp, "gen.psm")
        torch.manual_seed(0)
        pipeserve.export(tm.Gpt2(max_len=128).eval(), (torch.randint(0, 97, (2, 5)),), path,
                         generation=True)
        c.client.upload("gen", path)
        g = per_token_ms(lambda: c.client.generate("gen", [1, 2, 3], max_tokens=64), 64)
        r = per_token_ms(sse_tokens(port, "gen", [1, 2, 3], 64), 64)
        rows.append(("streamed generation (ms per token)", g, r))
    print(f"{'':44} {'gRPC':>10} {'REST':>10} {'REST/gRPC':>10}  (ms per token: lower is better)")
    for what, g, r in rows:
        print(f"{what:44} {g:10.1f} {r:10.1f} {r / g:10.2f}")


if __name__ == "__main__":
    main()
