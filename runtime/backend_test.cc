// Small graphs (fusions, chains across cut markers, broadcasts, unaligned
// GEMMs) run on each compute backend, checked node by node against the
// float64 reference of runtime/conformance (ReferenceOp; each op alone, in
// every dtype, is //runtime/conformance:conformance_test). Outputs are fresh buffers (the CUDA
// backends and the device emulator also NaN-fill every device buffer before
// each run); inputs are random, never zeros (fresh every run on the GPU,
// fixed seeds on the CPU so CI is deterministic), and each program
// runs several times at two batch sizes (on CUDA: eager, graph capture and
// graph replay). A backend that is not available here (a build without
// CUDA, no GPU) is reported as skipped with the reason.
//
// Each check prints one line that tools/gpu_check.sh tabulates:
//   [ max_rel_err ] cuda_bf16 LinearWithBias 2.1e-03 tol 1e-02
#include "runtime/backend.h"
#include "runtime/random_tensor.h"

#include <cmath>
#include <cstdio>
#include <functional>
#include <map>
#include <random>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "partitioner/graph_builder.h"
#include "graph/op_schema.h"
#include "runtime/conformance/reference.h"
#include "runtime/cpu/cpu_backend.h"
#include "runtime/cuda/cuda_backend.h"
#include "runtime/cuda/device_emulator.h"

namespace pipeserve {
namespace {

using ::testing::HasSubstr;

struct BackendCase {
  std::string name;
  // Fails (kFailedPrecondition) when the backend cannot run here.
  std::function<absl::StatusOr<std::unique_ptr<ComputeBackend>>()> make;
  double rel_tol;  // of the largest output magnitude
  // Fresh random inputs every run (GPU backends), else fixed seeds so CI
  // on the CPU is deterministic.
  bool fresh_inputs = false;
  // Runs on a CUDA device: skipped (only) where there is none.
  bool needs_gpu = false;
  // Takes only GPU-confirmed kernels (the default --cuda_ops): a graph with
  // others must be refused at Compile, saying how to allow them.
  bool confirmed_only = false;
};

BackendCase Cuda(const std::string& name, Precision p, double tol,
                 bool cublaslt = true, bool confirmed_only = false) {
  return {name,
          [p, cublaslt, confirmed_only]() -> absl::StatusOr<std::unique_ptr<ComputeBackend>> {
            CudaBackendOptions o;
            o.precision = p;
            o.poison_buffers = true;
            o.use_cublaslt = cublaslt;
            // On a GPU, check every kernel; and once as a stage server runs
            // by default, with only the confirmed ones (no fusion).
            o.cuda_ops = confirmed_only ? CudaOps::kConfirmed : CudaOps::kUnconfirmed;
            return MakeCudaBackend(o);
          },
          tol, /*fresh_inputs=*/true, /*needs_gpu=*/true, confirmed_only};
}

BackendCase Emulated(const std::string& name, Precision p, double tol) {
  return {name,
          [p]() -> absl::StatusOr<std::unique_ptr<ComputeBackend>> {
            return MakeDeviceEmulatorBackend(p);
          },
          tol};
}

std::vector<BackendCase> Backends() {
  return {{"cpu",
           []() -> absl::StatusOr<std::unique_ptr<ComputeBackend>> {
             return MakeCpuBackend({});
           },
           1e-5},
          {"cpu_unfused",
           []() -> absl::StatusOr<std::unique_ptr<ComputeBackend>> {
             CpuBackendOptions o;
             o.fuse_linear_relu = false;
             o.threads = 2;
             return MakeCpuBackend(o);
           },
           1e-5},
          // The CUDA backend's lowering, executed on the CPU.
          Emulated("emulated_fp32", Precision::kFloat32, 1e-5),
          Emulated("emulated_tf32", Precision::kTF32, 1e-3),
          Emulated("emulated_bf16", Precision::kBF16, 1e-2),
          Cuda("cuda_fp32", Precision::kFloat32, 1e-5),
          Cuda("cuda_fp32_confirmed", Precision::kFloat32, 1e-5, true, /*confirmed_only=*/true),
          Cuda("cuda_tf32", Precision::kTF32, 1e-3),
          Cuda("cuda_bf16", Precision::kBF16, 1e-2),
          // The cublasGemmEx + epilogue kernel path, used when cuBLASLt
          // has no algorithm for a GEMM.
          Cuda("cuda_bf16_gemmex", Precision::kBF16, 1e-2, /*cublaslt=*/false)};
}

// Fresh inputs for GPU runs; the seed is printed with any failure.
uint32_t FreshSeed() {
  static std::mt19937 seeds(std::random_device{}());
  return seeds();
}


using Ref = RefTensor;

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
    std::vector<int64_t> sym;  // sizes, for "_from" attributes
    for (const std::string& v : n.inputs()) {
      in.push_back(values.at(v));
      sym.push_back(in.back().v.size() == 1 ? static_cast<int64_t>(in.back().v[0]) : 0);
    }
    // runtime/conformance/reference.h
    absl::StatusOr<Ref> out = ReferenceOp(ResolveSymbolic(n, sym), in);
    EXPECT_TRUE(out.ok()) << n.name() << ": " << out.status();
    values[n.outputs(0)] = out.ok() ? *std::move(out) : Ref();
  }
  std::vector<Ref> out;
  for (const std::string& o : m.graph.outputs()) out.push_back(values.at(o));
  return out;
}

