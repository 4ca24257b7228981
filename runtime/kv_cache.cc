#include "runtime/kv_cache.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "runtime/dtype.h"

namespace pipeserve {
namespace {

std::vector<int64_t> Ints(const Tensor& t) {
  const auto* p = static_cast<const int64_t*>(t.raw_data());
  return std::vector<int64_t>(p, p + t.numel());
}

float Load(const uint8_t* p, DataType dtype, int64_t i) {
  switch (dtype) {
    case DT_BFLOAT16: return Bf16ToFloat(reinterpret_cast<const uint16_t*>(p)[i]);
    case DT_FLOAT16: return HalfToFloat(reinterpret_cast<const uint16_t*>(p)[i]);
    default: return reinterpret_cast<const float*>(p)[i];
  }
}

void Store(uint8_t* p, DataType dtype, int64_t i, float v) {
  switch (dtype) {
    case DT_BFLOAT16: reinterpret_cast<uint16_t*>(p)[i] = FloatToBf16(v); break;
    case DT_FLOAT16: reinterpret_cast<uint16_t*>(p)[i] = FloatToHalf(v); break;
    default: reinterpret_cast<float*>(p)[i] = v;
  }
}

}  // namespace

KvCache::KvCache(int64_t num_blocks, int block_size)
    : num_blocks_(num_blocks), block_size_(block_size),
      tags_(static_cast<size_t>(num_blocks * block_size)) {}

int KvCache::AddLayer(int kv_heads, int head_dim, DataType dtype) {
  Layer l{kv_heads, head_dim, dtype, {}};
  l.blocks.resize(static_cast<size_t>(num_blocks_));
  layers_.push_back(std::move(l));
  return static_cast<int>(layers_.size()) - 1;
}

int64_t KvCache::BlockBytes() const {
  int64_t bytes = 0;
  for (const Layer& l : layers_) {
    bytes += int64_t{2} * l.kv_heads * block_size_ * l.head_dim * ElementSize(l.dtype);
  }
  return bytes;
}

int64_t KvCache::blocks_in_use() const {
  if (layers_.empty()) return 0;
  return std::count_if(layers_[0].blocks.begin(), layers_[0].blocks.end(),
                       [](const auto& b) { return b != nullptr; });
}

int64_t KvCache::Slot(const std::vector<int64_t>& table, int64_t position) const {
  return table[position / block_size_] * block_size_ + position % block_size_;
}

uint8_t* KvCache::Row(Layer& l, int64_t slot, int kind, int head) {
  const int64_t block = slot / block_size_;
  std::unique_ptr<uint8_t[]>& b = l.blocks[block];
  const int64_t row_bytes = int64_t{l.head_dim} * ElementSize(l.dtype);
  if (b == nullptr) {
    b.reset(new uint8_t[2 * l.kv_heads * block_size_ * row_bytes]);
  }
  const int64_t row = (int64_t{kind} * l.kv_heads + head) * block_size_ + slot % block_size_;
  return b.get() + row * row_bytes;
}

absl::StatusOr<KvStep> KvCache::BeginStep(const Tensor& positions, const Tensor& seq,
                                          const Tensor& blocks, const Tensor& seq_ids,
                                          int64_t tokens) {
  if (num_blocks_ <= 0) {
    return absl::FailedPreconditionError(
        "this stage has no KV cache: the model was deployed without a cache budget "
        "(--kv_cache_mb)");
  }
  if (positions.numel() != tokens || seq.numel() != tokens) {
    return absl::InvalidArgumentError(absl::StrCat(
        "kv_positions and kv_seq need one entry per token (", tokens, "), got ",
        positions.numel(), " and ", seq.numel()));
  }
  const int64_t n = blocks.rank() == 2 ? blocks.dim(0) : -1;
  if (n != seq_ids.numel()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "kv_blocks ", ShapeToString(blocks.shape()), " needs a row per entry of kv_seq_ids (",
        seq_ids.numel(), ")"));
  }
  KvStep step{Ints(positions), Ints(seq), {}};
  const std::vector<int64_t> flat = Ints(blocks);
  const int64_t width = n > 0 ? blocks.dim(1) : 0;
  for (int64_t s = 0; s < n; ++s) {
    step.tables.emplace_back(flat.begin() + s * width, flat.begin() + (s + 1) * width);
    for (int64_t b : step.tables.back()) {
      if (b < 0 || b >= num_blocks_) {
        return absl::InvalidArgumentError(
            absl::StrCat("kv_blocks: block ", b, " is not in [0, ", num_blocks_, ")"));
      }
    }
  }
  // Each sequence's new positions must be one run [lo, hi].
  std::vector<int64_t> lo(n, -1), hi(n, -1), count(n, 0);
  for (int64_t t = 0; t < tokens; ++t) {
    const int64_t s = step.seq[t], p = step.positions[t];
    if (s < 0 || s >= n || p < 0 || p / block_size_ >= width) {
      return absl::InvalidArgumentError(absl::StrCat(
          "token ", t, ": sequence index ", s, " of ", n, ", position ", p,
          (s >= 0 && s < n ? " beyond its block table" : "")));
    }
    lo[s] = lo[s] < 0 ? p : std::min(lo[s], p);
    hi[s] = std::max(hi[s], p);
    ++count[s];
  }
  for (int64_t s = 0; s < n; ++s) {
    if (count[s] > 0 && hi[s] - lo[s] + 1 != count[s]) {
      return absl::InvalidArgumentError(absl::StrCat(
          "sequence ", Ints(seq_ids)[s], ": the step's positions ", lo[s], "..", hi[s],
          " are not one run of ", count[s], " distinct positions"));
    }
  }
  const std::vector<int64_t> ids = Ints(seq_ids);
  RETURN_IF_ERROR(CheckHeld(step, ids, lo));
  for (int64_t t = 0; t < tokens; ++t) {
    const int64_t s = step.seq[t];
    tags_[Slot(step.tables[s], step.positions[t])] = Tag{ids[s], step.positions[t]};
  }
  return step;
}

