"""Tests of pipeserve.Client (client/python/pipeserve/client.py) against an
in-process fake coordinator: a grpcio server on a loopback port chosen at run
time that serves the KServe v2 API and ModelService with canned behaviour.
The round trips through a real coordinator are tests/serving_*.

Run directly or through Bazel:

    /usr/bin/python3 tests/pytorch/client_test.py
    bazel test //tests/pytorch:client_test
"""

import os
import sys
import tempfile
import threading
import time
import unittest
import zlib
from concurrent import futures

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, "..", "..", "client", "python"))

import grpc  # noqa: E402
import numpy as np  # noqa: E402

import pipeserve  # noqa: E402
from pipeserve import load_proto  # noqa: E402

pb, pb_grpc = load_proto("grpc_service.proto", grpc=True)
ps, ps_grpc = load_proto("pipeserve_service.proto", grpc=True)


def _not_known(context, name):
    context.abort(grpc.StatusCode.NOT_FOUND, f'model "{name}" is not known')


_INFER_MODELS = ("neg", "slow", "bad", "flaky", "huge")


class FakeInference(pb_grpc.GRPCInferenceServiceServicer):
    """Models: "neg" answers each input negated as neg_<input>; "slow" the
    same after up to 2 s; "bad" an output whose bytes miss half its shape; "flaky" like
    "neg" after state["flaky_failures"] UNAVAILABLE answers; "huge" an
    empty output claiming shape [2^40, 2^40] (2^80 elements, 0 when counted
    in int64)."""

    def __init__(self, state):
        self.state = state

    def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.state["serving"])

    def ModelReady(self, request, context):
        if request.name not in _INFER_MODELS:
            _not_known(context, request.name)
        return pb.ModelReadyResponse(ready=True)

    def ModelMetadata(self, request, context):
        if request.name not in _INFER_MODELS:
            _not_known(context, request.name)
        r = pb.ModelMetadataResponse(name=request.name, platform="pipeserve")
        for n in ("x", "y"):
            r.inputs.add(name=n, datatype="FP32", shape=[-1, -1])
            r.outputs.add(name="neg_" + n, datatype="FP32", shape=[-1, -1])
        return r

    def ModelInfer(self, request, context):
        if request.model_name not in _INFER_MODELS:
            _not_known(context, request.model_name)
        if request.model_name == "flaky":
            self.state["flaky_attempts"] += 1
            if self.state["flaky_failures"] > 0:
                self.state["flaky_failures"] -= 1
                context.abort(grpc.StatusCode.UNAVAILABLE, "flaky: not this time")
        if request.model_name == "slow":
            end = time.monotonic() + 2
            while time.monotonic() < end and context.is_active():
                time.sleep(0.01)
        self.state["requests"].append(request)
        r = pb.ModelInferResponse(model_name=request.model_name)
        if request.model_name == "huge":
            r.outputs.add(name="neg_x", datatype="FP32", shape=[1 << 40, 1 << 40])
            r.raw_output_contents.append(b"")
            return r
        for t, raw in zip(request.inputs, request.raw_input_contents):
            r.outputs.add(name="neg_" + t.name, datatype="FP32", shape=t.shape)
            neg = (-np.frombuffer(raw, dtype="<f4")).astype("<f4").tobytes()
            if request.model_name == "bad":
                neg = neg[:len(neg) // 2]
            r.raw_output_contents.append(neg)
        return r


class FakeModels(ps_grpc.ModelServiceServicer):
    """Uploads check the client's size and CRC-32; a model named "reject"
    is refused after its first message."""

    def __init__(self, state):
        self.state = state

    def Upload(self, request_iterator, context):
        up = {"messages": 0, "bytes": 0, "crc": 0, "last": None}
        for r in request_iterator:
            if up["messages"] == 0:
                up["name"], up["options"] = r.name, r.options
                if r.name == "reject":
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                  'model "reject": refused')
            up["messages"] += 1
            up["bytes"] += len(r.data)
            up["crc"] = zlib.crc32(r.data, up["crc"])
            if r.last:
                up["last"] = (r.total_bytes, r.crc32)
        if up["last"] != (up["bytes"], up["crc"]):
            context.abort(grpc.StatusCode.DATA_LOSS,
                          f"received {up['bytes']} bytes with CRC "
                          f"{up['crc']}, last message says {up['last']}")
        self.state["uploads"].append(up)
        return ps.UploadResponse(name=up["name"], bytes=up["bytes"],
                                 num_stages=max(1, up["options"].num_stages))

    def GetPlan(self, request, context):
        if request.name not in self.state["plans"]:
            _not_known(context, request.name)
        return self.state["plans"][request.name]

    def ListModels(self, request, context):
        r = ps.ListModelsResponse()
        for up in self.state["uploads"]:
            r.models.add(name=up["name"], state="READY",
                         num_stages=max(1, up["options"].num_stages),
                         bytes=up["bytes"])
        return r


