"""Tests of pipeserve's PyTorch exporter and model file format.

Run directly or through Bazel:

    /usr/bin/python3 tests/pytorch/exporter_test.py
    bazel test //tests/pytorch:exporter_test

The oracle for the exported graphs is `run_graph`, a plain numpy interpreter
of the ops (float64): every test model's graph must reproduce the PyTorch
module's eager output.
"""

import os
import shutil
import struct
import subprocess
import sys
import tempfile
import unittest
import zlib

_HERE = os.path.dirname(os.path.abspath(__file__))
_PYTHON_DIR = os.path.join(_HERE, "..", "..", "client", "python")
sys.path.insert(0, _PYTHON_DIR)
sys.path.insert(0, _HERE)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import models  # noqa: E402
import pipeserve  # noqa: E402
from pipeserve import ExportError, SplitPoint  # noqa: E402
from pipeserve import exporter  # noqa: E402
from pipeserve.model_file import ModelFormatError, model_pb2  # noqa: E402


def run_graph(graph, tensors, inputs):
    """Runs a pipeserve.Graph with numpy in float64; returns its outputs."""
    env = {name: np.asarray(v, dtype=np.float64) for name, v in inputs.items()}
    for node in graph.nodes:
        if node.op == "pipe_split":
            continue
        if node.op == "param":
            env[node.outputs[0]] = tensors[node.attrs["fqn"].s].astype(
                np.float64)
            continue
        a = [env[name] for name in node.inputs]
        if node.op in ("mm", "matmul"):
            result = a[0] @ a[1]
        elif node.op == "linear":
            # x is [batch, in], weight is [out, in], bias is [out]
            result = a[0] @ a[1].T + (a[2] if len(a) == 3 else 0.0)
        elif node.op == "relu":
            result = np.maximum(a[0], 0.0)
        elif node.op in ("add", "sub", "mul"):
            if "scalar" in node.attrs:
                scalar = node.attrs["scalar"].f
                reverse = node.attrs["reverse"].i if "reverse" in node.attrs \
                    else 0
                lhs, rhs = (scalar, a[0]) if reverse else (a[0], scalar)
            else:
                lhs, rhs = a
            result = {"add": np.add, "sub": np.subtract,
                      "mul": np.multiply}[node.op](lhs, rhs)
        elif node.op in ("clone", "identity"):
            result = a[0].copy()
        else:
            raise AssertionError(f"run_graph: unknown op {node.op}")
        env[node.outputs[0]] = result
    return [env[name] for name in graph.outputs]


class _Sigmoid(torch.nn.Module):  # an op pipeserve lacks
    def forward(self, x):
        return torch.erfinv(x)


class _SigmoidInMlp0(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp0 = _Sigmoid()

    def forward(self, x):
        return self.mlp0(x)


class _TanhMethod(torch.nn.Module):  # a method pipeserve lacks
    def forward(self, x):
        return x.erfinv()


class _AddAlpha(torch.nn.Module):
    def forward(self, x, y):
        return torch.add(x, y, alpha=2)


class _ScalarOps(torch.nn.Module):
    def forward(self, x):
        return 2.0 * (1.0 - x) + 3


class _ReturnsInput(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x, y):
        return self.lin(x), y


class _Dropout(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.lin(x))


class _NonPersistentBuffer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Module()
        self.inner.register_buffer("scale", torch.full((4,), 2.0),
                                   persistent=False)
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x) * self.inner.scale


