// A small builder for hand-written graphs in tests and benchmarks.
//
//   GraphBuilder b;
//   b.Input("x", {-1, 4});
//   b.Param("w", {4, 4});           // random weights, seeded
//   b.Op("mm", {"x", "w"}, "h");    // param values are named by FQN
//   b.Split();
//   b.Op("relu", {"h"}, "y");
//   b.Output("y");
//   Model m = b.Build();
#ifndef PIPESERVE_PARTITIONER_GRAPH_BUILDER_H_
#define PIPESERVE_PARTITIONER_GRAPH_BUILDER_H_

#include <cstdint>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "proto/model.pb.h"
#include "runtime/model_file.h"

namespace pipeserve {

// Attribute values for Op(): {{"scalar", AttrF(2.0)}, {"dim", AttrI(-1)}}.
AttrValue AttrF(double f);
AttrValue AttrI(int64_t i);
AttrValue AttrInts(const std::vector<int64_t>& v);  // {{"dims", AttrInts({0, 2, 1})}}

class GraphBuilder {
 public:
  explicit GraphBuilder(uint32_t seed = 1) : rng_(seed) {}

  // A model input; batched when shape[0] == -1.
  GraphBuilder& Input(const std::string& name, Shape shape);
  // A parameter with N(0, 1/fan_in)-ish random values; its value in the
  // graph is named after the FQN and made by a `param` node on first use.
  GraphBuilder& Param(const std::string& fqn, Shape shape);
  // Records `alias` as another state_dict key for `fqn`.
  GraphBuilder& Alias(const std::string& alias, const std::string& fqn);
  // Adds a node; `module` is its module path. Inputs naming a parameter FQN
  // read that parameter.
  GraphBuilder& Op(const std::string& op, std::vector<std::string> inputs,
                   const std::string& output, const std::string& module = "",
                   std::map<std::string, AttrValue> attrs = {});
  GraphBuilder& Split();
  GraphBuilder& SplitSpec(const std::string& module, SplitPoint point);
  GraphBuilder& Output(const std::string& name);

  Model Build() const;
  // Direct access, for tests that corrupt the graph on purpose.
  Graph& graph() { return model_.graph; }

 private:
  Model model_;
  std::mt19937 rng_;
  std::map<std::string, bool> param_node_added_;
  int counter_ = 0;
};

}  // namespace pipeserve

#endif  // PIPESERVE_PARTITIONER_GRAPH_BUILDER_H_
