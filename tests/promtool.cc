#include "tests/promtool.h"

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>

#include "absl/strings/str_cat.h"

namespace pipeserve {

std::string PromtoolProblems(const std::string& text) {
  if (std::system("command -v promtool >/dev/null 2>&1") != 0) {
    return "promtool is not installed (apt-get install prometheus; tools/bootstrap.sh does)";
  }
  static int n = 0;
  const char* dir = std::getenv("TEST_TMPDIR");
  std::string in = absl::StrCat(dir ? dir : "/tmp", "/promtool-", ::getpid(), "-", n++, ".txt");
  std::ofstream(in) << text;
  std::string cmd = absl::StrCat("promtool check metrics < ", in, " 2>&1");
  FILE* p = ::popen(cmd.c_str(), "r");
  if (p == nullptr) return "cannot run promtool";
  std::string out;
  char buf[512];
  while (size_t got = std::fread(buf, 1, sizeof buf, p)) out.append(buf, got);
  const int rc = ::pclose(p);
  std::remove(in.c_str());
  return rc == 0 ? "" : absl::StrCat("promtool exit status ", rc, ": ", out);
}

}  // namespace pipeserve
