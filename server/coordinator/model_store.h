// Where the coordinator keeps uploaded models. An upload is written to a
// staging area and becomes visible only when committed, in one atomic step:
// a half-written or corrupt upload is never listed, and a committed model
// survives a coordinator restart.
//
//   ASSIGN_OR_RETURN(auto upload, store.StartUpload("example"));
//   RETURN_IF_ERROR(upload->Append(chunk));
//   ... check upload->path() ...
//   RETURN_IF_ERROR(upload->Commit(options));   // or destroy it to abort
#ifndef PIPESERVE_SERVER_COORDINATOR_MODEL_STORE_H_
#define PIPESERVE_SERVER_COORDINATOR_MODEL_STORE_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "proto/pipeserve_service.pb.h"

namespace pipeserve {

struct StoredModel {
  std::string name;
  std::string path;  // the .psm file
  UploadOptions options;
  uint64_t bytes = 0;
  // 1 for a name's first upload, one more for each upload replacing it
  // (KServe model_version).
  int64_t version = 1;
};

// One upload in progress. Destroying it without Commit discards it.
class PendingUpload {
 public:
  virtual ~PendingUpload() = default;
  virtual absl::Status Append(absl::string_view data) = 0;
  // Bytes and zlib CRC-32 of everything appended so far.
  virtual uint64_t bytes() const = 0;
  virtual uint32_t crc32() const = 0;
  // The staged file (complete once the last Append is done), for checking
  // before Commit.
  virtual const std::string& path() const = 0;
  // Publishes the upload under its name, replacing any earlier version,
  // as the next version number of the name (see version()).
  virtual absl::Status Commit(const UploadOptions& options) = 0;
  // The version Commit published (0 before).
  virtual int64_t version() const = 0;
};

class ModelStore {
 public:
  virtual ~ModelStore() = default;
  // kInvalidArgument for a bad name (see common/model_name.h).
  virtual absl::StatusOr<std::unique_ptr<PendingUpload>> StartUpload(
      const std::string& name) = 0;
  // Every committed model.
  virtual absl::StatusOr<std::vector<StoredModel>> List() = 0;
  // Removes a committed model (atomically: it is listed whole or not at
  // all). kNotFound when it is not stored.
  virtual absl::Status Remove(const std::string& name) = 0;
};

// A store in a directory: `<root>/<name>` is a symlink to
// `<root>/.versions/<name>.<n>/` holding model.psm, options.pb and version
// (the version number, as text); commit
// swaps the symlink with rename(2), which is atomic. Leftover staging and
// unreferenced versions are removed when the store opens.
absl::StatusOr<std::unique_ptr<ModelStore>> OpenFileModelStore(const std::string& root);

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_COORDINATOR_MODEL_STORE_H_
