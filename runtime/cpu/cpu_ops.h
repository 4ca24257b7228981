// The CPU implementation of every op in graph/op_schema.h beyond the
// float32 fast paths of cpu_kernels.h: transformer math (layer_norm,
// softmax, gelu, embedding, batched matmul), masks, shape and data-movement
// ops, casts and symbolic sizes, over float32, int64, int32 and bool.
// float16 and bfloat16 math runs in float32 and is rounded back to the
// value's type (data movement copies their bytes as they are).
//
//   Node n = ResolveSymbolic(node, sym);           // concrete attributes
//   ASSIGN_OR_RETURN(Tensor y, RunCpuOp(n, {&x}, out_shape, out_type, {}));
#ifndef PIPESERVE_RUNTIME_CPU_CPU_OPS_H_
#define PIPESERVE_RUNTIME_CPU_CPU_OPS_H_

#include <vector>

#include "absl/status/statusor.h"
#include "proto/model.pb.h"
#include "runtime/tensor.h"

namespace pipeserve {

// True for ops RunCpuOp implements.
bool HasCpuOp(const std::string& op);

// Runs `node` (attributes already resolved) on `inputs`. `out_shape` and
// `out_type` come from the op's schema for these inputs. `scratch`, when
// it is the caller's sole reference with room enough, is reused for the
// output. kInvalidArgument for inputs the op cannot take at run time (an
// embedding id out of range), naming the problem.
absl::StatusOr<Tensor> RunCpuOp(const Node& node,
                                const std::vector<const Tensor*>& inputs,
                                const Shape& out_shape, DataType out_type,
                                const Tensor& scratch);

// Attention fused into one pass over blocks of query rows (the pattern
// matmul(q, k^T) -> scale -> mask -> softmax(-1) -> matmul(., v) that the
// CPU backend recognises in a stage graph): per batch index and block of
// up to 64 query rows, S = q k^T (one GEMM), S *= scale, masked entries
// set to `fill` (where `cond` is true) or `add_mask` added, softmax over
// keys, then S v (one GEMM). Only a block of S is ever held.
// q [..., Tq, d], k [..., Tk, d], v [..., Tk, dv] with equal leading dims;
// cond (bool) and add_mask (float) may be null and broadcast to
// [..., Tq, Tk]. float32, bfloat16 or float16 (computed in float32).
struct AttentionMask {
  const Tensor* cond = nullptr;  // where(cond, fill, S)
  float fill = 0.0f;
  const Tensor* add = nullptr;   // S + add
};
absl::StatusOr<Tensor> FusedAttention(const Tensor& q, const Tensor& k, const Tensor& v,
                                      float scale, const AttentionMask& mask,
                                      const Tensor& scratch);

// A normalisation over the last `ndim` dims, optionally of a residual sum,
// in one pass per row (the CPU backend fuses add -> layer_norm and the
// RMSNorm pattern pow -> mean -> add eps -> rsqrt -> mul -> mul weight):
// with `residual`, *sum = x + residual (rounded to x's type) is what gets
// normalised; *out = layer_norm(.) with w, b, or with `rms`
// . / sqrt(mean(.^2) + eps) * w. w, b may be null. float32, bfloat16 or
// float16, all of one type; residual has x's shape or is a block of its
// trailing dims repeated ([T, D] against [B, T, D]); kUnimplemented for
// other residual shapes (the caller runs the ops one by one). *sum (with a
// residual; may be null without) and *out are allocated by the caller with
// x's shape and type.
struct NormKind {
  bool rms = false;
  int64_t ndim = 1;
  float eps = 1e-5f;
};
absl::Status FusedNorm(const NormKind& kind, const Tensor& x, const Tensor* residual,
                       const Tensor* w, const Tensor* b, Tensor* sum, Tensor* out);

// Elementwise float ops fused into one pass over blocks of 256 elements
// held in L1 (the CPU backend groups ops whose intermediate values nothing
// else reads: GPT-2's gelu written out, residual adds, RMSNorm's scaling).
class ElementwiseGroup {
 public:
  // One op; an operand k >= 0 is the result of op k, k < 0 the external
  // input -1 - k. Binary ops with a "scalar" attribute take one operand.
  struct Op {
    const Node* node;
    int a = 0, b = 0;
  };
  // Unary float ops (relu, gelu, silu, tanh, sigmoid, sqrt, rsqrt, exp,
  // log, cos, sin, neg, abs) and add/sub/mul/div/pow/maximum/minimum.
  static bool Fusable(const Node& node);

  ElementwiseGroup(std::vector<Op> ops, int externals);

  // float32 or bfloat16 externals, each of out_shape, or broadcast to it
  // as its trailing dims ([D], [T, D]), [..., 1] per row, or one element.
  // kUnimplemented for any other shape (the caller runs the ops one by one).
  absl::StatusOr<Tensor> Run(const std::vector<const Tensor*>& externals,
                             const Shape& out_shape, DataType type,
                             const Tensor& scratch) const;

  int size() const { return static_cast<int>(ops_.size()); }

 private:
  struct Code {
    int kind;          // unary function or binary op
    bool binary;
    bool scalar;       // binary with a number
    bool reverse;      // the number on the left
    float number;
    int a, b;
  };
  std::vector<Op> ops_;
  std::vector<Code> codes_;
  int externals_;
};

// Softmax of one float row in place (vectorised, exp within 2 ulp). A row
// with every entry -inf becomes NaN, as in PyTorch.
void SoftmaxRow(float* row, int64_t n);

// n values of a 16-bit type (bfloat16 or float16) as float32, and back
// (vector loops for bfloat16).
void Widen16(DataType type, const uint16_t* a, int64_t n, float* o);
void Narrow16(DataType type, const float* a, int64_t n, uint16_t* o);

// A float32 copy of a float16/bfloat16/float32 tensor (float32 is shared),
// and the reverse.
Tensor ToFloat32(const Tensor& t);
Tensor FromFloat32(const Tensor& t, DataType to);

}  // namespace pipeserve

#endif  // PIPESERVE_RUNTIME_CPU_CPU_OPS_H_
