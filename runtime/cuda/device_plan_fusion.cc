// LoweredStage's fusion of elementwise chains (device_plan.h): a chain of
// elementwise steps, each read only by the next, runs as one program of
// kernels/elementwise_program.h that reads the chain's inputs once and
// writes its last result, instead of one kernel and one buffer round trip
// per op (GPT-2's GELU written out is 8 ops; Llama's RMSNorm scaling 3).
#include <algorithm>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "runtime/cuda/device_plan.h"
#include "runtime/cuda/elementwise_lowering.h"

namespace pipeserve {

bool LoweredStage::Fusable(const Step& s) {
  return s.kind == Kind::kProgram || s.kind == Kind::kUnary || s.kind == Kind::kBinary ||
         s.kind == Kind::kScalar || s.kind == Kind::kRelu;
}

void LoweredStage::FuseElementwise() {
  std::vector<int> uses(values_.size(), 0), reader(values_.size(), -1);
  for (size_t i = 0; i < steps_.size(); ++i) {
    for (int v : steps_[i].in) {
      ++uses[v];
      reader[v] = static_cast<int>(i);
    }
  }
  for (int v : output_values_) uses[v] += 2;  // an output is never fused away
  for (Step& s : steps_) {
    const int r = reader[s.out];
    if (Fusable(s) && uses[s.out] == 1 && r >= 0 && Fusable(steps_[r])) s.fused_into = r;
  }
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
