// The CPU kernel of the generation op sample_tokens: each sequence's next
// token picked inside the stage from its logits row (a stage exported with
// export(generation=True)).
#include "absl/strings/str_cat.h"
#include "absl/types/span.h"
#include "common/status_macros.h"
#include "runtime/cpu/cpu_ops.h"
#include "runtime/cpu/ops/internal.h"
#include "runtime/cpu/ops/kernel_table.h"
#include "runtime/sampler.h"

namespace pipeserve {
namespace {

using cpu_ops::Args;
using cpu_ops::Output;

// sample_tokens (graph/op_schema.cc): each sequence's next token from
// its logits row, as the coordinator would sample it (runtime/sampler.h).
absl::StatusOr<Tensor> SampleTokens(const Node&, const Args& in, const Shape& out_shape,
                                    const Tensor& scratch) {
  const Tensor logits = ToFloat32(*in[0]);
  const int64_t n = logits.dim(0), vocab = logits.dim(1), context = in[3]->numel();
  const float* floats = in[1]->data();
  const int64_t* ints = in[2]->data_as<int64_t>();
  const int64_t* ends = in[4]->data_as<int64_t>();
  ASSIGN_OR_RETURN(Tensor out, Output(out_shape, DT_INT64, scratch));
  ASSIGN_OR_RETURN(const std::vector<SamplingParams> rows,
                   SampleRows(floats, ints, ends, n, context, vocab));
  for (int64_t i = 0; i < n; ++i) {
    const int64_t begin = i == 0 ? 0 : ends[i - 1];
    const absl::Span<const int64_t> seen =
        ends[i] > begin ? absl::MakeConstSpan(in[3]->data_as<int64_t>() + begin, ends[i] - begin)
                        : absl::Span<const int64_t>();  // (an empty context may have no data)
    out.data_as<int64_t>()[i] = SampleToken(absl::MakeConstSpan(logits.data() + i * vocab, vocab),
                                            rows[i], seen, ints[i * 3 + 2]);
  }
  return out;
}

}  // namespace

namespace cpu_ops {

// sample_tokens reads its logits in whatever float type they come (widened
// here), so it runs before RunCpuOp's dtype dispatch.
void RegisterGenerationKernels(KernelTable* table) {
  table->runners["sample_tokens"] = SampleTokens;
}

}  // namespace cpu_ops
}  // namespace pipeserve
