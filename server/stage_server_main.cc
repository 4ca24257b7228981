// pipeserve stage server: hosts pipeline stages loaded by the coordinator.
//
//   stage_server --port=9000 [--threads=2] [--port_file=PATH]
//                [--device=cpu|cuda|cuda:N|auto] [--precision=fp32|tf32|bf16]
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <thread>
#include <iostream>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "runtime/backends.h"
#include "server/serve.h"
#include "server/stage_service.h"

ABSL_FLAG(std::string, host, "0.0.0.0", "address to listen on");
ABSL_FLAG(int, port, 9000, "port (0: pick a free one)");
ABSL_FLAG(std::string, port_file, "", "write the chosen port here once serving");
ABSL_FLAG(int, threads, 1, "default GEMM threads per stage");
ABSL_FLAG(int, queue_capacity, 8, "frames waiting per stage before backpressure");
ABSL_FLAG(int, parent_pid, 0, "exit when this process is gone (set by the local launcher)");
ABSL_FLAG(std::string, device, "auto",
          "compute backend: cpu, cuda (device 0), cuda:N, or auto (a GPU if there is one)");
ABSL_FLAG(std::string, precision, "fp32", "GPU GEMM precision: fp32, tf32 or bf16");

int main(int argc, char** argv) {
  pipeserve::BlockShutdownSignals();
  absl::ParseCommandLine(argc, argv);
  pipeserve::StageServiceOptions options;
  options.default_threads = absl::GetFlag(FLAGS_threads);
  options.queue_capacity = absl::GetFlag(FLAGS_queue_capacity);
  absl::StatusOr<pipeserve::Precision> precision =
      pipeserve::ParsePrecision(absl::GetFlag(FLAGS_precision));
  if (!precision.ok()) {
    std::fprintf(stderr, "stage_server: --precision: %s\n", precision.status().ToString().c_str());
    return 1;
  }
  pipeserve::BackendOptions backend_options;
  backend_options.threads = options.default_threads;
  backend_options.precision = *precision;
  absl::StatusOr<std::unique_ptr<pipeserve::ComputeBackend>> backend =
      pipeserve::MakeBackend(absl::GetFlag(FLAGS_device), backend_options);
  if (!backend.ok()) {
    std::fprintf(stderr, "stage_server: --device=%s: %s\n", absl::GetFlag(FLAGS_device).c_str(),
                 backend.status().ToString().c_str());
    return 1;
  }
  // The CPU backend is made per stage (each spec may set its threads).
  if ((*backend)->Name() != "cpu") options.backend = *std::move(backend);
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
