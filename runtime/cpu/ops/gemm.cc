// The CPU kernels of the GEMM ops: matmul and mm (batched, with broadcast
// batch dims), linear and addmm, over float32 through cpu_kernels.h's
// oneDNN GEMMs, and in bfloat16 (float32 accumulation) for linear, mm,
// matmul by one matrix and GPT-2's Conv1D addmm.
#include <algorithm>
#include <array>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "graph/op_schema.h"
#include "runtime/cpu/cpu_kernels.h"
#include "runtime/cpu/ops/internal.h"
#include "runtime/cpu/ops/kernel_table.h"

namespace pipeserve {
namespace {

using cpu_ops::AllOfType;
using cpu_ops::Args;
using cpu_ops::Bad;
using cpu_ops::BroadcastStrides;
using cpu_ops::Iterate;
using cpu_ops::Strides;

absl::Status Matmul(const Tensor& a_in, const Tensor& b_in, Tensor* out) {
  Shape a = a_in.shape(), b = b_in.shape();
  if (a.size() == 1) a.insert(a.begin(), 1);
  if (b.size() == 1) b.push_back(1);
  const int64_t m = a[a.size() - 2], k = a.back(), n = b.back();
  Shape batch_a(a.begin(), a.end() - 2), batch_b(b.begin(), b.end() - 2);
  if (batch_b.empty() || NumElements(batch_b) == 1) {
    // b is one matrix: a's batch rows are contiguous, one GEMM does all.
    int64_t rows = NumElements(batch_a) * m;
    return Gemm(false, rows, n, k, a_in.data(), b_in.data(), 0.0f, out->data());
  }
  Shape batch = batch_a.size() >= batch_b.size() ? batch_a : batch_b;
  for (size_t i = 0; i < batch.size(); ++i) {  // broadcast batch shape
    size_t ia = i + batch_a.size() - batch.size(), ib = i + batch_b.size() - batch.size();
    int64_t da = i + batch_a.size() >= batch.size() ? batch_a[ia] : 1;
    int64_t db = i + batch_b.size() >= batch.size() ? batch_b[ib] : 1;
    batch[i] = std::max(da, db);
  }
  Strides sa = BroadcastStrides(batch_a, batch), sb = BroadcastStrides(batch_b, batch);
  std::array<Strides, 2> st = {sa, sb};
  absl::Status status;
  Iterate<2>(batch, st, [&](int64_t i, const std::array<int64_t, 2>& f) {
    if (!status.ok()) return;
    status = Gemm(false, m, n, k, a_in.data() + f[0] * m * k, b_in.data() + f[1] * k * n, 0.0f,
                  out->data() + i * m * n);
  });
  return status;
}

absl::Status Addmm(const Node& node, const std::vector<const Tensor*>& in, Tensor* out) {
  const float beta = static_cast<float>(FloatAttr(node, "beta", 1.0));
  const float alpha = static_cast<float>(FloatAttr(node, "alpha", 1.0));
  const Tensor& bias = *in[0];
  Strides sb = BroadcastStrides(bias.shape(), out->shape());
  std::array<Strides, 1> st = {sb};
  float* o = out->data();
  const float* bp = bias.data();
  Iterate<1>(out->shape(), st, [&](int64_t i, const std::array<int64_t, 1>& f) {
    o[i] = beta * bp[f[0]];
  });
  const int64_t m = in[1]->dim(0), k = in[1]->dim(1), n = in[2]->dim(1);
  if (alpha == 1.0f) return Gemm(false, m, n, k, in[1]->data(), in[2]->data(), 1.0f, o);
  Tensor tmp = Tensor::Empty({m, n});
  RETURN_IF_ERROR(Gemm(false, m, n, k, in[1]->data(), in[2]->data(), 0.0f, tmp.data()));
  for (int64_t i = 0; i < m * n; ++i) o[i] += alpha * tmp.data()[i];
  return absl::OkStatus();
}

absl::Status MatmulKernel(const Node& node, const Args& in, Tensor* out) {
  if (in[0]->dtype() != DT_FLOAT32) return Bad(absl::StrCat(node.op(), " needs float inputs"));
  return Matmul(*in[0], *in[1], out);
}

// Rows of a linear's output (its leading dims), also when K is 0.
int64_t LinearRows(const Tensor& out, int64_t n) { return n == 0 ? 0 : out.numel() / n; }

absl::Status LinearKernel(const Node&, const Args& in, Tensor* out) {
  const int64_t k = in[1]->dim(1), n = in[1]->dim(0);
  return LinearForward(in[0]->data(), in[1]->data(), in.size() > 2 ? in[2]->data() : nullptr,
                       LinearRows(*out, n), n, k, out->data(), false, false);
}

// bfloat16 GEMMs take all-bfloat16 values; matmul only by one matrix.
bool TakesBf16(const Node&, const Args& in, DataType out_type) {
  return AllOfType(DT_BFLOAT16, in, out_type);
}

bool TakesBf16Matmul(const Node&, const Args& in, DataType out_type) {
  return AllOfType(DT_BFLOAT16, in, out_type) && in[1]->rank() == 2 && in[0]->rank() >= 2;
}

// bfloat16 GEMMs stay in bfloat16 (oneDNN, float32 accumulation).
absl::Status LinearBf16(const Node& node, const Args& in, Tensor* out) {
  const bool linear = node.op() == "linear";
  const int64_t k = linear ? in[1]->dim(1) : in[1]->dim(0);
  const int64_t n = linear ? in[1]->dim(0) : in[1]->dim(1);
  const uint16_t* bias = linear && in.size() > 2 ? in[2]->data_as<uint16_t>() : nullptr;
  return GemmBf16(linear, LinearRows(*out, n), n, k, in[0]->data_as<uint16_t>(),
                  in[1]->data_as<uint16_t>(), bias, out->data_as<uint16_t>());
}

// addmm in bfloat16 only as GPT-2's Conv1D: bias [N] + x [M, K] @ w [K, N].
bool TakesBf16Conv1D(const Node& node, const Args& in, DataType out_type) {
  return AllOfType(DT_BFLOAT16, in, out_type) && in[0]->rank() == 1 &&
         FloatAttr(node, "beta", 1) == 1 && FloatAttr(node, "alpha", 1) == 1;
}

absl::Status AddmmBf16(const Node&, const Args& in, Tensor* out) {
  return GemmBf16(false, in[1]->dim(0), in[2]->dim(1), in[1]->dim(1), in[1]->data_as<uint16_t>(),
                  in[2]->data_as<uint16_t>(), in[0]->data_as<uint16_t>(),
                  out->data_as<uint16_t>());
}

}  // namespace

namespace cpu_ops {

void RegisterGemmKernels(KernelTable* table) {
  table->kernels["mm"] = MatmulKernel;
  table->kernels["matmul"] = MatmulKernel;
  table->kernels["linear"] = LinearKernel;
  table->kernels["addmm"] = Addmm;
  table->half["mm"] = {TakesBf16, LinearBf16};
  table->half["matmul"] = {TakesBf16Matmul, LinearBf16};
  table->half["linear"] = {TakesBf16, LinearBf16};
  table->half["addmm"] = {TakesBf16Conv1D, AddmmBf16};
}

}  // namespace cpu_ops
}  // namespace pipeserve
