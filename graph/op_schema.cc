#include "graph/op_schema.h"

#include <algorithm>
#include <cmath>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/match.h"
#include "graph/dtype.h"

namespace pipeserve {
namespace {

using Shapes = std::vector<Shape>;
using Types = std::vector<DataType>;
using InferResult = absl::StatusOr<Shapes>;

absl::Status Mismatch(absl::string_view what, const Shape& a, const Shape& b) {
  return absl::InvalidArgumentError(absl::StrCat(
      what, ": ", ShapeToString(a), " and ", ShapeToString(b)));
}

absl::Status Bad(absl::string_view what) {
  return absl::InvalidArgumentError(what);
}

// Concrete dimension for cost estimates: an unknown one counts as 16.
double Dim(int64_t d) { return d < 0 ? 16.0 : static_cast<double>(d); }

double Elements(const Shape& s) {
  double n = 1;
  for (int64_t d : s) n *= Dim(d);
  return n;
}

bool Known(const Shape& s) {
  return std::all_of(s.begin(), s.end(), [](int64_t d) { return d >= 0; });
}

InferResult One(Shape s) { return Shapes{std::move(s)}; }

InferResult SameShape(const Node&, const Shapes& in) { return One(in[0]); }

// Two dimensions that must be equal, either possibly unknown.
bool DimsAgree(int64_t a, int64_t b) { return a < 0 || b < 0 || a == b; }

// x [M, K] @ w [K, N] -> [M, N]
InferResult InferMm(const Node&, const Shapes& in) {
  const Shape& a = in[0];
  const Shape& b = in[1];
  if (a.size() != 2 || b.size() != 2) {
    return Mismatch("mm needs two 2-D tensors, got", a, b);
  }
  if (!DimsAgree(a[1], b[0])) return Mismatch("mm inner dimensions differ", a, b);
  return One({a[0], b[1]});
}

// torch.matmul for operands of rank >= 1: batch dimensions broadcast.
InferResult InferMatmul(const Node&, const Shapes& in) {
  Shape a = in[0];
  Shape b = in[1];
  if (a.empty() || b.empty()) return Mismatch("matmul needs tensors of rank >= 1, got", a, b);
  bool a_vec = a.size() == 1, b_vec = b.size() == 1;
  if (a_vec) a.insert(a.begin(), 1);
  if (b_vec) b.push_back(1);
  if (!DimsAgree(a.back(), b[b.size() - 2])) {
    return Mismatch("matmul inner dimensions differ", in[0], in[1]);
  }
  Shape batch_a(a.begin(), a.end() - 2), batch_b(b.begin(), b.end() - 2);
  absl::StatusOr<Shape> batch = BroadcastShapes(batch_a, batch_b);
  if (!batch.ok()) return Mismatch("matmul batch dimensions do not broadcast", in[0], in[1]);
  Shape out = *batch;
  if (!a_vec) out.push_back(a[a.size() - 2]);
  if (!b_vec) out.push_back(b.back());
  return One(out);
}

// x [..., in] , weight [out, in], bias [out] -> [..., out]
InferResult InferLinear(const Node&, const Shapes& in) {
  const Shape& x = in[0];
  const Shape& w = in[1];
  if (x.empty() || w.size() != 2) {
    return Mismatch("linear needs x [..., in] and weight [out, in], got", x, w);
  }
  if (!DimsAgree(x.back(), w[1])) {
    return Mismatch("linear input features differ from weight [out, in]", x, w);
  }
  if (in.size() == 3 && (in[2].size() != 1 || !DimsAgree(in[2][0], w[0]))) {
    return Mismatch("linear bias must be [out] for weight", in[2], w);
  }
  Shape out = x;
  out.back() = w[0];
  return One(out);
}

// torch.addmm(bias, a [M, K], b [K, N]): bias broadcasts to [M, N].
InferResult InferAddmm(const Node& node, const Shapes& in) {
  InferResult mm = InferMm(node, {in[1], in[2]});
  if (!mm.ok()) return mm;
  absl::StatusOr<Shape> out = BroadcastShapes(in[0], (*mm)[0]);
  if (!out.ok() || *out != (*mm)[0]) {
    return Mismatch("addmm bias does not broadcast to the product", in[0], (*mm)[0]);
  }
  return mm;
}

InferResult InferBinary(const Node& node, const Shapes& in) {
  bool scalar = HasScalarOperand(node);
  if (scalar && in.size() != 1) {
    return Bad("a binary op with a \"scalar\" attribute takes one tensor input");
  }
  if (!scalar && in.size() != 2) {
    return Bad("a binary op takes two tensor inputs, or one and a \"scalar\" attribute");
  }
  if (scalar) return One(in[0]);
  absl::StatusOr<Shape> out = BroadcastShapes(in[0], in[1]);
  if (!out.ok()) return out.status();
  return One(*out);
}

absl::StatusOr<DataType> SameTypes(const Node& node, const Types& in) {
  for (size_t i = 1; i < in.size(); ++i) {
    if (in[i] != in[0]) {
      return Bad(absl::StrCat("inputs have different dtypes (", TorchName(in[0]), " and ",
                              TorchName(in[i]), "); the exporter casts them first"));
    }
  }
  return in[0];
}

absl::StatusOr<DataType> FloatOnly(const Node& node, const Types& in) {
  absl::StatusOr<DataType> t = SameTypes(node, in);
  if (!t.ok()) return t;
  if (!IsFloatingPoint(*t)) {
    return Bad(absl::StrCat("needs a floating-point input, got ", TorchName(*t)));
  }
  return t;
}

absl::StatusOr<DataType> Compare(const Node& node, const Types& in) {
  absl::StatusOr<DataType> t = SameTypes(node, in);
  if (!t.ok()) return t;
  return DT_BOOL;
}

// The "dtype" attribute (a DataType number).
absl::StatusOr<DataType> AttrType(const Node& node, const Types&) {
  int64_t t = IntAttr(node, "dtype", DT_INVALID);
  if (!IsValidDataType(static_cast<int>(t))) {
    return Bad(absl::StrCat("attribute \"dtype\" = ", t, " is not a DataType"));
  }
  return static_cast<DataType>(t);
}

absl::StatusOr<DataType> Int64Out(const Node&, const Types&) { return DT_INT64; }

absl::StatusOr<int> DimAttr(const Node& node, const std::string& name, int rank) {
  auto it = node.attrs().find(name);
  if (it == node.attrs().end()) {
    return Bad(absl::StrCat("missing attribute \"", name, "\""));
  }
  return NormalizeDim(it->second.i(), rank);
}

// softmax, log_softmax (attr dim).
// cached_attention(q, k, v, kv_positions, kv_seq, kv_blocks, kv_seq_ids)
// (export(generation=True)): q [1, H, T, D], k and v [1, Hkv, T, D] with H
// a multiple of Hkv, positions and seq [T], blocks [N, B], seq_ids [N].
// Hkv and D are the cache's (attributes kv_heads and head_dim, where
// given): a kernel indexes the cache by them. The output is q's shape.
InferResult InferCachedAttention(const Node& node, const Shapes& in) {
  const Shape& q = in[0];
  const Shape& k = in[1];
  const int64_t kv_heads = IntAttr(node, "kv_heads", -1), head_dim = IntAttr(node, "head_dim", -1);
  auto qkv = [&](absl::string_view what) {
    return Bad(absl::StrCat("q ", ShapeToString(q), ", k ", ShapeToString(k), ", v ",
                            ShapeToString(in[2]), ": ", what));
  };
  if (q.size() != 4 || k.size() != 4 || k != in[2] || !DimsAgree(q[0], 1) ||
      !DimsAgree(k[0], 1) || !DimsAgree(q[2], k[2])) {
    return qkv("need [1, heads, tokens, head_dim]");
  }
  if (!DimsAgree(k[1], kv_heads) || !DimsAgree(q[3], head_dim) || !DimsAgree(k[3], head_dim)) {
    return qkv(absl::StrCat("the cache holds ", kv_heads, " KV heads of ", head_dim));
  }
  if (q[1] == 0 || k[1] == 0 || (q[1] > 0 && k[1] > 0 && q[1] % k[1] != 0)) {
    return qkv("q's heads must be a multiple of k's");
  }
  if (in[3].size() != 1 || in[4].size() != 1 || in[5].size() != 2 || in[6].size() != 1 ||
      !DimsAgree(in[3][0], q[2]) || !DimsAgree(in[4][0], q[2]) ||
      !DimsAgree(in[5][0], in[6][0])) {
    return Bad("the cache metadata must be positions [T], seq [T], blocks [N, B], seq_ids [N]");
  }
  return One(q);
}

absl::StatusOr<DataType> CachedAttentionType(const Node& node, const Types& in) {
  if (!IsFloatingPoint(in[0]) || in[1] != in[0] || in[2] != in[0]) {
    return Bad("q, k and v must share one floating-point type");
  }
  for (size_t i = 3; i < in.size(); ++i) {
    if (in[i] != DT_INT64) return Bad("the cache metadata must be int64");
  }
  return in[0];
}

// sample_tokens(logits [N, V], floats [N, 4], ints [N, 3], context [C],
// context_ends [N]) -> each sequence's next token [N] (int64), sampled on
// the last stage (export(generation=True); runtime/sampler.h). floats:
// temperature, top_p, repetition_penalty, frequency_penalty; ints: top_k,
// seed, tokens generated so far; sequence i's context (prompt and output,
// given only when it has penalties) is context[ends[i-1]:ends[i]].
InferResult InferSampleTokens(const Node& node, const Shapes& in) {
  const Shape& logits = in[0];
  const bool fits = logits.size() == 2 && in[1] == Shape{logits[0], 4} &&
                    in[2] == Shape{logits[0], 3} && in[3].size() == 1 &&
                    in[4] == Shape{logits[0]};
  if (!fits) {
    return Bad(absl::StrCat("logits ", ShapeToString(logits), ", floats ", ShapeToString(in[1]),
                            ", ints ", ShapeToString(in[2]), ", context ", ShapeToString(in[3]),
                            ", ends ", ShapeToString(in[4]),
                            ": need [N, V], [N, 4], [N, 3], [C], [N]"));
  }
  return One(Shape{logits[0]});
}

absl::StatusOr<DataType> SampleTokensType(const Node& node, const Types& in) {
  if (!IsFloatingPoint(in[0]) || in[1] != DT_FLOAT32 || in[2] != DT_INT64 ||
      in[3] != DT_INT64 || in[4] != DT_INT64) {
    return Bad("sample_tokens takes floating-point logits, float32 floats and int64 "
               "ints, context and ends");
  }
  return DT_INT64;
}

InferResult InferSoftmax(const Node& node, const Shapes& in) {
  absl::StatusOr<int> d = DimAttr(node, "dim", static_cast<int>(in[0].size()));
  if (!d.ok()) return d.status();
  return One(in[0]);
}

// layer_norm(x, [weight], [bias]); attrs ndim (normalized trailing dims),
// eps, has_weight, has_bias.
InferResult InferLayerNorm(const Node& node, const Shapes& in) {
  int64_t nd = IntAttr(node, "ndim", 1);
  const Shape& x = in[0];
  if (nd < 1 || nd > static_cast<int64_t>(x.size())) {
    return Bad(absl::StrCat("layer_norm over ", nd, " dims of ", ShapeToString(x)));
  }
  size_t expected = 1 + (IntAttr(node, "has_weight", 0) ? 1 : 0) +
                    (IntAttr(node, "has_bias", 0) ? 1 : 0);
  if (in.size() != expected) {
    return Bad(absl::StrCat("layer_norm takes ", expected, " inputs for its "
                            "has_weight/has_bias attributes, got ", in.size()));
  }
  Shape normalized(x.end() - nd, x.end());
  for (size_t i = 1; i < in.size(); ++i) {
    bool ok = in[i].size() == normalized.size();
    for (size_t d = 0; ok && d < normalized.size(); ++d) ok = DimsAgree(in[i][d], normalized[d]);
    if (!ok) return Mismatch("layer_norm weight/bias must be the normalized shape", in[i], x);
  }
  return One(x);
}

}  // namespace

absl::Status CheckReductionHasValues(const Node& node, const Shape& x) {
  if (node.op() != "amax") return absl::OkStatus();
  std::vector<int64_t> dims = ResolvedInts(node, "dims", {}, -1);
  std::vector<bool> reduce(x.size(), dims.empty());
  for (int64_t d : dims) {
    absl::StatusOr<int> nd = NormalizeDim(d, static_cast<int>(x.size()));
    if (nd.ok()) reduce[*nd] = true;
  }
  bool reduced_empty = false, kept_empty = false;
  for (size_t i = 0; i < x.size(); ++i) (reduce[i] ? reduced_empty : kept_empty) |= x[i] == 0;
  if (!reduced_empty || kept_empty) return absl::OkStatus();
  return Bad(absl::StrCat("amax over a dimension of size 0 (input ", ShapeToString(x),
                          ") has no value; PyTorch refuses it too"));
}

namespace {

// sum/mean/amax over attr dims (empty: all), keepdim.
InferResult InferReduce(const Node& node, const Shapes& in) {
  const Shape& x = in[0];
  std::vector<int64_t> dims = ResolvedInts(node, "dims", {}, -1);
  std::vector<bool> reduce(x.size(), dims.empty());
  for (int64_t d : dims) {
    absl::StatusOr<int> nd = NormalizeDim(d, static_cast<int>(x.size()));
    if (!nd.ok()) return nd.status();
    reduce[*nd] = true;
  }
  if (absl::Status s = CheckReductionHasValues(node, x); !s.ok()) return s;
  bool keep = IntAttr(node, "keepdim", 0) != 0;
  Shape out;
  for (size_t i = 0; i < x.size(); ++i) {
    if (!reduce[i]) out.push_back(x[i]);
    else if (keep) out.push_back(1);
  }
  return One(out);
}

// embedding(ids [...], weight [V, D]) -> [..., D]
InferResult InferEmbedding(const Node&, const Shapes& in) {
  if (in[1].size() != 2) return Mismatch("embedding needs ids and a 2-D weight, got", in[0], in[1]);
  Shape out = in[0];
  out.push_back(in[1][1]);
  return One(out);
}

absl::StatusOr<DataType> EmbeddingType(const Node&, const Types& in) {
  if (!IsInteger(in[0])) return Bad(absl::StrCat("embedding ids must be int64 or int32, got ", TorchName(in[0])));
  return in[1];
}

// reshape(x, sym...): attr shape (one -1 to infer), shape_from.
InferResult InferReshape(const Node& node, const Shapes& in) {
  std::vector<int64_t> shape = ResolvedInts(node, "shape", {}, -2);
  const Shape& x = in[0];
  int infer_at = -1;
  bool unknown = !Known(x);
  int64_t product = 1;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] == -1) {
      if (infer_at >= 0) return Bad("reshape: more than one -1 in shape");
      infer_at = static_cast<int>(i);
    } else if (shape[i] == -2) {
      unknown = true;
    } else if (shape[i] < 0) {
      return Bad(absl::StrCat("reshape: invalid size ", shape[i]));
    } else if (shape[i] > 0 && product > static_cast<int64_t>(kMaxElements) / shape[i]) {
      // Unchecked, [2^62 + 1, 4] wrapped to 4 elements: a view of 4 read
      // as 2^64.
      return Bad(absl::StrCat("reshape to ", absl::StrJoin(shape, ","), ": more than 2^62 elements"));
    } else {
      product *= shape[i];
    }
  }
  Shape out(shape.begin(), shape.end());
  for (int64_t& d : out) if (d == -2) d = -1;
  if (!unknown) {
    int64_t n = NumElements(x);
    if (infer_at >= 0) {
      if (product == 0 || n % product != 0) {
        return Bad(absl::StrCat("reshape of ", ShapeToString(x), " to ",
                                absl::StrJoin(shape, ","), ": sizes do not divide"));
      }
      out[infer_at] = n / product;
    } else if (product != n) {
      return Bad(absl::StrCat("reshape of ", ShapeToString(x), " (", n, " elements) to ",
                              ShapeToString(out), " (", product, ")"));
    }
  } else if (infer_at >= 0 && Known(x) ) {
    out[infer_at] = -1;
  }
  return One(out);
}

