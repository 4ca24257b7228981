// cached_attention on the GPU, written once against simt.h: the step's keys
// and values go into a paged KV cache, then every query token attends over
// its sequence's cached positions up to its own, flash-style (keys in
// tiles through shared memory, an online softmax, the output accumulated
// in registers and divided once at the end). One kernel serves prefill (a
// sequence's prompt chunk: its tokens share each key tile) and decode (one
// token per sequence). The semantics are the CPU's (runtime/cpu/kv_cache.h)
// and the float64 reference's (runtime/conformance/reference.cc).
//
// The cache of one layer is num_blocks blocks of
//   [2 (keys, values)][kv_heads][block_size][head_dim]
// values of the storage type T, as the CPU cache lays out a block; token
// position p of a sequence whose block table is `table` lives in block
// table[p / block_size] at row p % block_size.
//
// Host side (checks the CPU cache makes — block ids, positions within the
// table, positions a sequence holds — happen before a launch, on the host;
// AttentionTiles and the sizes are in launch_args.h):
//   const int g = AttentionGroup(heads, kv_heads), tile = kQueryTile / g;
//   std::vector<int32_t> tiles = AttentionTiles(seq, tokens, tile);  // per step
//   KvAppend<<<AppendBlocks(T, kv_heads, D), kKvThreads>>>(...);
//   const dim3 grid(MaxAttentionTiles(T, N, tile), heads / g);  // spare tiles idle
//   PagedAttention<<<dim3(grid.x, grid.y, splits), kAttentionThreads>>>(
//       ..., AttentionBlocks{g, splits, partials});
//   if (splits > 1) CombineSplits<<<grid, kAttentionThreads>>>(...);
//
// A block's rows may be the query heads of one KV group (AttentionBlocks::
// group), which then share every key tile it loads; a step with few
// blocks (a decode of one or a few sequences) splits each block's keys
// over several (flash-decoding: AttentionBlocks::splits, grid z) and
// merges their partial rows after (CombineSplits). tensor_core_
// attention.h is the prefill kernel for 16-bit values.
#ifndef PIPESERVE_RUNTIME_CUDA_KERNELS_PAGED_ATTENTION_H_
#define PIPESERVE_RUNTIME_CUDA_KERNELS_PAGED_ATTENTION_H_

#include <cstdint>
#include <vector>

#include "runtime/cuda/kernels/launch_args.h"
#include "runtime/cuda/kernels/rotary.h"
#include "runtime/cuda/simt/simt.h"

