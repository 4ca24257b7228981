// The generation targets of a Llama-style model on any compute backend:
// prefill time of many tokens (as FLOP/s), decode step time at several
// batch sizes (as tokens/s and bytes read per second), for cuda_bench to
// hold against the card's limits (issue 25's targets) and for tests to run
// on the device emulator at a tiny shape. The model is a graph exported for
// generation (bench/llama_skeleton.py writes one without its weights) and
// random weights of the shapes and dtypes it lists.
//
//   ASSIGN_OR_RETURN(Graph g, ReadGraph(dir + "/graph.pb"));
//   ASSIGN_OR_RETURN(LlamaShape shape, ShapeOf(g));
//   Model model{g, RandomWeights(g, /*seed=*/1)};
//   ASSIGN_OR_RETURN(LlamaTimes t, TimeLlama(*backend, model, TargetOptions()));
//   PrintTargets(shape, TargetOptions(), t, limits);
#ifndef PIPESERVE_BENCH_LLAMA_TARGETS_H_
#define PIPESERVE_BENCH_LLAMA_TARGETS_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "proto/model.pb.h"
#include "runtime/backend.h"
#include "runtime/model_file.h"

namespace pipeserve {

// What the accounting needs, read from the graph: the cached_attention
// layers' heads, the parameters the GEMMs read (a linear's, mm's or
// matmul's weight) and the embedding table.
struct LlamaShape {
  int layers = 0, heads = 0, kv_heads = 0, head_dim = 0;
  int64_t vocab = 0, d = 0;
  int kv_element_bytes = 0;          // the cache's dtype
  int64_t gemm_params = 0;           // weights of every GEMM but the lm_head
  int64_t lm_head_params = 0;        // the GEMM weight with `vocab` rows
  int64_t weight_bytes = 0;          // every parameter
  // Tables embeddings read a row of per token (the token table unless the
  // lm_head shares it, rotary tables): their bytes, and a row of each.
  int64_t embedding_bytes = 0;
  int64_t embedding_row_bytes = 0;
};

// kInvalidArgument when the graph is not a generation export with
// cached_attention, an embedding and an lm_head.
absl::StatusOr<LlamaShape> ShapeOf(const Graph& graph);

// A serialized Graph (graph.pb), or a model file's header.
absl::StatusOr<Graph> ReadGraph(const std::string& path);

// Uniform(-1, 1) / sqrt(fan_in) for matrices, Uniform(0.5, 1.5) for vectors
// (norm weights), in each parameter's dtype; a fast generator (a 1.1 B
// parameter model in a few seconds).
WeightMap RandomWeights(const Graph& graph, uint64_t seed);

struct TargetOptions {
  // Prefill: `prefill_seqs` sequences of `prefill_len` tokens in one step.
  int prefill_seqs = 4, prefill_len = 1024;
  // Decode: each batch size's sequences hold `context` tokens (prefilled
  // first, at most `prefill_chunk` tokens a step), then `decode_steps`
  // steps are timed one by one.
  int context = 512, decode_steps = 16, prefill_chunk = 8192;
  std::vector<int> batches = {1, 64};
  // Untimed runs before each measurement (the first run of a shape plans
  // it, the second captures its CUDA graph), timed prefill repeats.
  int warmup = 2, repeats = 3;
};

struct DecodeTime {
  int batch = 0;
  double step_seconds = 0;  // median
  double mean_context = 0;  // positions each sequence attends over, on average
};

struct LlamaTimes {
  double prefill_seconds = 0;  // median
  std::vector<DecodeTime> decode;
  // The tokens the last decode step of the last batch sampled (greedy).
  std::vector<int64_t> last_tokens;
};

// Runs the measurements through a LocalPipeline of the model's stages on
// `backend`, sizing every cached_attention's cache for them. Each step has
// the inputs the coordinator's Generator sends (greedy sampling, each
// sequence's blocks its own), with made-up token ids: a decode step does
// not feed back the token the last one picked.
absl::StatusOr<LlamaTimes> TimeLlama(ComputeBackend& backend, const Model& model,
                                     const TargetOptions& options);

// FLOPs of a prefill of `seqs` sequences of `len` tokens from position 0:
// the GEMMs (2 per weight per token; the lm_head for one token per
// sequence) and causal attention (QK^T and PV over positions up to each
// token's own).
double PrefillFlops(const LlamaShape& s, int seqs, int len);
double AttentionFlops(const LlamaShape& s, int seqs, int len);
// Bytes one decode step of `batch` sequences reads at `context` positions
// each: every weight once (the embedding's rows only) and the KV cache.
double DecodeBytes(const LlamaShape& s, int batch, double context);

// The card's limits the targets are ratios of (0: unknown, ratio omitted).
struct CardLimits {
  double bf16_flops = 0;        // dense tensor-core peak
  double bf16_gemm_flops = 0;   // a large cuBLASLt GEMM measured in the same run
  double bytes_per_second = 0;  // memory bandwidth
  double copy_bytes_per_second = 0;  // a device-to-device copy, read + write, measured
  // One layer's cached_attention at the prefill's shape: KvAppend and
  // TensorCoreAttention (what a bfloat16 prefill runs), and KvAppend and
  // PagedAttention (CUDA cores, for comparison).
  double attention_seconds = 0;
  double cuda_core_attention_seconds = 0;
};

// The targets table: prefill FLOP/s and attention as shares of the limits,
// decode bandwidth share at batch 1 and the speedup of the largest batch.
void PrintTargets(const LlamaShape& s, const TargetOptions& o, const LlamaTimes& t,
                  const CardLimits& limits);

}  // namespace pipeserve

#endif  // PIPESERVE_BENCH_LLAMA_TARGETS_H_
