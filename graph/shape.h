// Shapes: a tensor's dimensions, with -1 for one only a run decides (a
// batch, a sequence length). The graph layer's own type, shared by the
// op schemas, the validator, the partitioner and every backend; the
// overflow-checked counts every shape from outside goes through.
#ifndef PIPESERVE_GRAPH_SHAPE_H_
#define PIPESERVE_GRAPH_SHAPE_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace pipeserve {

using Shape = std::vector<int64_t>;

// Number of elements of a shape with no negative (symbolic) dimension.
// Only for shapes already checked with CheckedElementCount: it does not
// check for overflow.
int64_t NumElements(absl::Span<const int64_t> shape);

// Strides of a contiguous operand of `shape` in the index space of an
// output of `rank` dims (shapes aligned at the right); 0 along its
// broadcast dimensions.
std::vector<int64_t> BroadcastStridesIn(absl::Span<const int64_t> shape, int rank);

// Shapes that come from outside (requests, model files, frames, stage
// specs) go through these before anything is allocated or indexed. The
// one place element counts and byte sizes are computed with overflow
// checks. kInvalidArgument, naming the shape, for a negative dimension,
// more than kMaxRank dimensions, or more than kMaxElements elements (or
// bytes), counting a 0 dimension as 1 (a kernel walks the other
// dimensions of an empty tensor all the same: see ShapeExtent).
inline constexpr int kMaxRank = 32;
inline constexpr uint64_t kMaxElements = uint64_t{1} << 62;
absl::StatusOr<uint64_t> CheckedElementCount(absl::Span<const int64_t> shape);
absl::StatusOr<uint64_t> CheckedByteSize(absl::Span<const int64_t> shape,
                                         uint64_t element_bytes);

// The product of max(d, 1) over a checked shape: how many times a kernel
// walking its dimensions may loop, elements or none ([2^40, 0] holds no
// element, yet an attention over it loops 2^40 times).
uint64_t ShapeExtent(absl::Span<const int64_t> shape);

// Shapes that arrive with their data (a request's inputs, a frame's
// tensors) bound that extent too: no tensor a message can carry (2 GiB at
// most) has more than kMaxDataExtent elements, so a larger extent can only
// come from a 0 dimension beside huge ones. OK for a shape with elements
// (its data bounds it); else kInvalidArgument naming the shape.
inline constexpr uint64_t kMaxDataExtent = uint64_t{1} << 31;
absl::Status CheckDataExtent(absl::Span<const int64_t> shape);
// CheckedByteSize for a shape that arrives with its bytes: an empty one
// also within kMaxDataExtent.
absl::StatusOr<uint64_t> CheckedDataByteSize(absl::Span<const int64_t> shape,
                                             uint64_t element_bytes);

// "[16,512]"; a batch dimension (-1) prints as "B".
std::string ShapeToString(absl::Span<const int64_t> shape);

}  // namespace pipeserve

#endif  // PIPESERVE_GRAPH_SHAPE_H_