absl::Status KvCache::CheckHeld(const KvStep& step, const std::vector<int64_t>& ids,
                                const std::vector<int64_t>& lo) const {
  for (size_t s = 0; s < lo.size(); ++s) {
    for (int64_t p = 0; p < lo[s]; ++p) {
      const Tag& tag = tags_[Slot(step.tables[s], p)];
      if (tag.seq_id != ids[s] || tag.position != p) {
        return absl::FailedPreconditionError(absl::StrCat(
            "sequence ", ids[s], ": position ", p,
            " is not in this stage's cache (lost with a stage server, or never prefilled "
            "here)"));
      }
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<Tensor> KvCache::Attend(int layer, const KvStep& step, const Tensor& q,
                                       const Tensor& k, const Tensor& v, float scale) {
  Layer& l = layers_[layer];
  const int64_t heads = q.dim(1), tokens = q.dim(2), d = q.dim(3);
  if (k.dim(1) != l.kv_heads || k.dim(3) != l.head_dim || d != l.head_dim ||
      heads % l.kv_heads != 0 || k.dim(2) != tokens || k.dtype() != l.dtype) {
    return absl::InvalidArgumentError(absl::StrCat(
        "q ", ShapeToString(q.shape()), " and k ", ShapeToString(k.shape()),
        " do not fit the layer's cache of ", l.kv_heads, " heads of ", l.head_dim));
  }
  const auto* kp = static_cast<const uint8_t*>(k.raw_data());
  const auto* vp = static_cast<const uint8_t*>(v.raw_data());
  const int64_t row_bytes = d * ElementSize(l.dtype);
  for (int64_t t = 0; t < tokens; ++t) {
    const int64_t slot = Slot(step.tables[step.seq[t]], step.positions[t]);
    for (int h = 0; h < l.kv_heads; ++h) {
      std::memcpy(Row(l, slot, 0, h), kp + (h * tokens + t) * row_bytes, row_bytes);
      std::memcpy(Row(l, slot, 1, h), vp + (h * tokens + t) * row_bytes, row_bytes);
    }
  }
  ASSIGN_OR_RETURN(Tensor out, Tensor::TryEmpty(q.shape(), q.dtype()));
  const auto* qp = static_cast<const uint8_t*>(q.raw_data());
  auto* op = static_cast<uint8_t*>(out.raw_data());
  const int64_t rep = heads / l.kv_heads;
  std::vector<float> qv(d), acc(d), scores;
  for (int64_t t = 0; t < tokens; ++t) {
    const std::vector<int64_t>& table = step.tables[step.seq[t]];
    const int64_t len = step.positions[t] + 1;
    scores.resize(len);
    for (int64_t h = 0; h < heads; ++h) {
      const int g = static_cast<int>(h / rep);
      const int64_t qi = (h * tokens + t) * d;
      for (int64_t i = 0; i < d; ++i) qv[i] = Load(qp, l.dtype, qi + i);
      float max = -INFINITY;
      for (int64_t p = 0; p < len; ++p) {
        const uint8_t* kr = Row(l, Slot(table, p), 0, g);
        float dot = 0;
        for (int64_t i = 0; i < d; ++i) dot += qv[i] * Load(kr, l.dtype, i);
        scores[p] = dot * scale;
        max = std::max(max, scores[p]);
      }
      float sum = 0;
      for (int64_t p = 0; p < len; ++p) sum += scores[p] = std::exp(scores[p] - max);
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t p = 0; p < len; ++p) {
        const uint8_t* vr = Row(l, Slot(table, p), 1, g);
        const float w = scores[p] / sum;
        for (int64_t i = 0; i < d; ++i) acc[i] += w * Load(vr, l.dtype, i);
      }
      for (int64_t i = 0; i < d; ++i) Store(op, l.dtype, qi + i, acc[i]);
    }
  }
  return out;
}

}  // namespace pipeserve
