#include "runtime/tensor.h"

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace pipeserve {

std::shared_ptr<void> TryAllocateAligned(size_t bytes) {
  // aligned_alloc wants a multiple of the alignment; never ask for 0.
  if (bytes > SIZE_MAX - 64) return nullptr;
  size_t rounded = ((bytes + 63) / 64) * 64;
  if (rounded == 0) rounded = 64;
  void* p = std::aligned_alloc(64, rounded);
  if (p == nullptr) return nullptr;
  return std::shared_ptr<void>(p, [](void* q) { std::free(q); });
}

std::shared_ptr<void> AllocateAligned(size_t bytes) {
  std::shared_ptr<void> p = TryAllocateAligned(bytes);
  if (p == nullptr) throw std::bad_alloc();
  return p;
}

Tensor::Tensor(std::shared_ptr<const void> owner, void* data, Shape shape,
               DataType dtype)
    : owner_(std::move(owner)),
      data_(data),
      dtype_(dtype),
      shape_(std::move(shape)),
      numel_(NumElements(shape_)) {
  capacity_ = numel_ * ElementSize(dtype_);
}

Tensor Tensor::Reshaped(Shape shape) const {
  Tensor t(owner_, data_, std::move(shape), dtype_);
  t.capacity_ = capacity_;
  return t;
}

Tensor Tensor::Retyped(DataType dtype, Shape shape) const {
  Tensor t(owner_, data_, std::move(shape), dtype);
  t.capacity_ = capacity_;
  return t;
}

Tensor Tensor::Empty(Shape shape, DataType dtype) {
  int64_t n = NumElements(shape);
  std::shared_ptr<void> buf =
      AllocateAligned(static_cast<size_t>(n) * ElementSize(dtype));
  void* data = buf.get();
  return Tensor(std::move(buf), data, std::move(shape), dtype);
}

absl::StatusOr<Tensor> Tensor::TryEmpty(Shape shape, DataType dtype) {
  absl::StatusOr<uint64_t> bytes = CheckedByteSize(shape, ElementSize(dtype));
  if (!bytes.ok()) return bytes.status();
  std::shared_ptr<void> buf = TryAllocateAligned(*bytes);
  if (buf == nullptr) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "cannot allocate ", *bytes, " bytes for a tensor of shape ", ShapeToString(shape)));
  }
  void* data = buf.get();
  return Tensor(std::move(buf), data, std::move(shape), dtype);
}

Tensor Tensor::Zeros(Shape shape, DataType dtype) {
  Tensor t = Empty(std::move(shape), dtype);
  std::memset(t.raw_data(), 0, t.byte_size());
  return t;
}

Tensor Tensor::FromVector(Shape shape, const std::vector<float>& values) {
  Tensor t = Empty(std::move(shape));
  std::memcpy(t.data(), values.data(),
              std::min<size_t>(values.size(), t.numel()) * 4);
  return t;
}

Tensor Tensor::FromInt64s(Shape shape, const std::vector<int64_t>& values) {
  Tensor t = Empty(std::move(shape), DT_INT64);
  const size_t n = std::min<size_t>(values.size(), t.numel());
  if (n > 0) std::memcpy(t.raw_data(), values.data(), n * 8);  // never memcpy from null
  return t;
}

Tensor Tensor::Scalar(int64_t value) { return FromInt64s({}, {value}); }

Tensor Tensor::Wrap(std::shared_ptr<const void> owner, void* data, Shape shape,
                    DataType dtype) {
  return Tensor(std::move(owner), data, std::move(shape), dtype);
}

int64_t Tensor::IntAt(int64_t i) const {
  switch (dtype_) {
    case DT_INT64: return data_as<int64_t>()[i];
    case DT_INT32: return data_as<int32_t>()[i];
    case DT_BOOL: return data_as<uint8_t>()[i];
    case DT_FLOAT32: return static_cast<int64_t>(data()[i]);
    default: return 0;
  }
}

Tensor Tensor::Clone() const {
  Tensor t = Empty(shape_, dtype_);
  if (numel_ > 0) std::memcpy(t.raw_data(), data_, byte_size());
  return t;
}

Tensor Tensor::SliceRows(int64_t begin, int64_t end) const {
  Shape s = shape_;
  s[0] = end - begin;
  int64_t row = shape_[0] == 0 ? 0 : numel_ / shape_[0];
  return Tensor(owner_, static_cast<char*>(data_) + begin * row * ElementSize(dtype_),
                std::move(s), dtype_);
}

}  // namespace pipeserve
