#include "partitioner/routing.h"

#include "absl/container/flat_hash_set.h"

namespace pipeserve {

Routing RoutePlan(const Plan& plan) {
  const int n = plan.stages_size();
  Routing r;
  r.forward.resize(n);
  // needed_after[k]: values read by stages after k, or model outputs.
  std::vector<absl::flat_hash_set<std::string>> needed_after(n);
  absl::flat_hash_set<std::string> acc;
  for (const ValueSpec& out : plan.outputs()) acc.insert(out.name());
  for (int k = n - 1; k >= 0; --k) {
    needed_after[k] = acc;
    for (const ValueSpec& in : plan.stages(k).graph().inputs()) acc.insert(in.name());
  }
  // Model inputs any stage reads go to stage 0, in the model's order.
  for (const ValueSpec& in : plan.inputs()) {
    if (acc.contains(in.name())) r.to_first.push_back(in.name());
  }
  // What each stage holds: what it received plus what it made.
  std::vector<std::string> held = r.to_first;
  for (int k = 0; k < n; ++k) {
    const Graph& g = plan.stages(k).graph();
    for (const std::string& out : g.outputs()) held.push_back(out);
    if (k == n - 1) {
      for (const ValueSpec& out : plan.outputs()) r.forward[k].push_back(out.name());
      break;
    }
    absl::flat_hash_set<std::string> seen;
    for (const std::string& v : held) {
      if (needed_after[k].contains(v) && seen.insert(v).second) {
        r.forward[k].push_back(v);
      }
    }
    held = r.forward[k];
  }
  return r;
}

}  // namespace pipeserve
