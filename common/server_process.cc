#include "common/server_process.h"

#include <cstdio>
#include <cstdlib>
#include <thread>

#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "common/huge_pages.h"

namespace pipeserve {

void StartServerProcess(char** argv) {
  ReexecWithHugePages(argv);
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
}

void ExitWithin(absl::Duration limit, const char* name) {
  std::thread([limit, name] {
    absl::SleepFor(limit);
    std::fprintf(stderr, "%s: still stopping after %s (a kernel still running?); leaving now\n",
                 name, absl::FormatDuration(limit).c_str());
    std::fflush(stderr);
    std::_Exit(kCutShortExitCode);
  }).detach();
}

}  // namespace pipeserve
