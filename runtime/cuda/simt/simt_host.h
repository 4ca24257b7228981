// simt.h in an ordinary C++ build: CUDA's execution model emulated on the
// CPU. Include simt.h, not this file.
//
// Emulate(grid, block, kernel_call) runs the blocks one after another; each
// block's threads are real threads (a pool made once per call), so a
// barrier really waits and warp ops really exchange values. Shared arrays
// live in the block's storage, poisoned at block start (NaN for floating
// types, 0xAB bytes otherwise), and every access goes through a proxy that
// checks the index and records who touched the element in which epoch (the
// stretch between two barriers). Findings come from that bookkeeping, not
// from timing, so a missing barrier is reported however the host happened
// to schedule the threads. The first violation is the result:
//   * a shared element touched by two threads in one epoch, one of them
//     writing (a race: a SyncThreads() is missing);
//   * a shared element read but never written in this block;
//   * a shared index outside [0, N);
//   * SyncThreads() waited at while another thread of the block returned or
//     waits at a different SyncThreads() call (divergent barrier);
//   * a warp op not reached by all 32 lanes of the warp (some returned, or
//     wait at another warp op or at a barrier), or in a partial warp.
// Barrier and warp violations release the waiting threads instead of
// deadlocking; from then on the block's barriers and warp ops no longer wait
// (warp ops return the lane's own value) so its threads run to the end. The
// blocks after a failed one do not run.
//
// Not seen or not offered: global memory is plain host memory (no bounds,
// race or uninitialized-read checks, though ASan and TSan see the host side
// of it); no dynamic (extern) shared memory, atomics, SyncWarp or
// partial-mask warp ops; a shared element is reached only by indexing (no
// pointers into it); no timing, occupancy, register or shared-memory-size
// limits; fast-math rounding. Cost: every barrier wakes the block's
// threads, and every shared access takes a lock, so keep emulated grids to
// test sizes (hundreds of blocks, not millions).
#ifndef PIPESERVE_RUNTIME_CUDA_SIMT_SIMT_HOST_H_
#define PIPESERVE_RUNTIME_CUDA_SIMT_SIMT_HOST_H_

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>

#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "runtime/cuda/simt/host_numbers.h"

// Host builds: kernels are ordinary inline functions, so a header that
// defines them can be included by several files.
#define SIMT_GLOBAL inline
#define SIMT_DEVICE inline
#define SIMT_HOST_DEVICE inline

namespace pipeserve::simt {

// Lanes per warp, on every NVIDIA GPU so far and in the emulator.
constexpr int kWarpSize = 32;

// CUDA's dim3: grid and block sizes, implicitly from one number as in
// `<<<rows, 128>>>`.
struct Dim3 {
  constexpr Dim3(unsigned x = 1, unsigned y = 1, unsigned z = 1)
      : x(x), y(y), z(z) {}
  unsigned x, y, z;
};

namespace internal {

class BlockState;
class SharedArrayState;

// Who the calling host thread is pretending to be.
struct ThreadContext {
  Dim3 thread_idx, block_idx, block_dim, grid_dim;
  int linear_id = 0;  // x-major index in the block
  BlockState* block = nullptr;
};

// The calling thread's context; aborts outside a kernel run by Emulate.
const ThreadContext& Current();

absl::Status RunEmulation(Dim3 grid, Dim3 block,
                          absl::FunctionRef<void()> kernel_call);

}  // namespace internal

// Runs `kernel_call` once per thread of a `grid` of `block`s, each call on a
// host thread whose ThreadIdx() etc. are those of the thread it emulates.
// `kernel_call` is called concurrently and must only capture what the kernel
// takes (`[&] { MyKernel<float>(x, y, n); }`). Blocks run one at a time.
// Returns kInvalidArgument for sizes CUDA would refuse (a block of 0 or more
// than 1024 threads, ...), kFailedPrecondition when called from a kernel,
// and kInternal naming the first violation (see above) with its block,
// thread(s), shared array and index, and epoch; the blocks after the one
// that failed do not run.
template <typename F>
absl::Status Emulate(Dim3 grid, Dim3 block, F&& kernel_call) {
  return internal::RunEmulation(grid, block, kernel_call);
}

inline Dim3 ThreadIdx() { return internal::Current().thread_idx; }
inline Dim3 BlockIdx() { return internal::Current().block_idx; }
inline Dim3 BlockDim() { return internal::Current().block_dim; }
inline Dim3 GridDim() { return internal::Current().grid_dim; }
inline int LinearThreadId() { return internal::Current().linear_id; }
inline int LaneId() { return LinearThreadId() % kWarpSize; }
inline int WarpId() { return LinearThreadId() / kWarpSize; }

// The call site (defaulted, never passed) tells the emulator whether all
// threads wait at the same barrier, and names it in reports.
void SyncThreads(const char* file = __builtin_FILE(),
                 int line = __builtin_LINE());

namespace internal {

enum class WarpOpKind {
  kShfl,
  kShflXor,
  kShflDown,
  kShflUp,
  kBallot,
  kAny,
  kAll,
  kWmma,  // a wmma::*_sync fragment op (wmma_host.h): every lane its own value
};

// Waits for the 32 lanes of the caller's warp to arrive with their `value`
// and `param` and returns the caller's result (a value, or for the vote
// ops a ballot mask / 0 or 1).
uint64_t WarpOp(WarpOpKind kind, uint64_t value, int param, const char* file,
                int line);

// Reports a misuse the emulator cannot express as a shared access or a warp
// op (a wmma pointer or stride the hardware would refuse) as the block's
// violation, naming the calling thread.
void ReportMisuse(const std::string& what, const char* file, int line);

// Shuffled values travel through the warp's slots as up to 8 raw bytes.
template <typename T>
uint64_t ToSlot(T v) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8,
                "warp shuffles move values of at most 8 bytes");
  uint64_t slot = 0;
  std::memcpy(&slot, &v, sizeof(T));
  return slot;
}

