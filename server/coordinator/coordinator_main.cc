// pipeserve coordinator: model upload, partitioning, stage placement and
// the KServe v2 inference API.
//
//   coordinator                                   # loopback :8001, ./model_repository, local launcher
//   coordinator --tls_cert=server.crt --tls_key=server.key --auth_tokens=tokens
//       --cluster_ca=ca.crt --cluster_cert=coordinator.crt --cluster_key=coordinator.key
//       --launcher=static --stage_servers=stage-0.stages:9000,stage-1.stages:9000
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <thread>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "runtime/backends.h"
#include "common/status_macros.h"
#include "server/coordinator/core.h"
#include "server/coordinator/dns_launcher.h"
#include "server/coordinator/generation.h"
#include "server/coordinator/generation_service.h"
#include "server/coordinator/kserve_core.h"
#include "server/coordinator/kserve_rest.h"
#include "server/coordinator/openai_rest.h"
#include "server/coordinator/grpc_stage_client.h"
#include "server/coordinator/kserve_service.h"
#include "server/coordinator/metrics.h"
#include "server/coordinator/model_service.h"
#include "server/transport/auth.h"
#include "server/transport/call_gate.h"
#include "server/transport/channels.h"
#include "common/credentials.h"
#include "common/server_process.h"
#include "server/transport/http_server.h"
#include "server/transport/listen.h"
#include "server/transport/metrics_http.h"
#include "server/transport/serve.h"

ABSL_FLAG(std::string, host, "",
          "address to listen on (default: 127.0.0.1, or 0.0.0.0 with --tls_cert)");
ABSL_FLAG(int, port, 8001, "gRPC port (0: pick a free one)");
ABSL_FLAG(std::string, port_file, "", "write the chosen port here once serving");
ABSL_FLAG(bool, allow_insecure, false, "allow plaintext on a non-loopback --host (not advised)");
ABSL_FLAG(std::string, tls_cert, "", "PEM: certificate clients see (turns TLS on)");
ABSL_FLAG(std::string, tls_key, "", "PEM: its private key");
ABSL_FLAG(std::string, auth_tokens, "",
          "token file (`<scopes> <token>` per line, scopes infer and/or admin); "
          "without it any client may call anything");
ABSL_FLAG(std::string, cluster_ca, "", "PEM: the cluster CA stage servers are checked against");
ABSL_FLAG(std::string, cluster_cert, "", "PEM: the coordinator's cluster (client) certificate");
ABSL_FLAG(std::string, cluster_key, "", "PEM: its private key");
ABSL_FLAG(std::string, cluster_token_file, "",
          "cluster token for stage servers (the local launcher makes one when unset)");
ABSL_FLAG(std::string, repository, "model_repository", "folder of uploaded models");
ABSL_FLAG(std::string, launcher, "local",
          "local: start stage servers here; static: use --stage_servers; dns: the servers "
          "--stage_dns lists");
ABSL_FLAG(std::string, stage_servers, "", "comma-separated host:port list (static launcher)");
ABSL_FLAG(std::string, stage_dns, "",
          "dns launcher: the SRV name listing the stage servers, looked up again for every "
          "deployment (a Kubernetes headless Service's: "
          "_grpc._tcp.pipeserve-stages.NAMESPACE.svc.cluster.local)");
ABSL_FLAG(std::string, stage_dns_server, "",
          "dns launcher: ask this DNS server (IPv4[:port]) instead of /etc/resolv.conf's");
ABSL_FLAG(std::string, stage_server_binary, "",
          "stage_server path (default: beside this binary, or ../stage/stage_server)");
ABSL_FLAG(int, cores, 0, "cores the local launcher divides between stages (0: all)");
ABSL_FLAG(int, gpus, -1, "local launcher: one stage server per GPU (-1: all NVIDIA GPUs, 0: CPU only)");
ABSL_FLAG(int, max_local_servers, 32, "most stage servers the local launcher starts");
ABSL_FLAG(int, microbatches, 4, "default microbatches per request");
ABSL_FLAG(int, replicas, 1,
          "default replicas of every stage: a model of S stages runs on R x S stage servers and "
          "keeps serving, without waiting, when one dies");
