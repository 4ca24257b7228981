// Fuzz target: a model file from an upload, all the way to the stage
// specs the coordinator would send: parse (header, parameter table,
// checksums), validate the graph, partition it (the input's first byte
// picks how many stages to ask for), route values between stages, and
// check each stage spec the way a stage server would before loading it.
#include <cstdint>
#include <string>

#include "partitioner/partition.h"
#include "graph/validate.h"
#include "runtime/model_file.h"
#include "server/stage/stage_spec.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  pipeserve::PartitionOptions options;
  options.num_stages = data[0] % 9;  // 0 means "as the model says"
  std::string bytes(reinterpret_cast<const char*>(data) + 1, size - 1);
  absl::StatusOr<pipeserve::Model> model = pipeserve::ParseModel(bytes);
  if (!model.ok()) return 0;
  absl::StatusOr<pipeserve::Plan> plan = pipeserve::Partition(model->graph, options);
  if (!plan.ok() || plan->stages_size() > 64) return 0;
  std::vector<std::string> servers;
  for (int i = 0; i < plan->stages_size(); ++i) servers.push_back("stage:9000");
  for (const pipeserve::StageSpec& spec :
       pipeserve::MakeStageSpecs(*plan, "fuzz", 1, servers, 0)) {
    pipeserve::ValidateStageSpec(spec).IgnoreError();
  }
  return 0;
}
