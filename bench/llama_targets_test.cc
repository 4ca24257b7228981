// bench/llama_targets on a tiny Llama: the accounting read from the graph
// (the Llama-style test model exported for generation, tied lm_head, and
// bench/llama_skeleton.py --tiny, bfloat16, untied) against counts by hand,
// and the measurement's steps run on the CPU backend and the device
// emulator: the same greedy tokens, so the steps are what a generation
// sends (prefill, then decode steps continuing each sequence).
#include "bench/llama_targets.h"

#include <cstdlib>
#include <string>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "runtime/cpu/cpu_backend.h"
#include "runtime/cuda/device_emulator.h"
#include "server/testing/temp_dir.h"
#include "tests/fixtures.h"

namespace pipeserve {
namespace {

TargetOptions Tiny() {
  TargetOptions o;
  o.prefill_seqs = 2;
  o.prefill_len = 9;     // a partial 8-token attention tile
  o.context = 15;        // decode steps cross the first 16-token block
  o.decode_steps = 2;
  o.prefill_chunk = 15;  // 1 sequence a prefill step
  o.batches = {1, 2};
  o.warmup = 1;
  o.repeats = 1;
  return o;
}

TEST(LlamaTargets, TheTiedTestModelIsCountedAndItsStepsMatchTheCpu) {
  absl::StatusOr<std::string> dir = MakeFixtures({"llama_gen"}, 1);
  ASSERT_TRUE(dir.ok()) << dir.status();
  absl::StatusOr<Graph> g = ReadGraph(*dir + "/llama_gen/model.psm");
  ASSERT_TRUE(g.ok()) << g.status();
  absl::StatusOr<LlamaShape> s = ShapeOf(*g);
  ASSERT_TRUE(s.ok()) << s.status();
  // transformer_models.Llama(): vocab 89, d 32, 4 heads, 2 KV heads, MLP 48, 3 layers.
  EXPECT_EQ(s->layers, 3);
  EXPECT_EQ(s->heads, 4);
  EXPECT_EQ(s->kv_heads, 2);
  EXPECT_EQ(s->head_dim, 8);
  EXPECT_EQ(s->vocab, 89);
  EXPECT_EQ(s->d, 32);
  EXPECT_EQ(s->gemm_params, 3 * (2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 48));
  EXPECT_EQ(s->lm_head_params, 89 * 32);
  // Tied: the lm_head reads the whole token table; rows of the rotary
  // tables (cos and sin, 20 positions x 8, float32) are read per token.
  EXPECT_EQ(s->embedding_bytes, 2 * 20 * 8 * 4);
  EXPECT_EQ(s->embedding_row_bytes, 2 * 8 * 4);
  EXPECT_EQ(s->kv_element_bytes, 4);

  Model m{*g, RandomWeights(*g, 3)};
  std::unique_ptr<ComputeBackend> cpu = MakeCpuBackend({});
  std::unique_ptr<ComputeBackend> emulator = MakeDeviceEmulatorBackend(Precision::kFloat32);
  absl::StatusOr<LlamaTimes> want = TimeLlama(*cpu, m, Tiny());
  ASSERT_TRUE(want.ok()) << want.status();
  absl::StatusOr<LlamaTimes> got = TimeLlama(*emulator, m, Tiny());
  ASSERT_TRUE(got.ok()) << got.status();
  ASSERT_EQ(got->last_tokens.size(), 2u);
  EXPECT_EQ(got->last_tokens, want->last_tokens);
  EXPECT_GT(got->prefill_seconds, 0);
  ASSERT_EQ(got->decode.size(), 2u);
  EXPECT_EQ(got->decode[1].batch, 2);
  EXPECT_GT(got->decode[1].step_seconds, 0);
  EXPECT_DOUBLE_EQ(got->decode[0].mean_context, 17.5);  // timed steps attend 17 and 18
}

TEST(LlamaTargets, TheBfloat16SkeletonIsCountedAndRunsOnTheEmulator) {
  const std::string dir = TestTempDir("skeleton");
  const std::string cmd = absl::StrCat("/usr/bin/python3 ", RunfilesRoot(),
                                       "/bench/llama_skeleton.py --tiny --out ", dir);
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  absl::StatusOr<Graph> g = ReadGraph(dir + "/graph.pb");
  ASSERT_TRUE(g.ok()) << g.status();
  absl::StatusOr<LlamaShape> s = ShapeOf(*g);
  ASSERT_TRUE(s.ok()) << s.status();
  // llama_skeleton.py's "tiny": vocab 97, d 64, 4 heads, 2 KV heads, MLP 96, 2 layers.
  EXPECT_EQ(s->layers, 2);
  EXPECT_EQ(s->head_dim, 16);
  EXPECT_EQ(s->gemm_params, 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 96));
  EXPECT_EQ(s->lm_head_params, 97 * 64);
  // Untied: a row of the token table per token, and of the rotary tables
  // (64 positions x 16).
  EXPECT_EQ(s->embedding_bytes, (97 * 64 + 2 * 64 * 16) * 2);
  EXPECT_EQ(s->embedding_row_bytes, (64 + 2 * 16) * 2);
  EXPECT_EQ(s->kv_element_bytes, 2);
  // Every parameter in bfloat16: 2 norms a layer and the final one, the
  // rotary tables (64 positions x 16).
  const int64_t params = s->gemm_params + s->lm_head_params + 97 * 64 + 5 * 64 + 2 * 64 * 16;
  EXPECT_EQ(s->weight_bytes, 2 * params);

