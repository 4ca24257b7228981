#include "common/huge_pages.h"

#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>

namespace pipeserve {
namespace {

constexpr char kTunable[] = "glibc.malloc.hugetlb=1";

bool KernelAllowsHugePages() {
  std::ifstream f("/sys/kernel/mm/transparent_hugepage/enabled");
  std::string mode;
  if (!std::getline(f, mode)) return false;
  return mode.find("[never]") == std::string::npos;
}

}  // namespace

bool HugePagesRequested() {
  const char* t = std::getenv("GLIBC_TUNABLES");
  return t != nullptr && std::strstr(t, kTunable) != nullptr;
}

void ReexecWithHugePages(char** argv) {
  if (std::getenv("GLIBC_TUNABLES") != nullptr) return;
  const char* opt = std::getenv("PIPESERVE_HUGE_PAGES");
  if (opt != nullptr && std::strcmp(opt, "0") == 0) return;
  if (!KernelAllowsHugePages()) return;
  if (::setenv("GLIBC_TUNABLES", kTunable, 1) != 0) return;
  ::execv("/proc/self/exe", argv);
  // The exec failed: carry on as we are (the variable is then only
  // passed on to children).
}

}  // namespace pipeserve
