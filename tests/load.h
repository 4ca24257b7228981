// Concurrent clients against a running coordinator while something goes
// wrong (a stage server killed, a re-upload, a link cut): every request's
// outcome, and a table of them with the latencies during the disruption.
//
//   absl::Time when;
//   std::vector<Outcome> o = RunLoad(address, "m", inputs, want, 16, absl::Seconds(20),
//                                    absl::Seconds(5), [&] { ::kill(pid, SIGKILL); }, &when);
//   Report("kill -9 stage server 2 of 4", o, when);   // expects 0 failed, 0 wrong
#ifndef PIPESERVE_TESTS_LOAD_H_
#define PIPESERVE_TESTS_LOAD_H_

#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "client/client.h"
#include "runtime/tensor.h"
#include "tests/fixtures.h"

namespace pipeserve {

struct Outcome {
  absl::Time start;
  absl::Duration latency;
  absl::Status status;
  bool right = false;
};

// A fixture's inputs, named as its graph names them.
std::vector<NamedTensor> NamedInputs(const Fixture& f);

// Uploads fixture `f` as model `name` to the coordinator at `address`,
// runs its inputs once and checks that answer against PyTorch's (the
// fixture's expected output, kInternal naming the difference otherwise);
// returns PyTorch's answer, which every later one must match.
absl::StatusOr<Tensor> UploadAndAnswer(const std::string& address, const std::string& name,
                                       const Fixture& f, const UploadOptions& options = {});

// Whether `got` is `want` (PyTorch's answer) up to float32 rounding: every
// element within 1e-4 of the largest magnitude (at least 1).
bool SameAnswer(const Tensor& got, const Tensor& want);

// The value at fraction `p` of `v` (0.99: p99; 1: the largest).
double Percentile(std::vector<double> v, double p);

// Runs `clients` clients, each sending `inputs` to `model` (deadline 30 s)
// one request after another for `length`, and calls `disrupt` on this
// thread after `after`; returns every request's outcome and sets
// `*disrupted` to when `disrupt` was called.
std::vector<Outcome> RunLoad(const std::string& address, const std::string& model,
                             const std::vector<NamedTensor>& inputs, const Tensor& want,
                             int clients, absl::Duration length, absl::Duration after,
                             const std::function<void()>& disrupt, absl::Time* disrupted);

// Prints a table (requests, failed, wrong, p50 and p99 latency, and p99 and
// largest latency of the requests started from 1 s before the disruption
// to `window` after) and checks with gtest that none failed, none was
// wrong, and, when requests went on past the window, that some of those
// succeeded (the model serves again after the disruption).
void Report(const std::string& what, const std::vector<Outcome>& outcomes, absl::Time disrupted,
            absl::Duration window = absl::Seconds(5));

}  // namespace pipeserve

#endif  // PIPESERVE_TESTS_LOAD_H_
