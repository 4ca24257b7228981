#include "runtime/cuda/kernel_gate.h"

#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

// The text of gpu_results/confirmed_kernels.txt (a genrule writes it).
extern const char kConfirmedKernelsText[];

namespace pipeserve {
namespace {

absl::StatusOr<DataType> DtypeNamed(absl::string_view name) {
  for (DataType t : {DT_FLOAT32, DT_FLOAT16, DT_BFLOAT16, DT_INT64, DT_INT32, DT_BOOL}) {
    if (TorchName(t) == name) return t;
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown dtype \"", name, "\""));
}

}  // namespace

absl::StatusOr<CudaOps> ParseCudaOps(absl::string_view flag) {
  if (flag == "confirmed") return CudaOps::kConfirmed;
  if (flag == "unconfirmed") return CudaOps::kUnconfirmed;
  return absl::InvalidArgumentError(absl::StrCat(
      "--cuda_ops=", flag, ": expected confirmed (kernels a GPU has confirmed) or unconfirmed"));
}

absl::StatusOr<std::vector<KernelConfirmation>> ParseConfirmations(absl::string_view text) {
  std::vector<KernelConfirmation> out;
  int number = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++number;
    line = absl::StripAsciiWhitespace(line.substr(0, line.find('#')));
    if (line.empty()) continue;
    std::vector<absl::string_view> f = absl::StrSplit(line, ' ', absl::SkipWhitespace());
    absl::StatusOr<DataType> dtype = f.size() == 3 ? DtypeNamed(f[1]) : absl::InvalidArgumentError(
        "expected \"op dtype evidence\"");
    if (!dtype.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("confirmed kernels, line ", number, " (\"", line, "\"): ", dtype.status().message()));
    }
    out.push_back({std::string(f[0]), *dtype, std::string(f[2])});
  }
  return out;
}

const std::vector<KernelConfirmation>& ConfirmedKernels() {
  static const auto* list = [] {
    absl::StatusOr<std::vector<KernelConfirmation>> parsed =
        ParseConfirmations(kConfirmedKernelsText);
    // The file is part of the build; kernel_gate_test parses it too.
    return new std::vector<KernelConfirmation>(parsed.ok() ? *std::move(parsed)
                                                           : std::vector<KernelConfirmation>{});
  }();
  return *list;
}

absl::Status CheckKernelGate(const std::string& node, const std::string& op, DataType dtype,
                             CudaOps mode, const std::vector<KernelConfirmation>& confirmed) {
  if (mode == CudaOps::kUnconfirmed) return absl::OkStatus();
  for (const KernelConfirmation& c : confirmed) {
    if (c.op == op && c.dtype == dtype) return absl::OkStatus();
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "node \"", node, "\" (", op, ", ", TorchName(dtype),
      "): its CUDA kernel has not been confirmed on a GPU yet (tools/gpu_check.sh confirms "
      "kernels; start the stage server with --cuda_ops=unconfirmed to run it anyway, or serve "
      "this model with --device=cpu)"));
}

}  // namespace pipeserve
