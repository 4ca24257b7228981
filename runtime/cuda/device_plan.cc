#include "runtime/cuda/device_plan.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "graph/op_schema.h"
#include "graph/validate.h"
#include "runtime/cuda/data_movement.h"
#include "runtime/cuda/elementwise_lowering.h"
#include "runtime/cuda/reduction_lowering.h"

namespace pipeserve {
namespace {

int64_t AlignUp(int64_t bytes) {
  return (bytes + kArenaAlignment - 1) / kArenaAlignment * kArenaAlignment;
}

// Hands out aligned offsets in one arena.
class ArenaLayout {
 public:
  explicit ArenaLayout(Arena arena, int64_t start = 0) : arena_(arena), size_(start) {}
  BufferRef Take(int64_t bytes) {
    BufferRef r{arena_, size_};
    size_ += AlignUp(std::max<int64_t>(bytes, 1));
    return r;
  }
  int64_t size() const { return size_; }

 private:
  Arena arena_;
  int64_t size_ = 0;
};

// Copies whose sources and destinations sit at the same distance from
// each other in their arenas become one copy (padding between them is
// copied too, harmlessly): inputs are laid out first in both the staging
// and the activation arena, so a stage's inputs usually go up in one copy.
std::vector<DeviceOp> MergeCopies(std::vector<DeviceOp> copies) {
  std::vector<DeviceOp> out;
  for (DeviceOp& op : copies) {
    if (!out.empty()) {
      DeviceOp& last = out.back();
      const int64_t gap = op.src.offset - last.src.offset;
      if (op.src.arena == last.src.arena && op.dst.arena == last.dst.arena &&
          gap >= last.bytes && op.dst.offset - last.dst.offset == gap) {
        last.bytes = gap + op.bytes;
        last.node += "+" + op.node;
        continue;
      }
    }
    out.push_back(std::move(op));
  }
  return out;
}

}  // namespace

float RoundToTf32(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7f800000u) != 0x7f800000u) {  // inf and NaN stay as they are
    u += 0xfffu + ((u >> 13) & 1u);        // nearest, ties to even
    u &= ~0x1fffu;
  }
  std::memcpy(&f, &u, 4);
  return f;
}

void ConvertFloats(const float* src, int64_t n, DType to, void* dst) {
  switch (to) {
    case DType::kF32:
      if (n > 0) std::memcpy(dst, src, n * 4);
      return;
    case DType::kBF16: {
      auto* out = static_cast<uint16_t*>(dst);
      for (int64_t i = 0; i < n; ++i) out[i] = FloatToBf16(src[i]);
      return;
    }
    case DType::kTF32: {
      auto* out = static_cast<float*>(dst);
      for (int64_t i = 0; i < n; ++i) out[i] = RoundToTf32(src[i]);
      return;
    }
    case DType::kF16: {
      auto* out = static_cast<uint16_t*>(dst);
      for (int64_t i = 0; i < n; ++i) out[i] = FloatToHalf(src[i]);
      return;
    }
  }
}

absl::StatusOr<LoweredStage> LoweredStage::Create(const Graph& graph,
                                                  const WeightMap& weights,
                                                  Precision precision,
                                                  bool fuse_linear_relu,
                                                  CudaOps cuda_ops) {
  ValueTypes types;
  ASSIGN_OR_RETURN(ValueShapes shapes, ValidateGraph(graph, &types));
  for (const Node& node : graph.nodes()) {
    const size_t rank_a = node.op() == "matmul" ? shapes.at(node.inputs(0)).size() : 2;
    const size_t rank_b = node.op() == "matmul" ? shapes.at(node.inputs(1)).size() : 2;
    if (rank_a < 2 || rank_b < 2 || (rank_b > 2 && rank_a != rank_b)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "the cuda backend has no kernel for node \"", node.name(),
          "\" (matmul of ", ShapeToString(shapes.at(node.inputs(0))), " and ",
          ShapeToString(shapes.at(node.inputs(1))),
          "; it runs [..., K] @ [K, N] and batches of equal rank)"));
    }
    if (node.op() == "softmax" || node.op() == "log_softmax") {
      const int rank = static_cast<int>(shapes.at(node.inputs(0)).size());
      absl::StatusOr<int> dim = NormalizeDim(IntAttr(node, "dim", -1), rank);
      if (dim.ok() && *dim != std::max(rank - 1, 0)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "the cuda backend has no kernel for node \"", node.name(), "\" (", node.op(),
            " over dim ", *dim, " of ", ShapeToString(shapes.at(node.inputs(0))),
            "; it runs the last dim)"));
      }
    }
  }
  // Float32 graphs (GEMMs in the chosen precision); int64 and bool values
  // where an op takes them (CheckTypes).
  for (const ValueSpec& in : graph.inputs()) {
    if (!IsFloatingPoint(in.dtype()) && in.dtype() != DT_INT64 && in.dtype() != DT_BOOL) {
      return absl::InvalidArgumentError(absl::StrCat(
          "the cuda backend has no ", TorchName(in.dtype()), " kernels: input \"", in.name(),
          "\" is ", TorchName(in.dtype()), " (serve this model with --device=cpu)"));
    }
  }
  LoweredStage stage;
  stage.graph_ = graph;
  stage.precision_ = precision;
  stage.gemm_type_ = precision == Precision::kBF16   ? DType::kBF16
                     : precision == Precision::kTF32 ? DType::kTF32
                                                     : DType::kF32;
  RETURN_IF_ERROR(stage.Build(weights, types, shapes, fuse_linear_relu, cuda_ops));
  return stage;
}

int LoweredStage::Canonical(int v) const {
  while (values_[v].alias >= 0) v = values_[v].alias;
  return v;
}

absl::Status LoweredStage::Build(const WeightMap& weights, const ValueTypes& types,
                                 const ValueShapes& shapes, bool fuse_linear_relu,
                                 CudaOps cuda_ops) {
  ValueIds ids;
  RETURN_IF_ERROR(NumberValues(weights, types, &ids));
  RETURN_IF_ERROR(MakeSteps(ids, fuse_linear_relu, cuda_ops));
  if (cuda_ops == CudaOps::kUnconfirmed) {
    FuseGeluEpilogues();
    FuseRmsNorms(shapes);
    FuseRotaries(shapes);
    FuseRotaryIntoAttention();
    FuseResidualNorms(shapes);
    FuseElementwise();
  }
  LayOutWeights(/*group_gemms=*/cuda_ops == CudaOps::kUnconfirmed);
  return absl::OkStatus();
}

// A parameter's weights: present, of the declared type, floating-point.
absl::Status LoweredStage::CheckParam(const std::string& fqn, const Tensor* w, DataType declared) {
  if (w == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("parameter \"", fqn, "\" has no loaded weights"));
  }
  if (w->dtype() != declared) {
    return absl::InvalidArgumentError(absl::StrCat("parameter \"", fqn, "\" holds ",
                                                   TorchName(w->dtype()),
                                                   " values; the model declares it ",
                                                   TorchName(declared)));
  }
  if (!IsFloatingPoint(w->dtype())) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the cuda backend has no ", TorchName(w->dtype()), " kernels: parameter \"", fqn,
        "\" is ", TorchName(w->dtype()), " (serve this model with --device=cpu)"));
  }
  return absl::OkStatus();
}

