#include "runtime/precision.h"

#include "absl/strings/str_cat.h"

namespace pipeserve {

std::string PrecisionName(Precision p) {
  switch (p) {
    case Precision::kFloat32:
      return "fp32";
    case Precision::kTF32:
      return "tf32";
    case Precision::kBF16:
      return "bf16";
  }
  return "?";
}

absl::StatusOr<Precision> ParsePrecision(absl::string_view name) {
  if (name == "fp32" || name == "float32") return Precision::kFloat32;
  if (name == "tf32") return Precision::kTF32;
  if (name == "bf16" || name == "bfloat16") return Precision::kBF16;
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown precision \"", name, "\" (expected fp32, tf32 or bf16)"));
}

}  // namespace pipeserve
