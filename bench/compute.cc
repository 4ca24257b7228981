// bench/compute: CPU compute speed, each row against a baseline measured in
// the same run.
//
//   bazel run //bench:compute [-- --threads 1 --iters 200]
//
// 1. GEMM GFLOP/s for 16x512x512, 256x512x512, 512x512x512: through the
//    executor (a one-node stage program) and through oneDNN's sgemm called
//    directly; target: executor within 5% of the direct call.
// 2. ExampleCode (the seed's model, exported from PyTorch at run time) end
//    to end at batch 16 and 256: LocalPipeline over its 4 stages, against
//    PyTorch eager with the same thread count (its OpenBLAS as Debian ships
//    it, and with OPENBLAS_CORETYPE=SkylakeX, its best kernels here).
// A timed call that fails stops the benchmark, naming it (exit status 1);
// a PyTorch baseline that printed no time shows as n/a.
#include <dnnl.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "bench/bench_util.h"
#include "partitioner/graph_builder.h"
#include "partitioner/partition.h"
#include "runtime/cpu/cpu_backend.h"
#include "runtime/cpu/cpu_kernels.h"
#include "runtime/local_pipeline.h"
#include "runtime/model_file.h"
#include "tests/fixtures.h"

namespace pipeserve {
namespace {

// Stops the benchmark: `what` failed, so a time taken around it would be
// the time of a failure.
[[noreturn]] void Fail(const std::string& what, const absl::Status& status) {
  std::printf("bench/compute: %s failed: %s\n", what.c_str(), status.ToString().c_str());
  std::fflush(stdout);
  std::exit(1);
}

// Median seconds of `iters` timed calls of `fn` after a warm-up; the
// benchmark stops at the first call that fails, naming `what`.
double MedianSeconds(const std::string& what, int iters, const std::function<absl::Status()>& fn) {
  for (int i = 0; i < 3; ++i) {
    absl::Status s = fn();
    if (!s.ok()) Fail(absl::StrCat(what, ", warm-up call ", i), s);
  }
  std::vector<double> t;
  for (int i = 0; i < iters; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    absl::Status s = fn();
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (!s.ok()) Fail(absl::StrCat(what, ", timed call ", i), s);
    t.push_back(dt);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

// `ms` to 3 decimals, or "n/a" for a PyTorch baseline that printed no time.
std::string MsOrNa(double ms) { return ms > 0 ? absl::StrFormat("%.3f", ms) : "n/a"; }

void GemmTable(int threads, int iters) {
  std::printf("\nGEMM, %d thread(s), median of %d (GFLOP/s)\n", threads, iters);
  std::printf("%-14s %12s %14s %8s\n", "m x n x k", "executor", "oneDNN direct", "ratio");
  for (int m : {16, 256, 512}) {
    const int n = 512, k = 512;
    GraphBuilder b;
    b.Input("x", {-1, k}).Param("w", {k, n});
    b.Op("mm", {"x", "w"}, "y").Output("y");
    Model model = b.Build();
    CpuBackendOptions o;
    o.threads = threads;
    auto prog = MakeCpuBackend(o)->Compile(model.graph, model.weights);
    if (!prog.ok()) Fail(absl::StrCat("compiling the ", m, "x", n, "x", k, " GEMM"), prog.status());
    Tensor x = RandomTensor({m, k}, 1);
    const Tensor& w = model.weights.at("w");
    Tensor c = Tensor::Empty({m, n});
    SetComputeThreads(threads);
    double flop = 2.0 * m * n * k;
    const std::string shape = absl::StrCat(m, "x", n, "x", k);
    // Interleave the two so drift on a noisy machine hits both alike.
    double exec = 0, direct = 0;
    for (int round = 0; round < 3; ++round) {
      exec += MedianSeconds("executor GEMM " + shape, iters,
                            [&] { return (*prog)->Run({x}).status(); });
      direct += MedianSeconds("oneDNN sgemm " + shape, iters, [&] {
        dnnl_status_t s =
            dnnl_sgemm('N', 'N', m, n, k, 1.0f, x.data(), k, w.data(), n, 0.0f, c.data(), n);
        return s == dnnl_success ? absl::OkStatus()
                                 : absl::InternalError(absl::StrCat("dnnl_status_t ", s));
      });
    }
    std::printf("%4d x %d x %d %12.1f %14.1f %8.3f\n", m, n, k, 3 * flop / exec / 1e9,
                3 * flop / direct / 1e9, direct / exec);
  }
}

// ExampleCode at `batch`, exported with PyTorch (into TestTempRoot()).
Fixture ExportExampleCode(int batch) {
  absl::StatusOr<std::string> dir = MakeFixtures({"example_code"}, batch);
  if (!dir.ok()) Fail("exporting ExampleCode", dir.status());
  absl::StatusOr<Fixture> f = LoadFixture(*dir, "example_code");
  if (!f.ok()) Fail("loading ExampleCode from " + *dir, f.status());
  return *std::move(f);
}

// One row of the ExampleCode table: pipeserve split and unsplit against
// PyTorch eager (n/a where bench/torch_eager.py printed no time).
void ExampleCodeRow(const Fixture& ec, int batch, int threads, int iters) {
  auto plan = Partition(ec.model.graph, {});
  if (!plan.ok()) Fail("partitioning ExampleCode", plan.status());
  CpuBackendOptions o;
  o.threads = threads;
  auto backend = MakeCpuBackend(o);
  auto pipe = LocalPipeline::Create(ec.model, *plan, *backend, {});
  if (!pipe.ok()) Fail("compiling ExampleCode's 4 stages", pipe.status());
  auto whole = backend->Compile(ec.model.graph, ec.model.weights);
  if (!whole.ok()) Fail("compiling ExampleCode unsplit", whole.status());
  const std::string at = absl::StrCat(" at batch ", batch);
  double ours = MedianSeconds("ExampleCode's 4 stages" + at, iters,
                              [&] { return (*pipe)->Run(ec.inputs).status(); }) * 1e3;
  double unsplit = MedianSeconds("ExampleCode unsplit" + at, iters,
                                 [&] { return (*whole)->Run(ec.inputs).status(); }) * 1e3;
  std::string torch = absl::StrCat("/usr/bin/python3 bench/torch_eager.py --batch ", batch,
                                   " --threads ", threads, " --iters ", iters);
  double t_default = TorchMedianMs(torch);
  double t_skx = TorchMedianMs("OPENBLAS_CORETYPE=SkylakeX " + torch);
  const std::string vs_skx = t_skx > 0 ? absl::StrFormat("%.2fx", t_skx / ours) : "n/a";
  std::printf("%-6d %12.3f %12.3f %16s %12s %12s\n", batch, ours, unsplit,
              MsOrNa(t_default).c_str(), MsOrNa(t_skx).c_str(), vs_skx.c_str());
}

void ExampleCodeTable(int threads, int iters) {
  std::printf("\nExampleCode end to end (4 stages), %d thread(s), median ms per batch\n",
              threads);
  std::printf("%-6s %12s %12s %16s %12s %12s\n", "batch", "pipeserve", "unsplit",
              "torch(default)", "torch(SKX)", "vs SKX");
  for (int batch : {16, 256}) ExampleCodeRow(ExportExampleCode(batch), batch, threads, iters);
}

}  // namespace
}  // namespace pipeserve

int main(int argc, char** argv) {
  int threads = 1, iters = 200;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string f = argv[i];
    if (f == "--threads") threads = std::atoi(argv[i + 1]);
    if (f == "--iters") iters = std::atoi(argv[i + 1]);
  }
  pipeserve::GemmTable(threads, iters);
  pipeserve::ExampleCodeTable(threads, iters / 4);
  return 0;
}
