// LoweredStage's fusion of elementwise chains (device_plan.h): a chain of
// elementwise steps, each read only by the next, runs as one program of
// kernels/elementwise_program.h that reads the chain's inputs once and
// writes its last result, instead of one kernel and one buffer round trip
// per op (GPT-2's GELU written out is 8 ops; Llama's RMSNorm scaling 3).
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "runtime/cuda/device_plan.h"
#include "graph/op_schema.h"
#include "runtime/cuda/elementwise_lowering.h"

namespace pipeserve {
namespace {

// x op c, not c op x (pow: x^2, not 2^x).
bool NotReversed(const Node& n) { return IntAttr(n, "reverse", 0) == 0; }

}  // namespace

bool LoweredStage::Fusable(const Step& s) {
  return s.kind == Kind::kProgram || s.kind == Kind::kUnary || s.kind == Kind::kBinary ||
         s.kind == Kind::kScalar || s.kind == Kind::kRelu;
}

void LoweredStage::FuseElementwise() {
  const std::vector<int> only_reader = OnlyReaders();  // an output is never fused away
  for (Step& s : steps_) {
    const int r = only_reader[s.out];
    if (Fusable(s) && r >= 0 && Fusable(steps_[r])) s.fused_into = r;
  }
}

// A step no pattern has taken (still its node's own kind; views, a GELU
// made a view of its GEMM among them, are no pattern's members).
bool LoweredStage::Unfused(int i) const {
  return i >= 0 && steps_[i].kind != Kind::kAbsorbed && steps_[i].kind != Kind::kRmsNorm &&
         steps_[i].kind != Kind::kRotary && steps_[i].kind != Kind::kResidualSum &&
         steps_[i].kind != Kind::kView;
}

StepView LoweredStage::View() const {
  StepView v;
  v.producer = [this](int value) { return values_[value].producer; };
  v.node = [this](int step) { return Unfused(step) ? &NodeOf(steps_[step]) : nullptr; };
  v.in = [this](int step) -> const std::vector<int>& { return steps_[step].in; };
  v.only_reader = OnlyReaders();
  return v;
}

std::vector<int> LoweredStage::Uses() const {
  std::vector<int> uses(values_.size(), 0);
  for (const Step& s : steps_) {
    for (int v : s.in) ++uses[v];
  }
  for (int v : output_values_) uses[v] += 2;  // an output is never absorbed
  return uses;
}

std::vector<int> LoweredStage::OnlyReaders() const {
  const std::vector<int> uses = Uses();
  std::vector<int> reader(values_.size(), -1);
  for (size_t i = 0; i < steps_.size(); ++i) {
    for (int v : steps_[i].in) reader[v] = static_cast<int>(i);
  }
  std::vector<int> only(values_.size(), -1);
  for (size_t v = 0; v < values_.size(); ++v) only[v] = uses[v] == 1 ? reader[v] : -1;
  return only;
}

// GELU with the tanh approximation on a GEMM's result -- gelu(approximate=
// "tanh"), or GPT-2's written out: 0.5 * x * (1 + tanh(sqrt(2 / pi) * (x +
// 0.044715 * x^3))), eight ops -- is the GEMM's epilogue (cuBLASLt's GELU
// is this approximation), when nothing else reads the GEMM's result. The
// GELU's last step becomes a view of x; its other steps are absorbed.
void LoweredStage::FuseGeluEpilogues() {
  const std::vector<int> uses = Uses();
  const StepView view = View();
  for (size_t root = 0; root < steps_.size(); ++root) {
    Step& s = steps_[root];
    int x = -1;
    std::vector<int> absorbed;
    if (s.kind == Kind::kUnary && s.unary == kernels::UnaryKind::kGeluTanh &&
        Unfused(static_cast<int>(root))) {
      if (uses[s.in[0]] == 1) x = s.in[0];
    } else if (!GeluWrittenOut(static_cast<int>(root), view, &x, &absorbed) ||
               uses[x] != 3) {
      continue;  // x must be read by 0.5 * x, x^3 and x + ... only
    }
    const int gemm = x < 0 ? -1 : GemmBehind(x, uses);
    if (gemm < 0) continue;
    steps_[gemm].gelu = true;
    for (int k : absorbed) steps_[k].kind = Kind::kAbsorbed;
    s.kind = Kind::kView;
    values_[s.out].view_of = x;
  }
}

int LoweredStage::GemmBehind(int x, const std::vector<int>& uses) const {
  int v = x;
  while (values_[v].view_of >= 0) {
    v = values_[v].view_of;
    if (uses[v] != 1) return -1;  // another reader needs it without the GELU
  }
  const int p = values_[v].producer;
  if (p < 0) return -1;
  const Step& g = steps_[p];
  const bool gemm = g.kind == Kind::kMm || g.kind == Kind::kLinear || g.kind == Kind::kAddmm;
  return gemm && !g.relu && !g.gelu ? p : -1;
}

bool LoweredStage::GeluWrittenOut(int root, const StepView& view, int* x,
                                  std::vector<int>* absorbed) const {
  // 0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3))), either way round.
  enum { kX };
  static const Pattern* gelu = [] {
    Pattern cube = Scalar("pow", Leaf(kX), 3.0).Where(NotReversed);
    Pattern inner = Commuting("add", Leaf(kX), Scalar("mul", std::move(cube), 0.044715));
    Pattern squashed = Op("tanh", {Scalar("mul", std::move(inner), 0.7978845608028654)});
    return new Pattern(Commuting("mul", Scalar("mul", Leaf(kX), 0.5),
                                 Scalar("add", std::move(squashed), 1.0)));
  }();
  std::optional<PatternMatch> m = MatchPattern(*gelu, root, view);
  if (!m) return false;
  *x = m->values[kX];
  absorbed->assign(m->steps.begin() + 1, m->steps.end());
  return true;
}

// Linear layers on one input whose weights have one shape and type run as
// one strided-batched GEMM: the first is the head, the others its
// members. Only plain ones (no bias, no epilogue; parameters for weights,
// none shared) whose outputs need the same forms: the plan lays the
// weights and the outputs out evenly spaced (LayOutWeights, LayOutBuffers).
void LoweredStage::FormGemmGroups() {
  auto plain = [&](const Step& s) {
    return s.kind == Kind::kLinear && s.in.size() == 2 && !s.relu && !s.gelu &&
           values_[s.in[1]].param >= 0 && s.group_head < 0 && s.group.empty();
  };
  std::vector<int> uses = Uses();
  for (size_t h = 0; h < steps_.size(); ++h) {
    if (!plain(steps_[h]) || uses[steps_[h].in[1]] != 1) continue;
    const Value& w = values_[steps_[h].in[1]];
    const Value& out = values_[steps_[h].out];
    for (size_t m = h + 1; m < steps_.size(); ++m) {
      const Step& s = steps_[m];
      if (!plain(s) || s.in[0] != steps_[h].in[0] || uses[s.in[1]] != 1) continue;
      const Value& wm = values_[s.in[1]];
      const Value& om = values_[s.out];
      if (params_[wm.param].shape() != params_[w.param].shape() || wm.type != w.type ||
          om.type != out.type || om.need_f32 != out.need_f32 || om.need_gemm != out.need_gemm ||
          wm.need_f32 != w.need_f32 || wm.need_gemm != w.need_gemm) {
        continue;
      }
      steps_[h].group.push_back(static_cast<int>(m));
      steps_[m].group_head = static_cast<int>(h);
    }
  }
}

void LoweredStage::MarkBatched(const std::vector<Shape>& shape, Buffers* b) const {
  b->batched.assign(values_.size(), {});
  for (const Step& head : steps_) {
    const Buffers::GroupStrides strides = GroupFits(head, shape, *b);
    if (strides.a == 0) continue;
    b->batched[head.out] = strides;
    for (int m : head.group) b->batched[steps_[m].out] = strides;
  }
}

LoweredStage::Buffers::GroupStrides LoweredStage::GroupFits(const Step& head,
                                                            const std::vector<Shape>& shape,
                                                            const Buffers& b) const {
  if (head.group.empty() || shape[head.in[1]].back() == 0) return {};  // K = 0: each a fill
  const bool sixteen = values_[head.out].type != DT_FLOAT32;
  const bool w_f32 = sixteen || gemm_type_ == DType::kF32;  // the GEMM's operand form
  const int64_t a_bytes = sixteen ? ElementSize(values_[head.out].type) : DTypeBytes(gemm_type_);
  auto weight = [&](const Step& s) { return (w_f32 ? b.f32 : b.gm)[s.in[1]]; };
  auto out = [&](const Step& s) { return b.has_f32[s.out] ? b.f32[s.out] : b.gm[s.out]; };
  const int64_t d_bytes = b.has_f32[head.out] ? ElementSize(values_[head.out].type)
                                              : DTypeBytes(gemm_type_);
  const int64_t da = weight(steps_[head.group[0]]).offset - weight(head).offset;
  const int64_t dd = out(steps_[head.group[0]]).offset - out(head).offset;
  if (da <= 0 || dd <= 0 || da % a_bytes != 0 || dd % d_bytes != 0) return {};
  for (size_t i = 0; i < head.group.size(); ++i) {
    const Step& m = steps_[head.group[i]];
    if (b.has_f32[m.out] != b.has_f32[head.out] || b.has_gm[m.out] != b.has_gm[head.out] ||
        weight(m).offset - weight(head).offset != da * static_cast<int64_t>(i + 1) ||
        out(m).offset - out(head).offset != dd * static_cast<int64_t>(i + 1)) {
      return {};
    }
  }
  return {da / a_bytes, dd / d_bytes};
}

// Llama's RMSNorm as PyTorch traces it, w * (x * rsqrt(mean(x^2, -1,
// keepdim) + eps)): pow, mean, add, rsqrt, mul and the weight's mul (or
// none), each read only by the next, run as one kRmsNorm step (kernels/
// layer_norm.h) instead of six kernels; the others are absorbed.
void LoweredStage::FuseRmsNorms(const ValueShapes& shapes) {
  const StepView view = View();
  for (size_t r = 0; r < steps_.size(); ++r) {
    std::optional<RmsNormMatch> m = RmsNormAt(static_cast<int>(r), view, shapes);
    if (!m) continue;
    for (size_t k = 1; k < m->match.steps.size(); ++k) {
      // Its inputs stay: its shape is still inferred.
      steps_[m->match.steps[k]].kind = Kind::kAbsorbed;
    }
    Step& s = steps_[r];
    s.kind = Kind::kRmsNorm;
    s.kernel_in = {m->x};
    if (m->weight >= 0) s.kernel_in.push_back(m->weight);
    s.scalar = m->eps;
  }
}

namespace {

enum RmsSlot { kRmsX, kRmsWeight, kRmsPow, kRmsMean, kRmsEps };

// x * rsqrt(mean(x^2, keepdim) + eps), the product either way round.
Pattern RmsNormUnscaled() {
  return Commuting(
      "mul", Leaf(kRmsX),
      Op("rsqrt", {AnyScalar("add", Op("mean", {Scalar("pow", Leaf(kRmsX), 2.0)
                                                     .Where(NotReversed)
                                                     .Named(kRmsPow)})
                                        .Where([](const Node& n) {
                                          return IntAttr(n, "keepdim", 0) != 0;
                                        })
                                        .Named(kRmsMean))
                       .Named(kRmsEps)}));
}

}  // namespace

std::optional<LoweredStage::RmsNormMatch> LoweredStage::RmsNormAt(
    int r, const StepView& view, const ValueShapes& shapes) const {
  if (std::optional<RmsNormMatch> m = RmsNormMatchAt(r, view, shapes, true)) return m;
  // Unscaled here, unless the step reading this one takes it with its weight.
  const int reader = view.only_reader[steps_[r].out];
  if (reader >= 0 && RmsNormMatchAt(reader, view, shapes, true)) return std::nullopt;
  return RmsNormMatchAt(r, view, shapes, false);
}

std::optional<LoweredStage::RmsNormMatch> LoweredStage::RmsNormMatchAt(int r, const StepView& view,
                                                                       const ValueShapes& shapes,
                                                                       bool weighted) const {
  static const Pattern* unscaled = new Pattern(RmsNormUnscaled());
  static const Pattern* scaled = new Pattern(Commuting("mul", Leaf(kRmsWeight), RmsNormUnscaled()));
  std::optional<PatternMatch> m = MatchPattern(weighted ? *scaled : *unscaled, r, view);
  if (!m) return std::nullopt;
  const int x = m->values[kRmsX];
  const Shape& xs = shapes.at(NodeOf(steps_[m->named[kRmsPow]]).inputs(0));
  const std::vector<int64_t> dims = ResolvedInts(NodeOf(steps_[m->named[kRmsMean]]), "dims", {}, 0);
  const int64_t rank = static_cast<int64_t>(xs.size());
  if (rank == 0 || xs.back() <= 0 || dims.size() != 1 || (dims[0] != -1 && dims[0] != rank - 1)) {
    return std::nullopt;  // not over the last dim
  }
  const float eps = static_cast<float>(FloatAttr(NodeOf(steps_[m->named[kRmsEps]]), "scalar", 0));
  RmsNormMatch out{*std::move(m), x, -1, eps};
  if (weighted) {
    const int w = out.match.values[kRmsWeight];
    const Step& s = steps_[r];
    const Shape& ws = shapes.at(NodeOf(s).inputs(s.in[0] == w ? 0 : 1));
    if (ws != Shape{xs.back()} || values_[w].type != values_[x].type) return std::nullopt;
    out.weight = w;
  }
  return out;
}

// Llama's rotary embedding as PyTorch traces it, x * cos +
// cat(-x[..., D/2:], x[..., :D/2]) * sin: the two slices, the neg, the cat,
// both muls and the add, each read only by the next, run as one kRotary
// step (kernels/rotary.h) instead of seven ops (five kernels once the muls
// and the add are an elementwise program). Only tables of one row per
// token (or one row for all), with no other leading dims, are taken.
void LoweredStage::FuseRotaries(const ValueShapes& shapes) {
  const StepView view = View();
  for (size_t a = 0; a < steps_.size(); ++a) {
    std::vector<int> absorbed, kernel_in;
    if (!RotaryPattern(static_cast<int>(a), view, shapes, &absorbed, &kernel_in)) continue;
    for (int k : absorbed) steps_[k].kind = Kind::kAbsorbed;
    steps_[a].kind = Kind::kRotary;
    steps_[a].kernel_in = std::move(kernel_in);
  }
}

namespace {

// Tables the rotary kernel indexes: cos and sin of one shape [..., rows,
// D] with every leading dim 1 and no more dims than x [..., tokens, D],
// rows the tokens (or 1). Dims still free (-1) are checked when the plan
// is made.
bool RotaryTables(const Shape& x, const Shape& cos, const Shape& sin) {
  if (cos != sin || cos.size() < 2 || cos.size() > x.size() || cos.back() != x.back()) {
    return false;
  }
  for (size_t i = 0; i + 2 < cos.size(); ++i) {
    if (cos[i] != 1) return false;
  }
  const int64_t rows = cos[cos.size() - 2], tokens = x[x.size() - 2];
  return rows == 1 || rows == -1 || rows == tokens;
}

}  // namespace

namespace {

enum RotarySlot {
  kRopeX, kRopeCos, kRopeSin, kRopePlain, kRopeTurned, kRopeCat, kRopeHigh, kRopeLow
};

// x * cos + cat(-x[..., D/2:], x[..., :D/2]) * sin, each sum and product
// either way round.
Pattern RotaryOps() {
  Pattern halves = Op("cat", {Op("neg", {Op("slice", {Leaf(kRopeX)}).Named(kRopeHigh)}),
                              Op("slice", {Leaf(kRopeX)}).Named(kRopeLow)});
  return Commuting("add", Commuting("mul", Leaf(kRopeX), Leaf(kRopeCos)).Named(kRopePlain),
                   Commuting("mul", std::move(halves).Named(kRopeCat), Leaf(kRopeSin))
                       .Named(kRopeTurned));
}

}  // namespace

bool LoweredStage::RotaryPattern(int add, const StepView& view, const ValueShapes& shapes,
                                 std::vector<int>* absorbed, std::vector<int>* kernel_in) const {
  static const Pattern* rotary = new Pattern(RotaryOps());
  std::optional<PatternMatch> m = MatchPattern(*rotary, add, view);
  if (!m) return false;
  const int x = m->values[kRopeX], cos = m->values[kRopeCos], sin = m->values[kRopeSin];
  const Shape& xs = shapes.at(NodeOf(steps_[m->named[kRopeHigh]]).inputs(0));
  if (xs.empty() || xs.back() <= 0 || xs.back() % 2 != 0) return false;
  const int64_t d = xs.back(), half = d / 2, rank = static_cast<int64_t>(xs.size());
  auto last_dim = [&](const Node& n) {
    const int64_t dim = IntAttr(n, "dim", 0);
    return dim == -1 || dim == rank - 1;
  };
  auto halves = [&](int slot, int64_t start, int64_t stop) {
    const Node& n = NodeOf(steps_[m->named[slot]]);
    return last_dim(n) && IntAttr(n, "step", 1) == 1 && IntAttr(n, "start", 0) == start &&
           std::min(IntAttr(n, "stop", INT64_MAX), d) == stop;
  };
  if (!halves(kRopeHigh, half, d) || !halves(kRopeLow, 0, half) ||
      !last_dim(NodeOf(steps_[m->named[kRopeCat]]))) {
    return false;
  }
  if (values_[cos].type != values_[x].type || values_[sin].type != values_[x].type) return false;
  // A table's shape: its input of the mul that reads it.
  auto table = [&](int slot, int v) -> const Shape& {
    const Step& mul = steps_[m->named[slot]];
    return shapes.at(NodeOf(mul).inputs(mul.in[1] == v ? 1 : 0));
  };
  if (!RotaryTables(xs, table(kRopePlain, cos), table(kRopeTurned, sin))) return false;
  absorbed->assign(m->steps.begin() + 1, m->steps.end());
  *kernel_in = {x, cos, sin};
  return true;
}

DeviceOp LoweredStage::RmsNormOpOf(const Step& s, const Node& node,
                                   const std::vector<Shape>& shape, const Buffers& b,
                                   BufferRef out) const {
  const Shape& x = shape[s.residual_sum >= 0 ? s.residual_sum : s.kernel_in[0]];  // the norm's input
  DeviceOp op{DeviceOp::Type::kRmsNorm, node.name()};
  op.cols = x.empty() ? 1 : x.back();
  op.rows = op.cols == 0 ? 0 : NumElements(x) / op.cols;
  op.n = op.rows * op.cols;
  op.eps = s.scalar;
  op.src = b.f32[s.kernel_in[0]];
  op.has_weight = s.kernel_in.size() > 1;
  if (op.has_weight) op.src2 = b.f32[s.kernel_in[1]];
  op.dst = out;
  SetResidual(s, shape, b, &op);
  return op;
}

// The residual add before a transformer's norms, h = x + r, which the norm
// and the next residual add read: the norm's kernel computes h in its
// first pass and writes it (kernels/layer_norm.h LoadInput), so the add
// needs no kernel and h no read back. GPT-2's and Llama's two norms a
// layer each take their add (the first layer's first norm reads the
// embedding, no add).
void LoweredStage::FuseResidualNorms(const ValueShapes& shapes) {
  for (size_t n = 0; n < steps_.size(); ++n) {
    Step& norm = steps_[n];
    if (norm.kind != Kind::kRmsNorm && norm.kind != Kind::kLayerNorm) continue;
    std::vector<int> in = norm.kernel_in.empty() ? norm.in : norm.kernel_in;
    const int add = values_[in[0]].producer;
    if (!ResidualAdd(add, static_cast<int>(n), shapes)) continue;
    norm.residual_sum = in[0];
    in[0] = steps_[add].in[0];
    norm.residual = steps_[add].in[1];
    norm.kernel_in = std::move(in);
    steps_[add].unfused = steps_[add].kind;
    steps_[add].kind = Kind::kResidualSum;
    steps_[add].norm = static_cast<int>(n);
  }
}

bool LoweredStage::ResidualAdd(int add, int norm, const ValueShapes& shapes) const {
  if (!Unfused(add) || steps_[add].in.size() != 2) return false;
  const Node& node = NodeOf(steps_[add]);
  if (node.op() != "add" || HasScalarOperand(node) || FloatAttr(node, "alpha", 1) != 1) {
    return false;
  }
  const int sum = steps_[add].out;
  for (int k = 0; k < 2; ++k) {  // no broadcast, one float type
    if (shapes.at(node.inputs(k)) != shapes.at(node.outputs(0)) ||
        values_[steps_[add].in[k]].type != values_[sum].type) {
      return false;
    }
  }
  // The sum exists only once the norm runs: no step before it may read it
  // (or a view of it). Absorbed steps run inside their root.
  std::vector<bool> is_sum(values_.size(), false);
  is_sum[sum] = true;
  for (int i = add + 1; i < norm; ++i) {
    const Step& s = steps_[i];
    if (s.kind == Kind::kAbsorbed) continue;
    if (s.kind == Kind::kView) {
      is_sum[s.out] = is_sum[values_[s.out].view_of];
      continue;
    }
    const std::vector<int>& reads = s.kernel_in.empty() ? s.in : s.kernel_in;
    if (std::any_of(reads.begin(), reads.end(), [&](int v) { return is_sum[v]; })) return false;
    if (s.residual >= 0 && is_sum[s.residual]) return false;
  }
  return true;
}

bool LoweredStage::ResidualFits(const Step& s, const std::vector<Shape>& shape) const {
  return shape[s.kernel_in[0]] == shape[s.residual_sum] &&
         shape[s.residual] == shape[s.residual_sum];
}

void LoweredStage::SetResidual(const Step& s, const std::vector<Shape>& shape, const Buffers& b,
                               DeviceOp* op) const {
  if (s.residual < 0) return;
  if (!ResidualFits(s, shape)) {
    op->src = b.f32[s.residual_sum];
    return;
  }
  op->has_residual = true;
  op->src4 = b.f32[s.residual];
  op->residual_sum = b.f32[s.residual_sum];
}

// The rotary kernel's sizes, checked now that the token count is known:
// cos and sin hold a row per token (or one row for all) of D.
absl::StatusOr<DeviceOp> LoweredStage::RotaryOpOf(const Step& s, const Node& node,
                                                  const std::vector<Shape>& shape,
                                                  const Buffers& b, BufferRef out) const {
  const Shape& x = shape[s.kernel_in[0]];
  const Shape& table = shape[s.kernel_in[1]];
  DeviceOp op{DeviceOp::Type::kRotary, node.name()};
  op.rotary.n = NumElements(x);
  op.rotary.d = x.back();
  op.rotary.tokens = x.size() >= 2 ? x[x.size() - 2] : 1;
  op.rotary.table_rows = table.size() >= 2 ? table[table.size() - 2] : 1;
  const bool table_fits = table == shape[s.kernel_in[2]] && !table.empty() &&
                          table.back() == op.rotary.d &&
                          NumElements(table) == op.rotary.table_rows * op.rotary.d &&
                          (op.rotary.table_rows == op.rotary.tokens || op.rotary.table_rows == 1);
  if (!table_fits || shape[s.out] != x) {
    return absl::UnimplementedError(absl::StrCat(
        "the cuda backend has no kernel for node \"", node.name(), "\" (rotary embedding of ",
        ShapeToString(x), " with tables ", ShapeToString(table), " and ",
        ShapeToString(shape[s.kernel_in[2]]), ")"));
  }
  op.src = b.f32[s.kernel_in[0]];
  op.src2 = b.f32[s.kernel_in[1]];
  op.src3 = b.f32[s.kernel_in[2]];
  op.dst = out;
  op.n = op.rotary.n;
  return op;
}

int LoweredStage::RootOf(int i) const {
  while (steps_[i].fused_into >= 0) i = steps_[i].fused_into;
  return i;
}

int LoweredStage::EmitFused(int i, const Sizes& sizes, ProgramBuilder* builder,
                            bool fused) const {
  const Step& s = steps_[i];
  std::vector<int> regs;
  for (int v : s.in) {
    const int p = values_[v].producer;
    regs.push_back(fused && p >= 0 && steps_[p].fused_into == i
                       ? EmitFused(p, sizes, builder)
                       : builder->Input(v, sizes.shape[v], values_[v].type));
  }
  switch (s.kind) {
    case Kind::kUnary:
      return builder->Unary(s.unary, regs[0]);
    default:
      if (sizes.node[i].op() == "relu") {  // max(x, 0): NaN stays NaN, as in PyTorch
        return builder->Op(kernels::EwCode::kMaximum, regs[0], builder->Const(0.0f));
      }
      // add, sub, mul (a scalar operand as an attribute) and the program ops
      return builder->NodeOp(sizes.node[i], regs);
  }
}

absl::flat_hash_map<int, DeviceOp> LoweredStage::FusedOps(const Sizes& sizes,
                                                          const Buffers& b) const {
  absl::flat_hash_map<int, std::vector<int>> members;  // by root
  for (size_t i = 0; i < steps_.size(); ++i) {
    if (steps_[i].fused_into >= 0) members[RootOf(static_cast<int>(i))].push_back(i);
  }
  absl::flat_hash_map<int, DeviceOp> fused;
  for (const auto& [root, group] : members) {
    const Step& s = steps_[root];
    const Shape& out = sizes.shape[s.out];
    // Each member computes the root's shape: no intermediate broadcasts.
    const bool same = std::all_of(group.begin(), group.end(), [&](int m) {
      return sizes.shape[steps_[m].out] == out;
    });
    if (!same) continue;
    ProgramBuilder builder(out, values_[s.out].type);
    EmitFused(root, sizes, &builder);
    if (builder.full()) continue;
    absl::StatusOr<DeviceOp> op =
        ProgramOp(absl::StrCat(NodeOf(s).name(), " (+", group.size(), " fused)"), builder,
                  FloatTypeOf(s), b, b.has_f32[s.out] ? b.f32[s.out] : b.gm[s.out]);
    if (op.ok()) fused.emplace(root, *std::move(op));  // else op by op
  }
  return fused;
}

absl::StatusOr<DeviceOp> LoweredStage::ProgramOp(const std::string& name,
                                                 const ProgramBuilder& builder, DataType ftype,
                                                 const Buffers& b, BufferRef out) const {
  DeviceOp op{DeviceOp::Type::kProgram, name};
  BufferRef* srcs[] = {&op.src, &op.src2, &op.src3, &op.src4};
  for (size_t k = 0; k < builder.keys().size(); ++k) {
    const int v = builder.keys()[k];
    if (values_[v].type != ftype && values_[v].type != DT_BOOL) {  // one storage type
      return absl::UnimplementedError(absl::StrCat(
          "node \"", name, "\": an elementwise op over ", TorchName(values_[v].type), " and ",
          TorchName(ftype), " values"));
    }
    *srcs[k] = b.f32[v];
  }
  op.dst = out;
  op.program = builder.program();
  op.n = op.program.n;  // an empty output: n 0, no launch
  op.ftype = ftype;
  return op;
}

}  // namespace pipeserve
