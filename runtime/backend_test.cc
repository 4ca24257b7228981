// The op conformance suite: every op run on each compute backend, checked
// against a naive float64 reference. Outputs are fresh buffers; inputs are
// random, never zeros. A backend that is not available on this machine
// (no GPU) is reported as skipped with the reason.
#include <cmath>
#include <functional>
#include <map>
#include <random>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "partitioner/graph_builder.h"
#include "partitioner/op_schema.h"
#include "runtime/backend.h"
#include "runtime/cpu_backend.h"

namespace pipeserve {
namespace {

using ::testing::HasSubstr;

struct BackendCase {
  std::string name;
  std::function<std::unique_ptr<ComputeBackend>()> make;
  double rel_tol;
};

std::vector<BackendCase> Backends() {
  return {{"cpu", [] { return MakeCpuBackend({}); }, 1e-5},
          {"cpu_unfused",
           [] {
             CpuBackendOptions o;
             o.fuse_linear_relu = false;
             o.threads = 2;
             return MakeCpuBackend(o);
           },
           1e-5}};
}

Tensor RandomTensor(Shape shape, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> d(-1.0f, 1.0f);
  Tensor t = Tensor::Empty(shape);
  for (int64_t i = 0; i < t.numel(); ++i) t.data()[i] = d(rng);
  return t;
}

// A dense float64 array with a shape, for the reference.
struct Ref {
  Shape shape;
  std::vector<double> v;
};

Ref ToRef(const Tensor& t) {
  return {t.shape(), std::vector<double>(t.data(), t.data() + t.numel())};
}

// Element of `r` for the output coordinates `coord`, broadcasting from the
// right (size-1 dimensions repeat).
double At(const Ref& r, const std::vector<int64_t>& coord) {
  int64_t idx = 0, stride = 1;
  for (int e = static_cast<int>(r.shape.size()) - 1,
           d = static_cast<int>(coord.size()) - 1;
       e >= 0; --e, --d) {
    if (r.shape[e] != 1) idx += coord[d] * stride;
    stride *= r.shape[e];
  }
  return r.v[idx];
}

std::vector<int64_t> Coords(int64_t flat, const Shape& shape) {
  std::vector<int64_t> c(shape.size());
  for (int d = static_cast<int>(shape.size()) - 1; d >= 0; --d) {
    c[d] = flat % shape[d];
    flat /= shape[d];
  }
  return c;
}

// The naive reference interpreter: one node at a time, in float64.
Ref RefNode(const Node& n, const std::vector<Ref>& in) {
  const std::string& op = n.op();
  if (op == "mm" || op == "matmul" || op == "linear") {
    const Ref& x = in[0];
    const Ref& w = in[1];
    bool lin = op == "linear";
    int64_t k = x.shape.back();
    int64_t cols = lin ? w.shape[0] : w.shape[1];
    int64_t rows = static_cast<int64_t>(x.v.size()) / k;
    Ref out{x.shape, std::vector<double>(rows * cols)};
    out.shape.back() = cols;
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j) {
        double acc = lin && in.size() > 2 ? in[2].v[j] : 0.0;
        for (int64_t p = 0; p < k; ++p)
          acc += x.v[i * k + p] * (lin ? w.v[j * k + p] : w.v[p * cols + j]);
        out.v[i * cols + j] = acc;
      }
    return out;
  }
  if (op == "add" || op == "sub" || op == "mul") {
    auto f = [&](double a, double b) {
      return op == "add" ? a + b : op == "sub" ? a - b : a * b;
    };
    if (n.attrs().contains("scalar")) {
      double s = n.attrs().at("scalar").f();
      bool rev = n.attrs().contains("reverse") && n.attrs().at("reverse").i();
      Ref out = in[0];
      for (double& v : out.v) v = rev ? f(s, v) : f(v, s);
      return out;
    }
    Shape shape = *BroadcastShapes(in[0].shape, in[1].shape);
    Ref out{shape, std::vector<double>(NumElements(shape))};
    for (int64_t i = 0; i < static_cast<int64_t>(out.v.size()); ++i) {
      std::vector<int64_t> c = Coords(i, shape);
      out.v[i] = f(At(in[0], c), At(in[1], c));
    }
    return out;
  }
  Ref out = in[0];
  if (op == "relu")
    for (double& v : out.v) v = v < 0 ? 0 : v;
  return out;  // clone, identity
}

// Runs the whole graph in the reference interpreter.
std::vector<Ref> RefRun(const Model& m, const std::vector<Tensor>& inputs) {
  std::map<std::string, Ref> values;
  for (int i = 0; i < m.graph.inputs_size(); ++i)
    values[m.graph.inputs(i).name()] = ToRef(inputs[i]);
  for (const Node& n : m.graph.nodes()) {
    if (n.op() == "pipe_split") continue;
    if (n.op() == "param") {
      values[n.outputs(0)] = ToRef(m.weights.at(n.attrs().at("fqn").s()));
      continue;
    }
    std::vector<Ref> in;
    for (const std::string& v : n.inputs()) in.push_back(values.at(v));
    values[n.outputs(0)] = RefNode(n, in);
  }
  std::vector<Ref> out;
  for (const std::string& o : m.graph.outputs()) out.push_back(values.at(o));
  return out;
}

class BackendTest : public ::testing::TestWithParam<BackendCase> {
 protected:
  // Compiles `m` on the backend, runs it on random inputs and compares
  // every output with the reference (relative to the largest magnitude).
  void CheckAgainstReference(const Model& m) {
    std::unique_ptr<ComputeBackend> backend = GetParam().make();
    auto prog = backend->Compile(m.graph, m.weights);
    ASSERT_TRUE(prog.ok()) << prog.status();
    std::vector<Tensor> inputs;
    uint32_t seed = 100;
    for (const ValueSpec& in : m.graph.inputs()) {
      Shape s(in.shape().begin(), in.shape().end());
      for (int64_t& d : s) if (d < 0) d = 5;  // batch 5
      inputs.push_back(RandomTensor(s, seed++));
    }
    auto out = (*prog)->Run(inputs);
    ASSERT_TRUE(out.ok()) << out.status();
    std::vector<Ref> want = RefRun(m, inputs);
    ASSERT_EQ(out->size(), want.size());
    for (size_t o = 0; o < want.size(); ++o) {
      const Tensor& got = (*out)[o];
      ASSERT_EQ(got.shape(), want[o].shape) << "output " << o;
      double scale = 1e-30;
      for (double v : want[o].v) scale = std::max(scale, std::fabs(v));
      for (int64_t i = 0; i < got.numel(); ++i) {
        ASSERT_LE(std::fabs(got.data()[i] - want[o].v[i]),
                  GetParam().rel_tol * scale)
            << "output " << o << " element " << i;
      }
    }
  }
};

AttrValue F(double f) { AttrValue a; a.set_f(f); return a; }
AttrValue I(int64_t i) { AttrValue a; a.set_i(i); return a; }

TEST_P(BackendTest, Mm) {
  GraphBuilder b;
  b.Input("x", {-1, 64}).Param("w", {64, 48});
  b.Op("mm", {"x", "w"}, "y").Output("y");
  CheckAgainstReference(b.Build());
}

TEST_P(BackendTest, MatmulWithLeadingDimensions) {
  GraphBuilder b;
  b.Input("x", {-1, 3, 32}).Param("w", {32, 16});
  b.Op("matmul", {"x", "w"}, "y").Output("y");
  CheckAgainstReference(b.Build());
}

TEST_P(BackendTest, LinearWithBias) {
  GraphBuilder b;
  b.Input("x", {-1, 40}).Param("l.weight", {24, 40}).Param("l.bias", {24});
  b.Op("linear", {"x", "l.weight", "l.bias"}, "y", "l").Output("y");
  CheckAgainstReference(b.Build());
}

TEST_P(BackendTest, LinearWithoutBias) {
  GraphBuilder b;
  b.Input("x", {-1, 40}).Param("l.weight", {24, 40});
  b.Op("linear", {"x", "l.weight"}, "y", "l").Output("y");
  CheckAgainstReference(b.Build());
}

TEST_P(BackendTest, LinearThenReluFused) {
  GraphBuilder b;
  b.Input("x", {-1, 40}).Param("l.weight", {24, 40}).Param("l.bias", {24});
  b.Op("linear", {"x", "l.weight", "l.bias"}, "h", "l");
  b.Op("relu", {"h"}, "y").Output("y");
  CheckAgainstReference(b.Build());
}

TEST_P(BackendTest, LinearWhoseOutputIsAlsoReadElsewhereIsNotFusedAway) {
  GraphBuilder b;
  b.Input("x", {-1, 16}).Param("l.weight", {16, 16});
  b.Op("linear", {"x", "l.weight"}, "h", "l").Op("relu", {"h"}, "r");
  b.Op("add", {"h", "r"}, "y").Output("y").Output("h");
  CheckAgainstReference(b.Build());
}

TEST_P(BackendTest, AddSubMulWithRowAndColumnBroadcast) {
  GraphBuilder b;
  b.Input("x", {-1, 12}).Input("col", {-1, 1}).Param("row", {12});
  b.Op("add", {"x", "row"}, "a").Op("sub", {"a", "col"}, "s");
  b.Op("mul", {"s", "x"}, "y").Output("y");
  CheckAgainstReference(b.Build());
}

TEST_P(BackendTest, ScalarOperands) {
  GraphBuilder b;
  b.Input("x", {-1, 7});
  b.Op("sub", {"x"}, "a", "", {{"scalar", F(1.5)}, {"reverse", I(1)}});
  b.Op("mul", {"a"}, "m", "", {{"scalar", F(-2.0)}});
  b.Op("add", {"m"}, "y", "", {{"scalar", F(0.25)}}).Output("y");
  CheckAgainstReference(b.Build());
}

TEST_P(BackendTest, ReluCloneIdentity) {
  GraphBuilder b;
  b.Input("x", {-1, 9});
  b.Op("relu", {"x"}, "r").Op("clone", {"r"}, "c").Op("identity", {"c"}, "y");
  b.Output("y");
  CheckAgainstReference(b.Build());
}

TEST_P(BackendTest, ExampleCodeShapedChainAcrossMarkers) {
  GraphBuilder b;
  b.Input("x", {-1, 32}).Input("y", {-1, 32});
  b.Param("p1", {32, 32}).Param("lin.weight", {32, 32}).Param("lin.bias", {32});
  b.Op("mm", {"x", "p1"}, "m").Op("add", {"m", "y"}, "a").Op("relu", {"a"}, "r");
  b.Split().Op("mm", {"r", "p1"}, "m2");
  b.Op("linear", {"m2", "lin.weight", "lin.bias"}, "l", "lin");
  b.Op("relu", {"l"}, "r2").Op("add", {"r2", "m"}, "out").Output("out");
  CheckAgainstReference(b.Build());
}

TEST_P(BackendTest, WrongInputShapeNamesTheInput) {
  GraphBuilder b;
  b.Input("x", {-1, 8}).Param("w", {8, 8});
  b.Op("mm", {"x", "w"}, "y").Output("y");
  Model m = b.Build();
  auto prog = GetParam().make()->Compile(m.graph, m.weights);
  ASSERT_TRUE(prog.ok());
  auto out = (*prog)->Run({RandomTensor({4, 6}, 1)});
  ASSERT_FALSE(out.ok());
  EXPECT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(out.status().message()),
              HasSubstr("input \"x\": shape [4,6] does not match [B,8]"));
}

TEST_P(BackendTest, MissingWeightsFailCompileNamingTheParameter) {
  GraphBuilder b;
  b.Input("x", {-1, 8}).Param("w", {8, 8});
  b.Op("mm", {"x", "w"}, "y").Output("y");
  Model m = b.Build();
  auto prog = GetParam().make()->Compile(m.graph, WeightMap());
  ASSERT_FALSE(prog.ok());
  EXPECT_THAT(std::string(prog.status().message()),
              HasSubstr("parameter \"w\" has no loaded weights"));
}

INSTANTIATE_TEST_SUITE_P(
    AllBackends, BackendTest, ::testing::ValuesIn(Backends()),
    [](const ::testing::TestParamInfo<BackendCase>& info) {
      return info.param.name;
    });

}  // namespace
}  // namespace pipeserve
