// Uploads a model to an in-process Coordinator the way ModelService does
// (staged bytes, then FinishUpload with their size and CRC-32), for the
// coordinator's tests.
//
//   ASSERT_TRUE(UploadModel(coordinator, "mlp", model).ok());
#ifndef PIPESERVE_SERVER_TESTING_UPLOAD_H_
#define PIPESERVE_SERVER_TESTING_UPLOAD_H_

#include <string>

#include "absl/status/statusor.h"
#include "proto/pipeserve_service.pb.h"
#include "runtime/model_file.h"
#include "server/coordinator/core.h"

namespace pipeserve {

// Writes `m` to a fresh folder (TestTempDir) and uploads it as `name`:
// FinishUpload's answer, or the error of the step that failed.
absl::StatusOr<UploadResponse> UploadModel(Coordinator& coordinator, const std::string& name,
                                           const Model& m, const UploadOptions& options = {});

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_TESTING_UPLOAD_H_
