// cached_attention's attention on tensor cores, for float16 and bfloat16
// caches with head_dim a multiple of 16 (up to kMaxHeadDim): the same
// semantics and arguments as PagedAttention (paged_attention.h), written
// once against simt.h and wmma.h. A block takes kTcQueryTile query tokens
// of one sequence (a prefill chunk) for one head; each of its two warps
// owns 16 rows. Per key tile of kTcKeyTile cached keys:
//   S = Q · K^T       wmma, into shared memory (float)
//   online softmax    one thread a row: running max m and sum l, P = exp(S -
//                     m) as T, alpha = exp(m_old - m) (the causal mask and
//                     the scale applied here, in float)
//   O = O * alpha     O lives in shared memory (float): a fragment's
//                     row mapping is not specified, so rows cannot be
//                     scaled in registers
//   O += P · V        wmma, each warp its rows' accumulators
// then out = O / l. Shared memory: Q, K and V tiles of T, S, P and O, 47 KB
// at kMaxHeadDim (under the 48 KB a block may declare statically).
//
// Host side: tiles = AttentionTiles(seq, tokens, kTcQueryTile);
//   TensorCoreAttention<<<dim3(MaxAttentionTiles(T, N, kTcQueryTile),
//                              heads), kTcThreads>>>(...)
// after KvAppend (paged_attention.h), as for PagedAttention.
//
// Not yet: keeping O in registers (mma.sync with its documented layout),
// padding the shared tiles against bank conflicts, double-buffering the
// key tiles, sharing a key tile between the query heads of a group.
#ifndef PIPESERVE_RUNTIME_CUDA_KERNELS_TENSOR_CORE_ATTENTION_H_
#define PIPESERVE_RUNTIME_CUDA_KERNELS_TENSOR_CORE_ATTENTION_H_

#include <cstdint>

#include "runtime/cuda/kernels/launch_args.h"
#include "runtime/cuda/kernels/paged_attention.h"
#include "runtime/cuda/simt/simt.h"
#include "runtime/cuda/simt/wmma.h"

namespace pipeserve::kernels {

// Keys [key0, key0 + kTcKeyTile) of sequence `s` (rows past `last` zero)
// into k_s and v_s, [key][kMaxHeadDim].
template <typename T>
SIMT_DEVICE void LoadTcKeyTile(const T* cache, const PagedCache& c, int64_t s, int kv_head,
                               int64_t key0, int64_t last, simt::SharedPtr<T> k_s,
                               simt::SharedPtr<T> v_s) {
  using namespace simt;  // NOLINT: the kernel vocabulary
  const T zero = FromFloat<T>(0.0f);
  for (int i = ThreadIdx().x; i < kTcKeyTile * c.head_dim; i += kTcThreads) {
    const int j = i / c.head_dim, d = i % c.head_dim;
    const int64_t p = key0 + j;
    const bool in = p <= last;
    k_s[j * kMaxHeadDim + d] = in ? cache[CacheRow(c, s, p, 0, kv_head) + d] : zero;
    v_s[j * kMaxHeadDim + d] = in ? cache[CacheRow(c, s, p, 1, kv_head) + d] : zero;
  }
}

// S [kTcQueryTile][kTcKeyTile] = Q · K^T: warp w its 16 rows, two 16-key
// halves, head_dim / 16 steps each.
template <typename T>
SIMT_DEVICE void TcScores(int head_dim, simt::SharedPtr<T> q_s, simt::SharedPtr<T> k_s,
                          simt::SharedPtr<float> s_s) {
  using namespace simt;  // NOLINT
  const int row0 = WarpId() * 16;
  for (int key0 = 0; key0 < kTcKeyTile; key0 += 16) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.0f);
    for (int d0 = 0; d0 < head_dim; d0 += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;  // K^T
      wmma::load_matrix_sync(a, q_s + row0 * kMaxHeadDim + d0, kMaxHeadDim);
      wmma::load_matrix_sync(b, k_s + key0 * kMaxHeadDim + d0, kMaxHeadDim);
      wmma::mma_sync(acc, a, b, acc);
    }
    wmma::store_matrix_sync(s_s + row0 * kTcKeyTile + key0, acc, kTcKeyTile, wmma::mem_row_major);
  }
}