// permute(x): attr dims.
InferResult InferPermute(const Node& node, const Shapes& in) {
  std::vector<int64_t> dims = ResolvedInts(node, "dims", {}, -1);
  const Shape& x = in[0];
  if (dims.size() != x.size()) {
    return Bad(absl::StrCat("permute of a rank-", x.size(), " tensor needs ", x.size(),
                            " dims, got ", dims.size()));
  }
  std::vector<bool> seen(x.size(), false);
  Shape out;
  for (int64_t d : dims) {
    absl::StatusOr<int> nd = NormalizeDim(d, static_cast<int>(x.size()));
    if (!nd.ok()) return nd.status();
    if (seen[*nd]) return Bad("permute: a dimension appears twice");
    seen[*nd] = true;
    out.push_back(x[*nd]);
  }
  return One(out);
}

InferResult InferUnsqueeze(const Node& node, const Shapes& in) {
  Shape out = in[0];
  absl::StatusOr<int> d = DimAttr(node, "dim", static_cast<int>(out.size()) + 1);
  if (!d.ok()) return d.status();
  out.insert(out.begin() + *d, 1);
  return One(out);
}

InferResult InferSqueeze(const Node& node, const Shapes& in) {
  const Shape& x = in[0];
  std::vector<int64_t> dims = ResolvedInts(node, "dims", {}, -1);
  std::vector<bool> drop(x.size(), false);
  for (int64_t d : dims) {
    absl::StatusOr<int> nd = NormalizeDim(d, static_cast<int>(x.size()));
    if (!nd.ok()) return nd.status();
    drop[*nd] = x[*nd] == 1;  // PyTorch leaves a dim that is not 1
  }
  Shape out;
  for (size_t i = 0; i < x.size(); ++i) if (!drop[i]) out.push_back(x[i]);
  return One(out);
}

