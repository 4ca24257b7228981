// inference.GRPCInferenceService (KServe v2 / Open Inference Protocol) over
// the Coordinator. Thin: authentication (the `infer` scope when tokens are
// configured) and ModelStreamInfer's streams, then KServeCore
// (kserve_core.h) does the work.
//
//   KServeService kserve(&coordinator, &metrics, tokens.get(), {});
//   builder.RegisterService(&kserve);
#ifndef PIPESERVE_SERVER_COORDINATOR_KSERVE_SERVICE_H_
#define PIPESERVE_SERVER_COORDINATOR_KSERVE_SERVICE_H_

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "proto/grpc_service.grpc.pb.h"
#include "server/coordinator/core.h"
#include "server/coordinator/kserve_core.h"
#include "server/coordinator/metrics.h"
#include "server/coordinator/worker_pool.h"
#include "server/transport/auth.h"
#include "server/transport/idle_watchdog.h"

namespace pipeserve {

struct KServeOptions {
  // Threads running requests that arrive on ModelStreamInfer streams, for
  // all streams together; models take turns on them (WorkerPool).
  int stream_threads = 16;
  // Requests one stream may have queued or running at once; the stream is
  // not read further until one finishes.
  int stream_inflight = 32;
  // ModelStreamInfer streams open at once, all clients together, and from
  // one client connection; more are RESOURCE_EXHAUSTED. Each open stream
  // holds one of the server's handler threads (--max_threads), so these
  // keep threads for the other calls.
  int max_streams = 64;
  int max_streams_per_client = 16;
  // A stream with no request in flight that sends nothing for this long
  // is ended (CANCELLED), giving its thread back.
  absl::Duration stream_idle_timeout = absl::Seconds(60);
  // The longest deadline a client may give a request. (A request without
  // one gets the coordinator's default, counted from its arrival: a
  // streamed request's clock starts before it waits for a thread.)
  absl::Duration max_timeout = absl::Hours(1);
  // ModelInfer on a model exported for generation (its cache-aware graph,
  // with client-given cache metadata that could overwrite the KV cache of
  // generations in flight): refused with kFailedPrecondition unless set.
  bool allow_generation_infer = false;
};

class KServeService final : public inference::GRPCInferenceService::Service {
 public:
  // `core` (shared with the REST routes) does the work; `tokens` (may be
  // null: no authentication) must grant `infer`. Both must outlive the
  // service.
  KServeService(KServeCore* core, const TokenSet* tokens, KServeOptions options);

  // Calls in this service's handlers now (each holds a handler thread).
  int active_calls() const { return active_calls_.load(); }

  grpc::Status ServerLive(grpc::ServerContext*, const inference::ServerLiveRequest*,
                          inference::ServerLiveResponse*) override;
  grpc::Status ServerReady(grpc::ServerContext*, const inference::ServerReadyRequest*,
                           inference::ServerReadyResponse*) override;
  grpc::Status ModelReady(grpc::ServerContext*, const inference::ModelReadyRequest*,
                          inference::ModelReadyResponse*) override;
  grpc::Status ServerMetadata(grpc::ServerContext*, const inference::ServerMetadataRequest*,
                              inference::ServerMetadataResponse*) override;
  grpc::Status ModelMetadata(grpc::ServerContext*, const inference::ModelMetadataRequest*,
                             inference::ModelMetadataResponse*) override;
  grpc::Status ModelInfer(grpc::ServerContext*, const inference::ModelInferRequest*,
                          inference::ModelInferResponse*) override;
  grpc::Status ModelStreamInfer(
      grpc::ServerContext*,
      grpc::ServerReaderWriter<inference::ModelStreamInferResponse,
                               inference::ModelInferRequest>*) override;
  grpc::Status RepositoryIndex(grpc::ServerContext*, const inference::RepositoryIndexRequest*,
                               inference::RepositoryIndexResponse*) override;
  grpc::Status RepositoryModelLoad(grpc::ServerContext*,
                                   const inference::RepositoryModelLoadRequest*,
                                   inference::RepositoryModelLoadResponse*) override;
  grpc::Status RepositoryModelUnload(grpc::ServerContext*,
                                     const inference::RepositoryModelUnloadRequest*,
                                     inference::RepositoryModelUnloadResponse*) override;

 private:
  struct Stream;
  // Counts a handler's call in active_calls() while it lives.
  struct ActiveCall {
    explicit ActiveCall(KServeService* s) : s(s) { ++s->active_calls_; }
    ~ActiveCall() { --s->active_calls_; }
    KServeService* s;
  };
  // The deadline the client set for the call (infinite when none).
  static absl::Time ClientDeadline(const grpc::ServerContext& ctx);
  using StreamIo =
      grpc::ServerReaderWriter<inference::ModelStreamInferResponse, inference::ModelInferRequest>;
  // Registers a new stream, or kResourceExhausted naming the limit.
  absl::StatusOr<std::shared_ptr<Stream>> OpenStream(grpc::ServerContext* ctx, StreamIo* io);
  void CloseStream(const std::shared_ptr<Stream>& stream);
  // Reads requests from one stream and queues each (Queue).
  void ReadRequests(const std::shared_ptr<Stream>& st);
  // Admits `req` (read from `st`, counted in flight) and runs it on the
  // pool, or answers its refusal at once.
  void Queue(const std::shared_ptr<Stream>& st, inference::ModelInferRequest req,
             absl::Time deadline);
  // Writes `req`'s answer (`out`, or `result`'s error) on `st`; it is no
  // longer in flight.
  void Respond(const std::shared_ptr<Stream>& st, const inference::ModelInferRequest& req,
               const absl::Status& result, inference::ModelStreamInferResponse* out);

  Coordinator* const coordinator_;
  const TokenSet* const tokens_;
  const KServeOptions options_;
  std::atomic<int> active_calls_{0};
  KServeCore* const core_;

  absl::Mutex streams_mu_;
  std::vector<std::shared_ptr<Stream>> streams_ ABSL_GUARDED_BY(streams_mu_);
  IdleWatchdog idle_streams_;
  // Last: its threads run requests that use everything above.
  WorkerPool stream_pool_;
};

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_COORDINATOR_KSERVE_SERVICE_H_
