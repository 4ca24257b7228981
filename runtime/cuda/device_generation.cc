#include "runtime/cuda/device_generation.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "runtime/sampler.h"

namespace pipeserve {

DeviceKv::DeviceKv(const LoweredStage& stage) {
  if (stage.cache_layers().empty()) return;
  cache_ = std::make_unique<KvCache>(stage.num_blocks(), stage.block_size());
  for (const LoweredStage::CacheLayer& l : stage.cache_layers()) {
    cache_->AddLayer(l.kv_heads, l.head_dim, l.type);
  }
  block_bytes_ = cache_->BlockBytes();
  written_.assign(std::max<int64_t>(stage.num_blocks(), 0), false);
}

absl::StatusOr<std::optional<KvStep>> DeviceKv::Begin(const DevicePlan& plan,
                                                      absl::Span<const Tensor> inputs) {
  if (cache_ == nullptr) return std::optional<KvStep>();
  const KvInputs& kv = plan.kv;
  absl::StatusOr<KvStep> step = cache_->BeginStep(inputs[kv.positions], inputs[kv.seq],
                                                  inputs[kv.blocks], inputs[kv.seq_ids],
                                                  kv.tokens);
  if (!step.ok()) {
    return absl::Status(step.status().code(),
                        absl::StrCat("cached_attention: ", step.status().message()));
  }
  return std::optional<KvStep>(*std::move(step));
}

void DeviceKv::Abort(const std::optional<KvStep>& step) {
  if (cache_ != nullptr && step.has_value()) cache_->AbortStep(*step);
}

void DeviceKv::Commit(const std::optional<KvStep>& step) {
  if (cache_ == nullptr || !step.has_value()) return;
  for (size_t t = 0; t < step->positions.size(); ++t) {
    const std::vector<int64_t>& table = step->tables[step->seq[t]];
    const int64_t block = table[step->positions[t] / cache_->block_size()];
    if (!written_[block]) {
      written_[block] = true;
      blocks_written_.fetch_add(1, std::memory_order_relaxed);
    }
  }
}

KvCacheUsage DeviceKv::usage() const {
  if (cache_ == nullptr) return {};
  return {cache_->num_blocks(), blocks_written_.load(std::memory_order_relaxed), block_bytes_};
}

absl::Status CheckSampleInputs(const DevicePlan& plan, absl::Span<const Tensor> inputs) {
  for (const SampleCheck& c : plan.sample_checks) {
    const Tensor& ends = inputs[c.ends];
    absl::Status s = CheckSampleRows(inputs[c.floats].data(), inputs[c.ints].data_as<int64_t>(),
                                     ends.data_as<int64_t>(), ends.numel(),
                                     inputs[c.context].numel(), c.vocab);
    if (!s.ok()) {
      return absl::Status(s.code(), absl::StrCat("node \"", c.node, "\" (sample_tokens): ",
                                                 s.message()));
    }
  }
  return absl::OkStatus();
}

}  // namespace pipeserve