class _ScalarConstants(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        low = torch.tensor(torch.finfo(y.dtype).min, dtype=y.dtype)
        return torch.where(y > 0, y, low) / torch.full([], 2.0)


class _TensorConstant(torch.nn.Module):
    def forward(self, x):
        return x + torch.tensor([1.0, 2.0, 3.0, 4.0])


class _DoubleParam(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(4, 4, dtype=torch.float64))

    def forward(self, x):
        return torch.mm(x, self.w)


class _KeywordInput(torch.nn.Module):
    def forward(self, x, bias=None, scale=None):
        return x * scale + bias


class _InplaceRelu(torch.nn.Module):
    def __init__(self, reuse):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.relu = torch.nn.ReLU(inplace=True)
        self.reuse = reuse

    def forward(self, x):
        h = self.lin(x)
        r = self.relu(h)
        return r + h if self.reuse else r


class ExporterTestCase(unittest.TestCase):

    def setUp(self):
        self.dir = tempfile.mkdtemp(dir=os.environ.get("TEST_TMPDIR"))
        self.addCleanup(shutil.rmtree, self.dir)

    def export(self, model, example_args, name="model.psm", **kwargs):
        path = os.path.join(self.dir, name)
        info = pipeserve.export(model, example_args, path, **kwargs)
        graph, tensors = pipeserve.load_model(path)
        return info, graph, tensors

    def export_case(self, name, batch=4):
        model = models.make(name)
        inputs = models.example_inputs(name, batch=batch)
        info, graph, tensors = self.export(
            model, tuple(inputs.values()), name=name + ".psm",
            split_spec=getattr(model, "split_spec", None))
        return model, inputs, info, graph, tensors

    def assertExportError(self, model, example_args, *fragments, **kwargs):
        with self.assertRaises(ExportError) as cm:
            pipeserve.export(model, example_args,
                             os.path.join(self.dir, "bad.psm"), **kwargs)
        for fragment in fragments:
            self.assertIn(fragment, str(cm.exception))
        self.assertFalse(os.path.exists(os.path.join(self.dir, "bad.psm")))
        return str(cm.exception)


class PipeSplitTest(ExporterTestCase):

    def test_pipe_split_is_a_no_op_in_eager_mode(self):
        self.assertIsNone(pipeserve.pipe_split())
        model = models.make("multi_mlp")
        x, y = models.example_inputs("multi_mlp").values()
        with torch.no_grad():
            expected = model.mlp3(model.mlp2(model.mlp1(model.mlp0(x)))) - y
            self.assertTrue(torch.equal(model(x, y), expected))

    def test_tracer_is_cleared_after_export_even_on_error(self):
        self.export(models.make("late_input"), (torch.randn(2, 128),) * 2)
        self.assertIsNone(exporter._ACTIVE_TRACER)
        self.assertExportError(models.Unsupported(), (torch.randn(1, 3, 8, 8),))
        self.assertIsNone(exporter._ACTIVE_TRACER)

    def test_split_point_values_match_the_proto_enum(self):
        self.assertEqual(SplitPoint.BEGINNING, model_pb2.BEGINNING)
        self.assertEqual(SplitPoint.END, model_pb2.END)


class SeedModelTest(ExporterTestCase):
    """test_pipe.py's three models."""

    EXPECTED_STAGES = {"example_code": 4, "multi_mlp": 4, "param_alias": 2}

    def test_seed_models_export_with_expected_stage_counts(self):
        for name, stages in self.EXPECTED_STAGES.items():
            with self.subTest(name):
                _, _, info, graph, _ = self.export_case(name)
                self.assertEqual(info.num_stages, stages)
                self.assertEqual(
                    sum(n.op == "pipe_split" for n in graph.nodes), stages - 1)
                self.assertEqual(info.input_names, ["x", "y"])
                self.assertEqual(len(info.output_names), 1)

    def test_every_crc_matches_and_weights_round_trip_bit_exactly(self):
        for name in self.EXPECTED_STAGES:
            with self.subTest(name):
                model, _, _, graph, tensors = self.export_case(name)
                state = model.state_dict()
                self.assertEqual(sorted(tensors), sorted(p.fqn
                                                         for p in graph.params))
                for info in graph.params:
                    array = tensors[info.fqn]
                    self.assertEqual(info.crc32,
                                     zlib.crc32(array.tobytes()) & 0xffffffff)
                    self.assertEqual(info.byte_size, array.size * 4)
                    self.assertEqual(list(info.shape), list(array.shape))
                    expected = state[info.fqn].numpy()
                    self.assertTrue(np.array_equal(array.view(np.uint32),
                                                   expected.view(np.uint32)),
                                    info.fqn)

    def test_file_layout_matches_the_spec(self):
        _, _, info, graph, tensors = self.export_case("example_code")
        with open(info.path, "rb") as f:
            data = f.read()
        self.assertEqual(data[:8], b"PIPESRV1")
        (header_size,) = struct.unpack("<Q", data[8:16])
        header = model_pb2.Graph()
        header.ParseFromString(data[16:16 + header_size])
        self.assertEqual(header, graph)
        data_start = (16 + header_size + 63) // 64 * 64
        self.assertEqual(data[16 + header_size:data_start],
                         b"\0" * (data_start - 16 - header_size))
        end = data_start
        for p in sorted(graph.params, key=lambda p: p.offset):
            self.assertEqual(p.offset % 64, 0, p.fqn)
            begin = data_start + p.offset
            self.assertEqual(data[end:begin], b"\0" * (begin - end), p.fqn)
            self.assertEqual(data[begin:begin + p.byte_size],
                             tensors[p.fqn].astype("<f4").tobytes(), p.fqn)
            end = begin + p.byte_size
        self.assertEqual(len(data), end)

    def test_example_code_stores_multi_use_param_once(self):
        _, _, _, graph, _ = self.export_case("example_code")
        reads = [n for n in graph.nodes
                 if n.op in ("mm", "linear") and "mm_param1" in n.inputs]
        self.assertEqual([n.name for n in reads], ["mm", "mm_1"])
        param_nodes = [n.name for n in graph.nodes if n.op == "param"]
        self.assertEqual(param_nodes, ["mm_param1", "lin1.weight", "lin1.bias",
                                       "mm_param2", "lin2.weight", "lin2.bias"])
        self.assertEqual([p.fqn for p in graph.params], param_nodes)

    def test_aliases_map_both_alias_keys_and_cover_state_dict(self):
        model, _, info, graph, _ = self.export_case("param_alias")
        keys = list(model.state_dict().keys())
        self.assertEqual(keys, ["mm_param1", "mm_param0", "lin1.weight",
                                "lin1.bias", "lin0.weight", "lin0.bias"])
        self.assertEqual(list(graph.state_dict_keys), keys)
        self.assertEqual(info.param_names, keys)
        self.assertEqual(dict(graph.aliases),
                         {"mm_param0": "mm_param1",
                          "lin0.weight": "lin1.weight",
                          "lin0.bias": "lin1.bias"})
        stored = [p.fqn for p in graph.params]
        self.assertEqual(stored, ["mm_param1", "lin1.weight", "lin1.bias"])
        self.assertEqual(set(stored) | set(graph.aliases), set(keys))
        # Both mm nodes read the one param node.
        mms = [n for n in graph.nodes if n.op == "mm"]
        self.assertEqual([n.inputs[1] for n in mms], ["mm_param1"] * 2)

    def test_graph_reproduces_eager_output_for_every_fixture_model(self):
        for name in models.NAMES:
            with self.subTest(name):
                model, inputs, info, graph, tensors = self.export_case(name)
                with torch.no_grad():
                    expected = model(*inputs.values()).numpy()
                (got,) = run_graph(graph, tensors,
                                   dict(zip(info.input_names,
                                            (t.numpy() for t in
                                             inputs.values()))))
                scale = max(1.0, float(np.abs(expected).max()))
                np.testing.assert_allclose(got, expected, rtol=1e-4,
                                           atol=1e-5 * scale)


class SplitSpecTest(ExporterTestCase):

    def test_split_spec_is_recorded_and_counted_for_multi_mlp_list(self):
        _, _, info, graph, _ = self.export_case("mlp_list4")
        self.assertEqual(info.num_stages, 4)
        self.assertEqual([(e.module, e.point) for e in graph.split_spec],
                         [("layers.1", model_pb2.BEGINNING),
                          ("layers.2", model_pb2.BEGINNING),
                          ("layers.3", model_pb2.BEGINNING)])
        self.assertFalse(any(n.op == "pipe_split" for n in graph.nodes))

    def test_split_spec_is_recorded_and_counted_for_transformer_like(self):
        _, _, info, graph, _ = self.export_case("transformer_like")
        self.assertEqual(info.num_stages, 2)
        self.assertEqual([(e.module, e.point) for e in graph.split_spec],
                         [("layers.4", model_pb2.BEGINNING)])

    def test_end_split_and_a_cut_shared_with_a_marker_count_once(self):
        model = models.make("multi_mlp")
        x, y = models.example_inputs("multi_mlp", batch=2).values()
        # The markers cut after 3, 6 and 9 compute nodes. END of mlp1 and
        # BEGINNING of mlp2 are both at 6; BEGINNING of mlp0.net2 (2) is new.
        info, graph, _ = self.export(
            model, (x, y), split_spec={"mlp1": SplitPoint.END,
                                       "mlp0.net2": SplitPoint.BEGINNING,
                                       "mlp2": SplitPoint.BEGINNING})
        self.assertEqual(info.num_stages, 5)
        self.assertEqual([(e.module, e.point) for e in graph.split_spec],
                         [("mlp1", model_pb2.END),
                          ("mlp0.net2", model_pb2.BEGINNING),
                          ("mlp2", model_pb2.BEGINNING)])

    def test_unknown_split_spec_module_raises(self):
        model = models.make("mlp_list4")
        self.assertExportError(
            model, tuple(models.example_inputs("mlp_list4").values()),
            "split_spec names unknown module 'layers.9'",
            split_spec={"layers.9": SplitPoint.BEGINNING})

    def test_split_that_empties_a_stage_raises(self):
        model = models.make("mlp_list4")
        args = tuple(models.example_inputs("mlp_list4").values())
        self.assertExportError(
            model, args, "split at BEGINNING of module 'layers.0' makes an "
            "empty stage", split_spec={"layers.0": SplitPoint.BEGINNING})
        message = self.assertExportError(
            models.make("no_markers"), (torch.randn(2, 128),),
            "makes an empty stage", split_spec={"layers.11": SplitPoint.END})
        self.assertIn("'layers.11'", message)


class ModulePathTest(ExporterTestCase):

    def test_transformer_like_nodes_carry_leaf_module_paths(self):
        _, _, _, graph, _ = self.export_case("transformer_like")
        path = {n.name: n.module_path for n in graph.nodes}
        self.assertEqual(path["layers_0_net1"], "layers.0.net1")
        self.assertEqual(path["layers_0_relu"], "layers.0.relu")
        self.assertEqual(path["layers_7_net2"], "layers.7.net2")
        self.assertEqual(path["layers.4.net1.weight"], "layers.4.net1")
        linears = [n for n in graph.nodes if n.op == "linear"]
        self.assertEqual(len(linears), 16)
        self.assertEqual([n.module_path for n in linears[:3]],
                         ["layers.0.net1", "layers.0.net2", "layers.1.net1"])

    def test_multi_mlp_paths_are_submodules_and_top_level(self):
        _, _, _, graph, _ = self.export_case("multi_mlp")
        ops = [(n.op, n.module_path) for n in graph.nodes if n.op != "param"]
        self.assertEqual(ops[:4], [("linear", "mlp0.net1"),
                                   ("relu", "mlp0.relu"),
                                   ("linear", "mlp0.net2"),
                                   ("pipe_split", "")])
        self.assertEqual(ops[-1], ("sub", ""))

    def test_aliased_module_calls_carry_the_alias_they_were_called_by(self):
        _, _, _, graph, _ = self.export_case("param_alias")
        linears = [n for n in graph.nodes if n.op == "linear"]
        self.assertEqual([n.module_path for n in linears], ["lin0", "lin1"])
        self.assertEqual([list(n.inputs[1:]) for n in linears],
                         [["lin1.weight", "lin1.bias"]] * 2)


class UnsupportedTest(ExporterTestCase):

    def test_unsupported_module_names_type_and_path(self):
        message = self.assertExportError(models.Unsupported(),
                                         (torch.randn(1, 3, 8, 8),))
        self.assertEqual(message,
                         "unsupported module torch.nn.Conv2d at 'features.0'")

    def test_unsupported_function_names_op_and_path(self):
        message = self.assertExportError(_SigmoidInMlp0(), (torch.randn(2, 4),))
        self.assertEqual(message,
                         "unsupported op torch.erfinv at module path 'mlp0'")

    def test_unsupported_method_at_top_level(self):
        self.assertExportError(_TanhMethod(), (torch.randn(2, 4),),
                               "unsupported op Tensor.erfinv at module path ''")

    def test_add_with_alpha_raises(self):
        self.assertExportError(_AddAlpha(), (torch.randn(2, 4),) * 2,
                               "torch.add", "alpha=2", "module path ''")

    def test_dropout_in_training_mode_raises_and_is_identity_in_eval(self):
        model = _Dropout()
        self.assertExportError(model, (torch.randn(2, 4),),
                               "torch.nn.Dropout", "training", "'drop'")
        _, graph, _ = self.export(model.eval(), (torch.randn(2, 4),))
        self.assertEqual([(n.op, n.module_path) for n in graph.nodes
                          if n.op != "param"],
                         [("linear", "lin"), ("identity", "drop")])

    def test_non_float32_input_and_parameter_raise(self):
        self.assertExportError(_TanhMethod(), (torch.ones(2, 4,
                                                          dtype=torch.float64),),
                               "input 'x'", "torch.float64")
        self.assertExportError(_DoubleParam(), (torch.randn(2, 4),),
                               "parameter 'w'", "torch.float64")

    def test_tensor_constant_made_in_forward_raises(self):
        self.assertExportError(_TensorConstant(), (torch.randn(2, 4),),
                               "tensor constant", "module path ''")

    def test_scalar_tensors_made_in_forward_export_as_full_nodes(self):
        # Hugging Face's way of writing a mask value and a scale.
        _, graph, _ = self.export(_ScalarConstants(), (torch.randn(2, 4),))
        fulls = [n for n in graph.nodes if n.op == "full"]
        self.assertEqual(sorted(n.attrs["value"].f for n in fulls),
                         [torch.finfo(torch.float32).min, 2.0])
        self.assertTrue(all(len(n.attrs["shape"].ints.v) == 0 for n in fulls))

    def test_inplace_relu_is_exported_unless_its_input_is_read_again(self):
        _, graph, _ = self.export(_InplaceRelu(reuse=False),
                                  (torch.randn(2, 4),))
        self.assertIn("relu", [n.op for n in graph.nodes])
        self.assertExportError(_InplaceRelu(reuse=True), (torch.randn(2, 4),),
                               "in-place torch.nn.ReLU", "'relu'")


class GraphConventionTest(ExporterTestCase):

    def test_scalar_operands_carry_scalar_and_reverse(self):
        _, graph, _ = self.export(_ScalarOps(), (torch.randn(2, 4),))
        ops = [(n.op, list(n.inputs), dict(n.attrs)) for n in graph.nodes]
        self.assertEqual([o[:2] for o in ops],
                         [("sub", ["x"]), ("mul", ["sub"]), ("add", ["mul"])])
        self.assertEqual(ops[0][2]["scalar"].f, 1.0)
        self.assertEqual(ops[0][2]["reverse"].i, 1)
        self.assertEqual(ops[1][2]["scalar"].f, 2.0)
        self.assertEqual(ops[1][2]["reverse"].i, 1)
        self.assertEqual(ops[2][2]["scalar"].f, 3.0)
        self.assertNotIn("reverse", ops[2][2])

    def test_input_returned_directly_gets_an_identity_node(self):
        info, graph, _ = self.export(_ReturnsInput(), (torch.randn(2, 4),) * 2)
        self.assertEqual(info.output_names, ["lin", "y_identity"])
        last = graph.nodes[-1]
        self.assertEqual((last.name, last.op, list(last.inputs),
                          list(last.outputs)),
                         ("y_identity", "identity", ["y"], ["y_identity"]))

    def test_inputs_are_batched_unless_replicated(self):
        info, graph, _ = self.export(
            models.make("late_input"),
            (torch.randn(3, 128), torch.randn(1, 128)), replicated=("y",))
        self.assertEqual([(v.name, v.dtype, list(v.shape), v.batched)
                          for v in graph.inputs],
                         [("x", model_pb2.DT_FLOAT32, [-1, 128], True),
                          ("y", model_pb2.DT_FLOAT32, [1, 128], False)])
        self.assertExportError(models.make("late_input"),
                               (torch.randn(3, 128),) * 2,
                               "replicated/dynamic_dims name unknown inputs ['z']",
                               replicated=("z",))

    def test_keyword_inputs_follow_positional_ones(self):
        info, graph, _ = self.export(
            _KeywordInput(), (torch.randn(2, 4),),
            example_kwargs={"scale": torch.randn(2, 4),
                            "bias": torch.randn(2, 4)})
        self.assertEqual(info.input_names, ["x", "bias", "scale"])
        self.assertEqual([(n.op, list(n.inputs)) for n in graph.nodes],
                         [("mul", ["x", "scale"]), ("add", ["mul", "bias"])])

    def test_non_persistent_buffer_is_stored_outside_the_state_dict(self):
        info, graph, tensors = self.export(_NonPersistentBuffer(),
                                           (torch.randn(2, 4),))
        self.assertNotIn("inner.scale", info.param_names)
        (scale,) = [p for p in graph.params if p.fqn == "inner.scale"]
        self.assertTrue(scale.is_buffer)
        self.assertFalse(scale.in_state_dict)
        np.testing.assert_array_equal(tensors["inner.scale"], [2.0] * 4)
        weight = [p for p in graph.params if p.fqn == "lin.weight"][0]
        self.assertFalse(weight.is_buffer)
        self.assertTrue(weight.in_state_dict)

    def test_cval_buffer_is_a_state_dict_buffer(self):
        _, _, _, graph, _ = self.export_case("cval3")
        (cval,) = [p for p in graph.params if p.fqn == "cval"]
        self.assertTrue(cval.is_buffer)
        self.assertTrue(cval.in_state_dict)
        clone = [n for n in graph.nodes if n.op == "clone"][0]
        self.assertEqual(list(clone.inputs), ["cval"])


class ModelFileTest(ExporterTestCase):

    def test_write_is_atomic_and_leaves_no_temp_file(self):
        path = os.path.join(self.dir, "model.psm")
        with open(path, "wb") as f:
            f.write(b"old contents")
        with open(path, "rb") as old:
            pipeserve.export(models.make("late_input"),
                             (torch.randn(2, 128),) * 2, path)
            # The old file was replaced, not rewritten in place: a reader
            # that had it open still sees the old bytes.
            self.assertEqual(old.read(), b"old contents")
        self.assertEqual(os.listdir(self.dir), ["model.psm"])
        with open(path, "rb") as f:
            self.assertEqual(f.read(8), b"PIPESRV1")

    def test_load_model_detects_a_flipped_data_byte(self):
        info, graph, _ = self.export(models.make("late_input"),
                                     (torch.randn(2, 128),) * 2)
        with open(info.path, "r+b") as f:
            f.seek(-1, os.SEEK_END)
            last = f.read(1)
            f.seek(-1, os.SEEK_END)
            f.write(bytes([last[0] ^ 1]))
        last_tensor = max(graph.params, key=lambda p: p.offset).fqn
        with self.assertRaises(ModelFormatError) as cm:
            pipeserve.load_model(info.path)
        self.assertIn(f"tensor '{last_tensor}': crc32", str(cm.exception))

    def test_load_model_rejects_bad_magic_and_truncation(self):
        info, _, _ = self.export(models.make("late_input"),
                                 (torch.randn(2, 128),) * 2)
        with open(info.path, "rb") as f:
            data = f.read()
        bad = os.path.join(self.dir, "bad_magic.psm")
        with open(bad, "wb") as f:
            f.write(b"NOTPIPE1" + data[8:])
        with self.assertRaisesRegex(ModelFormatError, "bad magic"):
            pipeserve.load_model(bad)
        short = os.path.join(self.dir, "short.psm")
        with open(short, "wb") as f:
            f.write(data[:-4])
        with self.assertRaisesRegex(ModelFormatError, "run past the end"):
            pipeserve.load_model(short)


class ProtoLoaderTest(unittest.TestCase):

    def test_concurrent_processes_share_one_cache_entry(self):
        cache = tempfile.mkdtemp(dir=os.environ.get("TEST_TMPDIR"))
        self.addCleanup(shutil.rmtree, cache)
        env = dict(os.environ, XDG_CACHE_HOME=cache,
                   PYTHONPATH=os.path.abspath(_PYTHON_DIR))
        code = ("from pipeserve._proto import load_proto; "
                "m = load_proto('model.proto'); print(m.__file__)")
        procs = [subprocess.Popen([sys.executable, "-c", code], env=env,
                                  stdout=subprocess.PIPE, text=True)
                 for _ in range(4)]
        files = {p.communicate()[0].strip() for p in procs}
        self.assertEqual([p.returncode for p in procs], [0] * 4)
        entries = os.listdir(cache)
        self.assertEqual(len(entries), 1, entries)
        self.assertTrue(entries[0].startswith("pipeserve-proto-"))
        self.assertEqual(files, {os.path.join(cache, entries[0],
                                              "model_pb2.py")})

    def run_python(self, code, **env):
        result = subprocess.run(
            [sys.executable, "-c", code],
            env=dict(os.environ, PYTHONPATH=os.path.abspath(_PYTHON_DIR),
                     **env),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.assertEqual(result.returncode, 0, result.stderr)
        return result.stdout.strip()

    def test_unwritable_cache_roots_fall_back_to_the_temp_dir(self):
        tmp = tempfile.mkdtemp(dir=os.environ.get("TEST_TMPDIR"))
        self.addCleanup(shutil.rmtree, tmp)
        blocker = os.path.join(tmp, "a_file")
        open(blocker, "w").close()  # nothing can be created under a file
        out = self.run_python(
            "from pipeserve._proto import load_proto; "
            "print(load_proto('model.proto').__file__)",
            XDG_CACHE_HOME=os.path.join(blocker, "cache"), HOME=blocker,
            TMPDIR=tmp)
        self.assertEqual(os.path.dirname(os.path.dirname(out)), tmp)
        self.assertTrue(out.endswith("model_pb2.py"))

    def test_grpc_service_proto_and_its_imports_are_generated(self):
        tmp = tempfile.mkdtemp(dir=os.environ.get("TEST_TMPDIR"))
        self.addCleanup(shutil.rmtree, tmp)
        proto_dir = os.path.join(tmp, "proto")
        os.mkdir(proto_dir)
        from pipeserve import _proto
        shutil.copy(os.path.join(_proto.proto_dir(), "model.proto"), proto_dir)
        with open(os.path.join(proto_dir, "svc.proto"), "w") as f:
            f.write('syntax = "proto3";\npackage pipeserve;\n'
                    'import "model.proto";\n'
                    "service Svc { rpc Cut(Graph) returns (Plan); }\n")
        out = self.run_python(
            "from pipeserve import _proto; "
            f"_proto._PROTO_DIR = {proto_dir!r}; "
            "pb2, grpc = _proto.load_proto('svc.proto', grpc=True); "
            "print(pb2.DESCRIPTOR.services_by_name['Svc'].full_name, "
            "grpc.SvcStub.__name__, "
            "pb2.DESCRIPTOR.dependencies[0].name)",
            XDG_CACHE_HOME=os.path.join(tmp, "cache"))
        self.assertEqual(out, "pipeserve.Svc SvcStub model.proto")


if __name__ == "__main__":
    unittest.main()
