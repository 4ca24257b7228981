// Checking tensors against a list of ValueSpecs (a model's or a stage's
// inputs), with one shared batch size for the -1 dimensions.
//
//   ASSIGN_OR_RETURN(int64_t batch, CheckTensorsMatch(graph.inputs(), {x, y}));
#ifndef PIPESERVE_RUNTIME_SIGNATURE_H_
#define PIPESERVE_RUNTIME_SIGNATURE_H_

#include <cstdint>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "google/protobuf/repeated_field.h"
#include "proto/model.pb.h"
#include "runtime/tensor.h"

namespace pipeserve {

// Returns the batch size (-1 when no spec has a batch dimension), or
// kInvalidArgument naming the first input whose count, rank or dimensions
// do not match: `input "y": shape [16,256] does not match [B,512] (batch 16)`.
absl::StatusOr<int64_t> CheckTensorsMatch(
    const google::protobuf::RepeatedPtrField<ValueSpec>& specs,
    absl::Span<const Tensor> tensors);

}  // namespace pipeserve

#endif  // PIPESERVE_RUNTIME_SIGNATURE_H_
