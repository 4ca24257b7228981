// The KV cache of one stage of a cache-aware graph (export(generation=True),
// GenerationSpec in proto/model.proto): keys and values of the stage's
// cached_attention layers, in blocks of `block_size` tokens. A sequence's
// blocks need not be contiguous: every step brings each sequence's block
// table, and one table serves every stage (the coordinator allocates block
// ids; each stage holds the same number of blocks). A block's memory is
// taken when a token is first written to it, so a stage holds what it has
// used, at most num_blocks blocks per layer.
//
// Each slot remembers the sequence id and position written there, and a
// step is refused (kFailedPrecondition, "not in this stage's cache") when a
// token would read a position its sequence does not hold here: a stage
// server that restarted, or a step sent to a replica that never saw the
// sequence, costs a re-prefill, never a wrong token.
//
//   KvCache cache(/*num_blocks=*/1024, /*block_size=*/16);
//   int layer = cache.AddLayer(/*kv_heads=*/2, /*head_dim=*/64, DT_FLOAT32);
//   ASSIGN_OR_RETURN(KvStep step, cache.BeginStep(positions, seq, blocks, seq_ids, tokens));
//   ASSIGN_OR_RETURN(Tensor out, cache.Attend(layer, step, q, k, v, scale));
#ifndef PIPESERVE_RUNTIME_CPU_KV_CACHE_H_
#define PIPESERVE_RUNTIME_CPU_KV_CACHE_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "runtime/tensor.h"

namespace pipeserve {

// One step's tokens, checked: token t of the step is position positions[t]
// of the sequence whose block table is tables[seq[t]].
struct KvStep {
  std::vector<int64_t> positions;
  std::vector<int64_t> seq;
  std::vector<std::vector<int64_t>> tables;
};

class KvCache {
 public:
  KvCache(int64_t num_blocks, int block_size);

  // A cached_attention layer; returns its index.
  int AddLayer(int kv_heads, int head_dim, DataType dtype);
  int layers() const { return static_cast<int>(layers_.size()); }
  int64_t num_blocks() const { return num_blocks_; }
  int block_size() const { return block_size_; }
  // Bytes of one block over every layer (keys and values).
  int64_t BlockBytes() const;
  // Blocks with memory taken (by the first layer). Thread-safe, also
  // while a step runs.
  int64_t blocks_in_use() const { return blocks_in_use_.load(std::memory_order_relaxed); }

  // Checks a step's metadata (int64 tensors: positions [T], seq [T],
  // blocks [N, B], seq_ids [N]) for `tokens` tokens: kInvalidArgument
  // naming what does not fit (a block id beyond num_blocks, a position its
  // table does not reach, a sequence's new positions not contiguous),
  // kFailedPrecondition when a token would read positions its sequence
  // does not hold in this cache. Marks the new positions as written.
  absl::StatusOr<KvStep> BeginStep(const Tensor& positions, const Tensor& seq,
                                   const Tensor& blocks, const Tensor& seq_ids,
                                   int64_t tokens);

  // Unmarks the positions BeginStep marked (the step failed before every
  // layer wrote them).
  void AbortStep(const KvStep& step);

  // Appends k and v ([1, Hkv, T, D]) of the step's tokens to layer
  // `layer`, then attends: each token's query heads (q [1, H, T, D], H a
  // multiple of Hkv) over its sequence's positions up to its own, scores
  // scaled by `scale`, softmax in float32. Returns [1, H, T, D] in q's
  // type.
  absl::StatusOr<Tensor> Attend(int layer, const KvStep& step, const Tensor& q,
                                const Tensor& k, const Tensor& v, float scale);

 private:
  struct Layer {
    int kv_heads;
    int head_dim;
    DataType dtype;
    std::vector<std::unique_ptr<uint8_t[]>> blocks;  // [2][kv_heads][block_size][head_dim]
  };
  struct Tag {
    int64_t seq_id = -1;
    int64_t position = -1;
  };
  // Sequences with this many tokens in a step (a prompt chunk) attend
  // through GEMMs; shorter ones (decoding) through loops, run in parallel.
  static constexpr size_t kGemmTokens = 8;
  // Floats of scratch a thread keeps between steps (16 MiB per buffer).
  static constexpr size_t kKeptFloats = size_t{4} << 20;
  // What AttendGroup needs of a step.
  struct Group {
    Layer* layer;
    const KvStep* step;
    const Tensor* q;
    Tensor* out;
    float scale;
    int64_t rep;  // query heads per KV head
  };
  // Writes the step's k and v ([1, Hkv, T, D]) into layer `l`'s slots.
  void Append(Layer& l, const KvStep& step, const Tensor& k, const Tensor& v);
  // Attention of every (sequence, KV head) group of the step into g.out.
  absl::Status AttendGroups(const Group& g);
  // Attention of `tokens` (one sequence's, in the step) for the query heads
  // of KV head `head`.
  absl::Status AttendGroup(const Group& g, const std::vector<int64_t>& tokens, int head,
                           bool gemm);
  // Each sequence's block table (rows of blocks [N, B]), ids checked.
  absl::StatusOr<std::vector<std::vector<int64_t>>> Tables(const Tensor& blocks) const;
  // Each sequence's first position written by `step` (-1: none), after
  // checking the tokens' sequences and positions (within the tables of
  // `width` blocks, each sequence's a run of distinct positions).
  absl::StatusOr<std::vector<int64_t>> FirstNewPositions(const KvStep& step,
                                                         const std::vector<int64_t>& ids,
                                                         int64_t width) const;
  int64_t Slot(const std::vector<int64_t>& table, int64_t position) const;
  uint8_t* Row(Layer& l, int64_t slot, int kind, int head);
  absl::Status CheckHeld(const KvStep& step, const std::vector<int64_t>& ids,
                         const std::vector<int64_t>& lo) const;

  const int64_t num_blocks_;
  const int block_size_;
  std::vector<Layer> layers_;
  std::atomic<int64_t> blocks_in_use_{0};  // blocks of layers_[0] with memory
  std::vector<Tag> tags_;  // per slot (block * block_size + offset)
};

}  // namespace pipeserve

#endif  // PIPESERVE_RUNTIME_CPU_KV_CACHE_H_
