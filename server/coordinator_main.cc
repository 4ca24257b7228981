// pipeserve coordinator: model upload, partitioning, stage placement and
// the KServe v2 inference API.
//
//   coordinator                                   # port 8001, ./model_repository, local launcher
//   coordinator --launcher=static --stage_servers=stage-0.stages:9000,stage-1.stages:9000
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <thread>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_split.h"
#include "server/coordinator_core.h"
#include "server/kserve_service.h"
#include "server/metrics.h"
#include "server/model_service.h"
#include "server/serve.h"

ABSL_FLAG(std::string, host, "0.0.0.0", "address to listen on");
ABSL_FLAG(int, port, 8001, "gRPC port (0: pick a free one)");
ABSL_FLAG(std::string, port_file, "", "write the chosen port here once serving");
ABSL_FLAG(std::string, repository, "model_repository", "folder of uploaded models");
ABSL_FLAG(std::string, launcher, "local", "local: start stage servers here; static: use --stage_servers");
ABSL_FLAG(std::string, stage_servers, "", "comma-separated host:port list (static launcher)");
ABSL_FLAG(std::string, stage_server_binary, "", "stage_server path (default: beside this binary)");
ABSL_FLAG(int, cores, 0, "cores the local launcher divides between stages (0: all)");
ABSL_FLAG(int, gpus, -1, "local launcher: one stage server per GPU (-1: all NVIDIA GPUs, 0: CPU only)");
ABSL_FLAG(int, microbatches, 4, "default microbatches per request");
ABSL_FLAG(int, max_message_mb, 256,
          "largest message accepted, MiB (at least 2: uploads come in 1 MiB chunks)");
ABSL_FLAG(int, default_timeout_s, 60, "deadline for requests that carry none");
ABSL_FLAG(int, metrics_port, 8002, "Prometheus GET /metrics port (0: pick one; -1: off)");
ABSL_FLAG(std::string, metrics_port_file, "", "write the metrics port here once listening");

int main(int argc, char** argv) {
  pipeserve::BlockShutdownSignals();
  absl::ParseCommandLine(argc, argv);
  auto store = pipeserve::OpenFileModelStore(absl::GetFlag(FLAGS_repository));
  if (!store.ok()) {
    std::cerr << "coordinator: " << store.status().message() << "\n";
    return 1;
  }
  std::unique_ptr<pipeserve::Launcher> launcher;
  if (absl::GetFlag(FLAGS_launcher) == "static") {
    std::vector<std::string> servers =
        absl::StrSplit(absl::GetFlag(FLAGS_stage_servers), ',', absl::SkipEmpty());
    launcher = pipeserve::MakeStaticLauncher(servers);
  } else if (absl::GetFlag(FLAGS_launcher) == "local") {
    pipeserve::LocalLauncherOptions lo;
    lo.binary = absl::GetFlag(FLAGS_stage_server_binary);
    if (lo.binary.empty()) {
      lo.binary = (std::filesystem::read_symlink("/proc/self/exe").parent_path() / "stage_server").string();
    }
    lo.work_dir = std::filesystem::temp_directory_path().string();
    lo.cores = absl::GetFlag(FLAGS_cores);
    lo.gpus = absl::GetFlag(FLAGS_gpus);
    launcher = pipeserve::MakeLocalLauncher(lo);
  } else {
    std::cerr << "coordinator: --launcher must be local or static\n";
    return 2;
  }
  pipeserve::CoordinatorOptions options;
  options.default_microbatches = absl::GetFlag(FLAGS_microbatches);
  options.default_timeout = absl::Seconds(absl::GetFlag(FLAGS_default_timeout_s));
  pipeserve::Coordinator coordinator(options, *std::move(store), std::move(launcher));
  pipeserve::Metrics metrics;
  pipeserve::MetricsHttpServer metrics_http(&metrics, [&] { return coordinator.ListModels(); });
  if (int port = absl::GetFlag(FLAGS_metrics_port); port >= 0) {
    absl::Status s = metrics_http.Start(absl::GetFlag(FLAGS_host), port);
    if (!s.ok()) {
      std::cerr << "coordinator: " << s.message() << "\n";
      return 1;
    }
    if (std::string f = absl::GetFlag(FLAGS_metrics_port_file); !f.empty()) {
      std::ofstream(f + ".tmp") << metrics_http.port() << "\n";
      std::rename((f + ".tmp").c_str(), f.c_str());
    }
  }
  pipeserve::KServeService kserve(&coordinator, &metrics);
  pipeserve::ModelServiceImpl models(&coordinator);
  std::thread loader;
  int rc = pipeserve::Serve(
      {&kserve, &models}, absl::GetFlag(FLAGS_host), absl::GetFlag(FLAGS_port),
      absl::GetFlag(FLAGS_port_file), "coordinator",
      [&](grpc::Server*) { loader = std::thread([&] { coordinator.LoadStoredModels(); }); },
      std::max(2, absl::GetFlag(FLAGS_max_message_mb)) * (1 << 20));
  if (loader.joinable()) loader.join();
  return rc;
}