absl::Status LoweredStage::NumberValues(const WeightMap& weights, const ValueTypes& types,
                                        ValueIds* ids) {
  absl::flat_hash_map<std::string, int>& id = ids->id;
  absl::flat_hash_map<int, int>& readers = ids->readers;
  // Pass 1: an id per value. Identity outputs share their input's id and a
  // parameter read by several `param` nodes has one id. Readers are counted
  // per id (an identity is not a reader; the readers of its output are).
  auto new_value = [&](const std::string& name) {
    id[name] = static_cast<int>(values_.size());
    values_.emplace_back();
    values_.back().type = types.at(name);
    return id[name];
  };
  for (int i = 0; i < graph_.inputs_size(); ++i) {
    int v = new_value(graph_.inputs(i).name());
    values_[v].input = i;
    input_values_.push_back(v);
  }
  absl::flat_hash_map<std::string, int> param_value;  // by FQN
  for (const Node& node : graph_.nodes()) {
    const std::string& op = node.op();
    if (op == kPipeSplitOp) continue;
    if (op == "identity") {
      id[node.outputs(0)] = id.at(node.inputs(0));
      continue;
    }
    if (op == kParamOp) {
      const std::string& fqn = node.attrs().at("fqn").s();
      auto w = weights.find(fqn);
      RETURN_IF_ERROR(CheckParam(fqn, w == weights.end() ? nullptr : &w->second,
                                 types.at(node.outputs(0))));
      auto [it, inserted] = param_value.emplace(fqn, -1);
      if (inserted) {
        it->second = new_value(node.outputs(0));
        values_[it->second].param = static_cast<int>(params_.size());
        params_.push_back(w->second);
      } else {
        id[node.outputs(0)] = it->second;
      }
      continue;
    }
    for (const std::string& in : node.inputs()) ++readers[id.at(in)];
    new_value(node.outputs(0));
  }
  for (const std::string& out : graph_.outputs()) ++readers[id.at(out)];

  return absl::OkStatus();
}

namespace {
int ReadersOf(const absl::flat_hash_map<int, int>& readers, int v) {
  auto it = readers.find(v);
  return it == readers.end() ? 0 : it->second;
}
}  // namespace

// The kernel a node's step runs (and its operands' details), or
// kInvalidArgument for an op the cuda backend has no kernel for.
// The kind of the ops that need nothing else from their node.
const absl::flat_hash_map<std::string, LoweredStage::Kind>& LoweredStage::SimpleKinds() {
  using K = Kind;
  static const auto* kinds = new absl::flat_hash_map<std::string, K>{
      {"mm", K::kMm},           {"matmul", K::kMm},         {"linear", K::kLinear},
      {"relu", K::kRelu},       {"clone", K::kClone},       {"layer_norm", K::kLayerNorm},
      {"softmax", K::kSoftmax}, {"log_softmax", K::kSoftmax},  // over the last dim (Create)
      {"size", K::kSize},       {"arange", K::kConstant},   {"full", K::kConstant},
      {"embedding", K::kEmbedding}, {"triu", K::kTriangle}, {"tril", K::kTriangle},
      {"cached_attention", K::kAttention}, {"cast", K::kCast},
      {"sample_tokens", K::kSample}};
  return *kinds;
}

absl::Status LoweredStage::ChooseKind(const Node& node, Step* step) {
  const std::string& op = node.op();
  auto simple = SimpleKinds().find(op);
  if (simple != SimpleKinds().end()) {
    step->kind = simple->second;
  } else if (op == "add" || op == "sub" || op == "mul") {
    step->op = op == "add"   ? ElementwiseOp::kAdd
               : op == "sub" ? ElementwiseOp::kSub
                             : ElementwiseOp::kMul;
    step->kind = Kind::kBinary;
    if (HasScalarOperand(node)) {
      step->kind = Kind::kScalar;
      step->scalar = static_cast<float>(FloatAttr(node, "scalar", 0));
      step->reverse = IntAttr(node, "reverse", 0) != 0;
    }
  } else if ((step->unary = kernels::UnaryKindOf(op, StringAttr(node, "approximate"))) !=
             kernels::UnaryKind::kNone) {
    step->kind = Kind::kUnary;
  } else if (IsView(op) || IsMovement(op) || IsProgramOp(op) || IsReduction(op)) {
    step->kind = IsView(op)        ? Kind::kView
                 : IsMovement(op)  ? Kind::kMove
                 : IsProgramOp(op) ? Kind::kProgram
                                   : Kind::kReduce;
  } else if (op == "addmm") {
    if (FloatAttr(node, "beta", 1.0) != 1.0 || FloatAttr(node, "alpha", 1.0) != 1.0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "the cuda backend has no kernel for node \"", node.name(), "\" (addmm with beta ",
          FloatAttr(node, "beta", 1.0), " and alpha ", FloatAttr(node, "alpha", 1.0),
          "; it runs bias + x @ w)"));
    }
    step->kind = Kind::kAddmm;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("the cuda backend has no kernel for op \"", op, "\""));
  }
  return absl::OkStatus();
}

absl::Status LoweredStage::MakeSteps(const ValueIds& ids, bool fuse_linear_relu,
                                     CudaOps cuda_ops) {
  const absl::flat_hash_map<std::string, int>& id = ids.id;
  const absl::flat_hash_map<int, int>& readers = ids.readers;
  // Pass 2: steps. A linear output read only by a ReLU takes the ReLU as
  // its GEMM epilogue; the relu's output id becomes an alias of it.
  for (int ni = 0; ni < graph_.nodes_size(); ++ni) {
    const Node& node = graph_.nodes(ni);
    const std::string& op = node.op();
    if (op == kPipeSplitOp || op == "identity" || op == kParamOp) continue;
    Step step;
    step.node = ni;
    for (const std::string& in : node.inputs()) {
      step.in.push_back(Canonical(id.at(in)));
    }
    step.out = id.at(node.outputs(0));
    RETURN_IF_ERROR(ChooseKind(node, &step));
    if (step.kind == Kind::kRelu) {
      int producer = values_[step.in[0]].producer;
      if (fuse_linear_relu && producer >= 0 &&
          steps_[producer].kind == Kind::kLinear && !steps_[producer].relu &&
          ReadersOf(readers, step.in[0]) == 1) {
        steps_[producer].relu = true;
        ++fused_relus_;
        values_[step.out].alias = step.in[0];
        continue;
      }
    }
    RETURN_IF_ERROR(CheckSizeReaders(node, step));
    RETURN_IF_ERROR(CheckTypes(node, step));
    if (step.kind == Kind::kAttention) RETURN_IF_ERROR(CheckAttention(node, &step));
    if (step.kind == Kind::kSample) RETURN_IF_ERROR(CheckSample(node, step));
    RETURN_IF_ERROR(CheckKernelGate(node.name(), op, FloatTypeOf(step), cuda_ops));
    // add, sub, mul and relu keep their GPU-confirmed float32 kernels; in
    // 16-bit graphs they are elementwise programs.
    const bool legacy = step.kind == Kind::kBinary || step.kind == Kind::kScalar ||
                        step.kind == Kind::kRelu;
    if (legacy && values_[step.out].type != DT_FLOAT32) step.kind = Kind::kProgram;
    if (step.kind == Kind::kSize) values_[step.out].host = true;
    if (step.kind == Kind::kView) values_[step.out].view_of = step.in[0];
    values_[step.out].producer = static_cast<int>(steps_.size());
    steps_.push_back(std::move(step));
  }
  for (const std::string& out : graph_.outputs()) {
    output_values_.push_back(Canonical(id.at(out)));
    if (values_[output_values_.back()].host) {
      return absl::InvalidArgumentError(absl::StrCat(
          "the cuda backend has no int64 outputs: output \"", out,
          "\" is a size (serve this model with --device=cpu)"));
    }
  }

  return absl::OkStatus();
}

