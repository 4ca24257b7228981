// What the threads of one emulated block share (simt_host.h): the barrier,
// the warps' exchange slots, and the shared arrays with the history of
// every element that finds races, reads of poisoned storage and bad
// indices. Internal to the emulator (emulate.cc).
//
// Thread safety: every method may be called by any of the block's threads
// at once; one mutex guards everything, so the emulator's own accesses are
// race-free even when the kernel's are not (a racy kernel is reported, not
// undefined behaviour here).
#ifndef PIPESERVE_RUNTIME_CUDA_SIMT_BLOCK_STATE_H_
#define PIPESERVE_RUNTIME_CUDA_SIMT_BLOCK_STATE_H_

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "runtime/cuda/simt/simt_host.h"

namespace pipeserve::simt::internal {

// Who touched one shared element in which epoch (the number of barriers
// the block has passed).
struct ElementHistory {
  static constexpr uint32_t kNever = UINT32_MAX;
  bool written = false;  // at all, in this block
  uint32_t write_epoch = kNever;
  int writer = -1;  // the last writer, in write_epoch
  uint32_t read_epoch = kNever;
  int reader = -1;        // the first reader in read_epoch
  int other_reader = -1;  // a second, different one, if any
};

// One SIMT_SHARED array of the block: bytes is [count, element_size].
struct SharedArrayState {
  SharedArrayState(const SharedSite* site, size_t element_size, int64_t count,
                   const void* poison);
  // Back to the block-start state: poisoned, never touched.
  void Reset();

  const SharedSite* const site;
  const size_t element_size;
  const int64_t count;
  uint64_t block_serial = 0;          // the block Reset last ran for
  std::vector<unsigned char> poison;  // one element
  std::vector<unsigned char> bytes;
  std::vector<ElementHistory> history;
  std::vector<unsigned char> sink;  // where out-of-bounds accesses go
};

class BlockState {
 public:
  // block_dim has 1 to 1024 threads.
  explicit BlockState(Dim3 block_dim);
  BlockState(const BlockState&) = delete;
  BlockState& operator=(const BlockState&) = delete;

  // Begins the next block: all threads running, shared arrays poisoned
  // again on their first declaration. Call while no thread runs.
  void Start();
  // After every thread returned: kInternal with the block's first
  // violation (without saying which block), or OK.
  absl::Status Finish();

  // The calls of thread `tid` (linear id in the block).
  void SyncThreads(int tid, const char* file, int line);
  uint64_t WarpOp(int tid, WarpOpKind kind, uint64_t value, int param,
                  const char* file, int line);
  void ThreadReturned(int tid);
  // A misuse found outside the bookkeeping here (ReportMisuse).
  void Misuse(int tid, const std::string& what);
  SharedArrayState* Declare(const SharedSite* site, size_t element_size,
                            int64_t count, const void* poison);
  void Load(SharedArrayState* array, int64_t index, int tid, void* out);
  void Store(SharedArrayState* array, int64_t index, int tid, const void* in);
  // Load without recording the access (a wmma load's elements that another
  // lane of the warp reads on the hardware; bounds are still checked).
  void Peek(SharedArrayState* array, int64_t index, int tid, void* out);

 private:
  struct Warp {
    int size = kWarpSize;     // lanes that exist (the last warp may be partial)
    uint32_t arrived = 0;     // lanes waiting at the current warp op
    uint32_t at_barrier = 0;  // lanes waiting at SyncThreads()
    int first_returned = -1;  // tid of the first lane that returned
    WarpOpKind op = WarpOpKind::kShfl;
    const char* file = "";
    int line = 0;
    uint64_t generation = 0;  // completed (or abandoned) warp ops
    uint64_t values[kWarpSize] = {};
    int params[kWarpSize] = {};
    uint64_t results[kWarpSize] = {};
    std::condition_variable done;
  };
  struct PoisonRead {
    const SharedArrayState* array;
    int64_t index;
    int tid;
  };

  bool ArriveAtBarrier(int tid, const char* file, int line);
  void CompleteBarrier();
  bool ArriveAtWarpOp(int tid, WarpOpKind kind, uint64_t value, int param,
                      const char* file, int line);
  void CompleteWarpOp(Warp& w);
  void CheckReturn(int tid);
  bool InBounds(const SharedArrayState& a, int64_t index, int tid,
                const char* access);
  void RecordRead(SharedArrayState& a, int64_t index, int tid);
  void RecordWrite(SharedArrayState& a, int64_t index, int tid);
  void ReportPoisonRead();

  void Fail(std::string message);
  void Break(std::string message);
  int BlockedThreads() const;
  Warp& WarpOf(int tid) { return *warps_[tid / kWarpSize]; }

  std::string Thread(int tid) const;
  std::string Lanes(uint32_t mask) const;
  std::string Epoch() const;
  std::string Element(const SharedArrayState& a, int64_t index) const;
  std::string WarpOpMissed(const Warp& w, int tid) const;
  std::string Deadlock() const;

  const Dim3 block_dim_;
  const int num_threads_;

  std::mutex mu_;
  std::condition_variable barrier_done_;
  // Everything below is guarded by mu_.
  int running_ = 0;          // threads that have not returned
  int first_returned_ = -1;  // tid of the first thread that returned
  int barrier_waiting_ = 0;
  int barrier_first_ = -1;  // the first thread waiting, and where
  const char* barrier_file_ = "";
  int barrier_line_ = 0;
  uint64_t barrier_generation_ = 0;
  uint32_t epoch_ = 0;
  // Once a barrier or warp op is misused nothing waits any more, so every
  // thread runs to its end.
  bool broken_ = false;
  std::string error_;  // the first violation
  // The epoch's first read of an element never written; a poison read
  // unless the epoch finds a race first (a missing barrier shows as both).
  std::optional<PoisonRead> poison_read_;
  std::vector<std::unique_ptr<Warp>> warps_;
  uint64_t serial_ = 0;  // blocks started
  absl::flat_hash_map<const SharedSite*, std::unique_ptr<SharedArrayState>>
      arrays_;
};

}  // namespace pipeserve::simt::internal

#endif  // PIPESERVE_RUNTIME_CUDA_SIMT_BLOCK_STATE_H_
