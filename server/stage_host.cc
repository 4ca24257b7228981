#include "server/stage_host.h"

#include <chrono>

#include "absl/strings/str_cat.h"

namespace pipeserve {
namespace {

constexpr size_t kCancelMemory = 4096;

Frame ErrorFrame(const FrameHeader& about, const absl::Status& status) {
  Frame f;
  f.header.set_kind(FrameHeader::ERROR);
  f.header.set_request_id(about.request_id());
  f.header.set_microbatch(about.microbatch());
  f.header.set_deadline_us(about.deadline_us());
  f.header.set_error_code(static_cast<int>(status.code()));
  f.header.set_error_message(std::string(status.message()));
  return f;
}

}  // namespace

int64_t NowMicros() {
  return std::chrono::duration_cast<std::chrono::microseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

StageHost::StageHost(StageSpec spec, std::unique_ptr<StageProgram> program,
                     size_t queue_capacity, int workers)
    : spec_(std::move(spec)),
      program_(std::move(program)),
      capacity_(std::max<size_t>(1, queue_capacity)) {
  for (int i = 0; i < std::max(1, workers); ++i) {
    workers_.emplace_back([this] { Work(); });
  }
}

StageHost::~StageHost() {
  std::shared_ptr<FrameSink> sink;
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
    sink = sink_;
  }
  if (sink) sink->Close();  // a worker blocked in Send returns
  for (std::thread& w : workers_) w.join();
}

void StageHost::SetSink(std::shared_ptr<FrameSink> sink) {
  absl::MutexLock lock(&mu_);
  sink_ = std::move(sink);
}

void StageHost::Push(Frame frame, std::function<void()> resume) {
  bool room;
  {
    absl::MutexLock lock(&mu_);
    // A cancel takes effect at once: frames of that request already queued
    // ahead of it are dropped when the worker reaches them.
    if (frame.header.kind() == FrameHeader::CANCEL) RememberCancel(frame.header.request_id());
    queue_.push_back(std::move(frame));
    room = queue_.size() < capacity_;
    if (!room) resume_ = std::move(resume);
  }
  if (room) resume();
}

void StageHost::RememberCancel(uint64_t id) {
  if (!cancelled_.insert(id).second) return;
  cancelled_order_.push_back(id);
  if (cancelled_order_.size() > kCancelMemory) {
    cancelled_.erase(cancelled_order_.front());
    cancelled_order_.pop_front();
  }
}

StageHost::Stats StageHost::stats() const {
  absl::MutexLock lock(&mu_);
  Stats s = stats_;
  s.queue_depth = queue_.size();
  return s;
}

Frame StageHost::Compute(const Frame& in) {
  const Graph& g = spec_.stage().graph();
  std::vector<Tensor> inputs;
  inputs.reserve(g.inputs_size());
  for (const ValueSpec& v : g.inputs()) {
    const Tensor* t = in.Find(v.name());
    if (t == nullptr) {
      return ErrorFrame(in.header, absl::InvalidArgumentError(absl::StrCat(
                                       "stage ", spec_.stage().index(),
                                       ": frame lacks value \"", v.name(), "\"")));
    }
    inputs.push_back(*t);
  }
  absl::StatusOr<std::vector<Tensor>> outs = program_->Run(inputs);
  if (!outs.ok()) {
    return ErrorFrame(in.header,
                      absl::Status(outs.status().code(),
                                   absl::StrCat("stage ", spec_.stage().index(), ": ",
                                                outs.status().message())));
  }
  Frame out;
  out.header.set_kind(FrameHeader::DATA);
  out.header.set_request_id(in.header.request_id());
  out.header.set_microbatch(in.header.microbatch());
  out.header.set_deadline_us(in.header.deadline_us());
  for (const std::string& name : spec_.forward()) {
    const Tensor* t = nullptr;
    for (int k = 0; k < g.outputs_size(); ++k) {
      if (g.outputs(k) == name) t = &(*outs)[k];
    }
    if (t == nullptr) t = in.Find(name);
    if (t == nullptr) {
      return ErrorFrame(in.header, absl::InternalError(absl::StrCat(
                                       "stage ", spec_.stage().index(),
                                       ": no value \"", name, "\" to send on")));
    }
    out.Add(name, *t);
  }
  return out;
}

void StageHost::Work() {
  while (true) {
    Frame in;
    std::function<void()> resume;
    {
      absl::MutexLock lock(&mu_);
      auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return stopping_ || !queue_.empty();
      };
      mu_.Await(absl::Condition(&ready));
      if (stopping_) return;
      in = std::move(queue_.front());
      queue_.pop_front();
      if (resume_ && queue_.size() < capacity_) resume = std::move(resume_);
      resume_ = nullptr;
    }
    if (resume) resume();  // the reader may read again

    const uint64_t id = in.header.request_id();
    Frame out;
    bool send = true;
    {
      absl::MutexLock lock(&mu_);
      if (in.header.kind() == FrameHeader::CANCEL) {
        RememberCancel(id);
      } else if (in.header.kind() == FrameHeader::DATA) {
        if (cancelled_.contains(id)) {
          ++stats_.dropped_cancelled;
          send = false;
        } else if (in.header.deadline_us() != 0 &&
                   in.header.deadline_us() < NowMicros()) {
          ++stats_.dropped_deadline;
          send = false;
        }
      }
    }
    if (!send) continue;
    if (in.header.kind() == FrameHeader::DATA) {
      out = Compute(in);
      absl::MutexLock lock(&mu_);
      ++stats_.processed;
    } else {
      out = std::move(in);  // CANCEL and ERROR frames travel on
    }

    std::shared_ptr<FrameSink> sink;
    {
      absl::MutexLock lock(&mu_);
      auto has_sink = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return stopping_ || sink_ != nullptr;
      };
      mu_.Await(absl::Condition(&has_sink));
      if (stopping_) return;
      sink = sink_;
    }
    absl::Status s = sink->Send(std::move(out));
    if (!s.ok()) {
      // The downstream stream broke: forget it so a new one can be set.
      absl::MutexLock lock(&mu_);
      if (sink_ == sink) sink_ = nullptr;
    }
  }
}

}  // namespace pipeserve
