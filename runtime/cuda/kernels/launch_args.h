// Plain structs and sizes the kernels of this folder take, for host code
// that plans or launches them (the device plan, transformer_kernels.h)
// without including simt.h. nvcc and gcc both compile this header.
#ifndef PIPESERVE_RUNTIME_CUDA_KERNELS_LAUNCH_ARGS_H_
#define PIPESERVE_RUNTIME_CUDA_KERNELS_LAUNCH_ARGS_H_

#include <cstdint>

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

// ---- paged_attention.h -----------------------------------------------------

inline constexpr int kQueryTile = 8;     // query tokens of one sequence per block
inline constexpr int kKeyTile = 32;      // keys per shared-memory tile
inline constexpr int kMaxHeadDim = 128;  // head_dim the shared tiles hold
inline constexpr int kAttentionThreads = 128;
inline constexpr int kKvThreads = 256;

// Where one layer's cache and one step's metadata are. positions, seq
// [tokens]; tables [sequences, table_width] (block ids).
struct PagedCache {
  int64_t tokens = 0;
  int kv_heads = 0, head_dim = 0, block_size = 0;
  int64_t table_width = 0;
  const int64_t* positions = nullptr;
  const int64_t* seq = nullptr;
  const int64_t* tables = nullptr;
};

inline unsigned AppendBlocks(int64_t tokens, int kv_heads, int head_dim) {
  return static_cast<unsigned>((tokens * kv_heads * head_dim + kKvThreads - 1) / kKvThreads);
}

}  // namespace pipeserve::kernels

#endif  // PIPESERVE_RUNTIME_CUDA_KERNELS_LAUNCH_ARGS_H_
