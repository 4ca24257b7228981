// Transformers on the CUDA lowering, without a GPU: the GPT-2- and
// Llama-style models of tests/pytorch/transformer_models.py, exported from
// PyTorch at test time, cut by the partitioner and run stage by stage by
// the device emulator (the device plans the CUDA backend runs, every
// custom kernel's own source on the simt emulator, GEMMs as cuBLAS
// computes them), against PyTorch's float64 answer: in float32 as closely
// as PyTorch's own float32 run, in bfloat16 GEMMs within 3e-2.
#include <algorithm>
#include <cmath>
#include <cstdio>

#include "gtest/gtest.h"
#include "partitioner/partition.h"
#include "runtime/cuda/device_emulator.h"
#include "runtime/local_pipeline.h"
#include "tests/compare.h"
#include "tests/fixtures.h"

namespace pipeserve {
namespace {

class CudaTransformerTest : public ::testing::TestWithParam<std::string> {
 protected:
  static void SetUpTestSuite() {
    absl::StatusOr<std::string> d = MakeFixtures({"gpt2", "llama"}, 2);
    ASSERT_TRUE(d.ok()) << d.status();
    dir_ = new std::string(*d);
  }

  // The model's outputs, every stage on the emulator in `precision`.
  std::vector<Tensor> Run(const Fixture& f, Precision precision) {
    absl::StatusOr<Plan> plan = Partition(f.model.graph, PartitionOptions());
    EXPECT_TRUE(plan.ok()) << plan.status();
    if (!plan.ok()) return {};
    std::unique_ptr<ComputeBackend> emulator = MakeDeviceEmulatorBackend(precision);
    auto pipe = LocalPipeline::Create(f.model, *plan, *emulator, LocalPipelineOptions());
    EXPECT_TRUE(pipe.ok()) << pipe.status();
    if (!pipe.ok()) return {};
    std::printf("%s: %d stages on %s\n", GetParam().c_str(), (*pipe)->num_stages(),
                emulator->Name().c_str());
    absl::StatusOr<std::vector<Tensor>> out = (*pipe)->Run(f.inputs);
    EXPECT_TRUE(out.ok()) << out.status();
    return out.ok() ? *out : std::vector<Tensor>();
  }

  static std::string* dir_;
};

std::string* CudaTransformerTest::dir_ = nullptr;

// max |got - exact| / max |exact|.
double RelativeToExact(const Tensor& got, const std::vector<double>& exact) {
  double err = 0, scale = 1e-30;
  for (int64_t i = 0; i < got.numel(); ++i) {
    err = std::max(err, std::fabs(got.data()[i] - exact[i]));
    scale = std::max(scale, std::fabs(exact[i]));
  }
  return err / scale;
}

TEST_P(CudaTransformerTest, Float32MatchesPyTorch) {
  absl::StatusOr<Fixture> f = LoadFixture(*dir_, GetParam());
  ASSERT_TRUE(f.ok()) << f.status();
  std::vector<Tensor> out = Run(*f, Precision::kFloat32);
  ASSERT_EQ(out.size(), f->expected.size());
  for (size_t i = 0; i < out.size(); ++i) {
    SCOPED_TRACE(absl::StrCat(GetParam(), " output ", i));
    ExpectMatchesPyTorch(out[i], f->expected[i], f->exact[i]);
    std::printf("[ max_rel_err ] emulated_fp32 %s output %zu %.1e\n", GetParam().c_str(), i,
                RelativeToExact(out[i], f->exact[i]));
  }
}

TEST_P(CudaTransformerTest, Bfloat16GemmsStayWithinTolerance) {
  absl::StatusOr<Fixture> f = LoadFixture(*dir_, GetParam());
  ASSERT_TRUE(f.ok()) << f.status();
  std::vector<Tensor> out = Run(*f, Precision::kBF16);
  ASSERT_EQ(out.size(), f->expected.size());
  for (size_t i = 0; i < out.size(); ++i) {
    const double err = RelativeToExact(out[i], f->exact[i]);
    EXPECT_LE(err, 3e-2) << GetParam() << " output " << i;
    std::printf("[ max_rel_err ] emulated_bf16 %s output %zu %.1e\n", GetParam().c_str(), i, err);
  }
}

INSTANTIATE_TEST_SUITE_P(Models, CudaTransformerTest, ::testing::Values("gpt2", "llama"),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace pipeserve
