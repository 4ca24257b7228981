// LoweredStage's generation steps (device_plan.h): cached_attention on a KV
// cache kept in device memory across runs (kernels/paged_attention.h; the
// host checks each step's metadata first, as the CPU cache does), and
// sample_tokens picking on the device (kernels/sample.h), so only the
// token ids come back.
#include <algorithm>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "graph/op_schema.h"
#include "common/status_macros.h"
#include "runtime/cuda/device_plan.h"

namespace pipeserve {

int LoweredStage::GraphInputOf(int v) const {
  while (values_[v].view_of >= 0) v = values_[v].view_of;
  return values_[v].input;
}

bool LoweredStage::IsSampled(int v) const {
  const int p = values_[v].producer;
  return p >= 0 && steps_[p].kind == Kind::kSample;
}

// The cache metadata must come straight from the stage's inputs (the host
// checks them before the step), the same ones for every layer; head_dim
// fits the kernel's tiles. Lays out the layer's cache.
absl::Status LoweredStage::CheckAttention(const Node& node, Step* step) {
  auto refuse = [&](const std::string& why) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the cuda backend cannot run node \"", node.name(), "\" (cached_attention): ", why,
        " (serve this model with --device=cpu)"));
  };
  KvInputs kv;
  int* fields[] = {&kv.positions, &kv.seq, &kv.blocks, &kv.seq_ids};
  for (int i = 0; i < 4; ++i) {
    *fields[i] = GraphInputOf(step->in[3 + i]);
    if (*fields[i] < 0) return refuse("its cache metadata must be inputs of the stage");
  }
  if (!cache_layers_.empty() &&
      (kv.positions != kv_inputs_.positions || kv.seq != kv_inputs_.seq ||
       kv.blocks != kv_inputs_.blocks || kv.seq_ids != kv_inputs_.seq_ids)) {
    return refuse("every layer must read the same cache metadata");
  }
  kv_inputs_ = kv;
  const int head_dim = static_cast<int>(IntAttr(node, "head_dim", 0));
  const int kv_heads = static_cast<int>(IntAttr(node, "kv_heads", 0));
  const int64_t heads = IntAttr(node, "heads", 0);
  if (head_dim <= 0 || head_dim > kernels::kMaxHeadDim || kv_heads <= 0 || heads <= 0 ||
      heads % kv_heads != 0) {
    return refuse(absl::StrCat("head_dim ", head_dim, " (the kernel takes 1 to ",
                               kernels::kMaxHeadDim, "), heads ", heads, " and kv_heads ",
                               kv_heads, " (a multiple of them)"));
  }
  num_blocks_ = IntAttr(node, "num_blocks", 0);
  block_size_ = static_cast<int>(IntAttr(node, "block_size", 16));
  step->layer = static_cast<int>(cache_layers_.size());
  const DataType type = values_[step->in[0]].type;  // the cache keeps q's type
  cache_layers_.push_back({kv_heads, head_dim, cache_bytes_, type});
  cache_bytes_ += num_blocks_ * 2 * kv_heads * block_size_ * head_dim * ElementSize(type);
  return absl::OkStatus();
}

// sample_tokens' parameters come straight from the stage's inputs (the
// host checks them before a run, as the CPU's sample_tokens does).
absl::Status LoweredStage::CheckSample(const Node& node, const Step& step) const {
  for (size_t i = 1; i < step.in.size(); ++i) {
    if (GraphInputOf(step.in[i]) < 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "the cuda backend cannot run node \"", node.name(),
          "\" (sample_tokens): its sampling parameters must be inputs of the stage (serve this "
          "model with --device=cpu)"));
    }
  }
  return absl::OkStatus();
}

