// paged_attention.h's kernels in float32, float16 and bfloat16 on the simt
// emulator, against the float64 reference of cached_attention: the
// conformance case, and sequences fed to the cache in chunks (prefill in
// two chunks, then a decode step) whose outputs must equal the reference
// over each whole sequence. Shapes reach every path: key lengths across
// several key tiles and not a multiple of one, query tiles with empty
// rows, a head_dim below kMaxHeadDim and not a power of two, grouped-query
// heads, block tables out of order, two sequences' tokens interleaved.
#include "runtime/cuda/kernels/paged_attention.h"

#include "runtime/cuda/kernels/tensor_core_attention.h"

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "graph/op_schema.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "runtime/conformance/cases.h"
#include "runtime/conformance/reference.h"

namespace pipeserve::kernels {
namespace {

using ::testing::HasSubstr;

template <typename T>
T* As(const Tensor& t) {
  return static_cast<T*>(t.raw_data());
}

// One layer's cache and what its steps need to know of it.
struct Cache {
  Tensor memory;  // num_blocks blocks of [2][kv_heads][block_size][head_dim]
  int kv_heads, head_dim, block_size;
};

Cache MakeCache(int64_t num_blocks, int kv_heads, int head_dim, int block_size, DataType t) {
  return Cache{Tensor::Empty({num_blocks * 2 * kv_heads * block_size * head_dim}, t), kv_heads,
               head_dim, block_size};
}

// One step: q [1, H, T, D], k and v [1, Hkv, T, D] appended at positions
// [T] of sequences seq [T] whose block tables are tables [N, B]; returns
// the attention output [1, H, T, D].
template <typename T>
absl::StatusOr<Tensor> RunStep(Cache& cache, const Tensor& q, const Tensor& k, const Tensor& v,
                               const Tensor& positions, const Tensor& seq, const Tensor& tables,
                               float scale, bool tensor_cores = false, int splits = 1,
                               int group = 1) {
  PagedCache c;
  c.tokens = q.shape()[2];
  c.kv_heads = cache.kv_heads;
  c.head_dim = cache.head_dim;
  c.block_size = cache.block_size;
  c.table_width = tables.shape()[1];
  c.positions = positions.data_as<int64_t>();
  c.seq = seq.data_as<int64_t>();
  c.tables = tables.data_as<int64_t>();
  const int heads = static_cast<int>(q.shape()[1]);
  Tensor out = Tensor::Empty(q.shape(), q.dtype());
  absl::Status s = simt::Emulate(AppendBlocks(c.tokens, c.kv_heads, c.head_dim), kKvThreads, [&] {
    KvAppend<T>(As<T>(k), As<T>(v), As<T>(cache.memory), c);
  });
  if (!s.ok()) return s;
  if constexpr (!std::is_same_v<T, float>) {
    if (tensor_cores) {
      const std::vector<int32_t> tiles =
          AttentionTiles(seq.data_as<int64_t>(), seq.numel(), kTcQueryTile);
      const simt::Dim3 grid(static_cast<unsigned>(tiles.size() / kTcQueryTile), heads);
      s = simt::Emulate(grid, kTcThreads, [&] {
        TensorCoreAttention<T>(As<T>(q), As<T>(cache.memory), tiles.data(), As<T>(out), c, heads,
                               scale);
      });
      if (!s.ok()) return s;
      return out;
    }
  }
  const int tile = kQueryTile / group;
  const std::vector<int32_t> tiles = AttentionTiles(seq.data_as<int64_t>(), seq.numel(), tile);
  const int64_t num_tiles = static_cast<int64_t>(tiles.size()) / tile;
  const int blocks_y = heads / group;
  // Partials start as NaN: a row a split should write and does not shows.
  std::vector<float> partials(AttentionPartialFloats(num_tiles, blocks_y, c.head_dim, splits),
                              NAN);
  const AttentionBlocks blocks{group, splits, partials.data()};
  const simt::Dim3 grid(static_cast<unsigned>(num_tiles), blocks_y);
  s = simt::Emulate(simt::Dim3(grid.x, grid.y, splits), kAttentionThreads, [&] {
    PagedAttention<T>(As<T>(q), As<T>(cache.memory), tiles.data(), As<T>(out), c, heads, scale,
                      blocks);
  });
  if (!s.ok() || splits == 1) return s.ok() ? absl::StatusOr<Tensor>(out) : s;
  s = simt::Emulate(grid, kAttentionThreads, [&] {
    CombineSplits<T>(tiles.data(), As<T>(out), c, blocks);
  });
  if (!s.ok()) return s;
  return out;
}

template <typename T>
absl::StatusOr<Tensor> RunCase(const CaseInstance& run) {
  const Node& node = run.node;
  const std::vector<Tensor>& in = run.node_inputs;
  const Shape& k = in[1].shape();
  Cache cache = MakeCache(IntAttr(node, "num_blocks", 0), static_cast<int>(k[1]),
                          static_cast<int>(k[3]), static_cast<int>(IntAttr(node, "block_size", 0)),
                          in[0].dtype());
  return RunStep<T>(cache, in[0], in[1], in[2], in[3], in[4], in[5],
                    static_cast<float>(FloatAttr(node, "scale", 1.0)));
}

absl::StatusOr<Tensor> RunCaseAs(DataType t, const CaseInstance& run) {
  if (t == DT_FLOAT32) return RunCase<float>(run);
  if (t == DT_FLOAT16) return RunCase<simt::Half>(run);
  return RunCase<simt::Bf16>(run);
}

TEST(PagedAttentionTest, TheConformanceCaseInEveryFloatType) {
  int checked = 0;
  for (const ConformanceCase& c : ConformanceCases()) {
    if (c.node.op() != "cached_attention") continue;
    for (DataType t : c.dtypes) {
      absl::StatusOr<CaseInstance> run = Instantiate(c, t, 5);
      ASSERT_TRUE(run.ok()) << run.status();
      std::vector<RefTensor> refs;
      for (const Tensor& x : run->node_inputs) refs.push_back(ToRef(x));
      absl::StatusOr<RefTensor> want = ReferenceOp(run->node, refs);
      ASSERT_TRUE(want.ok()) << want.status();
      absl::StatusOr<Tensor> got = RunCaseAs(t, *run);
      ASSERT_TRUE(got.ok()) << c.name << " " << TorchName(t) << ": " << got.status();
      const double err = RelativeError(*got, *want);
      EXPECT_LE(err, Tolerance(t)) << c.name << " " << TorchName(t);
      std::printf("[ max_rel_err ] simt_%s %s %.1e tol %.0e\n", TorchName(t).c_str(),
                  c.name.c_str(), err, Tolerance(t));
      ++checked;
    }
  }
  EXPECT_GE(checked, 3);
}

// A sequence's whole q, k and v (values rounded to the type) and the
// reference's attention over all of it.
struct Sequence {
  int64_t length;
  std::vector<double> q, k, v;  // [H, L, D], [Hkv, L, D]
  RefTensor want;               // [1, H, L, D]
};

Sequence MakeSequence(int64_t length, int heads, int kv_heads, int d, DataType t,
                      std::mt19937* rng) {
  std::uniform_real_distribution<double> u(-2, 2);
  Sequence s{length};
  auto fill = [&](std::vector<double>* x, int64_t n) {
    for (int64_t i = 0; i < n; ++i) x->push_back(u(*rng));
  };
  fill(&s.q, heads * length * d);
  fill(&s.k, kv_heads * length * d);
  fill(&s.v, kv_heads * length * d);
  std::vector<double> positions, zeros(length, 0.0);
  for (int64_t p = 0; p < length; ++p) positions.push_back(static_cast<double>(p));
  Node node;
  node.set_op("cached_attention");
  (*node.mutable_attrs())["scale"].set_f(1.0 / std::sqrt(d));
  const std::vector<RefTensor> in = {
      ToRef(TensorOf({1, heads, length, d}, t, s.q)),
      ToRef(TensorOf({1, kv_heads, length, d}, t, s.k)),
      ToRef(TensorOf({1, kv_heads, length, d}, t, s.v)),
      ToRef(TensorOf({length}, DT_INT64, positions)),
      ToRef(TensorOf({length}, DT_INT64, zeros)),
      ToRef(TensorOf({1, 1}, DT_INT64, {0})),
      ToRef(TensorOf({1}, DT_INT64, {0}))};
  s.want = *ReferenceOp(node, in);
  return s;
}

// The rows of x ([heads, L, D] of sequence `s`) at `tokens` (sequence,
// position), as one step's [1, heads, T, D].
Tensor StepRows(const std::vector<Sequence>& seqs, const std::vector<double> Sequence::*x,
                int heads, int d, const std::vector<std::pair<int, int64_t>>& tokens,
                DataType t) {
  const int64_t n = static_cast<int64_t>(tokens.size());
  std::vector<double> rows(heads * n * d);
  for (int h = 0; h < heads; ++h) {
    for (int64_t i = 0; i < n; ++i) {
      const Sequence& s = seqs[tokens[i].first];
      for (int j = 0; j < d; ++j) {
        rows[(h * n + i) * d + j] = (s.*x)[(h * s.length + tokens[i].second) * d + j];
      }
    }
  }
  return TensorOf({1, heads, n, d}, t, rows);
}

// Two sequences (37 and 70 tokens) through the cache in three steps whose
// tokens interleave the sequences: a prompt chunk each, a second chunk,
// then one decoded token each.
template <typename T>
void ChunkedSteps(DataType t, int head_dim, int block_size, bool tensor_cores = false,
                  int splits = 1, int group = 1, int heads = 4, int kv_heads = 2) {
  std::mt19937 rng(head_dim * 31 + block_size);
  std::vector<Sequence> seqs = {MakeSequence(37, heads, kv_heads, head_dim, t, &rng),
                                MakeSequence(70, heads, kv_heads, head_dim, t, &rng)};
  const int64_t width = (70 + block_size - 1) / block_size;
  std::vector<double> ids(2 * width);
  for (int64_t i = 0; i < 2 * width; ++i) ids[i] = static_cast<double>(i);
  std::shuffle(ids.begin(), ids.end(), rng);  // blocks out of order, shared by nobody
  const Tensor tables = TensorOf({2, width}, DT_INT64, ids);
  Cache cache = MakeCache(2 * width, kv_heads, head_dim, block_size, t);
  std::vector<Tensor> got = {Tensor::Empty({1, heads, 37, head_dim}, t),
                             Tensor::Empty({1, heads, 70, head_dim}, t)};
  const int64_t bounds[2][4] = {{0, 21, 36, 37}, {0, 30, 69, 70}};
  for (int step = 0; step < 3; ++step) {
    std::vector<std::pair<int, int64_t>> tokens;
    for (int64_t i = 0;; ++i) {  // alternate between the sequences
      bool any = false;
      for (int s = 0; s < 2; ++s) {
        const int64_t p = bounds[s][step] + i;
        if (p < bounds[s][step + 1]) tokens.push_back({s, p}), any = true;
      }
      if (!any) break;
    }
    std::vector<double> positions, seq;
    for (const auto& [s, p] : tokens) positions.push_back(p), seq.push_back(s);
    const int64_t n = static_cast<int64_t>(tokens.size());
    absl::StatusOr<Tensor> out = RunStep<T>(
        cache, StepRows(seqs, &Sequence::q, heads, head_dim, tokens, t),
        StepRows(seqs, &Sequence::k, kv_heads, head_dim, tokens, t),
        StepRows(seqs, &Sequence::v, kv_heads, head_dim, tokens, t),
        TensorOf({n}, DT_INT64, positions), TensorOf({n}, DT_INT64, seq), tables,
        static_cast<float>(1.0 / std::sqrt(head_dim)), tensor_cores, splits, group);
    ASSERT_TRUE(out.ok()) << "step " << step << ": " << out.status();
    const int64_t bytes = head_dim * ElementSize(t);
    for (int h = 0; h < heads; ++h) {
      for (int64_t i = 0; i < n; ++i) {
        const auto [s, p] = tokens[i];
        std::memcpy(static_cast<char*>(got[s].raw_data()) + (h * seqs[s].length + p) * bytes,
                    static_cast<const char*>(out->raw_data()) + (h * n + i) * bytes, bytes);
      }
    }
  }
  for (int s = 0; s < 2; ++s) {
    const double err = RelativeError(got[s], seqs[s].want);
    EXPECT_LE(err, Tolerance(t)) << "sequence " << s << " " << TorchName(t);
    std::printf(
        "[ max_rel_err ] simt_%s %s_attention_d%d_b%d_split%d_group%d_seq%d %.1e tol %.0e\n",
        TorchName(t).c_str(), tensor_cores ? "tensor_core" : "paged", head_dim, block_size, splits,
        group, s, err, Tolerance(t));
  }
}

TEST(PagedAttentionTest, ChunkedPrefillThenDecodeEqualsTheWholeSequenceFloat32) {
  ChunkedSteps<float>(DT_FLOAT32, 40, 16);
  ChunkedSteps<float>(DT_FLOAT32, kMaxHeadDim, 4);
}

TEST(PagedAttentionTest, ChunkedPrefillThenDecodeEqualsTheWholeSequenceFloat16) {
  ChunkedSteps<simt::Half>(DT_FLOAT16, 64, 16);
}

TEST(PagedAttentionTest, ChunkedPrefillThenDecodeEqualsTheWholeSequenceBfloat16) {
  ChunkedSteps<simt::Bf16>(DT_BFLOAT16, 64, 16);
}

// Flash-decoding: every step's keys split over 2 blocks (the 70-token
// sequence's last step: keys 0-63 and 64-69) and over 5 (3 splits of 32
// keys cover all 70, so splits 3 and 4 see no key, and a 37-token
// sequence's rows none past split 1), merged by CombineSplits.
TEST(PagedAttentionTest, KeysSplitOverBlocksEqualTheWholeSequence) {
  ChunkedSteps<float>(DT_FLOAT32, 40, 16, false, 2);
  ChunkedSteps<float>(DT_FLOAT32, 40, 16, false, 5);
  ChunkedSteps<simt::Bf16>(DT_BFLOAT16, 64, 16, false, 3);
}

// A block's rows as the query heads of a KV group, alone and with its
// keys split: both of 2 (4 tokens a tile), 4 of 8 on 2 KV heads (2 tokens
// a tile), 8 on one (TinyLlama's: a tile a token).
TEST(PagedAttentionTest, TheQueryHeadsOfAGroupShareABlock) {
  ChunkedSteps<float>(DT_FLOAT32, 40, 16, false, 1, 2);
  ChunkedSteps<simt::Half>(DT_FLOAT16, 64, 16, false, 3, 2);
  ChunkedSteps<float>(DT_FLOAT32, 24, 8, false, 1, 4, 8, 2);
  ChunkedSteps<simt::Bf16>(DT_BFLOAT16, 24, 8, false, 2, 8, 8, 1);
}

TEST(PagedAttentionTest, AGroupIsWholeKvGroupsThatFillATile) {
  EXPECT_EQ(AttentionGroup(32, 4), 8);  // TinyLlama: one token a tile, 8 heads
  EXPECT_EQ(AttentionGroup(4, 2), 2);
  EXPECT_EQ(AttentionGroup(12, 12), 1);  // GPT-2: no group
  EXPECT_EQ(AttentionGroup(48, 4), 1);   // 12 heads a group: more than a tile
  EXPECT_EQ(AttentionGroup(12, 4), 1);   // 3 does not divide 8
  EXPECT_EQ(AttentionGroup(4, 0), 1);
}

TEST(PagedAttentionTest, SplitKeysCoverTheKeysOnceInWholeTiles) {
  for (int64_t last : {0, 31, 32, 69, 200}) {
    for (int splits : {1, 2, 3, 5, 16}) {
      int64_t covered = 0, prev_end = 0;
      for (int z = 0; z < splits; ++z) {
        int64_t begin, end;
        SplitKeys(last, splits, z, &begin, &end);
        EXPECT_EQ(begin, prev_end) << last << " " << splits << " " << z;
        EXPECT_LE(begin, end);
        if (end < last + 1) {
          EXPECT_EQ((end - begin) % kKeyTile, 0);
        }
        covered += end - begin;
        prev_end = end;
      }
      EXPECT_EQ(covered, last + 1) << last << " " << splits;
    }
  }
}

// What the launchers refuse, before KvAppend writes the cache.
TEST(PagedAttentionTest, ArgumentsTheKernelsCannotTakeAreRefusedNamingWhy) {
  PagedCache c;
  c.kv_heads = 4;
  c.head_dim = 64;
  float partials = 0;
  const AttentionBlocks plain{1, 1, nullptr}, grouped{8, 4, &partials};
  EXPECT_EQ(AttentionArgsRefusal(true, c, 32, false, plain), nullptr);
  EXPECT_EQ(AttentionArgsRefusal(false, c, 32, false, grouped), nullptr);
  EXPECT_EQ(AttentionArgsRefusal(false, c, 32, true, plain), nullptr);
  auto why = [&](bool f32, int heads, bool tc, AttentionBlocks b) {
    const char* r = AttentionArgsRefusal(f32, c, heads, tc, b);
    return std::string(r == nullptr ? "" : r);
  };
  EXPECT_THAT(why(true, 2, false, plain), HasSubstr("multiple of the cache's KV heads"));
  EXPECT_THAT(why(true, 6, false, plain), HasSubstr("multiple of the cache's KV heads"));
  EXPECT_THAT(why(true, 32, true, plain), HasSubstr("16-bit values"));
  c.head_dim = 40;
  EXPECT_THAT(why(false, 32, true, plain), HasSubstr("head_dim 16 to 128"));
  EXPECT_THAT(why(true, 48, false, {8, 1, nullptr}), HasSubstr("divide a KV group"));  // 12 a group
  EXPECT_THAT(why(true, 32, false, {1, 17, &partials}), HasSubstr("splits must be 1 to 16"));
  EXPECT_THAT(why(true, 32, false, {1, 2, nullptr}), HasSubstr("with partials"));
}

TEST(PagedAttentionTest, SplitsOnlyStepsWithFewBlocks) {
  EXPECT_EQ(AttentionSplits(32, 2048), 8);       // 1 sequence, 32 heads: 256 blocks
  EXPECT_EQ(AttentionSplits(32, 100), 2);        // but no split under 64 keys
  EXPECT_EQ(AttentionSplits(64 * 32, 2048), 1);  // 64 sequences fill the card
  EXPECT_EQ(AttentionSplits(1, 1 << 20), kMaxAttentionSplits);
  EXPECT_EQ(AttentionSplits(4, 0), 1);
  EXPECT_EQ(AttentionPartialFloats(3, 4, 40, 1), 0);
  EXPECT_EQ(AttentionPartialFloats(3, 4, 40, 2), 2 * 3 * 4 * kQueryTile * 42);
}

// The tensor-core kernel on the same steps: 32-row tiles with empty rows
// (a decode step's one token a sequence, a 37-token sequence's second
// chunk), key tiles cut by the causal mask, head_dim 32, 64 and 128.
TEST(TensorCoreAttentionTest, ChunkedPrefillThenDecodeEqualsTheWholeSequence) {
  ChunkedSteps<simt::Half>(DT_FLOAT16, 64, 16, true);
  ChunkedSteps<simt::Bf16>(DT_BFLOAT16, 64, 16, true);
  ChunkedSteps<simt::Bf16>(DT_BFLOAT16, kMaxHeadDim, 4, true);
  ChunkedSteps<simt::Half>(DT_FLOAT16, 32, 8, true);
}

TEST(TensorCoreAttentionTest, TakesHeadDimsOfWholeFragments) {
  EXPECT_TRUE(TensorCoreHeadDim(16));
  EXPECT_TRUE(TensorCoreHeadDim(kMaxHeadDim));
  EXPECT_FALSE(TensorCoreHeadDim(40));
  EXPECT_FALSE(TensorCoreHeadDim(kMaxHeadDim + 16));
  EXPECT_FALSE(TensorCoreHeadDim(0));
}

TEST(PagedAttentionTest, TilesGroupEachSequencesTokensInStepOrder) {
  std::vector<int64_t> seq = {1, 0, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1};
  std::vector<int32_t> want = {1, 4, -1, -1, -1, -1, -1, -1,  // sequence 0
                               0, 2, 3, 5, 6, 7, 8, 9,        // sequence 1
                               10, 11, -1, -1, -1, -1, -1, -1};
  EXPECT_EQ(AttentionTiles(seq.data(), static_cast<int64_t>(seq.size())), want);
  EXPECT_LE(static_cast<int64_t>(want.size()) / kQueryTile, MaxAttentionTiles(12, 2));
}

// MaxAttentionTiles bounds every way a step's tokens can fall into
// sequences, and is tight for a decode (a token a sequence).
TEST(PagedAttentionTest, MaxTilesBoundEveryStepAndFitADecode) {
  for (int tile : {1, 2, 4, 8, 32}) {
    EXPECT_EQ(MaxAttentionTiles(64, 64, tile), 64) << tile;  // a decode of 64
    for (int64_t sequences = 1; sequences <= 4; ++sequences) {
      for (int64_t tokens = 0; tokens <= 12; ++tokens) {
        // The worst split: all but sequences-1 tokens in one, one in each other.
        std::vector<int64_t> seq;
        for (int64_t i = 0; i < tokens; ++i) seq.push_back(std::min<int64_t>(i, sequences - 1));
        const int64_t tiles = static_cast<int64_t>(AttentionTiles(seq.data(), tokens, tile).size()) / tile;
        EXPECT_LE(tiles, MaxAttentionTiles(tokens, sequences, tile))
            << tokens << " tokens " << sequences << " sequences tile " << tile;
      }
    }
  }
}

}  // namespace
}  // namespace pipeserve::kernels