// expand(x, sym...): attr shape (-1 keeps), shape_from.
InferResult InferExpand(const Node& node, const Shapes& in) {
  std::vector<int64_t> shape = ResolvedInts(node, "shape", {}, -2);
  const Shape& x = in[0];
  if (shape.size() < x.size()) {
    return Bad(absl::StrCat("expand of ", ShapeToString(x), " to fewer dims"));
  }
  Shape out(shape.size());
  size_t lead = shape.size() - x.size();
  for (size_t i = 0; i < shape.size(); ++i) {
    int64_t have = i < lead ? 1 : x[i - lead];
    int64_t want = shape[i];
    if (want == -1) {
      if (i < lead) return Bad("expand: -1 for a new leading dimension");
      out[i] = have;
    } else if (want == -2) {
      out[i] = have == 1 ? -1 : have;
    } else {
      if (have != 1 && have >= 0 && have != want) {
        return Bad(absl::StrCat("expand of ", ShapeToString(x), " to ",
                                absl::StrJoin(shape, ","), ": dim ", i, " is ", have));
      }
      out[i] = want;
    }
  }
  return One(out);
}

// slice(x, sym...): attrs dim, start, stop, step (> 0); start_from, stop_from.
InferResult InferSlice(const Node& node, const Shapes& in) {
  const Shape& x = in[0];
  absl::StatusOr<int> d = DimAttr(node, "dim", static_cast<int>(x.size()));
  if (!d.ok()) return d.status();
  int64_t step = IntAttr(node, "step", 1);
  if (step < 1) return Bad(absl::StrCat("slice step must be positive, got ", step));
  int64_t n = x[*d];
  int64_t start = IntAttr(node, "start", 0, {}, INT64_MIN);
  int64_t stop = IntAttr(node, "stop", INT64_MAX, {}, INT64_MIN);
  Shape out = x;
  if (n < 0 || start == INT64_MIN || stop == INT64_MIN) {
    out[*d] = -1;
    return One(out);
  }
  auto clamp = [n](int64_t v) {
    if (v < 0) v += n;
    return std::min(std::max<int64_t>(v, 0), n);
  };
  int64_t b = clamp(start), e = clamp(stop);
  out[*d] = e > b ? (e - b + step - 1) / step : 0;
  return One(out);
}