ABSL_FLAG(int, max_microbatches, 1024, "most microbatches an upload may ask for");
ABSL_FLAG(int, max_stages, 64, "most stages one model may be cut into");
ABSL_FLAG(int, max_message_mb, 256,
          "largest message accepted, MiB (at least 2: uploads come in 1 MiB chunks)");
ABSL_FLAG(int, max_upload_mb, 16384, "largest model upload, MiB");
ABSL_FLAG(int, max_call_memory_mb, 2048,
          "memory all calls may hold at once, their messages included, MiB (gRPC's resource quota; "
          "0: no bound)");
ABSL_FLAG(int, max_concurrent_uploads, 2, "uploads in progress at once");
ABSL_FLAG(int, upload_idle_timeout_s, 30, "an upload sending nothing this long is cancelled");
ABSL_FLAG(int, max_threads, 256, "threads for RPC handlers; calls beyond get RESOURCE_EXHAUSTED");
ABSL_FLAG(int, stream_threads, 16, "threads running ModelStreamInfer requests, all streams together");
ABSL_FLAG(int, max_streams, -1,
          "ModelStreamInfer streams open at once, all clients together (each holds a handler "
          "thread; -1: a quarter of --max_threads)");
ABSL_FLAG(int, max_streams_per_client, 16, "ModelStreamInfer streams open at once per connection");
ABSL_FLAG(int, stream_idle_timeout_s, 60,
          "a ModelStreamInfer stream with nothing in flight that sends nothing this long is ended");
ABSL_FLAG(int, max_timeout_s, 3600, "the longest deadline a client may give a request");
ABSL_FLAG(int, default_timeout_s, 60, "deadline for requests that carry none");
ABSL_FLAG(int, generation_timeout_s, 0,
          "deadline for generations that carry none (HTTP's never do); 0: none");
ABSL_FLAG(double, kv_cache_mb, 256,
          "KV cache (MiB, fractions too) each stage server holds for a model exported for "
          "generation");
ABSL_FLAG(int, max_generating, 256, "sequences one model generates at once (holding KV cache)");
ABSL_FLAG(int, max_generation_waiting, 256,
          "generation requests one model queues for KV cache; beyond, RESOURCE_EXHAUSTED at once");
ABSL_FLAG(bool, allow_generation_infer, false,
          "let ModelInfer run a generation model's cache-aware graph with client-given cache "
          "metadata (it could overwrite the KV cache of generations in flight; for tests)");
ABSL_FLAG(int, generation_steps_in_flight, 0,
          "generation steps of one model running at once (0: its stages + 1, every stage busy "
          "when each has its own machine; 1 where the local launcher's stages share this "
          "machine's cores, each stage then using them all, so more than 1 there divides "
          "the cores between steps)");
ABSL_FLAG(int, generation_step_tokens, 256,
          "most tokens one generation step carries: longer prompts are prefilled in chunks");
ABSL_FLAG(int64_t, max_request_rows, int64_t{1} << 24,
          "most batch rows one request may carry; more is INVALID_ARGUMENT (0: no limit)");
ABSL_FLAG(int, max_queued_requests, 128,
          "requests one model may have queued or running; beyond, RESOURCE_EXHAUSTED at once "
          "(0: no limit)");
ABSL_FLAG(int, shutdown_grace_s, 25,
          "on SIGTERM: longest time requests in flight get to finish before the coordinator exits");
ABSL_FLAG(int, max_batch_rows, 64,
          "dynamic batching: while a model is busy, concurrent requests of fewer rows are merged "
          "into requests of up to this many rows (0: never)");