void LoweredStage::MarkNeeds() {
  // Which forms each value needs: GEMM operands in the GEMM dtype, anything
  // elementwise, biases and outputs in float32. Sizes live on the host; a
  // view needs what its readers need, and passes that on to its input.
  auto need = [&](int v, bool as_gemm_operand) {
    if (values_[v].host) return;
    if (as_gemm_operand && gemm_type_ != DType::kF32 && values_[v].type == DT_FLOAT32) {
      values_[v].need_gemm = true;
    } else {
      values_[v].need_f32 = true;
    }
  };
  for (const Step& s : steps_) {
    // A size reads no values; an absorbed step none on the device.
    if (s.kind == Kind::kView || s.kind == Kind::kSize || s.kind == Kind::kAbsorbed ||
        s.kind == Kind::kResidualSum) {
      continue;
    }
    if (s.residual >= 0) need(s.residual, false);
    const bool gemm = s.kind == Kind::kMm || s.kind == Kind::kLinear;
    const size_t first = s.kind == Kind::kAddmm ? 1 : 0;  // addmm: bias, x, w
    const std::vector<int>& reads = s.kernel_in.empty() ? s.in : s.kernel_in;  // a pattern's
    for (size_t i = 0; i < reads.size(); ++i) {
      need(reads[i], (gemm && i < 2) || (s.kind == Kind::kAddmm && i >= first));
    }
  }
  for (int v : output_values_) need(v, false);
  for (auto s = steps_.rbegin(); s != steps_.rend(); ++s) {
    if (s->kind != Kind::kView) continue;
    const int in = values_[s->out].view_of;
    values_[in].need_f32 |= values_[s->out].need_f32;
    values_[in].need_gemm |= values_[s->out].need_gemm;
  }
  for (const Step& s : steps_) {
    Value& out = values_[s.out];
    // A result nobody reads is still computed (as the CPU backend does);
    // an absorbed step's is not computed at all (its pattern's kernel is).
    if (s.kind != Kind::kView && s.kind != Kind::kAbsorbed && !out.host && !out.need_f32 &&
        !out.need_gemm) {
      out.need_f32 = true;
    }
    if (s.kind == Kind::kResidualSum) out.need_f32 = true;  // its norm's kernel writes it
  }
}

void LoweredStage::LayOutWeights(bool group_gemms) {
  MarkNeeds();
  if (group_gemms) FormGemmGroups();
  const GroupValues weights = GroupValuesBy([](const Step& s) { return s.in[1]; });
  ArenaLayout w(Arena::kWeights);
  for (size_t i = 0; i < values_.size(); ++i) {
    if (values_[i].param < 0 || weights.member[i]) continue;
    for (bool gemm_form : {false, true}) {  // each form's copies evenly spaced
      WithGroupMembers(static_cast<int>(i), weights, [&](int v) {
        Value& val = values_[v];
        const int64_t n = params_[val.param].numel();
        if (!gemm_form && val.need_f32) val.w_f32 = w.Take(n * ElementSize(val.type)).offset;
        if (gemm_form && val.need_gemm) val.w_gemm = w.Take(n * DTypeBytes(gemm_type_)).offset;
      });
    }
  }
  weight_bytes_ = w.size();
}

template <typename Of>
LoweredStage::GroupValues LoweredStage::GroupValuesBy(Of of) const {
  GroupValues g{std::vector<std::vector<int>>(values_.size()),
                std::vector<bool>(values_.size(), false)};
  for (const Step& s : steps_) {
    for (int m : s.group) {
      g.members_of[of(s)].push_back(of(steps_[m]));
      g.member[of(steps_[m])] = true;
    }
  }
  return g;
}

template <typename F>
void LoweredStage::WithGroupMembers(int v, const GroupValues& groups, F take) const {
  take(v);
  for (int m : groups.members_of[v]) take(m);
}

void LoweredStage::FillWeights(void* dst) const {
  char* base = static_cast<char*>(dst);
  if (weight_bytes_ == 0) return;  // a stage without weights: dst may be null
  std::memset(base, 0, weight_bytes_);
  for (const Value& v : values_) {
    if (v.param < 0) continue;
    const Tensor& t = params_[v.param];
    if (v.w_f32 >= 0 && t.numel() > 0) {
      std::memcpy(base + v.w_f32, t.raw_data(), t.byte_size());
    }
    if (v.w_gemm >= 0)
      ConvertFloats(t.data(), t.numel(), gemm_type_, base + v.w_gemm);
  }
}

void LoweredStage::ReleaseWeights() {
  for (Tensor& t : params_) {
    Shape s = t.shape();
    t = Tensor::Wrap(nullptr, nullptr, std::move(s));  // shape only
  }
}

DeviceOp LoweredStage::LayerNormOp(const Step& s, const Shape& x,
                                   const std::vector<BufferRef>& f32, BufferRef out) const {
  const Node& node = NodeOf(s);
  DeviceOp op{DeviceOp::Type::kLayerNorm, node.name()};
  const int64_t ndim = IntAttr(node, "ndim", 1);
  op.cols = 1;
  for (size_t d = x.size() - ndim; d < x.size(); ++d) op.cols *= x[d];
  op.rows = op.cols == 0 ? 0 : NumElements(x) / op.cols;
  op.eps = static_cast<float>(FloatAttr(node, "eps", 1e-5));
  op.has_weight = IntAttr(node, "has_weight", 0) != 0;
  op.has_bias = IntAttr(node, "has_bias", 0) != 0;
  const std::vector<int>& in = s.kernel_in.empty() ? s.in : s.kernel_in;  // a residual's
  op.src = f32[in[0]];
  if (op.has_weight) op.src2 = f32[in[1]];
  if (op.has_bias) op.src3 = f32[in[op.has_weight ? 2 : 1]];
  op.dst = out;
  op.n = op.rows * op.cols;
  return op;
}

absl::StatusOr<LoweredStage::Sizes> LoweredStage::ShapesFor(
    const std::vector<Shape>& input_shapes) const {
  Sizes sizes;
  std::vector<Shape>& shape = sizes.shape;
  shape.resize(values_.size());
  std::vector<int64_t> host(values_.size(), 0);  // the sizes' values
  for (size_t v = 0; v < values_.size(); ++v) {
    if (values_[v].param >= 0) shape[v] = params_[values_[v].param].shape();
  }
  for (size_t i = 0; i < input_values_.size(); ++i) {
    shape[input_values_[i]] = input_shapes[i];
  }
  std::vector<Shape> in_shapes;
  std::vector<int64_t> sym;
  for (const Step& s : steps_) {
    in_shapes.clear();
    sym.clear();
    for (int v : s.in) {
      in_shapes.push_back(shape[v]);
      sym.push_back(host[v]);
    }
    sizes.node.push_back(ResolveSymbolic(NodeOf(s), sym));
    const Node& node = sizes.node.back();
    absl::StatusOr<std::vector<Shape>> out = FindOp(node.op())->infer(node, in_shapes);
    if (!out.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("node \"", node.name(), "\": ", out.status().message()));
    }
    shape[s.out] = std::move((*out)[0]);
    if (s.kind == Kind::kSize) {
      const Shape& x = in_shapes[0];
      host[s.out] = x.empty() ? 1 : x[*NormalizeDim(IntAttr(node, "dim", 0), static_cast<int>(x.size()))];
    }
  }
  return sizes;
}

