#include "runtime/cpu/kv_cache.h"

#include <cmath>
#include <random>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace pipeserve {
namespace {

using ::testing::HasSubstr;

constexpr int kHeads = 4, kKvHeads = 2, kDim = 8, kBlock = 4;

Tensor Random(Shape shape, std::mt19937& rng) {
  std::normal_distribution<float> n;
  Tensor t = Tensor::Empty(shape);
  for (int64_t i = 0; i < t.numel(); ++i) t.data()[i] = n(rng);
  return t;
}

// Rows [from, to) of dim 2 of a [1, H, T, D] tensor.
Tensor Tokens(const Tensor& x, int64_t from, int64_t to) {
  const int64_t h = x.dim(1), t = x.dim(2), d = x.dim(3);
  Tensor out = Tensor::Empty({1, h, to - from, d});
  for (int64_t i = 0; i < h; ++i) {
    for (int64_t j = from; j < to; ++j) {
      for (int64_t k = 0; k < d; ++k) {
        out.data()[(i * (to - from) + j - from) * d + k] = x.data()[(i * t + j) * d + k];
      }
    }
  }
  return out;
}

// Causal grouped-query attention over the whole sequence, in double.
std::vector<double> Reference(const Tensor& q, const Tensor& k, const Tensor& v, float scale) {
  const int64_t t = q.dim(2);
  std::vector<double> out(q.numel());
  for (int h = 0; h < kHeads; ++h) {
    const int g = h / (kHeads / kKvHeads);
    for (int64_t i = 0; i < t; ++i) {
      std::vector<double> s(i + 1);
      double max = -INFINITY, sum = 0;
      for (int64_t j = 0; j <= i; ++j) {
        double dot = 0;
        for (int c = 0; c < kDim; ++c) {
          dot += q.data()[(h * t + i) * kDim + c] * k.data()[(g * t + j) * kDim + c];
        }
        s[j] = dot * scale;
        max = std::max(max, s[j]);
      }
      for (double& x : s) sum += x = std::exp(x - max);
      for (int c = 0; c < kDim; ++c) {
        double acc = 0;
        for (int64_t j = 0; j <= i; ++j) acc += s[j] / sum * v.data()[(g * t + j) * kDim + c];
        out[(h * t + i) * kDim + c] = acc;
      }
    }
  }
  return out;
}

struct Meta {
  Tensor positions, seq, blocks, ids;
};

// One sequence (id `id`, blocks `table`) at positions [from, to).
Meta OneSequence(int64_t id, std::vector<int64_t> table, int64_t from, int64_t to) {
  std::vector<int64_t> pos;
  for (int64_t p = from; p < to; ++p) pos.push_back(p);
  const int64_t width = static_cast<int64_t>(table.size());
  return {Tensor::FromInt64s({to - from}, pos),
          Tensor::FromInt64s({to - from}, std::vector<int64_t>(to - from, 0)),
          Tensor::FromInt64s({1, width}, table), Tensor::FromInt64s({1}, {id})};
}

absl::StatusOr<Tensor> Step(KvCache& cache, const Meta& m, const Tensor& q, const Tensor& k,
                            const Tensor& v, float scale) {
  absl::StatusOr<KvStep> step = cache.BeginStep(m.positions, m.seq, m.blocks, m.ids, q.dim(2));
  if (!step.ok()) return step.status();
  return cache.Attend(0, *step, q, k, v, scale);
}

TEST(KvCacheTest, ChunkedPrefillThenDecodeEqualsFullCausalAttention) {
  std::mt19937 rng(1);
  const int64_t t = 14;
  Tensor q = Random({1, kHeads, t, kDim}, rng), k = Random({1, kKvHeads, t, kDim}, rng),
         v = Random({1, kKvHeads, t, kDim}, rng);
  const float scale = 1 / std::sqrt(static_cast<float>(kDim));
  std::vector<double> ref = Reference(q, k, v, scale);
  KvCache cache(/*num_blocks=*/8, kBlock);
  cache.AddLayer(kKvHeads, kDim, DT_FLOAT32);
  const std::vector<int64_t> table = {5, 2, 7, 0};  // not contiguous, not in order
  // Positions 0..9 as one chunk (through GEMMs), 10..12 as another (the
  // loops), then 13 alone.
  for (auto [from, to] : {std::pair<int64_t, int64_t>{0, 10}, {10, 13}, {13, 14}}) {
    absl::StatusOr<Tensor> out = Step(cache, OneSequence(42, table, from, to),
                                      Tokens(q, from, to), Tokens(k, from, to),
                                      Tokens(v, from, to), scale);
    ASSERT_TRUE(out.ok()) << out.status();
    for (int h = 0; h < kHeads; ++h) {
      for (int64_t i = from; i < to; ++i) {
        for (int c = 0; c < kDim; ++c) {
          EXPECT_NEAR(out->data()[(h * (to - from) + i - from) * kDim + c],
                      ref[(h * t + i) * kDim + c], 1e-5)
              << "head " << h << " position " << i;
        }
      }
    }
  }
  EXPECT_EQ(cache.blocks_in_use(), 4);
}

TEST(KvCacheTest, APositionTheStageDoesNotHoldIsRefusedNotGuessed) {
  std::mt19937 rng(2);
  KvCache cache(8, kBlock);
  cache.AddLayer(kKvHeads, kDim, DT_FLOAT32);
  Tensor q = Random({1, kHeads, 1, kDim}, rng), k = Random({1, kKvHeads, 1, kDim}, rng);
  // A decode step at position 5 on a cache that never saw the sequence
  // (a restarted stage server).
  absl::StatusOr<Tensor> out = Step(cache, OneSequence(7, {0, 1}, 5, 6), q, k, k, 1.0f);
  EXPECT_EQ(out.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(out.status().message(), HasSubstr("sequence 7: position 0 is not in this stage's cache"));
  // Its blocks reused by another sequence: still not sequence 7's.
  Tensor q6 = Random({1, kHeads, 6, kDim}, rng), k6 = Random({1, kKvHeads, 6, kDim}, rng);
  ASSERT_TRUE(Step(cache, OneSequence(8, {0, 1}, 0, 6), q6, k6, k6, 1.0f).ok());
  out = Step(cache, OneSequence(7, {0, 1}, 6, 7), q, k, k, 1.0f);
  EXPECT_EQ(out.status().code(), absl::StatusCode::kFailedPrecondition);
  // Sequence 8 goes on.
  EXPECT_TRUE(Step(cache, OneSequence(8, {0, 1}, 6, 7), q, k, k, 1.0f).ok());
}

TEST(KvCacheTest, BadMetadataIsRefusedNamingIt) {
  std::mt19937 rng(3);
  KvCache cache(4, kBlock);
  cache.AddLayer(kKvHeads, kDim, DT_FLOAT32);
  Tensor q = Random({1, kHeads, 2, kDim}, rng), k = Random({1, kKvHeads, 2, kDim}, rng);
  absl::StatusOr<Tensor> out = Step(cache, OneSequence(1, {4}, 0, 2), q, k, k, 1.0f);
  EXPECT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(out.status().message(), HasSubstr("block 4 is not in [0, 4)"));
  out = Step(cache, OneSequence(1, {0}, 3, 5), q, k, k, 1.0f);
  EXPECT_THAT(out.status().message(), HasSubstr("position 4 beyond its block table"));
  // Tokens not packed in one row (ModelInfer with a batch of 0 or 2):
  // refused before anything is read.
  Tensor empty_q = Tensor::Empty({0, kHeads, 2, kDim}), empty_k = Tensor::Empty({0, kKvHeads, 2, kDim});
  Meta m = OneSequence(1, {0}, 0, 2);
  absl::StatusOr<KvStep> step = cache.BeginStep(m.positions, m.seq, m.blocks, m.ids, 2);
  ASSERT_TRUE(step.ok());
  out = cache.Attend(0, *step, empty_q, empty_k, empty_k, 1.0f);
  EXPECT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(out.status().message(), HasSubstr("packed in one row"));
  // The failed step's positions are not left marked as held.
  cache.AbortStep(*step);
  Tensor q1 = Random({1, kHeads, 1, kDim}, rng), k1 = Random({1, kKvHeads, 1, kDim}, rng);
  out = Step(cache, OneSequence(1, {0}, 2, 3), q1, k1, k1, 1.0f);
  EXPECT_EQ(out.status().code(), absl::StatusCode::kFailedPrecondition);
  // Repeated positions (a run of distinct positions is what a step holds).
  {
    Meta rep = OneSequence(2, {0, 1, 2}, 0, 3);
    rep.positions = Tensor::FromInt64s({3}, {0, 0, 2});
    Tensor q3 = Random({1, kHeads, 3, kDim}, rng), k3 = Random({1, kKvHeads, 3, kDim}, rng);
    out = Step(cache, rep, q3, k3, k3, 1.0f);
    EXPECT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(out.status().message(), HasSubstr("sequence 2: position 0 twice in one step"));
  }
  KvCache none(0, kBlock);
  none.AddLayer(kKvHeads, kDim, DT_FLOAT32);
  out = Step(none, OneSequence(1, {0}, 0, 2), q, k, k, 1.0f);
  EXPECT_EQ(out.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(out.status().message(), HasSubstr("--kv_cache_mb"));
}

TEST(KvCacheTest, Bfloat16CacheHalvesTheBlockAndStaysClose) {
  KvCache f32(4, kBlock), bf16(4, kBlock);
  f32.AddLayer(kKvHeads, kDim, DT_FLOAT32);
  bf16.AddLayer(kKvHeads, kDim, DT_BFLOAT16);
  EXPECT_EQ(f32.BlockBytes(), 2 * kKvHeads * kBlock * kDim * 4);
  EXPECT_EQ(bf16.BlockBytes(), f32.BlockBytes() / 2);
}

}  // namespace
}  // namespace pipeserve
