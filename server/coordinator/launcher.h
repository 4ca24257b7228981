// Launchers find (or start) the stage servers a model's stages run on.
//
// - static: a fixed list of host:port, e.g. the pods of a Kubernetes
//   StatefulSet (stage-0.stages:9000, ...); stage i goes to server i mod N.
// - local: starts stage_server processes on this machine, each on a port it
//   picks itself, and waits until each accepts connections. With GPUs: one
//   server per GPU (`--device=cuda:<i>`), stage i on GPU i mod N. Without:
//   one CPU server per stage (the pool grows to the largest model's stage
//   count), the cores divided between them, or each with them all where the
//   stages take turns (a generation model's). They stop with the launcher
//   (and with the coordinator process, if it dies).
//
//   std::unique_ptr<Launcher> l = MakeLocalLauncher({.binary = "stage_server"});
//   ASSIGN_OR_RETURN(std::vector<std::string> servers, l->ServersFor(4));
#ifndef PIPESERVE_SERVER_COORDINATOR_LAUNCHER_H_
#define PIPESERVE_SERVER_COORDINATOR_LAUNCHER_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace pipeserve {

class Launcher {
 public:
  virtual ~Launcher() = default;
  virtual std::string Name() const = 0;
  // The server address for each of `num_stages` stages (a model of S
  // stages in R replicas asks for R x S, lane by lane). kUnavailable when
  // servers cannot be started or reached. Thread-safe.
  virtual absl::StatusOr<std::vector<std::string>> ServersFor(int num_stages) = 0;
  // GEMM threads each stage should use (0: the server decides). When the
  // stages take turns (one computes while the others wait, as a generation
  // model's steps do where the stages share cores), each may use them all.
  virtual int ThreadsPerStage(bool stages_take_turns) const = 0;
  // Whether the stages compute on the same machine's cores (the local
  // launcher without GPUs), so running several at once divides them.
  virtual bool StagesShareCores() const { return false; }
  // The servers that already exist before anything was asked (the static
  // list; none for a launcher that starts its own).
  virtual std::vector<std::string> ExistingServers() const { return {}; }
  // Whether servers too few now may come later without anyone asking (a
  // DNS name a scale-up adds to): an upload then waits for them, stored,
  // instead of failing.
  virtual bool ServersComeLater() const { return false; }
};

std::unique_ptr<Launcher> MakeStaticLauncher(std::vector<std::string> addresses);

struct LocalLauncherOptions {
  // Path of the stage_server binary.
  std::string binary;
  // Folder for the servers' port files and logs.
  std::string work_dir = "/tmp";
  // Cores to divide between the servers (0: all of this machine's).
  int cores = 0;
  // GPUs to start one server on each of (-1: every NVIDIA GPU the driver
  // lists in /proc/driver/nvidia/gpus; 0: CPU servers only).
  int gpus = -1;
  absl::Duration start_timeout = absl::Seconds(30);
  // Most servers it starts; a model needing more is refused
  // (kResourceExhausted) before anything is forked.
  int max_servers = 32;
  // More flags for every server (cluster credentials, token file).
  std::vector<std::string> extra_args;
};

std::unique_ptr<Launcher> MakeLocalLauncher(LocalLauncherOptions options);

// NVIDIA GPUs the driver lists on this machine (0 without a driver).
int CountNvidiaGpus();

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_COORDINATOR_LAUNCHER_H_