// The input of value v's permute when, at these shapes, it moves only
// dims of size 1 (so its elements keep their order: a decode step's
// [1, 1, H, D] -> [1, H, 1, D]); else -1.
int LoweredStage::OrderKeepingPermuteInput(int v, const std::vector<Shape>& shape) const {
  const int p = values_[v].producer;
  if (p < 0 || steps_[p].kind != Kind::kMove || NodeOf(steps_[p]).op() != "permute") return -1;
  const int in = steps_[p].in[0];
  const Shape& x = shape[in];
  const std::vector<int64_t> dims = ResolvedInts(NodeOf(steps_[p]), "dims", {}, 0);
  if (dims.size() != x.size()) return -1;
  int64_t last = -1;
  for (int64_t d : dims) {
    if (d < 0) d += static_cast<int64_t>(x.size());
    if (d < 0 || d >= static_cast<int64_t>(x.size())) return -1;
    if (x[d] == 1) continue;
    if (d < last) return -1;
    last = d;
  }
  return in;
}

// Gives value v its permute's input's buffers when its elements keep
// their order and the input has the forms v needs.
bool LoweredStage::AliasPermute(int v, const std::vector<Shape>& shape, Buffers* b) const {
  const int in = OrderKeepingPermuteInput(v, shape);
  const Value& val = values_[v];
  if (in < 0 || (val.need_f32 && !b->has_f32[in]) || (val.need_gemm && !b->has_gm[in])) {
    return false;
  }
  b->f32[v] = b->f32[in];
  b->gm[v] = b->gm[in];
  b->has_f32[v] = b->has_f32[in];
  b->has_gm[v] = b->has_gm[in];
  b->aliased[v] = true;
  return true;
}

// A GEMM output that only GEMMs read, and that has no bias epilogue
// (whose vector is float32), is written as bfloat16 directly (cuBLAS
// cannot round its output to TF32, so this is for bf16 only).
bool LoweredStage::Bf16OnlyGemmOutput(int v) const {
  const Value& val = values_[v];
  if (gemm_type_ != DType::kBF16) return false;
  if (val.producer < 0 || val.need_f32 || !val.need_gemm) return false;
  const Step& p = steps_[val.producer];
  return p.kind == Kind::kMm || (p.kind == Kind::kLinear && p.in.size() < 3);
}

bool LoweredStage::BuffersElsewhere(int v, const std::vector<Shape>& shape, Buffers* b) const {
  const Value& val = values_[v];
  if (val.view_of >= 0) {  // its input's buffers (laid out before it)
    b->f32[v] = b->f32[val.view_of];
    b->gm[v] = b->gm[val.view_of];
    b->has_f32[v] = b->has_f32[val.view_of];
    b->has_gm[v] = b->has_gm[val.view_of];
    return true;
  }
  if (AliasPermute(v, shape, b)) return true;
  if (val.param < 0) return false;
  if (val.w_f32 >= 0) b->f32[v] = {Arena::kWeights, val.w_f32};
  if (val.w_gemm >= 0) b->gm[v] = {Arena::kWeights, val.w_gemm};
  b->has_f32[v] = val.w_f32 >= 0;
  b->has_gm[v] = val.w_gemm >= 0;
  return true;
}

LoweredStage::Buffers LoweredStage::LayOutBuffers(const std::vector<Shape>& shape) const {
  Buffers b;
  ArenaLayout act(Arena::kActivations);
  // b.f32: each value's float32 buffer; b.gm: its GEMM-operand form (bf16, or
  // float32 rounded to TF32), when the precision has one.
  b.f32.resize(values_.size());
  b.gm.resize(values_.size());
  b.has_f32.resize(values_.size());
  b.has_gm.resize(values_.size());
  b.aliased.resize(values_.size());
  b.scratch.resize(values_.size());
  const int64_t gm_bytes = DTypeBytes(gemm_type_);
  const GroupValues outputs = GroupValuesBy([](const Step& s) { return s.out; });
  for (size_t v = 0; v < values_.size(); ++v) {
    const Value& val = values_[v];
    if (val.host || outputs.member[v]) continue;
    if (IsSampled(static_cast<int>(v))) {  // the picks, and the penalised logits they are picked from
      b.f32[v] = act.Take(NumElements(shape[v]) * ElementSize(DT_INT64));
      b.has_f32[v] = true;
      const Shape& logits = shape[steps_[val.producer].in[0]];
      b.scratch[v] = act.Take(kernels::SampleScratchBytes(logits[0], logits[1]));
      continue;
    }
    if (BuffersElsewhere(static_cast<int>(v), shape, &b)) continue;
    if (val.input < 0 && val.producer < 0) continue;  // an alias
    for (bool gemm_form : {false, true}) {  // a GEMM group's outputs evenly spaced in each form
      WithGroupMembers(static_cast<int>(v), outputs, [&](int u) {
        const Value& out = values_[u];
        const int64_t elements = NumElements(shape[u]);
        bool want_f32 = out.need_f32;
        if (out.producer >= 0 && out.need_gemm && !Bf16OnlyGemmOutput(u)) {
          want_f32 = true;  // computed in float32, then converted
        }
        if (!gemm_form && want_f32) b.f32[u] = act.Take(elements * ElementSize(out.type));
        if (gemm_form && out.need_gemm) b.gm[u] = act.Take(elements * gm_bytes);
        b.has_f32[u] = want_f32;  // f32: the value's own type
        b.has_gm[u] = out.need_gemm;
      });
    }
  }
  if (kv_inputs_.positions >= 0) {  // cached_attention's tiles
    b.tensor_cores = TensorCoreTiles(shape);
    b.group = b.tensor_cores ? 1 : AttentionGroupOf(shape);
    b.tile = b.tensor_cores ? kernels::kTcQueryTile : kernels::kQueryTile / b.group;
    b.num_tiles = kernels::MaxAttentionTiles(NumElements(shape[input_values_[kv_inputs_.seq]]),
                                             shape[input_values_[kv_inputs_.blocks]][0], b.tile);
    b.tiles = act.Take(b.num_tiles * b.tile * 4);
    const int64_t partials = AttentionPartialFloats(shape, b);
    if (partials > 0) b.partials = act.Take(partials * 4);
  }
  b.activation_bytes = act.size();
  MarkBatched(shape, &b);
  return b;
}

// Inputs: staged as float32, or in the GEMM form when only GEMMs read
// them (converted by the host while it copies them anyway).
void LoweredStage::InputOps(const std::vector<Shape>& shape, const Buffers& b, DevicePlan* plan,
                            std::vector<DeviceOp>* copy_in,
                            std::vector<DeviceOp>* compute) const {
  ArenaLayout in_stage(Arena::kStagingIn);
  for (size_t i = 0; i < input_values_.size(); ++i) {
    int v = input_values_[i];
    if (!b.has_f32[v] && !b.has_gm[v]) continue;  // an input nothing reads
    bool as_gm = !b.has_f32[v];
    DType t = as_gm ? gemm_type_ : DType::kF32;
    const DataType dtype = values_[v].type;
    int64_t bytes = NumElements(shape[v]) * (dtype == DT_FLOAT32 ? DTypeBytes(t) : ElementSize(dtype));
    StagedValue sv{static_cast<int>(i), in_stage.Take(bytes), t, shape[v], dtype};
    DeviceOp op{DeviceOp::Type::kCopyIn, graph_.inputs(i).name()};
    op.src = sv.staging;
    op.dst = as_gm ? b.gm[v] : b.f32[v];
    op.bytes = bytes;
    if (bytes > 0) copy_in->push_back(op);
    if (!as_gm && b.has_gm[v]) {
      compute->push_back(ConvertOp(graph_.inputs(i).name(), b.f32[v], b.gm[v],
                                   NumElements(shape[v])));
    }
    plan->inputs.push_back(std::move(sv));
  }
  plan->staging_in_bytes = in_stage.size();
}

