// Generation on the CUDA lowering: the GPT-2- and Llama-style models
// exported for generation (cached_attention on a paged KV cache,
// sample_tokens on the last stage), cut by the partitioner and run step by
// step (a prefill of two sequences, then decode steps) on the device
// emulator (the KV cache in device memory, KvAppend and PagedAttention's
// own source on the simt emulator, sample_tokens' picks on the device)
// next to the CPU backend: the same logits within float32
// rounding and the same greedy tokens; bfloat16 GEMMs within 1e-2; KV blocks
// of 4 tokens, so steps cross blocks, in tables out of order. A
// decode step for sequences a stage never saw is refused as the CPU cache
// refuses it. On a GPU the same steps also run on the CUDA backend with
// every kernel allowed, which is how tools/gpu_check.sh runs it (fixtures
// made beforehand, named by $PIPESERVE_GENERATION_FIXTURES).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "gtest/gtest.h"
#include "partitioner/partition.h"
#include "runtime/conformance/reference.h"
#include "runtime/cpu/cpu_backend.h"
#include "runtime/cuda/cuda_backend.h"
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

// Each sequence's block table: 3 blocks of 4 tokens, out of order.
const std::vector<std::vector<int64_t>> kTables = {{5, 2, 7}, {1, 6, 3}};

// A step's inputs by name (as the coordinator's Generator makes them):
// greedy sampling, every sequence's logits (of its last token) kept;
// `context_end`, when not 0, a broken sample_context_ends.
std::vector<std::pair<std::string, Tensor>> NamedStepInputs(
    const std::vector<Part>& parts, int64_t context_end = 0,
    const std::vector<float>& sampling = {0.0f, 1.0f, 1.0f, 0.0f}) {
  std::vector<int64_t> tokens, positions, seq, blocks, ids, last, rows, ints;
  std::vector<float> floats;
  for (size_t i = 0; i < parts.size(); ++i) {
    for (size_t k = 0; k < parts[i].tokens.size(); ++k) {
      tokens.push_back(parts[i].tokens[k]);
      positions.push_back(parts[i].from + static_cast<int64_t>(k));
      seq.push_back(static_cast<int64_t>(i));
    }
    blocks.insert(blocks.end(), kTables[i].begin(), kTables[i].end());
    ids.push_back(parts[i].id);
    last.push_back(static_cast<int64_t>(tokens.size()) - 1);
    rows.push_back(static_cast<int64_t>(i));  // of the last tokens' logits
    floats.insert(floats.end(), sampling.begin(), sampling.end());  // greedy by default
    ints.insert(ints.end(), {0, 7, parts[i].from});
  }
  const int64_t t = static_cast<int64_t>(tokens.size()), n = static_cast<int64_t>(parts.size());
  return {{"kv_positions", Tensor::FromInt64s({t}, positions)},
          {"kv_seq", Tensor::FromInt64s({t}, seq)},
          {"kv_blocks", Tensor::FromInt64s({n, 3}, blocks)},
          {"kv_seq_ids", Tensor::FromInt64s({n}, ids)},
          {"kv_last", Tensor::FromInt64s({n}, last)},
          {"logits_rows", Tensor::FromInt64s({n}, rows)},
          {"sample_floats", Tensor::FromVector({n, 4}, floats)},
          {"sample_ints", Tensor::FromInt64s({n, 3}, ints)},
          {"sample_context", Tensor::FromInt64s({0}, {})},
          {"sample_context_ends", Tensor::FromInt64s({n}, {context_end, context_end})},
          {"", Tensor::FromInt64s({1, t}, tokens)}};  // the token ids, whatever their name
}

// The inputs `specs` names, from `named` (an unknown name: the token ids).
std::vector<Tensor> Select(const google::protobuf::RepeatedPtrField<ValueSpec>& specs,
                           const std::vector<std::pair<std::string, Tensor>>& named) {
  std::vector<Tensor> in;
  for (const ValueSpec& spec : specs) {
    auto it = std::find_if(named.begin(), named.end(),
                           [&](const auto& p) { return p.first == spec.name(); });
    in.push_back(it != named.end() ? it->second : named.back().second);
  }
  return in;
}

