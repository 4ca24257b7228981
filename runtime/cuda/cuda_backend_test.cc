// CUDA-specific behaviour beyond the op suite: CUDA graphs (same results as
// op-by-op launches, one capture per shape set, replays), the shape cache,
// concurrent runs on one program's slots, and the errors without a device.
// Cases that need a GPU are skipped with the reason where there is none.
#include "runtime/cuda/cuda_backend.h"
#include "runtime/random_tensor.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "partitioner/graph_builder.h"
#include "runtime/cpu/cpu_backend.h"
#include "runtime/precision.h"

namespace pipeserve {
namespace {

using ::testing::AnyOf;
using ::testing::HasSubstr;

// How far a CUDA result may be from the CPU backend's, relative to Scale.
double Tolerance(Precision p) {
  return p == Precision::kFloat32 ? 1e-5 : p == Precision::kTF32 ? 1e-3 : 1e-2;
}

// The largest |element| of the reference `want` (at least 1e-30): what
// differences from it are measured against.
double Scale(const Tensor& want) {
  double scale = 1e-30;
  for (int64_t i = 0; i < want.numel(); ++i) {
    scale = std::max<double>(scale, std::fabs(want.data()[i]));
  }
  return scale;
}

// An ExampleCode-shaped stage: GEMMs with a fused epilogue, a broadcast
// add, a skip connection, a clone.
Model Stage(int d) {
  GraphBuilder b;
  b.Input("x", {-1, d}).Input("y", {-1, d});
  b.Param("p", {d, d}).Param("lin.weight", {d, d}).Param("lin.bias", {d});
  b.Op("mm", {"x", "p"}, "m").Op("add", {"m", "y"}, "a").Op("relu", {"a"}, "r");
  b.Op("linear", {"r", "lin.weight", "lin.bias"}, "l", "lin")
      .Op("relu", {"l"}, "l2");
  b.Op("add", {"l2", "lin.bias"}, "o").Op("clone", {"m"}, "skip");
  b.Output("o").Output("skip");
  return b.Build();
}

class CudaBackendTest : public ::testing::TestWithParam<Precision> {
 protected:
  void SetUp() override {
    absl::StatusOr<int> n = CudaDeviceCount();
    if (!n.ok()) GTEST_SKIP() << n.status();
  }

  std::unique_ptr<StageProgram> Compile(const Model& m, bool graphs,
                                        int max_shapes = 8,
                                        int concurrent_runs = 2) {
    CudaBackendOptions o;
    o.precision = GetParam();
    o.use_cuda_graphs = graphs;
    o.poison_buffers = true;
    o.max_cached_shapes = max_shapes;
    o.concurrent_runs = concurrent_runs;
    auto backend = MakeCudaBackend(o);
    EXPECT_TRUE(backend.ok()) << backend.status();
    auto prog = (*backend)->Compile(m.graph, m.weights);
    EXPECT_TRUE(prog.ok()) << prog.status();
    return *std::move(prog);
  }