namespace pipeserve::kernels {

inline constexpr int kAccumulators = kQueryTile * kMaxHeadDim / kAttentionThreads;

// Offset (in elements) of token position `p`'s row of head `h`, keys
// (kind 0) or values (kind 1), in the cache of sequence `s`.
SIMT_HOST_DEVICE int64_t CacheRow(const PagedCache& c, int64_t s, int64_t p, int kind, int h) {
  const int64_t block = c.tables[s * c.table_width + p / c.block_size];
  return (((block * 2 + kind) * c.kv_heads + h) * c.block_size + p % c.block_size) * c.head_dim;
}

// The keys [begin, end) of split z of `splits` over keys 0 .. last: whole
// key tiles, the last split's cut short (empty past the sequence).
SIMT_HOST_DEVICE void SplitKeys(int64_t last, int splits, int z, int64_t* begin,
                                       int64_t* end) {
  const int64_t keys = last + 1;
  const int64_t per = ((keys + splits - 1) / splits + kKeyTile - 1) / kKeyTile * kKeyTile;
  *begin = z * per < keys ? z * per : keys;
  *end = *begin + per < keys ? *begin + per : keys;
}

// Writes k (rotated by c.rope_k, if it has tables) and v [1, kv_heads,
// tokens, head_dim] of the step into `cache`: one thread per element of k
// (grid: AppendBlocks).
template <typename T>
SIMT_GLOBAL void KvAppend(const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ cache,
                          PagedCache c) {
  using namespace simt;  // NOLINT: the kernel vocabulary
  const int64_t i = int64_t{BlockIdx().x} * kKvThreads + ThreadIdx().x;
  if (i >= c.tokens * c.kv_heads * c.head_dim) return;
  const int64_t d = i % c.head_dim;
  const int64_t t = i / c.head_dim % c.tokens;
  const int h = static_cast<int>(i / c.head_dim / c.tokens);
  cache[CacheRow(c, c.seq[t], c.positions[t], 0, h) + d] = MaybeRotated(k, c.rope_k, i);
  cache[CacheRow(c, c.seq[t], c.positions[t], 1, h) + d] = v[i];
}

// One key tile [key0, key0 + kKeyTile) of sequence `s` into k_s and v_s
// (rows past `last` zero), as float.
template <typename T>
SIMT_DEVICE void LoadKeyTile(const T* cache, const PagedCache& c, int64_t s, int kv_head,
                             int64_t key0, int64_t last, simt::SharedPtr<float> k_s,
                             simt::SharedPtr<float> v_s) {
  using namespace simt;  // NOLINT
  for (int i = ThreadIdx().x; i < kKeyTile * c.head_dim; i += kAttentionThreads) {
    const int j = i / c.head_dim, d = i % c.head_dim;
    const int64_t p = key0 + j;
    const bool in = p <= last;
    k_s[j * kMaxHeadDim + d] = in ? ToFloat(cache[CacheRow(c, s, p, 0, kv_head) + d]) : 0.0f;
    v_s[j * kMaxHeadDim + d] = in ? ToFloat(cache[CacheRow(c, s, p, 1, kv_head) + d]) : 0.0f;
  }
}

// Scores of the tile's rows against the key tile, -inf where a key lies
// past the row's position (or the row is empty) or at key_end or beyond.
SIMT_DEVICE void TileScores(const PagedCache& c, const int64_t* row_pos, int64_t key0,
                            int64_t key_end, simt::SharedPtr<float> q_s,
                            simt::SharedPtr<float> k_s, simt::SharedPtr<float> p_s) {
  using namespace simt;  // NOLINT
  for (int i = ThreadIdx().x; i < kQueryTile * kKeyTile; i += kAttentionThreads) {
    const int r = i / kKeyTile, j = i % kKeyTile;
    float score = -__builtin_huge_valf();
    if (key0 + j <= row_pos[r] && key0 + j < key_end) {
      score = 0.0f;
      for (int d = 0; d < c.head_dim; ++d) score += q_s[r * kMaxHeadDim + d] * k_s[j * kMaxHeadDim + d];
    }
    p_s[i] = score;
  }
}

// The online softmax of one row over one key tile: the row's running max
// m and sum l take the tile in, its scores become exp(score - m), and
// alpha is what the row's accumulators are scaled by.
SIMT_DEVICE void RowUpdate(int r, simt::SharedPtr<float> p_s, simt::SharedPtr<float> m_s,
                           simt::SharedPtr<float> l_s, simt::SharedPtr<float> alpha_s) {
  using namespace simt;  // NOLINT
  const float m_old = m_s[r];
  float m_new = m_old;
  for (int j = 0; j < kKeyTile; ++j) m_new = Max(m_new, static_cast<float>(p_s[r * kKeyTile + j]));
  const bool none = m_new == -__builtin_huge_valf();  // nothing visible yet
  float sum = 0.0f;
  for (int j = 0; j < kKeyTile; ++j) {
    const float e = none ? 0.0f : Exp(p_s[r * kKeyTile + j] - m_new);
    p_s[r * kKeyTile + j] = e;
    sum += e;
  }
  const float alpha = none ? 1.0f : Exp(m_old - m_new);
  m_s[r] = m_new;
  l_s[r] = l_s[r] * alpha + sum;
  alpha_s[r] = alpha;
}

// Row r of this block: the index of its element d in q and out ([1,
// heads, tokens, D]), or -1 for an empty row. The block's tile lists
// kQueryTile / group tokens; row r is token r / group at head
// BlockIdx().y * group + r % group.
SIMT_DEVICE int64_t RowAt(const PagedCache& c, const int32_t* tile, int group, int r, int d) {
  using namespace simt;  // NOLINT
  const int32_t token = tile[r / group];
  if (token < 0) return -1;
  const int64_t head = int64_t{BlockIdx().y} * group + r % group;
  return (head * c.tokens + token) * c.head_dim + d;
}

// Where row r of this block's split z keeps its partial: D unnormalised
// values, then m and l.
SIMT_DEVICE float* PartialRow(float* partials, int z, int r, int D) {
  using namespace simt;  // NOLINT
  const int64_t block =
      (int64_t{z} * GridDim().x + BlockIdx().x) * GridDim().y + BlockIdx().y;
  return partials + (block * kQueryTile + r) * (D + 2);
}

// This block's rows for split z = BlockIdx().z: the unnormalised
// accumulators acc (as PagedAttention holds them), then m and l.
SIMT_DEVICE void WritePartials(const AttentionBlocks& b, int D, const float* acc,
                               simt::SharedPtr<float> m_s, simt::SharedPtr<float> l_s,
                               const int32_t* tile) {
  using namespace simt;  // NOLINT
  const int t = static_cast<int>(ThreadIdx().x), z = static_cast<int>(BlockIdx().z);
  for (int a = 0; a < kAccumulators; ++a) {
    const int i = t + a * kAttentionThreads, r = i / D, d = i % D;
    if (i >= kQueryTile * D || tile[r / b.group] < 0) continue;
    PartialRow(b.partials, z, r, D)[d] = acc[a];
  }
  if (t < kQueryTile && tile[t / b.group] >= 0) {
    PartialRow(b.partials, z, t, D)[D] = m_s[t];
    PartialRow(b.partials, z, t, D)[D + 1] = l_s[t];
  }
}

// The block's query rows into q_s as float, rotated by c.rope_q (if it
// has tables) and scaled (empty rows zero); m -inf and l 0.
template <typename T>
SIMT_DEVICE void LoadQueries(const T* q, const PagedCache& c, const int32_t* tile, int group,
                             float scale, simt::SharedPtr<float> q_s, simt::SharedPtr<float> m_s,
                             simt::SharedPtr<float> l_s) {
  using namespace simt;  // NOLINT
  const int t = static_cast<int>(ThreadIdx().x), D = c.head_dim;
  for (int i = t; i < kQueryTile * D; i += kAttentionThreads) {
    const int r = i / D, d = i % D;
    const int64_t at = RowAt(c, tile, group, r, d);
    q_s[r * kMaxHeadDim + d] = at < 0 ? 0.0f : ToFloat(MaybeRotated(q, c.rope_q, at)) * scale;
  }
  if (t < kQueryTile) {
    m_s[t] = -__builtin_huge_valf();
    l_s[t] = 0.0f;
  }
}

// out [1, heads, tokens, head_dim] = attention of q (same shape, rotated
// by c.rope_q if it has tables, scaled by `scale`) over the cache: block
// (tile, y) takes the kQueryTile / b.group tokens tiles[tile * that ...]
// (one sequence's; -1 = none) for query heads y * b.group .. + b.group - 1
// (RowAt), which read KV head y * b.group / (heads / kv_heads).
// head_dim <= kMaxHeadDim. The step's own keys must be in the cache
// (KvAppend first).
// A tile whose first token is -1 is spare (a grid sized for the most tiles
// a step of this shape can have) and does nothing.
// With b.splits > 1, block z of grid z takes the keys SplitKeys gives it
// and writes its rows' partials (PartialRow) instead of out.
template <typename T>
SIMT_GLOBAL void PagedAttention(const T* __restrict__ q, const T* __restrict__ cache,
                                const int32_t* __restrict__ tiles, T* __restrict__ out,
                                PagedCache c, int heads, float scale, AttentionBlocks b = {}) {
  using namespace simt;  // NOLINT: the kernel vocabulary
  SIMT_SHARED(float, q_s, kQueryTile * kMaxHeadDim);
  SIMT_SHARED(float, k_s, kKeyTile * kMaxHeadDim);
  SIMT_SHARED(float, v_s, kKeyTile * kMaxHeadDim);
  SIMT_SHARED(float, p_s, kQueryTile * kKeyTile);
  SIMT_SHARED(float, m_s, kQueryTile);
  SIMT_SHARED(float, l_s, kQueryTile);
  SIMT_SHARED(float, alpha_s, kQueryTile);
  const int32_t* tile = tiles + int64_t{BlockIdx().x} * (kQueryTile / b.group);
  if (tile[0] < 0) return;  // a spare tile: the whole block
  const int kv_head = static_cast<int>(BlockIdx().y) * b.group / (heads / c.kv_heads);
  const int t = static_cast<int>(ThreadIdx().x);
  const int D = c.head_dim;
  int64_t row_pos[kQueryTile];  // -1: an empty row sees no key
  int64_t last = -1;
  for (int r = 0; r < kQueryTile; ++r) {
    const int32_t token = tile[r / b.group];
    row_pos[r] = token < 0 ? -1 : c.positions[token];
    last = row_pos[r] > last ? row_pos[r] : last;
  }
  const int64_t s = c.seq[tile[0]];
  LoadQueries(q, c, tile, b.group, scale, q_s, m_s, l_s);
  float acc[kAccumulators];
  for (float& a : acc) a = 0.0f;
  int64_t key_begin = 0, key_end = last + 1;
  if (b.splits > 1) SplitKeys(last, b.splits, BlockIdx().z, &key_begin, &key_end);
  for (int64_t key0 = key_begin; key0 < key_end; key0 += kKeyTile) {
    SyncThreads();  // the previous tile's k_s, v_s, p_s are read
    LoadKeyTile(cache, c, s, kv_head, key0, key_end - 1, k_s, v_s);
    SyncThreads();
    TileScores(c, row_pos, key0, key_end, q_s, k_s, p_s);
    SyncThreads();
    if (t < kQueryTile) RowUpdate(t, p_s, m_s, l_s, alpha_s);
    SyncThreads();
    for (int a = 0; a < kAccumulators; ++a) {
      const int i = t + a * kAttentionThreads, r = i / D, d = i % D;
      if (i >= kQueryTile * D) break;
      float pv = 0.0f;
      for (int j = 0; j < kKeyTile; ++j) pv += p_s[r * kKeyTile + j] * v_s[j * kMaxHeadDim + d];
      acc[a] = acc[a] * alpha_s[r] + pv;
    }
  }
  if (b.splits > 1) {
    WritePartials(b, D, acc, m_s, l_s, tile);
    return;
  }
  for (int a = 0; a < kAccumulators; ++a) {
    const int i = t + a * kAttentionThreads, r = i / D, d = i % D;
    if (i >= kQueryTile * D) break;
    const int64_t at = RowAt(c, tile, b.group, r, d);
    if (at >= 0) out[at] = FromFloat<T>(acc[a] / l_s[r]);
  }
}

// out's rows of block (tile, y) from the partials of its b.splits
// splits: m = the largest m_z, l = sum of l_z e^(m_z - m), each value the
// sum of the unnormalised accumulators times e^(m_z - m), over l. A split
// that saw no key (m_z -inf) counts for nothing. PagedAttention's grid
// without z.
template <typename T>
SIMT_GLOBAL void CombineSplits(const int32_t* __restrict__ tiles, T* __restrict__ out,
                               PagedCache c, AttentionBlocks b) {
  using namespace simt;  // NOLINT: the kernel vocabulary
  SIMT_SHARED(float, m_s, kQueryTile);
  SIMT_SHARED(float, l_s, kQueryTile);
  const int32_t* tile = tiles + int64_t{BlockIdx().x} * (kQueryTile / b.group);
  if (tile[0] < 0) return;  // a spare tile: the whole block
  const int D = c.head_dim, t = static_cast<int>(ThreadIdx().x);
  if (t < kQueryTile && tile[t / b.group] >= 0) {  // each row's m and l, once
    float m = -__builtin_huge_valf(), l = 0.0f;
    for (int z = 0; z < b.splits; ++z) m = Max(m, PartialRow(b.partials, z, t, D)[D]);
    for (int z = 0; z < b.splits; ++z) {
      const float* part = PartialRow(b.partials, z, t, D);
      if (part[D] != -__builtin_huge_valf()) l += part[D + 1] * Exp(part[D] - m);
    }
    m_s[t] = m;
    l_s[t] = l;
  }
  SyncThreads();
  for (int i = t; i < kQueryTile * D; i += kAttentionThreads) {
    const int r = i / D, d = i % D;
    const int64_t at = RowAt(c, tile, b.group, r, d);
    if (at < 0) continue;
    float o = 0.0f;
    for (int z = 0; z < b.splits; ++z) {
      const float* part = PartialRow(b.partials, z, r, D);
      if (part[D] != -__builtin_huge_valf()) o += part[d] * Exp(part[D] - m_s[r]);
    }
    out[at] = FromFloat<T>(o / l_s[r]);
  }
}

}  // namespace pipeserve::kernels

#endif  // PIPESERVE_RUNTIME_CUDA_KERNELS_PAGED_ATTENTION_H_
