// The C++ client of a pipeserve coordinator: model upload and plans
// (pipeserve.ModelService), inference and readiness over the KServe v2 /
// Open Inference Protocol (inference.GRPCInferenceService), and the standard
// grpc.health.v1 check. Every method is a blocking call with a deadline and
// returns gRPC errors as absl::Status with the same code and message.
//
//   ASSIGN_OR_RETURN(std::unique_ptr<Client> client,
//                    Client::Connect("localhost:8001", ClientOptions{}));
//   UploadOptions options;                 // the proto pipeserve.UploadOptions
//   options.set_num_stages(4);
//   ASSIGN_OR_RETURN(UploadResult up,
//                    client->Upload("example", "example.psm", options));
//   Tensor x = Tensor::Zeros({16, 512}), y = Tensor::Zeros({16, 512});
//   ASSIGN_OR_RETURN(std::vector<NamedTensor> outputs,
//                    client->Infer("example", {{"x", x}, {"y", y}}));
//   // outputs[0].name, outputs[0].tensor.shape() == {16, 512}
#ifndef PIPESERVE_CLIENT_CLIENT_H_
#define PIPESERVE_CLIENT_CLIENT_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace grpc {
class ClientContext;
}
#include "proto/grpc_service.pb.h"
#include "proto/pipeserve_service.pb.h"
#include "runtime/tensor.h"

namespace pipeserve {

struct ClientOptions {
  // Deadline of each call (Upload adds time for the file's size, see there).
  absl::Duration timeout = absl::Seconds(60);
  // Attempts at an idempotent call (inference, metadata, readiness,
  // GetPlan, ListModels) that fails with UNAVAILABLE, with exponential
  // backoff from 100 ms to 2 s, always within the call's deadline (gRPC's
  // retry policy, set through the channel's service config; gRPC allows at
  // most 5). 1: no retries.
  int retry_attempts = 5;
  // Largest message sent or received; an inference request or response
  // carries all its tensors in one message.
  int max_message_bytes = 1 << 30;
  // Bearer token sent with every call (`authorization: Bearer <token>`),
  // when the server has --auth_tokens; "" sends none.
  std::string token;
  // TLS: the PEM roots the server's certificate must chain to. Setting it
  // (or a client certificate) turns TLS on; nothing set is plaintext.
  std::string tls_ca_file;
  // A client certificate and key, for servers that require one (stage
  // servers, which take only cluster certificates).
  std::string tls_cert_file;
  std::string tls_key_file;
  // The name the server's certificate must carry, when it differs from the
  // host in the address (e.g. connecting by IP address).
  std::string tls_server_name;
};

// A tensor with the name the model gives it (an input or output name).
struct NamedTensor {
  std::string name;
  Tensor tensor;
};

// What the coordinator reports after a successful upload.
struct UploadResult {
  std::string name;
  uint64_t bytes = 0;  // bytes the server received
  int num_stages = 0;  // stages the model was cut into (0 while waiting)
  // Stored but not deployed yet: what it waits for (UploadResponse.waiting).
  std::string waiting;
};

// Thread-safe: methods may be called concurrently (each is its own call).
// Errors from the server keep their gRPC code: kUnauthenticated without a
// valid token, kPermissionDenied for a token without the call's scope.
class Client {
 public:
  // Bytes of file data per Upload message.
  static constexpr size_t kUploadChunkBytes = 1 << 20;

  // A client of the server at `address` ("host:port"). The connection is
  // made lazily, so an unreachable server shows up as kUnavailable from the
  // first call, not here. kInvalidArgument for an empty address.
  static absl::StatusOr<std::unique_ptr<Client>> Connect(
      const std::string& address, ClientOptions options = {});

  ~Client();
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  const std::string& address() const { return address_; }

  // Streams the model file at `path` to the server as model `name`, in
  // kUploadChunkBytes chunks read one at a time (files may be larger than
  // memory or 2 GiB), and returns once the server has checked, partitioned
  // and deployed it. `progress(sent, total)`, when given, runs after each
  // chunk. The deadline is options.timeout plus one second per 16 MiB of
  // file. kNotFound when the file cannot be opened, kDataLoss when it cannot
  // be read to its end; otherwise the server's error.
  absl::StatusOr<UploadResult> Upload(
      const std::string& name, const std::string& path,
      const UploadOptions& options,
      std::function<void(uint64_t sent, uint64_t total)> progress = nullptr);

  // Stops serving model `name` and removes it from the server's
  // repository (kNotFound for an unknown model).
  absl::Status Unload(const std::string& name);

  // The stages of model `name`, the stage servers holding them and the
  // microbatch count (kNotFound for an unknown model, from the server).
  absl::StatusOr<GetPlanResponse> GetPlan(const std::string& name);

  // Every model the server knows, in the server's order.
  absl::StatusOr<std::vector<ModelSummary>> ListModels();

  // Runs model `model` on `inputs` (float32; sent as KServe "FP32" raw
  // contents, in the given order) and returns its outputs in the model's
  // output order. `timeout` of zero means options.timeout. kInvalidArgument
  // for an input without storage; kInternal naming the output when the
  // response is malformed (not FP32, a size that does not match its shape,
  // contents missing); otherwise the server's error. With `trace`, the
  // request asks for its timeline (KServe parameter "trace") and `*trace`
  // gets it as Chrome trace JSON, for Perfetto ("" when the server sent
  // none).
  absl::StatusOr<std::vector<NamedTensor>> Infer(
      const std::string& model, const std::vector<NamedTensor>& inputs,
      absl::Duration timeout = absl::ZeroDuration(),
      std::string* trace = nullptr);

  // Generates tokens from `request.model()` (a model exported with
  // generation=True; pipeserve.GenerationService), calling `on_token` with
  // each response as it arrives (the last has finish_reason set). When
  // `on_token` returns false the call is cancelled (kCancelled). The
  // deadline is options.timeout unless `timeout` is given.
  absl::Status Generate(const GenerateRequest& request,
                        const std::function<bool(const GenerateResponse&)>& on_token,
                        absl::Duration timeout = absl::ZeroDuration());

  // The model's input and output names, datatypes and shapes (-1: batch).
  absl::StatusOr<inference::ModelMetadataResponse> ModelMetadata(
      const std::string& model);

  // KServe ServerLive, ServerReady and ModelReady.
  absl::StatusOr<bool> ServerLive();
  absl::StatusOr<bool> ServerReady();
  absl::StatusOr<bool> ModelReady(const std::string& model);

  // grpc.health.v1.Health/Check for the whole server (service ""):
  // "SERVING", "NOT_SERVING", "UNKNOWN" or "SERVICE_UNKNOWN". kUnimplemented
  // when the server offers no health service.
  absl::StatusOr<std::string> Health();

 private:
  struct Stubs;  // the generated gRPC stubs, kept out of this header
  // Deadline and token for one call.
  void Prepare(grpc::ClientContext* ctx, absl::Duration timeout) const;
  Client(std::string address, ClientOptions options,
         std::unique_ptr<Stubs> stubs);

  const std::string address_;
  const ClientOptions options_;
  std::unique_ptr<Stubs> stubs_;
};

}  // namespace pipeserve

#endif  // PIPESERVE_CLIENT_CLIENT_H_