// select(x): attrs dim, index (may be negative).
InferResult InferSelect(const Node& node, const Shapes& in) {
  const Shape& x = in[0];
  absl::StatusOr<int> d = DimAttr(node, "dim", static_cast<int>(x.size()));
  if (!d.ok()) return d.status();
  int64_t index = IntAttr(node, "index", 0);
  if (x[*d] >= 0 && (index >= x[*d] || index < -x[*d])) {
    return Bad(absl::StrCat("select index ", index, " is out of range for dim ", *d,
                            " of ", ShapeToString(x)));
  }
  Shape out = x;
  out.erase(out.begin() + *d);
  return One(out);
}

// cat / stack of every input along attr dim.
InferResult InferCat(const Node& node, const Shapes& in) {
  const Shape& first = in[0];
  bool stack = node.op() == "stack";
  int rank = static_cast<int>(first.size()) + (stack ? 1 : 0);
  absl::StatusOr<int> d = DimAttr(node, "dim", rank);
  if (!d.ok()) return d.status();
  Shape out = first;
  if (stack) out.insert(out.begin() + *d, static_cast<int64_t>(in.size()));
  for (size_t i = 1; i < in.size(); ++i) {
    if (in[i].size() != first.size()) return Mismatch("cat/stack inputs differ in rank", first, in[i]);
    for (size_t k = 0; k < first.size(); ++k) {
      if (!stack && static_cast<int>(k) == *d) continue;
      if (!DimsAgree(in[i][k], first[k])) return Mismatch("cat/stack inputs differ", first, in[i]);
    }
    if (!stack) out[*d] = (out[*d] < 0 || in[i][*d] < 0) ? -1 : out[*d] + in[i][*d];
  }
  return One(out);
}

