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
#ifndef PIPESERVE_COMMON_SERVER_PROCESS_H_
#define PIPESERVE_COMMON_SERVER_PROCESS_H_

namespace pipeserve {

void StartServerProcess(char** argv);

}  // namespace pipeserve

#endif  // PIPESERVE_COMMON_SERVER_PROCESS_H_
