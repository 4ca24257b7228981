#include "partitioner/graph_builder.h"

#include <cmath>

#include "absl/strings/str_cat.h"

namespace pipeserve {

AttrValue AttrF(double f) {
  AttrValue a;
  a.set_f(f);
  return a;
}

AttrValue AttrI(int64_t i) {
  AttrValue a;
  a.set_i(i);
  return a;
}

AttrValue AttrInts(const std::vector<int64_t>& v) {
  AttrValue a;
  a.mutable_ints()->mutable_v()->Assign(v.begin(), v.end());
  return a;
}

GraphBuilder& GraphBuilder::Input(const std::string& name, Shape shape) {
  ValueSpec* in = model_.graph.add_inputs();
  in->set_name(name);
  in->set_dtype(DT_FLOAT32);
  for (int64_t d : shape) in->add_shape(d);
  in->set_batched(!shape.empty() && shape[0] == -1);
  return *this;
}

GraphBuilder& GraphBuilder::Param(const std::string& fqn, Shape shape) {
  Tensor t = Tensor::Empty(shape);
  float scale = shape.empty() ? 1.0f : 1.0f / std::sqrt(float(shape.back()));
  std::normal_distribution<float> dist(0.0f, scale);
  for (int64_t i = 0; i < t.numel(); ++i) t.data()[i] = dist(rng_);
  TensorInfo* info = model_.graph.add_params();
  info->set_fqn(fqn);
  info->set_dtype(DT_FLOAT32);
  for (int64_t d : shape) info->add_shape(d);
  info->set_byte_size(t.byte_size());
  info->set_in_state_dict(true);
  model_.graph.add_state_dict_keys(fqn);
  model_.weights[fqn] = t;
  param_node_added_[fqn] = false;
  return *this;
}

GraphBuilder& GraphBuilder::Alias(const std::string& alias,
                                  const std::string& fqn) {
  (*model_.graph.mutable_aliases())[alias] = fqn;
  model_.graph.add_state_dict_keys(alias);
  return *this;
}

GraphBuilder& GraphBuilder::Op(const std::string& op,
                               std::vector<std::string> inputs,
                               const std::string& output,
                               const std::string& module,
                               std::map<std::string, AttrValue> attrs) {
  for (const std::string& in : inputs) {
    auto p = param_node_added_.find(in);
    if (p == param_node_added_.end() || p->second) continue;
    Node* param = model_.graph.add_nodes();
    param->set_name(absl::StrCat("param_", in));
    param->set_op("param");
    param->add_outputs(in);
    (*param->mutable_attrs())["fqn"].set_s(in);
    p->second = true;
  }
  Node* n = model_.graph.add_nodes();
  n->set_name(output);
  n->set_op(op);
  for (const std::string& in : inputs) n->add_inputs(in);
  n->add_outputs(output);
  n->set_module_path(module);
  for (auto& [k, v] : attrs) (*n->mutable_attrs())[k] = v;
  return *this;
}

GraphBuilder& GraphBuilder::Split() {
  Node* n = model_.graph.add_nodes();
  n->set_name(absl::StrCat("pipe_split_", counter_++));
  n->set_op("pipe_split");
  return *this;
}

GraphBuilder& GraphBuilder::SplitSpec(const std::string& module,
                                      SplitPoint point) {
  SplitSpecEntry* e = model_.graph.add_split_spec();
  e->set_module(module);
  e->set_point(point);
  return *this;
}

GraphBuilder& GraphBuilder::Output(const std::string& name) {
  model_.graph.add_outputs(name);
  return *this;
}

Model GraphBuilder::Build() const { return model_; }

}  // namespace pipeserve
