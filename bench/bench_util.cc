#include "bench/bench_util.h"

#include <cstdio>

#include "absl/strings/numbers.h"

namespace pipeserve {

double TorchMedianMs(const std::string& cmd) {
  FILE* p = popen(cmd.c_str(), "r");
  if (p == nullptr) return -1;
  char buf[256] = {};
  std::string out;
  while (fgets(buf, sizeof buf, p)) out += buf;
  pclose(p);
  size_t at = out.find("median_ms=");
  double v = -1;
  if (at != std::string::npos) {
    std::string num = out.substr(at + 10, out.find(' ', at) - at - 10);
    if (!absl::SimpleAtod(num, &v)) v = -1;
  }
  return v;
}


}  // namespace pipeserve
