// A number from /proc/<pid>/status, for tests that watch a process's
// memory or threads.
//
//   int64_t peak_kib = ProcStatus(pid, "VmHWM");    // KiB
//   int64_t threads = ProcStatus(::getpid(), "Threads");
#ifndef PIPESERVE_SERVER_TESTING_PROC_STATUS_H_
#define PIPESERVE_SERVER_TESTING_PROC_STATUS_H_

#include <sys/types.h>

#include <cstdint>
#include <string>

namespace pipeserve {

// The value of line `key` (without its colon), or -1 if there is none.
int64_t ProcStatus(pid_t pid, const std::string& key);

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_TESTING_PROC_STATUS_H_
