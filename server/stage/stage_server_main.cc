// pipeserve stage server: hosts pipeline stages loaded by the coordinator.
//
//   stage_server --port=9000 [--threads=2] [--port_file=PATH]
//                [--device=cpu|cuda|cuda:N|auto] [--precision=fp32|tf32|bf16]
//                [--cluster_ca=ca.crt --cluster_cert=stage.crt --cluster_key=stage.key]
//                [--cluster_token_file=FILE]
//
// With cluster certificates it serves mutual TLS and takes calls only from
// peers the cluster CA signed; without, it listens on loopback unless
// --allow_insecure.
#include <malloc.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <thread>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "runtime/backends.h"
#include "server/stage/stage_metrics.h"
#include "server/stage/stage_server_core.h"
#include "server/stage/stage_service.h"
#include "server/transport/call_gate.h"
#include "server/transport/channels.h"
#include "common/credentials.h"
#include "common/server_process.h"
#include "server/transport/metrics_http.h"
#include "server/transport/serve.h"

ABSL_FLAG(int, shutdown_grace_s, 25,
          "on SIGTERM: longest time to finish the frames queued here before exiting");
ABSL_FLAG(std::string, host, "",
          "address to listen on (default: 127.0.0.1, or 0.0.0.0 with --cluster_cert)");
ABSL_FLAG(int, port, 9000, "port (0: pick a free one)");
ABSL_FLAG(std::string, port_file, "", "write the chosen port here once serving");
ABSL_FLAG(bool, allow_insecure, false, "allow plaintext on a non-loopback --host (not advised)");
ABSL_FLAG(std::string, cluster_ca, "", "PEM: the cluster CA (client certificates must chain to it)");
ABSL_FLAG(std::string, cluster_cert, "", "PEM: this server's cluster certificate");
ABSL_FLAG(std::string, cluster_key, "", "PEM: its private key");
ABSL_FLAG(std::string, cluster_token_file, "",
          "file holding the cluster token every StageService call must carry");
ABSL_FLAG(std::string, coordinator_identity, "pipeserve coordinator",
          "with --cluster_cert: the certificate name (CN) of the coordinator, the one peer that may "
          "load, unload, list and inspect stages and take results");
ABSL_FLAG(std::string, stage_identity, "pipeserve stage",
          "with --cluster_cert: the certificate name (CN) of stage servers, which (besides the "
          "coordinator) may send frames");
ABSL_FLAG(int, max_message_mb, 2047,
          "largest message accepted, MiB: frames of one microbatch come as one message, so this "
          "must hold the largest a model sends (gRPC's own limit, 2047, by default; stages fail a "
          "microbatch larger than that themselves)");
ABSL_FLAG(int, threads, 1, "default GEMM threads per stage");
ABSL_FLAG(int, queue_capacity, 8, "frames waiting per stage before backpressure");
ABSL_FLAG(int, max_stages, 64, "stages held or being loaded at once");
ABSL_FLAG(int64_t, max_stage_mb, 0, "weights one stage may hold, MiB (0: no limit but memory)");
ABSL_FLAG(int, metrics_port, -1,
          "Prometheus GET /metrics port for the stages' metrics (0: pick one; -1: off)");
ABSL_FLAG(std::string, metrics_port_file, "", "write the metrics port here once listening");
ABSL_FLAG(int, parent_pid, 0, "exit when this process is gone (set by the local launcher)");
ABSL_FLAG(std::string, device, "auto",
          "compute backend: cpu, cuda (device 0), cuda:N, or auto (a GPU if there is one)");
ABSL_FLAG(std::string, precision, "fp32", "GPU GEMM precision: fp32, tf32 or bf16");
ABSL_FLAG(std::string, cuda_ops, "confirmed",
          "CUDA kernels to run: confirmed (those a GPU has passed, runtime/cuda/gpu_results/"
          "confirmed_kernels.txt) or unconfirmed (also those checked only in emulation)");

