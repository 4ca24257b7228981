"""GPT-2-small-shaped model (12 layers, d 768, 12 heads, vocab 50257; random
weights; tests/pytorch/transformer_models.Gpt2), batch 8 x 128 tokens:
pipeserve against PyTorch eager measured in the same run.

    bazel build //client:pipeserve //server/coordinator:coordinator \
        //server/stage:stage_server
    /usr/bin/python3 bench/transformer.py [--repeat 5] [--skip_serving]

Prints three tables:
  1. One thread, in process: PyTorch eager fp32 and bf16 (OPENBLAS_NUM_THREADS,
     OMP_NUM_THREADS and torch.set_num_threads all 1, set before torch
     loads) against `pipeserve run-local --threads 1` on the fp32 and the
     bf16 export (median of --repeat calls after a warm-up call).
  2. Served in 4 stages over gRPC (a coordinator and 4 stage servers on this
     machine, the KServe API, Python client): latency of one request and
     tokens/s with 4 requests in flight, against PyTorch eager in process
     on all cores (2 threads).
  3. Memory: each stage server's RSS after load against the weights it
     holds.
Every PyTorch run happens in its own process, so thread settings hold.
"""
import argparse
import atexit
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, ".."))
BIN = os.path.join(ROOT, "bazel-bin")
PY = "/usr/bin/python3"

# nanoGPT's layout (nn.Linear MLP), as measured in the README.
SHAPE = dict(vocab=50257, d=768, heads=12, layers=12, max_len=1024, cut=False, conv1d=False)
BATCH, SEQ = 8, 128

# Runs in a child process: builds the model (seed 0) and either exports it
# or times it.
CHILD = r"""
import json, os, statistics, sys, time
sys.path[:0] = [{root!r} + "/client/python", {root!r} + "/tests/pytorch"]
import numpy as np, torch
torch.set_num_threads({threads})
import transformer_models as T
torch.manual_seed(0)
model = T.Gpt2(**{shape!r}).eval()
if {bf16!r}:
    model = model.to(torch.bfloat16)
ids = torch.from_numpy(np.load({ids!r}))
if {export!r}:
    import pipeserve
    pipeserve.export(model, (ids[:2, :5],), {export!r}, dynamic_dims={{"idx": [1]}})
    print(json.dumps({{}}))
else:
    times = []
    with torch.no_grad():
        model(ids)
        for _ in range({repeat}):
            t = time.perf_counter(); model(ids); times.append(time.perf_counter() - t)
    print(json.dumps({{"median_s": statistics.median(times)}}))
"""


