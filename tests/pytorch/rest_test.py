"""KServe v2 REST (the coordinator's --http_port) against a real
coordinator and stage servers, driven with Python's http.client and curl:
health, metadata and readiness, and JSON inference whose outputs equal the
gRPC path's for an MLP (FP32) and a GPT-2-style forward pass (INT64 ids);
bad requests get KServe's {"error": ...} with a status that fits."""
import http.client
import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import unittest

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import models  # noqa: E402
import pipeserve  # noqa: E402
import transformer_models as tm  # noqa: E402
from coordinator_process import Coordinator, _read  # noqa: E402


class RestTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(dir=os.environ.get("TEST_TMPDIR"))
        cls.coord = Coordinator(cls.tmp, "--http_port=0", f"--http_port_file={cls.tmp}/http_port")
        cls.port = int(_read(os.path.join(cls.tmp, "http_port")))
        torch.manual_seed(0)
        cls.mlp = models.MLPModule(8).eval()
        path = os.path.join(cls.tmp, "mlp.psm")
        pipeserve.export(cls.mlp, (torch.randn(4, 8),), path, split_spec={"net2": pipeserve.SplitPoint.BEGINNING})
        cls.coord.client.upload("mlp", path)
        cls.gpt2 = tm.Gpt2(max_len=16).eval()
        path = os.path.join(cls.tmp, "gpt2.psm")
        pipeserve.export(cls.gpt2, (torch.randint(0, 97, (2, 16)),), path)
        cls.coord.client.upload("gpt2", path)
        path = os.path.join(cls.tmp, "mlp16.psm")
        pipeserve.export(models.MLPModule(8).eval().to(torch.bfloat16),
                         (torch.randn(4, 8).to(torch.bfloat16),), path)
        cls.coord.client.upload("mlp16", path)
        path = os.path.join(cls.tmp, "gen.psm")
        pipeserve.export(tm.Gpt2(max_len=64).eval(), (torch.randint(0, 97, (2, 5)),), path,
                         generation=True)
        cls.coord.client.upload("gen", path)

    @classmethod
    def tearDownClass(cls):
        cls.coord.close()

    def request(self, method, path, body=None, headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        return resp.status, data

    def infer_json(self, model, name, datatype, array):
        body = json.dumps({"inputs": [{"name": name, "datatype": datatype,
                                       "shape": list(array.shape), "data": array.tolist()}]})
        status, data = self.request("POST", f"/v2/models/{model}/infer", body,
                                    {"Content-Type": "application/json"})
        self.assertEqual(status, 200, data)
        return json.loads(data)

    def test_health_and_server_metadata(self):
        self.assertEqual(self.request("GET", "/v2/health/live")[0], 200)
        self.assertEqual(self.request("GET", "/v2/health/ready")[0], 200)
        status, data = self.request("GET", "/v2")
        self.assertEqual(status, 200)
        meta = json.loads(data)
        self.assertEqual(meta["name"], "pipeserve")
        self.assertIn("model_repository", meta["extensions"])

    def test_the_repository_extension_answers_over_rest(self):
        # Regression: ServerMetadata claimed model_repository, but REST had
        # no /v2/repository route (404).
        status, data = self.request("POST", "/v2/repository/index", "{\"ready\": true}")
        self.assertEqual(status, 200, data)
        index = {m["name"]: m for m in json.loads(data)}
        self.assertEqual(index["mlp"]["state"], "READY")
        self.assertEqual(index["mlp"]["version"], "1")
        self.assertEqual(self.request("POST", "/v2/repository/index")[0], 200)
        status, data = self.request("POST", "/v2/repository/index", "{\"ready\": 1}")
        self.assertEqual(status, 400)
        self.assertIn("\"ready\" must be true or false", json.loads(data)["error"])
        self.assertEqual(self.request("POST", "/v2/repository/models/mlp/load")[0], 200)
        status, data = self.request("POST", "/v2/repository/models/nope/load")
        self.assertEqual(status, 503)
        self.assertIn("ModelService/Upload", json.loads(data)["error"])
        status, data = self.request("POST", "/v2/repository/models/mlp/unload")
        self.assertEqual(status, 503)
        self.assertIn("ModelService/Unload", json.loads(data)["error"])
        self.assertEqual(self.request("GET", "/v2/repository/index")[0], 405)

    def test_model_metadata_and_readiness(self):
        status, data = self.request("GET", "/v2/models/mlp")
        self.assertEqual(status, 200, data)
        meta = json.loads(data)
        self.assertEqual(meta["name"], "mlp")
        self.assertEqual(meta["versions"], ["1"])
        grpc_meta = self.coord.client.metadata("mlp")
        self.assertEqual([i["name"] for i in meta["inputs"]], [i.name for i in grpc_meta.inputs])
        self.assertEqual(meta["inputs"][0]["datatype"], "FP32")
        self.assertEqual(self.request("GET", "/v2/models/mlp/ready")[0], 200)
        self.assertEqual(self.request("GET", "/v2/models/mlp/versions/1/ready")[0], 200)
        status, data = self.request("GET", "/v2/models/mlp/versions/7")
        self.assertEqual(status, 404)
        self.assertIn("has no version \"7\"", json.loads(data)["error"])
        # Unknown, or without that version: not ready, 400 as Triton answers.
        status, data = self.request("GET", "/v2/models/nope/ready")
        self.assertEqual(status, 400)
        self.assertIn("nope", json.loads(data)["error"])
        status, data = self.request("GET", "/v2/models/mlp/versions/7/ready")
        self.assertEqual(status, 400)
        self.assertIn("has no version \"7\"", json.loads(data)["error"])

    def test_json_inference_equals_grpc(self):
        x = np.random.RandomState(1).randn(5, 8).astype(np.float32)
        out = self.infer_json("mlp", "x", "FP32", x)
        self.assertEqual(out["model_name"], "mlp")
        y = out["outputs"][0]
        self.assertEqual(y["datatype"], "FP32")
        self.assertEqual(y["shape"], [5, 8])
        grpc = self.coord.client.infer("mlp", [x])[0]
        # Within float32 rounding, not bit for bit: a stage joins the
        # microbatches queued together into one product (StageHost), and
        # how many are queued varies from run to run, so two gRPC calls
        # differ in the last bit too.
        np.testing.assert_allclose(np.array(y["data"], np.float32).reshape(5, 8), grpc,
                                   rtol=1e-6, atol=1e-6)
        with torch.no_grad():
            np.testing.assert_allclose(grpc, self.mlp(torch.from_numpy(x)).numpy(), atol=1e-5)

    def test_int64_ids_through_a_transformer_equal_grpc(self):
        ids = np.random.RandomState(2).randint(0, 97, (2, 16)).astype(np.int64)
        out = self.infer_json("gpt2", "idx", "INT64", ids)
        logits = out["outputs"][0]
        grpc = self.coord.client.infer("gpt2", [ids])[0]
        self.assertEqual(logits["shape"], list(grpc.shape))
        np.testing.assert_allclose(np.array(logits["data"], np.float32).reshape(grpc.shape),
                                   grpc, rtol=1e-5, atol=1e-6)

    def infer_binary(self, model, header, blob):
        """A binary-extension request: its response's JSON and the bytes after it."""
        body = json.dumps(header).encode()
        status, data, length = None, None, None
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request("POST", f"/v2/models/{model}/infer", body + blob,
                     {"Inference-Header-Content-Length": str(len(body)),
                      "Content-Type": "application/octet-stream"})
        resp = conn.getresponse()
        data = resp.read()
        status, length = resp.status, resp.getheader("Inference-Header-Content-Length")
        conn.close()
        self.assertEqual(status, 200, data)
        if length is None:
            return json.loads(data), b""
        return json.loads(data[:int(length)]), data[int(length):]

    def test_bf16_travels_as_binary_and_equals_grpc(self):
        x = torch.randn(3, 8).to(torch.bfloat16)
        bits = x.view(torch.int16).numpy().astype("<i2").tobytes()
        out, blob = self.infer_binary(
            "mlp16", {"inputs": [{"name": "x", "datatype": "BF16", "shape": [3, 8],
                                  "parameters": {"binary_data_size": len(bits)}}],
                      "parameters": {"binary_data_output": True}}, bits)
        y = out["outputs"][0]
        self.assertEqual((y["datatype"], y["shape"]), ("BF16", [3, 8]))
        self.assertEqual(y["parameters"]["binary_data_size"], len(blob))
        got = torch.from_numpy(np.frombuffer(blob, "<i2").copy()).view(torch.bfloat16)
        grpc = self.coord.client.infer("mlp16", [x])[0]  # float32 from BF16
        np.testing.assert_allclose(got.float().numpy().reshape(3, 8), grpc, rtol=1e-2, atol=1e-2)
        self.assertIn("binary_tensor_data", json.loads(self.request("GET", "/v2")[1])["extensions"])
        # Without asking for binary, a BF16 output is refused, naming how to ask.
        status, data = self.request("POST", "/v2/models/mlp16/infer", json.dumps(
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 8], "data": [0] * 8}]}))
        self.assertEqual(status, 400)

    def test_fp32_binary_input_and_output_equal_json(self):
        x = np.random.RandomState(3).randn(2, 8).astype(np.float32)
        out, blob = self.infer_binary(
            "mlp", {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 8],
                                "parameters": {"binary_data_size": x.nbytes}}],
                    "outputs": [{"name": self.coord.client.metadata("mlp").outputs[0].name,
                                 "parameters": {"binary_data": True}}]}, x.tobytes())
        y = np.frombuffer(blob, np.float32).reshape(2, 8)
        as_json = self.infer_json("mlp", "x", "FP32", x)["outputs"][0]["data"]
        np.testing.assert_allclose(y, np.array(as_json, np.float32).reshape(2, 8), rtol=1e-6,
                                   atol=1e-6)

    def test_curl_reaches_every_kind_of_route(self):
        if shutil.which("curl") is None:
            self.skipTest("no curl")
        base = f"http://127.0.0.1:{self.port}"
        ready = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                f"{base}/v2/health/ready"], capture_output=True, text=True)
        self.assertEqual(ready.stdout, "200")
        body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 8],
                                       "data": [0.5] * 8}]})
        out = subprocess.run(["curl", "-s", "-H", "Content-Type: application/json", "-d", body,
                              f"{base}/v2/models/mlp/infer"], capture_output=True, text=True)
        self.assertEqual(json.loads(out.stdout)["outputs"][0]["shape"], [1, 8])

    def events(self, body):
        """The server-sent events of generate_stream for `body`, parsed."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request("POST", "/v2/models/gen/generate_stream", json.dumps(body))
        resp = conn.getresponse()
        self.assertEqual(resp.status, 200)
        self.assertEqual(resp.getheader("Content-Type"), "text/event-stream")
        got = []
        for line in resp.read().decode().split("\n"):
            if line.startswith("data: "):
                got.append(json.loads(line[6:]))
        conn.close()
        return got

    def test_generate_gives_the_grpc_paths_tokens(self):
        want = list(self.coord.client.generate("gen", [1, 2, 3], max_tokens=8))
        status, data = self.request("POST", "/v2/models/gen/generate",
                                    json.dumps({"input_ids": [1, 2, 3], "max_tokens": 8}))
        self.assertEqual(status, 200, data)
        out = json.loads(data)
        self.assertEqual(out["token_ids"], want)
        self.assertEqual((out["finish_reason"], out["prompt_tokens"]), ("length", 3))
        events = self.events({"input_ids": [1, 2, 3], "parameters": {"max_tokens": 8}})
        self.assertEqual([e["token_id"] for e in events], want)
        self.assertEqual([e["index"] for e in events], list(range(8)))
        self.assertEqual(events[-1]["finish_reason"], "length")
        self.assertNotIn("finish_reason", events[0])
        # Seeded sampling: the same tokens over HTTP and gRPC.
        sampled = {"input_ids": [4, 5], "max_tokens": 6, "temperature": 0.9, "top_k": 20,
                   "seed": 11}
        want = list(self.coord.client.generate("gen", [4, 5], max_tokens=6, temperature=0.9,
                                               top_k=20, seed=11))
        self.assertEqual([e["token_id"] for e in self.events(sampled)], want)

    def test_a_client_that_hangs_up_mid_stream_frees_its_blocks(self):
        self.coord.assert_hang_up_frees_blocks(
            self, self.port, "/v2/models/gen/generate_stream",
            {"input_ids": [1, 2, 3], "max_tokens": 60}, "gen")

    def test_bad_generate_requests_get_errors_naming_the_problem(self):
        # generate_stream too: the status code before any event (it opened
        # a 200 stream and sent the error inside it).
        def error(model, body, status, text):
            for route in ("generate", "generate_stream"):
                got, data = self.request("POST", f"/v2/models/{model}/{route}", json.dumps(body))
                self.assertEqual(got, status, (route, data))
                self.assertIn(text, json.loads(data)["error"], route)

        error("gen", {"input_ids": [1], "max_token": 5}, 400, 'unknown key "max_token"')
        error("gen", {"input_ids": [1], "temperature": -1}, 400, "temperature")
        error("gen", {"input_ids": [1], "max_tokens": 0}, 400, "max_tokens must be in [1, ")
        error("gen", {"input_ids": [1], "temperature": 1e39}, 400, "finite float32")
        error("gen", {"input_ids": []}, 400, "input_ids")
        error("gen", {"input_ids": [1000]}, 400, "not in [0, 97)")
        error("gen", {"input_ids": [1] * 60, "max_tokens": 10}, 400, "the model has 64")
        error("mlp", {"input_ids": [1]}, 400, "not exported for generation")
        error("nope", {"input_ids": [1]}, 404, "nope")

    def test_bad_requests_get_errors_naming_the_problem(self):
        def error(method, path, body, status, text):
            got, data = self.request(method, path, body)
            self.assertEqual(got, status, data)
            self.assertIn(text, json.loads(data)["error"])

        infer = "/v2/models/mlp/infer"
        error("POST", infer, b"{\"inputs\": [", 400, "not valid JSON")
        error("POST", infer, b"{\"id\": \"\xff\"}", 400, "not valid JSON")
        error("POST", infer, b"[" * 64 + b"]" * 64, 400, "nests deeper than 32")
        error("POST", infer, json.dumps({"inputs": [{"name": "x", "datatype": "INT64",
                                                     "shape": [1, 8], "data": [1] * 8}]}),
              400, "x")
        error("POST", infer, json.dumps({"inputs": [{"name": "x", "datatype": "FP32",
                                                     "shape": [2, 8], "data": [1] * 8}]}),
              400, "data holds 8 values, but shape [2,8] needs 16")
        error("POST", "/v2/models/nope/infer", json.dumps({"inputs": []}), 404, "nope")
        error("POST", "/v2/health/live", b"", 405, "use GET")
        error("GET", "/v3/anything", None, 404, "no route")
        # The server serves on.
        self.assertEqual(self.request("GET", "/v2/health/live")[0], 200)


class RestLongGenerationTest(unittest.TestCase):
    """A generation that outlasts --default_timeout_s (one second here)
    runs to its end: an HTTP client cannot give a deadline, and the
    default cut long completions off with a 504 that threw their text
    away."""

    def test_a_generation_outlasts_the_default_timeout(self):
        tmp = tempfile.mkdtemp(dir=os.environ.get("TEST_TMPDIR"))
        coord = Coordinator(tmp, "--default_timeout_s=1", "--http_port=0",
                            f"--http_port_file={tmp}/http_port")
        try:
            port = int(_read(os.path.join(tmp, "http_port")))
            path = os.path.join(tmp, "gen.psm")
            torch.manual_seed(0)
            pipeserve.export(tm.Gpt2(d=128, layers=8, max_len=2048).eval(),
                             (torch.randint(0, 97, (2, 5)),), path, generation=True)
            coord.client.upload("gen", path)
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
            start = time.monotonic()
            conn.request("POST", "/v2/models/gen/generate",
                         json.dumps({"input_ids": [1, 2, 3], "max_tokens": 2000}))
            resp = conn.getresponse()
            data = resp.read()
            elapsed = time.monotonic() - start
            conn.close()
            self.assertEqual(resp.status, 200, data)
            out = json.loads(data)
            self.assertEqual((len(out["token_ids"]), out["finish_reason"]), (2000, "length"))
            # Else the test shows nothing: 2000 steps took 5.3 s here.
            self.assertGreater(elapsed, 1.0)
            print(f"2000 tokens in {elapsed:.1f} s", file=sys.stderr)
        finally:
            coord.close()


class RestTokensTest(unittest.TestCase):
    """With --auth_tokens the REST routes need a token with the infer
    scope (admin tokens have it), as gRPC calls do; the health probes
    answer anyone."""

    def test_routes_need_a_token_with_the_infer_scope(self):
        tmp = tempfile.mkdtemp(dir=os.environ.get("TEST_TMPDIR"))
        tokens = os.path.join(tmp, "tokens")
        infer, admin = "i" * 32, "a" * 32
        with open(tokens, "w") as f:
            f.write(f"infer {infer}\nadmin {admin}\n")
        coord = Coordinator(tmp, f"--auth_tokens={tokens}", "--http_port=0",
                            f"--http_port_file={tmp}/http_port")
        try:
            port = int(_read(os.path.join(tmp, "http_port")))

            def get(path, token=None):
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                conn.request("GET", path, headers={"Authorization": f"Bearer {token}"}
                             if token else {})
                resp = conn.getresponse()
                body = resp.read()
                conn.close()
                return resp.status, resp.getheader("WWW-Authenticate"), body

            self.assertEqual(get("/v2/health/ready")[0], 200)
            status, challenge, body = get("/v2")
            self.assertEqual((status, challenge), (401, "Bearer"))
            self.assertIn("needs a token", json.loads(body)["error"])
            self.assertEqual(get("/v2", "x" * 32)[0], 401)
            self.assertEqual(get("/v2", infer)[0], 200)
            self.assertEqual(get("/v2", admin)[0], 200, "an admin token may infer too")
        finally:
            coord.close()


class RestTlsTest(unittest.TestCase):
    """With --tls_cert the REST port speaks HTTPS with the gRPC port's
    certificate, and with --auth_tokens it checks the same tokens."""

    def test_https_with_the_grpc_certificate_and_tokens(self):
        tmp = tempfile.mkdtemp(dir=os.environ.get("TEST_TMPDIR"))
        cert, key = os.path.join(tmp, "c.pem"), os.path.join(tmp, "k.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:P-256", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                        "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                        "-keyout", key, "-out", cert], check=True, capture_output=True)
        tokens = os.path.join(tmp, "tokens")
        with open(tokens, "w") as f:
            f.write("infer " + "i" * 32 + "\n")
        root = os.path.join(HERE, "..", "..")
        port_file = os.path.join(tmp, "http_port")
        log = open(os.path.join(tmp, "coordinator.log"), "w")
        proc = subprocess.Popen(
            [os.path.join(root, "server/coordinator/coordinator"), "--port=0",
             "--metrics_port=-1", f"--repository={tmp}/repo", f"--tls_cert={cert}",
             f"--tls_key={key}", f"--auth_tokens={tokens}", "--http_port=0",
             f"--http_port_file={port_file}",
             f"--stage_server_binary={os.path.join(root, 'server/stage/stage_server')}"],
            stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 60
            while not (os.path.exists(port_file) and _read(port_file)):
                self.assertIsNone(proc.poll(), open(log.name).read())
                self.assertLess(time.time(), deadline)
                time.sleep(0.02)
            port = int(_read(port_file))
            ctx = ssl.create_default_context(cafile=cert)
            conn = http.client.HTTPSConnection("localhost", port, context=ctx, timeout=30)
            conn.request("GET", "/v2/health/live")
            live = conn.getresponse()
            live.read()
            self.assertEqual(live.status, 200)
            conn.request("GET", "/v2", headers={"Authorization": "Bearer " + "i" * 32})
            resp = conn.getresponse()
            self.assertEqual(resp.status, 200)
            self.assertEqual(json.loads(resp.read())["name"], "pipeserve")
            conn.close()
            plain = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            with self.assertRaises((http.client.HTTPException, OSError)):
                plain.request("GET", "/v2/health/live")
                plain.getresponse().read()
        finally:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    unittest.main()
