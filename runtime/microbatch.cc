#include "runtime/microbatch.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace pipeserve {

std::vector<int64_t> ChunkSizes(int64_t batch, int chunks) {
  int64_t n = std::min<int64_t>(batch, std::max(chunks, 1));
  std::vector<int64_t> sizes;
  for (int64_t i = 0; i < n; ++i) {
    sizes.push_back(batch / n + (i < batch % n ? 1 : 0));
  }
  return sizes;
}

absl::StatusOr<std::vector<std::vector<Tensor>>> SplitMicrobatches(
    absl::Span<const Tensor> inputs, const std::vector<bool>& batched,
    int chunks) {
  if (chunks < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("microbatch count must be >= 1, got ", chunks));
  }
  int64_t batch = -1;
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (!batched[i]) continue;
    if (inputs[i].rank() == 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("batched input #", i, " is a scalar"));
    }
    if (batch >= 0 && inputs[i].dim(0) != batch) {
      return absl::InvalidArgumentError(absl::StrCat(
          "batched inputs disagree on the batch size: ", batch, " and ",
          inputs[i].dim(0), " (input #", i, ")"));
    }
    batch = inputs[i].dim(0);
  }
  std::vector<std::vector<Tensor>> out;
  if (batch < 0) {  // nothing to split: one microbatch
    out.emplace_back(inputs.begin(), inputs.end());
    return out;
  }
  int64_t begin = 0;
  for (int64_t rows : ChunkSizes(batch, chunks)) {
    std::vector<Tensor> mb;
    for (size_t i = 0; i < inputs.size(); ++i) {
      mb.push_back(batched[i] ? inputs[i].SliceRows(begin, begin + rows)
                              : inputs[i]);
    }
    out.push_back(std::move(mb));
    begin += rows;
  }
  return out;
}

absl::StatusOr<Tensor> ConcatRows(absl::Span<const Tensor> parts) {
  if (parts.empty()) return absl::InvalidArgumentError("nothing to concatenate");
  if (parts.size() == 1) return parts[0];
  Shape shape = parts[0].shape();
  if (shape.empty()) {
    return absl::InvalidArgumentError("cannot concatenate scalars along dim 0");
  }
  int64_t rows = 0;
  for (const Tensor& p : parts) {
    Shape rest_a(shape.begin() + 1, shape.end());
    Shape rest_b(p.shape().begin() + std::min<size_t>(1, p.shape().size()),
                 p.shape().end());
    if (p.rank() != static_cast<int>(shape.size()) || rest_a != rest_b ||
        p.dtype() != parts[0].dtype()) {
      return absl::InvalidArgumentError(
          absl::StrCat("cannot concatenate ", ShapeToString(p.shape()),
                       " with ", ShapeToString(shape), " along dim 0"));
    }
    rows += p.dim(0);
  }
  shape[0] = rows;
  // Rows from several requests or microbatches may add up to more memory
  // than there is: kResourceExhausted, not a crash.
  absl::StatusOr<Tensor> joined = Tensor::TryEmpty(shape, parts[0].dtype());
  if (!joined.ok()) return joined.status();
  Tensor out = *std::move(joined);
  char* dst = static_cast<char*>(out.raw_data());
  for (const Tensor& p : parts) {
    if (p.numel() > 0) std::memcpy(dst, p.raw_data(), p.byte_size());
    dst += p.byte_size();
  }
  return out;
}

absl::StatusOr<std::vector<Tensor>> MergeMicrobatches(
    const std::vector<bool>& batched,
    const std::vector<std::vector<Tensor>>& outs) {
  if (outs.empty()) return absl::InvalidArgumentError("no microbatches to merge");
  for (size_t m = 0; m < outs.size(); ++m) {
    if (outs[m].size() != batched.size()) {
      return absl::InvalidArgumentError(absl::StrCat("microbatch ", m, " has ", outs[m].size(),
                                                     " outputs, expected ", batched.size()));
    }
  }
  std::vector<Tensor> result;
  for (size_t j = 0; j < batched.size(); ++j) {
    if (!batched[j] || outs.size() == 1) {
      result.push_back(outs[0][j]);
      continue;
    }
    std::vector<Tensor> parts;
    for (const auto& o : outs) parts.push_back(o[j]);
    absl::StatusOr<Tensor> merged = ConcatRows(parts);
    if (!merged.ok()) return merged.status();
    result.push_back(*std::move(merged));
  }
  return result;
}

}  // namespace pipeserve