class FakeServer:
    def __init__(self):
        self.state = {"serving": True, "uploads": [], "plans": {},
                      "requests": [], "flaky_failures": 0,
                      "flaky_attempts": 0}
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                                  options=[("grpc.max_receive_message_length", -1),
                                           ("grpc.max_send_message_length", -1)])
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(
            FakeInference(self.state), self.server)
        ps_grpc.add_ModelServiceServicer_to_server(FakeModels(self.state),
                                                   self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{port}"
        self.server.start()

    def stop(self):
        self.server.stop(grace=None)


def _write(path, n):
    """Writes n pseudo-random bytes; returns their CRC-32."""
    data = np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8)
    data = data.tobytes()
    with open(path, "wb") as f:
        f.write(data)
    return zlib.crc32(data)


class ClientTest(unittest.TestCase):

    def setUp(self):
        self.server = FakeServer()
        self.client = pipeserve.Client(self.server.address, timeout=10)
        self.tmp = tempfile.mkdtemp(prefix="client_test_", dir=os.environ.get("TEST_TMPDIR"))

    def tearDown(self):
        self.client.close()
        self.server.stop()

    def test_upload_streams_mib_chunks_with_crc_and_options(self):
        path = os.path.join(self.tmp, "m.psm")
        size = 5 * (1 << 20) // 2  # 2.5 MiB: chunks of 1, 1 and 0.5 MiB
        crc = _write(path, size)
        calls = []
        info = self.client.upload(
            "m", path, num_stages=3, microbatches=8, replicas=2,
            split_spec={"layers.1": "END", "layers.3": 1},
            progress=lambda sent, total: calls.append((sent, total)))
        self.assertEqual(info, {"name": "m", "bytes": size, "num_stages": 3})
        (up,) = self.server.state["uploads"]
        self.assertEqual(up["messages"], 3)
        self.assertEqual(up["crc"], crc)
        self.assertEqual(up["options"].num_stages, 3)
        self.assertEqual(up["options"].microbatches, 8)
        self.assertEqual(up["options"].replicas, 2)
        self.assertEqual([(e.module, e.point)
                          for e in up["options"].split_spec],
                         [("layers.1", 2), ("layers.3", 1)])
        self.assertEqual(calls, [(1 << 20, size), (2 << 20, size),
                                 (size, size)])

    def test_upload_of_an_empty_file_sends_one_last_message(self):
        path = os.path.join(self.tmp, "empty.psm")
        _write(path, 0)
        self.assertEqual(self.client.upload("e", path)["bytes"], 0)
        self.assertEqual(self.server.state["uploads"][0]["messages"], 1)

    def test_upload_of_a_missing_file_raises_file_not_found(self):
        with self.assertRaises(FileNotFoundError):
            self.client.upload("m", os.path.join(self.tmp, "nope.psm"))
        self.assertEqual(self.server.state["uploads"], [])

    def test_upload_refused_by_the_server_raises_server_error(self):
        path = os.path.join(self.tmp, "big.psm")
        _write(path, 3 << 20)
        with self.assertRaises(pipeserve.ServerError) as cm:
            self.client.upload("reject", path)
        self.assertEqual(cm.exception.code, "INVALID_ARGUMENT")
        self.assertEqual(cm.exception.message, 'model "reject": refused')

    def test_file_that_shrinks_during_upload_raises_os_error(self):
        path = os.path.join(self.tmp, "shrinks.psm")
        _write(path, 3 << 20)

        def truncate(sent, total):
            os.truncate(path, (1 << 20) + 10)

        with self.assertRaisesRegex(OSError, r"read 1048586 of 3145728 bytes"):
            self.client.upload("m", path, progress=truncate)
        self.assertEqual(self.server.state["uploads"], [])

    def test_bad_split_point_is_a_value_error(self):
        path = os.path.join(self.tmp, "m.psm")
        _write(path, 10)
        with self.assertRaisesRegex(ValueError, "expected BEGINNING or END"):
            self.client.upload("m", path, split_spec={"a": "MIDDLE"})

    def test_models_lists_uploads(self):
        path = os.path.join(self.tmp, "m.psm")
        _write(path, 1000)
        self.assertEqual(self.client.models(), [])
        self.client.upload("a", path, num_stages=2)
        self.assertEqual(self.client.models(), [
            {"name": "a", "state": "READY", "num_stages": 2, "bytes": 1000,
             "reason": ""}])

    def test_plan_returns_the_response(self):
        r = ps.GetPlanResponse(name="a", stage_servers=["h1:1", "h2:2"],
                               microbatches=4, state="READY")
        self.server.state["plans"]["a"] = r
        self.assertEqual(self.client.plan("a"), r)

    def test_infer_in_input_order_round_trips_shapes_and_values(self):
        x = np.arange(6, dtype=np.float32).reshape(2, 3)
        y = np.array([[[0.5, -1.5], [0.0, 1e30]]], dtype=np.float32)
        nx, ny = self.client.infer("neg", [x, y])
        np.testing.assert_array_equal(nx, -x)
        np.testing.assert_array_equal(ny, -y)
        self.assertEqual(nx.dtype, np.float32)
        self.assertTrue(nx.flags.writeable)
        (request,) = self.server.state["requests"]
        self.assertEqual([(t.name, t.datatype, list(t.shape))
                          for t in request.inputs],
                         [("x", "FP32", [2, 3]), ("y", "FP32", [1, 2, 2])])

    def test_infer_by_name_converts_to_contiguous_float32(self):
        x = np.arange(12, dtype=np.float64).reshape(3, 4).T  # not contiguous
        (nx,) = self.client.infer("neg", {"x": x})
        np.testing.assert_array_equal(nx, -x.astype(np.float32))
        self.assertEqual(nx.shape, (4, 3))
        self.assertEqual(self.server.state["requests"][0].inputs[0].name, "x")

    def test_infer_with_the_wrong_number_of_inputs_names_them(self):
        with self.assertRaisesRegex(ValueError, r"takes 2 inputs \(x, y\)"):
            self.client.infer("neg", [np.zeros((1, 1))])

    def test_server_error_keeps_code_and_message(self):
        with self.assertRaises(pipeserve.ServerError) as cm:
            self.client.infer("x", {"x": np.zeros((1, 1))})
        self.assertEqual(cm.exception.code, "NOT_FOUND")
        self.assertEqual(cm.exception.message, 'model "x" is not known')
        self.assertEqual(str(cm.exception),
                         'NOT_FOUND: model "x" is not known')
        self.assertIsInstance(cm.exception, Exception)

    def test_malformed_response_is_internal_naming_the_output(self):
        with self.assertRaisesRegex(pipeserve.ServerError,
                                    r'output "neg_x": 8 bytes for shape '
                                    r'\[2, 2\] \(16 expected\)') as cm:
            self.client.infer("bad", {"x": np.zeros((2, 2))})
        self.assertEqual(cm.exception.code, "INTERNAL")

    def test_a_shape_whose_size_overflows_int64_is_a_server_error(self):
        # Regression: np.prod wrapped 2^80 to 0, so no bytes "matched" and
        # reshape raised ValueError instead of a ServerError.
        with self.assertRaisesRegex(pipeserve.ServerError,
                                    r'output "neg_x": 0 bytes for shape') as cm:
            self.client.infer("huge", {"x": np.zeros((1, 1))})
        self.assertEqual(cm.exception.code, "INTERNAL")

    def test_a_batch_of_zero_rows_round_trips(self):
        # Regression: memoryview(...).cast("B") refused any array with a 0
        # in its shape (TypeError), though the server answers such batches.
        (nx,) = self.client.infer("neg", {"x": np.zeros((0, 4), np.float32)})
        self.assertEqual(nx.shape, (0, 4))
        self.assertEqual(nx.dtype, np.float32)
        (request,) = self.server.state["requests"]
        self.assertEqual(list(request.inputs[0].shape), [0, 4])

    def test_infer_retries_unavailable_and_succeeds(self):
        # Larger than gRPC's default retry buffer (256 KiB) too.
        big = np.zeros((512, 1024), np.float32)
        self.server.state["flaky_failures"] = 3
        out = self.client.infer("flaky", [np.array([[1, 2, 3]], np.float32),
                                          big])
        np.testing.assert_array_equal(out[0], [[-1, -2, -3]])
        self.assertEqual(self.server.state["flaky_attempts"], 4)

    def test_retries_stop_at_the_attempt_limit_with_the_servers_error(self):
        self.server.state["flaky_failures"] = 100
        with self.assertRaises(pipeserve.ServerError) as e:
            self.client.infer("flaky", [np.zeros((1, 1), np.float32)] * 2)
        self.assertEqual(e.exception.code, "UNAVAILABLE")
        self.assertIn("flaky: not this time", str(e.exception))
        self.assertEqual(self.server.state["flaky_attempts"], 5)

    def test_retries_can_be_turned_off(self):
        client = pipeserve.Client(self.server.address, timeout=10,
                                  retry_attempts=1)
        self.server.state["flaky_failures"] = 1
        with self.assertRaises(pipeserve.ServerError):
            client.infer("flaky", [np.zeros((1, 1), np.float32)] * 2)
        client.close()
        self.assertEqual(self.server.state["flaky_attempts"], 1)

    def test_infer_timeout_is_deadline_exceeded(self):
        with self.assertRaises(pipeserve.ServerError) as cm:
            self.client.infer("slow", {"x": np.zeros((1, 1))}, timeout=0.1)
        self.assertEqual(cm.exception.code, "DEADLINE_EXCEEDED")

    def test_metadata_and_health(self):
        meta = self.client.metadata("neg")
        self.assertEqual([t.name for t in meta.inputs], ["x", "y"])
        self.assertTrue(self.client.model_ready("neg"))
        self.assertTrue(self.client.health())
        self.server.state["serving"] = False
        self.assertFalse(self.client.health())

    def test_health_of_an_unreachable_server_is_false(self):
        address = self.server.address
        self.server.stop()
        with pipeserve.Client(address, timeout=5) as client:
            self.assertFalse(client.health())
            with self.assertRaises(pipeserve.ServerError) as cm:
                client.models()
            self.assertEqual(cm.exception.code, "UNAVAILABLE")

    def test_concurrent_calls_from_threads(self):
        results = [None] * 8

        def run(i):
            (results[i],) = self.client.infer(
                "neg", {"x": np.full((2, 2), i, dtype=np.float32)})

        threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i, r in enumerate(results):
            np.testing.assert_array_equal(r, np.full((2, 2), -i))


    def test_large_tensors_round_trip_exactly_and_come_back_writable(self):
        # 16 MiB each way (gRPC's default limit is 4), through the raw-bytes
        # request and response path.
        x = np.random.default_rng(1).standard_normal((2048, 2048)).astype(np.float32)
        (nx,) = self.client.infer("neg", {"x": x})
        np.testing.assert_array_equal(nx, -x)
        self.assertTrue(nx.flags.writeable)
        nx[0, 0] = 1  # its own memory
        self.assertEqual(self.server.state["requests"][0].raw_input_contents[0],
                         x.tobytes())