// arange(sym...): attrs start, end, step; start_from, end_from; dtype.
InferResult InferArange(const Node& node, const Shapes&) {
  int64_t start = IntAttr(node, "start", 0, {}, INT64_MIN);
  int64_t end = IntAttr(node, "end", 0, {}, INT64_MIN);
  int64_t step = IntAttr(node, "step", 1);
  if (step == 0) return Bad("arange step is 0");
  if (start == INT64_MIN || end == INT64_MIN) return One({-1});
  int64_t n = step > 0 ? (end - start + step - 1) / step : (start - end - step - 1) / -step;
  return One({std::max<int64_t>(n, 0)});
}

// full(sym...): attrs shape, shape_from, value, dtype.
InferResult InferFull(const Node& node, const Shapes&) {
  std::vector<int64_t> shape = ResolvedInts(node, "shape", {}, -1);
  for (int64_t d : shape) {
    if (d < -1) return Bad(absl::StrCat("full: invalid size ", d));
  }
  return One(Shape(shape.begin(), shape.end()));
}

// size(x): attr dim -> a rank-0 int64.
InferResult InferSize(const Node& node, const Shapes& in) {
  absl::StatusOr<int> d = DimAttr(node, "dim", static_cast<int>(in[0].size()));
  if (!d.ok()) return d.status();
  return One({});
}

