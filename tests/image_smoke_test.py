"""Smoke test of the pipeserve image (tools/image.sh --smoke runs it after
building localhost/pipeserve:0.1): a coordinator and two stage servers as
containers of the image, in secure mode as the Kubernetes manifests run
them (TLS and tokens towards clients, mutual TLS between the servers, the
development certificates of tools/make_dev_certs.sh), each non-root with a
read-only root filesystem and an init process. Uploads the seed's
ExampleCode (4 stages on the 2 servers) and a GPT-2-style model exported
here with PyTorch, queries ExampleCode over gRPC and GPT-2 over HTTPS
(KServe REST, INT64 ids in JSON), checks both against PyTorch, then stops
every container with SIGTERM and checks each exited 0 within its grace.

    CONTAINERS_CONF=out/image/containers.conf /usr/bin/python3 tests/image_smoke_test.py
"""
import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "client", "python"), os.path.join(ROOT, "tests", "pytorch")]

import numpy as np  # noqa: E402
import torch  # noqa: E402

import models  # noqa: E402
import pipeserve  # noqa: E402
import transformer_models as tm  # noqa: E402

IMAGE = "localhost/pipeserve:0.1"
UID = 10001  # the image's pipeserve user
GRACE_S = 5  # the servers' --shutdown_grace_s
TLS = "/etc/pipeserve/tls"


def podman(*args, check=True):
    run = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=120)
    if check and run.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args[:3])}: {run.stderr.strip()}")
    return run.stdout.strip()


def wait_for_file(path, name, deadline_s=60):
    end = time.time() + deadline_s
    while not (os.path.exists(path) and open(path).read().strip()):
        if podman("inspect", "--format", "{{.State.Running}}", name) != "true":
            raise RuntimeError(f"{name} stopped:\n{podman('logs', name, check=False)}")
        if time.time() > end:
            raise RuntimeError(f"{name} wrote no {os.path.basename(path)}:\n{podman('logs', name)}")
        time.sleep(0.1)
    return int(open(path).read())


class Cluster:
    def __init__(self, tmp):
        self.tmp, self.names = tmp, []
        self.run_dir = os.path.join(tmp, "run")      # port files
        self.repo = os.path.join(tmp, "repo")        # the model repository volume
        self.certs = os.path.join(tmp, "certs")
        subprocess.run([os.path.join(ROOT, "tools/make_dev_certs.sh"), self.certs],
                       check=True, capture_output=True)
        for d in (self.run_dir, self.repo):
            os.makedirs(d)
        for d in (self.run_dir, self.repo, self.certs):
            shutil.chown(d, UID, UID)
            for f in os.listdir(d):
                shutil.chown(os.path.join(d, f), UID, UID)
        self.tokens = {}
        for scope in ("admin", "infer"):
            with open(os.path.join(self.certs, f"{scope}.token")) as f:
                self.tokens[scope] = f.read().strip()

    def start(self, name, role, *flags):
        self.names.append(name)
        podman("rm", "-f", name, check=False)
        podman("run", "-d", "--name", name, "--network", "host", "--read-only", "--init",
               "-v", f"{self.certs}:{TLS}:ro", "-v", f"{self.run_dir}:/run/pipeserve",
               "-v", f"{self.repo}:/models", IMAGE, role, "--host=127.0.0.1", "--port=0",
               f"--port_file=/run/pipeserve/{name}.port", "--metrics_port=-1",
               f"--shutdown_grace_s={GRACE_S}", f"--cluster_ca={TLS}/ca.crt", *flags)
        return wait_for_file(os.path.join(self.run_dir, f"{name}.port"), name)

    def stop_all(self):
        """SIGTERM to each; (name, exit code, seconds) for each."""
        out = []
        for name in self.names:
            t = time.time()
            podman("stop", "-t", str(GRACE_S + 10), name, check=False)
            code = podman("inspect", "--format", "{{.State.ExitCode}}", name, check=False)
            out.append((name, code, time.time() - t))
        return out

    def remove_all(self):
        for name in self.names:
            podman("rm", "-f", name, check=False)


