// simt's tensor-core fragments: the subset of CUDA's nvcuda::wmma that the
// kernels use, as simt::wmma. Under nvcc it is nvcuda::wmma itself
// (wmma_cuda.h); in an ordinary C++ build the emulator (wmma_host.h), which
// checks what the hardware requires of each call and computes what the
// tensor cores compute (float32 accumulation of exact products).
//
//   using namespace simt;  // wmma::...
//   wmma::fragment<wmma::matrix_a, 16, 16, 16, Bf16, wmma::row_major> a;
//   wmma::fragment<wmma::matrix_b, 16, 16, 16, Bf16, wmma::col_major> b;
//   wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
//   wmma::fill_fragment(c, 0.0f);
//   wmma::load_matrix_sync(a, q_s + row0 * kLd, kLd);   // shared arrays only
//   wmma::load_matrix_sync(b, k_s + key0 * kLd, kLd);
//   wmma::mma_sync(c, a, b, c);                         // c += a · b
//   wmma::store_matrix_sync(s_s + row0 * kS, c, kS, wmma::mem_row_major);
//   SyncThreads();  // before another thread reads s_s
//
// Rules (the hardware's; the emulator reports each as a violation):
//   * every *_sync call is made by all 32 lanes of a warp together, with the
//     same arguments;
//   * pointers are 32-byte aligned and ldm is a multiple of 16 bytes;
//   * a tile written by other threads is loaded, and a stored tile read by
//     other threads, only after a barrier (the lanes' shares of a tile are
//     the hardware's business);
//   * how a fragment's elements map to lanes is unspecified: a kernel may
//     only treat x[0 .. num_elements) uniformly (scale every element, ...).
//     The emulator keeps each lane's elements in a different order, so any
//     other use shows up as a wrong answer.
// Not emulated: global-memory pointers (load from and store to SIMT_SHARED
// arrays), precision::tf32, sub-byte types.
#ifndef PIPESERVE_RUNTIME_CUDA_SIMT_WMMA_H_
#define PIPESERVE_RUNTIME_CUDA_SIMT_WMMA_H_

#if defined(__CUDACC__)
#include "runtime/cuda/simt/wmma_cuda.h"  // IWYU pragma: export
#else
#include "runtime/cuda/simt/wmma_host.h"  // IWYU pragma: export
#endif

#endif  // PIPESERVE_RUNTIME_CUDA_SIMT_WMMA_H_
