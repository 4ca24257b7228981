// Small helpers shared by the benchmarks.
#ifndef PIPESERVE_BENCH_BENCH_UTIL_H_
#define PIPESERVE_BENCH_BENCH_UTIL_H_

#include <cstdint>
#include <string>

#include "runtime/random_tensor.h"  // RandomTensor, for the benches

namespace pipeserve {

// Runs `cmd` (bench/torch_eager.py) and returns the median_ms it prints,
// or -1 if it printed none.
double TorchMedianMs(const std::string& cmd);


}  // namespace pipeserve

#endif  // PIPESERVE_BENCH_BENCH_UTIL_H_