void LoweredStage::TileOps(const std::vector<Shape>& shape, const Buffers& b, DevicePlan* plan,
                           std::vector<DeviceOp>* copy_in) const {
  if (kv_inputs_.positions < 0) return;
  plan->kv = kv_inputs_;
  plan->kv.tokens = shape[input_values_[kv_inputs_.positions]][0];
  const int64_t bytes = b.num_tiles * b.tile * 4;
  StagedTiles t{{Arena::kStagingIn, plan->staging_in_bytes}, kv_inputs_.seq, b.num_tiles, b.tile};
  plan->staging_in_bytes += (bytes + kArenaAlignment - 1) / kArenaAlignment * kArenaAlignment;
  DeviceOp op{DeviceOp::Type::kCopyIn, "attention tiles"};
  op.src = t.staging;
  op.dst = b.tiles;
  op.bytes = bytes;
  if (bytes > 0) copy_in->push_back(op);
  plan->tiles.push_back(t);
}

bool LoweredStage::TensorCoreTiles(const std::vector<Shape>& shape) const {
  const int64_t tokens = NumElements(shape[input_values_[kv_inputs_.seq]]);
  const int64_t sequences = shape[input_values_[kv_inputs_.blocks]][0];
  if (tokens <= sequences || cache_layers_.empty()) return false;
  return std::all_of(cache_layers_.begin(), cache_layers_.end(), [](const CacheLayer& l) {
    return (l.type == DT_FLOAT16 || l.type == DT_BFLOAT16) &&
           kernels::TensorCoreHeadDim(l.head_dim);
  });
}

int LoweredStage::AttentionGroupOf(const std::vector<Shape>& shape) const {
  int group = 0;
  for (const Step& s : steps_) {
    if (s.kind != Kind::kAttention) continue;
    const int g = kernels::AttentionGroup(shape[s.in[0]][1], cache_layers_[s.layer].kv_heads);
    if (group != 0 && g != group) return 1;
    group = g;
  }
  return std::max(group, 1);
}

int LoweredStage::AttentionSplitsOf(const Step& s, const std::vector<Shape>& shape,
                                    const Buffers& b) const {
  if (b.tensor_cores) return 1;
  const int64_t heads = shape[s.in[0]][1];
  return kernels::AttentionSplits(b.num_tiles * (heads / b.group),
                                  shape[s.in[5]][1] * block_size_);
}

int64_t LoweredStage::AttentionPartialFloats(const std::vector<Shape>& shape,
                                             const Buffers& b) const {
  int64_t most = 0;
  for (const Step& s : steps_) {
    if (s.kind != Kind::kAttention) continue;
    const Shape& q = shape[s.in[0]];
    most = std::max(most, kernels::AttentionPartialFloats(b.num_tiles, q[1] / b.group,
                                                          static_cast<int>(q[3]),
                                                          AttentionSplitsOf(s, shape, b)));
  }
  return most;
}

absl::StatusOr<DeviceOp> LoweredStage::AttentionOp(const Step& s, const Node& node,
                                                   const std::vector<Shape>& shape,
                                                   const Buffers& b, BufferRef out) const {
  const CacheLayer& layer = cache_layers_[s.layer];
  const Shape& q = shape[s.in[0]];
  const std::vector<int>& reads = s.kernel_in.empty() ? s.in : s.kernel_in;  // unrotated q, k
  DeviceOp op{DeviceOp::Type::kAttention, node.name()};
  op.src = b.f32[reads[0]];
  op.src2 = b.f32[reads[1]];
  op.src3 = b.f32[s.in[2]];
  op.src4 = b.f32[s.in[3]];
  op.seq = b.f32[s.in[4]];
  op.tables = b.f32[s.in[5]];
  op.tiles = b.tiles;
  op.cache = {Arena::kCache, layer.offset};
  op.dst = out;
  op.paged.tokens = q[2];
  op.paged.kv_heads = layer.kv_heads;
  op.paged.head_dim = layer.head_dim;
  op.paged.block_size = block_size_;
  op.paged.table_width = shape[s.in[5]][1];
  op.heads = static_cast<int>(q[1]);
  op.num_tiles = b.num_tiles;
  op.tensor_cores = b.tensor_cores;
  op.group = b.group;
  op.splits = AttentionSplitsOf(s, shape, b);
  op.partials = b.partials;
  op.scalar = static_cast<float>(FloatAttr(node, "scale", 1.0));
  op.n = NumElements(q);
  RETURN_IF_ERROR(SetRope(s, 0, shape, b, &op));
  RETURN_IF_ERROR(SetRope(s, 1, shape, b, &op));
  return op;
}

