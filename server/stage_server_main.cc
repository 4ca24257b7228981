// pipeserve stage server: hosts pipeline stages loaded by the coordinator.
//
//   stage_server --port=9000 [--threads=2] [--port_file=PATH]
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <thread>
#include <iostream>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "server/serve.h"
#include "server/stage_service.h"

ABSL_FLAG(std::string, host, "0.0.0.0", "address to listen on");
ABSL_FLAG(int, port, 9000, "port (0: pick a free one)");
ABSL_FLAG(std::string, port_file, "", "write the chosen port here once serving");
ABSL_FLAG(int, threads, 1, "default GEMM threads per stage");
ABSL_FLAG(int, queue_capacity, 8, "frames waiting per stage before backpressure");
ABSL_FLAG(int, parent_pid, 0, "exit when this process is gone (set by the local launcher)");

int main(int argc, char** argv) {
  pipeserve::BlockShutdownSignals();
  absl::ParseCommandLine(argc, argv);
  pipeserve::StageServiceOptions options;
  options.default_threads = absl::GetFlag(FLAGS_threads);
  options.queue_capacity = absl::GetFlag(FLAGS_queue_capacity);
  pipeserve::StageServiceImpl service(options);
  if (int parent = absl::GetFlag(FLAGS_parent_pid); parent > 0) {
    // Started by a coordinator's local launcher: stop with it.
    std::thread([parent] {
      while (::getppid() == parent) std::this_thread::sleep_for(std::chrono::milliseconds(250));
      ::kill(::getpid(), SIGTERM);
    }).detach();
  }
  return pipeserve::Serve({&service}, absl::GetFlag(FLAGS_host), absl::GetFlag(FLAGS_port),
                          absl::GetFlag(FLAGS_port_file), "stage_server");
}
