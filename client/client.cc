#include "client/client.h"

#include "graph/dtype.h"

#include <google/protobuf/io/coded_stream.h>
#include <google/protobuf/wire_format_lite.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <sys/stat.h>
#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "common/credentials.h"
#include "common/grpc_status.h"
#include "common/status_macros.h"
#include "proto/grpc_service.grpc.pb.h"
#include "proto/pipeserve_service.grpc.pb.h"

namespace pipeserve {

struct Client::Stubs {
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<inference::GRPCInferenceService::Stub> inference;
  std::unique_ptr<ModelService::Stub> models;
  std::unique_ptr<GenerationService::Stub> generation;
  std::unique_ptr<grpc::GenericStub> generic;  // for grpc.health.v1
};

namespace {

absl::Status FromGrpc(const grpc::Status& s) { return FromGrpcStatus(s); }

// A file opened for reading, closed on scope exit.
struct File {
  std::FILE* f = nullptr;
  ~File() {
    if (f != nullptr) std::fclose(f);
  }
};

// grpc.health.v1.HealthCheckResponse.ServingStatus by number.
std::string ServingStatusName(uint32_t v) {
  switch (v) {
    case 0:
      return "UNKNOWN";
    case 1:
      return "SERVING";
    case 2:
      return "NOT_SERVING";
    case 3:
      return "SERVICE_UNKNOWN";
  }
  return absl::StrCat("STATUS_", v);
}

// Field 1 (`status`, an enum) of a serialized HealthCheckResponse; 0 when
// absent, as proto3 says.
absl::StatusOr<uint32_t> DecodeServingStatus(const std::string& bytes) {
  using google::protobuf::internal::WireFormatLite;
  google::protobuf::io::CodedInputStream in(
      reinterpret_cast<const uint8_t*>(bytes.data()),
      static_cast<int>(bytes.size()));
  uint32_t status = 0;
  while (uint32_t tag = in.ReadTag()) {
    if (tag == WireFormatLite::MakeTag(1, WireFormatLite::WIRETYPE_VARINT)) {
      if (!in.ReadVarint32(&status)) break;
    } else if (!WireFormatLite::SkipField(&in, tag)) {
      return absl::InternalError("malformed grpc.health.v1 response");
    }
  }
  if (!in.ConsumedEntireMessage()) {
    return absl::InternalError("malformed grpc.health.v1 response");
  }
  return status;
}

// Sends the file's `total` bytes in chunks (the first names the model and
// carries the options, the last the size and CRC-32), calling `progress`
// after each. kDataLoss when the file reads short; a broken stream just
// stops (Finish says why).
absl::Status SendChunks(std::FILE* f, uint64_t total, const std::string& path,
                        const std::string& name, const UploadOptions& options,
                        grpc::ClientWriter<UploadRequest>* writer,
                        const std::function<void(uint64_t, uint64_t)>& progress) {
  std::string buffer(Client::kUploadChunkBytes, '\0');
  uint64_t sent = 0;
  uLong crc = crc32(0L, Z_NULL, 0);
  bool first = true;
  // At least one message, so that an empty file still names the model.
  while (first || sent < total) {
    size_t want = static_cast<size_t>(std::min<uint64_t>(Client::kUploadChunkBytes, total - sent));
    size_t got = want == 0 ? 0 : std::fread(&buffer[0], 1, want, f);
    if (got != want) {
      return absl::DataLossError(absl::StrCat("model file \"", path, "\": read ", sent + got,
                                              " of ", total,
                                              " bytes (did it change during the upload?)"));
    }
    crc = crc32(crc, reinterpret_cast<const Bytef*>(buffer.data()), static_cast<uInt>(got));
    UploadRequest request;
    if (first) {
      request.set_name(name);
      *request.mutable_options() = options;
      first = false;
    }
    request.set_data(buffer.data(), got);
    sent += got;
    if (sent == total) {
      request.set_last(true);
      request.set_total_bytes(total);
      request.set_crc32(static_cast<uint32_t>(crc));
    }
    if (!writer->Write(request)) break;
    if (progress) progress(sent, total);
  }
  return absl::OkStatus();
}

// A ModelInfer request for `inputs` (raw contents, row-major), asking for
// a trace if `trace`.
absl::StatusOr<inference::ModelInferRequest> InferRequestOf(const std::string& model,
                                                            const std::vector<NamedTensor>& inputs,
                                                            bool trace) {
  inference::ModelInferRequest request;
  request.set_model_name(model);
  if (trace) (*request.mutable_parameters())["trace"].set_bool_param(true);
  for (const NamedTensor& in : inputs) {
    if (in.tensor.data() == nullptr && in.tensor.numel() != 0) {
      return absl::InvalidArgumentError(absl::StrCat("input \"", in.name, "\" has no data"));
    }
    auto* t = request.add_inputs();
    t->set_name(in.name);
    t->set_datatype(KServeName(in.tensor.dtype()));
    for (int64_t d : in.tensor.shape()) t->add_shape(d);
    // Row-major, little-endian like every machine this runs on.
    std::string* raw = request.add_raw_input_contents();
    if (in.tensor.numel() > 0) {
      raw->assign(static_cast<const char*>(in.tensor.raw_data()),
                  static_cast<size_t>(in.tensor.byte_size()));
    }
  }
  return request;
}

// Output i of a response, from its raw contents (`raw`) or its
// fp32_contents, its bytes checked against its shape before anything is
// allocated. kInternal "malformed response: ..." when they do not fit.
absl::StatusOr<Tensor> OutputOf(const inference::ModelInferResponse& response, int i, bool raw) {
  const auto& out = response.outputs(i);
  auto bad = [&](const std::string& what) {
    return absl::InternalError(
        absl::StrCat("malformed response: output \"", out.name(), "\": ", what));
  };
  absl::StatusOr<DataType> dtype = ParseKServeName(out.datatype());
  if (!dtype.ok()) return bad(std::string(dtype.status().message()));
  const int element = ElementSize(*dtype);
  Shape shape(out.shape().begin(), out.shape().end());
  absl::StatusOr<uint64_t> size = CheckedByteSize(shape, element);
  if (!size.ok()) return bad(std::string(size.status().message()));
  const int64_t numel = static_cast<int64_t>(*size / element);
  if (!raw && *dtype != DT_FLOAT32) {
    return bad(absl::StrCat(out.datatype(), " output without raw_output_contents"));
  }
  if (raw ? response.raw_output_contents(i).size() != *size
          : static_cast<uint64_t>(out.contents().fp32_contents().size()) != *size / 4) {
    return bad(absl::StrCat("contents do not match shape ", ShapeToString(shape), " (", *size,
                            " bytes expected)"));
  }
  Tensor t = Tensor::Empty(shape, *dtype);
  if (raw) {
    const std::string& bytes = response.raw_output_contents(i);
    if (numel > 0) std::memcpy(t.raw_data(), bytes.data(), bytes.size());
  } else {
    const auto& values = out.contents().fp32_contents();
    if (values.size() != numel) {
      return bad(absl::StrCat(values.size(), " fp32_contents for shape ", ShapeToString(shape)));
    }
    std::copy(values.begin(), values.end(), t.data());
  }
  return t;
}

}  // namespace

Client::Client(std::string address, ClientOptions options,
               std::unique_ptr<Stubs> stubs)
    : address_(std::move(address)),
      options_(options),
      stubs_(std::move(stubs)) {}

Client::~Client() = default;

namespace {

// gRPC's retry policy for the calls that are safe to repeat: UNAVAILABLE
// (a coordinator restarting, a connection lost) is tried again.
std::string RetryServiceConfig(int attempts) {
  std::string names;
  for (const char* m : {"ModelInfer", "ServerLive", "ServerReady", "ModelReady", "ServerMetadata",
                        "ModelMetadata", "RepositoryIndex"}) {
    absl::StrAppend(&names, "{\"service\":\"inference.GRPCInferenceService\",\"method\":\"",
                    m, "\"},");
  }
  for (const char* m : {"GetPlan", "ListModels"}) {
    absl::StrAppend(&names, "{\"service\":\"pipeserve.ModelService\",\"method\":\"", m,
                    "\"},");
  }
  names += "{\"service\":\"grpc.health.v1.Health\",\"method\":\"Check\"}";
  return absl::StrCat(
      "{\"methodConfig\":[{\"name\":[", names,
      "],\"retryPolicy\":{\"maxAttempts\":", std::min(attempts, 5),
      ",\"initialBackoff\":\"0.1s\",\"maxBackoff\":\"2s\",\"backoffMultiplier\":2,"
      "\"retryableStatusCodes\":[\"UNAVAILABLE\"]}}]}");
}

}  // namespace

absl::StatusOr<std::unique_ptr<Client>> Client::Connect(
    const std::string& address, ClientOptions options) {
  if (address.empty()) {
    return absl::InvalidArgumentError(
        "server address is empty (want HOST:PORT)");
  }
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(options.max_message_bytes);
  args.SetMaxSendMessageSize(options.max_message_bytes);
  // A connection of its own: gRPC otherwise shares subchannels between
  // channels to the same address in a process, and one left in reconnect
  // backoff by an earlier server on that port would fail this client's
  // calls for up to two minutes.
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  if (options.retry_attempts > 1) {
    args.SetServiceConfigJSON(RetryServiceConfig(options.retry_attempts));
    // A request is kept for its retries while it is in flight; gRPC's
    // default (256 KiB) would leave most inference requests unretried.
    args.SetInt(GRPC_ARG_PER_RPC_RETRY_BUFFER_SIZE,
                std::min(options.max_message_bytes, 256 << 20));
  }
  if (!options.tls_server_name.empty()) {
    args.SetSslTargetNameOverride(options.tls_server_name);
  }
  const bool tls = !options.tls_ca_file.empty() || !options.tls_cert_file.empty();
  std::shared_ptr<grpc::ChannelCredentials> credentials = grpc::InsecureChannelCredentials();
  if (tls) {
    ASSIGN_OR_RETURN(credentials, MakeChannelCredentials({options.tls_cert_file,
                                                          options.tls_key_file,
                                                          options.tls_ca_file}));
  }
  auto stubs = std::make_unique<Stubs>();
  stubs->channel = grpc::CreateCustomChannel(address, credentials, args);
  stubs->inference = inference::GRPCInferenceService::NewStub(stubs->channel);
  stubs->models = ModelService::NewStub(stubs->channel);
  stubs->generation = GenerationService::NewStub(stubs->channel);
  stubs->generic = std::make_unique<grpc::GenericStub>(stubs->channel);
  return std::unique_ptr<Client>(
      new Client(address, options, std::move(stubs)));
}

absl::StatusOr<UploadResult> Client::Upload(
    const std::string& name, const std::string& path,
    const UploadOptions& options,
    std::function<void(uint64_t, uint64_t)> progress) {
  File file;
  file.f = std::fopen(path.c_str(), "rb");
  struct stat st;
  if (file.f == nullptr || fstat(fileno(file.f), &st) != 0) {
    return absl::NotFoundError(absl::StrCat("cannot open model file \"", path,
                                            "\": ", std::strerror(errno)));
  }
  const uint64_t total = static_cast<uint64_t>(st.st_size);

  grpc::ClientContext ctx;
  // Room for the transfer itself at 16 MiB/s or better, beside the time the
  // server takes to partition and deploy.
  Prepare(&ctx, options_.timeout +
                        absl::Seconds(static_cast<double>(total) / (16 << 20)));
  UploadResponse response;
  std::unique_ptr<grpc::ClientWriter<UploadRequest>> writer =
      stubs_->models->Upload(&ctx, &response);

  absl::Status read_error =
      SendChunks(file.f, total, path, name, options, writer.get(), progress);
  if (!read_error.ok()) {
    ctx.TryCancel();
    writer->Finish().IgnoreError();
    return read_error;
  }
  writer->WritesDone();
  grpc::Status s = writer->Finish();
  if (!s.ok()) return FromGrpc(s);
  return UploadResult{response.name(), response.bytes(), response.num_stages(),
                      response.waiting()};
}

void Client::Prepare(grpc::ClientContext* ctx, absl::Duration timeout) const {
  ctx->set_deadline(std::chrono::system_clock::now() + absl::ToChronoNanoseconds(timeout));
  if (!options_.token.empty()) {
    ctx->AddMetadata("authorization", absl::StrCat("Bearer ", options_.token));
  }
}

absl::Status Client::Unload(const std::string& name) {
  grpc::ClientContext ctx;
  Prepare(&ctx, options_.timeout);
  UnloadRequest request;
  request.set_name(name);
  UnloadResponse response;
  return FromGrpc(stubs_->models->Unload(&ctx, request, &response));
}

absl::Status Client::Generate(const GenerateRequest& request,
                              const std::function<bool(const GenerateResponse&)>& on_token,
                              absl::Duration timeout) {
  grpc::ClientContext ctx;
  Prepare(&ctx, timeout > absl::ZeroDuration() ? timeout : options_.timeout);
  std::unique_ptr<grpc::ClientReader<GenerateResponse>> reader =
      stubs_->generation->Generate(&ctx, request);
  GenerateResponse response;
  while (reader->Read(&response)) {
    if (!on_token(response)) {
      ctx.TryCancel();
      reader->Finish().IgnoreError();
      return absl::CancelledError("generation stopped by the caller");
    }
  }
  return FromGrpc(reader->Finish());
}

absl::StatusOr<GetPlanResponse> Client::GetPlan(const std::string& name) {
  grpc::ClientContext ctx;
  Prepare(&ctx, options_.timeout);
  GetPlanRequest request;
  request.set_name(name);
  GetPlanResponse response;
  grpc::Status s = stubs_->models->GetPlan(&ctx, request, &response);
  if (!s.ok()) return FromGrpc(s);
  return response;
}

absl::StatusOr<std::vector<ModelSummary>> Client::ListModels() {
  grpc::ClientContext ctx;
  Prepare(&ctx, options_.timeout);
  ListModelsResponse response;
  grpc::Status s =
      stubs_->models->ListModels(&ctx, ListModelsRequest(), &response);
  if (!s.ok()) return FromGrpc(s);
  return std::vector<ModelSummary>(response.models().begin(),
                                   response.models().end());
}

absl::StatusOr<std::vector<NamedTensor>> Client::Infer(
    const std::string& model, const std::vector<NamedTensor>& inputs,
    absl::Duration timeout, std::string* trace) {
  ASSIGN_OR_RETURN(inference::ModelInferRequest request,
                   InferRequestOf(model, inputs, trace != nullptr));
  grpc::ClientContext ctx;
  Prepare(&ctx,
              timeout > absl::ZeroDuration() ? timeout : options_.timeout);
  inference::ModelInferResponse response;
  grpc::Status s = stubs_->inference->ModelInfer(&ctx, request, &response);
  if (!s.ok()) return FromGrpc(s);

  // Outputs come as raw contents (what pipeserve sends) or, from other
  // KServe servers, as typed fp32_contents; not both.
  const bool raw = response.raw_output_contents_size() > 0;
  if (raw && response.raw_output_contents_size() != response.outputs_size()) {
    return absl::InternalError(absl::StrCat(
        "malformed response: ", response.outputs_size(), " outputs but ",
        response.raw_output_contents_size(), " raw_output_contents"));
  }
  std::vector<NamedTensor> outputs;
  outputs.reserve(response.outputs_size());
  for (int i = 0; i < response.outputs_size(); ++i) {
    ASSIGN_OR_RETURN(Tensor t, OutputOf(response, i, raw));
    outputs.push_back({response.outputs(i).name(), std::move(t)});
  }
  if (trace != nullptr) {
    auto it = response.parameters().find("trace");
    *trace = it == response.parameters().end() ? "" : it->second.string_param();
  }
  return outputs;
}

absl::StatusOr<inference::ModelMetadataResponse> Client::ModelMetadata(
    const std::string& model) {
  grpc::ClientContext ctx;
  Prepare(&ctx, options_.timeout);
  inference::ModelMetadataRequest request;
  request.set_name(model);
  inference::ModelMetadataResponse response;
  grpc::Status s = stubs_->inference->ModelMetadata(&ctx, request, &response);
  if (!s.ok()) return FromGrpc(s);
  return response;
}

absl::StatusOr<bool> Client::ServerLive() {
  grpc::ClientContext ctx;
  Prepare(&ctx, options_.timeout);
  inference::ServerLiveResponse response;
  grpc::Status s = stubs_->inference->ServerLive(
      &ctx, inference::ServerLiveRequest(), &response);
  if (!s.ok()) return FromGrpc(s);
  return response.live();
}

absl::StatusOr<bool> Client::ServerReady() {
  grpc::ClientContext ctx;
  Prepare(&ctx, options_.timeout);
  inference::ServerReadyResponse response;
  grpc::Status s = stubs_->inference->ServerReady(
      &ctx, inference::ServerReadyRequest(), &response);
  if (!s.ok()) return FromGrpc(s);
  return response.ready();
}

absl::StatusOr<bool> Client::ModelReady(const std::string& model) {
  grpc::ClientContext ctx;
  Prepare(&ctx, options_.timeout);
  inference::ModelReadyRequest request;
  request.set_name(model);
  inference::ModelReadyResponse response;
  grpc::Status s = stubs_->inference->ModelReady(&ctx, request, &response);
  if (!s.ok()) return FromGrpc(s);
  return response.ready();
}

absl::StatusOr<std::string> Client::Health() {
  // Debian ships no C++ classes for grpc/health/v1/health.proto, so the call
  // goes through the generic stub with hand-encoded messages: the request
  // HealthCheckRequest{service: ""} is the empty message.
  grpc::ClientContext ctx;
  Prepare(&ctx, options_.timeout);
  grpc::Slice empty("", 0);
  grpc::ByteBuffer request(&empty, 1), response;
  grpc::Status status;
  absl::Notification done;
  stubs_->generic->UnaryCall(&ctx, "/grpc.health.v1.Health/Check",
                             grpc::StubOptions(), &request, &response,
                             [&](grpc::Status s) {
                               status = std::move(s);
                               done.Notify();
                             });
  done.WaitForNotification();
  if (!status.ok()) return FromGrpc(status);
  std::string bytes;
  if (response.Valid()) {  // an empty message may come as no buffer at all
    std::vector<grpc::Slice> slices;
    RETURN_IF_ERROR(FromGrpc(response.Dump(&slices)));
    for (const grpc::Slice& s : slices) {
      bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
    }
  }
  ASSIGN_OR_RETURN(uint32_t serving, DecodeServingStatus(bytes));
  return ServingStatusName(serving);
}

}  // namespace pipeserve