class WireTest(unittest.TestCase):
    """pipeserve._wire: ModelInfer messages with tensor bytes kept out of
    protobuf, checked against protobuf's own encoding."""

    def test_encoded_request_parses_as_the_same_request(self):
        from pipeserve import _wire
        head = pb.ModelInferRequest(model_name="m", id="7")
        head.inputs.add(name="x", datatype="FP32", shape=[2, 3])
        head.inputs.add(name="ids", datatype="INT64", shape=[300])
        head.inputs.add(name="empty", datatype="BOOL", shape=[0])
        head.parameters["trace"].bool_param = True
        arrays = [np.arange(6, dtype="<f4").reshape(2, 3),
                  np.arange(300, dtype="<i8"), np.zeros(0, dtype=bool)]
        data = _wire.encode_request(head.SerializeToString(), arrays)
        expected = pb.ModelInferRequest()
        expected.CopyFrom(head)
        for a in arrays:
            expected.raw_input_contents.append(a.tobytes())
        self.assertEqual(pb.ModelInferRequest.FromString(data), expected)

    def test_split_response_finds_each_raw_output_in_any_order(self):
        from pipeserve import _wire
        rest = pb.ModelInferResponse(model_name="m", model_version="1")
        rest.outputs.add(name="a", datatype="FP32", shape=[2])
        rest.outputs.add(name="b", datatype="INT32", shape=[200])
        a = np.array([1.5, -2], dtype="<f4").tobytes()
        b = np.arange(200, dtype="<i4").tobytes()
        raw_a, raw_b = (pb.ModelInferResponse(raw_output_contents=[a]).SerializeToString(),
                        pb.ModelInferResponse(raw_output_contents=[b]).SerializeToString())
        unknown = bytes([15 << 3 | 0, 150, 1])  # field 15, varint 150
        # Raw outputs before, between and after the other fields.
        data = raw_a + rest.SerializeToString() + unknown + raw_b
        head, raws = _wire.split_response(data)
        parsed = pb.ModelInferResponse.FromString(head)
        self.assertEqual(parsed.model_name, "m")
        self.assertEqual([o.name for o in parsed.outputs], ["a", "b"])
        self.assertEqual(len(parsed.raw_output_contents), 0)
        self.assertEqual([data[o:o + n] for o, n in raws], [a, b])
        self.assertEqual(pb.ModelInferResponse.FromString(data).raw_output_contents[:], [a, b])

    def test_truncated_or_corrupt_responses_are_refused_by_name(self):
        from pipeserve import _wire
        r = pb.ModelInferResponse(model_name="m", raw_output_contents=[b"x" * 1000])
        data = r.SerializeToString()
        with self.assertRaisesRegex(_wire.MalformedMessage,
                                    r"raw_output_contents 0 needs 1000 bytes, 999 left"):
            _wire.split_response(data[:-1])
        with self.assertRaisesRegex(_wire.MalformedMessage, "runs past the end"):
            _wire.split_response(bytes([1 << 3 | 2, 5, 0x61]))  # model_name of 5, 1 byte
        with self.assertRaisesRegex(_wire.MalformedMessage, "varint runs past the end"):
            _wire.split_response(bytes([0x80]))
        with self.assertRaisesRegex(_wire.MalformedMessage, "wire type 7"):
            _wire.split_response(bytes([1 << 3 | 7]))
        with self.assertRaisesRegex(_wire.MalformedMessage, "field number 0"):
            _wire.split_response(bytes([0, 0]))


if __name__ == "__main__":
    unittest.main()
