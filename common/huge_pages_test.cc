// The binaries' start on transparent huge pages (huge_pages.h), seen from
// outside: huge_pages_probe run under different environments.
#include "common/huge_pages.h"

#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace pipeserve {
namespace {

// Runs the probe with exactly `env`; its printed "key value" lines, and
// "child" the pid the fork gave it.
std::map<std::string, std::string> Probe(const std::vector<std::string>& env) {
  int pipefd[2];
  if (pipe(pipefd) != 0) return {};
  const pid_t pid = fork();
  if (pid == 0) {
    dup2(pipefd[1], 1);
    close(pipefd[0]);
    std::vector<char*> envp;
    for (const std::string& e : env) envp.push_back(const_cast<char*>(e.c_str()));
    envp.push_back(nullptr);
    std::string bin = "common/huge_pages_probe";
    char* argv[] = {bin.data(), nullptr};
    execve(bin.c_str(), argv, envp.data());
    _exit(127);
  }
  close(pipefd[1]);
  std::string out;
  char buf[256];
  for (ssize_t n; (n = read(pipefd[0], buf, sizeof buf)) > 0;) out.append(buf, n);
  close(pipefd[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  std::map<std::string, std::string> kv = {{"child", std::to_string(pid)},
                                           {"exit", std::to_string(status)}};
  size_t start = 0;
  while (start < out.size()) {
    size_t end = out.find('\n', start);
    if (end == std::string::npos) end = out.size();
    const std::string line = out.substr(start, end - start);
    const size_t sp = line.find(' ');
    kv[line.substr(0, sp)] = sp == std::string::npos ? "" : line.substr(sp + 1);
    start = end + 1;
  }
  return kv;
}

bool KernelHasHugePages() {
  std::ifstream f("/sys/kernel/mm/transparent_hugepage/enabled");
  std::string mode;
  return std::getline(f, mode) && mode.find("[never]") == std::string::npos;
}

TEST(HugePagesTest, ABinaryStartsAgainOnHugePagesKeepingItsPid) {
  if (!KernelHasHugePages()) GTEST_SKIP() << "transparent huge pages are off in this kernel";
  auto kv = Probe({});
  EXPECT_EQ(kv["exit"], "0");
  EXPECT_EQ(kv["tunables"], "glibc.malloc.hugetlb=1");
  EXPECT_EQ(kv["pid"], kv["child"]);  // exec, not a new process
  // The touched 64 MiB is (mostly) on 2 MiB pages (glibc's malloc; not
  // under a sanitizer's own allocator).
  if (kv["sanitizer_malloc"] == "1") return;
  EXPECT_GE(std::atol(kv["huge_kb"].c_str()), 32 * 1024) << "AnonHugePages " << kv["huge_kb"];
}

TEST(HugePagesTest, TheUsersTunablesAndTheOptOutAreLeftAlone) {
  auto own = Probe({"GLIBC_TUNABLES=glibc.malloc.check=0"});
  EXPECT_EQ(own["tunables"], "glibc.malloc.check=0");
  auto off = Probe({"PIPESERVE_HUGE_PAGES=0"});
  EXPECT_EQ(off["tunables"], "");
  EXPECT_EQ(off["exit"], "0");
}

}  // namespace
}  // namespace pipeserve