  static CudaStageProgram* Cuda(const std::unique_ptr<StageProgram>& p) {
    return dynamic_cast<CudaStageProgram*>(p.get());
  }
};

TEST_P(CudaBackendTest, GraphReplaysMatchOpByOpLaunchesAcrossTwoShapes) {
  Model m = Stage(256);
  auto graphed = Compile(m, /*graphs=*/true);
  auto eager = Compile(m, /*graphs=*/false);
  auto cpu = MakeCpuBackend({})->Compile(m.graph, m.weights);
  ASSERT_TRUE(cpu.ok());
  std::mt19937 rng(std::random_device{}());
  const double tol = Tolerance(GetParam());
  // Each shape: first run op by op, second captures, later ones replay.
  for (int64_t batch : {16, 3, 16, 3, 16, 3}) {
    std::vector<Tensor> in = {RandomTensor({batch, 256}, &rng),
                              RandomTensor({batch, 256}, &rng)};
    auto g = graphed->Run(in);
    auto e = eager->Run(in);
    auto c = (*cpu)->Run(in);
    ASSERT_TRUE(g.ok()) << g.status();
    ASSERT_TRUE(e.ok()) << e.status();
    ASSERT_TRUE(c.ok()) << c.status();
    for (size_t o = 0; o < g->size(); ++o) {
      const Tensor &gt = (*g)[o], &et = (*e)[o], &ct = (*c)[o];
      ASSERT_EQ(gt.shape(), ct.shape());
      const double scale = Scale(ct);
      for (int64_t i = 0; i < gt.numel(); ++i) {
        // Same kernels and algorithms: graph and eager agree to rounding.
        ASSERT_LE(std::fabs(gt.data()[i] - et.data()[i]), 1e-6 * scale)
            << "output " << o << " element " << i << " batch " << batch;
        ASSERT_LE(std::fabs(gt.data()[i] - ct.data()[i]), tol * scale)
            << "output " << o << " element " << i << " batch " << batch;
      }
    }
  }
  CudaStageProgram::Stats gs = Cuda(graphed)->stats(),
                          es = Cuda(eager)->stats();
  EXPECT_EQ(gs.runs, 6);
  EXPECT_EQ(gs.plans_built, 2);
  EXPECT_EQ(gs.graphs_captured, 2);
  EXPECT_EQ(gs.graph_launches, 4);
  EXPECT_EQ(gs.fused_relus, 1);
  EXPECT_EQ(gs.gemm_fallbacks, 0);  // cuBLASLt has these GEMMs
  EXPECT_EQ(gs.slots, 1);           // one caller: one slot, reused
  EXPECT_EQ(es.graphs_captured, 0);
  EXPECT_EQ(es.graph_launches, 0);
}

TEST_P(CudaBackendTest, LeastRecentlyUsedShapeSetIsEvicted) {
  Model m = Stage(64);
  auto prog = Compile(m, /*graphs=*/true, /*max_shapes=*/2);
  std::mt19937 rng(1);
  for (int64_t batch : {1, 2, 3, 1}) {
    auto out =
        prog->Run({RandomTensor({batch, 64}, &rng), RandomTensor({batch, 64}, &rng)});
    ASSERT_TRUE(out.ok()) << out.status();
    EXPECT_EQ((*out)[0].dim(0), batch);
  }
  EXPECT_EQ(Cuda(prog)->stats().plans_built, 4);  // batch 1 was evicted by 3
}

TEST_P(CudaBackendTest, TimeDeviceWorkReturnsOneTimePerIteration) {
  Model m = Stage(128);
  auto prog = Compile(m, /*graphs=*/true);
  std::mt19937 rng(2);
  std::vector<Tensor> in = {RandomTensor({16, 128}, &rng), RandomTensor({16, 128}, &rng)};
  for (bool copies : {true, false}) {
    auto ms = Cuda(prog)->TimeDeviceWork(in, 5, copies);
    ASSERT_TRUE(ms.ok()) << ms.status();
    ASSERT_EQ(ms->size(), 5u);
    for (double t : *ms) EXPECT_GT(t, 0.0);
  }
  // Outputs are still right after timing replays: the CPU backend's, to
  // the precision's tolerance (an unwritten NaN fails too).
  auto out = prog->Run(in);
  ASSERT_TRUE(out.ok()) << out.status();
  auto cpu = MakeCpuBackend({})->Compile(m.graph, m.weights);
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  auto want = (*cpu)->Run(in);
  ASSERT_TRUE(want.ok()) << want.status();
  ASSERT_EQ(out->size(), want->size());
  const double tol = Tolerance(GetParam());
  for (size_t o = 0; o < out->size(); ++o) {
    const Tensor &g = (*out)[o], &w = (*want)[o];
    ASSERT_EQ(g.shape(), w.shape());
    const double scale = Scale(w);
    for (int64_t i = 0; i < g.numel(); ++i) {
      ASSERT_LE(std::fabs(g.data()[i] - w.data()[i]), tol * scale)
          << "output " << o << " element " << i << ": " << g.data()[i] << " vs " << w.data()[i];
    }
  }
}

// The CUDA program keeps buffers, plans and a graph per shape set, so it
// asks the stage to join only equal microbatches, a power of two of them
// (StageProgram::prefers_few_shapes; the README states it).
TEST_P(CudaBackendTest, TheProgramPrefersFewShapes) {
  Model m = Stage(64);
  auto prog = Compile(m, /*graphs=*/true);
  EXPECT_TRUE(prog->prefers_few_shapes());
  auto cpu = MakeCpuBackend({})->Compile(m.graph, m.weights);
  ASSERT_TRUE(cpu.ok());
  EXPECT_FALSE((*cpu)->prefers_few_shapes()) << "the CPU program runs any shape alike";
}

// `threads` threads each run `runs` different inputs (batch sizes 16, 3
// and 64 mixed) on one program with `slots` slots, graphs and poisoning on;
// every output is checked against the CPU backend's answer for its input.
void CheckConcurrentRuns(StageProgram* prog, StageProgram* cpu, int threads,
                         int runs, int d, double tol) {
  std::vector<std::vector<std::vector<Tensor>>> in(threads), want(threads);
  std::mt19937 rng(std::random_device{}());
  const int64_t batches[] = {16, 3, 64};
  for (int t = 0; t < threads; ++t) {
    for (int r = 0; r < runs; ++r) {
      int64_t b = batches[(t + r) % 3];
      in[t].push_back({RandomTensor({b, d}, &rng), RandomTensor({b, d}, &rng)});
      auto out = cpu->Run(in[t].back());
      ASSERT_TRUE(out.ok()) << out.status();
      want[t].push_back(*std::move(out));
    }
  }
  std::vector<std::string> errors(threads);
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      for (int r = 0; r < runs; ++r) {
        auto got = prog->Run(in[t][r]);
        if (!got.ok()) {
          errors[t] = got.status().ToString();
          return;
        }
        for (size_t o = 0; o < got->size(); ++o) {
          const Tensor &g = (*got)[o], &w = want[t][r][o];
          if (g.shape() != w.shape()) {
            errors[t] = "run " + std::to_string(r) + ": wrong output shape";
            return;
          }
          const double scale = Scale(w);
          for (int64_t i = 0; i < g.numel(); ++i) {
            // NaN (an unwritten element) fails too.
            if (!(std::fabs(g.data()[i] - w.data()[i]) <= tol * scale)) {
              errors[t] = "run " + std::to_string(r) + " output " +
                          std::to_string(o) + " element " + std::to_string(i) +
                          ": " + std::to_string(g.data()[i]) + " vs " +
                          std::to_string(w.data()[i]);
              return;
            }
          }
        }
      }
    });
  }
  for (auto& th : pool) th.join();
  for (int t = 0; t < threads; ++t) {
    EXPECT_EQ(errors[t], "") << "thread " << t;
  }
}

