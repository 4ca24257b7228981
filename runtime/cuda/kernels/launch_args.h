// Plain structs and sizes the kernels of this folder take, for host code
// that plans or launches them (the device plan, transformer_kernels.h)
// without including simt.h. nvcc and gcc both compile this header.
#ifndef PIPESERVE_RUNTIME_CUDA_KERNELS_LAUNCH_ARGS_H_
#define PIPESERVE_RUNTIME_CUDA_KERNELS_LAUNCH_ARGS_H_

#include <cstdint>
#include <vector>

#include "runtime/cuda/kernels/unary_kind.h"

namespace pipeserve::kernels {

// ---- strided_copy.h --------------------------------------------------------

inline constexpr int kMaxCopyRank = 8;
inline constexpr int kCopyThreads = 256;

// Element (i_0, ..., i_{rank-1}) of a dims-shaped index space goes from
// src[src_offset + sum i_k * src_strides[k]] to dst[dst_offset + sum i_k *
// dst_strides[k]] (strides in elements; 0 repeats an element, as expand).
struct StridedCopyOp {
  int rank = 0;  // 0: one element
  int64_t dims[kMaxCopyRank] = {};
  int64_t src_strides[kMaxCopyRank] = {};
  int64_t dst_strides[kMaxCopyRank] = {};
  int64_t src_offset = 0, dst_offset = 0;
  int64_t n = 0;  // the product of dims
};

inline unsigned CopyBlocks(int64_t n) {
  return static_cast<unsigned>((n + kCopyThreads - 1) / kCopyThreads);
}

// ---- elementwise_program.h ------------------------------------------------

inline constexpr int kMaxProgramInputs = 4;
inline constexpr int kMaxProgramOps = 24;
inline constexpr int kProgramThreads = 256;

// One instruction: its result is register i (the instruction's index).
enum class EwCode : uint8_t {
  kInput,  // input `a`'s element at this output position
  kConst,  // `value`
  kUnary,  // unary(r[a])
  kAdd, kSub, kMul, kDiv, kPow, kMaximum, kMinimum, kFloorDiv,  // r[a] op r[b]
  kEq, kNe, kLt, kLe, kGt, kGe,                      // 1 or 0
  kWhere,                                            // r[a] != 0 ? r[b] : r[c]
};
struct EwInstr {
  EwCode code = EwCode::kConst;
  uint8_t a = 0, b = 0, c = 0;
  UnaryKind unary = UnaryKind::kNone;
  float value = 0;
};
enum class EwType : uint8_t { kF32, kBool };  // bool: one byte, 0 or 1
struct EwInput {
  EwType type = EwType::kF32;
  int64_t strides[kMaxCopyRank] = {};  // against the output's dims; 0 broadcasts
};
// out[i] = the last register, for each element i of a dims-shaped output.
struct ElementwiseProgramOp {
  int rank = 0;
  int64_t dims[kMaxCopyRank] = {};
  int64_t n = 0;
  int num_inputs = 0;
  EwInput inputs[kMaxProgramInputs];
  int num_ops = 0;
  EwInstr ops[kMaxProgramOps];
  EwType out_type = EwType::kF32;
};
// Where the inputs and the output are (device memory).
struct EwPointers {
  const void* in[kMaxProgramInputs] = {};
  void* out = nullptr;
};

inline unsigned ProgramBlocks(int64_t n) {
  return static_cast<unsigned>((n + kProgramThreads - 1) / kProgramThreads);
}

// ---- embedding.h -----------------------------------------------------------

inline constexpr int kEmbeddingThreads = 256;

inline unsigned EmbeddingBlocks(int64_t n, int64_t dim) {
  return static_cast<unsigned>((n * dim + kEmbeddingThreads - 1) / kEmbeddingThreads);
}

// ---- reduction.h -----------------------------------------------------------

inline constexpr int kReduceThreads = 256;

enum class ReduceKind : uint8_t { kSum, kMean, kAmax };

// Output element o (of out_n, row-major over out_dims) reduces the red_n
// elements of x at out offset + the reduced index space's offsets.
struct ReduceOp {
  ReduceKind kind = ReduceKind::kSum;
  int out_rank = 0, red_rank = 0;
  int64_t out_dims[kMaxCopyRank] = {}, out_strides[kMaxCopyRank] = {};
  int64_t red_dims[kMaxCopyRank] = {}, red_strides[kMaxCopyRank] = {};
  int64_t out_n = 0, red_n = 0;
};

// ---- cast.h ------------------------------------------------------------------

enum class CastType : int { kF32, kI64, kBool, kF16, kBF16 };

// The storage of the float values a kernel reads and writes.
enum class FloatType : int { kF32, kF16, kBF16 };

// ---- paged_attention.h -----------------------------------------------------

inline constexpr int kQueryTile = 8;     // query tokens of one sequence per block
inline constexpr int kKeyTile = 32;      // keys per shared-memory tile
inline constexpr int kMaxHeadDim = 128;  // head_dim the shared tiles hold
inline constexpr int kAttentionThreads = 128;
inline constexpr int kKvThreads = 256;
// tensor_core_attention.h: 16 query rows a warp, two warps a block.
inline constexpr int kTcQueryTile = 32;
inline constexpr int kTcKeyTile = 32;
inline constexpr int kTcThreads = 64;

// Whether TensorCoreAttention takes a head_dim: whole 16-wide fragments.
constexpr bool TensorCoreHeadDim(int head_dim) {
  return head_dim > 0 && head_dim <= kMaxHeadDim && head_dim % 16 == 0;
}

// n elements of x [n / d, d], `tokens` rows a sequence; cos and sin hold
// table_rows rows of d (table_rows is tokens, or 1).
struct RotaryOp {
  int64_t n = 0, d = 0, tokens = 1, table_rows = 1;
};

// A rotary embedding applied to q or k as the attention kernels read them
// (rotary.h's RotatedAt; the plan folds a rotary step read only by the
// attention into it): cos and sin in the values' storage type, or null.
struct Rope {
  const void* cos = nullptr;
  const void* sin = nullptr;
  RotaryOp op;
};

// Where one layer's cache and one step's metadata are. positions, seq
// [tokens]; tables [sequences, table_width] (block ids). rope_q and rope_k:
// the rotary embedding of q and k, if any.
struct PagedCache {
  int64_t tokens = 0;
  int kv_heads = 0, head_dim = 0, block_size = 0;
  int64_t table_width = 0;
  const int64_t* positions = nullptr;
  const int64_t* seq = nullptr;
  const int64_t* tables = nullptr;
  Rope rope_q, rope_k;
};

// The step's tokens grouped for PagedAttention (tile kQueryTile) or
// TensorCoreAttention (kTcQueryTile): each sequence's tokens in step
// order, `tile` per tile, -1 filling a tile's tail.
inline std::vector<int32_t> AttentionTiles(const int64_t* seq, int64_t tokens,
                                           int tile = kQueryTile) {
  std::vector<std::vector<int32_t>> by_seq;
  for (int64_t t = 0; t < tokens; ++t) {
    if (by_seq.size() <= static_cast<size_t>(seq[t])) by_seq.resize(seq[t] + 1);
    by_seq[seq[t]].push_back(static_cast<int32_t>(t));
  }
  std::vector<int32_t> tiles;
  for (const std::vector<int32_t>& mine : by_seq) {
    for (size_t i = 0; i < mine.size(); i += tile) {
      for (size_t r = i; r < i + tile; ++r) tiles.push_back(r < mine.size() ? mine[r] : -1);
    }
  }
  return tiles;
}

// The most tiles of `tile` tokens a step of `tokens` tokens of at most
// `sequences` sequences makes: each of the k <= min(tokens, sequences)
// sequences it has takes ceil(t_s / tile) <= (t_s + tile - 1) / tile, so
// all take at most (tokens + k (tile - 1)) / tile (one a token for tiles
// of 1, none spare).
inline int64_t MaxAttentionTiles(int64_t tokens, int64_t sequences, int tile = kQueryTile) {
  const int64_t k = tokens < sequences ? tokens : sequences;
  return (tokens + k * (tile - 1)) / tile;
}

// How PagedAttention lays a step over its blocks.
// group: the query heads a block takes for each token, the kQueryTile
// rows of a block being kQueryTile / group tokens times `group`
// consecutive heads of one KV group (grid y: heads / group), so the group
// shares each key tile it loads; 1 (grid y: heads) or heads / kv_heads
// where that divides kQueryTile (AttentionGroup).
// splits (flash-decoding): a step with few blocks for the card (a decode
// of one or a few sequences) splits each block's keys over `splits`
// blocks (grid z), which write partial rows, unnormalised with their
// running max m and sum l, to `partials` (PartialRow); CombineSplits
// merges them. splits 1: PagedAttention writes its output itself.
struct AttentionBlocks {
  int group = 1;
  int splits = 1;
  float* partials = nullptr;
};

// The group for `heads` query heads over `kv_heads`: the whole KV group
// when kQueryTile rows hold whole groups, else 1.
inline int AttentionGroup(int64_t heads, int64_t kv_heads) {
  if (kv_heads <= 0 || heads % kv_heads != 0) return 1;
  const int64_t g = heads / kv_heads;
  return g <= kQueryTile && kQueryTile % g == 0 ? static_cast<int>(g) : 1;
}

// About two blocks for each of an H100's or H200's 132 SMs.
inline constexpr int64_t kAttentionTargetBlocks = 256;
// Keys a split covers at least: two key tiles.
inline constexpr int64_t kMinSplitKeys = 2 * kKeyTile;
inline constexpr int kMaxAttentionSplits = 16;

// The splits for `blocks` (tile, head) blocks over at most `max_keys` keys
// a sequence: enough for kAttentionTargetBlocks, none below kMinSplitKeys.
inline int AttentionSplits(int64_t blocks, int64_t max_keys) {
  if (blocks <= 0 || blocks >= kAttentionTargetBlocks) return 1;
  int64_t s = (kAttentionTargetBlocks + blocks - 1) / blocks;
  s = s < (max_keys + kMinSplitKeys - 1) / kMinSplitKeys ? s
                                                         : (max_keys + kMinSplitKeys - 1) / kMinSplitKeys;
  s = s < kMaxAttentionSplits ? s : kMaxAttentionSplits;
  return s < 1 ? 1 : static_cast<int>(s);
}

// The floats of AttentionBlocks::partials for a grid of num_tiles x
// `blocks_y` (heads / group) blocks.
inline int64_t AttentionPartialFloats(int64_t num_tiles, int64_t blocks_y, int head_dim,
                                      int splits) {
  return splits <= 1 ? 0 : int64_t{splits} * num_tiles * blocks_y * kQueryTile * (head_dim + 2);
}

// Why the attention kernels cannot take these arguments, or nullptr when
// they can: heads a multiple of the cache's KV heads; on tensor cores
// 16-bit values (not `float32`) and a head_dim of whole fragments; else
// `blocks` of whole groups within a KV group and a tile, 1 to
// kMaxAttentionSplits splits, with partials when split. Launchers check
// it before KvAppend, so a refusal leaves the cache as it was.
inline const char* AttentionArgsRefusal(bool float32, const PagedCache& c, int heads,
                                        bool tensor_cores, const AttentionBlocks& blocks) {
  if (c.kv_heads < 1 || heads < c.kv_heads || heads % c.kv_heads != 0) {
    return "query heads must be a multiple of the cache's KV heads";
  }
  if (tensor_cores) {
    if (float32) return "tensor-core attention takes 16-bit values";
    return TensorCoreHeadDim(c.head_dim) ? nullptr
                                         : "tensor-core attention takes head_dim 16 to 128 by 16";
  }
  if (blocks.group < 1 || (heads / c.kv_heads) % blocks.group != 0 ||
      kQueryTile % blocks.group != 0) {
    return "a block's heads must divide a KV group and a tile";
  }
  if (blocks.splits < 1 || blocks.splits > kMaxAttentionSplits ||
      (blocks.splits > 1 && blocks.partials == nullptr)) {
    return "splits must be 1 to 16, with partials when more than 1";
  }
  return nullptr;
}

inline unsigned AppendBlocks(int64_t tokens, int kv_heads, int head_dim) {
  return static_cast<unsigned>((tokens * kv_heads * head_dim + kKvThreads - 1) / kKvThreads);
}

// ---- rotary.h ------------------------------------------------------------------
// RotaryOp and Rope are with paged_attention.h's arguments above.

// ---- argmax.h ------------------------------------------------------------------

inline constexpr int kArgmaxThreads = 256;  // whole warps

// ---- sample.h ------------------------------------------------------------------

inline constexpr int kSampleThreads = kArgmaxThreads;  // greedy rows take the argmax

// sample_tokens' device pointers beside its logits [rows, cols]
// (graph/op_schema.cc): each row's parameters, the contexts and where
// they end, scratch for rows that sample otherwise than plain greedy
// (SampleScratchBytes: their penalised logits, then up to kSampleCompact
// ids a row of the tokens still in play), and the picks.
struct SampleArgs {
  const float* floats = nullptr;     // [rows, 4]: temperature, top_p, repetition, frequency
  const int64_t* ints = nullptr;     // [rows, 3]: top_k, seed, tokens generated so far
  const int64_t* context = nullptr;  // [C]: row r's is [ends[r - 1], ends[r])
  const int64_t* ends = nullptr;     // [rows]
  double* scratch = nullptr;         // SampleScratchBytes(rows, cols)
  int64_t* out = nullptr;            // [rows]
  int64_t cols = 0;
};

inline constexpr int64_t kSampleCompact = 4096;

inline int64_t SampleScratchBytes(int64_t rows, int64_t cols) {
  return rows * cols * 8 + rows * kSampleCompact * 4;
}

}  // namespace pipeserve::kernels

#endif  // PIPESERVE_RUNTIME_CUDA_KERNELS_LAUNCH_ARGS_H_
