// Generation on the CUDA lowering: the GPT-2- and Llama-style models
// exported for generation (cached_attention on a paged KV cache,
// sample_tokens on the last stage), cut by the partitioner and run step by
// step (a prefill of two sequences, then decode steps) on the device
// emulator (the KV cache in device memory, KvAppend and PagedAttention's
// own source on the simt emulator, sample_tokens on the host once the
// logits are back) next to the CPU backend: the same logits within float32
// rounding and the same greedy tokens; bfloat16 GEMMs within 3e-2. A
// decode step for sequences a stage never saw is refused as the CPU cache
// refuses it.
#include <algorithm>
#include <cmath>
#include <cstdio>

#include "gtest/gtest.h"
#include "partitioner/partition.h"
#include "runtime/cpu/cpu_backend.h"
#include "runtime/cuda/device_emulator.h"
#include "runtime/local_pipeline.h"
#include "runtime/model_file.h"
#include "tests/fixtures.h"

namespace pipeserve {
namespace {

// One sequence's part of a step: its tokens at positions from, from + 1...
struct Part {
  int64_t id;
  std::vector<int64_t> tokens;
  int64_t from;
};

// A step's inputs in the plan's order (as the coordinator's Generator
// makes them): one KV block per sequence (block i for sequence i), greedy
// sampling, every sequence's logits (of its last token) kept.
std::vector<Tensor> StepInputs(const Plan& plan, const std::vector<Part>& parts) {
  std::vector<int64_t> tokens, positions, seq, blocks, ids, last, rows, ints;
  std::vector<float> floats;
  for (size_t i = 0; i < parts.size(); ++i) {
    for (size_t k = 0; k < parts[i].tokens.size(); ++k) {
      tokens.push_back(parts[i].tokens[k]);
      positions.push_back(parts[i].from + static_cast<int64_t>(k));
      seq.push_back(static_cast<int64_t>(i));
    }
    blocks.push_back(static_cast<int64_t>(i));
    ids.push_back(parts[i].id);
    last.push_back(static_cast<int64_t>(tokens.size()) - 1);
    rows.push_back(static_cast<int64_t>(i));  // of the last tokens' logits
    floats.insert(floats.end(), {0.0f, 1.0f, 1.0f, 0.0f});  // greedy
    ints.insert(ints.end(), {0, 7, parts[i].from});
  }
  const int64_t t = static_cast<int64_t>(tokens.size()), n = static_cast<int64_t>(parts.size());
  std::vector<Tensor> in;
  for (const ValueSpec& spec : plan.inputs()) {
    const std::string& name = spec.name();
    if (name == "kv_positions") in.push_back(Tensor::FromInt64s({t}, positions));
    else if (name == "kv_seq") in.push_back(Tensor::FromInt64s({t}, seq));
    else if (name == "kv_blocks") in.push_back(Tensor::FromInt64s({n, 1}, blocks));
    else if (name == "kv_seq_ids") in.push_back(Tensor::FromInt64s({n}, ids));
    else if (name == "kv_last") in.push_back(Tensor::FromInt64s({n}, last));
    else if (name == "logits_rows") in.push_back(Tensor::FromInt64s({n}, rows));
    else if (name == "sample_floats") in.push_back(Tensor::FromVector({n, 4}, floats));
    else if (name == "sample_ints") in.push_back(Tensor::FromInt64s({n, 3}, ints));
    else if (name == "sample_context") in.push_back(Tensor::FromInt64s({0}, {}));
    else if (name == "sample_context_ends") in.push_back(Tensor::FromInt64s({n}, {0, 0}));
    else in.push_back(Tensor::FromInt64s({1, t}, tokens));  // the token ids
  }
  return in;
}

int OutputIndex(const Plan& plan, const std::string& name) {
  for (int i = 0; i < plan.outputs_size(); ++i) {
    if (plan.outputs(i).name() == name) return i;
  }
  return -1;
}

class CudaGenerationTest : public ::testing::TestWithParam<std::string> {
 protected:
  static void SetUpTestSuite() {
    absl::StatusOr<std::string> d = MakeFixtures({"gpt2_gen", "llama_gen"}, 1);
    ASSERT_TRUE(d.ok()) << d.status();
    dir_ = new std::string(*d);
  }

  void SetUp() override {
    absl::StatusOr<Model> m = ReadModelFile(*dir_ + "/" + GetParam() + "_gen/model.psm");
    ASSERT_TRUE(m.ok()) << m.status();
    model_ = *std::move(m);
    for (Node& n : *model_.graph.mutable_nodes()) {  // as the coordinator sizes the cache
      if (n.op() == "cached_attention") (*n.mutable_attrs())["num_blocks"].set_i(4);
    }
    absl::StatusOr<Plan> plan = Partition(model_.graph, PartitionOptions());
    ASSERT_TRUE(plan.ok()) << plan.status();
    plan_ = *std::move(plan);
  }