class BackendTest : public ::testing::TestWithParam<BackendCase> {
 protected:
  void SetUp() override {
    absl::StatusOr<std::unique_ptr<ComputeBackend>> b = GetParam().make();
    if (!b.ok()) {
      // Only a missing device skips; a backend that fails where its device
      // is present (or one that needs none) is a failure.
      absl::Status device = GetParam().needs_gpu ? CudaDeviceCount().status() : absl::OkStatus();
      if (!device.ok()) GTEST_SKIP() << GetParam().name << ": no CUDA device here: " << device;
      FAIL() << GetParam().name << " cannot be made: " << b.status();
    }
    backend_ = *std::move(b);
  }

  // Compiles `m` on the backend, runs it on fresh random inputs (batch 5
  // twice, 3, then 5 again) and compares every output with the reference
  // (relative to the largest magnitude).
  void CheckAgainstReference(const Model& m) {
    auto prog = backend_->Compile(m.graph, m.weights);
    if (RefusedByTheGate(prog.status())) return;
    ASSERT_TRUE(prog.ok()) << prog.status();
    double worst = 0;
    uint32_t fixed_seed = 100;
    for (int64_t batch : {5, 5, 3, 5}) {
      const uint32_t seed =
          GetParam().fresh_inputs ? FreshSeed() : (fixed_seed += 10);
      std::vector<Tensor> inputs;
      uint32_t s = seed;
      for (const ValueSpec& in : m.graph.inputs()) {
        Shape shape(in.shape().begin(), in.shape().end());
        for (int64_t& d : shape)
          if (d < 0) d = batch;
        inputs.push_back(RandomTensor(shape, s++));
      }
      auto out = (*prog)->Run(inputs);
      ASSERT_TRUE(out.ok()) << out.status();
      std::vector<Ref> want = RefRun(m, inputs);
      ASSERT_EQ(out->size(), want.size());
      for (size_t o = 0; o < want.size(); ++o) {
        const Tensor& got = (*out)[o];
        ASSERT_EQ(got.shape(), want[o].shape) << "output " << o;
        double scale = 1e-30, err = 0;
        for (double v : want[o].v) scale = std::max(scale, std::fabs(v));
        for (int64_t i = 0; i < got.numel(); ++i) {
          double e = std::fabs(got.data()[i] - want[o].v[i]);
          ASSERT_LE(e, GetParam().rel_tol * scale)  // NaN (unwritten) fails
              << "output " << o << " element " << i << " got " << got.data()[i]
              << " want " << want[o].v[i] << " (batch " << batch << ", seed "
              << seed << ")";
          err = std::max(err, e);
        }
        worst = std::max(worst, err / scale);
      }
    }
    std::string test =
        ::testing::UnitTest::GetInstance()->current_test_info()->name();
    test = test.substr(0, test.find('/'));  // "Mm/cuda_bf16" -> "Mm"
    std::printf("[ max_rel_err ] %s %s %.2e tol %.0e\n",
                GetParam().name.c_str(), test.c_str(), worst,
                GetParam().rel_tol);
  }

  // A confirmed-only backend refusing a graph with an unconfirmed kernel,
  // as it must (and says how to allow it).
  bool RefusedByTheGate(const absl::Status& compiled) {
    if (!GetParam().confirmed_only || compiled.ok()) return false;
    EXPECT_THAT(std::string(compiled.message()), HasSubstr("--cuda_ops=unconfirmed"));
    return true;
  }

  std::unique_ptr<ComputeBackend> backend_;
};

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
  b.Op("sub", {"x"}, "a", "", {{"scalar", AttrF(1.5)}, {"reverse", AttrI(1)}});
  b.Op("mul", {"a"}, "m", "", {{"scalar", AttrF(-2.0)}});
  b.Op("add", {"m"}, "y", "", {{"scalar", AttrF(0.25)}}).Output("y");
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
  b.Op("mm", {"x", "p1"}, "m")
      .Op("add", {"m", "y"}, "a")
      .Op("relu", {"a"}, "r");
  b.Split().Op("mm", {"r", "p1"}, "m2");
  b.Op("linear", {"m2", "lin.weight", "lin.bias"}, "l", "lin");
  b.Op("relu", {"l"}, "r2").Op("add", {"r2", "m"}, "out").Output("out");
  CheckAgainstReference(b.Build());
}