// A rotary step read only by an attention step, as its q or its k: the
// attention kernels rotate q as they load it and k as they append it, so
// the two rotary kernels of a Llama layer and their outputs go.
void LoweredStage::FuseRotaryIntoAttention() {
  const std::vector<int> only_reader = OnlyReaders();
  for (size_t a = 0; a < steps_.size(); ++a) {
    Step& s = steps_[a];
    if (s.kind != Kind::kAttention) continue;
    for (int slot : {0, 1}) {
      const int p = values_[s.in[slot]].producer;
      if (p < 0 || steps_[p].kind != Kind::kRotary ||
          only_reader[s.in[slot]] != static_cast<int>(a)) {
        continue;
      }
      if (s.kernel_in.empty()) s.kernel_in = s.in;
      const std::vector<int>& rotary = steps_[p].kernel_in;  // x, cos, sin
      s.kernel_in[slot] = rotary[0];
      s.kernel_in.insert(s.kernel_in.end(), {rotary[1], rotary[2]});  // needed on the device
      (slot == 0 ? s.rope_q : s.rope_k) = p;
      steps_[p].kind = Kind::kAbsorbed;
    }
  }
}

absl::Status LoweredStage::SetRope(const Step& s, int slot, const std::vector<Shape>& shape,
                                   const Buffers& b, DeviceOp* op) const {
  const int p = slot == 0 ? s.rope_q : s.rope_k;
  if (p < 0) return absl::OkStatus();
  // The rotary's own sizes and checks, as if it ran (its output is q or k).
  ASSIGN_OR_RETURN(DeviceOp rotary, RotaryOpOf(steps_[p], NodeOf(steps_[p]), shape, b, {}));
  DeviceOp::RopeTables& tables = slot == 0 ? op->rope_q : op->rope_k;
  tables = {true, rotary.src2, rotary.src3};
  (slot == 0 ? op->paged.rope_q : op->paged.rope_k).op = rotary.rotary;
  return absl::OkStatus();
}

// sample_tokens: the picks (kernels/sample.h), from the logits and the
// sampling inputs as they were staged; rows that need no penalties or
// draws take the argmax without the scratch.
DeviceOp LoweredStage::SampleOp(const Step& s, const Node& node, const std::vector<Shape>& shape,
                                const Buffers& b, BufferRef out) const {
  DeviceOp op{DeviceOp::Type::kSample, node.name()};
  op.src = b.f32[s.in[0]];
  op.dst = out;
  op.rows = shape[s.in[0]][0];
  op.cols = shape[s.in[0]][1];
  op.sample = {b.f32[s.in[1]], b.f32[s.in[2]], b.f32[s.in[3]], b.f32[s.in[4]], b.scratch[s.out]};
  return op;
}

void LoweredStage::SampleChecks(const Sizes& sizes, DevicePlan* plan) const {
  for (size_t i = 0; i < steps_.size(); ++i) {
    const Step& s = steps_[i];
    if (s.kind != Kind::kSample) continue;
    plan->sample_checks.push_back({sizes.node[i].name(), GraphInputOf(s.in[1]),
                                   GraphInputOf(s.in[2]), GraphInputOf(s.in[3]),
                                   GraphInputOf(s.in[4]), sizes.shape[s.in[0]][1]});
  }
}

}  // namespace pipeserve
