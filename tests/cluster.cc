#include "tests/cluster.h"

#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>

#include "absl/strings/numbers.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "client/client.h"
#include "common/status_macros.h"
#include "server/testing/temp_dir.h"
#include "grpcpp/grpcpp.h"
#include "proto/pipeserve_service.grpc.pb.h"
#include "tests/fixtures.h"

namespace pipeserve {

namespace {

// Forks and execs `args` (argv[0] looked up on PATH) with stdout and stderr
// going to `log`; the child gets `death_signal` when this process dies.
absl::StatusOr<pid_t> Spawn(std::vector<std::string> args, const std::string& log,
                            int death_signal) {
  pid_t parent = ::getpid();
  pid_t pid = ::fork();
  if (pid < 0) return absl::InternalError("fork failed");
  if (pid == 0) {
    ::prctl(PR_SET_PDEATHSIG, death_signal);
    if (::getppid() != parent) ::_exit(1);
    FILE* out = std::fopen(log.c_str(), "w");
    if (out) {
      ::dup2(fileno(out), 1);
      ::dup2(fileno(out), 2);
    }
    std::vector<char*> argv;
    for (std::string& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    ::execvp(argv[0], argv.data());
    ::_exit(127);
  }
  return pid;
}

// Waits for the port a server started as `*pid` writes to `port_file`;
// an error naming `what` and its log if it exits first (`*pid` is then -1)
// or writes none by `deadline`.
absl::StatusOr<int> WaitForPort(pid_t* pid, const std::string& port_file, absl::Time deadline,
                                const std::string& what, const std::string& log) {
  while (absl::Now() < deadline) {
    int port = 0;
    std::ifstream in(port_file);
    if (in >> port && port > 0) return port;
    if (::waitpid(*pid, nullptr, WNOHANG) == *pid) {
      *pid = -1;
      return absl::InternalError(absl::StrCat(what, " exited at start; log: ", log));
    }
    absl::SleepFor(absl::Milliseconds(20));
  }
  return absl::DeadlineExceededError(absl::StrCat(what, " wrote no port file; log: ", log));
}

// SIGTERM, then waits up to `limit` for `pid` to exit: its wait status,
// or -1 if it had to be killed.
int Stop(pid_t pid, absl::Duration limit) {
  ::kill(pid, SIGTERM);
  const absl::Time until = absl::Now() + limit;
  int status = 0;
  while (absl::Now() < until) {
    if (::waitpid(pid, &status, WNOHANG) == pid) return status;
    absl::SleepFor(absl::Milliseconds(20));
  }
  ::kill(pid, SIGKILL);
  ::waitpid(pid, nullptr, 0);
  return -1;
}

}  // namespace

absl::StatusOr<std::unique_ptr<CoordinatorProcess>> CoordinatorProcess::Start(
    CoordinatorFlags flags) {
  auto p = std::unique_ptr<CoordinatorProcess>(new CoordinatorProcess());
  std::string dir = TestTempDir("coordinator");
  std::string port_file = dir + "/port";
  p->log_ = dir + "/coordinator.log";
  std::string bin = RunfilesRoot() + "/server/coordinator/coordinator";
  p->cluster_token_ = !flags.cluster_token.empty()
                         ? flags.cluster_token
                         : absl::StrCat("test-cluster-token-", ::getpid(), "-",
                                        absl::ToUnixNanos(absl::Now()));
  std::ofstream(dir + "/cluster-token") << p->cluster_token_ << "\n";
  std::vector<std::string> args = {bin, "--port=0", "--host=127.0.0.1",
                                   "--port_file=" + port_file,
                                   "--repository=" + flags.repository,
                                   "--stage_server_binary=" + RunfilesRoot() + "/server/stage/stage_server",
                                   "--metrics_port=0", "--metrics_port_file=" + dir + "/metrics_port",
                                   "--http_port=-1",  // tests that want it say so
                                   "--cluster_token_file=" + dir + "/cluster-token"};
  for (const std::string& e : flags.extra) args.push_back(e);
  ASSIGN_OR_RETURN(p->pid_, Spawn(args, p->log_, SIGTERM));
  const absl::Time deadline = absl::Now() + absl::Seconds(60);
  ASSIGN_OR_RETURN(int port, WaitForPort(&p->pid_, port_file, deadline, "coordinator", p->log_));
  p->address_ = absl::StrCat("127.0.0.1:", port);
  std::ifstream(dir + "/metrics_port") >> p->metrics_port_;
  // Ready when the health check says SERVING.
  ClientOptions options = flags.client;
  options.timeout = absl::Seconds(5);
  auto client = Client::Connect(p->address_, options);
  if (!client.ok()) return client.status();
  std::string last;
  while (absl::Now() < deadline) {
    absl::StatusOr<std::string> h = (*client)->Health();
    if (h.ok() && *h == "SERVING") return p;
    last = h.ok() ? *h : h.status().ToString();
    absl::SleepFor(absl::Milliseconds(20));
  }
  return absl::DeadlineExceededError(absl::StrCat(
      "coordinator never reported SERVING (last: ", last, "); log: ", p->log_));
}

pid_t CoordinatorProcess::StageServerPid(int index) const {
  // Stage servers carry --parent_pid=<coordinator> and a port file named
  // stage-<index>.<coordinator pid>.port (server/launcher.cc).
  std::string parent = absl::StrCat("--parent_pid=", pid_);
  std::string slot = absl::StrCat("/stage-", index, ".", pid_, ".port");
  // Processes come and go while /proc is read: the error_code forms,
  // which do not throw (regression: the soak test died in std::terminate
  // when an entry vanished mid-iteration).
  std::error_code ec;
  for (std::filesystem::directory_iterator it("/proc", ec), end; !ec && it != end;
       it.increment(ec)) {
    pid_t pid = 0;
    if (!absl::SimpleAtoi(it->path().filename().string(), &pid)) continue;
    std::ifstream in(it->path() / "cmdline", std::ios::binary);
    std::string cmd((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::replace(cmd.begin(), cmd.end(), '\0', ' ');
    if (cmd.find(parent) != std::string::npos && cmd.find(slot) != std::string::npos) return pid;
  }
  return -1;
}

CoordinatorProcess::~CoordinatorProcess() {
  if (pid_ > 0) Terminate(absl::Seconds(10));
}

int CoordinatorProcess::Terminate(absl::Duration limit) {
  int status = Stop(pid_, limit);
  pid_ = -1;
  return status;
}

absl::StatusOr<std::unique_ptr<StageServerProcess>> StageServerProcess::Start(
    const std::string& cluster_token, std::vector<std::string> extra,
    std::vector<std::string> prefix) {
  auto p = std::unique_ptr<StageServerProcess>(new StageServerProcess());
  std::string dir = TestTempDir("stage_server");
  std::string port_file = dir + "/port", log = dir + "/stage_server.log";
  std::ofstream(dir + "/cluster-token") << cluster_token << "\n";
  std::string bin = RunfilesRoot() + "/server/stage/stage_server";
  std::vector<std::string> args = {bin, "--port=0", "--host=127.0.0.1", "--device=cpu",
                                   "--port_file=" + port_file,
                                   "--cluster_token_file=" + dir + "/cluster-token",
                                   "--metrics_port=0", "--metrics_port_file=" + dir + "/metrics_port"};
  for (const std::string& e : extra) args.push_back(e);
  args.insert(args.begin(), prefix.begin(), prefix.end());
  ASSIGN_OR_RETURN(p->pid_, Spawn(args, log, SIGKILL));
  ASSIGN_OR_RETURN(int port, WaitForPort(&p->pid_, port_file, absl::Now() + absl::Seconds(30),
                                         "stage_server", log));
  std::string host = "127.0.0.1";
  for (const std::string& e : extra) {
    if (absl::StartsWith(e, "--host=")) host = e.substr(7);
  }
  p->address_ = absl::StrCat(host, ":", port);
  // Written before the gRPC port (the metrics listen first).
  std::ifstream(dir + "/metrics_port") >> p->metrics_port_;
  return p;
}

StageServerProcess::~StageServerProcess() {
  if (pid_ > 0) Stop(pid_, absl::Seconds(10));
}

int StageServerProcess::Terminate(absl::Duration limit) {
  int status = Stop(pid_, limit);
  pid_ = -1;
  return status;
}

absl::StatusOr<StageStatsResponse> StageStats(const GetPlanResponse& plan, int stage,
                                              const std::string& token) {
  auto stub = StageService::NewStub(
      grpc::CreateChannel(plan.stage_servers(stage), grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  ctx.AddMetadata("pipeserve-cluster-token", token);
  StageStatsRequest req;
  req.mutable_key()->set_model(plan.name());
  req.mutable_key()->set_deployment(plan.deployment());
  req.mutable_key()->set_stage(stage);
  StageStatsResponse resp;
  grpc::Status s = stub->GetStageStats(&ctx, req, &resp);
  if (!s.ok()) return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
  return resp;
}

}  // namespace pipeserve
