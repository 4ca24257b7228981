// simt: CUDA kernels written once, compiled by nvcc for the GPU and run on
// the CPU by an emulator of CUDA's execution model, so every kernel's source
// is tested against a float64 reference on machines without a GPU (the way
// llm.c checks its CUDA kernels against its plain C).
//
// A kernel is a template (or inline function) in a header that uses only the
// names below. Under nvcc (__CUDACC__) each name is the CUDA builtin at no
// cost (simt_cuda.h); in an ordinary C++ build it is the emulator
// (simt_host.h), which runs one host thread per CUDA thread and reports the
// first shared-memory race, read of never-written shared memory,
// out-of-bounds shared index, divergent SyncThreads() or warp op not reached
// by the whole warp.
//
//   // out[r] = sum of x[r, 0..cols) ; one block of 128 threads per row.
//   template <typename T>
//   SIMT_GLOBAL void RowSum(const T* x, float* out, int cols) {
//     SIMT_SHARED(float, partial, 128);
//     const int t = simt::ThreadIdx().x;
//     const T* row = x + int64_t{simt::BlockIdx().x} * cols;
//     float sum = 0.0f;
//     for (int c = t; c < cols; c += 128) sum += simt::ToFloat(row[c]);
//     partial[t] = sum;
//     simt::SyncThreads();
//     for (int s = 64; s > 0; s >>= 1) {
//       if (t < s) partial[t] += partial[t + s];
//       simt::SyncThreads();
//     }
//     if (t == 0) out[simt::BlockIdx().x] = partial[0];
//   }
//
//   // GPU, in a .cu file:
//   RowSum<__half><<<rows, 128, 0, stream>>>(x, out, cols);
//   // CPU, in a test (simt::Half, the emulator's half):
//   absl::Status s = simt::Emulate(rows, 128, [&] { RowSum(x, out, cols); });
//
// The API (all in namespace pipeserve::simt):
//   SIMT_GLOBAL, SIMT_DEVICE, SIMT_HOST_DEVICE   __global__, __device__ ...
//   Dim3; ThreadIdx(), BlockIdx(), BlockDim(), GridDim()  (.x .y .z)
//   kWarpSize; LaneId(), WarpId()   (x-major linear thread id % 32, / 32)
//   SyncThreads()                    __syncthreads()
//   Shfl(v, src_lane), ShflXor(v, lane_mask), ShflDown(v, delta),
//   ShflUp(v, delta), Ballot(p), Any(p), All(p)
//                                    the *_sync intrinsics, full warp only
//   SIMT_SHARED(T, name, N)          __shared__ T name[N]; index it only
//   SIMT_UNROLL                      #pragma unroll (nvcc only): a loop over a
//                                    small local array keeps it in registers
//   SharedPtr<T>                     what `name` passes to a device function
//   Half, Bf16; ToFloat(x), FromFloat<T>(f)   storage types, round to even
//   Exp Log Sqrt Rsqrt Tanh Erf Max Min Abs Cos Sin Pow Fmod Floor CopySign   float math
//                                    (Exp also in double)
//   Emulate(grid, block, kernel_call) (host only) runs kernel_call once per
//                                    emulated thread; see simt_host.h
//
// Rules the emulator relies on (nvcc accepts more):
//   * Shared memory is only indexed: `name[i]`, `(name + k)[i]`; no `&name[i]`
//     and no `auto v = name[i]` (on the host that is a proxy, not a value).
//   * Warp ops need every lane of a full warp (block size a multiple of 32),
//     so threads past the end of the data must not return before them.
//   * Kernels in headers are templates or use SIMT_GLOBAL (inline on the
//     host), so one header can be included by several files.
#ifndef PIPESERVE_RUNTIME_CUDA_SIMT_SIMT_H_
#define PIPESERVE_RUNTIME_CUDA_SIMT_SIMT_H_

#if defined(__CUDACC__)
#include "runtime/cuda/simt/simt_cuda.h"  // IWYU pragma: export
#else
#include "runtime/cuda/simt/simt_host.h"  // IWYU pragma: export
#endif

#endif  // PIPESERVE_RUNTIME_CUDA_SIMT_SIMT_H_
