#include "server/stage/stage_host.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "runtime/signature.h"

namespace pipeserve {
namespace {

constexpr size_t kCancelMemory = 4096;
// How long a CANCEL or ERROR frame (which carry no deadline of their own)
// may wait for room downstream.
constexpr absl::Duration kControlFrameWait = absl::Seconds(5);

Frame ErrorFrame(const FrameHeader& about, const absl::Status& status) {
  Frame f;
  f.header.set_kind(FrameHeader::ERROR);
  f.header.set_request_id(about.request_id());
  f.header.set_microbatch(about.microbatch());
  f.header.set_deadline_us(about.deadline_us());
  f.header.set_attempt(about.attempt());
  f.header.set_error_code(static_cast<int>(status.code()));
  f.header.set_error_message(std::string(status.message()));
  return f;
}

// A DATA frame must carry exactly the values the stage receives.
absl::Status CheckReceives(const StageSpec& spec, const Frame& f) {
  if (static_cast<size_t>(f.header.tensors_size()) != f.tensors.size()) {
    return absl::InvalidArgumentError("frame has mismatched tensor headers and data");
  }
  const auto& want = spec.receives();
  if (f.tensors.size() != static_cast<size_t>(want.size())) {
    std::vector<std::string> names;
    for (const ValueSpec& v : want) names.push_back(v.name());
    return absl::InvalidArgumentError(absl::StrCat("frame carries ", f.tensors.size(),
                                                   " values, the stage receives ", want.size(),
                                                   " (", absl::StrJoin(names, ", "), ")"));
  }
  std::vector<Tensor> ordered;
  ordered.reserve(want.size());
  for (const ValueSpec& v : want) {
    const Tensor* t = f.Find(v.name());
    if (t == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("frame lacks value \"", v.name(), "\""));
    }
    ordered.push_back(*t);
  }
  return CheckTensorsMatch(want, ordered).status();
}

// The bytes of a frame's tensors.
uint64_t TensorBytes(const Frame& f) {
  uint64_t n = 0;
  for (const Tensor& t : f.tensors) n += t.byte_size();
  return n;
}

}  // namespace

int64_t NowMicros() { return absl::ToUnixMicros(FrameClockNow()); }

namespace {
StageHost::Options Sane(StageHost::Options o) {
  o.queue_capacity = std::max<size_t>(1, o.queue_capacity);
  o.workers = std::max(1, o.workers);
  return o;
}
}  // namespace

StageHost::StageHost(StageSpec spec, std::unique_ptr<StageProgram> program, Options options)
    : spec_(std::move(spec)), program_(std::move(program)), options_(Sane(options)) {
  for (int i = 0; i < options_.workers; ++i) {
    workers_.emplace_back([this] { Work(); });
  }
}

StageHost::~StageHost() { Stop(); }

std::shared_ptr<FrameSink> StageHost::SetSink(std::shared_ptr<FrameSink> sink) {
  absl::MutexLock lock(&mu_);
  std::swap(sink_, sink);
  return sink;
}

void StageHost::ClearSink(const FrameSink* sink) {
  absl::MutexLock lock(&mu_);
  if (sink_.get() == sink) sink_ = nullptr;
}

bool StageHost::AddProducer(const std::shared_ptr<Producer>& producer) {
  absl::MutexLock lock(&mu_);
  if (stopping_) return false;
  // Forget producers whose streams have ended.
  producers_.erase(std::remove_if(producers_.begin(), producers_.end(),
                                  [](const std::weak_ptr<Producer>& p) { return p.expired(); }),
                   producers_.end());
  producers_.push_back(producer);
  return true;
}

Frame StageHost::Admit(Frame frame) {
  FrameHeader& h = frame.header;
  if (h.kind() == FrameHeader::DATA) {
    absl::Status s = CheckReceives(spec_, frame);
    if (s.ok()) return frame;
    {
      absl::MutexLock lock(&mu_);
      ++stats_.rejected;
    }
    return ErrorFrame(h, absl::InvalidArgumentError(
                             absl::StrCat("stage ", spec_.key().stage(), ": ", s.message())));
  }
  // Control frames carry no tensors, and an ERROR frame always carries an
  // error (frames decoded off the network are checked already; these
  // checks cover in-process producers too).
  frame.tensors.clear();
  h.clear_tensors();
  if (h.kind() == FrameHeader::ERROR &&
      (h.error_code() <= 0 || h.error_code() > static_cast<int>(absl::StatusCode::kUnauthenticated))) {
    h.set_error_code(static_cast<int>(absl::StatusCode::kInternal));
  } else if (h.kind() != FrameHeader::ERROR && h.kind() != FrameHeader::CANCEL) {
    return ErrorFrame(h, absl::InvalidArgumentError(absl::StrCat(
                             "stage ", spec_.key().stage(), ": frame kind ", h.kind(),
                             " does not exist")));
  }
  return frame;
}

