"""A coordinator process (and the stage servers it starts) for the Python
tests that serve real models: started on ports picked at run time, waited
on by its health check, stopped with SIGTERM."""
import http.client
import json
import os
import signal
import subprocess
import time
import urllib.request

import pipeserve

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise KeyError("VmRSS")


def sanitized(pid):
    """Whether process `pid` runs under ASan or TSan (their runtime mapped)."""
    with open(f"/proc/{pid}/maps") as f:
        return any("libasan" in line or "libtsan" in line for line in f)


def _read(path):
    with open(path) as f:
        return f.read().strip()


class Coordinator:
    """A coordinator with its repository and logs in `tmp`, its metrics on a
    port of its own; .client is a pipeserve.Client connected to it."""

    def __init__(self, tmp, *flags):
        self.tmp = tmp
        port_file = os.path.join(tmp, "port")
        self.log = open(os.path.join(tmp, "coordinator.log"), "w")
        self.proc = subprocess.Popen(
            [os.path.join(ROOT, "server/coordinator/coordinator"), "--port=0",
             f"--port_file={port_file}",
             f"--repository={tmp}/repo",
             "--metrics_port=0", f"--metrics_port_file={tmp}/metrics_port",
             "--http_port=-1",  # tests that want it say so (a later flag wins)
             f"--stage_server_binary={os.path.join(ROOT, 'server/stage/stage_server')}",
             *flags],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while not (os.path.exists(port_file) and _read(port_file)):
            if time.time() > deadline or self.proc.poll() is not None:
                raise RuntimeError("coordinator did not start")
            time.sleep(0.02)
        self.client = pipeserve.Client(f"localhost:{_read(port_file)}")
        while not self.client.health():  # health check, not a sleep
            if time.time() > deadline:
                raise RuntimeError("coordinator not healthy")
            time.sleep(0.02)

    def assert_hang_up_frees_blocks(self, test, http_port, path, body, model):
        """Opens a streamed generation over HTTP, reads its first event and
        hangs up; `test` asserts the model's KV cache blocks were in use and
        are free again within 10 s."""
        conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=60)
        conn.request("POST", path, json.dumps(body))
        resp = conn.getresponse()
        test.assertTrue(resp.readline().startswith(b"data: "))
        used = f'pipeserve_kv_cache_blocks{{model="{model}",state="used"}}'
        test.assertGreater(self.metric(used), 0)
        conn.sock.close()
        conn.close()
        deadline = time.time() + 10
        while self.metric(used) > 0 and time.time() < deadline:
            time.sleep(0.02)
        test.assertEqual(self.metric(used), 0)

    def metric(self, line_start):
        """The value of the Prometheus sample whose line starts so."""
        port = _read(os.path.join(self.tmp, "metrics_port"))
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        for line in text.decode().splitlines():
            if line.startswith(line_start):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(line_start)

    def stage_server_pids(self):
        pids = []
        for pid in os.listdir("/proc"):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read()
            except (OSError, ValueError, IndexError):
                continue
            if ppid == self.proc.pid and b"stage_server" in cmd:
                pids.append(int(pid))
        return sorted(pids)

    def close(self):
        self.client.close()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)
        self.log.close()
