// wmma.h under nvcc: CUDA's own fragments. Include wmma.h, not this file.
#ifndef PIPESERVE_RUNTIME_CUDA_SIMT_WMMA_CUDA_H_
#define PIPESERVE_RUNTIME_CUDA_SIMT_WMMA_CUDA_H_

#include <mma.h>

#include "runtime/cuda/simt/simt.h"

namespace pipeserve::simt {
namespace wmma = ::nvcuda::wmma;
}  // namespace pipeserve::simt

#endif  // PIPESERVE_RUNTIME_CUDA_SIMT_WMMA_CUDA_H_
