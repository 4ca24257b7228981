// What the CPU backend compiles a stage graph into: a list of steps, one per
// node, each reading and writing numbered value slots, which the fusion
// passes (fusion.h) rewrite and CpuProgram (cpu_program.h) runs in order.
// compile.h makes one. Internal to //runtime/cpu:cpu_backend, whose API is
// runtime/cpu/cpu_backend.h; the names live in pipeserve::cpu_program.
//
//   CompiledStage stage;
//   RETURN_IF_ERROR(CompileSteps(graph, weights, shapes, types, options, &stage));
//   for (const Step& step : stage.steps) { ... step.in, step.out are slots ... }
#ifndef PIPESERVE_RUNTIME_CPU_PROGRAM_STEPS_H_
#define PIPESERVE_RUNTIME_CPU_PROGRAM_STEPS_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "graph/op_schema.h"
#include "proto/model.pb.h"
#include "runtime/cpu/cpu_ops.h"
#include "runtime/cpu/kv_cache.h"
#include "runtime/tensor.h"

namespace pipeserve::cpu_program {

enum class Kind {
  kMm, kMatmul, kLinear, kAdd, kSub, kMul, kRelu, kClone, kIdentity,
  kForward,  // a ReLU already fused into the linear before it
  kGeneric,  // RunCpuOp (cpu_ops.h): every other op, and other dtypes
  kAttention,  // matmul -> scale -> mask -> softmax -> matmul, fused
  kCachedAttention,  // cached_attention: the stage's KvCache (kv_cache.h)
  kElementwise,  // a group of elementwise ops in one pass (ElementwiseGroup)
  kNorm,       // [add ->] layer_norm or RMSNorm in one pass (FusedNorm)
  kSkip,       // folded into a kAttention, kElementwise or kNorm step
};

struct Step {
  Kind kind;
  const Node* node;        // points into CpuProgram::graph_
  const OpSchema* schema;
  std::vector<int> in;     // value slots read
  int out = -1;            // value slot written
  bool fused_relu = false; // linear: apply ReLU in the same pass
  bool w_transposed = false;  // linear: in[1] holds weight^T [in, out]
  bool symbolic = false;      // attributes taken from runtime integers
  DataType out_type = DT_FLOAT32;
  // kAttention: in = {q, k, v}; the scale and the mask (value slots).
  float scale = 1.0f;
  int kv_layer = -1;  // kCachedAttention: the layer in the program's cache
  int mask_cond = -1, mask_add = -1;
  float mask_fill = 0.0f;
  // kElementwise: the group, its external inputs are `in`; its member
  // steps (this one last), run one by one when a shape does not fit.
  std::shared_ptr<const ElementwiseGroup> group;
  std::vector<int> members;
  std::vector<int> own_in;  // the last member's own inputs
  // kNorm: in = {x, residual?, weight?, bias?}; at the residual add (`out`
  // the sum) or, without one, at the norm's last step. norm_step is the
  // step whose result the norm's is (its buffer is reused), norm_out its
  // slot; `members` (with `own_in`) run the ops one by one when the fused
  // pass cannot take the shapes.
  NormKind norm;
  bool residual = false, norm_weight = false, norm_bias = false;
  int norm_step = -1, norm_out = -1;
};

// A stage graph compiled into steps. The steps point into the graph, which
// must outlive them.
struct CompiledStage {
  std::vector<Step> steps;
  std::vector<Tensor> constants;  // weights in their slots, others empty
  std::vector<int> input_slots;
  std::vector<int> output_slots;
  std::vector<std::vector<int>> release_after;  // per step: slots it reads last
  std::unique_ptr<KvCache> kv;  // cache-aware graphs only
  // How many patterns each fusion pass fused.
  int fused_attention = 0;
  int fused_elementwise = 0;
  int fused_norms = 0;
};

// Who makes each value slot (step index) and how often live steps and
// the outputs read it; the fusion passes and the weight pruning use it.
struct SlotUses {
  absl::flat_hash_map<int, int> producer;
  absl::flat_hash_map<int, int> readers;
};
SlotUses CountSlotUses(const CompiledStage& stage);

}  // namespace pipeserve::cpu_program

#endif  // PIPESERVE_RUNTIME_CPU_PROGRAM_STEPS_H_
