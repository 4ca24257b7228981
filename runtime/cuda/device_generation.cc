#include "runtime/cuda/device_generation.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "runtime/cpu/cpu_ops.h"
#include "runtime/cuda/kernels/launch_args.h"
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

bool NeedsLogits(const DevicePlan& plan, absl::Span<const Tensor> inputs) {
  for (const HostStep& h : plan.host_steps) {
    if (h.tokens_read < 0 || h.inputs.size() < 2 || h.inputs[1].graph_input < 0) return true;
    const Tensor& floats = inputs[h.inputs[1].graph_input];  // [n, 4]
    if (floats.dtype() != DT_FLOAT32 || floats.rank() != 2 || floats.dim(1) != 4) return true;
    for (int64_t r = 0; r < floats.dim(0); ++r) {
      SamplingParams p;
      p.temperature = floats.data()[r * 4];
      p.repetition_penalty = floats.data()[r * 4 + 2];
      p.frequency_penalty = floats.data()[r * 4 + 3];
      if (!PlainGreedy(p)) return true;
    }
  }
  return false;
}

namespace {

// A value copied back, as a host tensor.
Tensor ReadBack(const DevicePlan& plan, const char* staging_out, int read) {
  const StagedValue& sv = plan.host_reads[read];
  Tensor t = Tensor::Empty(sv.shape, sv.dtype);
  if (t.numel() > 0) std::memcpy(t.raw_data(), staging_out + sv.staging.offset, t.byte_size());
  return t;
}

// sample_tokens with the device's greedy picks: the CPU's checks of the
// sampling inputs (floats, ints, context, context ends), then the picks.
absl::StatusOr<Tensor> DevicePicks(const DevicePlan& plan, const HostStep& h, const char* staging_out,
                                   absl::Span<const Tensor> inputs) {
  auto in = [&](int k) -> const Tensor& { return inputs[h.inputs[k].graph_input]; };
  const Shape& logits = plan.host_reads[h.inputs[0].read].shape;
  RETURN_IF_ERROR(SampleRows(in(1).data(), in(2).data_as<int64_t>(), in(4).data_as<int64_t>(),
                             logits[0], in(3).numel(), logits[1])
                      .status());
  return ReadBack(plan, staging_out, h.tokens_read);
}

absl::StatusOr<Tensor> HostStepOutput(const DevicePlan& plan, const HostStep& h,
                                      const char* staging_out, absl::Span<const Tensor> inputs,
                                      bool logits_back) {
  if (!logits_back) return DevicePicks(plan, h, staging_out, inputs);
  std::vector<Tensor> reads;
  std::vector<const Tensor*> in;
  reads.reserve(h.inputs.size());
  for (const HostStep::Input& i : h.inputs) {
    if (i.graph_input >= 0) {
      in.push_back(&inputs[i.graph_input]);
      continue;
    }
    reads.push_back(ReadBack(plan, staging_out, i.read));
    in.push_back(&reads.back());
  }
  return RunCpuOp(h.node, in, h.out_shape, h.out_type, Tensor());
}

}  // namespace

absl::Status RunHostSteps(const DevicePlan& plan, const void* staging_out,
                          absl::Span<const Tensor> inputs, bool logits_back,
                          std::vector<Tensor>* outputs) {
  const char* base = static_cast<const char*>(staging_out);
  for (const HostStep& h : plan.host_steps) {
    absl::StatusOr<Tensor> out = HostStepOutput(plan, h, base, inputs, logits_back);
    if (!out.ok()) {
      return absl::Status(out.status().code(), absl::StrCat("node \"", h.node.name(), "\" (",
                                                            h.node.op(), "): ",
                                                            out.status().message()));
    }
    for (int o : h.outputs) (*outputs)[o] = *out;
  }
  return absl::OkStatus();
}

}  // namespace pipeserve
