#include "server/testing/temp_dir.h"

#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <system_error>

#include "absl/strings/str_cat.h"

namespace pipeserve {
namespace {

// Outside `bazel test` (a benchmark under `bazel run`): a folder of this
// process's own, removed when it exits normally, so that runs side by side
// never share (or remove) each other's folders.
struct OwnRoot {
  std::string dir = absl::StrCat(std::filesystem::temp_directory_path().string(),
                                 "/pipeserve_", ::getpid());
  OwnRoot() { std::filesystem::create_directories(dir); }
  ~OwnRoot() {
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);
  }
};

}  // namespace

std::string TestTempRoot() {
  if (const char* root = std::getenv("TEST_TMPDIR"); root != nullptr) return root;
  static OwnRoot own;
  return own.dir;
}

std::string TestTempDir(const std::string& name) {
  static std::atomic<int> counter{0};
  std::string dir = absl::StrCat(TestTempRoot(), "/", name, ".", counter++);
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

}  // namespace pipeserve
