#include "server/transport/serve.h"

#include <arpa/inet.h>
#include <malloc.h>
#include <signal.h>

#include <atomic>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/health_check_service_interface.h"
#include "grpcpp/resource_quota.h"

namespace pipeserve {

namespace {

// How often free heap memory is returned to the system.
constexpr absl::Duration kTrimEvery = absl::Seconds(5);

sigset_t ShutdownSignals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  return set;
}

}  // namespace

void BlockShutdownSignals() {
  sigset_t set = ShutdownSignals();
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
}

bool IsLoopbackHost(const std::string& host) {
  if (host == "localhost") return true;
  std::string h = host;
  if (h.size() > 2 && h.front() == '[' && h.back() == ']') h = h.substr(1, h.size() - 2);
  in_addr v4;
  if (inet_pton(AF_INET, h.c_str(), &v4) == 1) return (ntohl(v4.s_addr) >> 24) == 127;
  in6_addr v6;
  if (inet_pton(AF_INET6, h.c_str(), &v6) == 1) return IN6_IS_ADDR_LOOPBACK(&v6);
  return false;
}

absl::StatusOr<std::string> ListenHost(const std::string& host, bool tls, bool allow_insecure) {
  if (host.empty()) return std::string(tls ? "0.0.0.0" : "127.0.0.1");
  if (tls || IsLoopbackHost(host) || allow_insecure) return host;
  return absl::FailedPreconditionError(absl::StrCat(
      "refusing to serve plaintext on ", host,
      ": configure TLS, listen on loopback, or pass --allow_insecure"));
}

namespace {

// TLS as configured, or plaintext: local TCP credentials on a loopback
// host when there is a gate to run (they admit loopback peers only, speak
// plain HTTP/2 as insecure ones do, and run an AuthMetadataProcessor).
std::shared_ptr<grpc::ServerCredentials> Credentials(const ServeOptions& options,
                                                     const std::string& host) {
  std::shared_ptr<grpc::ServerCredentials> creds = options.credentials;
  if (creds == nullptr) {
    // gRPC's local TCP credentials take 127.0.0.1 and ::1 only (not all of 127/8).
    const bool local = host == "127.0.0.1" || host == "::1" || host == "[::1]" || host == "localhost";
    if (options.gate == nullptr || !local) return grpc::InsecureServerCredentials();
    creds = grpc::experimental::LocalServerCredentials(LOCAL_TCP);
  }
  if (options.gate != nullptr) options.gate->Attach(creds.get());
  return creds;
}

// The server listening on host:options.port with `services`, and the port
// it got; null (having said why) if it cannot listen.
std::unique_ptr<grpc::Server> BuildServer(const std::vector<grpc::Service*>& services,
                                          const ServeOptions& options, const std::string& host,
                                          int* chosen) {
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  std::string address = absl::StrContains(host, ":") && host.front() != '['
                            ? absl::StrCat("[", host, "]:", options.port)
                            : absl::StrCat(host, ":", options.port);
  builder.AddListeningPort(address, Credentials(options, host), chosen);
  builder.SetMaxReceiveMessageSize(options.max_receive_bytes);
  builder.SetMaxSendMessageSize(-1);
  if (options.max_threads > 0 || options.max_call_memory_bytes > 0) {
    grpc::ResourceQuota quota(options.name);
    if (options.max_threads > 0) quota.SetMaxThreads(options.max_threads);
    if (options.max_call_memory_bytes > 0) quota.Resize(options.max_call_memory_bytes);
    builder.SetResourceQuota(quota);
  }
  if (options.configure) options.configure(builder);
  for (grpc::Service* s : services) builder.RegisterService(s);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || *chosen == 0) {
    std::cerr << options.name << ": cannot listen on " << address << "\n";
    return nullptr;
  }
  return server;
}

// Until `stop`: health follows options.serving (polled every 100 ms), and
// freed heap memory goes back to the system every kTrimEvery.
void WatchHealth(grpc::HealthCheckServiceInterface* hc, const ServeOptions& options, bool initial,
                 absl::Notification* stop) {
  bool last = initial;  // what was set, not what holds by now
  absl::Time next_trim = absl::Now() + kTrimEvery;
  while (!stop->WaitForNotificationWithTimeout(absl::Milliseconds(100))) {
    if (options.serving) {
      bool now = options.serving();
      if (now != last) hc->SetServingStatus(now);
      last = now;
    }
    if (absl::Now() >= next_trim) {
      // Bursts (a pipeline refilling after a repair, a model loaded and
      // unloaded) leave freed memory in malloc's arenas; give it back,
      // so resident memory shows what is really in use.
      ::malloc_trim(0);
      next_trim = absl::Now() + kTrimEvery;
    }
  }
}

// Waits for SIGINT/SIGTERM (blocked everywhere), then stops `server`:
// NOT_SERVING first, options.drain, then gRPC's shutdown within the grace.
void StopOnSignal(grpc::Server* server, const ServeOptions& options, absl::Notification* stop_health,
                  std::thread* health) {
  sigset_t set = ShutdownSignals();
  int sig = 0;
  sigwait(&set, &sig);
  const absl::Time deadline = absl::Now() + options.grace;
  std::cerr << options.name << ": shutting down (grace " << options.grace << ")" << std::endl;
  stop_health->Notify();
  health->join();
  // Load balancers and the coordinator stop sending here first.
  server->GetHealthCheckService()->SetServingStatus(false);
  if (options.drain) options.drain(deadline);
  // Refuses new calls; those in progress get until the deadline.
  server->Shutdown(options.cancel_after_drain ? std::chrono::system_clock::now()
                                             : absl::ToChronoTime(deadline));
}

}  // namespace

int Serve(const std::vector<grpc::Service*>& services, const ServeOptions& options) {
  BlockShutdownSignals();  // before gRPC starts its threads
  const bool tls = options.credentials != nullptr;
  absl::StatusOr<std::string> host = ListenHost(options.host, tls, options.allow_insecure);
  if (!host.ok()) {
    std::cerr << options.name << ": " << host.status().message() << "\n";
    return 2;
  }
  if (!tls && !IsLoopbackHost(*host)) {
    std::cerr << options.name << ": WARNING: serving plaintext on " << *host
              << " (--allow_insecure): anyone who can reach this port can use it\n";
  }
  int chosen = 0;
  std::unique_ptr<grpc::Server> server = BuildServer(services, options, *host, &chosen);
  if (server == nullptr) return 1;
  // Health follows the server's own idea of whether it can serve.
  grpc::HealthCheckServiceInterface* hc = server->GetHealthCheckService();
  const bool initial = options.serving ? options.serving() : true;
  hc->SetServingStatus(initial);
  absl::Notification stop_health;
  std::thread health([&, hc, initial] { WatchHealth(hc, options, initial, &stop_health); });
  if (options.on_started) options.on_started(server.get());
  if (!options.port_file.empty()) {
    // Written then renamed, so a reader never sees a partial number.
    std::string tmp = options.port_file + ".tmp";
    std::ofstream(tmp) << chosen << "\n";
    std::rename(tmp.c_str(), options.port_file.c_str());
  }
  std::cerr << options.name << ": serving on " << *host << ":" << chosen
            << (tls ? " (TLS)" : " (plaintext)") << std::endl;
  StopOnSignal(server.get(), options, &stop_health, &health);
  std::cerr << options.name << ": stopped" << std::endl;
  return 0;
}

}  // namespace pipeserve
