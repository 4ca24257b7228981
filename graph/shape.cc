#include "graph/shape.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace pipeserve {

int64_t NumElements(absl::Span<const int64_t> shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::vector<int64_t> BroadcastStridesIn(absl::Span<const int64_t> shape, int rank) {
  std::vector<int64_t> strides(rank, 0);
  int64_t st = 1;
  for (int i = rank - 1, j = static_cast<int>(shape.size()) - 1; j >= 0; --i, --j) {
    strides[i] = shape[j] == 1 ? 0 : st;
    st *= shape[j];
  }
  return strides;
}

namespace {

// A checked shape's element count, n, and its extent: the count with
// every 0 taken as 1, so a 0 dimension does not hide huge ones beside it
// ([0, 2^63-1]).
struct Counts {
  uint64_t n = 1;
  uint64_t extent = 1;
};

absl::StatusOr<Counts> Count(absl::Span<const int64_t> shape) {
  if (shape.size() > static_cast<size_t>(kMaxRank)) {
    return absl::InvalidArgumentError(absl::StrCat("shape has ", shape.size(),
                                                   " dimensions (at most ", kMaxRank, ")"));
  }
  Counts c;
  for (int64_t d : shape) {
    if (d < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("shape ", ShapeToString(shape), " has a negative dimension"));
    }
    const uint64_t e = d == 0 ? 1 : static_cast<uint64_t>(d);
    // extent * e > kMaxElements, without overflowing (n <= extent).
    if (c.extent > kMaxElements / e) {
      return absl::InvalidArgumentError(absl::StrCat(
          "shape ", ShapeToString(shape), " has more than 2^62 elements (counting a 0 as 1)"));
    }
    c.extent *= e;
    c.n *= static_cast<uint64_t>(d);
  }
  return c;
}

}  // namespace

absl::StatusOr<uint64_t> CheckedElementCount(absl::Span<const int64_t> shape) {
  absl::StatusOr<Counts> c = Count(shape);
  if (!c.ok()) return c.status();
  return c->n;
}

uint64_t ShapeExtent(absl::Span<const int64_t> shape) {
  uint64_t extent = 1;
  for (int64_t d : shape) extent *= d <= 0 ? 1 : static_cast<uint64_t>(d);
  return extent;
}

absl::Status CheckDataExtent(absl::Span<const int64_t> shape) {
  absl::StatusOr<Counts> c = Count(shape);
  if (!c.ok()) return c.status();
  // A shape with elements is bounded by the data that came with it.
  if (c->n > 0 || c->extent <= kMaxDataExtent) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(
      "shape ", ShapeToString(shape), " spans more than 2^31 positions (counting a 0 as 1); "
      "no tensor a message carries is that large"));
}

absl::StatusOr<uint64_t> CheckedByteSize(absl::Span<const int64_t> shape,
                                         uint64_t element_bytes) {
  absl::StatusOr<uint64_t> n = CheckedElementCount(shape);
  if (!n.ok()) return n.status();
  if (element_bytes != 0 && *n > kMaxElements / element_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "shape ", ShapeToString(shape), " needs more than 2^62 bytes"));
  }
  return *n * element_bytes;
}

absl::StatusOr<uint64_t> CheckedDataByteSize(absl::Span<const int64_t> shape,
                                             uint64_t element_bytes) {
  absl::StatusOr<uint64_t> bytes = CheckedByteSize(shape, element_bytes);
  // An empty tensor's shape is backed by no bytes: bound what it spans.
  if (bytes.ok() && *bytes == 0) {
    if (absl::Status extent = CheckDataExtent(shape); !extent.ok()) return extent;
  }
  return bytes;
}

std::string ShapeToString(absl::Span<const int64_t> shape) {
  return absl::StrCat(
      "[",
      absl::StrJoin(shape, ",",
                    [](std::string* out, int64_t d) {
                      absl::StrAppend(out, d < 0 ? std::string("B")
                                                 : absl::StrCat(d));
                    }),
      "]");
}

}  // namespace pipeserve
