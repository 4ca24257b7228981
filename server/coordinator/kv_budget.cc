#include "server/coordinator/kv_budget.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status_macros.h"
#include "graph/validate.h"
#include "graph/dtype.h"

namespace pipeserve {

absl::StatusOr<int64_t> StageBlockBytes(const Graph& stage_graph, int block_size) {
  ValueTypes types;
  RETURN_IF_ERROR(ValidateGraph(stage_graph, &types).status());
  int64_t bytes = 0, layers = 0;
  for (const Node& n : stage_graph.nodes()) {
    if (n.op() != "cached_attention") continue;
    const int64_t heads = n.attrs().at("kv_heads").i(), dim = n.attrs().at("head_dim").i();
    bytes += 2 * heads * dim * block_size * ElementSize(types.at(n.inputs(1)));
    ++layers;
  }
  // And the cache's bookkeeping: a tag (sequence id, position) per slot
  // and a block pointer per layer (KvCache), so tiny layers cannot make
  // the block count, and its tags, outgrow the budget.
  return layers == 0 ? 0 : bytes + block_size * 16 + layers * 8;
}

absl::Status SizeKvCache(const Graph& graph, int64_t budget_bytes, Plan* plan) {
  if (!graph.has_generation()) return absl::OkStatus();
  const int block_size = graph.generation().block_size();
  if (block_size <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("generation spec: block_size ", block_size, " must be positive"));
  }
  int64_t widest = 0;
  for (const Stage& s : plan->stages()) {
    ASSIGN_OR_RETURN(int64_t bytes, StageBlockBytes(s.graph(), block_size));
    widest = std::max(widest, bytes);
  }
  const int64_t blocks = widest == 0 ? 0 : budget_bytes / widest;
  if (widest > 0 && blocks == 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the KV cache budget (", absl::StrFormat("%.3g", budget_bytes / 1048576.0),
        " MiB per stage server, --kv_cache_mb) ",
        "holds no block of ", block_size, " tokens: a stage needs ", widest,
        " bytes per block"));
  }
  *plan->mutable_generation() = graph.generation();
  plan->mutable_generation()->set_num_blocks(blocks);
  for (Stage& s : *plan->mutable_stages()) {
    for (Node& n : *s.mutable_graph()->mutable_nodes()) {
      if (n.op() == "cached_attention") (*n.mutable_attrs())["num_blocks"].set_i(blocks);
    }
  }
  return absl::OkStatus();
}

}  // namespace pipeserve
