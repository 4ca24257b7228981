#include "server/transport/write_queue.h"

#include <algorithm>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"

namespace pipeserve {

WriteQueue::WriteQueue(size_t capacity,
                       std::function<void(const grpc::ByteBuffer*)> start_write,
                       std::function<void()> on_closed, size_t merge_bytes)
    : capacity_(std::max<size_t>(1, capacity)),
      start_write_(std::move(start_write)),
      on_closed_(std::move(on_closed)),
      merge_bytes_(merge_bytes) {}

absl::Status WriteQueue::Push(grpc::ByteBuffer message, absl::Time deadline, size_t parts) {
  {
    absl::MutexLock lock(&mu_);
    auto room = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return closed_ || queue_.size() < capacity_;
    };
    if (deadline == absl::InfiniteFuture()) {
      mu_.Await(absl::Condition(&room));
    } else if (!mu_.AwaitWithDeadline(absl::Condition(&room), deadline)) {
      return absl::DeadlineExceededError(absl::StrCat(
          "the deadline passed while ", queue_.size(), " messages waited to be written"));
    }
    if (closed_) return absl::UnavailableError(reason_);
    if (writing_) {
      queue_.push_back({std::move(message), std::max<size_t>(1, parts)});
      return absl::OkStatus();
    }
    writing_ = true;
    current_ = std::move(message);
    ++writes_;
    ++messages_written_;
    ++starting_;
  }
  StartCurrent();
  return absl::OkStatus();
}

void WriteQueue::WriteDone(bool ok) {
  bool start = false;
  {
    absl::MutexLock lock(&mu_);
    current_.Clear();  // releases the tensors just written
    if (!ok) ++dropped_;
    if (!ok && !closed_) {
      closed_ = true;
      reason_ = "a write failed (the stream broke)";
      dropped_ += queue_.size();
      queue_.clear();
    }
    if (closed_ || queue_.empty()) {
      writing_ = false;
    } else {
      TakeNext();
      ++starting_;
      start = true;
    }
  }
  if (start) {
    StartCurrent();
  } else {
    MaybeFireClosed();
  }
}

void WriteQueue::TakeNext() {
  current_ = std::move(queue_.front().message);
  size_t parts = queue_.front().parts;
  queue_.pop_front();
  ++writes_;
  ++messages_written_;
  size_t total = current_.Length();
  auto fits = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return !queue_.empty() && parts + queue_.front().parts <= kMaxMerged &&
           total + queue_.front().message.Length() <= merge_bytes_;
  };
  if (!fits()) return;
  std::vector<grpc::Slice> slices;
  (void)current_.Dump(&slices);
  while (fits()) {
    std::vector<grpc::Slice> more;
    (void)queue_.front().message.Dump(&more);
    total += queue_.front().message.Length();
    parts += queue_.front().parts;
    slices.insert(slices.end(), more.begin(), more.end());
    queue_.pop_front();
    ++messages_written_;
  }
  current_ = grpc::ByteBuffer(slices.data(), slices.size());
}

void WriteQueue::Close(const std::string& reason) {
  {
    absl::MutexLock lock(&mu_);
    if (closed_) return;
    closed_ = true;
    reason_ = reason;
    dropped_ += queue_.size();
    queue_.clear();
  }
  MaybeFireClosed();
}

void WriteQueue::StartCurrent() {
  // Outside the lock: StartWrite may write to the socket on this thread, and
  // the thread finishing the previous write must not wait for that. The
  // message stays put: nothing touches current_ until its WriteDone.
  start_write_(&current_);
  {
    absl::MutexLock lock(&mu_);
    --starting_;
  }
  MaybeFireClosed();
}

void WriteQueue::MaybeFireClosed() {
  bool fire;
  {
    absl::MutexLock lock(&mu_);
    // Closed, and no StartWrite under way: none can start any more.
    fire = closed_ && starting_ == 0 && !closed_reported_;
    if (fire) closed_reported_ = true;
  }
  if (fire && on_closed_) on_closed_();
}

bool WriteQueue::closed() const {
  absl::MutexLock lock(&mu_);
  return closed_;
}

size_t WriteQueue::size() const {
  absl::MutexLock lock(&mu_);
  return queue_.size();
}

uint64_t WriteQueue::writes() const {
  absl::MutexLock lock(&mu_);
  return writes_;
}

uint64_t WriteQueue::messages_written() const {
  absl::MutexLock lock(&mu_);
  return messages_written_;
}

uint64_t WriteQueue::dropped() const {
  absl::MutexLock lock(&mu_);
  return dropped_;
}

}  // namespace pipeserve
