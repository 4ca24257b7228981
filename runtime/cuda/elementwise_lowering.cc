#include "runtime/cuda/elementwise_lowering.h"

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
      {"div", EwCode::kDiv},         {"pow", EwCode::kPow}, {"maximum", EwCode::kMaximum},
      {"minimum", EwCode::kMinimum}, {"eq", EwCode::kEq},   {"ne", EwCode::kNe},
      {"lt", EwCode::kLt},           {"le", EwCode::kLe},   {"gt", EwCode::kGt},
      {"ge", EwCode::kGe},           {"where", EwCode::kWhere}};
  return *codes;
}

// Strides of `in` read as `out` (right-aligned; 0 where it broadcasts).
void BroadcastStrides(const Shape& in, const Shape& out, int64_t* strides) {
  const size_t lead = out.size() - in.size();
  int64_t n = 1;
  for (size_t i = in.size(); i-- > 0;) {
    strides[lead + i] = in[i] == 1 && out[lead + i] != 1 ? 0 : n;
    n *= in[i];
  }
}

EwInstr Instr(EwCode code, int a = 0, int b = 0, int c = 0) {
  EwInstr op;
  op.code = code;
  op.a = static_cast<uint8_t>(a);
  op.b = static_cast<uint8_t>(b);
  op.c = static_cast<uint8_t>(c);
  return op;
}

}  // namespace

bool IsProgramOp(const std::string& op) { return Codes().contains(op); }

absl::StatusOr<kernels::ElementwiseProgramOp> ProgramOf(const Node& node,
                                                        const std::vector<Shape>& in,
                                                        const std::vector<DataType>& types,
                                                        const Shape& out, DataType out_type) {
  if (out.size() > static_cast<size_t>(kernels::kMaxCopyRank)) {
    return absl::UnimplementedError(absl::StrCat(
        "an elementwise op over ", out.size(), " dims; the cuda kernels take at most ",
        kernels::kMaxCopyRank));
  }
  kernels::ElementwiseProgramOp p;
  p.rank = static_cast<int>(out.size());
  for (size_t k = 0; k < out.size(); ++k) p.dims[k] = out[k];
  p.n = NumElements(out);
  p.num_inputs = static_cast<int>(in.size());
  for (size_t j = 0; j < in.size(); ++j) {
    p.inputs[j].type = types[j] == DT_BOOL ? EwType::kBool : EwType::kF32;
    BroadcastStrides(in[j], out, p.inputs[j].strides);
    p.ops[p.num_ops++] = Instr(EwCode::kInput, static_cast<int>(j));
  }
  const EwCode code = Codes().at(node.op());
  if (code == EwCode::kWhere) {
    p.ops[p.num_ops++] = Instr(code, 0, 1, 2);
  } else if (HasScalarOperand(node)) {
    EwInstr c = Instr(EwCode::kConst);
    c.value = static_cast<float>(FloatAttr(node, "scalar", 0));
    p.ops[p.num_ops++] = c;
    const bool reverse = IntAttr(node, "reverse", 0) != 0;
    p.ops[p.num_ops++] = reverse ? Instr(code, 1, 0) : Instr(code, 0, 1);
  } else {
    p.ops[p.num_ops++] = Instr(code, 0, 1);
  }
  p.out_type = out_type == DT_BOOL ? EwType::kBool : EwType::kF32;
  return p;
}

}  // namespace pipeserve