InferResult InferWhere(const Node&, const Shapes& in) {
  absl::StatusOr<Shape> ab = BroadcastShapes(in[1], in[2]);
  if (!ab.ok()) return ab.status();
  absl::StatusOr<Shape> out = BroadcastShapes(in[0], *ab);
  if (!out.ok()) return out.status();
  return One(*out);
}

absl::StatusOr<DataType> WhereType(const Node& node, const Types& in) {
  if (in[0] != DT_BOOL) return Bad(absl::StrCat("where's condition must be bool, got ", TorchName(in[0])));
  return SameTypes(node, {in[1], in[2]});
}

InferResult InferTri(const Node&, const Shapes& in) {
  if (in[0].size() < 2) return Bad(absl::StrCat("triu/tril need rank >= 2, got ", ShapeToString(in[0])));
  return One(in[0]);
}

using Ops = absl::flat_hash_map<std::string, OpSchema>;

double ZeroFlops(const Shapes&) { return 0.0; }

double ElementwiseFlops(const Shapes& in) {
  double n = 0;
  for (const Shape& s : in) n = std::max(n, Elements(s));
  return n;
}

// A matmul's flops, broadcasting over b's batch dims.
double MatmulFlops(const Shapes& in) {
  const Shape& a = in[0];
  const Shape& b = in[1];
  double n = b.size() >= 2 ? Dim(b.back()) : 1.0;
  double batch_b = 1;
  for (size_t i = 0; i + 2 < b.size(); ++i) batch_b *= Dim(b[i]);
  return 2.0 * std::max(Elements(a), 1.0) * n * (a.size() + 2 <= b.size() ? batch_b : 1.0);
}

// The ops that compute: GEMMs, elementwise, normalization, attention,
// sampling, reductions.
void AddComputeOps(Ops* ops) {
  auto add = [&](OpSchema s) { (*ops)[s.name] = std::move(s); };
  const auto zero_flops = ZeroFlops;
  const auto elementwise_flops = ElementwiseFlops;
  const auto matmul_flops = MatmulFlops;
  add({"mm", 2, 2, 1, InferMm, [](const Shapes& in) {
         return 2.0 * Dim(in[0][0]) * Dim(in[0][1]) * Dim(in[1][1]);
       }, FloatOnly});
  add({"matmul", 2, 2, 1, InferMatmul, matmul_flops, FloatOnly});
  add({"linear", 2, 3, 1, InferLinear, [](const Shapes& in) {
         return 2.0 * Elements(in[0]) * Dim(in[1][0]);
       }, FloatOnly});
  add({"addmm", 3, 3, 1, InferAddmm, [](const Shapes& in) {
         return 2.0 * Dim(in[1][0]) * Dim(in[1][1]) * Dim(in[2][1]);
       }, FloatOnly});
  for (const char* name : {"add", "sub", "mul", "div", "floordiv", "pow", "maximum", "minimum"}) {
    add({name, 1, 2, 1, InferBinary, elementwise_flops, SameTypes});
  }
  for (const char* name : {"eq", "ne", "lt", "le", "gt", "ge"}) {
    add({name, 1, 2, 1, InferBinary, elementwise_flops, Compare});
  }
  for (const char* name : {"logical_and", "logical_or"}) {
    add({name, 2, 2, 1, InferBinary, elementwise_flops, Compare});
  }
  add({"logical_not", 1, 1, 1, SameShape, elementwise_flops, Compare});
  for (const char* name : {"relu", "clone", "identity", "neg", "abs"}) {
    add({name, 1, 1, 1, SameShape, elementwise_flops, nullptr});
  }
  for (const char* name : {"gelu", "silu", "tanh", "sigmoid", "sqrt", "rsqrt", "exp", "log",
                           "cos", "sin"}) {
    add({name, 1, 1, 1, SameShape, elementwise_flops, FloatOnly});
  }
  add({"where", 3, 3, 1, InferWhere, elementwise_flops, WhereType});
  add({"softmax", 1, 1, 1, InferSoftmax, elementwise_flops, FloatOnly});
  add({"cached_attention", 7, 7, 1, InferCachedAttention,
       [](const Shapes& in) {  // q.k and p.v over the tokens of the step
         return in[0].empty() ? 0.0 : 4.0 * static_cast<double>(NumElements(in[0])) *
                                          std::max<int64_t>(in[0][2], 1);
       },
       CachedAttentionType});
  add({"sample_tokens", 5, 5, 1, InferSampleTokens, zero_flops, SampleTokensType});
  add({"log_softmax", 1, 1, 1, InferSoftmax, elementwise_flops, FloatOnly});
  add({"layer_norm", 1, 3, 1, InferLayerNorm, elementwise_flops, FloatOnly});
  // PyTorch's mean takes only floating-point tensors.
  add({"mean", 1, 1, 1, InferReduce, elementwise_flops, FloatOnly});
  for (const char* name : {"sum", "amax"}) {
    add({name, 1, 1, 1, InferReduce, elementwise_flops, nullptr});
  }
}