ABSL_FLAG(int, max_queue_delay_us, 0,
          "dynamic batching: how long a request waits for others to merge with (0: only while "
          "the model is busy)");
ABSL_FLAG(int, max_batches_in_flight, 0,
          "dynamic batching: merged requests of one model running at once (0: its stage servers)");
ABSL_FLAG(int, health_interval_ms, 500,
          "how often every model's stage servers are checked: a stage server that dies in the "
          "middle of a pipeline is found within this (the first and last stage's at once)");
ABSL_FLAG(int, drain_timeout_s, 60,
          "longest a replaced model version may take to finish its requests in flight");
ABSL_FLAG(std::string, calibration_device, "cpu",
          "where node times are measured at upload to balance automatic cuts (--num_stages on a "
          "model without cut points): cpu, cuda, cuda:N, auto; empty: balance by estimate");
ABSL_FLAG(int, calibration_rows, 16, "microbatch rows node times are measured at");
ABSL_FLAG(double, link_gb_per_s, 1.0,
          "link bandwidth between stages assumed by measured balancing, GB/s (an upload may say)");
ABSL_FLAG(int, metrics_port, 8002, "Prometheus GET /metrics port (0: pick one; -1: off)");
ABSL_FLAG(int, http_port, 8000,
          "HTTP port: KServe v2 REST (health, metadata, JSON inference, Triton's generate) and "
          "OpenAI's /v1 completions (0: pick one; -1: off): "
          "HTTPS with --tls_cert/--tls_key; on --host with --auth_tokens (Authorization: "
          "Bearer, as on gRPC), else on 127.0.0.1 only");
ABSL_FLAG(std::string, http_port_file, "", "write the HTTP port here once listening");
ABSL_FLAG(std::string, metrics_port_file, "", "write the metrics port here once listening");

namespace {

int Fail(const std::string& what) {
  std::cerr << "coordinator: " << what << "\n";
  return 1;
}

// A folder only this user can enter, for the local launcher's files.
std::string PrivateWorkDir() {
  std::string tmpl = (std::filesystem::temp_directory_path() / "pipeserve-XXXXXX").string();
  if (::mkdtemp(tmpl.data()) == nullptr) return std::filesystem::temp_directory_path().string();
  return tmpl;
}

std::string DefaultStageServerBinary() {
  std::filesystem::path self = std::filesystem::read_symlink("/proc/self/exe").parent_path();
  for (const auto& candidate : {self / "stage_server", self.parent_path() / "stage" / "stage_server"}) {
    if (std::filesystem::exists(candidate)) return candidate.string();
  }
  return (self / "stage_server").string();
}

// TLS towards clients (--tls_cert/--tls_key) and the API tokens
// (--auth_tokens); either may be null.
struct ClientAuth {
  std::shared_ptr<grpc::ServerCredentials> credentials;
  std::unique_ptr<pipeserve::TokenSet> tokens;
};

absl::StatusOr<ClientAuth> ClientAuthFromFlags() {
  ClientAuth auth;
  pipeserve::TlsFiles serving{absl::GetFlag(FLAGS_tls_cert), absl::GetFlag(FLAGS_tls_key), ""};
  if (!serving.cert.empty() || !serving.key.empty()) {
    auto creds = pipeserve::MakeServerCredentials(serving, /*require_client_cert=*/false);
    if (!creds.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--tls_cert/--tls_key: ", creds.status().message()));
    }
    auth.credentials = *creds;
  }
  if (std::string f = absl::GetFlag(FLAGS_auth_tokens); !f.empty()) {
    auto set = pipeserve::TokenSet::Load(f);
    if (!set.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("--auth_tokens: ", set.status().message()));
    }
    auth.tokens = std::make_unique<pipeserve::TokenSet>(*std::move(set));
  }
  return auth;
}

