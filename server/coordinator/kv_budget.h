// How many KV cache blocks a cache-aware model's stages hold
// (export(generation=True); GenerationSpec in proto/model.proto). Every
// stage holds the same number, so that one block table per sequence serves
// them all: as many as the stage with the most cache bytes per block (the
// most or widest cached layers) fits in the budget each stage server gets
// (--kv_cache_mb).
//
//   ASSIGN_OR_RETURN(Plan plan, Partition(graph, options));
//   RETURN_IF_ERROR(SizeKvCache(graph, int64_t{256} << 20, &plan));
//   plan.generation().num_blocks();  // also attr num_blocks of every cached_attention
#ifndef PIPESERVE_SERVER_COORDINATOR_KV_BUDGET_H_
#define PIPESERVE_SERVER_COORDINATOR_KV_BUDGET_H_

#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "proto/model.pb.h"

namespace pipeserve {

// Bytes of one cache block (keys and values of every cached layer) of a
// stage graph; 0 for a stage with no cached_attention.
absl::StatusOr<int64_t> StageBlockBytes(const Graph& stage_graph, int block_size);

// For a cache-aware `graph` (with a generation spec): copies the spec into
// `plan` with num_blocks set, and sets attr num_blocks on every
// cached_attention node of its stages. kInvalidArgument when the budget
// holds no block. Other models: nothing.
absl::Status SizeKvCache(const Graph& graph, int64_t budget_bytes, Plan* plan);

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_COORDINATOR_KV_BUDGET_H_