// The ops that move, make or describe values, and the markers.
void AddShapeOps(Ops* ops) {
  auto add = [&](OpSchema s) { (*ops)[s.name] = std::move(s); };
  const auto zero_flops = ZeroFlops;
  add({"embedding", 2, 2, 1, InferEmbedding, zero_flops, EmbeddingType});
  add({"reshape", 1, 64, 1, InferReshape, zero_flops, nullptr});
  add({"permute", 1, 1, 1, InferPermute, zero_flops, nullptr});
  add({"unsqueeze", 1, 1, 1, InferUnsqueeze, zero_flops, nullptr});
  add({"squeeze", 1, 1, 1, InferSqueeze, zero_flops, nullptr});
  add({"expand", 1, 64, 1, InferExpand, zero_flops, nullptr});
  add({"slice", 1, 3, 1, InferSlice, zero_flops, nullptr});
  add({"select", 1, 1, 1, InferSelect, zero_flops, nullptr});
  add({"cat", 1, 1024, 1, InferCat, zero_flops, SameTypes});
  add({"stack", 1, 1024, 1, InferCat, zero_flops, SameTypes});
  add({"arange", 0, 2, 1, InferArange, zero_flops, AttrType});
  add({"full", 0, 64, 1, InferFull, zero_flops, AttrType});
  add({"cast", 1, 1, 1, SameShape, zero_flops, AttrType});
  add({"triu", 1, 1, 1, InferTri, zero_flops, nullptr});
  add({"tril", 1, 1, 1, InferTri, zero_flops, nullptr});
  add({"size", 1, 1, 1, InferSize, zero_flops, Int64Out});
  // "param" shapes come from the parameter table, not from inputs.
  add({std::string(kParamOp), 0, 0, 1, nullptr, zero_flops, nullptr});
  add({std::string(kPipeSplitOp), 0, 0, 0,
       [](const Node&, const Shapes&) -> InferResult { return Shapes{}; }, zero_flops,
       nullptr});
}

Ops MakeRegistry() {
  Ops ops;
  AddComputeOps(&ops);
  AddShapeOps(&ops);
  return ops;
}

const absl::flat_hash_map<std::string, OpSchema>& Registry() {
  static const auto* ops =
      new absl::flat_hash_map<std::string, OpSchema>(MakeRegistry());
  return *ops;
}

const AttrValue* FindAttr(const Node& node, const std::string& name) {
  auto it = node.attrs().find(name);
  return it == node.attrs().end() ? nullptr : &it->second;
}

}  // namespace

bool HasScalarOperand(const Node& node) {
  return node.attrs().contains("scalar");
}

std::vector<int64_t> ResolvedInts(const Node& node, const std::string& name,
                                  const std::vector<int64_t>& sym, int64_t unknown) {
  std::vector<int64_t> out;
  const AttrValue* a = FindAttr(node, name);
  if (a == nullptr) return out;
  out.assign(a->ints().v().begin(), a->ints().v().end());
  const AttrValue* from = FindAttr(node, name + "_from");
  if (from == nullptr) return out;
  for (int i = 0; i < from->ints().v_size() && i < static_cast<int>(out.size()); ++i) {
    int64_t k = from->ints().v(i);
    if (k > 0) out[i] = (static_cast<size_t>(k) <= sym.size()) ? sym[k - 1] : unknown;
  }
  return out;
}

