// A fresh, empty folder under the test's $TEST_TMPDIR for each call.
//
//   std::string repo = TestTempDir("repo");   // $TEST_TMPDIR/repo.0, then repo.1, ...
#ifndef PIPESERVE_SERVER_TESTING_TEMP_DIR_H_
#define PIPESERVE_SERVER_TESTING_TEMP_DIR_H_

#include <string>

namespace pipeserve {

std::string TestTempDir(const std::string& name);

// Where TestTempDir makes its folders: $TEST_TMPDIR under `bazel test`;
// elsewhere a folder of this process's own, removed at a normal exit.
std::string TestTempRoot();

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_TESTING_TEMP_DIR_H_