TEST_P(CudaBackendTest, ConcurrentRunsWithDifferentInputsAreEachRight) {
  Model m = Stage(256);
  auto cpu = MakeCpuBackend({})->Compile(m.graph, m.weights);
  ASSERT_TRUE(cpu.ok());
  // As many threads as slots, then twice as many (the extra calls wait).
  for (int slots : {4, 2}) {
    auto prog = Compile(m, /*graphs=*/true, /*max_shapes=*/8, slots);
    ASSERT_EQ(prog->max_concurrent_runs(), slots);
    constexpr int kThreads = 4, kRuns = 24;
    CheckConcurrentRuns(prog.get(), cpu->get(), kThreads, kRuns, 256,
                        Tolerance(GetParam()));
    CudaStageProgram::Stats s = Cuda(prog)->stats();
    EXPECT_EQ(s.runs, kThreads * kRuns) << slots << " slots";
    EXPECT_GE(s.slots, 1);
    EXPECT_LE(s.slots, slots);
    // Each slot plans each of the 3 shapes at most once and captures it
    // at most once; every later run on a slot replays.
    EXPECT_LE(s.plans_built, 3 * s.slots);
    EXPECT_LE(s.graphs_captured, 3 * s.slots);
    EXPECT_GE(s.graph_launches, s.runs - 3 * s.slots);
    std::printf("[ slots ] %s: %d slots made for %d threads (limit %d)\n",
                PrecisionName(GetParam()).c_str(), s.slots, kThreads, slots);
  }
}