namespace {

int Fail(const std::string& what) {
  std::fprintf(stderr, "stage_server: %s\n", what.c_str());
  return 1;
}

pipeserve::StageServerOptions StageServerOptionsFromFlags() {
  pipeserve::StageServerOptions options;
  options.default_threads = absl::GetFlag(FLAGS_threads);
  options.queue_capacity = absl::GetFlag(FLAGS_queue_capacity);
  options.max_stages = absl::GetFlag(FLAGS_max_stages);
  options.max_stage_bytes =
      static_cast<uint64_t>(std::max<int64_t>(0, absl::GetFlag(FLAGS_max_stage_mb))) << 20;
  return options;
}

// The compute backend --device and --precision ask for, in `options` when
// it is not the CPU (whose backend is made per stage: each spec may set its
// threads); kInvalidArgument naming the flag.
absl::Status SetBackendFromFlags(pipeserve::StageServerOptions* options) {
  absl::StatusOr<pipeserve::Precision> precision =
      pipeserve::ParsePrecision(absl::GetFlag(FLAGS_precision));
  if (!precision.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("--precision: ", precision.status().ToString()));
  }
  absl::StatusOr<pipeserve::CudaOps> cuda_ops =
      pipeserve::ParseCudaOps(absl::GetFlag(FLAGS_cuda_ops));
  if (!cuda_ops.ok()) return cuda_ops.status();
  pipeserve::BackendOptions backend_options;
  backend_options.threads = options->default_threads;
  backend_options.precision = *precision;
  backend_options.cuda_ops = *cuda_ops;
  absl::StatusOr<std::unique_ptr<pipeserve::ComputeBackend>> backend =
      pipeserve::MakeBackend(absl::GetFlag(FLAGS_device), backend_options);
  if (!backend.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("--device=", absl::GetFlag(FLAGS_device), ": ",
                                                   backend.status().ToString()));
  }
  if ((*backend)->Name() != "cpu") options->backend = *std::move(backend);
  return absl::OkStatus();
}

// Started by a coordinator's local launcher: stop (SIGTERM) when it goes.
void StopWithParent(int parent) {
  std::thread([parent] {
    while (::getppid() == parent) std::this_thread::sleep_for(std::chrono::milliseconds(250));
    ::kill(::getpid(), SIGTERM);
  }).detach();
}

// How the server listens and shuts down (all but `drain`).
pipeserve::ServeOptions ServeOptionsFromFlags(std::shared_ptr<grpc::ServerCredentials> credentials,
                                              const pipeserve::CallGate* gate) {
  pipeserve::ServeOptions serve;
  serve.name = "stage_server";
  serve.gate = gate;
  serve.max_receive_bytes = std::clamp(absl::GetFlag(FLAGS_max_message_mb), 1, 2047) * (1 << 20);
  serve.host = absl::GetFlag(FLAGS_host);
  serve.port = absl::GetFlag(FLAGS_port);
  serve.port_file = absl::GetFlag(FLAGS_port_file);
  serve.credentials = std::move(credentials);
  serve.allow_insecure = absl::GetFlag(FLAGS_allow_insecure);
  serve.configure = [](grpc::ServerBuilder& b) {
    pipeserve::SetBulkTransferArgs([&](const char* k, int v) { b.AddChannelArgument(k, v); });
    pipeserve::SetKeepaliveServerArgs([&](const char* k, int v) { b.AddChannelArgument(k, v); });
  };
  serve.grace = absl::Seconds(std::max(0, absl::GetFlag(FLAGS_shutdown_grace_s)));
  serve.cancel_after_drain = true;  // incoming streams never end by themselves
  return serve;
}

// Who may call, checked on a call's headers before its body is read: the
// cluster token, and with certificates the peer's name (control calls and
// results: the coordinator only; frames: it or a stage server).
pipeserve::CallGate ClusterGate(const std::string& token) {
  const std::string coordinator = absl::GetFlag(FLAGS_coordinator_identity);
  pipeserve::CallGate gate(pipeserve::CallGate::ClusterMember(token, {coordinator}));
  gate.Add("/grpc.health.v1.Health/", pipeserve::CallGate::Anyone());
  gate.Add("/pipeserve.StageService/Process",
           pipeserve::CallGate::ClusterMember(token,
                                              {coordinator, absl::GetFlag(FLAGS_stage_identity)}));
  return gate;
}

}  // namespace