// A fresh random cluster token in `dir`/cluster-token (mode 0600): its path.
absl::StatusOr<std::string> WriteClusterToken(const std::string& dir) {
  absl::StatusOr<std::string> token = pipeserve::RandomToken();
  if (!token.ok()) return token.status();
  const std::string path = dir + "/cluster-token";
  std::ofstream(path) << *token << "\n";
  ::chmod(path.c_str(), 0600);
  return path;
}

// A folder removed, with all it holds, when this goes out of scope.
struct RemoveOnExit {
  std::string dir;
  ~RemoveOnExit() {
    std::error_code ec;
    if (!dir.empty()) std::filesystem::remove_all(dir, ec);
  }
};

// How the coordinator reaches its stage servers (--cluster_*), and the
// file of the cluster token they are started with (empty: none).
struct Cluster {
  pipeserve::ClusterOptions options;
  std::string token_file;
};

// A local launcher without --cluster_token_file makes one in `work_dir`:
// the stage servers this coordinator starts take calls only from it.
absl::StatusOr<Cluster> ClusterFromFlags(bool local, const std::string& work_dir) {
  Cluster cluster;
  cluster.options.tls = {absl::GetFlag(FLAGS_cluster_cert), absl::GetFlag(FLAGS_cluster_key),
                         absl::GetFlag(FLAGS_cluster_ca)};
  cluster.token_file = absl::GetFlag(FLAGS_cluster_token_file);
  if (cluster.token_file.empty() && local) {
    absl::StatusOr<std::string> made = WriteClusterToken(work_dir);
    if (!made.ok()) return made.status();
    cluster.token_file = *made;
  }
  if (!cluster.token_file.empty()) {
    absl::StatusOr<std::string> token = pipeserve::ReadSecretFile(cluster.token_file);
    if (!token.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--cluster_token_file: ", token.status().message()));
    }
    cluster.options.token = std::string(absl::StripAsciiWhitespace(*token));
  }
  return cluster;
}

// The launcher --launcher names (null for none of local, static, dns); a
// local one hands its servers `token_file` and the cluster certificates.
std::unique_ptr<pipeserve::Launcher> LauncherFromFlags(const std::string& work_dir,
                                                       const Cluster& cluster) {
  if (absl::GetFlag(FLAGS_launcher) == "static") {
    std::vector<std::string> servers =
        absl::StrSplit(absl::GetFlag(FLAGS_stage_servers), ',', absl::SkipEmpty());
    return pipeserve::MakeStaticLauncher(servers);
  }
  if (absl::GetFlag(FLAGS_launcher) == "dns" && !absl::GetFlag(FLAGS_stage_dns).empty()) {
    return pipeserve::MakeDnsLauncher(
        {absl::GetFlag(FLAGS_stage_dns),
         pipeserve::MakeSystemSrvResolver(absl::GetFlag(FLAGS_stage_dns_server))});
  }
  if (absl::GetFlag(FLAGS_launcher) != "local") return nullptr;
  pipeserve::LocalLauncherOptions lo;
  lo.binary = absl::GetFlag(FLAGS_stage_server_binary);
  if (lo.binary.empty()) lo.binary = DefaultStageServerBinary();
  lo.work_dir = work_dir;
  lo.cores = absl::GetFlag(FLAGS_cores);
  lo.gpus = absl::GetFlag(FLAGS_gpus);
  lo.max_servers = absl::GetFlag(FLAGS_max_local_servers);
  if (!cluster.token_file.empty()) {
    lo.extra_args.push_back("--cluster_token_file=" + cluster.token_file);
  }
  if (const pipeserve::TlsFiles& tls = cluster.options.tls; tls.enabled()) {
    lo.extra_args.push_back("--cluster_ca=" + tls.ca);
    lo.extra_args.push_back("--cluster_cert=" + tls.cert);
    lo.extra_args.push_back("--cluster_key=" + tls.key);
  }
  return pipeserve::MakeLocalLauncher(lo);
}

