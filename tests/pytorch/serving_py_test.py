"""pipeserve.Client (Python, grpcio) against a real coordinator process:
upload a model exported from PyTorch, query it through the KServe v2 API,
and check errors come back with their gRPC codes. The same wire format a
Triton Python client uses (grpc_service.proto, package `inference`)."""
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import unittest

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "..")
sys.path.insert(0, HERE)

import models  # noqa: E402
import pipeserve  # noqa: E402


class ServingPyTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(dir=os.environ.get("TEST_TMPDIR"))
        port_file = os.path.join(cls.tmp, "port")
        cls.log = open(os.path.join(cls.tmp, "coordinator.log"), "w")
        cls.admin, cls.infer_only = "a" * 32, "i" * 32
        tokens = os.path.join(cls.tmp, "tokens")
        with open(tokens, "w") as f:
            f.write(f"admin {cls.admin}\ninfer {cls.infer_only}\n")
        cls.proc = subprocess.Popen(
            [os.path.join(ROOT, "server/coordinator/coordinator"), "--port=0", "--host=127.0.0.1",
             "--metrics_port=-1",  # the default, 8002, is shared with the other tests
             "--http_port=-1",  # and so is 8000
             f"--port_file={port_file}", f"--repository={cls.tmp}/repo",
             f"--auth_tokens={tokens}",
             f"--stage_server_binary={os.path.join(ROOT, 'server/stage/stage_server')}"],
            stdout=cls.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while not (os.path.exists(port_file) and open(port_file).read().strip()):
            if time.time() > deadline or cls.proc.poll() is not None:
                raise RuntimeError("coordinator did not start")
            time.sleep(0.02)
        cls.address = f"127.0.0.1:{open(port_file).read().strip()}"
        cls.client = pipeserve.Client(cls.address, token=cls.admin)
        while not cls.client.health():  # health check, not a sleep
            if time.time() > deadline:
                raise RuntimeError("coordinator not healthy")
            time.sleep(0.02)
        cls.model = models.make("multi_mlp")
        cls.path = os.path.join(cls.tmp, "multi_mlp.psm")
        pipeserve.export(cls.model, tuple(models.example_inputs("multi_mlp").values()), cls.path)

    @classmethod
    def tearDownClass(cls):
        cls.client.close()
        cls.proc.send_signal(signal.SIGTERM)
        cls.proc.wait(timeout=30)
        cls.log.close()

    def test_upload_plan_and_infer_match_pytorch(self):
        info = self.client.upload("mlp", self.path, microbatches=3)
        self.assertEqual(info["num_stages"], 4)
        plan = self.client.plan("mlp")
        self.assertEqual(len(plan.stage_servers), 4)
        self.assertEqual(plan.microbatches, 3)
        inputs = models.example_inputs("multi_mlp", batch=10)
        (out,) = self.client.infer("mlp", {k: v.numpy() for k, v in inputs.items()})
        with torch.no_grad():
            ref = self.model(*inputs.values()).numpy()
        self.assertEqual(out.shape, (10, 512))
        np.testing.assert_allclose(out, ref, rtol=1.3e-6, atol=1e-5)

    def test_a_traced_request_writes_its_timeline_for_perfetto(self):
        self.client.upload("mlp_t", self.path, microbatches=3)
        inputs = models.example_inputs("multi_mlp", batch=9)
        path = os.path.join(self.tmp, "trace.json")
        (out,) = self.client.infer("mlp_t", {k: v.numpy() for k, v in inputs.items()},
                                   trace=path)
        with torch.no_grad():
            ref = self.model(*inputs.values()).numpy()
        np.testing.assert_allclose(out, ref, rtol=1.3e-6, atol=1e-5)
        with open(path) as f:
            trace = json.load(f)
        spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
        names = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"]
                 if e["ph"] == "M" and e["name"] == "process_name"}
        plan = self.client.plan("mlp_t")
        # Stages by index: the servers' addresses are for admins (plan),
        # not in what an inference client gets back.
        self.assertEqual(sorted(names.values()),
                         ["coordinator"] + [f"stage {i}" for i in range(4)])
        text = json.dumps(trace)
        for server in plan.stage_servers:
            self.assertNotIn(server, text)
        # Every microbatch computed once on each of the 4 stages, each
        # after its transfer in and its wait in the queue.
        by = {}
        for e in spans:
            by.setdefault((names[e["pid"]], e["cat"], e["args"].get("microbatch")), []).append(e)
        for mb in range(3):
            end = by[("coordinator", "send", mb)][0]["ts"]
            for i in range(len(plan.stage_servers)):
                stage = f"stage {i}"
                (transfer,) = by[(stage, "transfer", mb)]
                (queue,) = by[(stage, "queue", mb)]
                (compute,) = by[(stage, "compute", mb)]
                self.assertGreaterEqual(transfer["ts"], end)
                self.assertEqual(transfer["ts"] + transfer["dur"], queue["ts"])
                self.assertEqual(queue["ts"] + queue["dur"], compute["ts"])
                end = compute["ts"] + compute["dur"]
            self.assertGreaterEqual(by[("coordinator", "receive", mb)][0]["ts"], end)
        (request,) = by[("coordinator", "request", None)]
        self.assertEqual(request["ts"], 0)
        self.client.unload("mlp_t")

    def test_replicated_stages_serve_pytorchs_answer(self):
        info = self.client.upload("mlp_r", self.path, replicas=2)
        self.assertEqual(info["num_stages"], 4)
        plan = self.client.plan("mlp_r")
        self.assertEqual(plan.replicas, 2)
        self.assertEqual(plan.ready_replicas, 2)
        self.assertEqual(len(plan.stage_servers), 8)
        self.assertEqual(len(set(plan.stage_servers)), 8)
        inputs = models.example_inputs("multi_mlp", batch=13)
        (out,) = self.client.infer("mlp_r", {k: v.numpy() for k, v in inputs.items()})
        with torch.no_grad():
            ref = self.model(*inputs.values()).numpy()
        np.testing.assert_allclose(out, ref, rtol=1.3e-6, atol=1e-5)
        self.client.unload("mlp_r")

    def test_tokens_are_required_and_scoped(self):
        self.client.upload("scoped", self.path)
        x = {"x": np.zeros((2, 512), np.float32), "y": np.zeros((2, 512), np.float32)}
        with pipeserve.Client(self.address) as anonymous:
            self.assertTrue(anonymous.health())  # probes need no token
            with self.assertRaises(pipeserve.ServerError) as e:
                anonymous.infer("scoped", x)
            self.assertEqual(e.exception.code, "UNAUTHENTICATED")
        with pipeserve.Client(self.address, token=self.infer_only) as user:
            (out,) = user.infer("scoped", x)
            self.assertEqual(out.shape, (2, 512))
            with self.assertRaises(pipeserve.ServerError) as e:
                user.unload("scoped")
            self.assertEqual(e.exception.code, "PERMISSION_DENIED")
        self.client.unload("scoped")
        self.assertNotIn("scoped", [m["name"] for m in self.client.models()])
        with self.assertRaises(pipeserve.ServerError) as e:
            self.client.unload("scoped")
        self.assertEqual(e.exception.code, "NOT_FOUND")

    def test_errors_carry_grpc_codes(self):
        with self.assertRaises(pipeserve.ServerError) as e:
            self.client.infer("nope", [np.zeros((1, 512), np.float32)] * 2)
        self.assertEqual(e.exception.code, "NOT_FOUND")
        self.client.upload("mlp2", self.path)
        with self.assertRaises(pipeserve.ServerError) as e:
            self.client.infer("mlp2", {"x": np.zeros((2, 512), np.float32),
                                       "y": np.zeros((2, 7), np.float32)})
        self.assertEqual(e.exception.code, "INVALID_ARGUMENT")
        self.assertIn('input "y": shape [2,7] does not match [B,512]', e.exception.message)


if __name__ == "__main__":
    unittest.main()
