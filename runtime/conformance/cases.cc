#include "runtime/conformance/cases.h"

#include <cmath>
#include <random>

#include "absl/strings/str_cat.h"

namespace pipeserve {
namespace {

const std::vector<DataType> kFloats = {DT_FLOAT32, DT_FLOAT16, DT_BFLOAT16};
const std::vector<DataType> kInts = {DT_INT64, DT_INT32};

AttrValue I(int64_t v) {
  AttrValue a;
  a.set_i(v);
  return a;
}
AttrValue F(double v) {
  AttrValue a;
  a.set_f(v);
  return a;
}
AttrValue S(const std::string& v) {
  AttrValue a;
  a.set_s(v);
  return a;
}
AttrValue Is(const std::vector<int64_t>& v) {
  AttrValue a;
  for (int64_t x : v) a.mutable_ints()->add_v(x);
  return a;
}

using Attrs = std::vector<std::pair<std::string, AttrValue>>;

ConformanceCase Case(std::string name, const std::string& op, std::vector<InputSpec> in,
                     const Attrs& attrs, std::vector<DataType> dtypes) {
  ConformanceCase c;
  c.name = std::move(name);
  c.node.set_op(op);
  for (const auto& [k, v] : attrs) (*c.node.mutable_attrs())[k] = v;
  c.inputs = std::move(in);
  c.dtypes = std::move(dtypes);
  return c;
}

InputSpec In(std::string name, Shape shape, Values values = Values::kSigned) {
  return {std::move(name), std::move(shape), values};
}
InputSpec Typed(std::string name, Shape shape, Values values, DataType dtype, int64_t high = 0) {
  return {std::move(name), std::move(shape), values, dtype, high};
}
InputSpec Given(std::string name, Shape shape, DataType dtype, std::vector<double> v) {
  return {std::move(name), std::move(shape), Values::kGiven, dtype, 0, std::move(v)};
}
InputSpec Param(std::string name, Shape shape) {
  InputSpec s = In(std::move(name), std::move(shape));
  s.param = true;
  return s;
}

// Values where a kernel and PyTorch part ways if it takes a shortcut.
void AddEdges(std::vector<ConformanceCase>* out) {
  const double nan = std::nan("");
  // 1 // 0.1f is 9: the quotient 1 / 0.1f rounds up to 10.
  out->push_back(Case("floordiv_exact_remainder", "floordiv",
                      {Given("a", {6}, DT_INVALID, {1, 7, -7, 2.5, -1, 5}),
                       Given("b", {6}, DT_INVALID, {0.1, 0.7, 0.7, -0.5, 0.3, 3})},
                      {}, {DT_FLOAT32}));
  // A NaN on either side is the result.
  for (const char* op : {"maximum", "minimum"}) {
    out->push_back(Case(std::string(op) + "_nan", op,
                        {Given("a", {4}, DT_INVALID, {nan, 1, -2, nan}),
                         Given("b", {4}, DT_INVALID, {0, nan, -3, nan})},
                        {}, kFloats));
  }
  out->push_back(Case("amax_nan", "amax", {Given("x", {2, 3}, DT_INVALID, {1, nan, 2, 3, 4, 5})},
                      {{"dims", Is({1})}}, kFloats));
  // Negative integer exponents: 1 / a^|b|, truncated.
  out->push_back(Case("pow_int_negative", "pow",
                      {Given("a", {6}, DT_INVALID, {2, -2, 1, -1, 3, 0}),
                       Given("b", {6}, DT_INVALID, {-1, -1, -3, -3, 39, 2})},
                      {}, {DT_INT64}));
}

void AddArithmetic(std::vector<ConformanceCase>* out) {
  for (const char* op : {"add", "sub", "mul", "div", "maximum", "minimum", "pow", "floordiv"}) {
    const std::string o = op;
    const bool divides = o == "div" || o == "floordiv";
    const Values a = o == "pow" ? Values::kPositive : Values::kSigned;
    const Values b = divides ? Values::kPositive : Values::kSigned;
    // Broadcast from both sides: [3, 1, 7] with [5, 7].
    out->push_back(Case(o + "_broadcast", o, {In("a", {3, 1, 7}, a), In("b", {5, 7}, b)}, {},
                        kFloats));
    out->push_back(Case(o + "_scalar_left", o, {In("a", {4, 9}, b)},
                        {{"scalar", F(1.5)}, {"reverse", I(1)}}, kFloats));
    if (o == "pow") continue;  // integer powers overflow; exported models cast first
    out->push_back(Case(o + "_int", o,
                        {In("a", {6, 5}, Values::kSmallInt), In("b", {5}, Values::kSmallInt)},
                        {}, kInts));
  }
  AddEdges(out);
  for (const char* op : {"eq", "ne", "lt", "le", "gt", "ge"}) {
    std::vector<DataType> types = kFloats;
    types.insert(types.end(), kInts.begin(), kInts.end());
    out->push_back(Case(std::string(op) + "_broadcast", op,
                        {In("a", {4, 6}, Values::kSmallInt), In("b", {6}, Values::kSmallInt)},
                        {}, types));
    out->push_back(Case(std::string(op) + "_scalar", op, {In("a", {5, 3}, Values::kSmallInt)},
                        {{"scalar", F(1)}}, kFloats));
  }
  for (const char* op : {"logical_and", "logical_or"}) {
    out->push_back(Case(op, op, {In("a", {5, 6}, Values::kBool), In("b", {6}, Values::kBool)}, {},
                        {DT_BOOL}));
  }
  out->push_back(Case("logical_not", "logical_not", {In("a", {7, 5}, Values::kBool)}, {},
                      {DT_BOOL}));
  out->push_back(Case("where", "where",
                      {Typed("cond", {5, 1}, Values::kBool, DT_BOOL), In("a", {5, 7}),
                       In("b", {7})},
                      {}, kFloats));
}

void AddUnary(std::vector<ConformanceCase>* out) {
  for (const char* op : {"relu", "clone", "identity", "neg", "abs"}) {
    std::vector<DataType> types = kFloats;
    types.push_back(DT_INT64);
    out->push_back(Case(op, op, {In("x", {6, 13})}, {}, types));
  }
  for (const char* op : {"gelu", "silu", "tanh", "sigmoid", "exp", "cos", "sin"}) {
    out->push_back(Case(op, op, {In("x", {6, 13})}, {}, kFloats));
  }
  out->push_back(Case("gelu_tanh", "gelu", {In("x", {6, 13})}, {{"approximate", S("tanh")}},
                      kFloats));
  for (const char* op : {"sqrt", "rsqrt", "log"}) {
    out->push_back(Case(op, op, {In("x", {6, 13}, Values::kPositive)}, {}, kFloats));
  }
}

void AddNormalizations(std::vector<ConformanceCase>* out) {
  for (const char* op : {"softmax", "log_softmax"}) {
    out->push_back(Case(std::string(op) + "_last", op, {In("x", {3, 5, 19})}, {{"dim", I(-1)}},
                        kFloats));
    out->push_back(Case(std::string(op) + "_dim1", op, {In("x", {3, 5, 19})}, {{"dim", I(1)}},
                        kFloats));
    out->push_back(Case(std::string(op) + "_long_rows", op, {In("x", {2, 1000})},
                        {{"dim", I(-1)}}, kFloats));
  }
  out->push_back(Case("layer_norm_affine", "layer_norm",
                      {In("x", {4, 6, 33}), Param("w", {33}), Param("b", {33})},
                      {{"ndim", I(1)}, {"eps", F(1e-5)}, {"has_weight", I(1)},
                       {"has_bias", I(1)}},
                      kFloats));
  out->push_back(Case("layer_norm_two_dims", "layer_norm", {In("x", {4, 6, 33})},
                      {{"ndim", I(2)}, {"eps", F(1e-5)}}, kFloats));
  // Rows longer than a GPU block (several elements per thread), bias alone.
  out->push_back(Case("layer_norm_long_rows_bias", "layer_norm", {In("x", {3, 1000}), Param("b", {1000})},
                      {{"ndim", I(1)}, {"eps", F(1e-5)}, {"has_bias", I(1)}}, kFloats));
  for (const char* op : {"sum", "mean", "amax"}) {
    const std::string o = op;
    out->push_back(Case(o + "_dim1", o, {In("x", {4, 5, 6})}, {{"dims", Is({1})}}, kFloats));
    out->push_back(Case(o + "_keepdim", o, {In("x", {4, 5, 6})},
                        {{"dims", Is({0, 2})}, {"keepdim", I(1)}}, kFloats));
    out->push_back(Case(o + "_all", o, {In("x", {4, 5, 6})}, {}, kFloats));
  }
}

void AddGemms(std::vector<ConformanceCase>* out) {
  out->push_back(Case("mm", "mm", {In("a", {5, 17}), In("b", {17, 9})}, {}, kFloats));
  out->push_back(Case("matmul_batched", "matmul", {In("a", {2, 5, 17}), In("b", {17, 9})}, {},
                      kFloats));
  out->push_back(Case("matmul_broadcast_batch", "matmul",
                      {In("a", {2, 1, 5, 17}), In("b", {3, 17, 4})}, {}, kFloats));
  out->push_back(Case("matmul_vector", "matmul", {In("a", {17}), In("b", {3, 17, 4})}, {},
                      kFloats));
  out->push_back(Case("linear_bias", "linear",
                      {In("x", {2, 5, 17}), Param("w", {9, 17}), Param("b", {9})}, {}, kFloats));
  out->push_back(Case("linear", "linear", {In("x", {5, 17}), Param("w", {9, 17})}, {}, kFloats));
  out->push_back(Case("addmm", "addmm", {In("bias", {9}), In("a", {5, 17}), In("b", {17, 9})},
                      {}, kFloats));
  out->push_back(Case("embedding", "embedding",
                      {Typed("ids", {3, 5}, Values::kIndex, DT_INT64, 11), Param("w", {11, 8})},
                      {}, kFloats));
}

void AddShapes(std::vector<ConformanceCase>* out) {
  std::vector<DataType> all = kFloats;
  all.push_back(DT_INT64);
  out->push_back(Case("reshape", "reshape", {In("x", {4, 6, 5})}, {{"shape", Is({4, -1})}}, all));
  out->push_back(Case("permute", "permute", {In("x", {2, 3, 5, 4})},
                      {{"dims", Is({0, 2, 1, 3})}}, all));
  out->push_back(Case("unsqueeze", "unsqueeze", {In("x", {3, 5})}, {{"dim", I(1)}}, all));
  out->push_back(Case("squeeze", "squeeze", {In("x", {3, 1, 5})}, {{"dims", Is({1})}}, all));
  out->push_back(Case("expand", "expand", {In("x", {3, 1, 5})},
                      {{"shape", Is({2, -1, 4, -1})}}, all));
  out->push_back(Case("slice_step", "slice", {In("x", {7, 9})},
                      {{"dim", I(1)}, {"start", I(1)}, {"stop", I(8)}, {"step", I(3)}}, all));
  out->push_back(Case("slice_negative", "slice", {In("x", {7, 9})},
                      {{"dim", I(0)}, {"start", I(-5)}, {"stop", I(-1)}}, all));
  out->push_back(Case("select", "select", {In("x", {4, 6, 3})},
                      {{"dim", I(1)}, {"index", I(-2)}}, all));
  out->push_back(Case("cat", "cat", {In("a", {3, 4}), In("b", {3, 2})}, {{"dim", I(1)}}, all));
  out->push_back(Case("stack", "stack", {In("a", {3, 4}), In("b", {3, 4})}, {{"dim", I(0)}},
                      all));
  out->push_back(Case("triu", "triu", {In("x", {5, 7})}, {{"diagonal", I(1)}}, all));
  out->push_back(Case("tril", "tril", {In("x", {2, 5, 7})}, {{"diagonal", I(-1)}}, all));
  out->push_back(Case("size", "size", {In("x", {4, 7})}, {{"dim", I(1)}}, all));
}

void AddMakers(std::vector<ConformanceCase>* out) {
  out->push_back(Case("arange_int", "arange", {},
                      {{"start", I(2)}, {"end", I(11)}, {"step", I(3)}, {"dtype", I(DT_INT64)}},
                      {DT_INT64}));
  out->push_back(Case("arange_float", "arange", {},
                      {{"start", I(0)}, {"end", I(13)}, {"dtype", I(DT_FLOAT32)}}, {DT_FLOAT32}));
  for (DataType t : {DT_FLOAT32, DT_FLOAT16, DT_BFLOAT16, DT_INT64, DT_BOOL}) {
    out->push_back(Case(absl::StrCat("full_", TorchName(t)), "full", {},
                        {{"shape", Is({3, 4})}, {"value", F(t == DT_BOOL ? 1 : 2.5)},
                         {"dtype", I(t)}},
                        {DT_FLOAT32}));
  }
  for (DataType to : {DT_FLOAT32, DT_FLOAT16, DT_BFLOAT16, DT_INT64, DT_INT32, DT_BOOL}) {
    out->push_back(Case(absl::StrCat("cast_to_", TorchName(to)), "cast", {In("x", {5, 6})},
                        {{"dtype", I(to)}}, {DT_FLOAT32, DT_BFLOAT16, DT_INT64}));
  }
}

void AddCachedAttention(std::vector<ConformanceCase>* out) {
  // One prefill step of two sequences (3 and 2 tokens) into an empty cache
  // of 4-token blocks: causal attention within each sequence.
  out->push_back(Case(
      "cached_attention_prefill", "cached_attention",
      {In("q", {1, 2, 5, 8}), In("k", {1, 2, 5, 8}), In("v", {1, 2, 5, 8}),
       Given("positions", {5}, DT_INT64, {0, 1, 2, 0, 1}),
       Given("seq", {5}, DT_INT64, {0, 0, 0, 1, 1}),
       Given("blocks", {2, 1}, DT_INT64, {0, 1}), Given("seq_ids", {2}, DT_INT64, {0, 1})},
      {{"scale", F(0.35)}, {"layer", I(0)}, {"block_size", I(4)}, {"num_blocks", I(4)},
       {"heads", I(2)}, {"kv_heads", I(2)}, {"head_dim", I(8)}},
      kFloats));
  // head_dim 16 with grouped-query heads: on CUDA in 16-bit, the
  // tensor-core kernel (more tokens than sequences, whole fragments).
  out->push_back(Case(
      "cached_attention_prefill_d16", "cached_attention",
      {In("q", {1, 4, 7, 16}), In("k", {1, 2, 7, 16}), In("v", {1, 2, 7, 16}),
       Given("positions", {7}, DT_INT64, {0, 0, 1, 2, 1, 3, 4}),
       Given("seq", {7}, DT_INT64, {0, 1, 0, 0, 1, 0, 0}),
       Given("blocks", {2, 2}, DT_INT64, {3, 0, 1, 2}), Given("seq_ids", {2}, DT_INT64, {0, 1})},
      {{"scale", F(0.25)}, {"layer", I(0)}, {"block_size", I(4)}, {"num_blocks", I(4)},
       {"heads", I(4)}, {"kv_heads", I(2)}, {"head_dim", I(16)}},
      kFloats));
  // 40 tokens of one sequence at head_dim 64: on tensor cores, two query
  // tiles, two key tiles (the running max and O rescaled between them) and
  // four fragments across head_dim.
  std::vector<double> positions(40), seq(40, 0.0), blocks(10);
  for (int i = 0; i < 40; ++i) positions[i] = i;
  for (int i = 0; i < 10; ++i) blocks[i] = (i * 7) % 10;  // out of order
  out->push_back(Case(
      "cached_attention_prefill_d64", "cached_attention",
      {In("q", {1, 4, 40, 64}), In("k", {1, 2, 40, 64}), In("v", {1, 2, 40, 64}),
       Given("positions", {40}, DT_INT64, positions), Given("seq", {40}, DT_INT64, seq),
       Given("blocks", {1, 10}, DT_INT64, blocks), Given("seq_ids", {1}, DT_INT64, {0})},
      {{"scale", F(0.125)}, {"layer", I(0)}, {"block_size", I(4)}, {"num_blocks", I(10)},
       {"heads", I(4)}, {"kv_heads", I(2)}, {"head_dim", I(64)}},
      kFloats));
}

// Steps whose attention the CUDA lowering splits over blocks
// (flash-decoding) and groups query heads in (kernels::AttentionBlocks).
void AddSplitAttention(std::vector<ConformanceCase>* out) {
  // 100 tokens of one sequence whose block table holds 160 keys, at
  // head_dim 8, one KV head for two: on CUDA the CUDA-core kernel, both
  // heads in a block (25 tiles of 4 tokens), its keys split over 3 blocks
  // (kernels::AttentionSplits; the third split sees no key), merged by
  // CombineSplits.
  std::vector<double> long_positions(100), long_seq(100, 0.0), long_blocks(40);
  for (int i = 0; i < 100; ++i) long_positions[i] = i;
  for (int i = 0; i < 40; ++i) long_blocks[i] = (i * 13) % 40;  // out of order
  out->push_back(Case(
      "cached_attention_split_keys", "cached_attention",
      {In("q", {1, 2, 100, 8}), In("k", {1, 1, 100, 8}), In("v", {1, 1, 100, 8}),
       Given("positions", {100}, DT_INT64, long_positions),
       Given("seq", {100}, DT_INT64, long_seq),
       Given("blocks", {1, 40}, DT_INT64, long_blocks), Given("seq_ids", {1}, DT_INT64, {0})},
      {{"scale", F(0.35)}, {"layer", I(0)}, {"block_size", I(4)}, {"num_blocks", I(40)},
       {"heads", I(2)}, {"kv_heads", I(1)}, {"head_dim", I(8)}},
      kFloats));
  // Eight query heads on one KV head (TinyLlama's group of 8), two
  // sequences (12 and 8 tokens, interleaved) whose tables hold 80 keys: on
  // CUDA a block takes one token's 8 heads (tiles of one token, 20 blocks)
  // and its keys split in 2.
  std::vector<double> g_positions, g_seq, g_blocks(40);
  for (int i = 0, p0 = 0, p1 = 0; i < 20; ++i) {
    const bool first = i % 5 < 3;  // 12 of seq 0, 8 of seq 1
    g_seq.push_back(first ? 0 : 1);
    g_positions.push_back(first ? p0++ : p1++);
  }
  for (int i = 0; i < 40; ++i) g_blocks[i] = (i * 17) % 40;
  out->push_back(Case(
      "cached_attention_group8", "cached_attention",
      {In("q", {1, 8, 20, 8}), In("k", {1, 1, 20, 8}), In("v", {1, 1, 20, 8}),
       Given("positions", {20}, DT_INT64, g_positions), Given("seq", {20}, DT_INT64, g_seq),
       Given("blocks", {2, 20}, DT_INT64, g_blocks), Given("seq_ids", {2}, DT_INT64, {0, 1})},
      {{"scale", F(0.35)}, {"layer", I(0)}, {"block_size", I(4)}, {"num_blocks", I(40)},
       {"heads", I(8)}, {"kv_heads", I(1)}, {"head_dim", I(8)}},
      kFloats));
}

void AddSampling(std::vector<ConformanceCase>* out) {
  // Greedy rows (temperature 0, no penalties): each row's argmax.
  out->push_back(Case("sample_tokens_greedy", "sample_tokens",
                      {In("logits", {3, 37}),
                       Given("floats", {3, 4}, DT_FLOAT32, {0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0}),
                       Given("ints", {3, 3}, DT_INT64, {0, 1, 0, 0, 2, 0, 0, 3, 0}),
                       Given("context", {0}, DT_INT64, {}),
                       Given("ends", {3}, DT_INT64, {0, 0, 0})},
                      {}, kFloats));
  // Rows that draw (temperature, top-k, top-p, seeds) or are penalised, over
  // a vocabulary past the kernel's 256-thread stride.
  out->push_back(Case(
      "sample_tokens_sampled", "sample_tokens",
      {In("logits", {4, 300}),
       Given("floats", {4, 4}, DT_FLOAT32,
             {0.8, 0.9, 1, 0, 0, 1, 1.3, 0, 1.1, 0.5, 1.2, 0.4, 0.7, 1, 1, -0.3}),
       Given("ints", {4, 3}, DT_INT64, {5, 3, 0, 0, 1, 0, 0, 11, 2, 0, 12, 5}),
       Given("context", {9}, DT_INT64, {7, 299, 7, 40, 3, 40, 40, 1, 7}),
       Given("ends", {4}, DT_INT64, {0, 3, 6, 9})},
      {}, kFloats));
}

std::vector<ConformanceCase> MakeCases() {
  std::vector<ConformanceCase> out;
  AddArithmetic(&out);
  AddUnary(&out);
  AddNormalizations(&out);
  AddGemms(&out);
  AddShapes(&out);
  AddMakers(&out);
  AddCachedAttention(&out);
  AddSplitAttention(&out);
  AddSampling(&out);
  return out;
}

std::vector<double> Draw(const InputSpec& in, int64_t n, std::mt19937* rng) {
  if (in.values == Values::kGiven) return in.given;
  std::vector<double> v(n);
  std::uniform_real_distribution<double> signed_dist(-2, 2), positive(0.5, 2);
  std::uniform_int_distribution<int> small(1, 4), coin(0, 1);
  std::uniform_int_distribution<int64_t> index(0, std::max<int64_t>(in.high - 1, 0));
  for (double& x : v) {
    switch (in.values) {
      case Values::kSigned: x = signed_dist(*rng); break;
      case Values::kPositive: x = positive(*rng); break;
      case Values::kSmallInt: x = small(*rng) * (coin(*rng) ? 1 : -1); break;
      case Values::kIndex: x = static_cast<double>(index(*rng)); break;
      case Values::kBool: x = coin(*rng); break;
      case Values::kGiven: break;
    }
  }
  return v;
}

}  // namespace

const std::vector<ConformanceCase>& ConformanceCases() {
  static const auto* cases = new std::vector<ConformanceCase>(MakeCases());
  return *cases;
}

Tensor TensorOf(const Shape& shape, DataType dtype, const std::vector<double>& values) {
  Tensor t = Tensor::Empty(shape, dtype);
  for (int64_t i = 0; i < t.numel(); ++i) {
    const double x = values[i];
    switch (dtype) {
      case DT_FLOAT32: t.data()[i] = static_cast<float>(x); break;
      case DT_FLOAT16: t.data_as<uint16_t>()[i] = FloatToHalf(static_cast<float>(x)); break;
      case DT_BFLOAT16: t.data_as<uint16_t>()[i] = FloatToBf16(static_cast<float>(x)); break;
      case DT_INT64: t.data_as<int64_t>()[i] = static_cast<int64_t>(x); break;
      case DT_INT32: t.data_as<int32_t>()[i] = static_cast<int32_t>(x); break;
      case DT_BOOL: t.data_as<uint8_t>()[i] = x != 0; break;
      default: break;
    }
  }
  return t;
}

absl::StatusOr<CaseInstance> Instantiate(const ConformanceCase& c, DataType dtype, uint32_t seed) {
  CaseInstance run;
  std::mt19937 rng(seed);
  Node& node = run.node;
  node = c.node;
  node.set_name("op");
  node.add_outputs("out");
  for (const InputSpec& in : c.inputs) {
    const DataType t = in.dtype == DT_INVALID ? dtype : in.dtype;
    Tensor value = TensorOf(in.shape, t, Draw(in, NumElements(in.shape), &rng));
    run.node_inputs.push_back(value);
    if (in.param) {
      TensorInfo* info = run.graph.add_params();
      info->set_fqn(in.name);
      info->set_dtype(t);
      for (int64_t d : in.shape) info->add_shape(d);
      info->set_byte_size(value.byte_size());
      info->set_in_state_dict(true);
      run.graph.add_state_dict_keys(in.name);
      Node* p = run.graph.add_nodes();
      p->set_name("param_" + in.name);
      p->set_op("param");
      p->add_outputs(in.name);
      (*p->mutable_attrs())["fqn"].set_s(in.name);
      run.weights[in.name] = value;
    } else {
      ValueSpec* spec = run.graph.add_inputs();
      spec->set_name(in.name);
      spec->set_dtype(t);
      for (int64_t d : in.shape) spec->add_shape(d);
      run.inputs.push_back(value);
    }
    node.add_inputs(in.name);
  }
  *run.graph.add_nodes() = node;
  run.graph.add_outputs("out");
  return run;
}

}  // namespace pipeserve
