#include "bench/llama_targets.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status_macros.h"
#include "graph/dtype.h"
#include "partitioner/partition.h"
#include "runtime/local_pipeline.h"

namespace pipeserve {
namespace {

int64_t Numel(const TensorInfo& p) {
  int64_t n = 1;
  for (int64_t d : p.shape()) n *= d;
  return n;
}

int64_t Attr(const Node& n, const std::string& name) {
  auto it = n.attrs().find(name);
  return it == n.attrs().end() ? 0 : it->second.i();
}

// The parameter each param node's output is, by value name.
absl::flat_hash_map<std::string, const TensorInfo*> ParamsByValue(const Graph& g) {
  absl::flat_hash_map<std::string, const TensorInfo*> by_fqn, by_value;
  for (const TensorInfo& p : g.params()) by_fqn[p.fqn()] = &p;
  for (const Node& n : g.nodes()) {
    if (n.op() != "param" || n.outputs_size() != 1) continue;
    auto a = n.attrs().find("fqn");
    if (a == n.attrs().end()) continue;
    std::string fqn = a->second.s();
    if (auto alias = g.aliases().find(fqn); alias != g.aliases().end()) fqn = alias->second;
    if (auto p = by_fqn.find(fqn); p != by_fqn.end()) by_value[n.outputs(0)] = p->second;
  }
  return by_value;
}

// The parameters GEMMs read as weights and those embeddings read rows of
// (the token table, the rotary tables).
struct WeightUse {
  absl::flat_hash_set<const TensorInfo*> gemm, tables;
  const TensorInfo* token_table = nullptr;  // the embedding of the token ids
};

WeightUse UseOfWeights(const Graph& g) {
  const auto params = ParamsByValue(g);
  WeightUse use;
  for (const Node& n : g.nodes()) {
    const bool is_gemm = n.op() == "linear" || n.op() == "mm" || n.op() == "matmul" ||
                         n.op() == "addmm";
    if (!is_gemm && n.op() != "embedding") continue;
    const int w = n.op() == "addmm" ? 2 : 1;  // the weight's input
    if (n.inputs_size() <= w) continue;
    auto p = params.find(n.inputs(w));
    if (p == params.end()) continue;
    (is_gemm ? use.gemm : use.tables).insert(p->second);
    if (!is_gemm && n.inputs(0) == g.generation().tokens()) use.token_table = p->second;
  }
  return use;
}

// Fills the weight counts of `s` (its vocab already known).
absl::Status CountWeights(const Graph& g, LlamaShape* s) {
  const WeightUse use = UseOfWeights(g);
  for (const TensorInfo* p : use.gemm) {
    const bool lm_head = p->shape_size() == 2 && p->shape(0) == s->vocab;
    (lm_head ? s->lm_head_params : s->gemm_params) += Numel(*p);
  }
  for (const TensorInfo* p : use.tables) {
    if (p->shape_size() != 2) continue;
    if (p == use.token_table) {
      s->d = p->shape(1);
      s->kv_element_bytes = ElementSize(p->dtype());  // the cache holds the model's float type
    }
    if (use.gemm.contains(p)) continue;  // a tied lm_head reads all of it
    s->embedding_bytes += Numel(*p) * ElementSize(p->dtype());
    s->embedding_row_bytes += p->shape(1) * ElementSize(p->dtype());
  }
  if (s->d == 0) {
    return absl::InvalidArgumentError(absl::StrCat("the graph has no embedding of its tokens \"",
                                                   g.generation().tokens(), "\""));
  }
  if (s->lm_head_params == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("the graph has no GEMM with a weight of ", s->vocab, " rows (the lm_head)"));
  }
  for (const TensorInfo& p : g.params()) s->weight_bytes += Numel(p) * ElementSize(p.dtype());
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<LlamaShape> ShapeOf(const Graph& g) {
  LlamaShape s;
  for (const Node& n : g.nodes()) {
    if (n.op() != "cached_attention") continue;
    ++s.layers;
    s.heads = static_cast<int>(Attr(n, "heads"));
    s.kv_heads = static_cast<int>(Attr(n, "kv_heads"));
    s.head_dim = static_cast<int>(Attr(n, "head_dim"));
  }
  if (s.layers == 0 || !g.has_generation() || g.generation().vocab() <= 0) {
    return absl::InvalidArgumentError(
        "not a graph exported for generation (no cached_attention, or no vocab)");
  }
  s.vocab = g.generation().vocab();
  RETURN_IF_ERROR(CountWeights(g, &s));
  return s;
}

absl::StatusOr<Graph> ReadGraph(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  std::stringstream bytes;
  bytes << in.rdbuf();
  std::string s = bytes.str();
  if (s.compare(0, 8, kModelMagic) == 0 && s.size() >= 16) {  // a model file's header
    uint64_t size = 0;
    for (int i = 0; i < 8; ++i) size |= static_cast<uint64_t>(static_cast<uint8_t>(s[8 + i])) << (8 * i);
    s = s.substr(16, size);
  }
  Graph g;
  if (!g.ParseFromString(s)) return absl::InvalidArgumentError(absl::StrCat(path, ": not a Graph"));
  return g;
}

WeightMap RandomWeights(const Graph& graph, uint64_t seed) {
  WeightMap out;
  uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
  auto uniform = [&x]() {  // xorshift64*: [0, 1)
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    return static_cast<float>((x * 0x2545F4914F6CDD1Dull) >> 40) * (1.0f / (1 << 24));
  };
  for (const TensorInfo& p : graph.params()) {
    Shape shape(p.shape().begin(), p.shape().end());
    Tensor t = Tensor::Zeros(shape, p.dtype());
    const int64_t n = t.numel();
    const bool matrix = shape.size() >= 2;
    const float scale = matrix ? 2.0f / std::sqrt(static_cast<float>(shape.back())) : 1.0f;
    const float shift = matrix ? -0.5f * scale : 0.5f;
    for (int64_t i = 0; i < n && IsFloatingPoint(p.dtype()); ++i) {
      const float v = uniform() * scale + shift;
      if (p.dtype() == DT_FLOAT32) t.data()[i] = v;
      if (p.dtype() == DT_BFLOAT16) t.data_as<uint16_t>()[i] = FloatToBf16(v);
      if (p.dtype() == DT_FLOAT16) t.data_as<uint16_t>()[i] = FloatToHalf(v);
    }
    out.emplace(p.fqn(), std::move(t));
  }
  return out;
}

double PrefillFlops(const LlamaShape& s, int seqs, int len) {
  const double tokens = static_cast<double>(seqs) * len;
  return 2.0 * tokens * s.gemm_params + 2.0 * seqs * s.lm_head_params +
         AttentionFlops(s, seqs, len);
}

double AttentionFlops(const LlamaShape& s, int seqs, int len) {
  // Token t attends over t + 1 positions: QK^T and PV, 2 FLOPs a multiply-add.
  const double pairs = static_cast<double>(seqs) * len * (len + 1) / 2.0;
  return 4.0 * s.layers * s.heads * s.head_dim * pairs;
}

double DecodeBytes(const LlamaShape& s, int batch, double context) {
  const double weights = static_cast<double>(s.weight_bytes - s.embedding_bytes) +
                         (s.embedding_bytes > 0 ? batch * s.embedding_row_bytes : 0);
  const double kv = 2.0 * s.layers * s.kv_heads * s.head_dim * s.kv_element_bytes;
  return weights + batch * context * kv;
}

namespace {

// Sequences in one step: sequence i holds positions [from[i], from[i] + len)
// of id ids[i], its blocks a table of `width` blocks from block i * width.
struct StepSpec {
  std::vector<int64_t> ids, from;
  int len = 1;
  int64_t width = 1;
  int64_t first_block = 0;
  int64_t vocab = 2;  // token ids are below it
};

std::vector<std::pair<std::string, Tensor>> NamedInputs(const StepSpec& st) {
  const int64_t n = static_cast<int64_t>(st.ids.size());
  std::vector<int64_t> tokens, positions, seq, blocks, last, ints, ends(n, 0);
  std::vector<float> floats;
  for (int64_t i = 0; i < n; ++i) {
    for (int k = 0; k < st.len; ++k) {
      tokens.push_back((st.ids[i] * 7919 + st.from[i] + k) % st.vocab);
      positions.push_back(st.from[i] + k);
      seq.push_back(i);
    }
    for (int64_t b = 0; b < st.width; ++b) blocks.push_back(st.first_block + i * st.width + b);
    last.push_back(static_cast<int64_t>(tokens.size()) - 1);
    floats.insert(floats.end(), {0.0f, 1.0f, 1.0f, 0.0f});  // greedy
    ints.insert(ints.end(), {0, 7, st.from[i]});
  }
  const int64_t t = static_cast<int64_t>(tokens.size());
  return {{"kv_positions", Tensor::FromInt64s({t}, positions)},
          {"kv_seq", Tensor::FromInt64s({t}, seq)},
          {"kv_blocks", Tensor::FromInt64s({n, st.width}, blocks)},
          {"kv_seq_ids", Tensor::FromInt64s({n}, st.ids)},
          {"kv_last", Tensor::FromInt64s({n}, last)},
          {"logits_rows", Tensor::FromInt64s({0}, {})},  // token ids only
          {"sample_floats", Tensor::FromVector({n, 4}, floats)},
          {"sample_ints", Tensor::FromInt64s({n, 3}, ints)},
          {"sample_context", Tensor::FromInt64s({0}, {})},
          {"sample_context_ends", Tensor::FromInt64s({n}, ends)},
          {"", Tensor::FromInt64s({1, t}, tokens)}};  // the token ids (GenerationSpec::tokens)
}

class Runner {
 public:
  Runner(std::unique_ptr<LocalPipeline> pipe, Plan plan, int64_t width, const GenerationSpec& g)
      : pipe_(std::move(pipe)),
        plan_(std::move(plan)),
        width_(width),
        vocab_(g.vocab()),
        tokens_(g.tokens()) {
    for (int i = 0; i < plan_.outputs_size(); ++i) {
      if (plan_.outputs(i).dtype() == DT_INT64) tokens_out_ = i;
    }
  }

