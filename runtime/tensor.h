// A dense tensor: an element type, a shape and a shared, 64-byte-aligned
// buffer. float32 unless made with another DataType.
//
// Copies are shallow (they share the buffer), as with torch.Tensor; weights
// loaded from a model file are views into the file's buffer.
//
//   Tensor x = Tensor::Empty({16, 512});
//   x.data()[0] = 1.0f;
//   Tensor y = x;               // same storage
//   Tensor z = x.Clone();       // new storage
//   Tensor ids = Tensor::Empty({2, 7}, DT_INT64);
//   ids.data_as<int64_t>()[0] = 50256;
#ifndef PIPESERVE_RUNTIME_TENSOR_H_
#define PIPESERVE_RUNTIME_TENSOR_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "proto/model.pb.h"
#include "graph/dtype.h"
#include "graph/shape.h"

namespace pipeserve {

class Tensor {
 public:
  // An empty (rank-0 placeholder) tensor with no storage.
  Tensor() = default;

  // Uninitialised contents, 64-byte aligned. `shape` must be checked.
  static Tensor Empty(Shape shape, DataType dtype = DT_FLOAT32);
  // The same for a shape from outside: kInvalidArgument (see
  // CheckedByteSize) or kResourceExhausted when the memory is not there.
  static absl::StatusOr<Tensor> TryEmpty(Shape shape, DataType dtype = DT_FLOAT32);
  static Tensor Zeros(Shape shape, DataType dtype = DT_FLOAT32);
  static Tensor FromVector(Shape shape, const std::vector<float>& values);
  static Tensor FromInt64s(Shape shape, const std::vector<int64_t>& values);
  // A rank-0 int64 tensor (a symbolic size in a graph).
  static Tensor Scalar(int64_t value);
  // A view of `data` (numel(shape) elements of `dtype`) kept alive by `owner`.
  static Tensor Wrap(std::shared_ptr<const void> owner, void* data,
                     Shape shape, DataType dtype = DT_FLOAT32);

  const Shape& shape() const { return shape_; }
  int64_t dim(int i) const { return shape_[i]; }
  int rank() const { return static_cast<int>(shape_.size()); }
  int64_t numel() const { return numel_; }
  DataType dtype() const { return dtype_; }
  int element_size() const { return ElementSize(dtype_); }
  int64_t byte_size() const { return numel_ * ElementSize(dtype_); }
  bool defined() const { return data_ != nullptr || numel_ == 0; }

  // The elements as float32: only for DT_FLOAT32 tensors.
  float* data() const { return static_cast<float*>(data_); }
  void* raw_data() const { return data_; }
  template <typename T>
  T* data_as() const { return static_cast<T*>(data_); }

  // The element at flat index i of an integer or bool tensor, as int64.
  int64_t IntAt(int64_t i) const;

  // A deep copy.
  Tensor Clone() const;

  // True when no other Tensor shares this storage, so it may be reused.
  bool SoleOwner() const { return owner_ != nullptr && owner_.use_count() == 1; }

  // The same storage viewed with another shape of no more elements.
  Tensor Reshaped(Shape shape) const;
  // The same storage viewed as another type of the same element size, or
  // of no more bytes (reuse of a scratch buffer).
  Tensor Retyped(DataType dtype, Shape shape) const;

  // The object keeping the storage alive (to hand to zero-copy I/O).
  const std::shared_ptr<const void>& storage() const { return owner_; }

  // Bytes of storage this tensor may use from data() on (its capacity).
  int64_t capacity_bytes() const { return capacity_; }

  // Rows [begin, end) of dim 0, as a view that shares storage (rows are
  // contiguous in row-major layout).
  Tensor SliceRows(int64_t begin, int64_t end) const;

 private:
  Tensor(std::shared_ptr<const void> owner, void* data, Shape shape,
         DataType dtype);

  std::shared_ptr<const void> owner_;
  int64_t capacity_ = 0;
  void* data_ = nullptr;
  DataType dtype_ = DT_FLOAT32;
  Shape shape_;
  int64_t numel_ = 0;
};

// Allocates `bytes` bytes aligned to 64, freed when the last owner goes.
// Throws std::bad_alloc when out of memory; TryAllocateAligned returns null.
std::shared_ptr<void> AllocateAligned(size_t bytes);
std::shared_ptr<void> TryAllocateAligned(size_t bytes);

}  // namespace pipeserve

#endif  // PIPESERVE_RUNTIME_TENSOR_H_
