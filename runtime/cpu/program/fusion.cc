// The fusion passes of fusion.h: attention (matmul -> scale -> mask ->
// softmax -> matmul), norms (layer_norm or the RMSNorm pattern, with the
// residual add before them) and groups of elementwise ops.
#include "runtime/cpu/program/fusion.h"

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "graph/dtype.h"
#include "graph/op_schema.h"
#include "graph/shape.h"
#include "runtime/cpu/cpu_ops.h"

namespace pipeserve::cpu_program {
namespace {

// ---- attention --------------------------------------------------------------

// An attention pattern found back from its last matmul: the steps it folds
// in, and what the kAttention step reads.
struct AttentionMatch {
  std::vector<Step*> chain;  // the pattern's steps but the last matmul
  int q = -1, k = -1;        // value slots of q and of k (before k^T)
  float scale = 1.0f;
  int cond = -1, add = -1;   // mask slots, -1 when absent
  float fill = 0.0f;
};

// Walks back from a matmul through the producers of its inputs, matching
// the attention pattern one part at a time (FuseAttention, fusion.h). The
// slot uses are counted once, before the pass.
class AttentionMatcher {
 public:
  AttentionMatcher(std::vector<Step>* steps, SlotUses uses, const ValueShapes& shapes,
                   const ValueTypes& types)
      : steps_(*steps), uses_(std::move(uses)), shapes_(shapes), types_(types) {}

  // Whether the pattern ends at `last` (a matmul); fills *m when it does.
  bool Match(const Step& last, AttentionMatch* m) {
    const Step* softmax = MatchSoftmax(last, m);
    int s1_slot = -1, s0_slot = -1;
    return softmax != nullptr && MatchMask(*softmax, m, &s1_slot) &&
           MatchScale(s1_slot, m, &s0_slot) && MatchScores(s0_slot, last, m);
  }

 private:
  Step* StepOf(int slot) {
    auto it = uses_.producer.find(slot);
    return it == uses_.producer.end() ? nullptr : &steps_[it->second];
  }

  static std::string OpOf(const Step* s) { return s == nullptr ? std::string() : s->node->op(); }

  // Back from `slot` through identities and casts read once; returns the
  // slot reached and its producer.
  std::pair<int, Step*> Back(int slot, AttentionMatch* m) {
    Step* s = StepOf(slot);
    while (s != nullptr && (s->kind == Kind::kIdentity || OpOf(s) == "cast") &&
           uses_.readers[slot] == 1) {
      m->chain.push_back(s);
      slot = s->in[0];
      s = StepOf(slot);
    }
    return std::make_pair(slot, s);
  }

  // The softmax over the last dim whose probabilities `last` reads.
  const Step* MatchSoftmax(const Step& last, AttentionMatch* m) {
    // Back from the probabilities through identities and casts.
    auto [p_slot, softmax] = Back(last.in[0], m);
    if (OpOf(softmax) != "softmax" || uses_.readers[p_slot] != 1) return nullptr;
    const Shape& sshape = shapes_.at(softmax->node->inputs(0));
    int64_t dim = IntAttr(*softmax->node, "dim", -1);
    if (dim != -1 && dim != static_cast<int64_t>(sshape.size()) - 1) return nullptr;
    m->chain.push_back(softmax);
    return softmax;
  }

  // The mask before the softmax, if any: where(cond, full(fill), .) or
  // + add. *s1_slot: the scores it masks.
  bool MatchMask(const Step& softmax, AttentionMatch* m, int* s1_slot) {
    auto [s2_slot, masked] = Back(softmax.in[0], m);
    if (uses_.readers[s2_slot] != 1) return false;
    *s1_slot = s2_slot;
    if (OpOf(masked) == "where" && !HasScalarOperand(*masked->node)) {
      Step* c = StepOf(masked->in[1]);
      if (OpOf(c) != "full" || !ResolvedInts(*c->node, "shape", {}, -1).empty()) return false;
      m->fill = static_cast<float>(FloatAttr(*c->node, "value", 0));
      m->cond = masked->in[0];
      *s1_slot = masked->in[2];
      m->chain.push_back(masked);
    } else if (OpOf(masked) == "add" && !HasScalarOperand(*masked->node)) {
      m->add = masked->in[1];
      *s1_slot = masked->in[0];
      m->chain.push_back(masked);
    }
    return true;
  }