template <typename T>
T FromSlot(uint64_t slot) {
  T v;
  std::memcpy(&v, &slot, sizeof(T));
  return v;
}

}  // namespace internal

// The value `v` of lane `src_lane` (taken modulo 32).
template <typename T>
T Shfl(T v, int src_lane, const char* file = __builtin_FILE(),
       int line = __builtin_LINE()) {
  return internal::FromSlot<T>(internal::WarpOp(
      internal::WarpOpKind::kShfl, internal::ToSlot(v), src_lane, file, line));
}

// The value of lane LaneId() ^ lane_mask (lane_mask taken modulo 32).
template <typename T>
T ShflXor(T v, int lane_mask, const char* file = __builtin_FILE(),
          int line = __builtin_LINE()) {
  return internal::FromSlot<T>(internal::WarpOp(internal::WarpOpKind::kShflXor,
                                                internal::ToSlot(v), lane_mask,
                                                file, line));
}

// The value of lane LaneId() + delta, or the caller's own past lane 31.
template <typename T>
T ShflDown(T v, int delta, const char* file = __builtin_FILE(),
           int line = __builtin_LINE()) {
  return internal::FromSlot<T>(internal::WarpOp(
      internal::WarpOpKind::kShflDown, internal::ToSlot(v), delta, file, line));
}

// The value of lane LaneId() - delta, or the caller's own below lane 0.
template <typename T>
T ShflUp(T v, int delta, const char* file = __builtin_FILE(),
         int line = __builtin_LINE()) {
  return internal::FromSlot<T>(internal::WarpOp(
      internal::WarpOpKind::kShflUp, internal::ToSlot(v), delta, file, line));
}

// Bit i set when lane i's `p` is true.
inline uint32_t Ballot(bool p, const char* file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
  return static_cast<uint32_t>(
      internal::WarpOp(internal::WarpOpKind::kBallot, p, 0, file, line));
}

inline bool Any(bool p, const char* file = __builtin_FILE(),
                int line = __builtin_LINE()) {
  return internal::WarpOp(internal::WarpOpKind::kAny, p, 0, file, line) != 0;
}

inline bool All(bool p, const char* file = __builtin_FILE(),
                int line = __builtin_LINE()) {
  return internal::WarpOp(internal::WarpOpKind::kAll, p, 0, file, line) != 0;
}

namespace internal {

// One SIMT_SHARED declaration; its address identifies the array.
struct SharedSite {
  const char* name;
  const char* file;
  int line;
};

// The calling block's storage for `site`, made and poisoned on the block's
// first declaration (every thread of the block gets the same).
SharedArrayState* DeclareShared(const SharedSite* site, size_t element_size,
                                int64_t count, const void* poison);
// Copy element `index` out of / into the array, checking and recording the
// access for the calling thread.
void SharedLoad(SharedArrayState* array, int64_t index, void* out);
void SharedStore(SharedArrayState* array, int64_t index, const void* in);
// Element `index` without recording the access (wmma_host.h).
void SharedPeek(SharedArrayState* array, int64_t index, void* out);

template <typename T>
T Poison() {
  T v;
  if constexpr (std::is_floating_point_v<T>) {
    v = std::numeric_limits<T>::quiet_NaN();
  } else if constexpr (std::is_same_v<T, Half> || std::is_same_v<T, Bf16>) {
    v.bits = 0x7fff;
  } else {
    std::memset(&v, 0xAB, sizeof(T));
  }
  return v;
}

// What `name[i]` is on the host: reads convert to T, writes assign.
template <typename T>
class SharedRef {
 public:
  SharedRef(SharedArrayState* array, int64_t index)
      : array_(array), index_(index) {}
  SharedRef(const SharedRef&) = default;

