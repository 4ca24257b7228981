// A compute backend for tests whose programs wait at a gate before each
// run: a stage that is slow or wedged on demand. Runs are otherwise the
// CPU backend's.
//
//   Gate gate;
//   options.backend = std::make_shared<GatedBackend>(&gate);
//   gate.Set(false);        // stages stop computing
//   gate.WaitHeld(1);       // a run is waiting
//   gate.Set(true);
#ifndef PIPESERVE_SERVER_TESTING_GATED_BACKEND_H_
#define PIPESERVE_SERVER_TESTING_GATED_BACKEND_H_

#include <memory>
#include <string>

#include "absl/synchronization/mutex.h"
#include "runtime/backend.h"

namespace pipeserve {

class Gate {
 public:
  void Set(bool open);
  // Called by a run: waits while the gate is shut.
  void Pass();
  // Waits (up to 10 s) until `n` runs are held at the gate; false if not.
  bool WaitHeld(int n);

 private:
  absl::Mutex mu_;
  bool open_ ABSL_GUARDED_BY(mu_) = true;
  int waiting_ ABSL_GUARDED_BY(mu_) = 0;
};

class GatedBackend : public ComputeBackend {
 public:
  // `gate` must outlive every program compiled here.
  explicit GatedBackend(Gate* gate);
  std::string Name() const override { return "gated-cpu"; }
  absl::StatusOr<std::unique_ptr<StageProgram>> Compile(const Graph& graph,
                                                        const WeightMap& weights) override;

 private:
  Gate* const gate_;
  std::unique_ptr<ComputeBackend> cpu_;
};

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_TESTING_GATED_BACKEND_H_
