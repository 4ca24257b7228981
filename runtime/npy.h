// Reading and writing NumPy .npy files (float32, C order), the exchange
// format of the CLI and the tests.
//
//   ASSIGN_OR_RETURN(Tensor x, ReadNpy("x.npy"));
//   RETURN_IF_ERROR(WriteNpy("y.npy", y));
#ifndef PIPESERVE_RUNTIME_NPY_H_
#define PIPESERVE_RUNTIME_NPY_H_

#include <string>

#include "absl/status/statusor.h"
#include "runtime/tensor.h"

namespace pipeserve {

// kNotFound (no file), kInvalidArgument (not .npy, not little-endian
// float32 '<f4', Fortran order), kDataLoss (truncated).
absl::StatusOr<Tensor> ReadNpy(const std::string& path);
absl::StatusOr<Tensor> ParseNpy(const std::string& bytes);

absl::Status WriteNpy(const std::string& path, const Tensor& t);

}  // namespace pipeserve

#endif  // PIPESERVE_RUNTIME_NPY_H_
