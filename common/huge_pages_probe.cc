// For huge_pages_test: starts as the binaries do, then prints its pid,
// GLIBC_TUNABLES and how much of a touched 64 MiB buffer sits on huge
// pages (AnonHugePages of /proc/self/smaps_rollup, KiB).
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>

#include "common/huge_pages.h"

int main(int argc, char** argv) {
  pipeserve::ReexecWithHugePages(argv);
  const size_t bytes = size_t{64} << 20;
  char* p = static_cast<char*>(std::malloc(bytes));
  std::memset(p, 1, bytes);
  long huge_kb = 0;
  std::ifstream f("/proc/self/smaps_rollup");
  for (std::string line; std::getline(f, line);) {
    if (line.rfind("AnonHugePages:", 0) == 0) huge_kb = std::atol(line.c_str() + 14);
  }
  const char* t = std::getenv("GLIBC_TUNABLES");
#if defined(__SANITIZE_ADDRESS__)
  const int own_malloc = 1;  // ASan's allocator, which glibc's tunables do not reach
#else
  const int own_malloc = 0;
#endif
  std::printf("pid %d\ntunables %s\nhuge_kb %ld\nbyte %d\nsanitizer_malloc %d\n",
              static_cast<int>(getpid()), t == nullptr ? "" : t, huge_kb, p[bytes - 1],
              own_malloc);
  std::free(p);
  return 0;
}
