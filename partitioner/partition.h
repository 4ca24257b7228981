// Cutting a validated graph into pipeline stages, as
// torch.distributed.pipelining.pipeline() does.
//
//   PartitionOptions opts;             // cut where the model says
//   ASSIGN_OR_RETURN(Plan plan, Partition(model.graph, opts));
//   plan.stages_size();                // ExampleCode: 4
//
// Cut points, in order of precedence:
//   1. `pipe_split` nodes: N markers give N + 1 stages;
//   2. split_spec (options.split_spec if non-empty, else the graph's):
//      BEGINNING cuts just before the first node made inside the module,
//      END just after the last one (both may be combined with markers);
//   3. neither: options.num_stages stages (default 1). With measured node
//      times (options.node_seconds, see calibrate.h) the cut is the one
//      that minimises the slowest stage's predicted time: its nodes' times
//      plus the bytes it receives and sends over the link, found exactly by
//      dynamic programming over the cut points. Without them it balances
//      estimated cost (FLOPs at a 16-row batch plus parameter bytes read).
//      plan.balance says which, and with measured times each stage records
//      its prediction.
//
// Each stage gets the nodes between its cuts, a copy of every `param` node
// it reads (a parameter used in several stages goes to each, under its
// original FQN), as inputs every value it reads that it does not make
// (model inputs or values from any earlier stage, skip connections
// included), and as outputs every value it makes that a later stage or the
// model's outputs read.
#ifndef PIPESERVE_PARTITIONER_PARTITION_H_
#define PIPESERVE_PARTITIONER_PARTITION_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/status/statusor.h"
#include "graph/validate.h"
#include "proto/model.pb.h"

namespace pipeserve {

struct PartitionOptions {
  // Stages for automatic cutting, used only when the graph has no cut
  // points. 0 means "as the model says" (1 if it says nothing). A value
  // that disagrees with the model's own cut points is an error.
  int num_stages = 0;
  // Module FQN -> where to cut; overrides the graph's split_spec.
  std::map<std::string, SplitPoint> split_spec;
  // Measured seconds of each compute node (ComputeNodes order) for a
  // microbatch of `cost_rows` rows. Empty: cut by the estimate. Used only
  // for automatic cutting.
  std::vector<double> node_seconds;
  int64_t cost_rows = 16;
  // Bytes per second a stage receives and sends at (0: transfers are free).
  double link_bytes_per_second = 0;
  // Where node_seconds came from, for plan.balance ("measured on cpu ...").
  std::string cost_source;
};

// plan.balance of automatic cuts made by the estimate.
inline constexpr char kEstimatedBalance[] = "estimated cost (FLOPs + parameter bytes)";

// The indices into graph.nodes of the nodes that compute (not `param`, not
// `pipe_split`), in order: the nodes a stage is cut from.
std::vector<int> ComputeNodes(const Graph& graph);

// Values whose free dim 0 is not the batch: outputs of nodes marked
// unbatched, and model inputs exported without the batched flag.
absl::flat_hash_set<std::string> UnbatchedValues(const Graph& graph);

// The estimated cost of each compute node (FLOPs at a 16-row batch plus
// bytes of the parameters it reads, plus 1), in ComputeNodes order; the
// graph must be valid.
std::vector<double> EstimatedNodeCosts(const Graph& graph, const ValueShapes& shapes);

// Whether every input (at least one) and every output of `plan` follows
// the batch (dim 0): the licence to merge requests, and to join a
// request's microbatches at its stages (and to time nodes that way).
bool FollowsTheBatch(const Plan& plan);

// Validates `graph` (see validate.h) and cuts it. Errors are
// kInvalidArgument naming the node, module or value at fault, e.g. a cut
// that leaves a stage with no nodes, or more stages asked for than there
// are nodes to spread over them.
absl::StatusOr<Plan> Partition(const Graph& graph,
                               const PartitionOptions& options);

// Every state_dict key the plan's stages hold, plus the recorded aliases of
// those keys, sorted. With plan.unused_state_dict_keys this is exactly
// graph.state_dict_keys (the FQN check PyTorch's own test leaves off).
std::vector<std::string> CoveredStateDictKeys(const Graph& graph,
                                              const Plan& plan);

}  // namespace pipeserve

#endif  // PIPESERVE_PARTITIONER_PARTITION_H_
