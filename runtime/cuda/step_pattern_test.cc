// MatchPattern on hand-made steps: either order of a commuting op, a leaf
// seen twice taking one value, scalar constants, a step another reads
// refused inside a pattern, names and a step no pattern may take.
#include "runtime/cuda/step_pattern.h"

#include <optional>
#include <string>
#include <vector>

#include "graph/op_schema.h"
#include "gtest/gtest.h"

namespace pipeserve {
namespace {

// Steps over values: step i writes value `out[i]`, reading `in[i]`.
class Steps {
 public:
  explicit Steps(int values) : producer_(values, -1), readers_(values) {}

  // Adds a step: op on `in`, with a scalar operand when `scalar` is set.
  int Add(const std::string& op, std::vector<int> in, int out,
          std::optional<double> scalar = std::nullopt) {
    Node n;
    n.set_op(op);
    if (scalar) (*n.mutable_attrs())["scalar"].set_f(*scalar);
    const int step = static_cast<int>(nodes_.size());
    for (int v : in) readers_[v].push_back(step);
    nodes_.push_back(n);
    in_.push_back(std::move(in));
    producer_[out] = step;
    return step;
  }

  StepView View(std::vector<bool> taken = {}) const {
    StepView v;
    v.producer = [this](int value) { return producer_[value]; };
    v.node = [this, taken](int step) -> const Node* {
      return step < static_cast<int>(taken.size()) && taken[step] ? nullptr : &nodes_[step];
    };
    v.in = [this](int step) -> const std::vector<int>& { return in_[step]; };
    for (const std::vector<int>& r : readers_) v.only_reader.push_back(r.size() == 1 ? r[0] : -1);
    return v;
  }

 private:
  std::vector<Node> nodes_;
  std::vector<std::vector<int>> in_;
  std::vector<int> producer_;
  std::vector<std::vector<int>> readers_;
};

enum { kX, kY };

TEST(StepPatternTest, ACommutingOpMatchesEitherOrderAndALeafKeepsItsValue) {
  // v3 = 2 * v0 (scalar); v4 = v1 + v3; the pattern (x * 2) + y, sum either way round.
  Steps s(5);
  const int dbl = s.Add("mul", {0}, 3, 2.0);
  const int add = s.Add("add", {1, 3}, 4);
  ASSERT_TRUE(HasScalarOperand(*s.View().node(dbl)));
  const Pattern p = Commuting("add", Scalar("mul", Leaf(kX), 2.0).Named(0), Leaf(kY));
  std::optional<PatternMatch> m = MatchPattern(p, add, s.View());
  ASSERT_TRUE(m.has_value());
  EXPECT_EQ(m->values[kX], 0);
  EXPECT_EQ(m->values[kY], 1);
  EXPECT_EQ(m->steps, (std::vector<int>{add, dbl}));  // the root first
  EXPECT_EQ(m->named[0], dbl);
  // Not commuting: the scalar mul must be the add's first input.
  EXPECT_FALSE(MatchPattern(Op("add", {Scalar("mul", Leaf(kX), 2.0), Leaf(kY)}), add, s.View()));
  // Another constant, or the scalar mul taken by another pattern.
  EXPECT_FALSE(MatchPattern(Commuting("add", Scalar("mul", Leaf(kX), 3.0), Leaf(kY)), add,
                            s.View()));
  EXPECT_FALSE(MatchPattern(p, add, s.View({true})));
  // The constant rounded to bfloat16, as the exporter writes it for a
  // 16-bit tensor (0.044715 is 0.044677734375 there).
  Steps r(5);
  r.Add("mul", {0}, 3, 0.044677734375);
  const int sum = r.Add("add", {1, 3}, 4);
  EXPECT_TRUE(MatchPattern(Commuting("add", Scalar("mul", Leaf(kX), 0.044715), Leaf(kY)), sum,
                           r.View()));
}

TEST(StepPatternTest, ALeafSeenTwiceIsOneValueAcrossBacktracking) {
  // v2 = v0 * v1; v3 = neg(v1); v4 = v2 + v3. In x * y + neg(y), y is v1:
  // the mul's first order binds y to v1 only after x takes v0, and the
  // other order (y = v0) fails at neg, so the match backtracks to it.
  Steps s(5);
  s.Add("mul", {1, 0}, 2);
  s.Add("neg", {1}, 3);
  const int add = s.Add("add", {2, 3}, 4);
  const Pattern p =
      Commuting("add", Commuting("mul", Leaf(kX), Leaf(kY)), Op("neg", {Leaf(kY)}));
  std::optional<PatternMatch> m = MatchPattern(p, add, s.View());
  ASSERT_TRUE(m.has_value());
  EXPECT_EQ(m->values[kX], 0);
  EXPECT_EQ(m->values[kY], 1);
  // x * x + neg(y) is not x * y + neg(y) with x == y unless the values are one.
  EXPECT_FALSE(MatchPattern(Commuting("add", Commuting("mul", Leaf(kX), Leaf(kX)),
                                      Op("neg", {Leaf(kY)})),
                            add, s.View()));
}

TEST(StepPatternTest, AStepReadByAnotherIsNoPartOfAPattern) {
  // v2 = neg(v0), read by the add and by a second step: absorbing it into
  // the add would lose the value the other reads.
  Steps s(5);
  s.Add("neg", {0}, 2);
  const int add = s.Add("add", {2, 1}, 3);
  s.Add("relu", {2}, 4);
  EXPECT_FALSE(MatchPattern(Op("add", {Op("neg", {Leaf(kX)}), Leaf(kY)}), add, s.View()));
  // As a leaf it matches.
  EXPECT_TRUE(MatchPattern(Op("add", {Leaf(kX), Leaf(kY)}), add, s.View()));
  // A check on the node.
  EXPECT_FALSE(MatchPattern(Op("add", {Leaf(kX), Leaf(kY)}).Where([](const Node& n) {
                 return n.attrs().contains("alpha");
               }),
                            add, s.View()));
}

}  // namespace
}  // namespace pipeserve
