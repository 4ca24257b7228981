// Real pipeserve processes for end-to-end tests: a coordinator (with its
// local launcher starting stage servers) on a port it picks itself, ready
// once its health check says so.
//
//   absl::StatusOr<std::unique_ptr<CoordinatorProcess>> c =
//       CoordinatorProcess::Start({.repository = dir});
//   auto client = Client::Connect((*c)->address());
#ifndef PIPESERVE_TESTS_CLUSTER_H_
#define PIPESERVE_TESTS_CLUSTER_H_

#include <sys/types.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "client/client.h"
#include "proto/pipeserve_service.pb.h"

namespace pipeserve {

struct CoordinatorFlags {
  std::string repository;
  std::vector<std::string> extra;  // more --flag=value arguments
  // The cluster token it shares with its stage servers ("": a new one).
  std::string cluster_token;
  // How to reach it, for the health check that waits for it (TLS files).
  ClientOptions client;
};

class CoordinatorProcess {
 public:
  // Starts server/coordinator from the test's runfiles and waits (up to 60
  // s) for its port file and a SERVING health check.
  static absl::StatusOr<std::unique_ptr<CoordinatorProcess>> Start(CoordinatorFlags flags);
  // SIGTERM, then waits for it (and so its stage servers) to exit.
  ~CoordinatorProcess();

  // SIGTERM, then waits up to `limit` for it to exit: its wait status
  // (see waitpid), or -1 if it had to be killed.
  int Terminate(absl::Duration limit);

  const std::string& address() const { return address_; }
  // The Prometheus endpoint's port (GET /metrics).
  int metrics_port() const { return metrics_port_; }
  const std::string& log_path() const { return log_; }
  // The cluster token it and its stage servers share (tests that talk to
  // stage servers directly send it).
  const std::string& cluster_token() const { return cluster_token_; }
  pid_t pid() const { return pid_; }

  // The pid of the local launcher's stage server for pool slot `index`
  // (stage `index` of the deepest model), or -1.
  pid_t StageServerPid(int index) const;

 private:
  pid_t pid_ = -1;
  int metrics_port_ = 0;
  std::string address_, log_, cluster_token_;
};

// A stage_server process of its own (for the static launcher), on a port
// it picks itself, ready once it wrote its port file and accepts
// connections; its Prometheus metrics on another port it picks.
class StageServerProcess {
 public:
  // `prefix`: a command that runs the server (e.g. {"ip", "netns", "exec",
  // "ns0"}), exec'ing it in place.
  static absl::StatusOr<std::unique_ptr<StageServerProcess>> Start(
      const std::string& cluster_token, std::vector<std::string> extra = {},
      std::vector<std::string> prefix = {});
  // SIGTERM, then waits for it to exit.
  ~StageServerProcess();
  // SIGTERM, then waits up to `limit` for it to exit: its wait status, or
  // -1 if it had to be killed.
  int Terminate(absl::Duration limit);
  const std::string& address() const { return address_; }
  pid_t pid() const { return pid_; }
  // Its GET /metrics port.
  int metrics_port() const { return metrics_port_; }

 private:
  pid_t pid_ = -1;
  std::string address_;
  int metrics_port_ = 0;
};

// A stage server's statistics for one stage of a deployed model, asked the
// way the coordinator asks (with the cluster token).
absl::StatusOr<StageStatsResponse> StageStats(const GetPlanResponse& plan, int stage,
                                              const std::string& token);

}  // namespace pipeserve

#endif  // PIPESERVE_TESTS_CLUSTER_H_
