#include "runtime/cpu/ops/internal.h"

#include "graph/dtype.h"
#include "graph/shape.h"
#include "runtime/cpu/cpu_kernels.h"

namespace pipeserve::cpu_ops {

Strides BroadcastStrides(const Shape& in, const Shape& out) {
  return BroadcastStridesIn(in, static_cast<int>(out.size()));
}

void GatherCopy(const Tensor& in, int64_t base, const Strides& st, Tensor* out) {
  const char* src = static_cast<const char*>(in.raw_data());
  char* dst = static_cast<char*>(out->raw_data());
  const int e = in.element_size();
  const Shape& shape = out->shape();
  if (!shape.empty() && st.back() == 1 && shape.back() > 1) {
    // Rows contiguous in the input: one memcpy per row.
    const int64_t inner = shape.back();
    Shape rows(shape.begin(), shape.end() - 1);
    std::array<Strides, 1> rs = {Strides(st.begin(), st.end() - 1)};
    Iterate<1>(rows, rs, [&](int64_t o, const std::array<int64_t, 1>& f) {
      std::memcpy(dst + o * inner * e, src + (base + f[0]) * e, inner * e);
    });
    return;
  }
  std::array<Strides, 1> s = {st};
  switch (e) {
#define PIPESERVE_GATHER(BYTES, T)                                                \
  case BYTES:                                                                     \
    Iterate<1>(out->shape(), s, [&](int64_t o, const std::array<int64_t, 1>& f) { \
      reinterpret_cast<T*>(dst)[o] = reinterpret_cast<const T*>(src)[base + f[0]]; \
    });                                                                           \
    break;
    PIPESERVE_GATHER(1, uint8_t)
    PIPESERVE_GATHER(2, uint16_t)
    PIPESERVE_GATHER(4, uint32_t)
    PIPESERVE_GATHER(8, uint64_t)
#undef PIPESERVE_GATHER
  }
}

absl::StatusOr<Tensor> Output(const Shape& shape, DataType type, const Tensor& scratch) {
  absl::StatusOr<uint64_t> bytes = CheckedByteSize(shape, ElementSize(type));
  if (!bytes.ok()) return bytes.status();
  if (scratch.SoleOwner() && static_cast<uint64_t>(scratch.capacity_bytes()) >= *bytes) {
    return scratch.Retyped(type, shape);
  }
  return Tensor::TryEmpty(shape, type);
}

absl::Status Bad(absl::string_view what) { return absl::InvalidArgumentError(what); }

bool IsHalf(DataType t) { return t == DT_FLOAT16 || t == DT_BFLOAT16; }

bool AllOfType(DataType type, const std::vector<const Tensor*>& in, DataType out_type) {
  bool all = out_type == type;
  for (const Tensor* t : in) all = all && t->dtype() == type;
  return all;
}

bool IsTrailingBlock(const Shape& s, const Shape& out) {
  size_t first = 0;
  while (first < s.size() && s[first] == 1) ++first;
  const size_t n = s.size() - first;
  if (n == 0 || n > out.size()) return false;
  return std::equal(s.begin() + first, s.end(), out.end() - n);
}

PIPESERVE_VECTOR_CLONES
void WidenBf16(const uint16_t* a, int64_t n, float* o) {
  for (int64_t i = 0; i < n; ++i) o[i] = Bf16ToFloat(a[i]);
}

PIPESERVE_VECTOR_CLONES
void NarrowToBf16(const float* a, int64_t n, uint16_t* o) {
  for (int64_t i = 0; i < n; ++i) o[i] = FloatToBf16(a[i]);
}

}  // namespace pipeserve::cpu_ops