bool StageHost::Push(Frame frame, const std::shared_ptr<Producer>& from) {
  frame = Admit(std::move(frame));
  absl::MutexLock lock(&mu_);
  if (stopping_) return true;
  if (frame.header.kind() == FrameHeader::DATA) {
    ++stats_.frames_in;
    stats_.bytes_in += TensorBytes(frame);
  }
  // A cancel takes effect at once: frames of that request already queued
  // ahead of it are dropped when a worker reaches them.
  if (frame.header.kind() == FrameHeader::CANCEL) RememberCancel(frame.header.request_id());
  queue_.push_back(std::move(frame));
  queued_at_.push_back(FrameClockNow());
  if (queue_.size() < options_.queue_capacity || from == nullptr) return true;
  paused_.push_back(from);
  return false;
}

void StageHost::RememberCancel(uint64_t id) {
  if (!cancelled_.insert(id).second) return;
  cancelled_order_.push_back(id);
  if (cancelled_order_.size() > kCancelMemory) {
    cancelled_.erase(cancelled_order_.front());
    cancelled_order_.pop_front();
  }
}

void StageHost::Stop() {
  absl::MutexLock stop_lock(&stop_mu_);
  std::shared_ptr<FrameSink> sink;
  std::vector<std::weak_ptr<Producer>> producers;
  {
    absl::MutexLock lock(&mu_);
    if (!stopping_) {
      stopping_ = true;
      queue_.clear();
      queued_at_.clear();
      paused_.clear();
      producers.swap(producers_);
      sink = std::move(sink_);
    }
  }
  if (sink) sink->Close();  // a worker blocked in Send returns
  for (std::thread& w : workers_) {
    if (!w.joinable()) continue;
    if (w.get_id() == std::this_thread::get_id()) {
      w.detach();  // Stop from inside a worker: it returns by itself
    } else {
      w.join();
    }
  }
  for (const std::weak_ptr<Producer>& p : producers) {
    if (auto alive = p.lock()) alive->Stopped();
  }
}

StageHost::Stats StageHost::stats() const {
  absl::MutexLock lock(&mu_);
  Stats s = stats_;
  s.queue_depth = queue_.size();
  s.has_sink = sink_ != nullptr;
  return s;
}

void StageHost::AddSpans(const FrameHeader& in, absl::Time arrived, absl::Time start,
                         absl::Time end, FrameHeader* out) const {
  out->set_trace(true);
  *out->mutable_spans() = in.spans();
  auto add = [&](const char* what, int64_t from_us, int64_t to_us) {
    TraceSpan* s = out->add_spans();
    s->set_what(what);
    s->set_stage(spec_.key().stage());
    s->set_replica(spec_.key().replica());
    s->set_microbatch(in.microbatch());
    s->set_start_us(from_us);
    s->set_duration_us(std::max<int64_t>(0, to_us - from_us));
  };
  const int64_t arrived_us = absl::ToUnixMicros(arrived);
  const int64_t start_us = absl::ToUnixMicros(start);
  if (in.sent_us() > 0) add("transfer", std::min(in.sent_us(), arrived_us), arrived_us);
  add("queue", arrived_us, start_us);
  add("compute", start_us, absl::ToUnixMicros(end));
}

Frame StageHost::Compute(const Frame& in) {
  const Graph& g = spec_.stage().graph();
  const int stage = spec_.key().stage();
  std::vector<Tensor> inputs;
  inputs.reserve(g.inputs_size());
  for (const ValueSpec& v : g.inputs()) {
    const Tensor* t = in.Find(v.name());
    if (t == nullptr) {
      return ErrorFrame(in.header, absl::InvalidArgumentError(absl::StrCat(
                                       "stage ", stage, ": frame lacks value \"", v.name(), "\"")));
    }
    inputs.push_back(*t);
  }
  absl::StatusOr<std::vector<Tensor>> outs = program_->Run(inputs);
  if (!outs.ok()) {
    return ErrorFrame(in.header, absl::Status(outs.status().code(),
                                              absl::StrCat("stage ", stage, ": ",
                                                           outs.status().message())));
  }
  Frame out;
  out.header.set_kind(FrameHeader::DATA);
  out.header.set_request_id(in.header.request_id());
  out.header.set_microbatch(in.header.microbatch());
  out.header.set_deadline_us(in.header.deadline_us());
  out.header.set_attempt(in.header.attempt());
  for (const std::string& name : spec_.forward()) {
    const Tensor* t = nullptr;
    for (int k = 0; k < g.outputs_size() && k < static_cast<int>(outs->size()); ++k) {
      if (g.outputs(k) == name) t = &(*outs)[k];
    }
    if (t == nullptr) t = in.Find(name);
    if (t == nullptr) {
      return ErrorFrame(in.header, absl::InternalError(absl::StrCat(
                                       "stage ", stage, ": no value \"", name, "\" to send on")));
    }
    out.Add(name, *t);
  }
  return out;
}