// The coordinator's options from its flags; kInvalidArgument naming a flag
// out of range. `local`: the stage servers are this process's children.
absl::StatusOr<pipeserve::CoordinatorOptions> CoordinatorOptionsFromFlags(bool local) {
  if (absl::GetFlag(FLAGS_replicas) < 1 ||
      absl::GetFlag(FLAGS_replicas) > pipeserve::kMaxReplicas) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--replicas ", absl::GetFlag(FLAGS_replicas), " is not in 1..", pipeserve::kMaxReplicas));
  }
  if (!(absl::GetFlag(FLAGS_link_gb_per_s) > 0)) {
    return absl::InvalidArgumentError("--link_gb_per_s must be > 0");
  }
  pipeserve::CoordinatorOptions options;
  options.default_microbatches = absl::GetFlag(FLAGS_microbatches);
  options.default_replicas = absl::GetFlag(FLAGS_replicas);
  options.batching.max_rows = std::max(0, absl::GetFlag(FLAGS_max_batch_rows));
  options.batching.max_queue_delay =
      absl::Microseconds(std::clamp(absl::GetFlag(FLAGS_max_queue_delay_us), 0, 10'000'000));
  options.batching.max_in_flight = std::max(0, absl::GetFlag(FLAGS_max_batches_in_flight));
  options.max_microbatches = absl::GetFlag(FLAGS_max_microbatches);
  options.max_stages = absl::GetFlag(FLAGS_max_stages);
  options.default_timeout = absl::Seconds(absl::GetFlag(FLAGS_default_timeout_s));
  if (const int s = absl::GetFlag(FLAGS_generation_timeout_s); s > 0) {
    options.generation_timeout = absl::Seconds(s);
  }
  options.max_request_rows = std::max<int64_t>(0, absl::GetFlag(FLAGS_max_request_rows));
  options.max_upload_bytes = uint64_t(std::max(1, absl::GetFlag(FLAGS_max_upload_mb))) << 20;
  options.max_concurrent_uploads = absl::GetFlag(FLAGS_max_concurrent_uploads);
  options.max_queued_requests = std::max(0, absl::GetFlag(FLAGS_max_queued_requests));
  options.drain_timeout = absl::Seconds(std::max(0, absl::GetFlag(FLAGS_drain_timeout_s)));
  options.health_interval =
      absl::Milliseconds(std::max(10, absl::GetFlag(FLAGS_health_interval_ms)));
  // Static stage servers outlive this process: a restarted coordinator
  // adopts what they hold instead of loading it again.
  options.keep_stages_on_exit = !local;
  options.calibration.rows = std::max(1, absl::GetFlag(FLAGS_calibration_rows));
  options.link_bytes_per_second = absl::GetFlag(FLAGS_link_gb_per_s) * 1e9;
  options.kv_cache_bytes =
      std::max<int64_t>(1, std::llround(absl::GetFlag(FLAGS_kv_cache_mb) * (1 << 20)));
  return options;
}

pipeserve::GeneratorOptions GeneratorOptionsFromFlags() {
  pipeserve::GeneratorOptions options;
  options.max_running = std::max(1, absl::GetFlag(FLAGS_max_generating));
  options.max_waiting = std::max(0, absl::GetFlag(FLAGS_max_generation_waiting));
  options.max_step_tokens = std::max(1, absl::GetFlag(FLAGS_generation_step_tokens));
  options.steps_in_flight = std::max(0, absl::GetFlag(FLAGS_generation_steps_in_flight));
  return options;
}

pipeserve::KServeOptions KServeOptionsFromFlags() {
  pipeserve::KServeOptions o;
  o.stream_threads = absl::GetFlag(FLAGS_stream_threads);
  o.max_streams = absl::GetFlag(FLAGS_max_streams) >= 0
                      ? absl::GetFlag(FLAGS_max_streams)
                      : std::max(1, absl::GetFlag(FLAGS_max_threads) / 4);
  o.max_streams_per_client = std::max(1, absl::GetFlag(FLAGS_max_streams_per_client));
  o.stream_idle_timeout = absl::Seconds(std::max(1, absl::GetFlag(FLAGS_stream_idle_timeout_s)));
  o.max_timeout = absl::Seconds(std::max(1, absl::GetFlag(FLAGS_max_timeout_s)));
  o.allow_generation_infer = absl::GetFlag(FLAGS_allow_generation_infer);
  return o;
}

