#include "server/coordinator/launcher.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <fcntl.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"

namespace pipeserve {
namespace {

bool AcceptsConnections(int port) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bool ok = ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0;
  ::close(fd);
  return ok;
}

class StaticLauncher : public Launcher {
 public:
  explicit StaticLauncher(std::vector<std::string> addresses)
      : addresses_(std::move(addresses)) {}
  std::string Name() const override { return "static"; }
  absl::StatusOr<std::vector<std::string>> ServersFor(int num_stages) override {
    if (addresses_.empty()) {
      return absl::FailedPreconditionError(
          "the static launcher has no stage servers (--stage_servers is empty)");
    }
    std::vector<std::string> out;
    for (int i = 0; i < num_stages; ++i) out.push_back(addresses_[i % addresses_.size()]);
    return out;
  }
  int ThreadsPerStage(bool) const override { return 0; }
  std::vector<std::string> ExistingServers() const override { return addresses_; }

 private:
  const std::vector<std::string> addresses_;
};

class LocalLauncher : public Launcher {
 public:
  explicit LocalLauncher(LocalLauncherOptions o) : options_(std::move(o)) {
    if (options_.cores <= 0) {
      options_.cores = std::max(1u, std::thread::hardware_concurrency());
    }
    if (options_.gpus < 0) options_.gpus = CountNvidiaGpus();
  }

  ~LocalLauncher() override {
    absl::MutexLock lock(&mu_);
    for (const Server& s : servers_) ::kill(s.pid, SIGTERM);
    for (const Server& s : servers_) {
      // Give each a few seconds to shut down cleanly, then insist.
      for (int i = 0; i < 100; ++i) {
        if (::waitpid(s.pid, nullptr, WNOHANG) != 0) break;
        absl::SleepFor(absl::Milliseconds(50));
        if (i == 99) {
          ::kill(s.pid, SIGKILL);
          ::waitpid(s.pid, nullptr, 0);
        }
      }
    }
  }

  std::string Name() const override { return "local"; }

  int ThreadsPerStage(bool stages_take_turns) const override {
    absl::MutexLock lock(&mu_);
    if (options_.gpus > 0) return 1;  // the GPU computes; CPU threads only stage copies
    if (stages_take_turns) return options_.cores;
    int n = std::max<int>(1, servers_.size());
    return std::max(1, options_.cores / n);
  }

  bool StagesShareCores() const override { return options_.gpus == 0; }

