#include "server/stage/stage_spec.h"

#include "absl/container/flat_hash_map.h"
#include "partitioner/routing.h"

namespace pipeserve {

std::vector<StageSpec> MakeStageSpecs(const Plan& plan, const std::string& model,
                                      uint64_t deployment, const std::vector<std::string>& servers,
                                      int threads) {
  const Routing routing = RoutePlan(plan);
  // Every value that crosses a hop is a model input, some later stage's
  // input, or a model output: each is described there.
  absl::flat_hash_map<std::string, ValueSpec> specs;
  for (const ValueSpec& v : plan.inputs()) specs[v.name()] = v;
  for (const Stage& s : plan.stages()) {
    for (const ValueSpec& v : s.graph().inputs()) specs.emplace(v.name(), v);
  }
  for (const ValueSpec& v : plan.outputs()) specs.emplace(v.name(), v);

  const int n = plan.stages_size();
  std::vector<StageSpec> out(n);
  for (int i = 0; i < n; ++i) {
    StageSpec& spec = out[i];
    spec.mutable_key()->set_model(model);
    spec.mutable_key()->set_deployment(deployment);
    spec.mutable_key()->set_stage(i);
    *spec.mutable_stage() = plan.stages(i);
    spec.set_num_stages(n);
    const std::vector<std::string>& incoming = i == 0 ? routing.to_first : routing.forward[i - 1];
    for (const std::string& name : incoming) {
      auto it = specs.find(name);
      ValueSpec* v = spec.add_receives();
      if (it != specs.end()) *v = it->second;
      v->set_name(name);
    }
    for (const std::string& f : routing.forward[i]) spec.add_forward(f);
    if (i + 1 < n && i + 1 < static_cast<int>(servers.size())) {
      spec.set_next_address(servers[i + 1]);
    }
    spec.set_threads(threads);
  }
  return out;
}

}  // namespace pipeserve
