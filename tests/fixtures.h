// PyTorch-made fixtures for end-to-end tests: runs
// tests/pytorch/make_fixtures.py with Debian's /usr/bin/python3 (PyTorch
// 1.13) into a temporary folder, then loads what it wrote.
//
//   absl::StatusOr<std::string> dir = MakeFixtures({"example_code"}, 16);
//   absl::StatusOr<Fixture> f = LoadFixture(*dir, "example_code");
#ifndef PIPESERVE_TESTS_FIXTURES_H_
#define PIPESERVE_TESTS_FIXTURES_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "runtime/model_file.h"
#include "runtime/tensor.h"

namespace pipeserve {

struct Fixture {
  std::string path;              // the .psm file
  Model model;
  std::vector<Tensor> inputs;    // in the graph's input order
  std::vector<Tensor> expected;  // PyTorch eager outputs, in order
  // The same module run in float64 (the exact answer), flattened.
  std::vector<std::vector<double>> exact;
};

// Exports `cases` (all when empty) with the given batch into a new folder
// made by TestTempDir ($TEST_TMPDIR under bazel test) and returns it;
// kInternal if PyTorch fails.
absl::StatusOr<std::string> MakeFixtures(const std::vector<std::string>& cases,
                                         int batch);

absl::StatusOr<Fixture> LoadFixture(const std::string& dir,
                                    const std::string& name);

// Writes a model of 48 linear+ReLU layers of 512 in 4 stages to
// `dir`/deep.psm and returns the path. Compute dominates a request of 1024
// rows (about 26 GFLOP, hundreds of ms here) while its tensors stay small
// (2 MiB), so a deadline, a cancel or a shutdown can land mid-pipeline.
std::string WriteDeepMlp(const std::string& dir);

// The repository root inside the test's runfiles (or the working directory
// outside Bazel).
std::string RunfilesRoot();

}  // namespace pipeserve

#endif  // PIPESERVE_TESTS_FIXTURES_H_
