// Splitting a batch into microbatches and merging the results, with the
// semantics of torch.distributed.pipelining (TensorChunkSpec(0)):
// torch.tensor_split along dim 0, so the real chunk count is
// min(batch, chunks) and the first batch % n chunks get one more row;
// non-batched inputs are replicated to every chunk; outputs are
// concatenated along dim 0.
//
//   ChunkSizes(37, 4)  // {10, 9, 9, 9}
#ifndef PIPESERVE_RUNTIME_MICROBATCH_H_
#define PIPESERVE_RUNTIME_MICROBATCH_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "runtime/tensor.h"

namespace pipeserve {

// Rows in each chunk when `batch` rows are split into `chunks` chunks.
std::vector<int64_t> ChunkSizes(int64_t batch, int chunks);

// Splits `inputs` (batched[i] says which are split; the rest are shared by
// every chunk) into microbatches: result[m][i] is input i of microbatch m.
// The slices share storage with the inputs. kInvalidArgument when batched
// inputs disagree on dim 0 or chunks < 1.
absl::StatusOr<std::vector<std::vector<Tensor>>> SplitMicrobatches(
    absl::Span<const Tensor> inputs, const std::vector<bool>& batched,
    int chunks);

// Concatenates along dim 0; the other dimensions must agree.
absl::StatusOr<Tensor> ConcatRows(absl::Span<const Tensor> parts);

// Merges per-microbatch outputs: outs[m][j] is output j of microbatch m.
// Batched outputs (batched[j]) are concatenated along dim 0; the others are
// the same in every microbatch, so microbatch 0's is returned.
absl::StatusOr<std::vector<Tensor>> MergeMicrobatches(
    const std::vector<bool>& batched,
    const std::vector<std::vector<Tensor>>& outs);

}  // namespace pipeserve

#endif  // PIPESERVE_RUNTIME_MICROBATCH_H_
