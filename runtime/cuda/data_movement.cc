#include "runtime/cuda/data_movement.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "graph/op_schema.h"

namespace pipeserve {
namespace {

using Strides = std::vector<int64_t>;

// A copy over `dims` reading src at offset/strides into a contiguous dst
// (or dst at dst_offset/dst_strides when given).
absl::StatusOr<Move> MakeMove(int input, const Shape& dims, int64_t src_offset,
                              const Strides& src, int64_t dst_offset, const Strides& dst) {
  if (dims.size() > static_cast<size_t>(kernels::kMaxCopyRank)) {
    return absl::UnimplementedError(absl::StrCat("a copy over ", dims.size(),
                                                 " dims; the cuda kernels take at most ",
                                                 kernels::kMaxCopyRank));
  }
  Move m;
  m.input = input;
  kernels::StridedCopyOp& c = m.copy;
  c.rank = static_cast<int>(dims.size());
  c.n = NumElements(dims);
  c.src_offset = src_offset;
  c.dst_offset = dst_offset;
  for (size_t k = 0; k < dims.size(); ++k) {
    c.dims[k] = dims[k];
    c.src_strides[k] = src[k];
    c.dst_strides[k] = dst[k];
  }
  return m;
}

// slice (start, step) and select (index) along one dim: a strided view.
absl::StatusOr<Move> SliceMove(const Node& node, const Shape& x, const Shape& out) {
  const StridedView view = SliceView(node, x);  // graph/op_schema.h, as the CPU reads it
  return MakeMove(0, out, view.offset, view.strides, 0, ContiguousStrides(out));
}

// cat and stack: input j into its part of the output.
absl::StatusOr<std::vector<Move>> CatMoves(const Node& node, const std::vector<Shape>& in,
                                           const Shape& out) {
  const bool stack = node.op() == "stack";
  const int d = *NormalizeDim(IntAttr(node, "dim", 0), static_cast<int>(out.size()));
  Strides dst = ContiguousStrides(out);
  const int64_t along = dst[d];
  if (stack) dst.erase(dst.begin() + d);  // each input fills one index of d
  std::vector<Move> moves;
  int64_t at = 0;
  for (size_t j = 0; j < in.size(); ++j) {
    if (NumElements(in[j]) > 0) {
      absl::StatusOr<Move> m =
          MakeMove(static_cast<int>(j), in[j], 0, ContiguousStrides(in[j]), at * along, dst);
      if (!m.ok()) return m.status();
      moves.push_back(*m);
    }
    at += stack ? 1 : in[j][d];
  }
  return moves;
}

}  // namespace

bool IsMovement(const std::string& op) {
  return op == "permute" || op == "slice" || op == "select" || op == "expand" || op == "cat" ||
         op == "stack";
}

bool IsView(const std::string& op) {
  return op == "reshape" || op == "squeeze" || op == "unsqueeze";
}

absl::StatusOr<std::vector<Move>> MovesOf(const Node& node, const std::vector<Shape>& in,
                                          const Shape& out) {
  const std::string& op = node.op();
  if (op == "cat" || op == "stack") return CatMoves(node, in, out);
  if (NumElements(out) == 0) return std::vector<Move>{};
  const Shape& x = in[0];
  absl::StatusOr<Move> m;
  if (op == "permute") {
    const Strides own = ContiguousStrides(x);
    Strides st;
    for (int64_t d : ResolvedInts(node, "dims", {}, 0)) {
      st.push_back(own[*NormalizeDim(d, static_cast<int>(x.size()))]);
    }
    m = MakeMove(0, out, 0, st, 0, ContiguousStrides(out));
  } else if (op == "expand") {
    Strides st(out.size(), 0);
    const Strides own = ContiguousStrides(x);
    const size_t lead = out.size() - x.size();
    for (size_t i = 0; i < x.size(); ++i) st[lead + i] = x[i] == 1 ? 0 : own[i];
    m = MakeMove(0, out, 0, st, 0, ContiguousStrides(out));
  } else {
    m = SliceMove(node, x, out);
  }
  if (!m.ok()) return m.status();
  return std::vector<Move>{*m};
}

}  // namespace pipeserve