int64_t IntAttr(const Node& node, const std::string& name, int64_t fallback,
                const std::vector<int64_t>& sym, int64_t unknown) {
  const AttrValue* from = FindAttr(node, name + "_from");
  if (from != nullptr && from->i() > 0) {
    return static_cast<size_t>(from->i()) <= sym.size() ? sym[from->i() - 1] : unknown;
  }
  const AttrValue* a = FindAttr(node, name);
  if (a == nullptr) return fallback;
  return a->value_case() == AttrValue::kF ? static_cast<int64_t>(a->f()) : a->i();
}

double FloatAttr(const Node& node, const std::string& name, double fallback) {
  const AttrValue* a = FindAttr(node, name);
  if (a == nullptr) return fallback;
  return a->value_case() == AttrValue::kI ? static_cast<double>(a->i()) : a->f();
}

std::string StringAttr(const Node& node, const std::string& name) {
  const AttrValue* a = FindAttr(node, name);
  return a == nullptr ? std::string() : a->s();
}

Node ResolveSymbolic(const Node& node, const std::vector<int64_t>& sym) {
  Node out = node;
  for (const auto& [key, value] : node.attrs()) {
    if (!absl::EndsWith(key, "_from")) continue;
    std::string base = key.substr(0, key.size() - 5);
    if (value.value_case() == AttrValue::kInts) {
      std::vector<int64_t> v = ResolvedInts(node, base, sym, 0);
      AttrValue& dst = (*out.mutable_attrs())[base];
      dst.mutable_ints()->mutable_v()->Assign(v.begin(), v.end());
    } else {
      (*out.mutable_attrs())[base].set_i(IntAttr(node, base, 0, sym, 0));
    }
    out.mutable_attrs()->erase(key);
  }
  return out;
}

std::vector<int64_t> ContiguousStrides(const Shape& s) {
  std::vector<int64_t> st(s.size());
  int64_t n = 1;
  for (size_t i = s.size(); i-- > 0;) {
    st[i] = n;
    n *= s[i];
  }
  return st;
}

StridedView SliceView(const Node& node, const Shape& x) {
  const int d = *NormalizeDim(IntAttr(node, "dim", 0), static_cast<int>(x.size()));
  StridedView v{0, ContiguousStrides(x)};
  const int64_t n = x[d];
  if (node.op() == "slice") {
    int64_t start = IntAttr(node, "start", 0);
    if (start < 0) start += n;
    v.offset = std::min(std::max<int64_t>(start, 0), n) * v.strides[d];
    v.strides[d] *= IntAttr(node, "step", 1);
  } else {
    int64_t index = IntAttr(node, "index", 0);
    if (index < 0) index += n;
    v.offset = index * v.strides[d];
    v.strides.erase(v.strides.begin() + d);
  }
  return v;
}

absl::StatusOr<int> NormalizeDim(int64_t dim, int rank) {
  if (dim < -rank || dim >= rank || rank == 0) {
    if (!(rank == 0 && (dim == 0 || dim == -1))) {
      return absl::InvalidArgumentError(
          absl::StrCat("dim ", dim, " is out of range for rank ", rank));
    }
    return 0;
  }
  return static_cast<int>(dim < 0 ? dim + rank : dim);
}

absl::StatusOr<Shape> BroadcastShapes(const Shape& a, const Shape& b) {
  size_t rank = std::max(a.size(), b.size());
  Shape out(rank);
  for (size_t i = 0; i < rank; ++i) {
    // Align from the right, as numpy does. -1 (unknown) fits anything.
    int64_t da = i < rank - a.size() ? 1 : a[i - (rank - a.size())];
    int64_t db = i < rank - b.size() ? 1 : b[i - (rank - b.size())];
    if (da == db || db == 1) {
      out[i] = da;
    } else if (da == 1) {
      out[i] = db;
    } else if (da < 0) {
      out[i] = db;
    } else if (db < 0) {
      out[i] = da;
    } else {
      return Mismatch("shapes do not broadcast", a, b);
    }
  }
  return out;
}

const OpSchema* FindOp(absl::string_view op) {
  auto it = Registry().find(op);
  return it == Registry().end() ? nullptr : &it->second;
}

std::vector<std::string> KnownOps() {
  std::vector<std::string> names;
  for (const auto& [name, schema] : Registry()) names.push_back(name);
  std::sort(names.begin(), names.end());
  return names;
}

}  // namespace pipeserve
