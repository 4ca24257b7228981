#include "runtime/cuda/step_pattern.h"

#include <cmath>
#include <utility>

#include "graph/dtype.h"
#include "graph/op_schema.h"

namespace pipeserve {
namespace {

using Matches = std::vector<PatternMatch>;

// Whether a node's scalar is the constant c: within 1e-6 of it, or c
// rounded to bfloat16 or float16 (the exporter rounds a number as PyTorch
// does for a 16-bit tensor).
bool IsConstant(double scalar, double c) {
  const float f = static_cast<float>(c);
  return std::fabs(scalar - c) <= 1e-6 * std::fabs(c) ||
         scalar == Bf16ToFloat(FloatToBf16(f)) || scalar == HalfToFloat(FloatToHalf(f));
}

bool OperandsFit(const Pattern& p, const Node& n) {
  switch (p.operands) {
    case Pattern::Operands::kTensors:
      return !HasScalarOperand(n);
    case Pattern::Operands::kAnyScalar:
      return HasScalarOperand(n);
    case Pattern::Operands::kScalar:
      return HasScalarOperand(n) && IsConstant(FloatAttr(n, "scalar", 0), p.scalar);
  }
  return false;
}

void MatchStep(const Pattern& p, int step, PatternMatch m, const StepView& v, Matches* out);

// Every way `p` can take `value`, read by step `parent`, extending m.
Matches MatchValue(const Pattern& p, int value, int parent, const PatternMatch& m,
                   const StepView& v) {
  if (p.op.empty()) {  // a leaf
    const int bound = m.values[p.leaf];
    if (bound >= 0 && bound != value) return {};
    PatternMatch took = m;
    took.values[p.leaf] = value;
    return {std::move(took)};
  }
  const int step = v.producer(value);
  if (step < 0 || v.only_reader[value] != parent) return {};
  Matches out;
  MatchStep(p, step, m, v, &out);
  return out;
}

// Every way p's inputs, in `order`, can take step's inputs.
Matches MatchInputs(const Pattern& p, const std::vector<int>& order, int step,
                    const PatternMatch& m, const StepView& v) {
  Matches states = {m};
  const std::vector<int>& in = v.in(step);
  for (size_t i = 0; i < order.size() && !states.empty(); ++i) {
    Matches next;
    for (const PatternMatch& s : states) {
      for (PatternMatch& e : MatchValue(p.in[order[i]], in[i], step, s, v)) {
        next.push_back(std::move(e));
      }
    }
    states = std::move(next);
  }
  return states;
}

void MatchStep(const Pattern& p, int step, PatternMatch m, const StepView& v, Matches* out) {
  const Node* n = v.node(step);
  if (n == nullptr || n->op() != p.op || v.in(step).size() != p.in.size() ||
      !OperandsFit(p, *n) || (p.check && !p.check(*n))) {
    return;
  }
  m.steps.push_back(step);
  if (p.name >= 0) m.named[p.name] = step;
  std::vector<std::vector<int>> orders = {{}};
  for (size_t i = 0; i < p.in.size(); ++i) orders[0].push_back(static_cast<int>(i));
  if (p.commutes && p.in.size() == 2) orders.push_back({1, 0});
  for (const std::vector<int>& order : orders) {
    for (PatternMatch& e : MatchInputs(p, order, step, m, v)) out->push_back(std::move(e));
  }
}

}  // namespace

Pattern Pattern::Named(int slot) && {
  name = slot;
  return std::move(*this);
}

Pattern Pattern::Where(std::function<bool(const Node&)> c) && {
  check = std::move(c);
  return std::move(*this);
}

Pattern Leaf(int slot) {
  Pattern p;
  p.leaf = slot;
  return p;
}

Pattern Op(std::string op, std::vector<Pattern> in) {
  Pattern p;
  p.op = std::move(op);
  p.in = std::move(in);
  return p;
}

Pattern Commuting(std::string op, Pattern a, Pattern b) {
  Pattern p = Op(std::move(op), {std::move(a), std::move(b)});
  p.commutes = true;
  return p;
}

Pattern Scalar(std::string op, Pattern x, double c) {
  Pattern p = Op(std::move(op), {std::move(x)});
  p.operands = Pattern::Operands::kScalar;
  p.scalar = c;
  return p;
}

Pattern AnyScalar(std::string op, Pattern x) {
  Pattern p = Op(std::move(op), {std::move(x)});
  p.operands = Pattern::Operands::kAnyScalar;
  return p;
}

std::optional<PatternMatch> MatchPattern(const Pattern& p, int root, const StepView& view,
                                         int slots) {
  PatternMatch m;
  m.values.assign(slots, -1);
  m.named.assign(slots, -1);
  Matches out;
  MatchStep(p, root, std::move(m), view, &out);
  if (out.empty()) return std::nullopt;
  return std::move(out.front());
}

}  // namespace pipeserve
