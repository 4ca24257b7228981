#include "server/testing/upload.h"

#include <fstream>
#include <iterator>

#include "common/status_macros.h"
#include "server/testing/temp_dir.h"

namespace pipeserve {

absl::StatusOr<UploadResponse> UploadModel(Coordinator& coordinator, const std::string& name,
                                           const Model& m, const UploadOptions& options) {
  const std::string path = TestTempDir("model") + "/model.psm";
  RETURN_IF_ERROR(WriteModelFile(path, m.graph, m.weights));
  std::ifstream in(path, std::ios::binary);
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  ASSIGN_OR_RETURN(std::unique_ptr<PendingUpload> upload, coordinator.StartUpload(name));
  RETURN_IF_ERROR(upload->Append(bytes));
  return coordinator.FinishUpload(name, options, std::move(upload), bytes.size(),
                                  Crc32(bytes.data(), bytes.size()));
}

}  // namespace pipeserve
