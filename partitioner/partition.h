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
//   3. neither: options.num_stages stages (default 1) balancing estimated
//      cost (FLOPs at a 16-row batch plus parameter bytes read).
//
// Each stage gets the nodes between its cuts, a copy of every `param` node
// it reads (a parameter used in several stages goes to each, under its
// original FQN), as inputs every value it reads that it does not make
// (model inputs or values from any earlier stage, skip connections
// included), and as outputs every value it makes that a later stage or the
// model's outputs read.
#ifndef PIPESERVE_PARTITIONER_PARTITION_H_
#define PIPESERVE_PARTITIONER_PARTITION_H_

#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "proto/model.pb.h"

namespace pipeserve {

struct PartitionOptions {
  // Stages for automatic cutting, used only when the graph has no cut
  // points. 0 means "as the model says" (1 if it says nothing). A value
  // that disagrees with the model's own cut points is an error.
  int num_stages = 0;
  // Module FQN -> where to cut; overrides the graph's split_spec.
  std::map<std::string, SplitPoint> split_spec;
};

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
