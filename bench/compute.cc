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
#include <dnnl.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "bench/bench_util.h"
#include "partitioner/graph_builder.h"
#include "partitioner/partition.h"
#include "runtime/cpu/cpu_backend.h"
#include "runtime/cpu/cpu_kernels.h"
#include "runtime/local_pipeline.h"
#include "runtime/model_file.h"
#include "runtime/npy.h"

namespace pipeserve {
namespace {

// Median seconds of `iters` timed calls after a warm-up.
double MedianSeconds(int iters, const std::function<void()>& fn) {
  for (int i = 0; i < 3; ++i) fn();
  std::vector<double> t;
  for (int i = 0; i < iters; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    fn();
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}


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
    if (!prog.ok()) {
      std::printf("compile failed: %s\n", std::string(prog.status().message()).c_str());
      return;
    }
    Tensor x = RandomTensor({m, k}, 1);
    const Tensor& w = model.weights.at("w");
    Tensor c = Tensor::Empty({m, n});
    SetComputeThreads(threads);
    double flop = 2.0 * m * n * k;
    // Interleave the two so drift on a noisy machine hits both alike.
    double exec = 0, direct = 0;
    for (int round = 0; round < 3; ++round) {
      exec += MedianSeconds(iters, [&] { (void)(*prog)->Run({x}); });
      direct += MedianSeconds(iters, [&] {
        dnnl_sgemm('N', 'N', m, n, k, 1.0f, x.data(), k, w.data(), n, 0.0f, c.data(), n);
      });
    }
    std::printf("%4d x %d x %d %12.1f %14.1f %8.3f\n", m, n, k, 3 * flop / exec / 1e9,
                3 * flop / direct / 1e9, direct / exec);
  }
}


void ExampleCodeTable(int threads, int iters) {
  std::printf("\nExampleCode end to end (4 stages), %d thread(s), median ms per batch\n",
              threads);
  std::printf("%-6s %12s %12s %16s %12s %12s\n", "batch", "pipeserve", "unsplit",
              "torch(default)", "torch(SKX)", "vs SKX");
  const char* tmp = std::getenv("TMPDIR");
  std::string dir = absl::StrCat(tmp ? tmp : "/tmp", "/pipeserve_bench_", getpid());
  for (int batch : {16, 256}) {
    std::string cmd = absl::StrCat("/usr/bin/python3 tests/pytorch/make_fixtures.py --out ",
                                   dir, " --case example_code --batch ", batch,
                                   " > /dev/null");
    if (std::system(cmd.c_str()) != 0) {
      std::printf("exporting ExampleCode failed (%s)\n", cmd.c_str());
      return;
    }
    std::string cdir = dir + "/example_code";
    auto model = ReadModelFile(cdir + "/model.psm");
    auto x = ReadNpy(cdir + "/in_x.npy");
    auto y = ReadNpy(cdir + "/in_y.npy");
    if (!model.ok() || !x.ok() || !y.ok()) {
      std::printf("loading the export failed\n");
      return;
    }
    auto plan = Partition(model->graph, {});
    CpuBackendOptions o;
    o.threads = threads;
    auto backend = MakeCpuBackend(o);
    auto pipe = LocalPipeline::Create(*model, *plan, *backend, {});
    auto whole = backend->Compile(model->graph, model->weights);
    if (!pipe.ok() || !whole.ok()) {
      std::printf("compile failed\n");
      return;
    }
    std::vector<Tensor> in = {*x, *y};
    double ours = MedianSeconds(iters, [&] { (void)(*pipe)->Run(in); }) * 1e3;
    double unsplit = MedianSeconds(iters, [&] { (void)(*whole)->Run(in); }) * 1e3;
    std::string torch = absl::StrCat("/usr/bin/python3 bench/torch_eager.py --batch ", batch,
                                     " --threads ", threads, " --iters ", iters);
    double t_default = TorchMedianMs(torch);
    double t_skx = TorchMedianMs("OPENBLAS_CORETYPE=SkylakeX " + torch);
    std::printf("%-6d %12.3f %12.3f %16.3f %12.3f %11.2fx\n", batch, ours, unsplit,
                t_default, t_skx, t_skx / ours);
  }
  std::system(absl::StrCat("rm -rf ", dir).c_str());
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
