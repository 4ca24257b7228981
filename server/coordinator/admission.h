// Admission of a coordinator's requests: how many each model has queued or
// running, against a limit per model. Beyond it a request is refused at
// once (kResourceExhausted, naming the limit) instead of waiting without
// bound; a request counts from Admit until its Ticket is destroyed, so
// callers that queue requests before they run them (ModelStreamInfer)
// admit them first and what waits is counted. One-shot requests and
// generation steps go through the same queue.
//
//   AdmissionQueue queue(/*max_per_model=*/128);
//   ASSIGN_OR_RETURN(AdmissionQueue::Ticket ticket, queue.Admit("gpt2"));
//   ... run the request; the ticket's destructor releases its place.
#ifndef PIPESERVE_SERVER_COORDINATOR_ADMISSION_H_
#define PIPESERVE_SERVER_COORDINATOR_ADMISSION_H_

#include <map>
#include <string>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace pipeserve {

class AdmissionQueue {
 public:
  // A place in the queue of one model; move-only.
  class Ticket {
   public:
    Ticket(Ticket&& other) noexcept;
    Ticket& operator=(Ticket&&) = delete;
    ~Ticket();
    const std::string& model() const { return model_; }

   private:
    friend class AdmissionQueue;
    Ticket(AdmissionQueue* q, std::string model) : q_(q), model_(std::move(model)) {}
    AdmissionQueue* q_;
    std::string model_;
  };

  // `max_per_model` requests of one model at once (0: no limit).
  explicit AdmissionQueue(int max_per_model) : max_per_model_(max_per_model) {}
  // Outstanding tickets must be gone first.
  ~AdmissionQueue() = default;

  // kResourceExhausted, naming the limit and its flag, when max_per_model
  // requests of `model` are queued or running already.
  absl::StatusOr<Ticket> Admit(const std::string& model);

  // Requests of `model` admitted now.
  int Admitted(const std::string& model);

  // Waits until no ticket is held, or `deadline`. True if none is.
  bool WaitIdle(absl::Time deadline);

 private:
  void Release(const std::string& model);

  const int max_per_model_;
  absl::Mutex mu_;
  std::map<std::string, int> admitted_ ABSL_GUARDED_BY(mu_);  // no entry: none
};

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_COORDINATOR_ADMISSION_H_
