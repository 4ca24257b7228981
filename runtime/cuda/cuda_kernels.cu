// Elementwise kernels of the CUDA backend (see cuda_kernels.h). All are
// grid-stride loops over 64-bit indices: memory-bound, one read per input
// element and one write per output element.
#include <cuda_bf16.h>

#include <algorithm>

#include "runtime/cuda/cuda_kernels.h"

namespace pipeserve {
namespace {

constexpr int kThreads = 256;
// Enough blocks to fill an H100 (132 SMs x 8 blocks of 256) several times;
// the loops stride over the rest.
constexpr int64_t kMaxBlocks = 4096;

int Blocks(int64_t n) {
  return static_cast<int>(
      std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks));
}

__device__ __forceinline__ float Apply(KernelOp op, float a, float b) {
  return op == KernelOp::kAdd ? a + b : op == KernelOp::kSub ? a - b : a * b;
}

__device__ __forceinline__ int64_t ThreadIndex() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ int64_t Stride() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}

// Same shapes: both operands walk with the output.
__global__ void BinaryContiguous(KernelOp op, const float* __restrict__ a,
                                 const float* __restrict__ b, float* out,
                                 int64_t n) {
  for (int64_t i = ThreadIndex(); i < n; i += Stride())
    out[i] = Apply(op, a[i], b[i]);
}

__global__ void BinaryBroadcast(KernelOp op, const float* __restrict__ a,
                                const float* __restrict__ b, float* out,
                                int64_t n, BroadcastIndex index) {
  for (int64_t i = ThreadIndex(); i < n; i += Stride()) {
    int64_t ia, ib;
    index.Offsets(i, &ia, &ib);
    out[i] = Apply(op, a[ia], b[ib]);
  }
}

__global__ void Scalar(KernelOp op, const float* __restrict__ x, float s,
                       bool reverse, float* out, int64_t n) {
  for (int64_t i = ThreadIndex(); i < n; i += Stride()) {
    out[i] = reverse ? Apply(op, s, x[i]) : Apply(op, x[i], s);
  }
}

__global__ void Relu(const float* __restrict__ x, float* out, int64_t n) {
  for (int64_t i = ThreadIndex(); i < n; i += Stride()) {
    float v = x[i];
    out[i] = v < 0.0f ? 0.0f : v;
  }
}

__global__ void ToBf16(const float* __restrict__ x, __nv_bfloat16* out,
                       int64_t n) {
  for (int64_t i = ThreadIndex(); i < n; i += Stride())
    out[i] = __float2bfloat16_rn(x[i]);
}

__global__ void ToTf32(const float* __restrict__ x, float* out, int64_t n) {
  for (int64_t i = ThreadIndex(); i < n; i += Stride()) {
    uint32_t u = __float_as_uint(x[i]);
    if ((u & 0x7f800000u) != 0x7f800000u) {
      u += 0xfffu + ((u >> 13) & 1u);
      u &= ~0x1fffu;
    }
    out[i] = __uint_as_float(u);
  }
}

__global__ void Fill(void* out, bool out_bf16, const float* __restrict__ bias,
                     int64_t m, int64_t n, int64_t ld, bool relu) {
  for (int64_t e = ThreadIndex(); e < m * n; e += Stride()) {
    int64_t i = e % m, j = e / m;
    float v = bias != nullptr ? bias[i] : 0.0f;
    if (relu && v < 0.0f) v = 0.0f;
    if (out_bf16) {
      static_cast<__nv_bfloat16*>(out)[i + j * ld] = __float2bfloat16_rn(v);
    } else {
      static_cast<float*>(out)[i + j * ld] = v;
    }
  }
}

__global__ void BiasRelu(void* d, bool d_bf16, const float* __restrict__ bias,
                         int64_t m, int64_t n, int64_t ld, bool relu) {
  for (int64_t e = ThreadIndex(); e < m * n; e += Stride()) {
    int64_t i = e % m, j = e / m;
    int64_t at = i + j * ld;
    float v = d_bf16 ? __bfloat162float(static_cast<__nv_bfloat16*>(d)[at])
                     : static_cast<float*>(d)[at];
    if (bias != nullptr) v += bias[i];
    if (relu && v < 0.0f) v = 0.0f;
    if (d_bf16) {
      static_cast<__nv_bfloat16*>(d)[at] = __float2bfloat16_rn(v);
    } else {
      static_cast<float*>(d)[at] = v;
    }
  }
}

}  // namespace

cudaError_t LaunchBinary(KernelOp op, const float* a, const float* b,
                         float* out, int64_t n, const BroadcastIndex& index,
                         cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  if (index.rank == 1 && index.a_stride[0] == 1 && index.b_stride[0] == 1) {
    BinaryContiguous<<<Blocks(n), kThreads, 0, stream>>>(op, a, b, out, n);
  } else {
    BinaryBroadcast<<<Blocks(n), kThreads, 0, stream>>>(op, a, b, out, n,
                                                        index);
  }
  return cudaGetLastError();
}

cudaError_t LaunchScalar(KernelOp op, const float* x, float s, bool reverse,
                         float* out, int64_t n, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  Scalar<<<Blocks(n), kThreads, 0, stream>>>(op, x, s, reverse, out, n);
  return cudaGetLastError();
}

cudaError_t LaunchRelu(const float* x, float* out, int64_t n,
                       cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  Relu<<<Blocks(n), kThreads, 0, stream>>>(x, out, n);
  return cudaGetLastError();
}

cudaError_t LaunchToBf16(const float* x, void* bf16_out, int64_t n,
                         cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  ToBf16<<<Blocks(n), kThreads, 0, stream>>>(
      x, static_cast<__nv_bfloat16*>(bf16_out), n);
  return cudaGetLastError();
}

cudaError_t LaunchToTf32(const float* x, float* out, int64_t n,
                         cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  ToTf32<<<Blocks(n), kThreads, 0, stream>>>(x, out, n);
  return cudaGetLastError();
}

cudaError_t LaunchFill(void* out, bool out_bf16, const float* bias, int64_t m,
                       int64_t n, int64_t ld, bool relu, cudaStream_t stream) {
  if (m <= 0 || n <= 0) return cudaSuccess;
  Fill<<<Blocks(m * n), kThreads, 0, stream>>>(out, out_bf16, bias, m, n, ld,
                                               relu);
  return cudaGetLastError();
}

}  // namespace pipeserve

namespace pipeserve {

cudaError_t LaunchBiasRelu(void* d, bool d_bf16, const float* bias, int64_t m,
                           int64_t n, int64_t ld, bool relu,
                           cudaStream_t stream) {
  if (m <= 0 || n <= 0 || (bias == nullptr && !relu)) return cudaSuccess;
  BiasRelu<<<Blocks(m * n), kThreads, 0, stream>>>(d, d_bf16, bias, m, n, ld,
                                                   relu);
  return cudaGetLastError();
}

}  // namespace pipeserve
