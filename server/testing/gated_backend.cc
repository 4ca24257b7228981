#include "server/testing/gated_backend.h"

#include "runtime/cpu/cpu_backend.h"

namespace pipeserve {
namespace {

class GatedProgram : public StageProgram {
 public:
  GatedProgram(Gate* gate, std::unique_ptr<StageProgram> inner)
      : gate_(gate), inner_(std::move(inner)) {}
  absl::StatusOr<std::vector<Tensor>> Run(absl::Span<const Tensor> in) override {
    gate_->Pass();
    return inner_->Run(in);
  }

 private:
  Gate* const gate_;
  const std::unique_ptr<StageProgram> inner_;
};

}  // namespace

void Gate::Set(bool open) {
  absl::MutexLock lock(&mu_);
  open_ = open;
}

void Gate::Pass() {
  absl::MutexLock lock(&mu_);
  ++waiting_;
  auto is_open = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return open_; };
  mu_.Await(absl::Condition(&is_open));
  --waiting_;
}

bool Gate::WaitHeld(int n) {
  absl::MutexLock lock(&mu_);
  auto held = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return waiting_ >= n; };
  return mu_.AwaitWithTimeout(absl::Condition(&held), absl::Seconds(10));
}

GatedBackend::GatedBackend(Gate* gate) : gate_(gate), cpu_(MakeCpuBackend({})) {}

absl::StatusOr<std::unique_ptr<StageProgram>> GatedBackend::Compile(const Graph& graph,
                                                                    const WeightMap& weights) {
  absl::StatusOr<std::unique_ptr<StageProgram>> inner = cpu_->Compile(graph, weights);
  if (!inner.ok()) return inner.status();
  return std::unique_ptr<StageProgram>(new GatedProgram(gate_, *std::move(inner)));
}

}  // namespace pipeserve
