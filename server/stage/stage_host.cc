#include "server/stage/stage_host.h"

#include <algorithm>
#include <new>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "runtime/microbatch.h"
#include "runtime/signature.h"

namespace pipeserve {
namespace {

constexpr size_t kCancelMemory = 4096;
// A joined run takes at most this many frames (its frames leave as one
// message, which WriteQueue merges with others up to 64 frames) and this
// many received bytes: larger frames gain nothing from joining, and their
// pipelining would suffer.
constexpr size_t kMaxJoinedFrames = 64;
constexpr uint64_t kMaxJoinedBytes = uint64_t{1} << 20;
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

// The program's run. A backend that throws std::bad_alloc (host memory
// ran out) fails the run with kResourceExhausted: one request too large
// for the machine must not end the process serving every other.
absl::StatusOr<std::vector<Tensor>> RunProgram(StageProgram& program,
                                               absl::Span<const Tensor> inputs) {
  try {
    return program.Run(inputs);
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError("out of memory running the stage; send fewer rows");
  }
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

// spec.merge_rows, where every received value follows the batch; else 0.
int64_t JoinableRows(const StageSpec& spec) {
  bool batched = spec.receives_size() > 0;
  for (const ValueSpec& v : spec.receives()) batched = batched && v.batched() && v.shape_size() > 0;
  return batched ? std::max<int64_t>(0, spec.merge_rows()) : 0;
}
}  // namespace

StageHost::StageHost(StageSpec spec, std::unique_ptr<StageProgram> program, Options options)
    : spec_(std::move(spec)),
      program_(std::move(program)),
      options_(Sane(options)),
      merge_rows_(JoinableRows(spec_)),
      few_shapes_(program_->prefers_few_shapes()),
      joining_(merge_rows_ > 0) {
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
  if (s.downstream_error.empty() && sink_ != nullptr) {
    s.downstream_error = std::string(sink_->Lost().message());  // frames sent, never taken
  }
  s.kv_cache = program_->kv_cache();
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
  absl::StatusOr<std::vector<Tensor>> outs = RunProgram(*program_, inputs);
  if (!outs.ok()) {
    return ErrorFrame(in.header, absl::Status(outs.status().code(),
                                              absl::StrCat("stage ", stage, ": ",
                                                           outs.status().message())));
  }
  return Forward(in, *outs);
}

Frame StageHost::Forward(const Frame& in, const std::vector<Tensor>& outs) {
  const Graph& g = spec_.stage().graph();
  Frame out;
  out.header.set_kind(FrameHeader::DATA);
  out.header.set_request_id(in.header.request_id());
  out.header.set_microbatch(in.header.microbatch());
  out.header.set_deadline_us(in.header.deadline_us());
  out.header.set_attempt(in.header.attempt());
  for (const std::string& name : spec_.forward()) {
    const Tensor* t = nullptr;
    for (int k = 0; k < g.outputs_size() && k < static_cast<int>(outs.size()); ++k) {
      if (g.outputs(k) == name) t = &outs[k];
    }
    if (t == nullptr) t = in.Find(name);  // passed through: the frame's own
    if (t == nullptr) {
      return ErrorFrame(in.header, absl::InternalError(absl::StrCat(
                                       "stage ", spec_.key().stage(), ": no value \"", name,
                                       "\" to send on")));
    }
    out.Add(name, *t);
  }
  if (const uint64_t bytes = TensorBytes(out); bytes > kMaxFrameTensorBytes) {
    return ErrorFrame(in.header, absl::ResourceExhaustedError(absl::StrCat(
                                     "stage ", spec_.key().stage(), ": a microbatch's values to send "
                                     "on come to ", bytes, " bytes, more than one message carries (",
                                     kMaxFrameTensorBytes, "); split the request into more "
                                     "microbatches or send fewer rows")));
  }
  return out;
}

int64_t StageHost::Rows(const Frame& f) {
  return f.tensors.empty() || f.tensors[0].rank() == 0 ? 0 : f.tensors[0].dim(0);
}

bool StageHost::CanJoin(const Frame& first, const Frame& next, int64_t rows) const {
  if (next.header.kind() != FrameHeader::DATA ||
      next.header.request_id() != first.header.request_id() ||
      next.header.attempt() != first.header.attempt()) {
    return false;
  }
  const int64_t more = Rows(next);
  if (more <= 0 || rows + more > merge_rows_) return false;
  for (const ValueSpec& v : spec_.receives()) {
    const Tensor* a = first.Find(v.name());
    const Tensor* b = next.Find(v.name());
    if (a == nullptr || b == nullptr || a->rank() != b->rank() || a->rank() == 0 ||
        a->dtype() != b->dtype() ||
        !std::equal(a->shape().begin() + 1, a->shape().end(), b->shape().begin() + 1)) {
      return false;
    }
  }
  return true;
}

size_t StageHost::JoinableBehind(const Frame& first) const {
  const int64_t first_rows = Rows(first);
  int64_t rows = first_rows;
  uint64_t bytes = TensorBytes(first);
  size_t n = 0;
  while (n < queue_.size() && 1 + n < kMaxJoinedFrames &&
         bytes + TensorBytes(queue_[n]) <= kMaxJoinedBytes && CanJoin(first, queue_[n], rows) &&
         (!few_shapes_ || Rows(queue_[n]) == first_rows)) {
    rows += Rows(queue_[n]);
    bytes += TensorBytes(queue_[n]);
    ++n;
  }
  if (few_shapes_) {  // a power of two of microbatches in all
    size_t run = 1;
    while (run * 2 <= n + 1) run *= 2;
    n = run - 1;
  }
  return n;
}

std::vector<Frame> StageHost::ComputeJoined(const std::vector<Frame>& in, uint64_t* runs) {
  auto one_by_one = [&] {
    std::vector<Frame> outs;
    for (const Frame& f : in) {
      outs.push_back(Compute(f));
      ++*runs;
    }
    return outs;
  };
  const Graph& g = spec_.stage().graph();
  std::vector<int64_t> offsets = {0};
  for (const Frame& f : in) offsets.push_back(offsets.back() + Rows(f));
  std::vector<Tensor> inputs;
  inputs.reserve(g.inputs_size());
  for (const ValueSpec& v : g.inputs()) {
    std::vector<Tensor> parts;
    for (const Frame& f : in) {
      const Tensor* t = f.Find(v.name());
      if (t == nullptr) return one_by_one();  // each gets its own error
      parts.push_back(*t);
    }
    absl::StatusOr<Tensor> joined = ConcatRows(parts);
    if (!joined.ok()) return one_by_one();
    inputs.push_back(*std::move(joined));
  }
  absl::StatusOr<std::vector<Tensor>> outs = RunProgram(*program_, inputs);
  ++*runs;
  // A joined run that fails (more rows than a device's memory or
  // workspace takes, say) fails no microbatch: each runs again alone and
  // gets its own answer.
  if (!outs.ok()) return one_by_one();
  // Rows split back only where every output kept them. A stage whose
  // outputs do not never tries joining again.
  for (const Tensor& t : *outs) {
    if (t.rank() == 0 || t.dim(0) != offsets.back()) {
      {
        absl::MutexLock lock(&mu_);
        joining_ = false;
      }
      return one_by_one();
    }
  }
  std::vector<Frame> result;
  for (size_t i = 0; i < in.size(); ++i) {
    std::vector<Tensor> rows;  // views of frame i's rows of every output
    rows.reserve(outs->size());
    for (const Tensor& t : *outs) rows.push_back(t.SliceRows(offsets[i], offsets[i + 1]));
    result.push_back(Forward(in[i], rows));
  }
  return result;
}

void StageHost::Deliver(std::vector<Frame> outs) {
  // One frame, or the frames of one joined run (one request, one deadline).
  absl::Time deadline = FrameDeadline(outs.front());
  if (outs.front().header.kind() != FrameHeader::DATA) {
    deadline = std::min(deadline, absl::Now() + kControlFrameWait);
  }
  std::shared_ptr<FrameSink> sink;
  {
    absl::MutexLock lock(&mu_);
    sink = sink_;
    if (sink == nullptr) {
      stats_.undeliverable += outs.size();
      stats_.downstream_error =
          last_stage() ? "no coordinator is subscribed to the results" : "no downstream sink";
      return;
    }
  }
  // DATA frames and their tensor bytes, of all or of those left unsent.
  auto count = [](const std::vector<Frame>& frames, uint64_t* data, uint64_t* bytes) {
    for (const Frame& f : frames) {
      if (f.header.kind() != FrameHeader::DATA) continue;
      ++*data;
      *bytes += TensorBytes(f);
    }
  };
  uint64_t data = 0, bytes = 0;
  count(outs, &data, &bytes);
  const int64_t now_us = NowMicros();
  for (Frame& out : outs) {
    if (out.header.kind() == FrameHeader::DATA && out.header.trace()) out.header.set_sent_us(now_us);
  }
  const absl::Time start = absl::Now();
  // Sends what is left of `outs`, taking out what was sent.
  auto send = [&] {
    if (outs.size() > 1) return sink->SendAll(&outs, deadline);
    absl::Status s = sink->Send(outs.front(), deadline);  // a copy: kept for a retry
    if (s.ok()) outs.clear();
    return s;
  };
  absl::Status s = send();
  // A broken stream is replaced on the next Send: try once more at once,
  // with the frames it did not take.
  if (s.code() == absl::StatusCode::kUnavailable) s = send();
  uint64_t unsent_data = 0, unsent_bytes = 0;
  count(outs, &unsent_data, &unsent_bytes);
  absl::MutexLock lock(&mu_);
  stats_.send_seconds += absl::ToDoubleSeconds(absl::Now() - start);
  stats_.frames_out += data - unsent_data;
  stats_.bytes_out += bytes - unsent_bytes;
  if (s.ok()) {
    stats_.downstream_error.clear();
  } else if (s.code() == absl::StatusCode::kDeadlineExceeded) {
    stats_.dropped_deadline += outs.size();  // a slow link, not a broken one
  } else if (!stopping_) {
    stats_.undeliverable += outs.size();
    stats_.downstream_error = std::string(s.message());
  }
}

void StageHost::Work() {
  while (true) {
    Taken t;
    if (!Take(&t)) return;  // stopping
    for (const std::weak_ptr<Producer>& p : t.resume) {
      if (auto alive = p.lock()) alive->Resume();  // the reader may read again
    }
    if (t.drop) continue;
    if (t.group.front().header.kind() != FrameHeader::DATA) {
      Deliver(std::move(t.group));  // CANCEL and ERROR frames travel on
    } else {
      ComputeAndDeliver(std::move(t.group), t.arrived);
    }
    // Out of hand once sent on (or given up on), not once computed: a
    // graceful shutdown waiting on this never leaves a frame behind.
    absl::MutexLock lock(&mu_);
    in_hand_.erase(std::find(in_hand_.begin(), in_hand_.end(), t.first));
  }
}

bool StageHost::Take(Taken* t) {
  absl::MutexLock lock(&mu_);
  auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stopping_ || !queue_.empty(); };
  mu_.Await(absl::Condition(&ready));
  if (stopping_) return false;
  t->first = taken_;
  auto take = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    t->group.push_back(std::move(queue_.front()));
    queue_.pop_front();
    t->arrived.push_back(queued_at_.front());
    queued_at_.pop_front();
    stats_.queue_seconds += absl::ToDoubleSeconds(FrameClockNow() - t->arrived.back());
    ++taken_;
  };
  take();
  // (Copies: take() below may move the group's frames.)
  const FrameHeader::Kind kind = t->group.front().header.kind();
  const uint64_t id = t->group.front().header.request_id();
  const int64_t deadline_us = t->group.front().header.deadline_us();
  if (kind == FrameHeader::CANCEL) {
    RememberCancel(id);
  } else if (kind == FrameHeader::DATA) {
    if (cancelled_.contains(id)) {
      ++stats_.dropped_cancelled;
      t->drop = true;
    } else if (deadline_us != 0 && deadline_us < NowMicros()) {
      ++stats_.dropped_deadline;
      t->drop = true;
    } else if (joining_) {
      for (size_t n = JoinableBehind(t->group.front()); n > 0; --n) take();
    }
  }
  if (!t->drop) in_hand_.push_back(t->first);
  if (queue_.size() < options_.queue_capacity) t->resume.swap(paused_);
  return true;
}

