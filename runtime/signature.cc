#include "runtime/signature.h"

#include "absl/strings/str_cat.h"

namespace pipeserve {

absl::StatusOr<int64_t> CheckTensorsMatch(
    const google::protobuf::RepeatedPtrField<ValueSpec>& specs,
    absl::Span<const Tensor> tensors) {
  if (static_cast<size_t>(specs.size()) != tensors.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "expected ", specs.size(), " inputs, got ", tensors.size()));
  }
  int64_t batch = -1;
  for (int i = 0; i < specs.size(); ++i) {
    const ValueSpec& spec = specs.Get(i);
    const Tensor& t = tensors[i];
    DataType want_type = spec.dtype() == DT_INVALID ? DT_FLOAT32 : spec.dtype();
    if (t.dtype() != want_type) {
      return absl::InvalidArgumentError(absl::StrCat(
          "input \"", spec.name(), "\": dtype ", TorchName(t.dtype()), " (", KServeName(t.dtype()),
          ") does not match the model's ", TorchName(want_type), " (", KServeName(want_type), ")"));
    }
    // A shape with a 0 beside huge dimensions holds nothing, yet kernels
    // would walk all of it.
    if (absl::Status extent = CheckDataExtent(t.shape()); !extent.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("input \"", spec.name(), "\": ", extent.message()));
    }
    bool ok = t.rank() == spec.shape_size();
    for (int d = 0; ok && d < t.rank(); ++d) {
      int64_t want = spec.shape(d);
      if (want >= 0) {
        ok = t.dim(d) == want;
      } else if (d != 0 || !spec.batched()) {
        // Another free dimension (a sequence length): any size.
      } else if (batch < 0) {
        batch = t.dim(d);
      } else {
        ok = t.dim(d) == batch;
      }
    }
    if (!ok) {
      return absl::InvalidArgumentError(absl::StrCat(
          "input \"", spec.name(), "\": shape ", ShapeToString(t.shape()),
          " does not match ",
          ShapeToString(Shape(spec.shape().begin(), spec.shape().end())),
          batch >= 0 ? absl::StrCat(" (batch ", batch, ")") : ""));
    }
  }
  return batch;
}

}  // namespace pipeserve