// arange and full, computed now and staged after the inputs.
void LoweredStage::ConstantOps(const Sizes& sizes, const Buffers& b, DevicePlan* plan,
                               std::vector<DeviceOp>* copy_in) const {
  ArenaLayout in_stage(Arena::kStagingIn, plan->staging_in_bytes);
  for (size_t i = 0; i < steps_.size(); ++i) {
    const Step& s = steps_[i];
    if (s.kind != Kind::kConstant || !b.has_f32[s.out]) continue;
    const Node& node = sizes.node[i];
    Tensor t = Tensor::Empty(sizes.shape[s.out], values_[s.out].type);
    for (int64_t e = 0; e < t.numel(); ++e) {
      const double v = node.op() == "arange"
                           ? static_cast<double>(IntAttr(node, "start", 0) +
                                                 e * IntAttr(node, "step", 1))
                           : FloatAttr(node, "value", 0);
      switch (t.dtype()) {
        case DT_INT64: t.data_as<int64_t>()[e] = static_cast<int64_t>(v); break;
        case DT_BOOL: t.data_as<uint8_t>()[e] = v != 0; break;
        case DT_FLOAT16: t.data_as<uint16_t>()[e] = FloatToHalf(static_cast<float>(v)); break;
        case DT_BFLOAT16: t.data_as<uint16_t>()[e] = FloatToBf16(static_cast<float>(v)); break;
        default: t.data()[e] = static_cast<float>(v); break;
      }
    }
    DeviceOp op{DeviceOp::Type::kCopyIn, node.name()};
    op.bytes = t.byte_size();
    op.src = in_stage.Take(op.bytes);
    op.dst = b.f32[s.out];
    if (op.bytes > 0) copy_in->push_back(op);
    plan->constants.push_back({op.src, std::move(t)});
  }
  plan->staging_in_bytes = in_stage.size();
}

// Embeddings reading a graph input (or a view of one) check its ids on
// the host first.
void LoweredStage::IndexChecks(const std::vector<Shape>& shape, DevicePlan* plan) const {
  for (const Step& s : steps_) {
    if (s.kind != Kind::kEmbedding) continue;
    int v = s.in[0];
    while (values_[v].view_of >= 0) v = values_[v].view_of;
    if (values_[v].input < 0) continue;
    plan->index_checks.push_back({values_[v].input, shape[s.in[1]][0], NodeOf(s).name()});
  }
}

// The GEMM of an mm, matmul, linear or addmm step (or a fill, when K is
// 0); a matmul of equal-rank operands is a batch of GEMMs.
// The sizes, leading dimensions and batch strides of step s's GEMM (x is
// input xi). x [..., K] is M rows; mm: w [K, N]; linear: w [N, K], bias
// [N]; addmm: bias [N], x [M, K], w [K, N]; batched matmul: x [..., M, K],
// w [..., K, N]. Column-major D is Y^T: [N, M].
GemmOp LoweredStage::GemmShape(const Step& s, const std::vector<Shape>& shape, int xi) const {
  const Shape& x = shape[s.in[xi]];
  const Shape& w = shape[s.in[xi + 1]];
  const int64_t k = x.back();
  const int64_t n = s.kind == Kind::kLinear ? w[0] : w.back();
  int64_t m = 1;
  for (size_t d = 0; d + 1 < x.size(); ++d) m *= x[d];
  GemmOp g;
  if (w.size() > 2) {  // batched
    m = x[x.size() - 2];
    g.batch = NumElements(shape[s.out]) / std::max<int64_t>(m * n, 1);
    g.stride_a = NumElements(w) == k * n ? 0 : k * n;  // one w for every batch, or one each
    g.stride_b = NumElements(x) == m * k ? 0 : m * k;
    g.stride_d = m * n;
  }
  g.m = n;
  g.n = m;
  g.k = k;
  g.ldd = n;
  return g;
}

// A GEMM over K = 0: D = the bias or zeros (then its epilogue).
void LoweredStage::FillOps(const std::string& name, const GemmOp& g, BufferRef out,
                           std::vector<DeviceOp>* compute) const {
  DeviceOp fill{DeviceOp::Type::kFill, name};
  fill.gemm = g;
  fill.gemm.n = g.n * g.batch;  // the batch's outputs lie side by side
  fill.gemm.batch = 1;
  fill.gemm.gelu = false;
  compute->push_back(fill);
  if (g.gelu && g.has_bias) {  // GELU(bias), in place (no bias: GELU(0) = 0 as it is)
    DeviceOp gelu{DeviceOp::Type::kUnary, name};
    gelu.src = gelu.dst = out;
    gelu.n = g.m * g.n * g.batch;
    gelu.unary = kernels::UnaryKind::kGeluTanh;
    compute->push_back(gelu);
  }
}

absl::Status LoweredStage::GemmOps(const Step& s, const std::vector<Shape>& shape,
                                   const Buffers& b, BufferRef out,
                                   std::vector<DeviceOp>* compute) const {
  const std::string& name = NodeOf(s).name();
  const bool addmm = s.kind == Kind::kAddmm;
  const int xi = addmm ? 1 : 0;
  const bool lin = s.kind == Kind::kLinear;
  GemmOp g = GemmShape(s, shape, xi);
  const int64_t m = g.n, n = g.m, k = g.k, batch = g.batch;
  RETURN_IF_ERROR(CheckGemmOperands(NodeOf(s), shape, s, xi, n));
  if (m == 0 || n == 0 || batch == 0) return absl::OkStatus();  // nothing to write
  g.d = out;
  // A 16-bit graph's GEMMs read and write its values as they are.
  const DataType vtype = values_[s.out].type;
  const bool sixteen = vtype != DT_FLOAT32;
  g.d_type = sixteen ? StorageOf(vtype) : b.has_f32[s.out] ? DType::kF32 : DType::kBF16;
  g.relu = s.relu;
  g.gelu = s.gelu;
  if (lin && s.in.size() > 2) {
    g.has_bias = true;
    g.bias = b.f32[s.in[2]];
  }
  if (addmm) {
    g.has_bias = true;
    g.bias = b.f32[s.in[0]];
  }
  g.bias_type = StorageOf(vtype);
  if (k == 0 && sixteen) {
    return absl::UnimplementedError(absl::StrCat("node \"", name, "\": a ", TorchName(vtype),
                                                 " GEMM over an inner dimension of 0"));
  }
  if (k == 0) {
    FillOps(name, g, out, compute);
    return absl::OkStatus();
  }
  g.precision = sixteen ? Precision::kFloat32 : precision_;  // float32 accumulation
  g.ab_type = sixteen ? StorageOf(vtype) : gemm_type_;
  auto operand = [&](int v) {
    return sixteen || gemm_type_ == DType::kF32 ? b.f32[v] : b.gm[v];
  };
  g.trans_a = lin;  // w [N, K] row-major is [K, N] column-major
  g.a = operand(s.in[xi + 1]);
  g.lda = lin ? k : n;
  g.b = operand(s.in[xi]);  // x [M, K] row-major is [K, M] column-major
  g.ldb = k;
  if (const Buffers::GroupStrides strides = b.batched[s.out]; !s.group.empty() && strides.a > 0) {
    g.batch = 1 + static_cast<int64_t>(s.group.size());  // its members' too: one x, their weights
    g.stride_a = strides.a;
    g.stride_d = strides.d;
    g.stride_b = 0;
  }
  DeviceOp op{DeviceOp::Type::kGemm, name};
  op.gemm = g;
  compute->push_back(op);
  return absl::OkStatus();
}