// Who may call the client API, checked on a call's headers before its body
// is read: probes anyone, model management the admin scope, the rest the
// infer scope (everyone when `tokens` is null).
pipeserve::CallGate ClientGate(const pipeserve::TokenSet* tokens) {
  pipeserve::CallGate gate(pipeserve::CallGate::TokenScope(tokens, pipeserve::Scope::kInfer));
  for (const char* open : {"/grpc.health.v1.Health/", "/grpc.reflection.",
                           "/inference.GRPCInferenceService/ServerLive",
                           "/inference.GRPCInferenceService/ServerReady"}) {
    gate.Add(open, pipeserve::CallGate::Anyone());  // probes carry no tokens
  }
  gate.Add("/pipeserve.ModelService/",
           pipeserve::CallGate::TokenScope(tokens, pipeserve::Scope::kAdmin));
  return gate;
}

// Where upload-time node times are measured (--calibration_device); null
// when the flag is empty.
absl::StatusOr<std::unique_ptr<pipeserve::ComputeBackend>> CalibrationBackendFromFlags() {
  const std::string device = absl::GetFlag(FLAGS_calibration_device);
  if (device.empty()) return nullptr;
  absl::StatusOr<std::unique_ptr<pipeserve::ComputeBackend>> b =
      pipeserve::MakeBackend(device, pipeserve::BackendOptions());
  if (!b.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--calibration_device: ", b.status().message()));
  }
  return b;
}

// The Prometheus endpoint on --metrics_port (-1: none).
absl::Status StartMetrics(pipeserve::MetricsHttpServer& http, const std::string& host) {
  const int port = absl::GetFlag(FLAGS_metrics_port);
  if (port < 0) return absl::OkStatus();
  return http.Start(host, port, absl::GetFlag(FLAGS_metrics_port_file));
}

// The KServe v2 REST port: its core, its routes and, once started, its
// server (null while --http_port is off).
struct HttpFrontDoor {
  // `core` is the gRPC service's too.
  HttpFrontDoor(pipeserve::KServeCore* core, const pipeserve::TokenSet* tokens,
                pipeserve::Generation* generation)
      : rest(core, tokens, generation), openai(core, tokens, generation) {}
  // OpenAI's routes under /v1/, KServe's (and Triton's) elsewhere.
  pipeserve::HttpResponse Handle(const pipeserve::HttpRequest& r) {
    return absl::StartsWith(r.path, "/v1/") ? openai.Handle(r) : rest.Handle(r);
  }
  pipeserve::KServeRest rest;
  pipeserve::OpenAiRest openai;
  std::unique_ptr<pipeserve::HttpServer> server;
};

// Starts `door`'s server when --http_port is on: with TLS when gRPC has it
// (--tls_cert/--tls_key), on `host` as gRPC when tokens guard it, else on
// loopback only.
absl::Status StartHttp(HttpFrontDoor& door, bool tokens, const std::string& host) {
  const int port = absl::GetFlag(FLAGS_http_port);
  if (port < 0) return absl::OkStatus();
  pipeserve::HttpServerOptions options;
  if (!absl::GetFlag(FLAGS_tls_cert).empty()) {
    // Read already once by ClientAuthFromFlags, so these are known to read.
    ASSIGN_OR_RETURN(options.tls_cert_pem,
                     pipeserve::ReadSecretFile(absl::GetFlag(FLAGS_tls_cert)));
    ASSIGN_OR_RETURN(options.tls_key_pem, pipeserve::ReadSecretFile(absl::GetFlag(FLAGS_tls_key)));
  }
  HttpFrontDoor* d = &door;
  ASSIGN_OR_RETURN(door.server,
                   pipeserve::HttpServer::Start(
                       tokens ? host : "127.0.0.1", port, options,
                       [d](const pipeserve::HttpRequest& r) { return d->Handle(r); }));
  if (!absl::GetFlag(FLAGS_http_port_file).empty()) {
    pipeserve::WritePortFile(absl::GetFlag(FLAGS_http_port_file), door.server->port());
  }
  return absl::OkStatus();
}

