#include "bench/cuda_limits.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <vector>

#include "common/status_macros.h"
#include "runtime/cuda/cuda_status.h"
#include "runtime/cuda/kernels/launch_args.h"
#include "runtime/cuda/kernels/transformer_kernels.h"

namespace pipeserve {
namespace {

// Dense bfloat16 tensor-core FLOPs per SM per clock (datacenter parts).
double Bf16FlopsPerSmClock(int major, int minor) {
  if (major == 8) return minor == 0 ? 2048 : 1024;  // A100; A10, L4, L40S
  if (major == 9) return 4096;                      // H100, H200
  if (major == 10) return 8192;                     // B200
  return 0;
}

// Median milliseconds of `iters` runs of `work` on `stream`, by events.
absl::StatusOr<double> MedianMs(cudaStream_t stream, int iters,
                                const std::function<absl::Status()>& work) {
  iters = std::max(iters, 1);
  RETURN_IF_ERROR(work());  // warm-up
  std::vector<cudaEvent_t> ev(iters + 1);
  for (auto& e : ev) CUDA_RETURN_IF_ERROR(cudaEventCreate(&e));
  absl::Status status;
  for (int i = 0; i < iters && status.ok(); ++i) {
    status = CudaStatus(cudaEventRecord(ev[i], stream), "cudaEventRecord");
    if (status.ok()) status = work();
  }
  if (status.ok()) status = CudaStatus(cudaEventRecord(ev[iters], stream), "cudaEventRecord");
  absl::Status sync = CudaStatus(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  std::vector<double> ms;
  for (int i = 0; i < iters && status.ok() && sync.ok(); ++i) {
    float t = 0;
    status = CudaStatus(cudaEventElapsedTime(&t, ev[i], ev[i + 1]), "cudaEventElapsedTime");
    ms.push_back(t);
  }
  for (auto& e : ev) cudaEventDestroy(e);
  RETURN_IF_ERROR(status);
  RETURN_IF_ERROR(sync);
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

// Device buffers freed together.
class Buffers {
 public:
  ~Buffers() {
    for (void* p : owned_) cudaFree(p);
  }
  absl::StatusOr<void*> Zeroed(int64_t bytes) {
    void* p = nullptr;
    CUDA_RETURN_IF_ERROR(cudaMalloc(&p, std::max<int64_t>(bytes, 1)));
    owned_.push_back(p);
    CUDA_RETURN_IF_ERROR(cudaMemset(p, 0, std::max<int64_t>(bytes, 1)));
    CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());  // as in Copy
    return p;
  }
  template <typename T>
  absl::StatusOr<const T*> Copy(const std::vector<T>& host) {
    ASSIGN_OR_RETURN(void* p, Zeroed(static_cast<int64_t>(host.size() * sizeof(T))));
    CUDA_RETURN_IF_ERROR(cudaMemcpy(p, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
    // The default stream's memset and copy may still run; the benches'
    // streams do not wait for it.
    CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());
    return static_cast<const T*>(p);
  }

 private:
  std::vector<void*> owned_;
};

}  // namespace

absl::Status SpecLimits(int device, CardLimits* l) {
  int sms = 0, clock_khz = 0, mem_khz = 0, bus_bits = 0, major = 0, minor = 0;
  CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, device));
  CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&mem_khz, cudaDevAttrMemoryClockRate, device));
  CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&bus_bits, cudaDevAttrGlobalMemoryBusWidth, device));
  CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  const double per_sm = Bf16FlopsPerSmClock(major, minor);
  l->bf16_flops = sms * (clock_khz * 1e3) * per_sm;
  l->bytes_per_second = 2.0 * (mem_khz * 1e3) * bus_bits / 8;
  // The attribute is the highest boost clock: NVIDIA quotes peaks at a
  // lower one (H100 SXM: 989 TFLOP/s at 1830 MHz), so this peak reads a
  // few percent high and shares of it a few percent low.
  std::printf("card limits: %d SMs x %.0f MHz (max boost) x %.0f bf16 FLOP/clock = %.0f TFLOP/s "
              "dense; memory %.0f MHz x 2 x %d bits = %.0f GB/s\n",
              sms, clock_khz / 1e3, per_sm, l->bf16_flops / 1e12, mem_khz / 1e3, bus_bits,
              l->bytes_per_second / 1e9);
  return absl::OkStatus();
}