// What the GEMMs cannot express: a batched operand whose batch dims are
// neither the output's nor all 1, and an addmm bias that is not a row.
absl::Status LoweredStage::CheckGemmOperands(const Node& node, const std::vector<Shape>& shape,
                                             const Step& s, int xi, int64_t n) const {
  const Shape& out = shape[s.out];
  for (int i : {xi, xi + 1}) {
    const Shape& op = shape[s.in[i]];
    if (op.size() <= 2 || out.size() <= 2) continue;
    const Shape batch(op.begin(), op.end() - 2), want(out.begin(), out.end() - 2);
    if (batch != want && NumElements(batch) != 1) {
      return absl::UnimplementedError(absl::StrCat(
          "node \"", node.name(), "\": the cuda GEMMs batch ", ShapeToString(op),
          " only over ", ShapeToString(want), " or all ones (expand it first)"));
    }
  }
  const Shape& bias = shape[s.in[0]];
  if (s.kind == Kind::kAddmm && !(bias == Shape{n} || bias == Shape{1, n})) {
    return absl::UnimplementedError(absl::StrCat(
        "node \"", node.name(), "\": the cuda addmm adds a row of ", n, " values, not ",
        ShapeToString(bias)));
  }
  return absl::OkStatus();
}

// The broadcasting binary op of an add, sub or mul step.
absl::Status LoweredStage::BinaryOps(const Step& s, const std::vector<Shape>& shape,
                                     const Buffers& b, BufferRef out,
                                     std::vector<DeviceOp>* compute) const {
  const std::string& name = NodeOf(s).name();
  const int64_t n_out = NumElements(shape[s.out]);
  DeviceOp op{DeviceOp::Type::kBinary, name};
  op.src = b.f32[s.in[0]];
  op.src2 = b.f32[s.in[1]];
  op.dst = out;
  op.n = n_out;
  op.op = s.op;
  if (!MakeBroadcastIndex(shape[s.in[0]], shape[s.in[1]], shape[s.out],
                          &op.index)) {
    return absl::UnimplementedError(
        absl::StrCat("node \"", name, "\": broadcasting ",
                     ShapeToString(shape[s.in[0]]), " with ",
                     ShapeToString(shape[s.in[1]]), " needs more than ",
                     kMaxBroadcastRank, " dimensions"));
  }
  if (n_out > 0) compute->push_back(op);
  return absl::OkStatus();
}

DeviceOp LoweredStage::SoftmaxOp(const Step& s, const Shape& x, const std::vector<BufferRef>& f32,
                                 BufferRef out) const {
  DeviceOp op{DeviceOp::Type::kSoftmax, NodeOf(s).name()};
  op.src = f32[s.in[0]];
  op.dst = out;
  op.n = NumElements(x);
  op.cols = x.empty() ? 1 : x.back();
  op.rows = op.cols == 0 ? 0 : op.n / op.cols;
  op.log = NodeOf(s).op() == "log_softmax";
  return op;
}

DeviceOp LoweredStage::ConvertOp(const std::string& node, BufferRef f32, BufferRef gm,
                                 int64_t n) const {
  DeviceOp conv{DeviceOp::Type::kConvert, node};
  conv.src = f32;
  conv.dst = gm;
  conv.dtype = gemm_type_;
  conv.n = n;
  return conv;
}

absl::Status LoweredStage::StepOps(size_t i, const Sizes& sizes, const Buffers& b,
                                   std::vector<DeviceOp>* compute) const {
  const Step* s = &steps_[i];
  Step add;  // a residual sum its norm cannot compute at these shapes: the add runs
  if (s->kind == Kind::kResidualSum && !ResidualFits(steps_[s->norm], sizes.shape)) {
    add = *s;
    add.kind = s->unfused;
    s = &add;
  }
  if (s->group_head >= 0 && b.batched[s->out].a > 0) {
    const int64_t n = NumElements(sizes.shape[s->out]);  // computed by its head's GEMM
    if (b.has_f32[s->out] && b.has_gm[s->out] && n > 0) {
      compute->push_back(ConvertOp(sizes.node[i].name(), b.f32[s->out], b.gm[s->out], n));
    }
    return absl::OkStatus();
  }
  if (s->kind == Kind::kView || s->kind == Kind::kSize || s->kind == Kind::kAbsorbed || s->kind == Kind::kResidualSum || b.aliased[s->out]) {
    return absl::OkStatus();  // no device work
  }
  const size_t first = compute->size();
  RETURN_IF_ERROR(StepKernelOps(*s, sizes.node[i], sizes, b, compute));
  const DataType ftype = FloatTypeOf(*s);
  for (size_t k = first; k < compute->size(); ++k) (*compute)[k].ftype = ftype;
  // A float32 result that GEMMs read in another form gets it now (and a
  // norm's residual sum, which it writes).
  std::vector<int> written = {s->out};
  if (s->residual >= 0 && ResidualFits(*s, sizes.shape)) written.push_back(s->residual_sum);
  for (int v : written) {
    const int64_t n = NumElements(sizes.shape[v]);
    if (b.has_f32[v] && b.has_gm[v] && n > 0) {
      compute->push_back(ConvertOp(sizes.node[i].name(), b.f32[v], b.gm[v], n));
    }
  }
  return absl::OkStatus();
}

absl::Status LoweredStage::StepKernelOps(const Step& s, const Node& node, const Sizes& sizes,
                                         const Buffers& b, std::vector<DeviceOp>* compute) const {
  const std::vector<Shape>& shape = sizes.shape;
  const BufferRef out = b.has_f32[s.out] ? b.f32[s.out] : b.gm[s.out];
  switch (s.kind) {
    case Kind::kMm:
    case Kind::kLinear:
    case Kind::kAddmm:
      return GemmOps(s, shape, b, out, compute);
    case Kind::kProgram:
      return ProgramOps(s, sizes, b, out, compute);
    case Kind::kBinary:
      return BinaryOps(s, shape, b, out, compute);
    case Kind::kMove:
      return MoveOps(s, node, shape, b, out, compute);
    case Kind::kConstant:    // staged with the inputs (ConstantOps)
    case Kind::kView:        // no work
    case Kind::kSize:        // on the host
      return absl::OkStatus();
    case Kind::kSample:
      if (NumElements(shape[s.out]) > 0) compute->push_back(SampleOp(s, node, shape, b, out));
      return absl::OkStatus();
    default: {
      ASSIGN_OR_RETURN(DeviceOp op, OneOp(s, node, shape, b, out));
      if (NumElements(shape[s.out]) > 0) compute->push_back(op);  // nothing to write otherwise
      return absl::OkStatus();
    }
  }
}

// The one op of a step that reads its first input (and maybe more) into
// its output.
// A kReduce or kTriangle step's op, from `op` (its input, output and size
// set) and x, its input's shape.
absl::StatusOr<DeviceOp> LoweredStage::ReduceOrTriangleOp(const Step& s, const Node& node,
                                                          const Shape& x, DeviceOp op) const {
  if (s.kind == Kind::kTriangle) {
    op.type = DeviceOp::Type::kTriangle;
    op.rows = x[x.size() - 2];
    op.cols = x.back();
    op.diagonal = IntAttr(node, "diagonal", 0);
    op.upper = node.op() == "triu";
    op.element_bytes = ElementSize(values_[s.out].type);
    return op;
  }
  absl::StatusOr<kernels::ReduceOp> r = ReductionOf(node, x);
  if (!r.ok()) {
    return absl::Status(r.status().code(),
                        absl::StrCat("node \"", node.name(), "\": ", r.status().message()));
  }
  op.type = DeviceOp::Type::kReduce;
  op.reduce = *r;
  return op;
}