void StageHost::Deliver(Frame out) {
  absl::Time deadline = FrameDeadline(out);
  if (out.header.kind() != FrameHeader::DATA) {
    deadline = std::min(deadline, absl::Now() + kControlFrameWait);
  }
  std::shared_ptr<FrameSink> sink;
  {
    absl::MutexLock lock(&mu_);
    sink = sink_;
    if (sink == nullptr) {
      ++stats_.undeliverable;
      stats_.downstream_error =
          last_stage() ? "no coordinator is subscribed to the results" : "no downstream sink";
      return;
    }
  }
  const bool data = out.header.kind() == FrameHeader::DATA;
  if (out.header.trace()) out.header.set_sent_us(NowMicros());
  const uint64_t bytes = data ? TensorBytes(out) : 0;
  const absl::Time start = absl::Now();
  absl::Status s = sink->Send(out, deadline);
  // A broken stream is replaced on the next Send: try once more at once.
  if (s.code() == absl::StatusCode::kUnavailable) s = sink->Send(out, deadline);
  absl::MutexLock lock(&mu_);
  stats_.send_seconds += absl::ToDoubleSeconds(absl::Now() - start);
  if (s.ok()) {
    stats_.downstream_error.clear();
    if (data) {
      ++stats_.frames_out;
      stats_.bytes_out += bytes;
    }
  } else if (s.code() == absl::StatusCode::kDeadlineExceeded) {
    ++stats_.dropped_deadline;  // a slow link, not a broken one
  } else if (!stopping_) {
    ++stats_.undeliverable;
    stats_.downstream_error = std::string(s.message());
  }
}

void StageHost::Work() {
  while (true) {
    Frame in;
    absl::Time arrived;
    std::vector<std::weak_ptr<Producer>> resume;
    {
      absl::MutexLock lock(&mu_);
      auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return stopping_ || !queue_.empty();
      };
      mu_.Await(absl::Condition(&ready));
      if (stopping_) return;
      in = std::move(queue_.front());
      queue_.pop_front();
      arrived = queued_at_.front();
      stats_.queue_seconds += absl::ToDoubleSeconds(FrameClockNow() - arrived);
      queued_at_.pop_front();
      if (queue_.size() < options_.queue_capacity) resume.swap(paused_);
    }
    for (const std::weak_ptr<Producer>& p : resume) {
      if (auto alive = p.lock()) alive->Resume();  // the reader may read again
    }

    const uint64_t id = in.header.request_id();
    {
      absl::MutexLock lock(&mu_);
      if (in.header.kind() == FrameHeader::CANCEL) {
        RememberCancel(id);
      } else if (in.header.kind() == FrameHeader::DATA) {
        if (cancelled_.contains(id)) {
          ++stats_.dropped_cancelled;
          continue;
        }
        if (in.header.deadline_us() != 0 && in.header.deadline_us() < NowMicros()) {
          ++stats_.dropped_deadline;
          continue;
        }
      }
    }
    if (in.header.kind() == FrameHeader::DATA) {
      const absl::Time start = FrameClockNow();
      Frame out = Compute(in);
      const absl::Time end = FrameClockNow();
      const double took = absl::ToDoubleSeconds(end - start);
      if (in.header.trace() && out.header.kind() == FrameHeader::DATA) {
        AddSpans(in.header, arrived, start, end, &out.header);
      }
      {
        absl::MutexLock lock(&mu_);
        ++stats_.processed;
        stats_.compute_seconds += took;
      }
      Deliver(std::move(out));
    } else {
      Deliver(std::move(in));  // CANCEL and ERROR frames travel on
    }
  }
}

}  // namespace pipeserve
