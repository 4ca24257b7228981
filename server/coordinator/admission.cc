#include "server/coordinator/admission.h"

#include <utility>

#include "absl/strings/str_cat.h"

namespace pipeserve {

AdmissionQueue::Ticket::Ticket(Ticket&& other) noexcept
    : q_(std::exchange(other.q_, nullptr)), model_(std::move(other.model_)) {}

AdmissionQueue::Ticket::~Ticket() {
  if (q_ != nullptr) q_->Release(model_);
}

absl::StatusOr<AdmissionQueue::Ticket> AdmissionQueue::Admit(const std::string& model) {
  absl::MutexLock lock(&mu_);
  int& n = admitted_[model];
  if (max_per_model_ > 0 && n >= max_per_model_) {
    if (n == 0) admitted_.erase(model);
    return absl::ResourceExhaustedError(absl::StrCat(
        "model \"", model.substr(0, 128), "\" has ", max_per_model_,
        " requests queued or running, as many as its queue holds (--max_queued_requests); "
        "try again later"));
  }
  ++n;
  return Ticket(this, model);
}

int AdmissionQueue::Admitted(const std::string& model) {
  absl::MutexLock lock(&mu_);
  auto it = admitted_.find(model);
  return it == admitted_.end() ? 0 : it->second;
}

bool AdmissionQueue::WaitIdle(absl::Time deadline) {
  absl::MutexLock lock(&mu_);
  auto idle = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return admitted_.empty(); };
  return mu_.AwaitWithDeadline(absl::Condition(&idle), deadline);
}

void AdmissionQueue::Release(const std::string& model) {
  absl::MutexLock lock(&mu_);
  if (--admitted_[model] <= 0) admitted_.erase(model);
}

}  // namespace pipeserve
