// A pool of per-run execution slots, so one stage program can serve several
// concurrent Run calls: each call takes a slot for its whole duration and
// gives it back. The CUDA program's slots hold a stream, a cuBLASLt handle
// and workspace, pinned staging and per-shape plans/graphs; the device
// emulator's hold its host arenas. Slots are made on demand (a program only
// ever run by one thread holds one) up to a maximum; beyond it a caller
// waits for one to come back.
//
//   SlotPool<Slot> pool(2, [] { return MakeSlot(); });
//   ASSIGN_OR_RETURN(SlotPool<Slot>::Lease s, pool.Acquire());
//   s->stream ...   // exclusive until `s` goes out of scope
#ifndef PIPESERVE_RUNTIME_CUDA_DEVICE_SLOTS_H_
#define PIPESERVE_RUNTIME_CUDA_DEVICE_SLOTS_H_

#include <algorithm>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"

namespace pipeserve {

template <typename Slot>
class SlotPool {
 public:
  using Factory = std::function<absl::StatusOr<std::unique_ptr<Slot>>()>;

  // Exclusive use of one slot; returns it to the pool when destroyed.
  class Lease {
   public:
    Lease(Lease&& o) noexcept
        : pool_(std::exchange(o.pool_, nullptr)), slot_(o.slot_) {}
    Lease& operator=(Lease&& o) noexcept {
      if (this != &o) {
        if (pool_ != nullptr) pool_->Release(slot_);
        pool_ = std::exchange(o.pool_, nullptr);
        slot_ = o.slot_;
      }
      return *this;
    }
    ~Lease() {
      if (pool_ != nullptr) pool_->Release(slot_);
    }
    Slot* get() const { return slot_; }
    Slot* operator->() const { return slot_; }
    Slot& operator*() const { return *slot_; }

   private:
    friend class SlotPool;
    Lease(SlotPool* pool, Slot* slot) : pool_(pool), slot_(slot) {}
    SlotPool* pool_;
    Slot* slot_;
  };

  // At most max(max_slots, 1) slots, each made by `make` when first needed.
  SlotPool(int max_slots, Factory make)
      : max_slots_(std::max(max_slots, 1)), make_(std::move(make)) {}
  SlotPool(const SlotPool&) = delete;
  SlotPool& operator=(const SlotPool&) = delete;
  // No lease may outlive the pool.
  ~SlotPool() = default;

  // The most recently returned free slot (so a single caller always gets
  // the same one, with its caches warm); else a new slot while fewer than
  // the maximum exist; else blocks until one is returned. A factory error
  // is returned as is (the next Acquire tries again). Thread-safe.
  absl::StatusOr<Lease> Acquire() {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      if (!free_.empty()) {
        Slot* s = free_.back();
        free_.pop_back();
        return Lease(this, s);
      }
      if (made_ < max_slots_) {
        ++made_;  // reserved; made outside the lock (it may be slow)
        lock.unlock();
        absl::StatusOr<std::unique_ptr<Slot>> s = make_();
        lock.lock();
        if (!s.ok()) {
          --made_;
          cv_.notify_one();  // a waiter may now make one itself
          return s.status();
        }
        Slot* raw = s->get();
        slots_.push_back(*std::move(s));
        return Lease(this, raw);
      }
      cv_.wait(lock);
    }
  }

  int max_slots() const { return max_slots_; }
  // Slots made so far (including those being made).
  int slots_made() const {
    std::lock_guard<std::mutex> lock(mu_);
    return made_;
  }
  // Calls fn on every slot made. Only while no lease is held (destructors,
  // tests).
  void ForEachIdle(const std::function<void(Slot&)>& fn) {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& s : slots_) fn(*s);
  }

 private:
  void Release(Slot* s) {
    // Notified under the lock, so checkers such as helgrind see it paired.
    std::lock_guard<std::mutex> lock(mu_);
    free_.push_back(s);
    cv_.notify_one();
  }

  const int max_slots_;
  const Factory make_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  int made_ = 0;
  std::vector<std::unique_ptr<Slot>> slots_;
  std::vector<Slot*> free_;  // a stack: the last returned is taken first
};

}  // namespace pipeserve

#endif  // PIPESERVE_RUNTIME_CUDA_DEVICE_SLOTS_H_