// The cases below exercise the device lowering's special paths (bf16
// intermediates written by the GEMM itself, inputs converted while staged
// or on the device, aliases) on every backend.
TEST_P(BackendTest, MmChainWhoseIntermediateOnlyFeedsAGemm) {
  GraphBuilder b;
  b.Input("x", {-1, 32}).Param("w1", {32, 24}).Param("w2", {24, 40});
  b.Op("mm", {"x", "w1"}, "h").Op("mm", {"h", "w2"}, "y").Output("y");
  CheckAgainstReference(b.Build());
}

TEST_P(BackendTest, InputReadByAGemmAndAnElementwiseOp) {
  GraphBuilder b;
  b.Input("x", {-1, 16}).Param("w", {16, 16});
  b.Op("mm", {"x", "w"}, "m").Op("add", {"m", "x"}, "y").Output("y");
  CheckAgainstReference(b.Build());
}

TEST_P(BackendTest, LinearWithoutBiasThenReluFeedingLinear) {
  GraphBuilder b;
  b.Input("x", {-1, 24}).Param("a.weight", {32, 24}).Param("b.weight", {8, 32});
  b.Param("b.bias", {8});
  b.Op("linear", {"x", "a.weight"}, "h", "a").Op("relu", {"h"}, "r");
  b.Op("linear", {"r", "b.weight", "b.bias"}, "y", "b").Output("y");
  CheckAgainstReference(b.Build());
}

TEST_P(BackendTest, ReluFusedThroughAnIdentity) {
  GraphBuilder b;
  b.Input("x", {-1, 16}).Param("l.weight", {16, 16}).Param("l.bias", {16});
  b.Op("linear", {"x", "l.weight", "l.bias"}, "h", "l");
  b.Op("identity", {"h"}, "h2").Op("relu", {"h2"}, "y").Output("y");
  CheckAgainstReference(b.Build());
}

TEST_P(BackendTest, IdentityOfALinearOutputKeepsItUnfused) {
  // h is an output and also reaches the relu through an identity: the
  // pre-ReLU values must survive.
  GraphBuilder b;
  b.Input("x", {-1, 16}).Param("l.weight", {16, 16}).Param("l.bias", {16});
  b.Op("linear", {"x", "l.weight", "l.bias"}, "h", "l");
  b.Op("identity", {"h"}, "h2").Op("relu", {"h2"}, "y");
  b.Output("y").Output("h");
  CheckAgainstReference(b.Build());
}

TEST_P(BackendTest, CloneFeedsAGemmAndAnOutput) {
  GraphBuilder b;
  b.Input("x", {-1, 16}).Param("w", {16, 8});
  b.Op("relu", {"x"}, "r").Op("clone", {"r"}, "c").Op("mm", {"c", "w"}, "y");
  b.Output("y").Output("c");
  CheckAgainstReference(b.Build());
}

TEST_P(BackendTest, InputsAndParametersReturnedDirectly) {
  GraphBuilder b;
  b.Input("x", {-1, 6}).Input("unused", {-1, 3}).Param("p", {6});
  b.Op("identity", {"x"}, "xo").Op("identity", {"p"}, "po");
  b.Op("add", {"x", "p"}, "dead");  // computed, never read
  b.Output("xo").Output("po");
  CheckAgainstReference(b.Build());
}

TEST_P(BackendTest, ThreeDimensionalBroadcasts) {
  GraphBuilder b;
  b.Input("x", {-1, 3, 4}).Param("col", {3, 1}).Param("row", {4});
  b.Op("add", {"x", "col"}, "a").Op("mul", {"row", "a"}, "m");
  b.Op("sub", {"m", "x"}, "y").Output("y");
  CheckAgainstReference(b.Build());
}