std::vector<Tensor> StepInputs(const Plan& plan, const std::vector<Part>& parts,
                               int64_t context_end = 0,
                               const std::vector<float>& sampling = {0.0f, 1.0f, 1.0f, 0.0f}) {
  return Select(plan.inputs(), NamedStepInputs(parts, context_end, sampling));
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
    if (const char* given = std::getenv("PIPESERVE_GENERATION_FIXTURES")) {
      dir_ = new std::string(given);
      return;
    }
    absl::StatusOr<std::string> d = MakeFixtures({"gpt2_gen", "llama_gen"}, 1);
    ASSERT_TRUE(d.ok()) << d.status();
    dir_ = new std::string(*d);
  }

  void SetUp() override {
    absl::StatusOr<Model> m = ReadModelFile(*dir_ + "/" + GetParam() + "_gen/model.psm");
    ASSERT_TRUE(m.ok()) << m.status();
    model_ = *std::move(m);
    for (Node& n : *model_.graph.mutable_nodes()) {  // as the coordinator sizes the cache
      if (n.op() != "cached_attention") continue;
      (*n.mutable_attrs())["num_blocks"].set_i(8);
      (*n.mutable_attrs())["block_size"].set_i(4);  // steps cross blocks
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
    const double err = MaxRelativeDifference((*got)[logits], (*want)[logits]);
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
    CompareSteps(plan_, *want, *got, fp32 ? 1e-5 : 1e-2, fp32,
                 GetParam() + "_" + emulator->Name());
  }
}

// A step that fails after its metadata was checked (here sample_tokens'
// parameters, which the host checks after the cache's) leaves no
// positions behind: the next step of those
// sequences is refused, as on the CPU; and a stage reports the blocks its
// steps wrote, as the CPU's does.
TEST_P(CudaGenerationTest, AFailedStepLeavesNothingBehindAndBlocksAreCounted) {
  std::unique_ptr<ComputeBackend> cpu = MakeCpuBackend({});
  std::unique_ptr<ComputeBackend> emulator = MakeDeviceEmulatorBackend(Precision::kFloat32);
  for (ComputeBackend* backend : {cpu.get(), emulator.get()}) {
    std::unique_ptr<LocalPipeline> pipe = Pipeline(*backend);
    ASSERT_NE(pipe, nullptr);
    const std::vector<Part> prompt = {{10, {3, 14, 15, 62, 6}, 0}, {11, {26, 5, 35}, 0}};
    absl::StatusOr<std::vector<Tensor>> broken = pipe->Run(StepInputs(plan_, prompt, 5));
    ASSERT_FALSE(broken.ok()) << backend->Name();
    absl::StatusOr<std::vector<Tensor>> next =
        pipe->Run(StepInputs(plan_, {{10, {7}, 5}, {11, {8}, 3}}));
    EXPECT_EQ(next.status().code(), absl::StatusCode::kFailedPrecondition)
        << backend->Name() << ": " << next.status();
  }
  // Stage 0 alone: a prompt of 5 and 3 tokens writes blocks 5, 2 and 1.
  const Stage& first = plan_.stages(0);
  for (ComputeBackend* backend : {cpu.get(), emulator.get()}) {
    auto program = backend->Compile(first.graph(), model_.weights);
    ASSERT_TRUE(program.ok()) << program.status();
    const std::vector<Part> prompt = {{10, {3, 14, 15, 62, 6}, 0}, {11, {26, 5, 35}, 0}};
    ASSERT_TRUE((*program)->Run(Select(first.graph().inputs(), NamedStepInputs(prompt))).ok());
    EXPECT_EQ((*program)->kv_cache().blocks, 8) << backend->Name();
    EXPECT_EQ((*program)->kv_cache().blocks_allocated, 3) << backend->Name();
  }
}

