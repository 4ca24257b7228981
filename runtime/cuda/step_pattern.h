// Patterns of ops matched against a lowered stage's steps (device_plan.h),
// from a root step back through the producers of its inputs: the fusions
// of GELU written out, RMSNorm and the rotary embedding say what they
// take as a pattern instead of walking producers by hand.
//
//   enum { kX };
//   // 0.5 * x * (1 + ...), the product either way round
//   const Pattern gelu = Commuting("mul", Scalar("mul", Leaf(kX), 0.5), ...);
//   if (std::optional<PatternMatch> m = MatchPattern(gelu, root, view)) {
//     int x = m->values[kX];  // m->steps: every step matched, root first
//   }
//
// An op matches a step whose node has that op, as many inputs as the
// pattern gives and the operands it says (tensors only, or one input and
// a scalar operand, near a constant where given), and passes its `check`;
// each step matched but the root is read by its parent in the pattern
// only, so absorbing them loses no value another step reads. A leaf
// matches any value, and a leaf seen again the value it took first.
#ifndef PIPESERVE_RUNTIME_CUDA_STEP_PATTERN_H_
#define PIPESERVE_RUNTIME_CUDA_STEP_PATTERN_H_

#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "proto/model.pb.h"

namespace pipeserve {

struct Pattern {
  enum class Operands { kTensors, kScalar, kAnyScalar };
  std::string op;  // empty: a leaf
  int leaf = -1;   // a leaf's slot in PatternMatch::values
  std::vector<Pattern> in;
  Operands operands = Operands::kTensors;
  // kScalar's constant: within 1e-6 of it (relative), or it rounded to a
  // 16-bit float type.
  double scalar = 0;
  bool commutes = false;  // two inputs, either way round
  std::function<bool(const Node&)> check;
  int name = -1;  // its step's slot in PatternMatch::named

  // Records the matched step in PatternMatch::named[slot].
  Pattern Named(int slot) &&;
  Pattern Where(std::function<bool(const Node&)> check) &&;
};

Pattern Leaf(int slot);
// `op` on tensors `in`, in this order.
Pattern Op(std::string op, std::vector<Pattern> in);
// `op` on two tensors, either way round.
Pattern Commuting(std::string op, Pattern a, Pattern b);
// `op` on one tensor and the scalar c (x op c, or c op x when the node
// says reverse: the caller's check tells them apart where it matters).
Pattern Scalar(std::string op, Pattern x, double c);
// `op` on one tensor and any scalar.
Pattern AnyScalar(std::string op, Pattern x);

// What a match reads of the steps.
struct StepView {
  std::function<int(int value)> producer;  // the step writing a value, -1: none
  // A step's node; nullptr for a step no pattern may take (another
  // pattern's, or not its node's own kind any more).
  std::function<const Node*(int step)> node;
  std::function<const std::vector<int>&(int step)> in;  // its input values
  std::vector<int> only_reader;  // by value: the one step reading it, -1: none or several
};

struct PatternMatch {
  std::vector<int> values;  // by leaf slot
  std::vector<int> steps;   // every step matched, the root first
  std::vector<int> named;   // by Named slot, -1: not named
};

// The first match of `p` rooted at step `root` (the leaves' and names'
// slots below `slots`), or none.
std::optional<PatternMatch> MatchPattern(const Pattern& p, int root, const StepView& view,
                                         int slots = 8);

}  // namespace pipeserve

#endif  // PIPESERVE_RUNTIME_CUDA_STEP_PATTERN_H_
