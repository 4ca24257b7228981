// CompileSteps (compile.h): the graph's nodes become steps, one each, in
// graph order, numbering values as value slots when first met; the
// stage's KV cache gets a layer per cached_attention; then the fusion
// passes, the last reader of each slot, and the weights some step reads.
#include "runtime/cpu/program/compile.h"

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "graph/op_schema.h"
#include "runtime/cpu/cpu_kernels.h"
#include "runtime/cpu/cpu_ops.h"
#include "runtime/cpu/kv_cache.h"
#include "runtime/cpu/program/fusion.h"

namespace pipeserve::cpu_program {
namespace {

// The float32 fast paths; everything else is kGeneric.
Kind KindOf(const Node& node, const ValueShapes& shapes, const ValueTypes& types) {
  static const auto* kinds = new absl::flat_hash_map<std::string, Kind>{
      {"mm", Kind::kMm},         {"matmul", Kind::kMatmul},
      {"linear", Kind::kLinear}, {"add", Kind::kAdd},
      {"sub", Kind::kSub},       {"mul", Kind::kMul},
      {"relu", Kind::kRelu},     {"clone", Kind::kClone},
      {"identity", Kind::kIdentity}};
  auto it = kinds->find(node.op());
  if (it == kinds->end()) return Kind::kGeneric;
  if (it->second == Kind::kIdentity) return Kind::kIdentity;
  for (const std::string& v : node.inputs()) {
    if (types.at(v) != DT_FLOAT32) return Kind::kGeneric;
  }
  if (it->second == Kind::kMatmul &&
      (shapes.at(node.inputs(1)).size() != 2 || shapes.at(node.inputs(0)).size() < 2)) {
    return Kind::kGeneric;  // batched or vector operands
  }
  return it->second;
}

bool HasSymbolicAttrs(const Node& node) {
  for (const auto& [key, value] : node.attrs()) {
    if (absl::EndsWith(key, "_from")) return true;
  }
  return false;
}

// The program's KV cache layer for cached_attention `node` (the cache
// is made with the first: num_blocks and block_size are the model's,
// set on every such node by the coordinator).
int AddCacheLayer(const Node& node, DataType dtype, std::unique_ptr<KvCache>* kv) {
  if (*kv == nullptr) {
    *kv = std::make_unique<KvCache>(IntAttr(node, "num_blocks", 0),
                                    static_cast<int>(IntAttr(node, "block_size", 16)));
  }
  return (*kv)->AddLayer(static_cast<int>(IntAttr(node, "kv_heads", 1)),
                         static_cast<int>(IntAttr(node, "head_dim", 1)), dtype);
}

// Per step, the value slots whose last reader it is (none of the
// outputs): a fused step reads its members' inputs too.
void FindLastReaders(CompiledStage* stage) {
  const std::vector<Step>& steps = stage->steps;
  absl::flat_hash_map<int, size_t> last;
  auto reads = [&](const Step& st, size_t at) {
    for (int v : st.in) last[v] = at;
    for (int v : st.own_in) last[v] = at;
    for (int v : {st.mask_cond, st.mask_add}) {
      if (v >= 0) last[v] = at;
    }
  };
  for (size_t i = 0; i < steps.size(); ++i) {
    reads(steps[i], i);
    for (int m : steps[i].members) {
      reads(steps[m], i);
      last[steps[m].out] = i;  // run one by one, members write and read their own
    }
  }
  for (int v : stage->output_slots) last.erase(v);
  stage->release_after.assign(steps.size(), {});
  for (const auto& [slot, at] : last) stage->release_after[at].push_back(slot);
}

// Makes a graph's steps node by node into a CompiledStage, numbering each
// value (a value slot) where it is first met, and keeps the weights.
class StepBuilder {
 public:
  StepBuilder(const Graph& graph, const ValueShapes& shapes, const ValueTypes& types,
              const CpuBackendOptions& options, CompiledStage* stage)
      : shapes_(shapes), types_(types), options_(options), stage_(stage) {
    // Readers of each value, to find linears whose only reader is a ReLU.
    for (const Node& n : graph.nodes()) {
      for (const std::string& v : n.inputs()) ++readers_[v];
    }
    for (const std::string& v : graph.outputs()) ++readers_[v];
  }

  int SlotOf(const std::string& v) {
    auto [it, inserted] = slot_.emplace(v, static_cast<int>(slot_.size()));
    return it->second;
  }