def child(threads, bf16=False, export="", repeat=3, ids=""):
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    code = CHILD.format(root=ROOT, threads=threads, shape=SHAPE, bf16=bf16, ids=ids,
                        export=export, repeat=repeat)
    out = subprocess.run([PY, "-c", code], env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_local(model, ids, repeat):
    out = subprocess.run([os.path.join(BIN, "client/pipeserve"), "run-local", "--model", model,
                          "--input", ids, "--threads", "1", "--repeat", str(repeat + 1)],
                         check=True, capture_output=True, text=True).stdout
    # "ran 1 stages, ...: first call X ms, median of N calls Y ms"
    line = [l for l in out.splitlines() if "median of" in l][0]
    return float(line.split("median of")[1].split("calls")[1].split("ms")[0]) / 1000


def rss_of_children(pid):
    rss = {}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != pid:
                continue
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss[int(p)] = int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
    return rss


class Coordinator:
    """A coordinator (and the stage servers it starts) in `tmp`, for a
    `with` block; .client is a pipeserve.Client connected to it."""

    def __init__(self, tmp, timeout=600, flags=()):
        sys.path[:0] = [os.path.join(ROOT, "client/python")]
        import pipeserve
        port_file = os.path.join(tmp, "port")
        self.log = open(os.path.join(tmp, "coordinator.log"), "w")
        self.proc = subprocess.Popen(
            [os.path.join(BIN, "server/coordinator/coordinator"), "--port=0",
             f"--port_file={port_file}", f"--repository={tmp}/repo", "--metrics_port=-1",
             "--http_port=-1",
             f"--stage_server_binary={os.path.join(BIN, 'server/stage/stage_server')}",
             *flags],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while not (os.path.exists(port_file) and open(port_file).read().strip()):
            if time.time() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("coordinator did not start")
            time.sleep(0.05)
        self.client = pipeserve.Client(f"localhost:{open(port_file).read().strip()}",
                                       timeout=timeout)
        while not self.client.health():
            time.sleep(0.05)

    def close(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=120)
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def serving(tmp, model_path, ids_path, repeat):
    import numpy as np
    with Coordinator(tmp) as c:
        client, proc = c.client, c.proc
        client.upload("gpt2", model_path, num_stages=4, microbatches=4)
        plan = client.plan("gpt2")
        weights = [sum(p.byte_size for p in s.graph.params) for s in plan.plan.stages]
        rss_loaded = sorted(rss_of_children(proc.pid).values())
        ids = np.load(ids_path)
        client.infer("gpt2", {"idx": ids})  # warm-up
        lat = []
        for _ in range(repeat):
            t = time.perf_counter()
            client.infer("gpt2", {"idx": ids})
            lat.append(time.perf_counter() - t)
        # The same request the way the client made it before 2026-12-01:
        # protobuf's generated stub, the response parsed by protobuf.
        proto = []
        for _ in range(repeat):
            t = time.perf_counter()
            request = client._pb.ModelInferRequest(model_name="gpt2")
            request.inputs.add(name="idx", datatype="INT64", shape=ids.shape)
            request.raw_input_contents.append(ids.astype("<i8").tobytes())
            response = client._inference.ModelInfer(request, timeout=600)
            [np.array(np.frombuffer(r, dtype="<f4")) for r in response.raw_output_contents]
            proto.append(time.perf_counter() - t)
            del request, response
        # 4 requests in flight.
        n_each = max(1, repeat // 2)
        def worker():
            for _ in range(n_each):
                client.infer("gpt2", {"idx": ids})
        t = time.perf_counter()
        threads = [threading.Thread(target=worker) for _ in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        busy = time.perf_counter() - t
        rss = sorted(rss_of_children(proc.pid).values())
        return (statistics.median(lat), statistics.median(proto),
                4 * n_each * BATCH * SEQ / busy, weights, rss_loaded, rss)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--skip_serving", action="store_true")
    a = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="pipeserve-bench-")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # GiBs of model files
    import numpy as np
    rng = np.random.default_rng(0)
    ids = os.path.join(tmp, "ids.npy")
    np.save(ids, rng.integers(0, SHAPE["vocab"], (BATCH, SEQ), dtype=np.int64))
    fp32 = os.path.join(tmp, "gpt2_fp32.psm")
    bf16 = os.path.join(tmp, "gpt2_bf16.psm")
    child(1, export=fp32, ids=ids)
    child(1, bf16=True, export=bf16, ids=ids)
    torch_fp32 = child(1, repeat=a.repeat, ids=ids)["median_s"]
    torch_bf16 = child(1, bf16=True, repeat=a.repeat, ids=ids)["median_s"]
    ps_fp32 = run_local(fp32, ids, a.repeat)
    ps_bf16 = run_local(bf16, ids, a.repeat)
    tokens = BATCH * SEQ
    print(f"1. GPT-2 small, batch {BATCH} x {SEQ} tokens, one thread, in process "
          f"(median of {a.repeat})")
    print(f"   {'':34s} {'s/forward':>10s} {'tokens/s':>9s} {'vs torch fp32':>14s}")
    for name, s in (("PyTorch eager fp32", torch_fp32), ("PyTorch eager bf16", torch_bf16),
                    ("pipeserve fp32 (run-local)", ps_fp32),
                    ("pipeserve bf16 (run-local)", ps_bf16)):
        print(f"   {name:34s} {s:10.3f} {tokens / s:9.0f} {torch_fp32 / s:13.2f}x")
    print(f"   .psm sizes: fp32 {os.path.getsize(fp32) / 2**20:.0f} MiB, "
          f"bf16 {os.path.getsize(bf16) / 2**20:.0f} MiB")
    if a.skip_serving:
        return
    torch_2t = child(2, repeat=a.repeat, ids=ids)["median_s"]
    for label, path in (("fp32", fp32), ("bf16", bf16)):
        lat, lat_proto, tps, weights, rss_loaded, rss = serving(tempfile.mkdtemp(dir=tmp), path, ids,
                                                     a.repeat)
        print(f"2. Served in 4 stages over gRPC ({label}), batch {BATCH} x {SEQ}, "
              f"4 microbatches, all 2 cores")
        print(f"   PyTorch eager fp32 in process, 2 threads: {torch_2t:.3f} s/forward, "
              f"{tokens / torch_2t:.0f} tokens/s")
        print(f"   pipeserve, one request at a time:        {lat:.3f} s, "
              f"{tokens / lat:.0f} tokens/s ({torch_2t / lat:.2f}x)")
        print(f"     the same through protobuf's stub:      {lat_proto:.3f} s "
              f"(the client before 2026-12-01; {lat_proto / lat:.2f}x the time)")
        print(f"   pipeserve, 4 requests in flight:          {tps:.0f} tokens/s "
              f"({tps / (tokens / torch_2t):.2f}x)")
        mib = lambda xs: [round(x / 2**20) for x in sorted(xs)]  # noqa: E731
        bound = [1.1 * w + 64 * 2**20 for w in weights]
        print(f"3. Memory ({label}), MiB, each list sorted: stage weights {mib(weights)}; "
              f"bound 1.1 x weights + 64 {mib(bound)}; stage server RSS after load "
              f"{mib(rss_loaded)} (total {sum(rss_loaded) / 2**20:.0f} against "
              f"{sum(bound) / 2**20:.0f}), after the requests {mib(rss)}")


if __name__ == "__main__":
    main()
