#include "server/coordinator/batcher.h"

#include <algorithm>
#include <atomic>

#include "absl/strings/str_cat.h"
#include "runtime/microbatch.h"

namespace pipeserve {

// One request waiting in the queue or running in a group.
struct Batcher::Waiter {
  std::vector<Tensor> inputs;
  int64_t rows = 0;
  absl::Time deadline;
  absl::Time arrived;
  bool dispatched = false;  // with mu_
  // Notified once `result` is set. The group's worker answers each member
  // through its own notification, outside the batcher's lock, so the
  // members wake side by side instead of queueing for mu_ one by one.
  absl::Notification answered;
  absl::StatusOr<std::vector<Tensor>> result;
  std::atomic<bool> gone{false};  // returned before its group answered
};

namespace {

// Whether `a` and `b` can be merged: the same shapes but for dim 0.
bool SameTails(const std::vector<Tensor>& a, const std::vector<Tensor>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i].rank() != b[i].rank() || a[i].dtype() != b[i].dtype()) return false;
    for (int d = 1; d < a[i].rank(); ++d) {
      if (a[i].dim(d) != b[i].dim(d)) return false;
    }
  }
  return true;
}

}  // namespace

bool Batcher::MayBeOneMembersFault(const absl::Status& s) {
  const absl::StatusCode code = s.code();
  return code != absl::StatusCode::kUnavailable && code != absl::StatusCode::kDeadlineExceeded &&
         code != absl::StatusCode::kCancelled;
}

Batcher::Batcher(BatcherOptions options, bool mergeable, Run run, MayRunAlone may_run_alone)
    : options_(options),
      enabled_(mergeable && options.max_rows > 0 && options.max_in_flight > 0),
      run_(std::move(run)),
      may_run_alone_(std::move(may_run_alone)) {
  if (!enabled_) return;
  for (int i = 0; i < options_.max_in_flight; ++i) workers_.emplace_back([this] { Work(); });
}

Batcher::~Batcher() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  for (std::thread& w : workers_) w.join();
}

size_t Batcher::queued() const {
  absl::MutexLock lock(&mu_);
  return queue_.size();
}

uint64_t Batcher::merged_requests() const {
  absl::MutexLock lock(&mu_);
  return merged_requests_;
}

uint64_t Batcher::batches() const {
  absl::MutexLock lock(&mu_);
  return batches_;
}

absl::StatusOr<std::vector<Tensor>> Batcher::Infer(const std::vector<Tensor>& inputs,
                                                   absl::Time deadline,
                                                   const std::function<bool()>& cancelled) {
  int64_t rows = inputs.empty() || inputs[0].rank() == 0 ? 0 : inputs[0].dim(0);
  if (!enabled_ || rows == 0 || rows >= options_.max_rows) {
    return run_(inputs, deadline, cancelled, /*merged=*/false);
  }
  auto w = std::make_shared<Waiter>();
  w->inputs = inputs;
  w->rows = rows;
  w->deadline = deadline;
  w->arrived = absl::Now();
  absl::Time wake;
  {
    absl::MutexLock lock(&mu_);
    queue_.push_back(w);
    queued_rows_ += rows;
    Dispatch();
    wake = WakeAt(*w, cancelled != nullptr);
  }
  while (!w->answered.WaitForNotificationWithDeadline(wake)) {
    absl::MutexLock lock(&mu_);
    if (w->answered.HasBeenNotified()) break;
    absl::Status gave_up;
    if (absl::Now() >= deadline) {
      gave_up = absl::DeadlineExceededError(
          w->dispatched ? "the request missed its deadline while the batch it was merged into ran"
                        : absl::StrCat("the request missed its deadline waiting to be batched (",
                                       options_.max_in_flight, " batches running, ",
                                       queue_.size(), " requests queued)"));
    } else if (cancelled && cancelled()) {
      gave_up = absl::CancelledError("the client cancelled the request");
    }
    if (!gave_up.ok()) {
      if (w->dispatched) {
        w->gone = true;  // its group answers nobody for it
      } else {
        queue_.erase(std::find(queue_.begin(), queue_.end(), w));
        queued_rows_ -= w->rows;
      }
      return gave_up;
    }
    Dispatch();  // the front's delay may be over
    wake = WakeAt(*w, cancelled != nullptr);
  }
  return std::move(w->result);
}

absl::Time Batcher::WakeAt(const Waiter& w, bool cancellable) const {
  absl::Time wake = std::min(w.deadline, absl::Now() + absl::Milliseconds(cancellable ? 20 : 1000));
  if (!w.dispatched && options_.max_queue_delay > absl::ZeroDuration()) {
    wake = std::min(wake, w.arrived + options_.max_queue_delay);
  }
  return wake;
}