// The client API server's options from the flags; the caller adds the
// gate and what ties it to the coordinator (serving, drain, on_started).
pipeserve::ServeOptions ServeOptionsFromFlags(
    const std::string& host, std::shared_ptr<grpc::ServerCredentials> credentials) {
  pipeserve::ServeOptions serve;
  serve.name = "coordinator";
  serve.host = host;
  serve.port = absl::GetFlag(FLAGS_port);
  serve.port_file = absl::GetFlag(FLAGS_port_file);
  serve.credentials = std::move(credentials);
  serve.max_call_memory_bytes = int64_t{std::max(0, absl::GetFlag(FLAGS_max_call_memory_mb))} << 20;
  serve.allow_insecure = absl::GetFlag(FLAGS_allow_insecure);
  serve.max_receive_bytes = std::clamp(absl::GetFlag(FLAGS_max_message_mb), 2, 2047) * (1 << 20);
  serve.max_threads = absl::GetFlag(FLAGS_max_threads);
  serve.grace = absl::Seconds(std::max(0, absl::GetFlag(FLAGS_shutdown_grace_s)));
  return serve;
}

// Ties the client API server to the coordinator: health follows the
// coordinator's, a shutdown lets requests in flight finish, and stored
// models load (on `loader`) once the port is open.
void TieToCoordinator(pipeserve::Coordinator& coordinator, const pipeserve::KServeService& kserve,
                      std::thread& loader, pipeserve::ServeOptions& serve) {
  // Not serving also while every handler thread is taken: calls then get
  // RESOURCE_EXHAUSTED, and health says so.
  serve.serving = [&coordinator, &kserve, max_threads = serve.max_threads] {
    return coordinator.Serving() && (max_threads <= 0 || kserve.active_calls() < max_threads - 1);
  };
  serve.drain = [&coordinator](absl::Time deadline) {
    // Requests in flight finish before the server stops: gRPC's own
    // shutdown cancels a synchronous call still running.
    if (!coordinator.WaitIdle(deadline)) {
      std::cerr << "coordinator: grace period over with requests still running\n";
    }
  };
  serve.on_started = [&coordinator, &loader](grpc::Server*) {
    loader = std::thread([&coordinator] { coordinator.LoadStoredModels(); });
  };
}

}  // namespace

