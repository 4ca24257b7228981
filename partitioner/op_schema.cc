#include "partitioner/op_schema.h"

#include <algorithm>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"

namespace pipeserve {
namespace {

absl::Status Mismatch(absl::string_view what, const Shape& a, const Shape& b) {
  return absl::InvalidArgumentError(absl::StrCat(
      what, ": ", ShapeToString(a), " and ", ShapeToString(b)));
}

// Concrete dimension for cost estimates: the batch counts as 16 rows.
double Dim(int64_t d) { return d < 0 ? 16.0 : static_cast<double>(d); }

double Elements(const Shape& s) {
  double n = 1;
  for (int64_t d : s) n *= Dim(d);
  return n;
}

absl::StatusOr<std::vector<Shape>> SameShape(const Node&,
                                             const std::vector<Shape>& in) {
  return std::vector<Shape>{in[0]};
}

// x [M, K] @ w [K, N] -> [M, N]
absl::StatusOr<std::vector<Shape>> InferMm(const Node&,
                                           const std::vector<Shape>& in) {
  const Shape& a = in[0];
  const Shape& b = in[1];
  if (a.size() != 2 || b.size() != 2) {
    return Mismatch("mm needs two 2-D tensors, got", a, b);
  }
  if (a[1] != b[0]) return Mismatch("mm inner dimensions differ", a, b);
  return std::vector<Shape>{{a[0], b[1]}};
}

// x [..., K] @ w [K, N] -> [..., N]; x [M, K] @ w [K, N] as mm.
absl::StatusOr<std::vector<Shape>> InferMatmul(const Node&,
                                               const std::vector<Shape>& in) {
  const Shape& a = in[0];
  const Shape& b = in[1];
  if (a.size() < 2 || b.size() != 2) {
    return Mismatch(
        "matmul supports [..., K] @ [K, N] (left rank >= 2, right rank 2), got",
        a, b);
  }
  if (a.back() != b[0]) return Mismatch("matmul inner dimensions differ", a, b);
  Shape out = a;
  out.back() = b[1];
  return std::vector<Shape>{out};
}

// x [..., in] , weight [out, in], bias [out] -> [..., out]
absl::StatusOr<std::vector<Shape>> InferLinear(const Node&,
                                               const std::vector<Shape>& in) {
  const Shape& x = in[0];
  const Shape& w = in[1];
  if (x.empty() || w.size() != 2) {
    return Mismatch("linear needs x [..., in] and weight [out, in], got", x,
                    w);
  }
  if (x.back() != w[1]) {
    return Mismatch("linear input features differ from weight [out, in]", x,
                    w);
  }
  if (in.size() == 3 && (in[2].size() != 1 || in[2][0] != w[0])) {
    return Mismatch("linear bias must be [out] for weight", in[2], w);
  }
  Shape out = x;
  out.back() = w[0];
  return std::vector<Shape>{out};
}

absl::StatusOr<std::vector<Shape>> InferBinary(const Node& node,
                                               const std::vector<Shape>& in) {
  bool scalar = HasScalarOperand(node);
  if (scalar && in.size() != 1) {
    return absl::InvalidArgumentError(
        "a binary op with a \"scalar\" attribute takes one tensor input");
  }
  if (!scalar && in.size() != 2) {
    return absl::InvalidArgumentError(
        "a binary op takes two tensor inputs, or one and a \"scalar\" "
        "attribute");
  }
  if (scalar) return std::vector<Shape>{in[0]};
  absl::StatusOr<Shape> out = BroadcastShapes(in[0], in[1]);
  if (!out.ok()) return out.status();
  return std::vector<Shape>{*out};
}

absl::flat_hash_map<std::string, OpSchema> MakeRegistry() {
  absl::flat_hash_map<std::string, OpSchema> ops;
  auto add = [&](OpSchema s) { ops[s.name] = std::move(s); };
  auto zero_flops = [](const std::vector<Shape>&) { return 0.0; };
  auto elementwise_flops = [](const std::vector<Shape>& in) {
    double n = 0;
    for (const Shape& s : in) n = std::max(n, Elements(s));
    return n;
  };
  add({"mm", 2, 2, 1, InferMm, [](const std::vector<Shape>& in) {
         return 2.0 * Dim(in[0][0]) * Dim(in[0][1]) * Dim(in[1][1]);
       }});
  add({"matmul", 2, 2, 1, InferMatmul, [](const std::vector<Shape>& in) {
         return 2.0 * Elements(in[0]) * Dim(in[1][1]);
       }});
  add({"linear", 2, 3, 1, InferLinear, [](const std::vector<Shape>& in) {
         return 2.0 * Elements(in[0]) * Dim(in[1][0]);
       }});
  for (const char* name : {"add", "sub", "mul"}) {
    add({name, 1, 2, 1, InferBinary, elementwise_flops});
  }
  for (const char* name : {"relu", "clone", "identity"}) {
    add({name, 1, 1, 1, SameShape, elementwise_flops});
  }
  // "param" shapes come from the parameter table, not from inputs.
  add({std::string(kParamOp), 0, 0, 1, nullptr, zero_flops});
  add({std::string(kPipeSplitOp), 0, 0, 0,
       [](const Node&, const std::vector<Shape>&)
           -> absl::StatusOr<std::vector<Shape>> {
         return std::vector<Shape>{};
       },
       zero_flops});
  return ops;
}

const absl::flat_hash_map<std::string, OpSchema>& Registry() {
  static const auto* ops =
      new absl::flat_hash_map<std::string, OpSchema>(MakeRegistry());
  return *ops;
}

}  // namespace

bool HasScalarOperand(const Node& node) {
  return node.attrs().contains("scalar");
}

absl::StatusOr<Shape> BroadcastShapes(const Shape& a, const Shape& b) {
  size_t rank = std::max(a.size(), b.size());
  Shape out(rank);
  for (size_t i = 0; i < rank; ++i) {
    // Align from the right, as numpy does.
    int64_t da = i < rank - a.size() ? 1 : a[i - (rank - a.size())];
    int64_t db = i < rank - b.size() ? 1 : b[i - (rank - b.size())];
    if (da == db || db == 1) {
      out[i] = da;
    } else if (da == 1) {
      out[i] = db;
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
