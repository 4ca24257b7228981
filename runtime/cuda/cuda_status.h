// CUDA, cuBLAS and cuBLASLt return codes as absl::Status, naming the call:
//
//   CUDA_RETURN_IF_ERROR(cudaMalloc(&p, bytes));
//   // -> kResourceExhausted "cudaMalloc(&p, bytes) failed:
//   cudaErrorMemoryAllocation
//   //    (out of memory)"
//   CUBLAS_RETURN_IF_ERROR(cublasLtCreate(&handle));
//
// Out-of-memory codes map to kResourceExhausted, everything else to
// kInternal. Only for code built with --config=cuda.
#ifndef PIPESERVE_RUNTIME_CUDA_CUDA_STATUS_H_
#define PIPESERVE_RUNTIME_CUDA_CUDA_STATUS_H_

#include <cublas_api.h>
#include <cuda_runtime_api.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace pipeserve {

inline absl::Status CudaStatus(cudaError_t e, const char* call) {
  if (e == cudaSuccess) return absl::OkStatus();
  return absl::Status(e == cudaErrorMemoryAllocation
                          ? absl::StatusCode::kResourceExhausted
                          : absl::StatusCode::kInternal,
                      absl::StrCat(call, " failed: ", cudaGetErrorName(e), " (",
                                   cudaGetErrorString(e), ")"));
}

inline absl::Status CublasStatus(cublasStatus_t s, const char* call) {
  if (s == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  return absl::Status(s == CUBLAS_STATUS_ALLOC_FAILED
                          ? absl::StatusCode::kResourceExhausted
                          : absl::StatusCode::kInternal,
                      absl::StrCat(call, " failed: ", cublasGetStatusName(s),
                                   " (", cublasGetStatusString(s), ")"));
}

}  // namespace pipeserve

#define CUDA_RETURN_IF_ERROR(expr)                                  \
  do {                                                              \
    cudaError_t _pipeserve_cuda_error = (expr);                     \
    if (_pipeserve_cuda_error != cudaSuccess) {                     \
      return ::pipeserve::CudaStatus(_pipeserve_cuda_error, #expr); \
    }                                                               \
  } while (0)

#define CUBLAS_RETURN_IF_ERROR(expr)                                     \
  do {                                                                   \
    cublasStatus_t _pipeserve_cublas_status = (expr);                    \
    if (_pipeserve_cublas_status != CUBLAS_STATUS_SUCCESS) {             \
      return ::pipeserve::CublasStatus(_pipeserve_cublas_status, #expr); \
    }                                                                    \
  } while (0)

#endif  // PIPESERVE_RUNTIME_CUDA_CUDA_STATUS_H_