// Every row is picked on the device (only token ids come back), greedy or
// sampled with a temperature, a nucleus or penalties: the same tokens as
// the CPU's. Parameters the CPU refuses are refused with its message,
// before the step runs.
TEST_P(CudaGenerationTest, SampledAndPenalisedRowsMatchTheCpuAndBadParametersItsErrors) {
  std::unique_ptr<ComputeBackend> cpu = MakeCpuBackend({});
  std::unique_ptr<ComputeBackend> emulator = MakeDeviceEmulatorBackend(Precision::kFloat32);
  const std::vector<std::vector<float>> samplings = {
      {0.8f, 0.9f, 1.0f, 0.0f}, {0.0f, 1.0f, 1.3f, 0.0f}, {0.0f, 1.0f, 1.0f, 0.5f},
      {1.2f, 0.6f, 1.2f, 0.3f}};
  int64_t id = 20;
  for (const std::vector<float>& sampling : samplings) {
    std::unique_ptr<LocalPipeline> want = Pipeline(*cpu), got = Pipeline(*emulator);
    ASSERT_NE(want, nullptr);
    ASSERT_NE(got, nullptr);
    const std::vector<Part> prompt = {{id, {3, 14, 15, 62, 6}, 0}, {id + 1, {26, 5, 35}, 0}};
    id += 2;
    const std::vector<Tensor> in = StepInputs(plan_, prompt, 0, sampling);
    absl::StatusOr<std::vector<Tensor>> a = want->Run(in), b = got->Run(in);
    ASSERT_TRUE(a.ok()) << a.status();
    ASSERT_TRUE(b.ok()) << b.status();
    const int tokens = OutputIndex(plan_, "next_tokens");
    for (int s = 0; s < 2; ++s) {
      EXPECT_EQ((*b)[tokens].data_as<int64_t>()[s], (*a)[tokens].data_as<int64_t>()[s])
          << "temperature " << sampling[0] << ", sequence " << s;
    }
  }
  for (const std::vector<float>& bad : {std::vector<float>{0.0f, 2.0f, 1.0f, 0.0f},
                                        std::vector<float>{0.5f, 1.0f, -1.0f, 0.0f}}) {
    std::unique_ptr<LocalPipeline> want = Pipeline(*cpu), got = Pipeline(*emulator);
    const std::vector<Tensor> in = StepInputs(plan_, {{40, {3, 14}, 0}, {41, {26}, 0}}, 0, bad);
    absl::StatusOr<std::vector<Tensor>> a = want->Run(in), b = got->Run(in);
    ASSERT_FALSE(a.ok());
    ASSERT_FALSE(b.ok());
    EXPECT_EQ(b.status().code(), absl::StatusCode::kInvalidArgument) << b.status();
    const std::string cpu(a.status().message());
    const size_t at = cpu.find("node \"");
    ASSERT_NE(at, std::string::npos) << a.status();
    EXPECT_NE(b.status().message().find(cpu.substr(at)), std::string::npos)
        << "cpu: " << a.status() << "\nemulator: " << b.status();
  }
}

// The same steps on the GPU (skipped without one).
TEST_P(CudaGenerationTest, PrefillAndDecodeOnTheCudaBackendMatchTheCpuBackend) {
  absl::StatusOr<int> devices = CudaDeviceCount();
  if (!devices.ok() || *devices == 0) GTEST_SKIP() << "cuda: no CUDA device here";
  std::unique_ptr<ComputeBackend> cpu = MakeCpuBackend({});
  for (Precision p : {Precision::kFloat32, Precision::kBF16}) {
    CudaBackendOptions o;
    o.precision = p;
    o.cuda_ops = CudaOps::kUnconfirmed;
    absl::StatusOr<std::unique_ptr<ComputeBackend>> cuda = MakeCudaBackend(o);
    ASSERT_TRUE(cuda.ok()) << cuda.status();
    std::unique_ptr<LocalPipeline> want = Pipeline(*cpu), got = Pipeline(**cuda);
    ASSERT_NE(want, nullptr);
    ASSERT_NE(got, nullptr);
    const bool fp32 = p == Precision::kFloat32;
    CompareSteps(plan_, *want, *got, fp32 ? 1e-5 : 1e-2, fp32, GetParam() + "_" + (*cuda)->Name());
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