  absl::StatusOr<std::vector<std::string>> ServersFor(int num_stages) override {
    if (num_stages < 1) return absl::InvalidArgumentError("a model needs at least one stage");
    absl::MutexLock lock(&mu_);
    // Replace servers that have died since they were started.
    for (size_t i = 0; i < servers_.size(); ++i) {
      if (::waitpid(servers_[i].pid, nullptr, WNOHANG) == servers_[i].pid) {
        absl::StatusOr<Server> s = Start(static_cast<int>(i));
        if (!s.ok()) return s.status();
        servers_[i] = *s;
      }
    }
    // One server per GPU, or per stage on CPUs.
    int want = options_.gpus > 0 ? std::min(num_stages, options_.gpus) : num_stages;
    if (want > options_.max_servers) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "a model of ", num_stages, " stages (replicas counted) needs ", want,
          " stage servers; the local launcher starts at most ", options_.max_servers,
          " (--max_local_servers)"));
    }
    while (static_cast<int>(servers_.size()) < want) {
      absl::StatusOr<Server> s = Start(static_cast<int>(servers_.size()));
      if (!s.ok()) return s.status();
      servers_.push_back(*s);
    }
    std::vector<std::string> out;
    int pool = options_.gpus > 0 ? std::min<int>(servers_.size(), options_.gpus)
                                 : static_cast<int>(servers_.size());
    for (int i = 0; i < num_stages; ++i) out.push_back(servers_[i % pool].address);
    return out;
  }

 private:
  struct Server {
    pid_t pid;
    std::string address;
  };

  // The arguments of server `index`.
  std::vector<std::string> Args(int index, const std::string& port_file) const {
    std::vector<std::string> args = {
        options_.binary, "--port=0", "--host=127.0.0.1", "--port_file=" + port_file,
        absl::StrCat("--parent_pid=", ::getpid()),
        options_.gpus > 0 ? absl::StrCat("--device=cuda:", index % options_.gpus)
                          : std::string("--device=cpu")};
    args.insert(args.end(), options_.extra_args.begin(), options_.extra_args.end());
    return args;
  }

  // The servers' environment: this process's, and where the stages share
  // the cores, OpenMP threads that stop spinning soon after a stage's run
  // (GOMP_SPINCOUNT, unless OpenMP's waiting is set already). libgomp's
  // default spin kept a finished stage's threads on the cores the next
  // stage needed: on GPT-2 small, 1 sequence, 4 stages on 2 cores, the hops
  // cost 17 ms per token with it and 2 to 4 ms without (bench/generation.py
  // --hops).
  std::vector<std::string> Environment() const {
    std::vector<std::string> env;
    for (char** e = environ; *e != nullptr; ++e) env.emplace_back(*e);
    if (options_.gpus == 0 && std::getenv("GOMP_SPINCOUNT") == nullptr &&
        std::getenv("OMP_WAIT_POLICY") == nullptr) {
      env.emplace_back("GOMP_SPINCOUNT=10000");
    }
    return env;
  }

  absl::StatusOr<Server> Start(int index) {
    std::string port_file = absl::StrCat(options_.work_dir, "/stage-", index, ".", ::getpid(), ".port");
    std::string log = absl::StrCat(options_.work_dir, "/stage-", index, ".", ::getpid(), ".log");
    ::unlink(port_file.c_str());
    // Everything the child needs is made before fork: after it, only
    // async-signal-safe calls (other threads may hold malloc's locks).
    std::vector<std::string> args = Args(index, port_file), env = Environment();
    std::vector<char*> argv, envp;
    for (std::string& a : args) argv.push_back(a.data());
    for (std::string& e : env) envp.push_back(e.data());
    argv.push_back(nullptr);
    envp.push_back(nullptr);
    pid_t parent = ::getpid();
    pid_t pid = ::fork();
    if (pid < 0) return absl::UnavailableError("fork failed");
    if (pid == 0) {
      // The child dies with the coordinator: no orphaned stage servers.
      // (Not PR_SET_PDEATHSIG: that fires when the *thread* that forked
      // exits, and this runs on whichever gRPC thread handled an upload.)
      if (::getppid() != parent) ::_exit(1);
      int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      if (fd >= 0) {
        ::dup2(fd, 1);
        ::dup2(fd, 2);
      }
      ::execve(argv[0], argv.data(), envp.data());
      ::_exit(127);
    }
    return AwaitStart(pid, port_file, log);
  }

  // Waits for server `pid` to write its port and accept connections.
  absl::StatusOr<Server> AwaitStart(pid_t pid, const std::string& port_file,
                                    const std::string& log) {
    // Wait for the port file, then for the server to accept a connection.
    absl::Time deadline = absl::Now() + options_.start_timeout;
    int port = 0;
    while (absl::Now() < deadline) {
      std::ifstream in(port_file);
      if (in >> port && port > 0) break;
      int status;
      if (::waitpid(pid, &status, WNOHANG) == pid) {
        return absl::UnavailableError(absl::StrCat(
            "stage server ", options_.binary, " exited at start (status ", status,
            "); see ", log));
      }
      absl::SleepFor(absl::Milliseconds(20));
    }
    if (port <= 0) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, nullptr, 0);
      return absl::UnavailableError(absl::StrCat("stage server did not start within ",
                                                 absl::FormatDuration(options_.start_timeout),
                                                 "; see ", log));
    }
    std::string address = absl::StrCat("127.0.0.1:", port);
    // A plain TCP connect: the server may speak TLS, which this check
    // need not.
    if (!AcceptsConnections(port)) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, nullptr, 0);
      return absl::UnavailableError(absl::StrCat("stage server at ", address,
                                                 " does not accept connections"));
    }
    return Server{pid, address};
  }

  LocalLauncherOptions options_;
  mutable absl::Mutex mu_;
  std::vector<Server> servers_ ABSL_GUARDED_BY(mu_);
};

}  // namespace

int CountNvidiaGpus() {
  std::error_code ec;
  int n = 0;
  for (const auto& e : std::filesystem::directory_iterator("/proc/driver/nvidia/gpus", ec)) {
    (void)e;
    ++n;
  }
  return ec ? 0 : n;
}

std::unique_ptr<Launcher> MakeStaticLauncher(std::vector<std::string> addresses) {
  return std::make_unique<StaticLauncher>(std::move(addresses));
}

std::unique_ptr<Launcher> MakeLocalLauncher(LocalLauncherOptions options) {
  return std::make_unique<LocalLauncher>(std::move(options));
}

}  // namespace pipeserve
