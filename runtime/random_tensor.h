// Random tensors for tests and benchmarks: Uniform(-1, 1), never all zeros.
//
//   Tensor x = RandomTensor({16, 512}, /*seed=*/7);
//   std::mt19937 rng(seed);
//   Tensor y = RandomTensor({16, 512}, &rng);   // continues rng's sequence
#ifndef PIPESERVE_RUNTIME_RANDOM_TENSOR_H_
#define PIPESERVE_RUNTIME_RANDOM_TENSOR_H_

#include <cstdint>
#include <random>

#include "runtime/tensor.h"

namespace pipeserve {

Tensor RandomTensor(Shape shape, std::mt19937* rng);
Tensor RandomTensor(Shape shape, uint32_t seed);

}  // namespace pipeserve

#endif  // PIPESERVE_RUNTIME_RANDOM_TENSOR_H_