// Row r's online softmax over the key tile at key0: scores scaled and
// masked past the row's position, P as T, the row's m, l and alpha.
template <typename T>
SIMT_DEVICE void TcRowUpdate(int r, int64_t row_pos, int64_t key0, float scale,
                             simt::SharedPtr<float> s_s, simt::SharedPtr<T> p_s,
                             simt::SharedPtr<float> m_s, simt::SharedPtr<float> l_s,
                             simt::SharedPtr<float> alpha_s) {
  using namespace simt;  // NOLINT
  const float m_old = m_s[r];
  float m_new = m_old;
  for (int j = 0; j < kTcKeyTile; ++j) {
    if (key0 + j <= row_pos) m_new = Max(m_new, s_s[r * kTcKeyTile + j] * scale);
  }
  const bool none = m_new == -__builtin_huge_valf();  // nothing visible yet
  float sum = 0.0f;
  for (int j = 0; j < kTcKeyTile; ++j) {
    const bool seen = !none && key0 + j <= row_pos;
    const T p = FromFloat<T>(seen ? Exp(s_s[r * kTcKeyTile + j] * scale - m_new) : 0.0f);
    p_s[r * kTcKeyTile + j] = p;
    sum += ToFloat(p);  // the weights P · V sums, as rounded
  }
  const float alpha = none ? 1.0f : Exp(m_old - m_new);
  m_s[r] = m_new;
  l_s[r] = l_s[r] * alpha + sum;
  alpha_s[r] = alpha;
}

// O [rows of warp w] += P · V, the accumulators loaded from and stored
// back to o_s.
template <typename T>
SIMT_DEVICE void TcAccumulate(int head_dim, simt::SharedPtr<T> p_s, simt::SharedPtr<T> v_s,
                              simt::SharedPtr<float> o_s) {
  using namespace simt;  // NOLINT
  const int row0 = WarpId() * 16;
  for (int d0 = 0; d0 < head_dim; d0 += 16) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::load_matrix_sync(acc, o_s + row0 * kMaxHeadDim + d0, kMaxHeadDim, wmma::mem_row_major);
    for (int k0 = 0; k0 < kTcKeyTile; k0 += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
      wmma::load_matrix_sync(a, p_s + row0 * kTcKeyTile + k0, kTcKeyTile);
      wmma::load_matrix_sync(b, v_s + k0 * kMaxHeadDim + d0, kMaxHeadDim);
      wmma::mma_sync(acc, a, b, acc);
    }
    wmma::store_matrix_sync(o_s + row0 * kMaxHeadDim + d0, acc, kMaxHeadDim, wmma::mem_row_major);
  }
}

// The tile's query rows of `head` into q_s (rotated by c.rope_q if it has
// tables; empty rows zero), O zero, m -inf and l 0.
template <typename T>
SIMT_DEVICE void TcLoadQueries(const T* q, const PagedCache& c, const int32_t* tile, int head,
                               simt::SharedPtr<T> q_s, simt::SharedPtr<float> o_s,
                               simt::SharedPtr<float> m_s, simt::SharedPtr<float> l_s) {
  using namespace simt;  // NOLINT
  const int t = static_cast<int>(ThreadIdx().x), D = c.head_dim;
  const T zero = FromFloat<T>(0.0f);
  for (int i = t; i < kTcQueryTile * D; i += kTcThreads) {
    const int r = i / D, d = i % D;
    q_s[r * kMaxHeadDim + d] =
        tile[r] < 0 ? zero : MaybeRotated(q, c.rope_q, (int64_t{head} * c.tokens + tile[r]) * D + d);
    o_s[r * kMaxHeadDim + d] = 0.0f;
  }
  if (t < kTcQueryTile) {
    m_s[t] = -__builtin_huge_valf();
    l_s[t] = 0.0f;
  }
}

