#include "server/testing/proc_status.h"

#include <fstream>

namespace pipeserve {

int64_t ProcStatus(pid_t pid, const std::string& key) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string word;
  while (in >> word) {
    if (word == key + ":") {
      int64_t value = -1;
      in >> value;
      return value;
    }
    in.ignore(1 << 20, '\n');
  }
  return -1;
}

}  // namespace pipeserve