absl::StatusOr<DeviceOp> LoweredStage::OneOp(const Step& s, const Node& node,
                                             const std::vector<Shape>& shape, const Buffers& b,
                                             BufferRef out) const {
  DeviceOp op{DeviceOp::Type::kRelu, node.name()};
  op.src = b.f32[s.in[0]];
  op.dst = out;
  op.n = NumElements(shape[s.out]);
  switch (s.kind) {
    case Kind::kEmbedding: return EmbeddingOp(s, shape, b, out);
    case Kind::kLayerNorm: {
      DeviceOp norm = LayerNormOp(s, shape[s.in[0]], b.f32, out);
      SetResidual(s, shape, b, &norm);
      return norm;
    }
    case Kind::kRmsNorm: return RmsNormOpOf(s, node, shape, b, out);
    case Kind::kRotary: return RotaryOpOf(s, node, shape, b, out);
    case Kind::kSoftmax: return SoftmaxOp(s, shape[s.in[0]], b.f32, out);
    case Kind::kAttention: return AttentionOp(s, node, shape, b, out);
    case Kind::kReduce:
    case Kind::kTriangle:
      return ReduceOrTriangleOp(s, node, shape[s.in[0]], op);
    case Kind::kScalar:
      op.type = DeviceOp::Type::kScalar;
      op.op = s.op;
      op.scalar = s.scalar;
      op.reverse = s.reverse;
      return op;
    case Kind::kUnary:
      op.type = DeviceOp::Type::kUnary;
      op.unary = s.unary;
      return op;
    case Kind::kClone:
      op.type = DeviceOp::Type::kCopy;
      op.bytes = op.n * ElementSize(values_[s.out].type);
      op.n = 0;
      return op;
    case Kind::kCast:
      op.type = DeviceOp::Type::kCast;
      op.cast_from = values_[s.in[0]].type;
      op.cast_to = values_[s.out].type;
      return op;
    default:  // kRelu
      return op;
  }
}

absl::Status LoweredStage::MoveOps(const Step& s, const Node& node,
                                   const std::vector<Shape>& shape, const Buffers& b,
                                   BufferRef out, std::vector<DeviceOp>* compute) const {
  std::vector<Shape> in;
  for (int v : s.in) in.push_back(shape[v]);
  absl::StatusOr<std::vector<Move>> moves = MovesOf(node, in, shape[s.out]);
  if (!moves.ok()) {
    return absl::Status(moves.status().code(), absl::StrCat("node \"", node.name(), "\": ",
                                                            moves.status().message()));
  }
  for (const Move& m : *moves) {
    DeviceOp op{DeviceOp::Type::kStridedCopy, node.name()};
    op.src = b.f32[s.in[m.input]];
    op.dst = out;
    op.n = m.copy.n;
    op.copy = m.copy;
    op.element_bytes = ElementSize(values_[s.out].type);
    compute->push_back(op);
  }
  return absl::OkStatus();
}

absl::Status LoweredStage::ProgramOps(const Step& s, const Sizes& sizes, const Buffers& b,
                                      BufferRef out, std::vector<DeviceOp>* compute) const {
  const int i = static_cast<int>(&s - steps_.data());
  ProgramBuilder builder(sizes.shape[s.out], values_[s.out].type);
  EmitFused(i, sizes, &builder, /*fused=*/false);
  const std::string& name = sizes.node[i].name();
  if (builder.full()) {
    return absl::UnimplementedError(absl::StrCat(
        "node \"", name, "\": an elementwise op over ", sizes.shape[s.out].size(),
        " dims; the cuda kernels take at most ", kernels::kMaxCopyRank));
  }
  ASSIGN_OR_RETURN(DeviceOp op, ProgramOp(name, builder, FloatTypeOf(s), b, out));
  if (op.n > 0) compute->push_back(op);
  return absl::OkStatus();
}

DeviceOp LoweredStage::EmbeddingOp(const Step& s, const std::vector<Shape>& shape,
                                   const Buffers& b, BufferRef out) const {
  DeviceOp op{DeviceOp::Type::kEmbedding, NodeOf(s).name()};
  op.src = b.f32[s.in[0]];
  op.src2 = b.f32[s.in[1]];
  op.dst = out;
  op.n = NumElements(shape[s.in[0]]);
  op.rows = shape[s.in[1]][0];
  op.cols = shape[s.in[1]][1];
  return op;
}

// Sizes are host integers: only shape ops may read them, and only as
// their sizes (inputs after the first).
absl::Status LoweredStage::CheckSizeReaders(const Node& node, const Step& step) const {
  const bool takes_sizes =
      step.kind == Kind::kView || step.kind == Kind::kMove || step.kind == Kind::kConstant;
  // A "_from" attribute names inputs whose values the plan needs: only
  // sizes are known when a plan is made (the plan is kept per shape).
  for (const auto& [key, value] : node.attrs()) {
    if (!absl::EndsWith(key, "_from")) continue;
    std::vector<int64_t> from(value.ints().v().begin(), value.ints().v().end());
    if (value.value_case() != AttrValue::kInts) from = {value.i()};
    for (int64_t k : from) {
      if (k > 0 && k <= static_cast<int64_t>(step.in.size()) && !values_[step.in[k - 1]].host) {
        return absl::InvalidArgumentError(absl::StrCat(
            "the cuda backend has no kernel for node \"", node.name(), "\" (", node.op(),
            " sized by the value of \"", node.inputs(k - 1),
            "\", which is not a size of a tensor; serve this model with --device=cpu)"));
      }
    }
  }
  for (size_t i = 0; i < step.in.size(); ++i) {
    if (IsSampled(step.in[i])) {
      return absl::InvalidArgumentError(absl::StrCat(
          "the cuda backend has no kernel for node \"", node.name(), "\" (", node.op(),
          " of the sampled tokens \"", node.inputs(i),
          "\": they only leave the stage; serve this model with --device=cpu)"));
    }
    // Shape ops take sizes after their tensor; arange and full only sizes.
    const bool size_slot = takes_sizes && (i > 0 || step.kind == Kind::kConstant);
    if (values_[step.in[i]].host && !size_slot) {
      return absl::InvalidArgumentError(absl::StrCat(
          "the cuda backend has no kernel for node \"", node.name(), "\" (", node.op(),
          " of the size \"", node.inputs(i),
          "\": it keeps sizes on the host; serve this model with --device=cpu)"));
    }
  }
  return absl::OkStatus();
}