// out [1, heads, tokens, head_dim] = attention of q (same shape) over the
// cache, as PagedAttention computes it; block (tile, head) takes the
// kTcQueryTile tokens tiles[tile * kTcQueryTile ...] (-1: none; a tile
// whose first token is -1 is spare). T is Half or Bf16, and
// TensorCoreHeadDim(head_dim).
template <typename T>
SIMT_GLOBAL void TensorCoreAttention(const T* __restrict__ q, const T* __restrict__ cache,
                                     const int32_t* __restrict__ tiles, T* __restrict__ out,
                                     PagedCache c, int heads, float scale) {
  using namespace simt;  // NOLINT: the kernel vocabulary
  SIMT_SHARED(T, q_s, kTcQueryTile * kMaxHeadDim);
  SIMT_SHARED(T, k_s, kTcKeyTile * kMaxHeadDim);
  SIMT_SHARED(T, v_s, kTcKeyTile * kMaxHeadDim);
  SIMT_SHARED(float, s_s, kTcQueryTile * kTcKeyTile);
  SIMT_SHARED(T, p_s, kTcQueryTile * kTcKeyTile);
  SIMT_SHARED(float, o_s, kTcQueryTile * kMaxHeadDim);
  SIMT_SHARED(float, m_s, kTcQueryTile);
  SIMT_SHARED(float, l_s, kTcQueryTile);
  SIMT_SHARED(float, alpha_s, kTcQueryTile);
  const int32_t* tile = tiles + int64_t{BlockIdx().x} * kTcQueryTile;
  if (tile[0] < 0) return;  // a spare tile: the whole block
  const int head = static_cast<int>(BlockIdx().y);
  const int kv_head = head / (heads / c.kv_heads);
  const int t = static_cast<int>(ThreadIdx().x);
  const int D = c.head_dim;
  const int64_t s = c.seq[tile[0]];
  int64_t last = -1;  // the tile's last position: its keys end there
  for (int r = 0; r < kTcQueryTile; ++r) {
    const int64_t p = tile[r] < 0 ? -1 : c.positions[tile[r]];
    last = p > last ? p : last;
  }
  TcLoadQueries(q, c, tile, head, q_s, o_s, m_s, l_s);
  const int64_t my_pos = t < kTcQueryTile && tile[t] >= 0 ? c.positions[tile[t]] : -1;
  for (int64_t key0 = 0; key0 <= last; key0 += kTcKeyTile) {
    SyncThreads();  // the previous tile's k_s, v_s, p_s and o_s are read
    LoadTcKeyTile(cache, c, s, kv_head, key0, last, k_s, v_s);
    SyncThreads();
    TcScores<T>(D, q_s, k_s, s_s);
    SyncThreads();
    if (t < kTcQueryTile) TcRowUpdate<T>(t, my_pos, key0, scale, s_s, p_s, m_s, l_s, alpha_s);
    SyncThreads();
    for (int i = t; i < kTcQueryTile * D; i += kTcThreads) {
      const int r = i / D, d = i % D;
      o_s[r * kMaxHeadDim + d] *= alpha_s[r];
    }
    SyncThreads();
    TcAccumulate<T>(D, p_s, v_s, o_s);
  }
  SyncThreads();
  for (int i = t; i < kTcQueryTile * D; i += kTcThreads) {
    const int r = i / D, d = i % D;
    if (tile[r] < 0) continue;
    out[(int64_t{head} * c.tokens + tile[r]) * D + d] =
        FromFloat<T>(o_s[r * kMaxHeadDim + d] / l_s[r]);
  }
}

}  // namespace pipeserve::kernels

#endif  // PIPESERVE_RUNTIME_CUDA_KERNELS_TENSOR_CORE_ATTENTION_H_
