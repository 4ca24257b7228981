// The elementwise functions elementwise.h's kernel computes, by number (what
// the device plan records for a kUnary op). Plain C++: no CUDA, no simt.
#ifndef PIPESERVE_RUNTIME_CUDA_KERNELS_UNARY_KIND_H_
#define PIPESERVE_RUNTIME_CUDA_KERNELS_UNARY_KIND_H_

#include <string>

namespace pipeserve::kernels {

enum class UnaryKind : int {
  kNone = -1,
  kGelu, kGeluTanh, kSilu, kTanh, kSigmoid, kExp, kLog, kSqrt, kRsqrt, kNeg, kAbs, kCos, kSin,
};

// The kind for op `op` (gelu with approximate "tanh" is kGeluTanh), or kNone.
inline UnaryKind UnaryKindOf(const std::string& op, const std::string& approximate) {
  if (op == "gelu") {
    return approximate == "tanh"                          ? UnaryKind::kGeluTanh
           : approximate.empty() || approximate == "none" ? UnaryKind::kGelu
                                                          : UnaryKind::kNone;
  }
  static const char* const kNames[] = {"", "", "silu", "tanh", "sigmoid", "exp", "log",
                                       "sqrt", "rsqrt", "neg", "abs", "cos", "sin"};
  for (int k = static_cast<int>(UnaryKind::kSilu); k <= static_cast<int>(UnaryKind::kSin); ++k) {
    if (op == kNames[k]) return static_cast<UnaryKind>(k);
  }
  return UnaryKind::kNone;
}

}  // namespace pipeserve::kernels

#endif  // PIPESERVE_RUNTIME_CUDA_KERNELS_UNARY_KIND_H_