// One float type (float32, float16 or bfloat16) per step, except: shape
// ops, clones, constants and casts of any type; embedding ids and the
// cache metadata (int64); comparisons, which make bool; where's bool
// condition; sample_tokens' parameters (float32 and int64, whatever the
// logits' type).
absl::Status LoweredStage::CheckTypes(const Node& node, const Step& step) const {
  const DataType out = values_[step.out].type;
  auto refuse = [&](DataType t, const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the cuda backend has no ", TorchName(t), " kernels: node \"", node.name(), "\" (",
        node.op(), ") ", what, " a ", TorchName(t),
        " value (serve this model with --device=cpu)"));
  };
  auto stored = [](DataType t) { return IsFloatingPoint(t) || t == DT_INT64 || t == DT_BOOL; };
  const bool any_type = step.kind == Kind::kView || step.kind == Kind::kMove ||
                        step.kind == Kind::kClone || step.kind == Kind::kConstant ||
                        step.kind == Kind::kSize || step.kind == Kind::kTriangle ||
                        step.kind == Kind::kCast;
  if (any_type) return stored(out) ? absl::OkStatus() : refuse(out, "makes");
  if (step.kind == Kind::kSample) {  // float logits; the rest as the schema has them
    const DataType t = values_[step.in[0]].type;
    return IsFloatingPoint(t) ? absl::OkStatus() : refuse(t, "reads");
  }
  const DataType ftype = FloatTypeOf(step);
  const bool compare = step.kind == Kind::kProgram && node.op() != "where" &&
                       FindOp(node.op())->dtype != nullptr && out == DT_BOOL;
  if (out != ftype && !compare) return refuse(out, "makes");
  for (size_t i = 0; i < step.in.size(); ++i) {
    const DataType t = values_[step.in[i]].type;
    const bool ok = t == ftype ||
                    (step.kind == Kind::kEmbedding && i == 0 && t == DT_INT64) ||
                    (step.kind == Kind::kAttention && i >= 3 && t == DT_INT64) ||
                    (node.op() == "where" && i == 0 && t == DT_BOOL);
    if (!ok) {
      return IsFloatingPoint(t) && IsFloatingPoint(ftype)
                 ? absl::InvalidArgumentError(absl::StrCat(
                       "the cuda backend has no kernel for node \"", node.name(), "\" (",
                       node.op(), " of ", TorchName(t), " and ", TorchName(ftype),
                       " values; cast them to one type)"))
                 : refuse(t, "reads");
    }
  }
  return IsFloatingPoint(ftype) ? absl::OkStatus() : refuse(out, "makes");
}

DataType LoweredStage::FloatTypeOf(const Step& s) const {
  if (IsFloatingPoint(values_[s.out].type)) return values_[s.out].type;
  for (int v : s.in) {
    if (IsFloatingPoint(values_[v].type)) return values_[v].type;
  }
  return values_[s.out].type;
}

void LoweredStage::OutputOps(const std::vector<Shape>& shape, const Buffers& b, DevicePlan* plan,
                             std::vector<DeviceOp>* copy_out) const {
  ArenaLayout out_stage(Arena::kStagingOut);
  for (size_t o = 0; o < output_values_.size(); ++o) {
    int v = output_values_[o];
    int64_t bytes = NumElements(shape[v]) * ElementSize(values_[v].type);
    StagedValue sv{static_cast<int>(o), out_stage.Take(bytes), DType::kF32, shape[v],
                   values_[v].type};
    DeviceOp op{DeviceOp::Type::kCopyOut, graph_.outputs(o)};
    op.src = b.f32[v];
    op.dst = sv.staging;
    op.bytes = bytes;
    if (bytes > 0) copy_out->push_back(op);
    plan->outputs.push_back(std::move(sv));
  }
  plan->staging_out_bytes = out_stage.size();
}

absl::StatusOr<DevicePlan> LoweredStage::Plan(
    const std::vector<Shape>& input_shapes) const {
  DevicePlan plan;
  plan.input_shapes = input_shapes;
  ASSIGN_OR_RETURN(const Sizes sizes, ShapesFor(input_shapes));
  const std::vector<Shape>& shape = sizes.shape;
  const Buffers b = LayOutBuffers(shape);
  std::vector<DeviceOp> copy_in, compute, copy_out;
  InputOps(shape, b, &plan, &copy_in, &compute);
  ConstantOps(sizes, b, &plan, &copy_in);
  TileOps(shape, b, &plan, &copy_in);
  IndexChecks(shape, &plan);
  SampleChecks(sizes, &plan);
  const absl::flat_hash_map<int, DeviceOp> fused = FusedOps(sizes, b);
  for (size_t i = 0; i < steps_.size(); ++i) {
    const Step& s = steps_[i];
    if (s.fused_into >= 0 && IsFusedStep(fused, i)) continue;  // in its reader's program
    auto f = fused.find(static_cast<int>(i));
    if (f == fused.end()) {
      RETURN_IF_ERROR(StepOps(i, sizes, b, &compute));
      continue;
    }
    if (f->second.n > 0) compute.push_back(f->second);  // an empty output: no launch
    if (b.has_f32[s.out] && b.has_gm[s.out] && f->second.n > 0) {
      compute.push_back(ConvertOp(f->second.node, b.f32[s.out], b.gm[s.out], f->second.n));
    }
  }
  OutputOps(shape, b, &plan, &copy_out);
  copy_in = MergeCopies(std::move(copy_in));
  copy_out = MergeCopies(std::move(copy_out));
  plan.compute_begin = copy_in.size();
  plan.compute_end = copy_in.size() + compute.size();
  plan.ops = std::move(copy_in);
  plan.ops.insert(plan.ops.end(), compute.begin(), compute.end());
  plan.ops.insert(plan.ops.end(), copy_out.begin(), copy_out.end());
  plan.activation_bytes = b.activation_bytes;
  return plan;
}

void StageInputs(const DevicePlan& plan, absl::Span<const Tensor> inputs,
                 void* staging_in) {
  char* base = static_cast<char*>(staging_in);
  for (const StagedValue& sv : plan.inputs) {
    const Tensor& t = inputs[sv.index];
    if (t.numel() == 0) continue;
    if (sv.dtype != DT_FLOAT32) {
      std::memcpy(base + sv.staging.offset, t.raw_data(), t.byte_size());
      continue;
    }
    ConvertFloats(t.data(), t.numel(), sv.type, base + sv.staging.offset);
  }
  for (const StagedConstant& c : plan.constants) {
    if (c.value.numel() > 0) {
      std::memcpy(base + c.staging.offset, c.value.raw_data(), c.value.byte_size());
    }
  }
  for (const StagedTiles& t : plan.tiles) {  // the seq input's tiles, spare ones -1
    const Tensor& seq = inputs[t.seq_input];
    std::vector<int32_t> tiles =
        kernels::AttentionTiles(seq.data_as<int64_t>(), seq.numel(), t.tile);
    tiles.resize(t.capacity * t.tile, -1);  // KvCache::BeginStep checked seq
    std::memcpy(base + t.staging.offset, tiles.data(), tiles.size() * sizeof(int32_t));
  }
}

absl::Status CheckIndices(const DevicePlan& plan, absl::Span<const Tensor> inputs) {
  for (const IndexCheck& c : plan.index_checks) {
    const Tensor& ids = inputs[c.input];
    const int64_t* id = ids.data_as<int64_t>();
    for (int64_t i = 0; i < ids.numel(); ++i) {
      if (id[i] < 0 || id[i] >= c.rows) {
        return absl::InvalidArgumentError(absl::StrCat(
            "node \"", c.node, "\": embedding id ", id[i], " (at flat index ", i,
            ") is out of range for a table of ", c.rows, " rows"));
      }
    }
  }
  return absl::OkStatus();
}

void UnstageOutputs(const DevicePlan& plan, const void* staging_out,
                    std::vector<Tensor>* outputs) {
  const char* base = static_cast<const char*>(staging_out);
  outputs->resize(plan.outputs.size());
  for (const StagedValue& sv : plan.outputs) {
    Tensor& t = (*outputs)[sv.index];
    if (!(t.SoleOwner() && t.shape() == sv.shape && t.dtype() == sv.dtype)) {
      t = Tensor::Empty(sv.shape, sv.dtype);
    }
    if (t.numel() > 0) std::memcpy(t.raw_data(), base + sv.staging.offset, t.byte_size());
  }
}

}  // namespace pipeserve
