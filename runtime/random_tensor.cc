#include "runtime/random_tensor.h"

namespace pipeserve {

Tensor RandomTensor(Shape shape, std::mt19937* rng) {
  std::uniform_real_distribution<float> d(-1.0f, 1.0f);
  Tensor t = Tensor::Empty(std::move(shape));
  for (int64_t i = 0; i < t.numel(); ++i) t.data()[i] = d(*rng);
  return t;
}

Tensor RandomTensor(Shape shape, uint32_t seed) {
  std::mt19937 rng(seed);
  return RandomTensor(std::move(shape), &rng);
}

}  // namespace pipeserve
