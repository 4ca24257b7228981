// The card's own limits that cuda_bench's generation targets are ratios of
// (bench/llama_targets.h CardLimits): the dense bfloat16 tensor peak and
// the memory bandwidth from the device's attributes, a device-to-device
// copy's bandwidth, and PagedAttention alone at a prefill's shape. Built
// with --config=cuda only.
//
//   CardLimits l;
//   RETURN_IF_ERROR(SpecLimits(device, &l));
//   ASSIGN_OR_RETURN(l.copy_bytes_per_second, CopyBandwidth(1 << 30, 20));
//   ASSIGN_OR_RETURN(l.attention_seconds, AttentionSeconds(shape, 4, 1024, 20, true));
#ifndef PIPESERVE_BENCH_CUDA_LIMITS_H_
#define PIPESERVE_BENCH_CUDA_LIMITS_H_

#include <cstdint>

#include "absl/status/statusor.h"
#include "bench/llama_targets.h"

namespace pipeserve {

// bf16_flops = SMs x peak clock x dense bfloat16 FLOPs per SM per clock of
// the architecture (0 when this table does not know it), bytes_per_second
// = 2 x memory clock x bus width. Prints what it used.
absl::Status SpecLimits(int device, CardLimits* limits);

// Bytes read plus bytes written per second by cudaMemcpyAsync of `bytes`
// on the device, median of `iters`.
absl::StatusOr<double> CopyBandwidth(int64_t bytes, int iters);

// Median seconds of one layer's cached_attention (KvAppend, then
// TensorCoreAttention with `tensor_cores` where it takes head_dim, else
// PagedAttention; bfloat16) for `seqs` sequences prefilling `len` tokens.
absl::StatusOr<double> AttentionSeconds(const LlamaShape& s, int seqs, int len, int iters,
                                        bool tensor_cores);

}  // namespace pipeserve

#endif  // PIPESERVE_BENCH_CUDA_LIMITS_H_