absl::StatusOr<double> CopyBandwidth(int64_t bytes, int iters) {
  Buffers b;
  ASSIGN_OR_RETURN(void* src, b.Zeroed(bytes));
  ASSIGN_OR_RETURN(void* dst, b.Zeroed(bytes));
  ASSIGN_OR_RETURN(double ms, MedianMs(nullptr, iters, [&]() {
                     return CudaStatus(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice),
                                       "cudaMemcpyAsync");
                   }));
  return 2.0 * bytes / (ms * 1e-3);
}

absl::StatusOr<double> AttentionSeconds(const LlamaShape& s, int seqs, int len, int iters,
                                        bool tensor_cores) {
  tensor_cores = tensor_cores && kernels::TensorCoreHeadDim(s.head_dim);  // else CUDA cores
  const int64_t tokens = static_cast<int64_t>(seqs) * len, bs = 16;
  const int64_t width = (len + bs - 1) / bs, blocks = width * seqs;
  std::vector<int64_t> positions, seq, tables;
  for (int i = 0; i < seqs; ++i) {
    for (int p = 0; p < len; ++p) {
      positions.push_back(p);
      seq.push_back(i);
    }
    for (int64_t k = 0; k < width; ++k) tables.push_back(i * width + k);
  }
  // The CUDA-core kernel as the plan runs it: a KV group's heads a block.
  const int group = tensor_cores ? 1 : kernels::AttentionGroup(s.heads, s.kv_heads);
  const int tile = tensor_cores ? kernels::kTcQueryTile : kernels::kQueryTile / group;
  std::vector<int32_t> tiles = kernels::AttentionTiles(seq.data(), tokens, tile);
  Buffers b;
  const int64_t q_bytes = tokens * s.heads * s.head_dim * 2, kv_bytes = tokens * s.kv_heads * s.head_dim * 2;
  ASSIGN_OR_RETURN(void* q, b.Zeroed(q_bytes));
  ASSIGN_OR_RETURN(void* k, b.Zeroed(kv_bytes));
  ASSIGN_OR_RETURN(void* v, b.Zeroed(kv_bytes));
  ASSIGN_OR_RETURN(void* out, b.Zeroed(q_bytes));
  ASSIGN_OR_RETURN(void* cache, b.Zeroed(blocks * 2 * s.kv_heads * bs * s.head_dim * 2));
  kernels::PagedCache c;
  c.tokens = tokens;
  c.kv_heads = s.kv_heads;
  c.head_dim = s.head_dim;
  c.block_size = static_cast<int>(bs);
  c.table_width = width;
  ASSIGN_OR_RETURN(c.positions, b.Copy(positions));
  ASSIGN_OR_RETURN(c.seq, b.Copy(seq));
  ASSIGN_OR_RETURN(c.tables, b.Copy(tables));
  ASSIGN_OR_RETURN(const int32_t* tiles_d, b.Copy(tiles));
  const int64_t num_tiles = static_cast<int64_t>(tiles.size()) / tile;
  ASSIGN_OR_RETURN(double ms, MedianMs(nullptr, iters, [&]() {
                     return CudaStatus(kernels::LaunchPagedAttention(
                                           kernels::FloatType::kBF16, q, k, v, cache, c, tiles_d,
                                           num_tiles, s.heads,
                                           1.0f / std::sqrt(static_cast<float>(s.head_dim)),
                                           out, tensor_cores, kernels::AttentionBlocks{group}, nullptr),
                                       "LaunchPagedAttention");
                   }));
  return ms * 1e-3;
}

}  // namespace pipeserve