  // Adds node's step; a parameter's weights become a constant instead.
  absl::Status Add(const Node& node, const WeightMap& weights) {
    if (node.op() == kPipeSplitOp) return absl::OkStatus();
    if (node.op() == kParamOp) return AddParam(node, weights);
    const bool cached = node.op() == "cached_attention";
    if (!cached && !HasCpuOp(node.op())) {
      return absl::InvalidArgumentError(
          absl::StrCat("the cpu backend has no kernel for op \"", node.op(), "\""));
    }
    Kind kind = cached ? Kind::kCachedAttention : KindOf(node, shapes_, types_);
    Step step{kind, &node, FindOp(node.op()), {}, SlotOf(node.outputs(0))};
    step.symbolic = HasSymbolicAttrs(node);
    step.out_type = types_.at(node.outputs(0));
    for (const std::string& v : node.inputs()) step.in.push_back(SlotOf(v));
    if (cached) {
      step.kv_layer = AddCacheLayer(node, types_.at(node.inputs(0)), &stage_->kv);
      step.scale = static_cast<float>(FloatAttr(node, "scale", 1.0));
    }
    if (kind == Kind::kRelu && options_.fuse_linear_relu) FuseReluIntoLinear(node, &step);
    if (kind == Kind::kLinear) {
      linear_step_of_slot_[step.out] = static_cast<int>(stage_->steps.size());
      TransposeConstantWeight(node, &step);
    }
    stage_->steps.push_back(std::move(step));
    return absl::OkStatus();
  }

  // Keep only the weights some step reads: a linear weight whose every
  // reader takes its transposed copy is not held twice.
  void KeepReadWeights() {
    stage_->constants.resize(slot_.size());
    const absl::flat_hash_map<int, int> slot_readers = CountSlotUses(*stage_).readers;
    for (auto& [s, t] : params_) {
      if (slot_readers.contains(s)) stage_->constants[s] = std::move(t);
    }
  }

 private:
  absl::Status AddParam(const Node& node, const WeightMap& weights) {
    const std::string& fqn = node.attrs().at("fqn").s();
    auto w = weights.find(fqn);
    if (w == weights.end()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "parameter \"", fqn, "\" has no loaded weights"));
    }
    param_index_[SlotOf(node.outputs(0))] = params_.size();
    params_.emplace_back(SlotOf(node.outputs(0)), w->second);
    return absl::OkStatus();
  }

  // A ReLU whose input is a linear's output with no other reader: the
  // linear applies it, the ReLU step forwards the linear's output.
  void FuseReluIntoLinear(const Node& node, Step* step) {
    auto lin = linear_step_of_slot_.find(step->in[0]);
    if (lin != linear_step_of_slot_.end() && readers_[node.inputs(0)] == 1) {
      stage_->steps[lin->second].fused_relu = true;
      step->kind = Kind::kForward;
    }
  }

  // A constant weight [out, in] is transposed once, here, so every
  // run multiplies by [in, out] (the fast GEMM layout).
  void TransposeConstantWeight(const Node& node, Step* step) {
    auto p = param_index_.find(step->in[1]);
    if (p == param_index_.end()) return;
    const Tensor& w = params_[p->second].second;
    auto [t, inserted] = transposed_.emplace(step->in[1], -1);
    if (inserted) {
      Tensor wt = Tensor::Empty({w.dim(1), w.dim(0)});
      Transpose(w.data(), w.dim(0), w.dim(1), wt.data());
      t->second = SlotOf(absl::StrCat(node.inputs(1), "/transposed"));
      params_.emplace_back(t->second, wt);
    }
    step->in[1] = t->second;
    step->w_transposed = true;
  }

  const ValueShapes& shapes_;
  const ValueTypes& types_;
  const CpuBackendOptions& options_;
  CompiledStage* stage_;
  absl::flat_hash_map<std::string, int> slot_;     // value -> its slot
  absl::flat_hash_map<std::string, int> readers_;  // value -> nodes and outputs reading it
  std::vector<std::pair<int, Tensor>> params_;     // (slot, weights)
  absl::flat_hash_map<int, int> linear_step_of_slot_;
  absl::flat_hash_map<int, size_t> param_index_;  // slot -> index in params
  absl::flat_hash_map<int, int> transposed_;      // weight slot -> its ^T slot
};

}  // namespace

absl::Status CompileSteps(const Graph& graph, const WeightMap& weights,
                          const ValueShapes& shapes, const ValueTypes& types,
                          const CpuBackendOptions& options, CompiledStage* stage) {
  StepBuilder builder(graph, shapes, types, options, stage);
  for (const ValueSpec& in : graph.inputs()) {
    stage->input_slots.push_back(builder.SlotOf(in.name()));
  }
  for (const Node& node : graph.nodes()) {
    RETURN_IF_ERROR(builder.Add(node, weights));
  }
  for (const std::string& v : graph.outputs()) stage->output_slots.push_back(builder.SlotOf(v));
  if (options.fuse_attention) FuseAttention(shapes, types, stage);
  if (options.fuse_elementwise) FuseNorms(shapes, types, stage);
  if (options.fuse_elementwise) FuseElementwise(shapes, types, stage);
  FindLastReaders(stage);
  builder.KeepReadWeights();
  return absl::OkStatus();
}

}  // namespace pipeserve::cpu_program
