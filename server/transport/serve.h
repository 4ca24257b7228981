// Running a gRPC server the way every pipeserve binary does: health
// checking and reflection on, the chosen port written to a file (for
// launchers and tests that pick ports at run time), health that follows the
// server's real state, and a graceful shutdown on SIGINT/SIGTERM (NOT_SERVING
// at once, work in flight finished within a grace period, exit 0).
//
// Where it listens: without TLS, only on loopback unless told otherwise
// (`allow_insecure`), since a plaintext port hands data and control to
// anyone who can reach it.
//
//   ServeOptions o{.name = "stage_server", .port = 9000};
//   o.credentials = *MakeServerCredentials(files, true);
//   return Serve({&service}, o);
#ifndef PIPESERVE_SERVER_TRANSPORT_SERVE_H_
#define PIPESERVE_SERVER_TRANSPORT_SERVE_H_

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "grpcpp/grpcpp.h"
#include "server/transport/call_gate.h"

namespace pipeserve {

struct ServeOptions {
  // For log lines: "coordinator", "stage_server".
  std::string name;
  // Address to listen on; "" picks 127.0.0.1 without TLS, 0.0.0.0 with.
  std::string host;
  int port = 0;  // 0: any free port
  // Written (atomically) with the chosen port once serving.
  std::string port_file;
  // TLS; null serves plaintext.
  std::shared_ptr<grpc::ServerCredentials> credentials;
  // Who may make which call, checked on a call's headers before its body
  // is read (not owned; null: only the services' own checks). It runs with
  // TLS and, in plaintext, on 127.0.0.1, ::1 or localhost (local TCP
  // credentials); a plaintext server on another host (allow_insecure, or
  // another loopback address) cannot run it.
  const CallGate* gate = nullptr;
  // Memory all calls may hold at once, their messages included (gRPC's
  // resource quota); 0: no bound.
  int64_t max_call_memory_bytes = 0;
  // Allows plaintext on an address other than loopback (logs a warning).
  bool allow_insecure = false;
  // Largest request message; -1: no limit (gRPC answers RESOURCE_EXHAUSTED
  // above it).
  int max_receive_bytes = -1;
  // Threads for synchronous handlers (gRPC's resource quota); 0: gRPC's
  // default. Calls beyond it get RESOURCE_EXHAUSTED.
  int max_threads = 0;
  // Polled every 100 ms: grpc.health.v1 answers SERVING while it returns
  // true, NOT_SERVING otherwise. Null: always SERVING.
  std::function<bool()> serving;
  // Runs once the server is up, with it.
  std::function<void(grpc::Server*)> on_started;
  // Extra channel arguments for the server (e.g. bulk transfer tuning).
  std::function<void(grpc::ServerBuilder&)> configure;
  // On SIGTERM/SIGINT: health turns NOT_SERVING at once, `drain` (if set)
  // runs until its work in flight is done or the deadline it is given,
  // then the server stops taking calls and waits for those in progress
  // until `grace` from the signal is up, cancelling what is left.
  absl::Duration grace = absl::Seconds(25);
  std::function<void(absl::Time deadline)> drain;
  // After `drain`, cancel the calls still in progress at once instead of
  // waiting out the grace period (for servers whose streams never end).
  bool cancel_after_drain = false;
};

// Blocks SIGINT and SIGTERM in the calling thread and in every thread it
// starts afterwards, so Serve() can wait for them. Call it first in main().
void BlockShutdownSignals();

// The host to listen on, per ServeOptions::host and allow_insecure:
// kFailedPrecondition naming the flag for plaintext on a non-loopback host.
absl::StatusOr<std::string> ListenHost(const std::string& host, bool tls, bool allow_insecure);

// Whether `host` is a loopback address or "localhost".
bool IsLoopbackHost(const std::string& host);

// Builds and runs a server with `services` until a signal arrives. Returns
// the process exit code.
int Serve(const std::vector<grpc::Service*>& services, const ServeOptions& options);

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_TRANSPORT_SERVE_H_
