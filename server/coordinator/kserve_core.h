// The KServe v2 operations over the Coordinator, whatever carries them:
// the gRPC service (kserve_service.h) and the REST routes (kserve_rest.h)
// are thin layers over this, each authenticating its own way. It checks
// names and versions, runs and meters requests (kserve_request.h checks
// a request against the plan of the deployment that runs it), and hides
// stage-server addresses from what clients see (Public).
//
//   KServeCore core(&coordinator, &metrics, {});
//   inference::ModelInferResponse resp;
//   RETURN_IF_ERROR(core.Public(core.Infer(req, deadline, cancelled, &resp)));
#ifndef PIPESERVE_SERVER_COORDINATOR_KSERVE_CORE_H_
#define PIPESERVE_SERVER_COORDINATOR_KSERVE_CORE_H_

#include <functional>
#include <string>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "proto/grpc_service.pb.h"
#include "server/coordinator/core.h"
#include "server/coordinator/metrics.h"

namespace pipeserve {

struct KServeCoreOptions {
  // The longest deadline a client may give a request.
  absl::Duration max_timeout = absl::Hours(1);
  // ModelInfer on a model exported for generation (its cache-aware graph,
  // with client-given cache metadata that could overwrite the KV cache of
  // generations in flight): refused with kFailedPrecondition unless set.
  bool allow_generation_infer = false;
};

class KServeCore {
 public:
  // `metrics` (may be null) counts every inference request. Both must
  // outlive this.
  KServeCore(Coordinator* coordinator, Metrics* metrics, KServeCoreOptions options);

  bool ServerReady();
  void ServerMetadata(inference::ServerMetadataResponse* resp);
  // The model `name` at `version` ("": whichever serves): kInvalidArgument
  // for a bad name, kNotFound for an unknown model or version.
  absl::StatusOr<ModelInfo> Model(const std::string& name, const std::string& version);
  // Why `name` at `version` is not ready ("" when it is): an unknown model
  // or version is not ready, as Triton answers, not an error; a bad name
  // still is.
  absl::StatusOr<std::string> NotReadyBecause(const std::string& name,
                                              const std::string& version);
  absl::Status ModelMetadata(const std::string& name, const std::string& version,
                             inference::ModelMetadataResponse* resp);

  // The model_repository extension. pipeserve's repository is what
  // ModelService uploads: every model in it is loaded, so the index lists
  // them all (`ready_only`: those ready), a load of one of them succeeds
  // at once, and a load of any other or any unload is kUnavailable naming
  // ModelService (which uploads, and unloads by deleting). A
  // `repository` name is kUnimplemented: there is one, unnamed.
  absl::Status RepositoryIndex(const std::string& repository, bool ready_only,
                               inference::RepositoryIndexResponse* resp);
  absl::Status RepositoryLoad(const std::string& repository, const std::string& model);
  absl::Status RepositoryUnload(const std::string& repository, const std::string& model);

  // One inference request, metered. `admission`: already counted against
  // its model's queue (null: admitted here). Errors as
  // Coordinator::InferAdmitted, before Public.
  absl::Status Infer(const inference::ModelInferRequest& req, absl::Time deadline,
                     const std::function<bool()>& cancelled, inference::ModelInferResponse* resp,
                     const Coordinator::Admission* admission = nullptr);

  // `s` as a client may see it: stage-server addresses redacted
  // (RedactAddresses), the full message logged.
  absl::Status Public(const absl::Status& s);
  // Counts one request in the metrics.
  void Meter(const std::string& model, const absl::Status& s, absl::Duration took);
  // A request's deadline: the client's, no later than max_timeout from now
  // (infinite when the client set none).
  absl::Time Capped(absl::Time client_deadline) const;

  Coordinator* coordinator() const { return coordinator_; }

 private:
  absl::Status InferUnmetered(const inference::ModelInferRequest& req, absl::Time deadline,
                              const std::function<bool()>& cancelled,
                              inference::ModelInferResponse* resp,
                              const Coordinator::Admission* admission);

  Coordinator* const coordinator_;
  Metrics* const metrics_;
  const KServeCoreOptions options_;
  absl::Mutex log_mu_;  // Public's log lines, at most 10 a second
  absl::Time log_window_ ABSL_GUARDED_BY(log_mu_) = absl::InfinitePast();
  int log_lines_ ABSL_GUARDED_BY(log_mu_) = 0;
  int log_suppressed_ ABSL_GUARDED_BY(log_mu_) = 0;
};

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_COORDINATOR_KSERVE_CORE_H_