// Attention's shape ops around GEMMs: a reshape whose size comes from the
// input at run time (a view), permute, slice with a step, select, cat,
// unsqueeze and expand; a GEMM reads a permuted value and another a view
// of a GEMM's output that nothing else reads (in bf16 the GEMM writes
// bfloat16 only and the view shares that buffer).
TEST_P(BackendTest, ShapeOpsAroundGemms) {
  GraphBuilder b;
  b.Input("x", {-1, 6, 8}).Param("w", {3, 4}).Param("w2", {5, 3});
  b.Op("size", {"x"}, "t", "", {{"dim", AttrI(1)}})
      .Op("reshape", {"x", "t"}, "h", "",
          {{"shape", AttrInts({-1, 0, 2, 4})}, {"shape_from", AttrInts({0, 2, 0, 0})}})
      .Op("permute", {"h"}, "p", "", {{"dims", AttrInts({0, 2, 1, 3})}})
      .Op("linear", {"p", "w"}, "q")  // [B, 2, 6, 3]
      .Op("reshape", {"q"}, "qv", "", {{"shape", AttrInts({-1, 12, 3})}})
      .Op("linear", {"qv", "w2"}, "r")  // [B, 12, 5]
      .Op("slice", {"p"}, "s", "",
          {{"dim", AttrI(2)}, {"start", AttrI(1)}, {"stop", AttrI(6)}, {"step", AttrI(2)}})
      .Op("select", {"s"}, "last", "", {{"dim", AttrI(1)}, {"index", AttrI(-1)}})  // [B, 3, 4]
      .Op("select", {"s"}, "first", "", {{"dim", AttrI(1)}, {"index", AttrI(0)}})
      .Op("cat", {"last", "first"}, "c", "", {{"dim", AttrI(2)}})  // [B, 3, 8]
      .Op("unsqueeze", {"c"}, "u", "", {{"dim", AttrI(1)}})
      .Op("expand", {"u"}, "e", "", {{"shape", AttrInts({-1, 2, 3, 8})}})
      .Output("r")
      .Output("e");
  CheckAgainstReference(b.Build());
}

// A chain of elementwise ops whose inputs broadcast (a row, a column, a
// scalar operand), with a comparison feeding where: one program on the
// device backends (fused), op by op on the CPU.
TEST_P(BackendTest, ElementwiseChainWithBroadcastInputs) {
  GraphBuilder b;
  b.Input("x", {-1, 6}).Input("col", {-1, 1}).Param("row", {6});
  b.Op("mul", {"x", "row"}, "a")
      .Op("sub", {"a", "col"}, "d")
      .Op("sigmoid", {"d"}, "s")
      .Op("gt", {"s"}, "big", "", {{"scalar", AttrF(0.5)}})
      .Op("where", {"big", "s", "x"}, "w")
      .Op("maximum", {"w"}, "m", "", {{"scalar", AttrF(0.25)}})
      .Op("relu", {"m"}, "y")
      .Output("y");
  CheckAgainstReference(b.Build());
}

// full sized at run time by a size of the input: made when the plan is.
TEST_P(BackendTest, FullSizedAtRunTime) {
  GraphBuilder b;
  b.Input("x", {-1, 4});
  b.Op("size", {"x"}, "n", "", {{"dim", AttrI(0)}})
      .Op("full", {"n"}, "f", "",
          {{"shape", AttrInts({0, 4})}, {"shape_from", AttrInts({1, 0})}, {"value", AttrF(2.5)},
           {"dtype", AttrI(DT_FLOAT32)}})
      .Op("add", {"x", "f"}, "y")
      .Output("y");
  CheckAgainstReference(b.Build());
}

// An empty batch through a chain the device backends fuse: an empty
// output, no kernel launched.
TEST_P(BackendTest, AnEmptyBatchThroughAFusedChain) {
  GraphBuilder b;
  b.Input("x", {-1, 16});
  b.Op("mul", {"x"}, "a", "", {{"scalar", AttrF(0.5)}}).Op("tanh", {"a"}, "y").Output("y");
  Model m = b.Build();
  auto prog = backend_->Compile(m.graph, m.weights);
  if (RefusedByTheGate(prog.status())) return;
  ASSERT_TRUE(prog.ok()) << prog.status();
  absl::StatusOr<std::vector<Tensor>> out = (*prog)->Run({Tensor::Empty({0, 16})});
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ((*out)[0].shape(), (Shape{0, 16}));
}

TEST_P(BackendTest, UnalignedGemmSizes) {
  GraphBuilder b;
  b.Input("x", {-1, 7}).Param("l.weight", {13, 7}).Param("l.bias", {13});
  b.Param("w", {7, 19});
  b.Op("linear", {"x", "l.weight", "l.bias"}, "h", "l").Op("relu", {"h"}, "r");
  b.Op("mm", {"x", "w"}, "m");
  b.Output("r").Output("m");
  CheckAgainstReference(b.Build());
}

TEST_P(BackendTest, WrongInputShapeNamesTheInput) {
  GraphBuilder b;
  b.Input("x", {-1, 8}).Param("w", {8, 8});
  b.Op("mm", {"x", "w"}, "y").Output("y");
  Model m = b.Build();
  auto prog = backend_->Compile(m.graph, m.weights);
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
  auto prog = backend_->Compile(m.graph, WeightMap());
  ASSERT_FALSE(prog.ok());
  EXPECT_THAT(std::string(prog.status().message()),
              HasSubstr("parameter \"w\" has no loaded weights"));
}

INSTANTIATE_TEST_SUITE_P(AllBackends, BackendTest,
                         ::testing::ValuesIn(Backends()),
                         [](const ::testing::TestParamInfo<BackendCase>& info) {
                           return info.param.name;
                         });

}  // namespace
}  // namespace pipeserve