void Batcher::Dispatch() {
  while (idle_ > static_cast<int>(ready_.size()) && !queue_.empty()) {
    const std::shared_ptr<Waiter>& front = queue_.front();
    if (options_.max_queue_delay > absl::ZeroDuration() && queued_rows_ < options_.max_rows &&
        absl::Now() < front->arrived + options_.max_queue_delay) {
      return;  // waiting for company
    }
    // The front and the queued requests that fit it, in order, up to
    // max_rows.
    Group group;
    int64_t rows = 0;
    for (auto it = queue_.begin(); it != queue_.end();) {
      const bool fits = group.empty() || (rows + (*it)->rows <= options_.max_rows &&
                                          SameTails(group.front()->inputs, (*it)->inputs));
      if (!fits) {
        ++it;
        continue;
      }
      rows += (*it)->rows;
      (*it)->dispatched = true;
      group.push_back(*it);
      it = queue_.erase(it);
    }
    queued_rows_ -= rows;
    ++batches_;
    if (group.size() > 1) merged_requests_ += group.size();
    ready_.push_back(std::move(group));
  }
}

void Batcher::Work() {
  while (true) {
    Group group;
    {
      absl::MutexLock lock(&mu_);
      ++idle_;
      Dispatch();  // a worker came free: the queue may go
      auto has = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return stopping_ || !ready_.empty();
      };
      mu_.Await(absl::Condition(&has));
      --idle_;
      if (ready_.empty()) return;  // stopping, nothing left
      group = std::move(ready_.front());
      ready_.pop_front();
    }
    RunGroup(group);
  }
}

void Batcher::RunGroup(const Group& group) {
  absl::StatusOr<std::vector<Tensor>> out = RunMerged(group);
  std::vector<absl::StatusOr<std::vector<Tensor>>> answers;
  if (out.ok()) {
    answers = SplitAnswers(group, *out);
  } else if (group.size() > 1 && may_run_alone_(out.status())) {
    // Maybe one member's fault: each runs alone and gets its own answer,
    // or its own error naming its own positions.
    for (const auto& w : group) {
      answers.push_back(w->gone ? absl::StatusOr<std::vector<Tensor>>(out.status())
                                : run_(w->inputs, w->deadline,
                                       [&w] { return w->gone.load(); }, /*merged=*/false));
    }
  } else {
    answers.assign(group.size(), out.status());
  }
  for (size_t k = 0; k < group.size(); ++k) {
    group[k]->result = std::move(answers[k]);
    group[k]->answered.Notify();
  }
}

absl::StatusOr<std::vector<Tensor>> Batcher::RunMerged(const Group& group) {
  absl::Time deadline = absl::InfinitePast();
  for (const auto& w : group) deadline = std::max(deadline, w->deadline);
  // The merged request ends early only when every member has gone.
  auto all_gone = [&group] {
    return std::all_of(group.begin(), group.end(), [](const auto& w) { return w->gone.load(); });
  };
  if (group.size() == 1) return run_(group[0]->inputs, deadline, all_gone, /*merged=*/false);
  std::vector<Tensor> merged;
  for (size_t i = 0; i < group[0]->inputs.size(); ++i) {
    std::vector<Tensor> parts;
    for (const auto& w : group) parts.push_back(w->inputs[i]);
    absl::StatusOr<Tensor> rows = ConcatRows(parts);
    if (!rows.ok()) return rows.status();
    merged.push_back(*std::move(rows));
  }
  return run_(merged, deadline, all_gone, /*merged=*/true);
}

std::vector<absl::StatusOr<std::vector<Tensor>>> Batcher::SplitAnswers(
    const Group& group, const std::vector<Tensor>& out) {
  std::vector<absl::StatusOr<std::vector<Tensor>>> answers(group.size());
  int64_t total = 0;
  for (const auto& w : group) total += w->rows;
  int64_t at = 0;
  for (size_t k = 0; k < group.size(); ++k) {
    std::vector<Tensor> mine;
    absl::Status fits;
    for (const Tensor& t : out) {
      if (t.rank() == 0 || t.dim(0) != total) {
        fits = absl::InternalError(absl::StrCat("a merged request of ", total,
                                                " rows came back with an output of ",
                                                ShapeToString(t.shape())));
        break;
      }
      mine.push_back(group.size() == 1 ? t : t.SliceRows(at, at + group[k]->rows));
    }
    if (fits.ok()) {
      answers[k] = std::move(mine);
    } else {
      answers[k] = fits;
    }
    at += group[k]->rows;
  }
  return answers;
}

}  // namespace pipeserve