TEST_P(CudaBackendTest, ConcurrentRunsWithoutGraphsAreEachRight) {
  Model m = Stage(128);
  auto cpu = MakeCpuBackend({})->Compile(m.graph, m.weights);
  ASSERT_TRUE(cpu.ok());
  auto prog = Compile(m, /*graphs=*/false, /*max_shapes=*/8, 3);
  CheckConcurrentRuns(prog.get(), cpu->get(), 3, 16, 128,
                      Tolerance(GetParam()));
  EXPECT_EQ(Cuda(prog)->stats().graph_launches, 0);
}

TEST_P(CudaBackendTest, MaxConcurrentRunsReportsTheOption) {
  Model m = Stage(32);
  for (int n : {1, 2, 5}) {
    auto prog = Compile(m, /*graphs=*/true, /*max_shapes=*/8, n);
    EXPECT_EQ(prog->max_concurrent_runs(), n);
    EXPECT_EQ(Cuda(prog)->stats().slots, 1);  // the first slot, at Compile
  }
  auto backend = MakeCudaBackend({});  // the default: 2
  ASSERT_TRUE(backend.ok()) << backend.status();
  auto prog = (*backend)->Compile(m.graph, m.weights);
  ASSERT_TRUE(prog.ok()) << prog.status();
  EXPECT_EQ((*prog)->max_concurrent_runs(), 2);
  CudaBackendOptions bad;
  bad.concurrent_runs = 0;
  auto refused = MakeCudaBackend(bad);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(refused.status().message()),
              HasSubstr("concurrent_runs >= 1"));
}

INSTANTIATE_TEST_SUITE_P(Precisions, CudaBackendTest,
                         ::testing::Values(Precision::kFloat32,
                                           Precision::kTF32, Precision::kBF16),
                         [](const ::testing::TestParamInfo<Precision>& info) {
                           return PrecisionName(info.param);
                         });

TEST(CudaBackendErrorTest, NoDeviceMeansFailedPreconditionSayingWhy) {
  absl::StatusOr<int> n = CudaDeviceCount();
  if (n.ok()) GTEST_SKIP() << "this machine has " << *n << " CUDA device(s)";
  auto b = MakeCudaBackend({});
  ASSERT_FALSE(b.ok());
  EXPECT_EQ(b.status().code(), absl::StatusCode::kFailedPrecondition);
  if (CudaBuiltIn()) {
    EXPECT_THAT(std::string(b.status().message()),
                HasSubstr("no CUDA device: cudaGetDeviceCount"));
  } else {
    EXPECT_THAT(
        std::string(b.status().message()),
        HasSubstr("this build has no CUDA support (build with --config=cuda)"));
  }
}

TEST(CudaBackendErrorTest, DeviceIndexOutOfRangeIsFailedPrecondition) {
  CudaBackendOptions o;
  o.device = 64;
  auto b = MakeCudaBackend(o);
  ASSERT_FALSE(b.ok());
  EXPECT_EQ(b.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(b.status().message()),
              AnyOf(HasSubstr("CUDA device 64 does not exist"),
                    HasSubstr("no CUDA device"), HasSubstr("no CUDA support")));
}

}  // namespace
}  // namespace pipeserve
