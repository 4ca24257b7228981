// The CPU kernels of the data-movement ops, which copy values (any dtype,
// float16 and bfloat16 as their bytes) or make them from attributes:
// embedding, permute, expand, slice and select, cat and stack, triu and
// tril, cast and clone, arange and full.
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "graph/dtype.h"
#include "graph/op_schema.h"
#include "runtime/cpu/ops/internal.h"
#include "runtime/cpu/ops/kernel_table.h"

namespace pipeserve {
namespace {

using cpu_ops::Args;
using cpu_ops::Bad;
using cpu_ops::BroadcastStrides;
using cpu_ops::GatherCopy;
using cpu_ops::Strides;

absl::Status Embedding(const Tensor& ids, const Tensor& weight, Tensor* out) {
  const int64_t rows = weight.dim(0);
  const int64_t row_bytes = weight.dim(1) * weight.element_size();
  const char* w = static_cast<const char*>(weight.raw_data());
  char* o = static_cast<char*>(out->raw_data());
  for (int64_t i = 0; i < ids.numel(); ++i) {
    int64_t id = ids.IntAt(i);
    if (id < 0 || id >= rows) {
      return Bad(absl::StrCat("embedding id ", id, " (at flat index ", i,
                              ") is out of range for a table of ", rows, " rows"));
    }
    std::memcpy(o + i * row_bytes, w + id * row_bytes, row_bytes);
  }
  return absl::OkStatus();
}

void Cat(const Node& node, const std::vector<const Tensor*>& in, Tensor* out) {
  int dim = *NormalizeDim(IntAttr(node, "dim", 0), out->rank());
  int64_t outer = 1;
  for (int i = 0; i < dim; ++i) outer *= out->dim(i);
  const int e = out->element_size();
  int64_t out_row = NumElements(out->shape()) / std::max<int64_t>(outer, 1) * e;
  char* o = static_cast<char*>(out->raw_data());
  int64_t at = 0;
  for (const Tensor* t : in) {
    int64_t part = outer == 0 ? 0 : t->numel() / outer * e;  // bytes per outer row
    const char* src = static_cast<const char*>(t->raw_data());
    for (int64_t p = 0; p < outer; ++p) {
      std::memcpy(o + p * out_row + at, src + p * part, part);
    }
    at += part;
  }
}

void Tri(const Node& node, const Tensor& x, Tensor* out) {
  const bool upper = node.op() == "triu";
  const int64_t diag = IntAttr(node, "diagonal", 0);
  const int64_t r = x.dim(x.rank() - 2), c = x.dim(x.rank() - 1);
  const int e = x.element_size();
  std::memcpy(out->raw_data(), x.raw_data(), x.byte_size());
  char* o = static_cast<char*>(out->raw_data());
  const int64_t mats = r * c == 0 ? 0 : x.numel() / (r * c);
  for (int64_t m = 0; m < mats; ++m) {
    for (int64_t i = 0; i < r; ++i) {
      for (int64_t j = 0; j < c; ++j) {
        bool keep = upper ? j - i >= diag : j - i <= diag;
        if (!keep) std::memset(o + ((m * r + i) * c + j) * e, 0, e);
      }
    }
  }
}

double ReadAsDouble(const Tensor& t, int64_t i) {
  switch (t.dtype()) {
    case DT_FLOAT32: return t.data()[i];
    case DT_FLOAT16: return HalfToFloat(t.data_as<uint16_t>()[i]);
    case DT_BFLOAT16: return Bf16ToFloat(t.data_as<uint16_t>()[i]);
    case DT_INT64: return static_cast<double>(t.data_as<int64_t>()[i]);
    case DT_INT32: return t.data_as<int32_t>()[i];
    case DT_BOOL: return t.data_as<uint8_t>()[i];
    default: return 0;
  }
}

void WriteFromDouble(Tensor* t, int64_t i, double v) {
  switch (t->dtype()) {
    case DT_FLOAT32: t->data()[i] = static_cast<float>(v); break;
    case DT_FLOAT16: t->data_as<uint16_t>()[i] = FloatToHalf(static_cast<float>(v)); break;
    case DT_BFLOAT16: t->data_as<uint16_t>()[i] = FloatToBf16(static_cast<float>(v)); break;
    // NaN and values outside the type give its lowest, as x86 converts
    // (and so PyTorch on the CPU; the C++ cast is undefined there).
    case DT_INT64:
      t->data_as<int64_t>()[i] = v >= -9.2233720368547758e18 && v < 9.2233720368547758e18
                                     ? static_cast<int64_t>(v)
                                     : INT64_MIN;
      break;
    case DT_INT32:
      t->data_as<int32_t>()[i] =
          v > -2147483649.0 && v < 2147483648.0 ? static_cast<int32_t>(v) : INT32_MIN;
      break;
    case DT_BOOL: t->data_as<uint8_t>()[i] = v != 0; break;
    default: break;
  }
}

void Cast(const Tensor& x, Tensor* out) {
  if (x.dtype() == out->dtype()) {
    std::memcpy(out->raw_data(), x.raw_data(), x.byte_size());
  } else if (x.dtype() == DT_INT64 && out->dtype() == DT_INT32) {
    for (int64_t i = 0; i < x.numel(); ++i) out->data_as<int32_t>()[i] = static_cast<int32_t>(x.data_as<int64_t>()[i]);
  } else if (out->dtype() == DT_INT64 && IsInteger(x.dtype())) {
    for (int64_t i = 0; i < x.numel(); ++i) out->data_as<int64_t>()[i] = x.IntAt(i);
  } else {
    for (int64_t i = 0; i < x.numel(); ++i) WriteFromDouble(out, i, ReadAsDouble(x, i));
  }
}

absl::Status EmbeddingKernel(const Node&, const Args& in, Tensor* out) {
  return Embedding(*in[0], *in[1], out);
}

absl::Status PermuteKernel(const Node& node, const Args& in, Tensor* out) {
  const Tensor& x = *in[0];
  Strides own = ContiguousStrides(x.shape()), st;
  for (int64_t d : ResolvedInts(node, "dims", {}, 0)) st.push_back(own[*NormalizeDim(d, x.rank())]);
  GatherCopy(x, 0, st, out);
  return absl::OkStatus();
}

absl::Status ExpandKernel(const Node&, const Args& in, Tensor* out) {
  GatherCopy(*in[0], 0, BroadcastStrides(in[0]->shape(), out->shape()), out);
  return absl::OkStatus();
}

// slice and select: a strided view of x, copied.
absl::Status SliceKernel(const Node& node, const Args& in, Tensor* out) {
  const StridedView view = SliceView(node, in[0]->shape());  // graph/op_schema.h
  GatherCopy(*in[0], view.offset, view.strides, out);
  return absl::OkStatus();
}

absl::Status CatKernel(const Node& node, const Args& in, Tensor* out) {
  Cat(node, in, out);
  return absl::OkStatus();
}

absl::Status TriKernel(const Node& node, const Args& in, Tensor* out) {
  Tri(node, *in[0], out);
  return absl::OkStatus();
}

// cast and clone: the values converted to the output's type.
absl::Status CastKernel(const Node&, const Args& in, Tensor* out) {
  Cast(*in[0], out);
  return absl::OkStatus();
}

absl::Status ArangeKernel(const Node& node, const Args&, Tensor* out) {
  const int64_t start = IntAttr(node, "start", 0), step = IntAttr(node, "step", 1);
  for (int64_t i = 0; i < out->numel(); ++i) {
    WriteFromDouble(out, i, static_cast<double>(start + i * step));
  }
  return absl::OkStatus();
}

absl::Status FullKernel(const Node& node, const Args&, Tensor* out) {
  if (out->numel() == 0) return absl::OkStatus();
  WriteFromDouble(out, 0, FloatAttr(node, "value", 0));
  const int e = out->element_size();
  char* o = static_cast<char*>(out->raw_data());
  for (int64_t i = 1; i < out->numel(); ++i) std::memcpy(o + i * e, o, e);
  return absl::OkStatus();
}

}  // namespace

namespace cpu_ops {

void RegisterMovementKernels(KernelTable* table) {
  table->kernels["embedding"] = EmbeddingKernel;
  table->kernels["permute"] = PermuteKernel;
  table->kernels["expand"] = ExpandKernel;
  table->kernels["slice"] = SliceKernel;
  table->kernels["select"] = SliceKernel;
  table->kernels["cat"] = CatKernel;
  table->kernels["stack"] = CatKernel;
  table->kernels["triu"] = TriKernel;
  table->kernels["tril"] = TriKernel;
  table->kernels["cast"] = CastKernel;
  table->kernels["clone"] = CastKernel;
  table->kernels["arange"] = ArangeKernel;
  table->kernels["full"] = FullKernel;
}

}  // namespace cpu_ops
}  // namespace pipeserve
