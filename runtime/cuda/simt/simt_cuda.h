// simt.h under nvcc: every name is the CUDA builtin, inlined away. Include
// simt.h, not this file.
#ifndef PIPESERVE_RUNTIME_CUDA_SIMT_SIMT_CUDA_H_
#define PIPESERVE_RUNTIME_CUDA_SIMT_SIMT_CUDA_H_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#define SIMT_GLOBAL __global__
#define SIMT_DEVICE __device__ __forceinline__
#define SIMT_HOST_DEVICE __host__ __device__ __forceinline__
// 32-byte aligned, as wmma (wmma.h) loads and stores need.
#define SIMT_SHARED(T, name, N) __shared__ __align__(32) T name[(N)]
#define SIMT_UNROLL _Pragma("unroll")

namespace pipeserve::simt {

// Lanes per warp, on every NVIDIA GPU so far and in the emulator.
constexpr int kWarpSize = 32;

using Dim3 = ::dim3;
using Half = ::__half;
using Bf16 = ::__nv_bfloat16;

// What a SIMT_SHARED array is passed to a device function as.
template <typename T>
using SharedPtr = T*;

SIMT_DEVICE uint3 ThreadIdx() { return threadIdx; }
SIMT_DEVICE uint3 BlockIdx() { return blockIdx; }
SIMT_DEVICE dim3 BlockDim() { return blockDim; }
SIMT_DEVICE dim3 GridDim() { return gridDim; }

// CUDA numbers a block's threads x-major into warps.
SIMT_DEVICE int LinearThreadId() {
  return static_cast<int>(
      threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z));
}
SIMT_DEVICE int LaneId() { return LinearThreadId() & (kWarpSize - 1); }
SIMT_DEVICE int WarpId() { return LinearThreadId() / kWarpSize; }

SIMT_DEVICE void SyncThreads() { __syncthreads(); }

constexpr unsigned kFullWarpMask = 0xffffffffu;

template <typename T>
SIMT_DEVICE T Shfl(T v, int src_lane) {
  return __shfl_sync(kFullWarpMask, v, src_lane);
}
template <typename T>
SIMT_DEVICE T ShflXor(T v, int lane_mask) {
  return __shfl_xor_sync(kFullWarpMask, v, lane_mask);
}
template <typename T>
SIMT_DEVICE T ShflDown(T v, int delta) {
  return __shfl_down_sync(kFullWarpMask, v, static_cast<unsigned>(delta));
}
template <typename T>
SIMT_DEVICE T ShflUp(T v, int delta) {
  return __shfl_up_sync(kFullWarpMask, v, static_cast<unsigned>(delta));
}
SIMT_DEVICE uint32_t Ballot(bool p) { return __ballot_sync(kFullWarpMask, p); }
SIMT_DEVICE bool Any(bool p) { return __any_sync(kFullWarpMask, p) != 0; }
SIMT_DEVICE bool All(bool p) { return __all_sync(kFullWarpMask, p) != 0; }

SIMT_DEVICE float ToFloat(float x) { return x; }
SIMT_DEVICE float ToFloat(Half x) { return __half2float(x); }
SIMT_DEVICE float ToFloat(Bf16 x) { return __bfloat162float(x); }

template <typename T>
SIMT_DEVICE T FromFloat(float x) {
  static_assert(sizeof(T) == 0, "FromFloat<T>: T is float, Half or Bf16");
}
template <>
SIMT_DEVICE float FromFloat<float>(float x) {
  return x;
}
template <>
SIMT_DEVICE Half FromFloat<Half>(float x) {
  return __float2half_rn(x);
}
template <>
SIMT_DEVICE Bf16 FromFloat<Bf16>(float x) {
  return __float2bfloat16_rn(x);
}

// The accurate (not __expf-style fast) functions: the emulator's std::
// versions agree with them to a few ulp.
SIMT_DEVICE float Exp(float x) { return expf(x); }
SIMT_DEVICE double Exp(double x) { return exp(x); }
SIMT_DEVICE float Log(float x) { return logf(x); }
SIMT_DEVICE float Sqrt(float x) { return sqrtf(x); }
SIMT_DEVICE float Rsqrt(float x) { return rsqrtf(x); }
SIMT_DEVICE float Tanh(float x) { return tanhf(x); }
SIMT_DEVICE float Erf(float x) { return erff(x); }
SIMT_DEVICE float Max(float a, float b) { return fmaxf(a, b); }
SIMT_DEVICE float Min(float a, float b) { return fminf(a, b); }
SIMT_DEVICE float Abs(float x) { return fabsf(x); }
SIMT_DEVICE float Cos(float x) { return cosf(x); }
SIMT_DEVICE float Sin(float x) { return sinf(x); }
SIMT_DEVICE float Pow(float x, float y) { return powf(x, y); }
SIMT_DEVICE float Fmod(float x, float y) { return fmodf(x, y); }
SIMT_DEVICE float Floor(float x) { return floorf(x); }
SIMT_DEVICE float CopySign(float x, float y) { return copysignf(x, y); }

}  // namespace pipeserve::simt

#endif  // PIPESERVE_RUNTIME_CUDA_SIMT_SIMT_CUDA_H_
