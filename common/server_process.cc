#include "common/server_process.h"

#include "absl/synchronization/mutex.h"
#include "common/huge_pages.h"

namespace pipeserve {

void StartServerProcess(char** argv) {
  ReexecWithHugePages(argv);
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
}

}  // namespace pipeserve