  int64_t width() const { return width_; }

  // Runs one step; its seconds, wall clock.
  absl::StatusOr<double> Step(StepSpec st) {
    st.vocab = vocab_;
    const auto named = NamedInputs(st);
    std::vector<Tensor> in;
    for (const ValueSpec& spec : plan_.inputs()) {
      auto it = std::find_if(named.begin(), named.end(), [&](const auto& p) {
        return p.first == spec.name() || (p.first.empty() && spec.name() == tokens_);
      });
      if (it == named.end()) {
        return absl::InvalidArgumentError(
            absl::StrCat("the model takes input \"", spec.name(), "\", which a step does not make"));
      }
      in.push_back(it->second);
    }
    const auto t0 = std::chrono::steady_clock::now();
    ASSIGN_OR_RETURN(std::vector<Tensor> out, pipe_->Run(in));
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (tokens_out_ >= 0) {
      const Tensor& t = out[tokens_out_];
      last_tokens_.assign(t.data_as<int64_t>(), t.data_as<int64_t>() + t.numel());
    }
    return s;
  }

  const std::vector<int64_t>& last_tokens() const { return last_tokens_; }

 private:
  std::unique_ptr<LocalPipeline> pipe_;
  Plan plan_;
  int64_t width_, vocab_;
  std::string tokens_;  // the token ids' input
  int tokens_out_ = -1;
  std::vector<int64_t> last_tokens_;
};

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

StepSpec Sequences(int64_t first_id, int n, int64_t from, int len, int64_t width) {
  StepSpec st;
  for (int i = 0; i < n; ++i) {
    st.ids.push_back(first_id + i);
    st.from.push_back(from);
  }
  st.len = len;
  st.width = width;
  return st;
}

absl::StatusOr<double> TimePrefill(Runner& r, const TargetOptions& o, int64_t* next_id) {
  std::vector<double> times;
  for (int k = 0; k < o.warmup + o.repeats; ++k) {  // new sequences each time, same blocks
    StepSpec st = Sequences(*next_id, o.prefill_seqs, 0, o.prefill_len, r.width());
    *next_id += o.prefill_seqs;
    ASSIGN_OR_RETURN(double s, r.Step(st));
    if (k >= o.warmup) times.push_back(s);
  }
  return Median(times);
}

absl::StatusOr<DecodeTime> TimeDecode(Runner& r, const TargetOptions& o, int batch,
                                      int64_t* next_id) {
  const int64_t first = *next_id;
  *next_id += batch;
  // The context, prefilled a few sequences a step.
  const int per_step = std::max(1, std::min(batch, o.prefill_chunk / std::max(1, o.context)));
  for (int i = 0; i < batch; i += per_step) {
    StepSpec st = Sequences(first + i, std::min(per_step, batch - i), 0, o.context, r.width());
    st.first_block = i * r.width();
    RETURN_IF_ERROR(r.Step(st).status());
  }
  std::vector<double> times;
  for (int k = 0; k < o.warmup + o.decode_steps; ++k) {
    ASSIGN_OR_RETURN(double s, r.Step(Sequences(first, batch, o.context + k, 1, r.width())));
    if (k >= o.warmup) times.push_back(s);
  }
  DecodeTime d;
  d.batch = batch;
  d.step_seconds = Median(times);
  d.mean_context = o.context + o.warmup + (o.decode_steps + 1) / 2.0;
  return d;
}

}  // namespace

absl::StatusOr<LlamaTimes> TimeLlama(ComputeBackend& backend, const Model& model,
                                     const TargetOptions& o) {
  if (o.batches.empty() || *std::min_element(o.batches.begin(), o.batches.end()) < 1 ||
      o.prefill_seqs < 1 || o.prefill_len < 1 || o.context < 1 || o.decode_steps < 1 ||
      o.warmup < 0 || o.repeats < 1) {
    return absl::InvalidArgumentError("target options: every count must be at least 1");
  }
  RETURN_IF_ERROR(ShapeOf(model.graph).status());
  const int max_batch = *std::max_element(o.batches.begin(), o.batches.end());
  const int64_t longest = std::max<int64_t>(o.prefill_len, o.context + o.warmup + o.decode_steps);
  Model m{model.graph, model.weights};  // the weights' storage is shared
  int64_t block_size = 16;
  for (Node& n : *m.graph.mutable_nodes()) {
    if (n.op() == "cached_attention") block_size = std::max<int64_t>(1, Attr(n, "block_size"));
  }
  const int64_t width = (longest + block_size - 1) / block_size;
  const int64_t blocks = width * std::max(max_batch, o.prefill_seqs);
  for (Node& n : *m.graph.mutable_nodes()) {  // as the coordinator sizes the cache
    if (n.op() == "cached_attention") (*n.mutable_attrs())["num_blocks"].set_i(blocks);
  }
  ASSIGN_OR_RETURN(Plan plan, Partition(m.graph, PartitionOptions()));
  ASSIGN_OR_RETURN(std::unique_ptr<LocalPipeline> pipe,
                   LocalPipeline::Create(m, plan, backend, LocalPipelineOptions()));
  Runner runner(std::move(pipe), std::move(plan), width, m.graph.generation());
  LlamaTimes t;
  int64_t next_id = 1;
  ASSIGN_OR_RETURN(t.prefill_seconds, TimePrefill(runner, o, &next_id));
  for (int batch : o.batches) {
    ASSIGN_OR_RETURN(DecodeTime d, TimeDecode(runner, o, batch, &next_id));
    t.decode.push_back(d);
  }
  t.last_tokens = runner.last_tokens();
  return t;
}

namespace {

// "42%" of `limit`, or "n/a" when the limit is not known.
std::string Share(double value, double limit) {
  return limit > 0 ? absl::StrCat(std::lround(100 * value / limit), "%") : "n/a";
}

void Row(const std::string& measure, const std::string& value, const std::string& share,
         const std::string& target) {
  std::printf("%-34s %16s  %-34s %s\n", measure.c_str(), value.c_str(), share.c_str(),
              target.c_str());
}

}  // namespace

void PrintTargets(const LlamaShape& s, const TargetOptions& o, const LlamaTimes& t,
                  const CardLimits& l) {
  std::printf("model: %d layers, d %lld, %d heads (%d KV) of %d, vocab %lld, %.3f GB of weights\n",
              s.layers, static_cast<long long>(s.d), s.heads, s.kv_heads, s.head_dim,
              static_cast<long long>(s.vocab), s.weight_bytes / 1e9);
  Row("measure", "value", "share of the card's limits", "target");
  auto flops = [&](const std::string& what, double rate, const std::string& target) {
    Row(what, absl::StrFormat("%.1f TFLOP/s", rate / 1e12),
        absl::StrCat(Share(rate, l.bf16_flops), " of peak, ", Share(rate, l.bf16_gemm_flops),
                     " of a cuBLASLt GEMM"),
        target);
  };
  flops(absl::StrCat("prefill ", o.prefill_seqs, " x ", o.prefill_len, " tokens"),
        PrefillFlops(s, o.prefill_seqs, o.prefill_len) / t.prefill_seconds, ">= 40% of peak");
  if (l.attention_seconds > 0) {
    flops("  attention alone (one layer)",
          AttentionFlops(s, o.prefill_seqs, o.prefill_len) / s.layers / l.attention_seconds,
          ">= 25% of peak");
  }
  if (l.cuda_core_attention_seconds > 0) {
    flops("  the same on CUDA cores",
          AttentionFlops(s, o.prefill_seqs, o.prefill_len) / s.layers /
              l.cuda_core_attention_seconds,
          "(the kernel before)");
  }
  double single = 0;
  for (const DecodeTime& d : t.decode) {
    const double bw = DecodeBytes(s, d.batch, d.mean_context) / d.step_seconds;
    const double tokens = d.batch / d.step_seconds;
    if (d.batch == 1) single = tokens;
    const std::string what = absl::StrCat("decode ", d.batch, " seq, ", std::lround(d.mean_context),
                                          " positions");
    Row(what, absl::StrFormat("%.0f GB/s", bw / 1e9),
        absl::StrCat(Share(bw, l.bytes_per_second), " of bandwidth, ",
                     Share(bw, l.copy_bytes_per_second), " of a device copy"),
        d.batch == 1 ? ">= 70% of bandwidth" : "");
    Row("", absl::StrFormat("%.0f tokens/s", tokens),
        d.batch > 1 && single > 0 ? absl::StrFormat("%.1fx 1 seq", tokens / single) : "",
        d.batch == 64 ? ">= 20x 1 seq" : "");
  }
}

}  // namespace pipeserve