  std::unique_ptr<LocalPipeline> Pipeline(ComputeBackend& backend) {
    auto pipe = LocalPipeline::Create(model_, plan_, backend, LocalPipelineOptions());
    EXPECT_TRUE(pipe.ok()) << pipe.status();
    return pipe.ok() ? *std::move(pipe) : nullptr;
  }

  Model model_;
  Plan plan_;
  static std::string* dir_;
};

std::string* CudaGenerationTest::dir_ = nullptr;

// max |a - b| / max |b|.
double RelativeDifference(const Tensor& a, const Tensor& b) {
  double err = 0, scale = 1e-30;
  for (int64_t i = 0; i < b.numel(); ++i) {
    err = std::max(err, static_cast<double>(std::fabs(a.data()[i] - b.data()[i])));
    scale = std::max(scale, static_cast<double>(std::fabs(b.data()[i])));
  }
  return err / scale;
}

// Prefill then two decode steps, each on the CPU and the emulator; the
// CPU's tokens drive both.
void CompareSteps(const Plan& plan, LocalPipeline& cpu, LocalPipeline& device, double tol,
                  bool same_tokens, const std::string& label) {
  const int logits = OutputIndex(plan, "logits_kept"), tokens = OutputIndex(plan, "next_tokens");
  ASSERT_GE(logits, 0);
  ASSERT_GE(tokens, 0);
  std::vector<Part> step = {{10, {3, 14, 15, 62, 6}, 0}, {11, {26, 5, 35}, 0}};
  for (int k = 0; k < 3; ++k) {
    const std::vector<Tensor> in = StepInputs(plan, step);
    absl::StatusOr<std::vector<Tensor>> want = cpu.Run(in);
    ASSERT_TRUE(want.ok()) << want.status();
    absl::StatusOr<std::vector<Tensor>> got = device.Run(in);
    ASSERT_TRUE(got.ok()) << label << " step " << k << ": " << got.status();
    const double err = RelativeDifference((*got)[logits], (*want)[logits]);
    EXPECT_LE(err, tol) << label << " step " << k;
    const Tensor& next = (*want)[tokens];
    if (same_tokens) {
      EXPECT_EQ((*got)[tokens].data_as<int64_t>()[0], next.data_as<int64_t>()[0]);
      EXPECT_EQ((*got)[tokens].data_as<int64_t>()[1], next.data_as<int64_t>()[1]);
    }
    std::printf("[ max_rel_err ] %s step %d (%s) logits vs cpu %.1e\n", label.c_str(), k,
                k == 0 ? "prefill" : "decode", err);
    for (int s = 0; s < 2; ++s) {
      step[s] = {step[s].id, {next.data_as<int64_t>()[s]},
                 step[s].from + static_cast<int64_t>(step[s].tokens.size())};
    }
  }
}

TEST_P(CudaGenerationTest, PrefillAndDecodeMatchTheCpuBackend) {
  std::unique_ptr<ComputeBackend> cpu = MakeCpuBackend({});
  for (Precision p : {Precision::kFloat32, Precision::kBF16}) {
    std::unique_ptr<ComputeBackend> emulator = MakeDeviceEmulatorBackend(p);
    std::unique_ptr<LocalPipeline> want = Pipeline(*cpu), got = Pipeline(*emulator);
    ASSERT_NE(want, nullptr);
    ASSERT_NE(got, nullptr);
    const bool fp32 = p == Precision::kFloat32;
    CompareSteps(plan_, *want, *got, fp32 ? 1e-5 : 3e-2, fp32,
                 GetParam() + "_" + emulator->Name());
  }
}

TEST_P(CudaGenerationTest, ADecodeStepForSequencesAStageNeverSawIsRefused) {
  std::unique_ptr<ComputeBackend> emulator = MakeDeviceEmulatorBackend(Precision::kFloat32);
  std::unique_ptr<LocalPipeline> fresh = Pipeline(*emulator);
  ASSERT_NE(fresh, nullptr);
  absl::StatusOr<std::vector<Tensor>> out =
      fresh->Run(StepInputs(plan_, {{10, {7}, 5}, {11, {8}, 3}}));
  ASSERT_FALSE(out.ok());
  EXPECT_EQ(out.status().code(), absl::StatusCode::kFailedPrecondition) << out.status();
  EXPECT_NE(out.status().message().find("not in this stage's cache"), std::string::npos)
      << out.status();
}

INSTANTIATE_TEST_SUITE_P(Models, CudaGenerationTest, ::testing::Values("gpt2", "llama"),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace pipeserve
