#include "runtime/cuda/elementwise_lowering.h"

#include <algorithm>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "graph/op_schema.h"

namespace pipeserve {
namespace {

using kernels::EwCode;
using kernels::EwInstr;
using kernels::EwType;

const absl::flat_hash_map<std::string, EwCode>& Codes() {
  static const auto* codes = new absl::flat_hash_map<std::string, EwCode>{
      {"add", EwCode::kAdd},         {"sub", EwCode::kSub}, {"mul", EwCode::kMul},
      {"div", EwCode::kDiv},         {"pow", EwCode::kPow}, {"maximum", EwCode::kMaximum},
      {"floordiv", EwCode::kFloorDiv},
      {"minimum", EwCode::kMinimum}, {"eq", EwCode::kEq},   {"ne", EwCode::kNe},
      {"lt", EwCode::kLt},           {"le", EwCode::kLe},   {"gt", EwCode::kGt},
      {"ge", EwCode::kGe},           {"where", EwCode::kWhere}};
  return *codes;
}

}  // namespace

bool IsProgramOp(const std::string& op) {
  return Codes().contains(op) && op != "add" && op != "sub" && op != "mul";
}

ProgramBuilder::ProgramBuilder(const Shape& out, DataType out_type) : out_(out) {
  full_ = out.size() > static_cast<size_t>(kernels::kMaxCopyRank);
  p_.rank = static_cast<int>(std::min<size_t>(out.size(), kernels::kMaxCopyRank));
  for (int k = 0; k < p_.rank; ++k) p_.dims[k] = out[k];
  p_.n = NumElements(out);
  p_.out_type = out_type == DT_BOOL ? EwType::kBool : EwType::kF32;
}

int ProgramBuilder::Add(EwInstr op) {
  if (full_ || p_.num_ops == kernels::kMaxProgramOps) {
    full_ = true;
    return -1;
  }
  p_.ops[p_.num_ops] = op;
  return p_.num_ops++;
}

int ProgramBuilder::Input(int key, const Shape& shape, DataType type) {
  auto at = std::find(keys_.begin(), keys_.end(), key);
  if (at != keys_.end()) return loaded_[at - keys_.begin()];
  if (full_ || p_.num_inputs == kernels::kMaxProgramInputs || shape.size() > out_.size()) {
    full_ = true;
    return -1;
  }
  const int j = p_.num_inputs++;
  keys_.push_back(key);
  p_.inputs[j].type = type == DT_BOOL ? EwType::kBool : EwType::kF32;
  const std::vector<int64_t> strides = BroadcastStridesIn(shape, static_cast<int>(out_.size()));
  std::copy(strides.begin(), strides.end(), p_.inputs[j].strides);
  EwInstr op;
  op.code = EwCode::kInput;
  op.a = static_cast<uint8_t>(j);
  loaded_.push_back(Add(op));
  return loaded_.back();
}

int ProgramBuilder::Const(float value) {
  EwInstr op;
  op.code = EwCode::kConst;
  op.value = value;
  return Add(op);
}

int ProgramBuilder::Unary(kernels::UnaryKind kind, int a) {
  EwInstr op;
  op.code = EwCode::kUnary;
  op.unary = kind;
  op.a = static_cast<uint8_t>(a);
  return a < 0 ? -1 : Add(op);
}

int ProgramBuilder::Op(EwCode code, int a, int b, int c) {
  if (a < 0 || b < 0 || c < 0) return -1;
  EwInstr op;
  op.code = code;
  op.a = static_cast<uint8_t>(a);
  op.b = static_cast<uint8_t>(b);
  op.c = static_cast<uint8_t>(c);
  return Add(op);
}

int ProgramBuilder::NodeOp(const Node& node, const std::vector<int>& in) {
  const EwCode code = Codes().at(node.op());
  if (code == EwCode::kWhere) return Op(code, in[0], in[1], in[2]);
  if (!HasScalarOperand(node)) return Op(code, in[0], in[1]);
  const int s = Const(static_cast<float>(FloatAttr(node, "scalar", 0)));
  return IntAttr(node, "reverse", 0) != 0 ? Op(code, s, in[0]) : Op(code, in[0], s);
}

absl::StatusOr<kernels::ElementwiseProgramOp> ProgramOf(const Node& node,
                                                        const std::vector<Shape>& in,
                                                        const std::vector<DataType>& types,
                                                        const Shape& out, DataType out_type) {
  ProgramBuilder b(out, out_type);
  std::vector<int> regs;
  for (size_t j = 0; j < in.size(); ++j) {
    regs.push_back(b.Input(static_cast<int>(j), in[j], types[j]));
  }
  b.NodeOp(node, regs);
  if (b.full()) {
    return absl::UnimplementedError(absl::StrCat(
        "an elementwise op over ", out.size(), " dims; the cuda kernels take at most ",
        kernels::kMaxCopyRank));
  }
  return b.program();
}

}  // namespace pipeserve