int main(int argc, char** argv) {
  // A step's buffers (a few MiB each for a long prompt) come and go every
  // step: they come from the heap, and up to 64 MiB of its free top stays
  // between steps, rather than being mapped and page-faulted afresh each
  // time (the health thread gives back what stays free: serve.cc).
  mallopt(M_MMAP_THRESHOLD, 16 << 20);
  mallopt(M_TRIM_THRESHOLD, 64 << 20);
  pipeserve::StartServerProcess(argv);
  pipeserve::BlockShutdownSignals();
  absl::ParseCommandLine(argc, argv);

  pipeserve::ClusterOptions cluster;
  cluster.tls = {absl::GetFlag(FLAGS_cluster_cert), absl::GetFlag(FLAGS_cluster_key),
                 absl::GetFlag(FLAGS_cluster_ca)};
  if (std::string f = absl::GetFlag(FLAGS_cluster_token_file); !f.empty()) {
    absl::StatusOr<std::string> token = pipeserve::ReadSecretFile(f);
    if (!token.ok()) return Fail(std::string(token.status().message()));
    cluster.token = std::string(absl::StripAsciiWhitespace(*token));
  }
  std::shared_ptr<grpc::ServerCredentials> credentials;
  if (cluster.tls.enabled()) {
    auto creds = pipeserve::MakeServerCredentials(cluster.tls, /*require_client_cert=*/true);
    if (!creds.ok()) return Fail(absl::StrCat("--cluster_*: ", creds.status().message()));
    credentials = *creds;
  }
  auto channels = pipeserve::StageChannels::Create(cluster);
  if (!channels.ok()) return Fail(absl::StrCat("--cluster_*: ", channels.status().message()));

  pipeserve::StageServerOptions options = StageServerOptionsFromFlags();
  if (absl::Status s = SetBackendFromFlags(&options); !s.ok()) return Fail(std::string(s.message()));

  pipeserve::GrpcDialer dialer(*channels, /*send_capacity=*/4);
  pipeserve::StageServerCore core(options, &dialer);
  pipeserve::StageServiceImpl service(&core, cluster.token);
  if (int parent = absl::GetFlag(FLAGS_parent_pid); parent > 0) StopWithParent(parent);
  pipeserve::MetricsHttpServer metrics_http([&core] { return pipeserve::RenderStageMetrics(core); });
  if (int port = absl::GetFlag(FLAGS_metrics_port); port >= 0) {
    absl::StatusOr<std::string> host = pipeserve::ListenHost(
        absl::GetFlag(FLAGS_host), credentials != nullptr, absl::GetFlag(FLAGS_allow_insecure));
    if (!host.ok()) return Fail(std::string(host.status().message()));
    absl::Status s = metrics_http.Start(*host, port, absl::GetFlag(FLAGS_metrics_port_file));
    if (!s.ok()) return Fail(std::string(s.message()));
  }
  const pipeserve::CallGate gate = ClusterGate(cluster.token);
  pipeserve::ServeOptions serve = ServeOptionsFromFlags(credentials, &gate);
  serve.drain = [&core](absl::Time deadline) {
    // Finish the frames already here; the streams into this server are
    // then cancelled, and the coordinator runs what did not get through
    // again on the stage's next server.
    if (!core.FinishQueued(deadline)) {
      std::fprintf(stderr, "stage_server: grace period over with frames still queued\n");
    }
  };
  const int rc = pipeserve::Serve({&service}, serve);
  // Stopping the stages joins their workers; one inside a long kernel is
  // not waited for past the grace period.
  pipeserve::ExitWithin(absl::Seconds(2), "stage_server");
  return rc;
}
