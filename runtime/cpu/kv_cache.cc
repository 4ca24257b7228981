#include "runtime/cpu/kv_cache.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <new>

#include <omp.h>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "runtime/cpu/cpu_kernels.h"
#include "runtime/cpu/cpu_ops.h"
#include "graph/dtype.h"

namespace pipeserve {
namespace {

std::vector<int64_t> Ints(const Tensor& t) {
  const auto* p = static_cast<const int64_t*>(t.raw_data());
  return std::vector<int64_t>(p, p + t.numel());
}

void ToFloat(const uint8_t* p, DataType dtype, int64_t n, float* out) {
  if (dtype == DT_FLOAT32) {
    std::memcpy(out, p, n * sizeof(float));
  } else {
    Widen16(dtype, reinterpret_cast<const uint16_t*>(p), n, out);
  }
}

void FromFloat(const float* x, int64_t n, DataType dtype, uint8_t* p) {
  if (dtype == DT_FLOAT32) {
    std::memcpy(p, x, n * sizeof(float));
  } else {
    Narrow16(dtype, x, n, reinterpret_cast<uint16_t*>(p));
  }
}

// Sixteen partial sums, so the loop vectorises without reassociating more
// than that (no fast-math).
PIPESERVE_VECTOR_CLONES float Dot(const float* a, const float* b, int64_t n) {
  float part[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    for (int j = 0; j < 16; ++j) part[j] += a[i + j] * b[i + j];
  }
  float sum = 0;
  for (; i < n; ++i) sum += a[i] * b[i];
  for (float p : part) sum += p;
  return sum;
}

PIPESERVE_VECTOR_CLONES void Axpy(float w, const float* x, int64_t n, float* y) {
  for (int64_t i = 0; i < n; ++i) y[i] += w * x[i];
}

// Row `s` of scores: scaled, softmax over its first `len` entries, zero
// beyond (to `width`).
void SoftmaxPrefix(float* s, int64_t len, int64_t width, float scale) {
  for (int64_t p = 0; p < len; ++p) s[p] *= scale;
  SoftmaxRow(s, len);
  std::fill(s + len, s + width, 0.0f);
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

int64_t KvCache::Slot(const std::vector<int64_t>& table, int64_t position) const {
  return table[position / block_size_] * block_size_ + position % block_size_;
}

uint8_t* KvCache::Row(Layer& l, int64_t slot, int kind, int head) {
  const int64_t block = slot / block_size_;
  std::unique_ptr<uint8_t[]>& b = l.blocks[block];
  const int64_t row_bytes = int64_t{l.head_dim} * ElementSize(l.dtype);
  if (b == nullptr) {
    b.reset(new uint8_t[2 * l.kv_heads * block_size_ * row_bytes]());  // zeroed
    if (&l == &layers_[0]) blocks_in_use_.fetch_add(1, std::memory_order_relaxed);
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
  if (blocks.rank() != 2 || blocks.dim(0) != seq_ids.numel()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "kv_blocks ", ShapeToString(blocks.shape()), " needs a row per entry of kv_seq_ids (",
        seq_ids.numel(), ")"));
  }
  KvStep step{Ints(positions), Ints(seq), {}};
  ASSIGN_OR_RETURN(step.tables, Tables(blocks));
  const std::vector<int64_t> ids = Ints(seq_ids);
  ASSIGN_OR_RETURN(std::vector<int64_t> lo, FirstNewPositions(step, ids, blocks.dim(1)));
  RETURN_IF_ERROR(CheckHeld(step, ids, lo));
  for (int64_t t = 0; t < tokens; ++t) {
    const int64_t s = step.seq[t];
    tags_[Slot(step.tables[s], step.positions[t])] = Tag{ids[s], step.positions[t]};
  }
  return step;
}

absl::StatusOr<std::vector<std::vector<int64_t>>> KvCache::Tables(const Tensor& blocks) const {
  const std::vector<int64_t> flat = Ints(blocks);
  const int64_t n = blocks.dim(0), width = blocks.dim(1);
  std::vector<std::vector<int64_t>> tables;
  for (int64_t s = 0; s < n; ++s) {
    tables.emplace_back(flat.begin() + s * width, flat.begin() + (s + 1) * width);
    for (int64_t b : tables.back()) {
      if (b < 0 || b >= num_blocks_) {
        return absl::InvalidArgumentError(
            absl::StrCat("kv_blocks: block ", b, " is not in [0, ", num_blocks_, ")"));
      }
    }
  }
  return tables;
}

absl::StatusOr<std::vector<int64_t>> KvCache::FirstNewPositions(const KvStep& step,
                                                               const std::vector<int64_t>& ids,
                                                               int64_t width) const {
  const int64_t n = static_cast<int64_t>(ids.size());
  std::vector<int64_t> lo(n, -1), hi(n, -1), count(n, 0);
  for (size_t t = 0; t < step.positions.size(); ++t) {
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
  // Each sequence's new positions must be one run of distinct positions.
  std::vector<std::vector<bool>> seen(n);
  for (int64_t s = 0; s < n; ++s) seen[s].assign(count[s] > 0 ? hi[s] - lo[s] + 1 : 0, false);
  for (size_t t = 0; t < step.positions.size(); ++t) {
    const int64_t s = step.seq[t], at = step.positions[t] - lo[s];
    if (at < static_cast<int64_t>(seen[s].size()) && seen[s][at]) {
      return absl::InvalidArgumentError(absl::StrCat(
          "sequence ", ids[s], ": position ", step.positions[t], " twice in one step"));
    }
    if (at < static_cast<int64_t>(seen[s].size())) seen[s][at] = true;
  }
  for (int64_t s = 0; s < n; ++s) {
    if (count[s] > 0 && hi[s] - lo[s] + 1 != count[s]) {
      return absl::InvalidArgumentError(absl::StrCat(
          "sequence ", ids[s], ": the step's positions ", lo[s], "..", hi[s],
          " are not one run of ", count[s], " distinct positions"));
    }
  }
  return lo;
}

void KvCache::AbortStep(const KvStep& step) {
  for (size_t t = 0; t < step.positions.size(); ++t) {
    tags_[Slot(step.tables[step.seq[t]], step.positions[t])] = Tag{};
  }
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
  if (q.rank() != 4 || k.rank() != 4 || q.dim(0) != 1 || k.dim(0) != 1 ||
      v.shape() != k.shape() || v.dtype() != k.dtype() || q.dtype() != k.dtype()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "q ", ShapeToString(q.shape()), ", k ", ShapeToString(k.shape()), ", v ",
        ShapeToString(v.shape()),
        ": a step's tokens come packed in one row, [1, heads, tokens, head_dim]"));
  }
  const int64_t heads = q.dim(1), tokens = q.dim(2), d = q.dim(3);
  if (k.dim(1) != l.kv_heads || k.dim(3) != l.head_dim || d != l.head_dim ||
      heads % l.kv_heads != 0 || k.dim(2) != tokens || k.dtype() != l.dtype) {
    return absl::InvalidArgumentError(absl::StrCat(
        "q ", ShapeToString(q.shape()), " and k ", ShapeToString(k.shape()),
        " do not fit the layer's cache of ", l.kv_heads, " heads of ", l.head_dim));
  }
  Append(l, step, k, v);
  ASSIGN_OR_RETURN(Tensor out, Tensor::TryEmpty(q.shape(), q.dtype()));
  RETURN_IF_ERROR(AttendGroups(Group{&l, &step, &q, &out, scale, heads / l.kv_heads}));
  return out;
}

void KvCache::Append(Layer& l, const KvStep& step, const Tensor& k, const Tensor& v) {
  const int64_t tokens = k.dim(2);
  const auto* kp = static_cast<const uint8_t*>(k.raw_data());
  const auto* vp = static_cast<const uint8_t*>(v.raw_data());
  const int64_t row_bytes = l.head_dim * ElementSize(l.dtype);
  for (int64_t t = 0; t < tokens; ++t) {
    const int64_t slot = Slot(step.tables[step.seq[t]], step.positions[t]);
    for (int h = 0; h < l.kv_heads; ++h) {
      std::memcpy(Row(l, slot, 0, h), kp + (h * tokens + t) * row_bytes, row_bytes);
      std::memcpy(Row(l, slot, 1, h), vp + (h * tokens + t) * row_bytes, row_bytes);
    }
  }
}

absl::Status KvCache::AttendGroups(const Group& group) {
  const KvStep& step = *group.step;
  const int64_t tokens = group.q->dim(2);
  // One task per (sequence, KV head): its tokens' query heads of the group.
  std::vector<std::vector<int64_t>> by_seq(step.tables.size());
  for (int64_t t = 0; t < tokens; ++t) by_seq[step.seq[t]].push_back(t);
  std::vector<std::pair<int64_t, int>> tasks;
  bool long_run = false;  // some sequence brings a prompt chunk: GEMMs
  for (size_t s = 0; s < by_seq.size(); ++s) {
    if (by_seq[s].empty()) continue;
    long_run |= by_seq[s].size() >= kGemmTokens;
    for (int g = 0; g < group.layer->kv_heads; ++g) tasks.emplace_back(s, g);
  }
  absl::Status failed;
  // Groups run in parallel (their GEMMs then on one thread each), unless a
  // prompt chunk brings fewer groups than threads: then one at a time, each
  // GEMM on every thread.
  const bool parallel =
      tasks.size() > 1 && (!long_run || static_cast<int>(tasks.size()) >= omp_get_max_threads());
#pragma omp parallel for schedule(dynamic) if (parallel)
  for (size_t i = 0; i < tasks.size(); ++i) {
    absl::Status st;
    try {  // nothing may throw out of an OpenMP region: it would end the process
      st = AttendGroup(group, by_seq[tasks[i].first], tasks[i].second, long_run);
    } catch (const std::bad_alloc&) {
      st = absl::ResourceExhaustedError("out of memory for the attention's scores");
    }
    if (!st.ok()) {
#pragma omp critical
      failed = st;
    }
  }
  return failed;
}

absl::Status KvCache::AttendGroup(const Group& g, const std::vector<int64_t>& tokens, int head,
                                  bool gemm) {
  Layer& l = *g.layer;
  const int64_t d = l.head_dim, n_tok = g.q->dim(2), m = static_cast<int64_t>(tokens.size());
  const int64_t rows = g.rep * m;  // row hh * m + j: query head hh of the group, token j
  const std::vector<int64_t>& table = g.step->tables[g.step->seq[tokens[0]]];
  int64_t ctx = 0;
  for (int64_t t : tokens) ctx = std::max(ctx, g.step->positions[t] + 1);
  // The group's keys and values of positions [0, ctx), contiguous floats.
  thread_local std::vector<float> kf, vf, qf, scores, of;
  kf.resize(ctx * d);
  vf.resize(ctx * d);
  for (int64_t p = 0; p < ctx; ++p) {
    const int64_t slot = Slot(table, p);
    ToFloat(Row(l, slot, 0, head), l.dtype, d, &kf[p * d]);
    ToFloat(Row(l, slot, 1, head), l.dtype, d, &vf[p * d]);
  }
  qf.resize(rows * d);
  scores.resize(rows * ctx);
  of.resize(rows * d);
  const auto* qp = static_cast<const uint8_t*>(g.q->raw_data());
  auto* op = static_cast<uint8_t*>(g.out->raw_data());
  const int64_t esize = ElementSize(l.dtype);
  auto q_row = [&](int64_t r) { return (head * g.rep + r / m) * n_tok + tokens[r % m]; };
  for (int64_t r = 0; r < rows; ++r) ToFloat(qp + q_row(r) * d * esize, l.dtype, d, &qf[r * d]);
  auto last = [&](int64_t r) { return g.step->positions[tokens[r % m]]; };
  // Every query head of the group in one product: the keys and values
  // are read once for all of them.
  if (gemm) {
    RETURN_IF_ERROR(Gemm(true, rows, ctx, d, qf.data(), kf.data(), 0.0f, scores.data()));
  } else {
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t p = 0; p <= last(r); ++p) scores[r * ctx + p] = Dot(&qf[r * d], &kf[p * d], d);
    }
  }
  for (int64_t r = 0; r < rows; ++r) SoftmaxPrefix(&scores[r * ctx], last(r) + 1, ctx, g.scale);
  if (gemm) {
    RETURN_IF_ERROR(Gemm(false, rows, d, ctx, scores.data(), vf.data(), 0.0f, of.data()));
  } else {
    for (int64_t r = 0; r < rows; ++r) {
      float* o = &of[r * d];
      std::fill(o, o + d, 0.0f);
      for (int64_t p = 0; p <= last(r); ++p) Axpy(scores[r * ctx + p], &vf[p * d], d, o);
    }
  }
  for (int64_t r = 0; r < rows; ++r) FromFloat(&of[r * d], d, l.dtype, op + q_row(r) * d * esize);
  // Each thread keeps its buffers for the next step, unless a long context
  // made them large.
  for (std::vector<float>* buf : {&kf, &vf, &qf, &scores, &of}) {
    if (buf->capacity() > kKeptFloats) std::vector<float>().swap(*buf);
  }
  return absl::OkStatus();
}

}  // namespace pipeserve