  // The scaling of the scores by a number, if any. *s0_slot: the scores
  // it scales.
  bool MatchScale(int s1_slot, AttentionMatch* m, int* s0_slot) {
    if (uses_.readers[s1_slot] != 1) return false;
    *s0_slot = s1_slot;
    Step* scaled = StepOf(s1_slot);
    if ((OpOf(scaled) == "mul" || OpOf(scaled) == "div") && HasScalarOperand(*scaled->node) &&
        IntAttr(*scaled->node, "reverse", 0) == 0) {
      const float v = static_cast<float>(FloatAttr(*scaled->node, "scalar", 1));
      m->scale = OpOf(scaled) == "mul" ? v : 1.0f / v;
      *s0_slot = scaled->in[0];
      m->chain.push_back(scaled);
    }
    return true;
  }

  // The scores matmul(q, permute(k)) with the permute swapping the last
  // two dims, q, k and `last`'s v of one rank, and with `last`'s output of
  // one floating-point type (the kernel reads and writes that type: a
  // float32 v beside bf16 q and k was read as bf16).
  bool MatchScores(int s0_slot, const Step& last, AttentionMatch* m) {
    Step* scores = StepOf(s0_slot);
    if (OpOf(scores) != "matmul" || uses_.readers[s0_slot] != 1) return false;
    Step* kt = StepOf(scores->in[1]);
    if (OpOf(kt) != "permute" || uses_.readers[scores->in[1]] != 1) return false;
    const Shape& kshape = shapes_.at(kt->node->inputs(0));
    std::vector<int64_t> dims = ResolvedInts(*kt->node, "dims", {}, -1);
    const int r = static_cast<int>(kshape.size());
    bool swap_last = r >= 2 && static_cast<int>(dims.size()) == r;
    for (int i = 0; swap_last && i < r; ++i) {
      int want = i == r - 2 ? r - 1 : i == r - 1 ? r - 2 : i;
      swap_last = dims[i] == want;
    }
    if (!swap_last || shapes_.at(scores->node->inputs(0)).size() != kshape.size() ||
        shapes_.at(last.node->inputs(1)).size() != kshape.size()) {
      return false;
    }
    const DataType t = types_.at(scores->node->inputs(0));
    if (!IsFloatingPoint(t) || types_.at(kt->node->inputs(0)) != t ||
        types_.at(last.node->inputs(1)) != t || types_.at(last.node->outputs(0)) != t) {
      return false;
    }
    m->chain.push_back(scores);
    m->chain.push_back(kt);
    m->q = scores->in[0];
    m->k = kt->in[0];
    return true;
  }

