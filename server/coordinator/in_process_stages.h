// Stage servers inside this process: one StageServerCore per address,
// linked by direct calls instead of gRPC. A real StageClient (everything
// but the network) for the coordinator's tests, where it also injects
// failures: kill a server, or reach into one to feed it frames the
// coordinator would never send.
//
//   InProcessStages stages;
//   stages.AddServer("s0");
//   stages.AddServer("s1");
//   Coordinator coordinator(options, store, MakeStaticLauncher({"s0", "s1"}), &stages);
//   stages.KillServer("s1");   // its stages stop, calls to it fail
#ifndef PIPESERVE_SERVER_COORDINATOR_IN_PROCESS_STAGES_H_
#define PIPESERVE_SERVER_COORDINATOR_IN_PROCESS_STAGES_H_

#include <atomic>
#include <map>
#include <memory>
#include <string>

#include "absl/synchronization/mutex.h"
#include "server/coordinator/stage_client.h"
#include "server/stage/stage_server_core.h"

namespace pipeserve {

class InProcessStages : public StageClient, public Dialer {
 public:
  explicit InProcessStages(StageServerOptions options = {});
  ~InProcessStages() override;

  // Starts (or restarts, empty) a stage server at `address`, any string.
  void AddServer(const std::string& address);
  // Stops every stage of the server at `address` and takes it away: calls
  // to the address fail with kUnavailable until AddServer.
  void KillServer(const std::string& address);
  // The next `n` sends from a stage to the server at `address` fail as
  // over a cut link ("the stage ended the stream"); the coordinator's own
  // calls to it still work.
  void FailLinkSends(const std::string& address, int n);
  // Whether a stage's send to `address` fails now (FailLinkSends), taking
  // one failure.
  bool TakeLinkFailure(const std::string& address);
  // The server at `address`, or null; shared so a test can hold it.
  std::shared_ptr<StageServerCore> Server(const std::string& address);
  // LoadStage calls so far (each sends a stage's weights).
  int load_calls() const { return load_calls_.load(); }

  // StageClient
  absl::Status LoadStage(const std::string& address, const StageSpec& spec,
                         const WeightReader& weights, absl::Time deadline) override;
  absl::Status UnloadStage(const std::string& address, const StageKey& key,
                           absl::Time deadline) override;
  absl::StatusOr<std::vector<StageKey>> ListStages(const std::string& address,
                                                   absl::Time deadline) override;
  absl::StatusOr<StageStatsResponse> GetStageStats(const std::string& address,
                                                   const StageKey& key,
                                                   absl::Time deadline) override;
  std::shared_ptr<FrameSink> OpenInput(const std::string& address, const StageKey& key) override;
  absl::StatusOr<std::unique_ptr<Subscription>> SubscribeResults(
      const std::string& address, const StageKey& key, std::function<void(Frame)> on_frame,
      std::function<void(const absl::Status&)> on_done, absl::Time deadline) override;

  // Dialer: how the stages reach each other.
  std::shared_ptr<FrameSink> Dial(const std::string& address, const StageKey& key) override;

 private:
  absl::StatusOr<std::shared_ptr<StageServerCore>> Reach(const std::string& address);

  const StageServerOptions options_;
  std::atomic<int> load_calls_{0};
  absl::Mutex mu_;
  std::map<std::string, std::shared_ptr<StageServerCore>> servers_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, int> failing_link_sends_ ABSL_GUARDED_BY(mu_);
};

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_COORDINATOR_IN_PROCESS_STAGES_H_