def main():
    version = podman("--version")
    tmp = tempfile.mkdtemp(prefix="pipeserve-image-")
    os.chmod(tmp, 0o755)
    c = Cluster(tmp)
    try:
        stage_flags = [f"--cluster_cert={TLS}/stage.crt", f"--cluster_key={TLS}/stage.key",
                       "--coordinator_identity=pipeserve coordinator",
                       "--stage_identity=pipeserve stage", "--device=cpu"]
        run = f"pipeserve-smoke-{os.getpid()}"  # names of this run's containers
        ports = [c.start(f"{run}-stage{i}", "stage_server", *stage_flags) for i in range(2)]
        port = c.start(f"{run}-coordinator", "coordinator",
                       "--repository=/models", "--launcher=static",
                       "--stage_servers=" + ",".join(f"localhost:{p}" for p in ports),
                       f"--tls_cert={TLS}/coordinator.crt", f"--tls_key={TLS}/coordinator.key",
                       f"--auth_tokens={TLS}/tokens", f"--cluster_cert={TLS}/coordinator.crt",
                       f"--cluster_key={TLS}/coordinator.key", "--http_port=0",
                       "--http_port_file=/run/pipeserve/http.port")
        http_port = wait_for_file(os.path.join(c.run_dir, "http.port"), c.names[-1])
        print(f"{version}: 2 stage servers and a coordinator up (gRPC {port}, HTTPS {http_port})")
        check_models(c, port, http_port)
    finally:
        stops = c.stop_all()
        c.remove_all()
    bad = [(n, code, s) for n, code, s in stops if code != "0" or s > GRACE_S + 5]
    for n, code, s in stops:
        print(f"  {n}: SIGTERM -> exit {code} in {s:.1f} s")
    if bad:
        raise SystemExit(f"not a clean stop: {bad}")
    shutil.rmtree(tmp, ignore_errors=True)
    print("image smoke test: PASSED")


def check_models(c, port, http_port):
    ca = os.path.join(c.certs, "ca.crt")
    torch.manual_seed(0)
    example = models.ExampleCode().eval()
    x, y = torch.randn(8, models.D_HID), torch.randn(8, models.D_HID)
    path = os.path.join(c.tmp, "example.psm")
    pipeserve.export(example, (x, y), path)
    gpt2 = tm.Gpt2(max_len=16).eval()
    gpt2_path = os.path.join(c.tmp, "gpt2.psm")
    pipeserve.export(gpt2, (torch.randint(0, 97, (2, 16)),), gpt2_path)
    with pipeserve.Client(f"localhost:{port}", tls_ca=ca, token=c.tokens["admin"]) as admin:
        stages = admin.upload("example", path)["num_stages"]
        admin.upload("gpt2", gpt2_path)
    with pipeserve.Client(f"localhost:{port}", tls_ca=ca, token=c.tokens["infer"]) as client:
        (out,) = client.infer("example", {"x": x.numpy(), "y": y.numpy()})
    with torch.no_grad():
        want = example(x, y).numpy()
    err = np.abs(out - want).max() / np.abs(want).max()
    print(f"  ExampleCode over gRPC (TLS, infer token; {stages} stages on 2 servers): "
          f"max error vs PyTorch {err:.1e}")
    if err > 1e-5:
        raise SystemExit("ExampleCode's answer differs from PyTorch's")
    ids = torch.randint(0, 97, (2, 16))
    body = json.dumps({"inputs": [{"name": "idx", "datatype": "INT64", "shape": [2, 16],
                                   "data": ids.tolist()}]}).encode()
    request = urllib.request.Request(
        f"https://localhost:{http_port}/v2/models/gpt2/infer", data=body,
        headers={"Authorization": f"Bearer {c.tokens['infer']}"})
    context = ssl.create_default_context(cafile=ca)
    answer = json.loads(urllib.request.urlopen(request, context=context, timeout=60).read())
    logits = np.array(answer["outputs"][0]["data"], np.float32).reshape(answer["outputs"][0]["shape"])
    with torch.no_grad():
        ref = gpt2(ids)[0].numpy()
    err = np.linalg.norm(logits - ref) / np.linalg.norm(ref)
    print(f"  GPT-2-style over HTTPS (KServe REST, INT64 ids): relative error vs PyTorch {err:.1e}")
    if err > 1e-4:
        raise SystemExit("GPT-2's answer differs from PyTorch's")


if __name__ == "__main__":
    main()