  std::vector<Step>& steps_;
  SlotUses uses_;
  const ValueShapes& shapes_;
  const ValueTypes& types_;
};

// ---- norms ------------------------------------------------------------------

// A norm found in the graph: its input, weight and bias slots, its steps
// (in order) and the step whose result is the norm's.
struct NormMatch {
  NormKind kind;
  int x = -1, weight = -1, bias = -1;
  std::vector<int> steps;
  int last = -1;
};

// A layer_norm op at step i (which RunCpuOp would run on its own).
bool MatchLayerNorm(const Step& last, int i, NormMatch* m) {
  if (last.node->op() != "layer_norm" || last.kind != Kind::kGeneric) return false;
  m->kind.ndim = IntAttr(*last.node, "ndim", 1);
  m->kind.eps = static_cast<float>(FloatAttr(*last.node, "eps", 1e-5));
  m->x = last.in[0];
  size_t k = 1;
  if (IntAttr(*last.node, "has_weight", 0)) m->weight = last.in[k++];
  if (IntAttr(*last.node, "has_bias", 0)) m->bias = last.in[k++];
  m->steps = {i};
  m->last = i;
  return true;
}

// The RMSNorm pattern ending at step i: mul(w, mul(x, rsqrt(add(mean(
// pow(x, 2), [-1], keepdim), eps)))), either operand order of the muls,
// every value between read once, w of x's last dim.
bool MatchRms(const std::vector<Step>& steps, int i, const SlotUses& uses,
              const ValueShapes& shapes, NormMatch* m) {
  auto made_by = [&](int slot, const char* op) -> const Step* {
    auto p = uses.producer.find(slot);
    if (p == uses.producer.end() || uses.readers.at(slot) != 1) return nullptr;
    const Step& s = steps[p->second];
    if (s.node->op() != op || s.kind == Kind::kSkip || s.symbolic) return nullptr;
    return &s;
  };
  auto index = [&](const Step* s) { return static_cast<int>(s - steps.data()); };
  const Step& root = steps[i];
  if (root.node->op() != "mul" || root.in.size() != 2 || HasScalarOperand(*root.node)) {
    return false;
  }
  for (int wi : {0, 1}) {
    const Step* h = made_by(root.in[1 - wi], "mul");
    if (h == nullptr || h->in.size() != 2 || HasScalarOperand(*h->node)) continue;
    for (int xi : {0, 1}) {
      const Step* r = made_by(h->in[1 - xi], "rsqrt");
      const Step* a = r == nullptr ? nullptr : made_by(r->in[0], "add");
      if (a == nullptr || !HasScalarOperand(*a->node)) continue;
      const Step* mean = made_by(a->in[0], "mean");
      if (mean == nullptr || IntAttr(*mean->node, "keepdim", 0) == 0) continue;
      const Shape& xs = shapes.at(h->node->inputs(xi));
      const std::vector<int64_t> dims = ResolvedInts(*mean->node, "dims", {}, -1);
      if (xs.empty() || dims.size() != 1 ||
          (dims[0] != -1 && dims[0] != static_cast<int64_t>(xs.size()) - 1)) {
        continue;
      }
      const Step* pow = made_by(mean->in[0], "pow");
      if (pow == nullptr || !HasScalarOperand(*pow->node) ||
          IntAttr(*pow->node, "reverse", 0) != 0 || FloatAttr(*pow->node, "scalar", 0) != 2 ||
          pow->in[0] != h->in[xi]) {
        continue;
      }
      const Shape& ws = shapes.at(root.node->inputs(wi));
      if (NumElements(ws) != xs.back() || shapes.at(root.node->outputs(0)) != xs) continue;
      m->kind.rms = true;
      m->kind.ndim = 1;
      m->kind.eps = static_cast<float>(FloatAttr(*a->node, "scalar", 0));
      m->x = h->in[xi];
      m->weight = root.in[wi];
      m->steps = {index(pow), index(mean), index(a), index(r), index(h), i};
      m->last = i;
      return true;
    }
  }
  return false;
}

// Whether every input of the norm's steps is of `type`.
bool AllOfType(const std::vector<Step>& steps, const NormMatch& m, DataType type,
               const ValueTypes& types) {
  for (int j : m.steps) {
    for (const std::string& v : steps[j].node->inputs()) {
      if (types.at(v) != type) return false;
    }
  }
  return true;
}

// The residual add, if the norm's input is one that can join it: an
// add(x, residual) of `type` with x of the sum's shape (either operand
// order), the residual of it or of its trailing dims, and the norm's
// weight and bias made before it. Sets *host to the add's step and
// *residual to its {x, residual} slots.
bool MatchResidualAdd(const std::vector<Step>& steps, const NormMatch& m, DataType type,
                      const SlotUses& uses, const ValueShapes& shapes, const ValueTypes& types,
                      int* host, std::vector<int>* residual) {
  auto p = uses.producer.find(m.x);
  if (p == uses.producer.end()) return false;
  const int ai = p->second;
  const Step& add = steps[ai];
  std::vector<int> in = add.in;
  std::vector<std::string> names;
  for (const std::string& v : add.node->inputs()) names.push_back(v);
  const Shape& sum_shape = shapes.at(add.node->outputs(0));
  if (add.node->op() != "add" || (add.kind != Kind::kAdd && add.kind != Kind::kGeneric) ||
      add.symbolic || in.size() != 2 || HasScalarOperand(*add.node) ||
      FloatAttr(*add.node, "alpha", 1) != 1 || add.out_type != type) {
    return false;
  }
  if (shapes.at(names[0]) != sum_shape) {
    std::swap(in[0], in[1]);
    std::swap(names[0], names[1]);
  }
  if (shapes.at(names[0]) != sum_shape || types.at(names[0]) != type ||
      types.at(names[1]) != type) {
    return false;
  }
  for (int slot : {m.weight, m.bias}) {
    if (slot < 0) continue;
    auto q = uses.producer.find(slot);
    if (q != uses.producer.end() && q->second >= ai) return false;
  }
  const Shape& r = shapes.at(names[1]);
  size_t first = 0;
  while (first < r.size() && r[first] == 1) ++first;
  if (r.size() - first > sum_shape.size() ||
      !std::equal(r.begin() + first, r.end(), sum_shape.end() - (r.size() - first))) {
    return false;
  }
  *host = ai;
  *residual = in;
  return true;
}

// Makes step `host` (the residual add, or the norm's last step) the kNorm
// step of norm `m`, reading `residual` ({x, residual}; empty without an
// add), and the norm's other steps kSkip.
void MakeNormStep(const NormMatch& m, int host, const std::vector<int>& residual,
                  std::vector<Step>* steps) {
  Step& h = (*steps)[host];
  std::vector<int> members = m.steps;
  if (host != m.last) members.insert(members.begin(), host);
  h.own_in = h.in;
  h.members = members;
  h.in = residual.empty() ? std::vector<int>{m.x} : residual;
  if (m.weight >= 0) h.in.push_back(m.weight);
  if (m.bias >= 0) h.in.push_back(m.bias);
  h.kind = Kind::kNorm;
  h.norm = m.kind;
  h.residual = !residual.empty();
  h.norm_weight = m.weight >= 0;
  h.norm_bias = m.bias >= 0;
  h.norm_step = m.last;
  h.norm_out = (*steps)[m.last].out;
  for (int j : members) {
    if (j != host) (*steps)[j].kind = Kind::kSkip;
  }
}

// ---- elementwise groups -----------------------------------------------------

// Whether step s may join an elementwise group: an op ElementwiseGroup
// runs, float32 or bfloat16 throughout, not fused into anything already.
bool JoinsElementwiseGroup(const Step& s, const ValueTypes& types) {
  if (s.kind == Kind::kSkip || s.kind == Kind::kAttention || s.kind == Kind::kNorm ||
      s.kind == Kind::kForward ||
      s.kind == Kind::kIdentity || s.kind == Kind::kElementwise || s.fused_relu ||
      s.symbolic || !ElementwiseGroup::Fusable(*s.node)) {
    return false;
  }
  if (s.out_type != DT_FLOAT32 && s.out_type != DT_BFLOAT16) return false;
  for (const std::string& v : s.node->inputs()) {
    if (types.at(v) != s.out_type) return false;
  }
  return true;
}

// The steps of the group ending at step i (i first): back from i through
// its inputs, every step that may join, is in no group yet, makes a value
// only the group reads, and has i's output shape.
std::vector<int> GroupEndingAt(int i, const std::vector<Step>& steps,
                               const std::vector<bool>& grouped, const ValueShapes& shapes,
                               const ValueTypes& types, SlotUses* uses) {
  const Shape& out_shape = shapes.at(steps[i].node->outputs(0));
  std::vector<int> members = {i}, work = {i};
  while (!work.empty()) {
    const int m = work.back();
    work.pop_back();
    for (int v : steps[m].in) {
      auto p = uses->producer.find(v);
      if (p == uses->producer.end()) continue;
      const int j = p->second;
      if (grouped[j] || std::find(members.begin(), members.end(), j) != members.end() ||
          !JoinsElementwiseGroup(steps[j], types) || uses->readers[v] != 1 ||
          shapes.at(steps[j].node->outputs(0)) != out_shape) {
        continue;
      }
      members.push_back(j);
      work.push_back(j);
    }
  }
  return members;
}

// Makes step i, the last of `members` (in order), one kElementwise step
// running them all; the others become kSkip.
void MakeElementwiseStep(int i, const std::vector<int>& members,
                         const absl::flat_hash_map<int, int>& producer,
                         std::vector<Step>* steps) {
  absl::flat_hash_map<int, int> op_of;  // member step -> op index
  std::vector<int> externals;
  auto operand = [&](int slot) {
    auto p = producer.find(slot);
    if (p != producer.end() && op_of.contains(p->second)) return op_of[p->second];
    auto e = std::find(externals.begin(), externals.end(), slot);
    if (e == externals.end()) {
      externals.push_back(slot);
      e = externals.end() - 1;
    }
    return -1 - static_cast<int>(e - externals.begin());
  };
  std::vector<ElementwiseGroup::Op> ops;
  for (int j : members) {
    ElementwiseGroup::Op op{(*steps)[j].node};
    op.a = operand((*steps)[j].in[0]);
    if ((*steps)[j].in.size() > 1) op.b = operand((*steps)[j].in[1]);
    op_of[j] = static_cast<int>(ops.size());
    ops.push_back(op);
  }
  Step& root = (*steps)[i];
  root.group = std::make_shared<ElementwiseGroup>(std::move(ops),
                                                  static_cast<int>(externals.size()));
  root.members = members;
  for (int j : members) {
    if (j != i) (*steps)[j].kind = Kind::kSkip;
  }
  root.kind = Kind::kElementwise;
  root.own_in = root.in;
  root.in = externals;
}

}  // namespace

void FuseAttention(const ValueShapes& shapes, const ValueTypes& types, CompiledStage* stage) {
  AttentionMatcher matcher(&stage->steps, CountSlotUses(*stage), shapes, types);
  for (Step& last : stage->steps) {
    if (last.node->op() != "matmul" || last.kind == Kind::kSkip) continue;
    AttentionMatch m;
    if (!matcher.Match(last, &m)) continue;
    for (Step* s : m.chain) s->kind = Kind::kSkip;
    last.kind = Kind::kAttention;
    last.in = {m.q, m.k, last.in[1]};
    last.scale = m.scale;
    last.mask_cond = m.cond;
    last.mask_add = m.add;
    last.mask_fill = m.fill;
    ++stage->fused_attention;
  }
}

void FuseNorms(const ValueShapes& shapes, const ValueTypes& types, CompiledStage* stage) {
  std::vector<Step>& steps = stage->steps;
  const SlotUses uses = CountSlotUses(*stage);
  for (size_t i = 0; i < steps.size(); ++i) {
    Step& last = steps[i];
    if (last.kind == Kind::kSkip || last.symbolic) continue;
    NormMatch m;
    if (!MatchLayerNorm(last, static_cast<int>(i), &m) &&
        !MatchRms(steps, static_cast<int>(i), uses, shapes, &m)) {
      continue;
    }
    const DataType type = last.out_type;
    if (type != DT_FLOAT32 && type != DT_BFLOAT16 && type != DT_FLOAT16) continue;
    if (!AllOfType(steps, m, type, types)) continue;
    int host = m.last;
    std::vector<int> residual;
    if (!MatchResidualAdd(steps, m, type, uses, shapes, types, &host, &residual) &&
        !m.kind.rms) {
      continue;
    }
    MakeNormStep(m, host, residual, &steps);
    ++stage->fused_norms;
  }
}

void FuseElementwise(const ValueShapes& shapes, const ValueTypes& types, CompiledStage* stage) {
  std::vector<Step>& steps = stage->steps;
  SlotUses uses = CountSlotUses(*stage);
  std::vector<bool> grouped(steps.size(), false);
  for (int i = static_cast<int>(steps.size()) - 1; i >= 0; --i) {
    if (grouped[i] || !JoinsElementwiseGroup(steps[i], types)) continue;
    std::vector<int> members = GroupEndingAt(i, steps, grouped, shapes, types, &uses);
    if (members.size() < 2) continue;
    std::sort(members.begin(), members.end());
    MakeElementwiseStep(i, members, uses.producer, &steps);
    for (int j : members) grouped[j] = true;
    ++stage->fused_elementwise;
  }
}

}  // namespace pipeserve::cpu_program