  operator T() const {
    T v;
    SharedLoad(array_, index_, &v);
    return v;
  }
  const SharedRef& operator=(T v) const {
    SharedStore(array_, index_, &v);
    return *this;
  }
  // `a[i] = a[j]` copies the element, not the proxy.
  const SharedRef& operator=(const SharedRef& other) const {
    return *this = static_cast<T>(other);
  }
  // Read-modify-write: recorded as this thread's read, then its write.
  template <typename U>
  const SharedRef& operator+=(const U& v) const {
    return *this = T(Get() + v);
  }
  template <typename U>
  const SharedRef& operator-=(const U& v) const {
    return *this = T(Get() - v);
  }
  template <typename U>
  const SharedRef& operator*=(const U& v) const {
    return *this = T(Get() * v);
  }
  template <typename U>
  const SharedRef& operator/=(const U& v) const {
    return *this = T(Get() / v);
  }
  template <typename U>
  const SharedRef& operator|=(const U& v) const {
    return *this = T(Get() | v);
  }
  template <typename U>
  const SharedRef& operator&=(const U& v) const {
    return *this = T(Get() & v);
  }
  template <typename U>
  const SharedRef& operator^=(const U& v) const {
    return *this = T(Get() ^ v);
  }
  const SharedRef& operator++() const { return *this = T(Get() + 1); }
  const SharedRef& operator--() const { return *this = T(Get() - 1); }
  T operator++(int) const {
    T old = Get();
    *this = T(old + 1);
    return old;
  }
  T operator--(int) const {
    T old = Get();
    *this = T(old - 1);
    return old;
  }

 private:
  T Get() const { return static_cast<T>(*this); }

  SharedArrayState* array_;
  int64_t index_;
};

// What `name` is on the host: a view of the block's array from `offset`,
// indexed like a pointer; indices are checked against the whole array.
template <typename T>
class SharedArray {
 public:
  static_assert(std::is_trivially_copyable_v<T>,
                "SIMT_SHARED holds trivially copyable values");

  SharedArray(const SharedSite* site, int64_t count)
      : array_(Declare(site, count)) {}

  SharedRef<T> operator[](int64_t i) const {
    return SharedRef<T>(array_, offset_ + i);
  }
  SharedArray operator+(int64_t d) const { return SharedArray(*this, d); }
  SharedArray operator-(int64_t d) const { return SharedArray(*this, -d); }
  // Elements from the array's start (its storage is aligned as CUDA's
  // shared arrays are: wmma_host.h checks pointer alignment through this).
  int64_t offset() const { return offset_; }
  // Which array this views (wmma_host.h: every lane must name one tile).
  const void* array() const { return array_; }
  // Element i, its access not recorded (a wmma load's other lanes' share).
  T Peek(int64_t i) const {
    T v;
    SharedPeek(array_, offset_ + i, &v);
    return v;
  }

 private:
  SharedArray(const SharedArray& base, int64_t d)
      : array_(base.array_), offset_(base.offset_ + d) {}

  static SharedArrayState* Declare(const SharedSite* site, int64_t count) {
    const T poison = Poison<T>();
    return DeclareShared(site, sizeof(T), count, &poison);
  }

  SharedArrayState* array_;
  int64_t offset_ = 0;
};

}  // namespace internal

// What a SIMT_SHARED array is passed to a device function as (T* on CUDA).
template <typename T>
using SharedPtr = internal::SharedArray<T>;

inline float Exp(float x) { return std::exp(x); }
inline double Exp(double x) { return std::exp(x); }
inline float Log(float x) { return std::log(x); }
inline float Sqrt(float x) { return std::sqrt(x); }
inline float Rsqrt(float x) { return 1.0f / std::sqrt(x); }
inline float Tanh(float x) { return std::tanh(x); }
inline float Erf(float x) { return std::erf(x); }
inline float Max(float a, float b) { return std::fmax(a, b); }
inline float Min(float a, float b) { return std::fmin(a, b); }
inline float Abs(float x) { return std::fabs(x); }
inline float Cos(float x) { return std::cos(x); }
inline float Sin(float x) { return std::sin(x); }
inline float Pow(float x, float y) { return std::pow(x, y); }
inline float Fmod(float x, float y) { return std::fmod(x, y); }
inline float Floor(float x) { return std::floor(x); }
inline float CopySign(float x, float y) { return std::copysign(x, y); }

}  // namespace pipeserve::simt

// N must be a constant, as for __shared__ arrays; the static site gives
// each declaration (and each template instantiation) its own storage.
#define SIMT_UNROLL  // nvcc unrolls; the host compiler does as it likes
#define SIMT_SHARED(T, name, N)                                               \
  static_assert((N) > 0, "SIMT_SHARED(" #name "): N is a positive constant"); \
  static constexpr ::pipeserve::simt::internal::SharedSite name##_simt_site_{ \
      #name, __FILE__, __LINE__};                                             \
  const ::pipeserve::simt::internal::SharedArray<T> name(&name##_simt_site_,  \
                                                         (N))

#endif  // PIPESERVE_RUNTIME_CUDA_SIMT_SIMT_HOST_H_
