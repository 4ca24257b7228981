// Index arithmetic for numpy-style broadcasting, shared by the CUDA kernels
// (nvcc) and host code (gcc): MakeBroadcastIndex reduces two operand shapes
// and their broadcast output shape to the fewest dimensions with per-operand
// strides (0 where an operand repeats), and Offsets maps a flat output index
// to the flat index of each operand.
//
//   BroadcastIndex ix;
//   MakeBroadcastIndex({5, 12}, {12}, {5, 12}, &ix);  // rank 2, b stride 0
//   int64_t ia, ib;
//   ix.Offsets(13, &ia, &ib);                           // ia 13, ib 1
//
// This header includes nothing from Abseil so nvcc can compile it.
#ifndef PIPESERVE_RUNTIME_CUDA_BROADCAST_INDEX_H_
#define PIPESERVE_RUNTIME_CUDA_BROADCAST_INDEX_H_

#include <cstdint>
#include <vector>

#if defined(__CUDACC__)
#define PIPESERVE_HOST_DEVICE __host__ __device__
#else
#define PIPESERVE_HOST_DEVICE
#endif

namespace pipeserve {

inline constexpr int kMaxBroadcastRank = 8;

struct BroadcastIndex {
  int rank = 0;  // 0: a single element
  int64_t dims[kMaxBroadcastRank] = {};
  int64_t a_stride[kMaxBroadcastRank] = {};
  int64_t b_stride[kMaxBroadcastRank] = {};

  // Flat indices into a and b of flat output index i (row-major).
  PIPESERVE_HOST_DEVICE void Offsets(int64_t i, int64_t* a, int64_t* b) const {
    int64_t ia = 0, ib = 0;
    for (int d = rank - 1; d >= 0; --d) {
      int64_t c = i % dims[d];
      i /= dims[d];
      ia += c * a_stride[d];
      ib += c * b_stride[d];
    }
    *a = ia;
    *b = ib;
  }
};

// Fills `out` for out_shape = broadcast(a_shape, b_shape) (all concrete).
// Returns false when the shapes do not broadcast to out_shape or more than
// kMaxBroadcastRank dimensions remain after merging.
bool MakeBroadcastIndex(const std::vector<int64_t>& a_shape,
                        const std::vector<int64_t>& b_shape,
                        const std::vector<int64_t>& out_shape,
                        BroadcastIndex* out);

}  // namespace pipeserve

#endif  // PIPESERVE_RUNTIME_CUDA_BROADCAST_INDEX_H_
