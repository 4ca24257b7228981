// The emulator's driver (simt_host.h): checks the launch, runs the blocks
// one after another on a pool of one host thread per CUDA thread of a
// block, and answers a kernel's calls (ThreadIdx(), SyncThreads(), shared
// accesses, ...) from the calling host thread's context.
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "runtime/cuda/simt/block_state.h"
#include "runtime/cuda/simt/simt_host.h"

namespace pipeserve::simt {
namespace internal {
namespace {

// Set while a pool thread runs a kernel.
thread_local const ThreadContext* current_thread = nullptr;

std::string Dims(Dim3 d) {
  return absl::StrCat("(", d.x, ",", d.y, ",", d.z, ")");
}

// CUDA's limits for compute capability 9.0.
absl::Status ValidateLaunch(Dim3 grid, Dim3 block) {
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.x > 1024 || block.y > 1024 ||
      block.z > 64) {
    return absl::InvalidArgumentError(absl::StrCat(
        "simt::Emulate: block ", Dims(block),
        " must have 1 to 1024 threads, x and y at most 1024, z at most 64"));
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu ||
      grid.y > 65535 || grid.z > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("simt::Emulate: grid ", Dims(grid),
                     " must have x in [1, 2^31), y and z in [1, 65535]"));
  }
  return absl::OkStatus();
}

// One launch: the pool's threads run every block; the calling thread posts
// the blocks one at a time and collects each block's verdict.
class Emulation {
 public:
  Emulation(Dim3 grid, Dim3 block, absl::FunctionRef<void()> kernel)
      : grid_(grid),
        block_(block),
        num_threads_(static_cast<int>(block.x * block.y * block.z)),
        kernel_(kernel),
        state_(block) {}
  Emulation(const Emulation&) = delete;
  Emulation& operator=(const Emulation&) = delete;
  ~Emulation();

  absl::Status Run();

 private:
  void Work(int tid);
  bool WaitForBlock(uint64_t* round, Dim3* block_idx);
  absl::Status RunBlock(Dim3 block_idx);

  const Dim3 grid_;
  const Dim3 block_;
  const int num_threads_;
  const absl::FunctionRef<void()> kernel_;
  BlockState state_;

  std::mutex mu_;
  std::condition_variable posted_;    // a block to run, or shutdown_
  std::condition_variable finished_;  // all threads returned from it
  // Guarded by mu_.
  uint64_t round_ = 0;  // blocks posted
  Dim3 block_idx_;
  int returned_ = 0;  // threads done with the current block
  bool shutdown_ = false;

  std::vector<std::thread> pool_;
};

Emulation::~Emulation() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    shutdown_ = true;
  }
  posted_.notify_all();
  for (std::thread& t : pool_) t.join();
}

absl::Status Emulation::Run() {
  for (int tid = 0; tid < num_threads_; ++tid) {
    pool_.emplace_back([this, tid] { Work(tid); });
  }
  for (unsigned z = 0; z < grid_.z; ++z) {
    for (unsigned y = 0; y < grid_.y; ++y) {
      for (unsigned x = 0; x < grid_.x; ++x) {
        RETURN_IF_ERROR(RunBlock(Dim3(x, y, z)));
      }
    }
  }
  return absl::OkStatus();
}

absl::Status Emulation::RunBlock(Dim3 block_idx) {
  state_.Start();  // no pool thread runs between blocks
  {
    std::lock_guard<std::mutex> lock(mu_);
    block_idx_ = block_idx;
    returned_ = 0;
    ++round_;
  }
  posted_.notify_all();
  {
    std::unique_lock<std::mutex> lock(mu_);
    finished_.wait(lock, [&] { return returned_ == num_threads_; });
  }
  absl::Status s = state_.Finish();
  if (s.ok()) return s;
  return absl::InternalError(
      absl::StrCat("simt: block ", Dims(block_idx), " of grid ", Dims(grid_),
                   ", block size ", Dims(block_), ": ", s.message()));
}

void Emulation::Work(int tid) {
  ThreadContext context;
  context.thread_idx = Dim3(tid % block_.x, tid / block_.x % block_.y,
                            tid / (block_.x * block_.y));
  context.block_dim = block_;
  context.grid_dim = grid_;
  context.linear_id = tid;
  context.block = &state_;
  current_thread = &context;
  uint64_t round = 0;
  while (WaitForBlock(&round, &context.block_idx)) {
    kernel_();
    state_.ThreadReturned(tid);
    std::lock_guard<std::mutex> lock(mu_);
    if (++returned_ == num_threads_) finished_.notify_one();
  }
  current_thread = nullptr;
}

// The next block after `*round`, or false at shutdown.
bool Emulation::WaitForBlock(uint64_t* round, Dim3* block_idx) {
  std::unique_lock<std::mutex> lock(mu_);
  posted_.wait(lock, [&] { return shutdown_ || round_ != *round; });
  if (shutdown_) return false;
  *round = round_;
  *block_idx = block_idx_;
  return true;
}

}  // namespace

const ThreadContext& Current() {
  if (current_thread == nullptr) {
    std::fputs(
        "simt: a kernel's ThreadIdx(), SyncThreads(), SIMT_SHARED, ... "
        "called outside simt::Emulate\n",
        stderr);
    std::abort();
  }
  return *current_thread;
}

absl::Status RunEmulation(Dim3 grid, Dim3 block,
                          absl::FunctionRef<void()> kernel_call) {
  if (current_thread != nullptr) {
    return absl::FailedPreconditionError(
        "simt::Emulate called from inside an emulated kernel");
  }
  RETURN_IF_ERROR(ValidateLaunch(grid, block));
  Emulation emulation(grid, block, kernel_call);
  return emulation.Run();
}

uint64_t WarpOp(WarpOpKind kind, uint64_t value, int param, const char* file,
                int line) {
  const ThreadContext& t = Current();
  return t.block->WarpOp(t.linear_id, kind, value, param, file, line);
}

SharedArrayState* DeclareShared(const SharedSite* site, size_t element_size,
                                int64_t count, const void* poison) {
  return Current().block->Declare(site, element_size, count, poison);
}

void SharedLoad(SharedArrayState* array, int64_t index, void* out) {
  const ThreadContext& t = Current();
  t.block->Load(array, index, t.linear_id, out);
}

void SharedStore(SharedArrayState* array, int64_t index, const void* in) {
  const ThreadContext& t = Current();
  t.block->Store(array, index, t.linear_id, in);
}

void SharedPeek(SharedArrayState* array, int64_t index, void* out) {
  const ThreadContext& t = Current();
  t.block->Peek(array, index, t.linear_id, out);
}

void ReportMisuse(const std::string& what, const char* file, int line) {
  const ThreadContext& t = Current();
  t.block->Misuse(t.linear_id, absl::StrCat(what, " at ", file, ":", line));
}

}  // namespace internal

void SyncThreads(const char* file, int line) {
  const internal::ThreadContext& t = internal::Current();
  t.block->SyncThreads(t.linear_id, file, line);
}

}  // namespace pipeserve::simt
