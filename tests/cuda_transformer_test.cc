// Transformers on the CUDA lowering: the GPT-2- and Llama-style models of
// tests/pytorch/transformer_models.py, exported from PyTorch, cut by the
// partitioner and run stage by stage against PyTorch's float64 answer, in
// float32 (as closely as PyTorch's own float32 run), with bfloat16 GEMMs
// (within 1e-2), and as bfloat16 models (within twice PyTorch's own
// bfloat16 error). Without a GPU they run on the device emulator (the device
// plans the CUDA backend runs, every custom kernel's own source on the simt
// emulator, GEMMs as cuBLAS computes them); on a GPU also on the CUDA
// backend with every kernel allowed (--cuda_ops=unconfirmed), which is how
// tools/gpu_check.sh runs it (fixtures made beforehand, named by
// $PIPESERVE_TRANSFORMER_FIXTURES, as the GPU machine has no PyTorch).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>

#include "gtest/gtest.h"
#include "partitioner/partition.h"
#include "runtime/cuda/cuda_backend.h"
#include "runtime/cuda/device_emulator.h"
#include "runtime/local_pipeline.h"
#include "tests/compare.h"
#include "tests/fixtures.h"

namespace pipeserve {
namespace {

struct Case {
  std::string model;  // gpt2, llama
  std::string backend;
  Precision precision;
  bool gpu;
};

std::vector<Case> Cases() {
  std::vector<Case> cases;
  for (const char* model : {"gpt2", "llama"}) {
    cases.push_back({model, "emulated_fp32", Precision::kFloat32, false});
    cases.push_back({model, "emulated_bf16", Precision::kBF16, false});
    cases.push_back({model, "cuda_fp32", Precision::kFloat32, true});
    cases.push_back({model, "cuda_bf16", Precision::kBF16, true});
  }
  // bfloat16 models: every value bfloat16 on the device, computed in float32.
  for (const char* model : {"gpt2_bf16", "llama_bf16"}) {
    cases.push_back({model, "emulated", Precision::kFloat32, false});
    cases.push_back({model, "cuda", Precision::kFloat32, true});
  }
  return cases;
}

class CudaTransformerTest : public ::testing::TestWithParam<Case> {
 protected:
  static void SetUpTestSuite() {
    const char* given = std::getenv("PIPESERVE_TRANSFORMER_FIXTURES");
    if (given != nullptr) {
      dir_ = new std::string(given);
      return;
    }
    absl::StatusOr<std::string> d =
        MakeFixtures({"gpt2", "llama", "gpt2_bf16", "llama_bf16"}, 2);
    ASSERT_TRUE(d.ok()) << d.status();
    dir_ = new std::string(*d);
  }

  void SetUp() override {
    const Case& c = GetParam();
    if (!c.gpu) {
      backend_ = MakeDeviceEmulatorBackend(c.precision);
      return;
    }
    absl::StatusOr<int> devices = CudaDeviceCount();
    if (!devices.ok() || *devices == 0) GTEST_SKIP() << c.backend << ": no CUDA device here";
    CudaBackendOptions o;
    o.precision = c.precision;
    o.cuda_ops = CudaOps::kUnconfirmed;
    absl::StatusOr<std::unique_ptr<ComputeBackend>> b = MakeCudaBackend(o);
    ASSERT_TRUE(b.ok()) << b.status();
    backend_ = *std::move(b);
  }

  // The model's outputs, every stage on the backend.
  std::vector<Tensor> Run(const Fixture& f) {
    absl::StatusOr<Plan> plan = Partition(f.model.graph, PartitionOptions());
    EXPECT_TRUE(plan.ok()) << plan.status();
    if (!plan.ok()) return {};
    auto pipe = LocalPipeline::Create(f.model, *plan, *backend_, LocalPipelineOptions());
    EXPECT_TRUE(pipe.ok()) << pipe.status();
    if (!pipe.ok()) return {};
    absl::StatusOr<std::vector<Tensor>> out = (*pipe)->Run(f.inputs);
    EXPECT_TRUE(out.ok()) << out.status();
    return out.ok() ? *out : std::vector<Tensor>();
  }

  std::unique_ptr<ComputeBackend> backend_;
  static std::string* dir_;
};

std::string* CudaTransformerTest::dir_ = nullptr;

// max |got - exact| / max |exact| (got float32 or bfloat16).
double RelativeToExact(const Tensor& got, const std::vector<double>& exact) {
  double err = 0, scale = 1e-30;
  for (int64_t i = 0; i < got.numel(); ++i) {
    const double v = got.dtype() == DT_BFLOAT16 ? Bf16ToFloat(got.data_as<uint16_t>()[i])
                                                : got.data()[i];
    err = std::max(err, std::fabs(v - exact[i]));
    scale = std::max(scale, std::fabs(exact[i]));
  }
  return err / scale;
}

TEST_P(CudaTransformerTest, EveryStageMatchesPyTorch) {
  const Case& c = GetParam();
  absl::StatusOr<Fixture> f = LoadFixture(*dir_, c.model);
  ASSERT_TRUE(f.ok()) << f.status();
  std::vector<Tensor> out = Run(*f);
  ASSERT_EQ(out.size(), f->expected.size());
  for (size_t i = 0; i < out.size(); ++i) {
    SCOPED_TRACE(absl::StrCat(c.model, " on ", c.backend, ", output ", i));
    const double err = RelativeToExact(out[i], f->exact[i]);
    if (out[i].dtype() == DT_BFLOAT16) {  // as close as PyTorch's own bfloat16 run
      const double torch = RelativeToExact(f->expected[i], f->exact[i]);
      EXPECT_LE(err, std::max(2 * torch, 1e-2)) << "PyTorch's bfloat16 run: " << torch;
      std::printf("[ max_rel_err ] pytorch_bf16 %s output %zu %.1e\n", c.model.c_str(), i, torch);
    } else if (c.precision == Precision::kFloat32) {
      ExpectMatchesPyTorch(out[i], f->expected[i], f->exact[i]);
    } else {
      EXPECT_LE(err, 1e-2);
    }
    std::printf("[ max_rel_err ] %s %s output %zu %.1e\n", c.backend.c_str(), c.model.c_str(), i,
                err);
  }
}

INSTANTIATE_TEST_SUITE_P(Models, CudaTransformerTest, ::testing::ValuesIn(Cases()),
                         [](const auto& info) {
                           return info.param.model + "_" + info.param.backend;
                         });

}  // namespace
}  // namespace pipeserve