  Model m{*g, RandomWeights(*g, 5)};
  std::unique_ptr<ComputeBackend> emulator = MakeDeviceEmulatorBackend(Precision::kBF16);
  absl::StatusOr<LlamaTimes> t = TimeLlama(*emulator, m, Tiny());
  ASSERT_TRUE(t.ok()) << t.status();
  for (int64_t token : t->last_tokens) {
    EXPECT_GE(token, 0);
    EXPECT_LT(token, 97);
  }
}

LlamaShape MadeUpShape() {
  LlamaShape s;
  s.layers = 2;
  s.heads = 4;
  s.kv_heads = 2;
  s.head_dim = 8;
  s.gemm_params = 1000;
  s.lm_head_params = 300;
  s.weight_bytes = 5000;
  s.embedding_bytes = 600;
  s.embedding_row_bytes = 20;
  s.kv_element_bytes = 2;
  return s;
}

TEST(LlamaTargets, FlopsAndBytesFollowTheShape) {
  const LlamaShape s = MadeUpShape();
  // 3 sequences of 4 tokens: 3 * (1 + 2 + 3 + 4) = 30 (query, key) pairs.
  EXPECT_DOUBLE_EQ(AttentionFlops(s, 3, 4), 4.0 * 2 * 4 * 8 * 30);
  EXPECT_DOUBLE_EQ(PrefillFlops(s, 3, 4), 2.0 * 12 * 1000 + 2.0 * 3 * 300 + 4.0 * 2 * 4 * 8 * 30);
  // Weights but the table, 5 rows of it, and 5 x 10 positions of 2 x 2 x 2 x 8 x 2 bytes.
  EXPECT_DOUBLE_EQ(DecodeBytes(s, 5, 10), 4400 + 5 * 20 + 5 * 10 * 128.0);
}

TEST(LlamaTargets, TheTableShowsSharesOfTheCardsLimits) {
  const LlamaShape s = MadeUpShape();
  TargetOptions o;
  o.prefill_seqs = 3;
  o.prefill_len = 4;
  LlamaTimes t;
  t.prefill_seconds = 1;
  t.decode = {{1, 1.0, 10}, {64, 2.0, 10}};
  CardLimits l;
  l.bf16_flops = 2 * PrefillFlops(s, 3, 4);        // 50%
  l.bytes_per_second = 4 * DecodeBytes(s, 1, 10);  // 25% at 1 sequence
  testing::internal::CaptureStdout();
  PrintTargets(s, o, t, l);
  const std::string table = testing::internal::GetCapturedStdout();
  EXPECT_NE(table.find("50% of peak, n/a of a cuBLASLt GEMM"), std::string::npos) << table;
  EXPECT_NE(table.find("25% of bandwidth"), std::string::npos) << table;
  EXPECT_NE(table.find("32.0x 1 seq"), std::string::npos) << table;  // 64 tokens in 2 s vs 1 in 1
  EXPECT_NE(table.find(">= 20x 1 seq"), std::string::npos) << table;
}

TEST(LlamaTargets, BadOptionsAndModelsAreRefused) {
  std::unique_ptr<ComputeBackend> cpu = MakeCpuBackend({});
  TargetOptions o = Tiny();
  o.batches = {};
  absl::StatusOr<LlamaTimes> t = TimeLlama(*cpu, Model(), o);
  EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument);
  t = TimeLlama(*cpu, Model(), Tiny());
  EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(t.status().message().find("generation"), std::string::npos) << t.status();
}

}  // namespace
}  // namespace pipeserve
