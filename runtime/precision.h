// The arithmetic a compute backend uses for its matrix products.
//
//   absl::StatusOr<Precision> p = ParsePrecision("bf16");   // kBF16
//   PrecisionName(Precision::kTF32);                          // "tf32"
#ifndef PIPESERVE_RUNTIME_PRECISION_H_
#define PIPESERVE_RUNTIME_PRECISION_H_

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace pipeserve {

enum class Precision {
  // IEEE float32 products and sums (the CPU backend's only mode).
  kFloat32,
  // Products on the tensor cores' TF32 (10-bit mantissa inputs), float32
  // accumulation; elementwise ops stay float32.
  kTF32,
  // GEMM operands (weights and activations) rounded to bfloat16, float32
  // accumulation and float32 results; elementwise ops stay float32.
  kBF16,
};

// "fp32", "tf32", "bf16".
std::string PrecisionName(Precision p);

// Accepts the names above (and "float32", "bfloat16"); kInvalidArgument
// otherwise.
absl::StatusOr<Precision> ParsePrecision(absl::string_view name);

}  // namespace pipeserve

#endif  // PIPESERVE_RUNTIME_PRECISION_H_
