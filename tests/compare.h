// Judging pipeserve's outputs against PyTorch's (see seed_test.cc for why
// the float64 answer is the referee).
#ifndef PIPESERVE_TESTS_COMPARE_H_
#define PIPESERVE_TESTS_COMPARE_H_

#include <vector>

#include "runtime/tensor.h"

namespace pipeserve {

// Largest |got - want| in units of torch.testing.assert_close's float32
// allowance (atol 1e-5 + rtol 1.3e-6 * |want|): <= 1 means assert_close
// passes.
double AssertCloseRatio(const float* got, const std::vector<double>& want);

// gtest check: `got` is at least as close to the float64 answer as
// PyTorch's own float32 output (within 2x of PyTorch's error, or within the
// allowance where PyTorch is), and matches PyTorch's output within the same
// widened allowance (plain assert_close on well-conditioned models).
void ExpectMatchesPyTorch(const Tensor& got, const Tensor& torch32,
                          const std::vector<double>& exact);

}  // namespace pipeserve

#endif  // PIPESERVE_TESTS_COMPARE_H_
