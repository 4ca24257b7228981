// The random number behind a seeded sampling draw, shared by the CPU's
// sampler (runtime/sampler.cc) and the GPU's (runtime/cuda/kernels/sample.h)
// so both draw the same numbers: draw `index` of `seed` depends on those two
// alone (SplitMix64 of each). Also the temperature below which both pick
// greedily.
#ifndef PIPESERVE_RUNTIME_SAMPLE_DRAW_H_
#define PIPESERVE_RUNTIME_SAMPLE_DRAW_H_

#include <cstdint>

#if defined(__CUDACC__)
#define PIPESERVE_SAMPLE_DRAW_FN __host__ __device__ inline
#else
#define PIPESERVE_SAMPLE_DRAW_FN inline
#endif

namespace pipeserve {

// Temperatures below this pick the most likely token, as vLLM does: a
// draw at a temperature this small is greedy anyway, and dividing logits
// by one far smaller (1e-320) overflows, which would make every
// probability NaN and pick the least likely token.
constexpr double kGreedyBelow = 1e-5;

PIPESERVE_SAMPLE_DRAW_FN uint64_t SplitMix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// A uniform number in [0, 1) for draw `index` of `seed` (53 random bits).
PIPESERVE_SAMPLE_DRAW_FN double UniformDraw(uint64_t seed, int64_t index) {
  const uint64_t bits = SplitMix64(SplitMix64(seed) ^ static_cast<uint64_t>(index));
  return static_cast<double>(bits >> 11) * (1.0 / 9007199254740992.0);
}

}  // namespace pipeserve

#undef PIPESERVE_SAMPLE_DRAW_FN

#endif  // PIPESERVE_RUNTIME_SAMPLE_DRAW_H_