// Serves `coordinator` until a shutdown signal: metrics, the HTTP port,
// and the gRPC services (KServe, models, generation) on `host`.
int ServeCoordinator(pipeserve::Coordinator& coordinator, const ClientAuth& client_auth,
                     const std::string& host) {
  const pipeserve::TokenSet* tokens = client_auth.tokens.get();
  pipeserve::Generation generation(&coordinator, GeneratorOptionsFromFlags());
  pipeserve::Metrics metrics;
  pipeserve::MetricsHttpServer metrics_http([&] {
    return metrics.Render(coordinator.ListModels()) +
           pipeserve::Metrics::RenderUploads(coordinator.uploads_in_progress()) +
           pipeserve::RenderGenerationMetrics(generation.Stats());
  });
  if (absl::Status s = StartMetrics(metrics_http, host); !s.ok()) {
    return Fail(std::string(s.message()));
  }
  const pipeserve::KServeOptions kserve_options = KServeOptionsFromFlags();
  pipeserve::KServeCore core(&coordinator, &metrics,
                             {kserve_options.max_timeout, kserve_options.allow_generation_infer});
  pipeserve::KServeService kserve(&core, tokens, kserve_options);
  HttpFrontDoor http(&core, tokens, &generation);
  if (absl::Status s = StartHttp(http, tokens != nullptr, host); !s.ok()) {
    return Fail(std::string(s.message()));
  }
  pipeserve::ModelServiceImpl models(&coordinator, tokens,
                                     absl::Seconds(absl::GetFlag(FLAGS_upload_idle_timeout_s)));
  pipeserve::GenerationServiceImpl generate(&coordinator, &generation, tokens);
  if (tokens == nullptr) {
    std::cerr << "coordinator: no --auth_tokens: any client that reaches the port may upload "
                 "and run models\n";
  }
  const pipeserve::CallGate gate = ClientGate(tokens);
  std::thread loader;
  pipeserve::ServeOptions serve = ServeOptionsFromFlags(host, client_auth.credentials);
  serve.gate = tokens != nullptr ? &gate : nullptr;
  TieToCoordinator(coordinator, kserve, loader, serve);
  int rc = pipeserve::Serve({&kserve, &models, &generate}, serve);
  // Clean-up (unloading stages, the local launcher's servers) is bounded.
  pipeserve::ExitWithin(absl::Seconds(15), "coordinator");
  if (loader.joinable()) loader.join();
  return rc;
}

int main(int argc, char** argv) {
  pipeserve::StartServerProcess(argv);
  pipeserve::BlockShutdownSignals();
  absl::ParseCommandLine(argc, argv);

  // Who may call: TLS towards clients, tokens per call.
  absl::StatusOr<ClientAuth> client_auth = ClientAuthFromFlags();
  if (!client_auth.ok()) return Fail(std::string(client_auth.status().message()));

  // How the coordinator reaches its stage servers.
  const bool local = absl::GetFlag(FLAGS_launcher) == "local";
  const RemoveOnExit work_dir{local ? PrivateWorkDir() : ""};  // after the launcher stops
  absl::StatusOr<Cluster> cluster = ClusterFromFlags(local, work_dir.dir);
  if (!cluster.ok()) return Fail(std::string(cluster.status().message()));
  auto channels = pipeserve::StageChannels::Create(cluster->options);
  if (!channels.ok()) return Fail(absl::StrCat("--cluster_*: ", channels.status().message()));

  auto store = pipeserve::OpenFileModelStore(absl::GetFlag(FLAGS_repository));
  if (!store.ok()) return Fail(std::string(store.status().message()));
  std::unique_ptr<pipeserve::Launcher> launcher = LauncherFromFlags(work_dir.dir, *cluster);
  if (launcher == nullptr) {
    std::cerr << "coordinator: --launcher must be local, static, or dns (with --stage_dns)\n";
    return 2;
  }

  absl::StatusOr<std::string> host = pipeserve::ListenHost(
      absl::GetFlag(FLAGS_host), client_auth->credentials != nullptr,
      absl::GetFlag(FLAGS_allow_insecure));
  if (!host.ok()) return Fail(std::string(host.status().message()));

  absl::StatusOr<pipeserve::CoordinatorOptions> options = CoordinatorOptionsFromFlags(local);
  if (!options.ok()) return Fail(std::string(options.status().message()));
  absl::StatusOr<std::unique_ptr<pipeserve::ComputeBackend>> calibration_backend =
      CalibrationBackendFromFlags();
  if (!calibration_backend.ok()) return Fail(std::string(calibration_backend.status().message()));
  options->calibration_backend = calibration_backend->get();
  pipeserve::GrpcStageClient stage_client(*channels, /*send_capacity=*/8);
  pipeserve::Coordinator coordinator(*options, *std::move(store), std::move(launcher),
                                     &stage_client);
  return ServeCoordinator(coordinator, *client_auth, *host);
}
