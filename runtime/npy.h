// Reading and writing NumPy .npy files (C order; float32, float16, int64,
// int32 and bool; bfloat16 is written as float32), the exchange format of
// the CLI and the tests.
//
//   ASSIGN_OR_RETURN(Tensor x, ReadNpy("x.npy"));
//   RETURN_IF_ERROR(WriteNpy("y.npy", y));
#ifndef PIPESERVE_RUNTIME_NPY_H_
#define PIPESERVE_RUNTIME_NPY_H_

#include <string>

#include "absl/status/statusor.h"
#include "runtime/tensor.h"

namespace pipeserve {

// kNotFound (no file), kInvalidArgument (not .npy, a dtype other than
// '<f4', '<f2', '<i8', '<i4', '|b1', Fortran order), kDataLoss (truncated).
absl::StatusOr<Tensor> ReadNpy(const std::string& path);
absl::StatusOr<Tensor> ParseNpy(const std::string& bytes);

absl::Status WriteNpy(const std::string& path, const Tensor& t);

}  // namespace pipeserve

#endif  // PIPESERVE_RUNTIME_NPY_H_
