// RunCpuOp and HasCpuOp over the one kernel table (ops/kernel_table.h),
// which the op families under runtime/cpu/ops/ fill, a file each: views
// and sizes are made here, and float16/bfloat16 values run through their
// family's kernel for that type or in float32, rounded back. Also the
// 16-bit conversions of cpu_ops.h.
#include "runtime/cpu/cpu_ops.h"

#include <algorithm>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "graph/dtype.h"
#include "graph/op_schema.h"
#include "runtime/cpu/ops/internal.h"
#include "runtime/cpu/ops/kernel_table.h"

namespace pipeserve {
namespace {

using cpu_ops::Bad;
using cpu_ops::IsHalf;
using cpu_ops::KernelTable;
using cpu_ops::NarrowToBf16;
using cpu_ops::Output;
using cpu_ops::WidenBf16;

// ---- the kernel table -------------------------------------------------------
// Every op the CPU runs, each registered by its family's file.
const KernelTable& Kernels() {
  static const KernelTable* table = [] {
    auto* t = new KernelTable;
    cpu_ops::RegisterElementwiseKernels(t);
    cpu_ops::RegisterNormalizationKernels(t);
    cpu_ops::RegisterGemmKernels(t);
    cpu_ops::RegisterMovementKernels(t);
    cpu_ops::RegisterGenerationKernels(t);
    return t;
  }();
  return *table;
}

// Ops that copy float16 and bfloat16 values as they are (not widened).
bool IsMovement(const std::string& op) {
  static const auto* ops = new absl::flat_hash_set<std::string>{
      "reshape", "permute", "unsqueeze", "squeeze", "expand", "slice", "select", "cat",
      "stack", "identity", "clone", "embedding", "where", "triu", "tril", "size", "full",
      "cast", "arange"};
  return ops->contains(op);
}

// Ops that make no new values: views of their input's storage (every
// tensor here is contiguous) and sizes.
bool IsViewOrSize(const std::string& op) {
  return op == "reshape" || op == "unsqueeze" || op == "squeeze" || op == "identity" ||
         op == "size";
}

absl::StatusOr<Tensor> RunFloat32(const Node& node, const std::vector<const Tensor*>& in,
                                  const Shape& out_shape, DataType out_type,
                                  const Tensor& scratch) {
  const std::string& op = node.op();
  const Tensor& x = in.empty() ? Tensor() : *in[0];
  if (op == "size") {
    int d = *NormalizeDim(IntAttr(node, "dim", 0), x.rank());
    return Tensor::Scalar(x.rank() == 0 ? 1 : x.dim(d));
  }
  if (IsViewOrSize(op)) {
    absl::StatusOr<uint64_t> n = CheckedElementCount(out_shape);  // a view reads no more
    if (!n.ok() || *n != static_cast<uint64_t>(x.numel())) {
      return Bad(absl::StrCat(op, " of ", ShapeToString(x.shape()), " to ",
                              ShapeToString(out_shape), ": element counts differ"));
    }
    return x.Reshaped(out_shape);
  }
  auto kernel = Kernels().kernels.find(op);
  if (kernel == Kernels().kernels.end()) {
    return Bad(absl::StrCat("no CPU kernel for op \"", op, "\""));
  }
  ASSIGN_OR_RETURN(Tensor out, Output(out_shape, out_type, scratch));
  RETURN_IF_ERROR(kernel->second(node, in, &out));
  return out;
}

// An op with a float16 or bfloat16 value: its family's kernel for that
// type where there is one that takes these inputs, else in float32
// rounded back.
absl::StatusOr<Tensor> RunHalf(const Node& node, const std::vector<const Tensor*>& in,
                               const Shape& out_shape, DataType out_type, const Tensor& scratch) {
  const auto& half = Kernels().half;
  auto kernel = half.find(node.op());
  if (kernel != half.end() && kernel->second.takes(node, in, out_type)) {
    ASSIGN_OR_RETURN(Tensor out, Output(out_shape, out_type, scratch));
    RETURN_IF_ERROR(kernel->second.run(node, in, &out));
    return out;
  }
  // float16/bfloat16 math: in float32, rounded back to the value's type.
  std::vector<Tensor> wide;
  wide.reserve(in.size());
  std::vector<const Tensor*> ptrs;
  for (const Tensor* t : in) {
    wide.push_back(IsHalf(t->dtype()) ? ToFloat32(*t) : *t);
    ptrs.push_back(&wide.back());
  }
  DataType wide_type = IsHalf(out_type) ? DT_FLOAT32 : out_type;
  ASSIGN_OR_RETURN(Tensor y, RunFloat32(node, ptrs, out_shape, wide_type, Tensor()));
  return IsHalf(out_type) ? FromFloat32(y, out_type) : y;
}

}  // namespace

void Widen16(DataType type, const uint16_t* a, int64_t n, float* o) {
  if (type == DT_BFLOAT16) {
    WidenBf16(a, n, o);
    return;
  }
  for (int64_t i = 0; i < n; ++i) o[i] = HalfToFloat(a[i]);
}

void Narrow16(DataType type, const float* a, int64_t n, uint16_t* o) {
  if (type == DT_BFLOAT16) {
    NarrowToBf16(a, n, o);
    return;
  }
  for (int64_t i = 0; i < n; ++i) o[i] = FloatToHalf(a[i]);
}

Tensor ToFloat32(const Tensor& t) {
  if (t.dtype() == DT_FLOAT32) return t;
  Tensor out = Tensor::Empty(t.shape(), DT_FLOAT32);
  Widen16(t.dtype(), t.data_as<uint16_t>(), t.numel(), out.data());
  return out;
}

Tensor FromFloat32(const Tensor& t, DataType to) {
  if (to == DT_FLOAT32) return t;
  Tensor out = Tensor::Empty(t.shape(), to);
  Narrow16(to, t.data(), t.numel(), out.data_as<uint16_t>());
  return out;
}

absl::StatusOr<Tensor> RunCpuOp(const Node& node, const std::vector<const Tensor*>& in,
                                const Shape& out_shape, DataType out_type,
                                const Tensor& scratch) {
  // An output with no elements has nothing to compute, however many
  // positions its other dimensions span ([2^40, 0]): a kernel walking
  // them would loop for hours writing nothing.
  if (std::find(out_shape.begin(), out_shape.end(), 0) != out_shape.end()) {
    return Output(out_shape, out_type, scratch);  // checks the shape, holds nothing
  }
  const auto& runners = Kernels().runners;
  auto runner = runners.find(node.op());
  if (runner != runners.end()) return runner->second(node, in, out_shape, scratch);
  bool half = IsHalf(out_type);
  for (const Tensor* t : in) half = half || IsHalf(t->dtype());
  if (!half || IsMovement(node.op())) return RunFloat32(node, in, out_shape, out_type, scratch);
  return RunHalf(node, in, out_shape, out_type, scratch);
}

bool HasCpuOp(const std::string& op) {
  return Kernels().kernels.contains(op) || Kernels().runners.contains(op) || IsViewOrSize(op);
}

}  // namespace pipeserve