void StageHost::ComputeAndDeliver(std::vector<Frame> group, const std::vector<absl::Time>& arrived) {
  const absl::Time start = FrameClockNow();
  uint64_t runs = 1;
  std::vector<Frame> outs;
  if (group.size() == 1) {
    outs.push_back(Compute(group.front()));
  } else {
    runs = 0;
    outs = ComputeJoined(group, &runs);
  }
  const absl::Time end = FrameClockNow();
  for (size_t i = 0; i < group.size(); ++i) {
    if (group[i].header.trace() && outs[i].header.kind() == FrameHeader::DATA) {
      AddSpans(group[i].header, arrived[i], start, end, &outs[i].header);
    }
  }
  {
    absl::MutexLock lock(&mu_);
    stats_.processed += group.size();
    stats_.runs += runs;
    stats_.compute_seconds += absl::ToDoubleSeconds(end - start);
  }
  Deliver(std::move(outs));
}

bool StageHost::FinishHeld(absl::Time deadline) {
  absl::MutexLock lock(&mu_);
  // Every frame queued or in a worker now: those taken so far and those
  // waiting, which workers take in order, so all with a sequence number
  // below `target`. Frames that arrive later do not count, and with two
  // workers one finishing them does not stand for another still busy.
  const uint64_t target = taken_ + queue_.size();
  auto done = [this, target]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return stopping_ ||
           (taken_ >= target && std::all_of(in_hand_.begin(), in_hand_.end(),
                                            [target](uint64_t first) { return first >= target; }));
  };
  return mu_.AwaitWithDeadline(absl::Condition(&done), deadline);
}

}  // namespace pipeserve
