// How a long-running pipeserve process starts: the coordinator, the stage
// servers, and the benchmark that measures them as they run.
//
//   int main(int argc, char** argv) {
//     pipeserve::StartServerProcess(argv);  // first thing
//
// It puts large buffers on transparent huge pages (ReexecWithHugePages in
// common/huge_pages.h, which may start the binary again, once) and turns
// off Abseil's lock-graph deadlock detector: Debian's build leaves it on,
// and it takes one global lock on every Mutex lock (about 5% of served
// throughput in bench/serving). Tests keep the detector.
//
// At the end of main, once serving has stopped, ExitWithin bounds the
// clean-up that follows (destructors joining worker threads, one of which
// may be inside a long kernel): after `limit` the process leaves with
// exit code 3, whatever is still running, so a shutdown that had to be cut
// short never reports success.
#ifndef PIPESERVE_COMMON_SERVER_PROCESS_H_
#define PIPESERVE_COMMON_SERVER_PROCESS_H_

#include "absl/time/time.h"

namespace pipeserve {

void StartServerProcess(char** argv);

// Ends the process (exit code 3) after `limit` unless it has ended by
// then. `name` is for the log line that says so.
inline constexpr int kCutShortExitCode = 3;
void ExitWithin(absl::Duration limit, const char* name);

}  // namespace pipeserve

#endif  // PIPESERVE_COMMON_SERVER_PROCESS_H_
