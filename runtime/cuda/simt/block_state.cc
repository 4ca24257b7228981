#include "runtime/cuda/simt/block_state.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"

namespace pipeserve::simt::internal {
namespace {

const char* OpName(WarpOpKind kind) {
  switch (kind) {
    case WarpOpKind::kShfl:
      return "Shfl";
    case WarpOpKind::kShflXor:
      return "ShflXor";
    case WarpOpKind::kShflDown:
      return "ShflDown";
    case WarpOpKind::kShflUp:
      return "ShflUp";
    case WarpOpKind::kBallot:
      return "Ballot";
    case WarpOpKind::kAny:
      return "Any";
    case WarpOpKind::kAll:
      return "All";
    case WarpOpKind::kWmma:
      return "wmma";
  }
  return "?";
}

std::string Site(const char* file, int line) {
  return absl::StrCat(file, ":", line);
}

std::string OpAt(WarpOpKind kind, const char* file, int line) {
  return absl::StrCat(OpName(kind), " at ", Site(file, line));
}

bool SameSite(const char* file_a, int line_a, const char* file_b, int line_b) {
  return line_a == line_b && std::strcmp(file_a, file_b) == 0;
}

uint32_t Bit(int lane) { return 1u << lane; }

// Lane `lane`'s result of a warp op whose lanes brought `values` and
// `params`. Parameters out of range behave as the hardware's: Shfl and
// ShflXor take their lane modulo 32, ShflDown/ShflUp past the warp's end
// return the lane's own value (their delta is unsigned in CUDA).
uint64_t LaneResult(WarpOpKind kind, const uint64_t* values, const int* params,
                    int lane, uint32_t ballot) {
  const unsigned delta = static_cast<unsigned>(params[lane]);
  switch (kind) {
    case WarpOpKind::kShfl:
      return values[params[lane] & (kWarpSize - 1)];
    case WarpOpKind::kShflXor:
      return values[(lane ^ params[lane]) & (kWarpSize - 1)];
    case WarpOpKind::kShflDown:
      return delta < kWarpSize - lane ? values[lane + delta] : values[lane];
    case WarpOpKind::kShflUp:
      return delta <= static_cast<unsigned>(lane) ? values[lane - delta]
                                                  : values[lane];
    case WarpOpKind::kBallot:
      return ballot;
    case WarpOpKind::kAny:
      return ballot != 0;
    case WarpOpKind::kAll:
      return ballot == 0xffffffffu;
    case WarpOpKind::kWmma:
      return values[lane];
  }
  return values[lane];
}

// What a warp op returns once the block is broken: what the lane would get
// from a warp of itself alone.
uint64_t AloneResult(WarpOpKind kind, uint64_t value, int lane) {
  if (kind == WarpOpKind::kBallot) return value != 0 ? Bit(lane) : 0;
  return value;
}

}  // namespace

SharedArrayState::SharedArrayState(const SharedSite* site, size_t element_size,
                                   int64_t count, const void* poison_value)
    : site(site),
      element_size(element_size),
      count(count),
      poison(static_cast<const unsigned char*>(poison_value),
             static_cast<const unsigned char*>(poison_value) + element_size),
      bytes(element_size * count),
      history(count),
      sink(poison) {}

void SharedArrayState::Reset() {
  for (int64_t i = 0; i < count; ++i) {
    std::memcpy(&bytes[i * element_size], poison.data(), element_size);
  }
  history.assign(count, ElementHistory{});
  sink = poison;
}

BlockState::BlockState(Dim3 block_dim)
    : block_dim_(block_dim),
      num_threads_(static_cast<int>(block_dim.x * block_dim.y * block_dim.z)) {
  const int num_warps = (num_threads_ + kWarpSize - 1) / kWarpSize;
  for (int i = 0; i < num_warps; ++i) {
    warps_.push_back(std::make_unique<Warp>());
    warps_.back()->size = std::min(kWarpSize, num_threads_ - i * kWarpSize);
  }
}

void BlockState::Start() {
  std::lock_guard<std::mutex> lock(mu_);
  ++serial_;
  running_ = num_threads_;
  first_returned_ = -1;
  barrier_waiting_ = 0;
  barrier_first_ = -1;
  epoch_ = 0;
  broken_ = false;
  error_.clear();
  poison_read_.reset();
  for (auto& w : warps_) {
    w->arrived = 0;
    w->at_barrier = 0;
    w->first_returned = -1;
  }
}

absl::Status BlockState::Finish() {
  std::lock_guard<std::mutex> lock(mu_);
  ReportPoisonRead();
  return error_.empty() ? absl::OkStatus() : absl::InternalError(error_);
}

// ---------------------------------------------------------------------------
// The barrier.

void BlockState::SyncThreads(int tid, const char* file, int line) {
  std::unique_lock<std::mutex> lock(mu_);
  if (broken_ || !ArriveAtBarrier(tid, file, line)) return;
  if (barrier_waiting_ == num_threads_) {
    CompleteBarrier();
    return;
  }
  if (BlockedThreads() == running_) {
    Break(Deadlock());
    return;
  }
  const uint64_t generation = barrier_generation_;
  barrier_done_.wait(lock, [&] { return barrier_generation_ != generation; });
}

// Counts `tid` in at the barrier, or breaks the block when the barrier can
// never complete.
bool BlockState::ArriveAtBarrier(int tid, const char* file, int line) {
  Warp& w = WarpOf(tid);
  if (w.arrived != 0) {
    Break(absl::StrCat(WarpOpMissed(w, tid), Thread(tid),
                       " waits at SyncThreads() at ", Site(file, line),
                       " instead"));
    return false;
  }
  if (first_returned_ >= 0) {
    Break(absl::StrCat("divergent SyncThreads() at ", Site(file, line), ": ",
                       Thread(tid), " reached it after ",
                       Thread(first_returned_), " returned, in ", Epoch()));
    return false;
  }
  if (barrier_waiting_ == 0) {
    barrier_first_ = tid;
    barrier_file_ = file;
    barrier_line_ = line;
  } else if (!SameSite(file, line, barrier_file_, barrier_line_)) {
    Break(absl::StrCat("divergent SyncThreads(): ", Thread(barrier_first_),
                       " waits at ", Site(barrier_file_, barrier_line_),
                       " and ", Thread(tid), " at ", Site(file, line), ", in ",
                       Epoch()));
    return false;
  }
  ++barrier_waiting_;
  w.at_barrier |= Bit(tid % kWarpSize);
  return true;
}

void BlockState::CompleteBarrier() {
  ReportPoisonRead();
  ++epoch_;
  barrier_waiting_ = 0;
  for (auto& w : warps_) w->at_barrier = 0;
  ++barrier_generation_;
  barrier_done_.notify_all();
}

// ---------------------------------------------------------------------------
// Warp ops.

uint64_t BlockState::WarpOp(int tid, WarpOpKind kind, uint64_t value, int param,
                            const char* file, int line) {
  std::unique_lock<std::mutex> lock(mu_);
  const int lane = tid % kWarpSize;
  if (broken_ || !ArriveAtWarpOp(tid, kind, value, param, file, line)) {
    return AloneResult(kind, value, lane);
  }
  Warp& w = WarpOf(tid);
  if (w.arrived == 0xffffffffu) {
    CompleteWarpOp(w);
    return w.results[lane];
  }
  if (BlockedThreads() == running_) {
    Break(Deadlock());  // sets this lane's result too
    return w.results[lane];
  }
  const uint64_t generation = w.generation;
  w.done.wait(lock, [&] { return w.generation != generation; });
  // No later op can overwrite the result first: it needs this lane too.
  return w.results[lane];
}

bool BlockState::ArriveAtWarpOp(int tid, WarpOpKind kind, uint64_t value,
                                int param, const char* file, int line) {
  Warp& w = WarpOf(tid);
  const int lane = tid % kWarpSize;
  if (w.size < kWarpSize) {
    Break(absl::StrCat("warp op ", OpAt(kind, file, line), " in warp ",
                       tid / kWarpSize, ", which has only ", w.size,
                       " threads: warp ops need "
                       "full warps, and the block's ",
                       num_threads_, " threads are not a multiple of 32"));
    return false;
  }
  if (w.first_returned >= 0) {
    Break(absl::StrCat("warp op ", OpAt(kind, file, line),
                       " not reached by all 32 lanes of warp ", tid / kWarpSize,
                       ": ", Thread(tid), " reached it after ",
                       Thread(w.first_returned), " returned"));
    return false;
  }
  if (w.at_barrier != 0 ||
      (w.arrived != 0 &&
       (w.op != kind || !SameSite(file, line, w.file, w.line)))) {
    Break(absl::StrCat(
        "warp op ", OpAt(kind, file, line),
        " not reached by all 32 lanes of warp ", tid / kWarpSize, ": ",
        Thread(tid), " is there while ",
        w.at_barrier != 0
            ? absl::StrCat("lane(s) ", Lanes(w.at_barrier),
                           " wait at SyncThreads() at ",
                           Site(barrier_file_, barrier_line_))
            : absl::StrCat("lane(s) ", Lanes(w.arrived), " wait at ",
                           OpAt(w.op, w.file, w.line))));
    return false;
  }
  if (w.arrived == 0) {
    w.op = kind;
    w.file = file;
    w.line = line;
  }
  w.values[lane] = value;
  w.params[lane] = param;
  w.arrived |= Bit(lane);
  return true;
}

void BlockState::CompleteWarpOp(Warp& w) {
  if (w.op == WarpOpKind::kWmma) {  // one tile: the same pointer, ldm and layout in every lane
    for (int lane = 1; lane < kWarpSize; ++lane) {
      if (w.values[lane] == w.values[0]) continue;
      Fail(absl::StrCat("wmma call at ", Site(w.file, w.line),
                        ": the lanes of a warp pass different arguments (lane 0 and lane ",
                        lane, ")"));
      break;
    }
  }
  uint32_t ballot = 0;
  for (int lane = 0; lane < kWarpSize; ++lane) {
    if (w.values[lane] != 0) ballot |= Bit(lane);
  }
  for (int lane = 0; lane < kWarpSize; ++lane) {
    w.results[lane] = LaneResult(w.op, w.values, w.params, lane, ballot);
  }
  w.arrived = 0;
  ++w.generation;
  w.done.notify_all();
}

// ---------------------------------------------------------------------------
// Threads returning.

void BlockState::ThreadReturned(int tid) {
  std::lock_guard<std::mutex> lock(mu_);
  --running_;
  Warp& w = WarpOf(tid);
  if (w.first_returned < 0) w.first_returned = tid;
  if (first_returned_ < 0) first_returned_ = tid;
  if (!broken_) CheckReturn(tid);
}

// A returned thread never arrives anywhere: whoever waits for it now
// waits forever.
void BlockState::CheckReturn(int tid) {
  Warp& w = WarpOf(tid);
  if (w.arrived != 0) {
    Break(absl::StrCat(WarpOpMissed(w, tid), Thread(tid), " returned"));
  } else if (barrier_waiting_ > 0) {
    Break(absl::StrCat("divergent SyncThreads() at ",
                       Site(barrier_file_, barrier_line_), ": ", Thread(tid),
                       " returned while ", barrier_waiting_,
                       " thread(s) wait there (", Thread(barrier_first_),
                       " first), in ", Epoch()));
  } else if (running_ > 0 && BlockedThreads() == running_) {
    Break(Deadlock());
  }
}

// ---------------------------------------------------------------------------
// Shared memory.

SharedArrayState* BlockState::Declare(const SharedSite* site,
                                      size_t element_size, int64_t count,
                                      const void* poison) {
  std::lock_guard<std::mutex> lock(mu_);
  std::unique_ptr<SharedArrayState>& a = arrays_[site];
  if (a == nullptr) {
    a = std::make_unique<SharedArrayState>(site, element_size, count, poison);
  }
  if (a->block_serial != serial_) {
    a->Reset();
    a->block_serial = serial_;
  }
  return a.get();
}

void BlockState::Load(SharedArrayState* array, int64_t index, int tid,
                      void* out) {
  std::lock_guard<std::mutex> lock(mu_);
  const unsigned char* from = array->sink.data();
  if (InBounds(*array, index, tid, "read")) {
    from = &array->bytes[index * array->element_size];
    if (error_.empty()) RecordRead(*array, index, tid);
  }
  std::memcpy(out, from, array->element_size);
}

void BlockState::Peek(SharedArrayState* array, int64_t index, int tid, void* out) {
  std::lock_guard<std::mutex> lock(mu_);
  const unsigned char* from = array->sink.data();
  if (InBounds(*array, index, tid, "read")) from = &array->bytes[index * array->element_size];
  std::memcpy(out, from, array->element_size);
}

void BlockState::Store(SharedArrayState* array, int64_t index, int tid,
                       const void* in) {
  std::lock_guard<std::mutex> lock(mu_);
  unsigned char* to = array->sink.data();
  if (InBounds(*array, index, tid, "wrote")) {
    to = &array->bytes[index * array->element_size];
    if (error_.empty()) RecordWrite(*array, index, tid);
  }
  std::memcpy(to, in, array->element_size);
}

bool BlockState::InBounds(const SharedArrayState& a, int64_t index, int tid,
                          const char* access) {
  if (index >= 0 && index < a.count) return true;
  Fail(absl::StrCat("out-of-bounds shared index: ", Thread(tid), " ", access,
                    " ", a.site->name, "[", index, "] of ", a.count,
                    " elements (declared at ", Site(a.site->file, a.site->line),
                    "), in ", Epoch()));
  return false;
}

std::string BlockState::Element(const SharedArrayState& a,
                                int64_t index) const {
  return absl::StrCat(a.site->name, "[", index, "] (declared at ",
                      Site(a.site->file, a.site->line), ")");
}

void BlockState::RecordRead(SharedArrayState& a, int64_t index, int tid) {
  ElementHistory& h = a.history[index];
  if (h.write_epoch == epoch_ && h.writer != tid) {
    Fail(absl::StrCat("shared-memory race on ", Element(a, index), " in ",
                      Epoch(), ": ", Thread(h.writer), " wrote it and ",
                      Thread(tid),
                      " read it with no SyncThreads() between them"));
    return;
  }
  if (!h.written && !poison_read_) poison_read_ = PoisonRead{&a, index, tid};
  if (h.read_epoch != epoch_) {
    h.read_epoch = epoch_;
    h.reader = tid;
    h.other_reader = -1;
  } else if (h.reader != tid && h.other_reader < 0) {
    h.other_reader = tid;
  }
}

void BlockState::RecordWrite(SharedArrayState& a, int64_t index, int tid) {
  ElementHistory& h = a.history[index];
  const char* other_did = nullptr;
  int other = -1;
  if (h.write_epoch == epoch_ && h.writer != tid) {
    other_did = "wrote";
    other = h.writer;
  } else if (h.read_epoch == epoch_ && h.reader != tid) {
    other_did = "read";
    other = h.reader;
  } else if (h.read_epoch == epoch_ && h.other_reader >= 0) {
    other_did = "read";
    other = h.other_reader;
  }
  if (other_did != nullptr) {
    Fail(absl::StrCat("shared-memory race on ", Element(a, index), " in ",
                      Epoch(), ": ", Thread(other), " ", other_did, " it and ",
                      Thread(tid),
                      " wrote it with no SyncThreads() between them"));
    return;
  }
  h.written = true;
  h.write_epoch = epoch_;
  h.writer = tid;
}

// At the end of an epoch. Had another thread written the element in the
// epoch, the write would have been reported as a race with the read.
void BlockState::ReportPoisonRead() {
  if (poison_read_ && error_.empty()) {
    Fail(absl::StrCat("read of ",
                      Element(*poison_read_->array, poison_read_->index),
                      ", never written in this block (poisoned), by ",
                      Thread(poison_read_->tid), " in ", Epoch()));
  }
  poison_read_.reset();
}

// ---------------------------------------------------------------------------
// Failing.

void BlockState::Misuse(int tid, const std::string& what) {
  std::lock_guard<std::mutex> lock(mu_);
  Fail(absl::StrCat(what, " (", Thread(tid), ")"));
}

void BlockState::Fail(std::string message) {
  if (error_.empty()) error_ = std::move(message);
}

// Releases every waiting thread with what it would get alone, and makes
// barriers and warp ops stop waiting: the misuse means they could not
// complete, and the threads must still run to their end.
void BlockState::Break(std::string message) {
  Fail(std::move(message));
  broken_ = true;
  barrier_waiting_ = 0;
  ++barrier_generation_;
  barrier_done_.notify_all();
  for (auto& w : warps_) {
    w->at_barrier = 0;
    if (w->arrived == 0) continue;
    for (int lane = 0; lane < kWarpSize; ++lane) {
      if (w->arrived & Bit(lane)) {
        w->results[lane] = AloneResult(w->op, w->values[lane], lane);
      }
    }
    w->arrived = 0;
    ++w->generation;
    w->done.notify_all();
  }
}

int BlockState::BlockedThreads() const {
  int blocked = barrier_waiting_;
  for (const auto& w : warps_) blocked += __builtin_popcount(w->arrived);
  return blocked;
}

// ---------------------------------------------------------------------------
// Words for the reports.

std::string BlockState::Thread(int tid) const {
  const unsigned t = static_cast<unsigned>(tid);
  return absl::StrCat("thread (", t % block_dim_.x, ",",
                      t / block_dim_.x % block_dim_.y, ",",
                      t / (block_dim_.x * block_dim_.y), ")");
}

// "0-15", "3", "0,2,4-7".
std::string BlockState::Lanes(uint32_t mask) const {
  std::string out;
  for (int lane = 0; lane < kWarpSize;) {
    if (!(mask & Bit(lane))) {
      ++lane;
      continue;
    }
    int last = lane;
    while (last + 1 < kWarpSize && (mask & Bit(last + 1))) ++last;
    absl::StrAppend(&out, out.empty() ? "" : ",", lane);
    if (last > lane) absl::StrAppend(&out, "-", last);
    lane = last + 1;
  }
  return out;
}

std::string BlockState::Epoch() const {
  if (epoch_ == 0) return "epoch 0 (before the first SyncThreads())";
  return absl::StrCat("epoch ", epoch_, " (after SyncThreads() #", epoch_, ")");
}

std::string BlockState::WarpOpMissed(const Warp& w, int tid) const {
  return absl::StrCat("warp op ", OpAt(w.op, w.file, w.line),
                      " not reached by all 32 lanes of warp ", tid / kWarpSize,
                      ": lane(s) ", Lanes(w.arrived), " wait there and ");
}

std::string BlockState::Deadlock() const {
  return absl::StrCat("deadlock: all ", running_,
                      " running threads of the block wait (", barrier_waiting_,
                      " at SyncThreads(), the rest at warp ops) and none "
                      "of the waits can complete");
}

}  // namespace pipeserve::simt::internal
