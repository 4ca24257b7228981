#include "client/fake_server.h"

#include <mutex>

#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <zlib.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <map>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "proto/grpc_service.grpc.pb.h"
#include "proto/pipeserve_service.grpc.pb.h"

namespace pipeserve {
namespace {

grpc::Status NotKnown(const std::string& model) {
  return grpc::Status(grpc::StatusCode::NOT_FOUND,
                      absl::StrCat("model \"", model, "\" is not known"));
}

bool IsInferModel(const std::string& m) {
  return m == "neg" || m == "slow" || m == "bad" || m == "flaky";
}

// Shared by both services; guarded by its own mutex.
struct State {
  mutable absl::Mutex mu;
  std::vector<FakeServer::Upload> uploads ABSL_GUARDED_BY(mu);
  std::map<std::string, GetPlanResponse> plans ABSL_GUARDED_BY(mu);
  bool serving ABSL_GUARDED_BY(mu) = true;
  int flaky_failures ABSL_GUARDED_BY(mu) = 0;  // UNAVAILABLE answers left for "flaky"
  int flaky_attempts ABSL_GUARDED_BY(mu) = 0;
};

class InferenceService final : public inference::GRPCInferenceService::Service {
 public:
  explicit InferenceService(State* state) : state_(state) {}

  grpc::Status ServerLive(grpc::ServerContext*,
                          const inference::ServerLiveRequest*,
                          inference::ServerLiveResponse* out) override {
    out->set_live(true);
    return grpc::Status::OK;
  }

  grpc::Status ServerReady(grpc::ServerContext*,
                           const inference::ServerReadyRequest*,
                           inference::ServerReadyResponse* out) override {
    absl::MutexLock lock(&state_->mu);
    out->set_ready(state_->serving);
    return grpc::Status::OK;
  }

  grpc::Status ModelReady(grpc::ServerContext*,
                          const inference::ModelReadyRequest* in,
                          inference::ModelReadyResponse* out) override {
    out->set_ready(IsInferModel(in->name()));  // unknown: not ready, as Triton answers
    return grpc::Status::OK;
  }

  grpc::Status ModelMetadata(grpc::ServerContext*,
                             const inference::ModelMetadataRequest* in,
                             inference::ModelMetadataResponse* out) override {
    if (!IsInferModel(in->name())) return NotKnown(in->name());
    out->set_name(in->name());
    out->set_platform("pipeserve");
    for (const char* name : {"x", "y"}) {
      auto* t = out->add_inputs();
      t->set_name(name);
      t->set_datatype("FP32");
      t->add_shape(-1);
      t->add_shape(-1);
      auto* o = out->add_outputs();
      *o = *t;
      o->set_name(absl::StrCat("neg_", name));
    }
    return grpc::Status::OK;
  }

  grpc::Status ModelInfer(grpc::ServerContext* ctx,
                          const inference::ModelInferRequest* in,
                          inference::ModelInferResponse* out) override {
    const std::string& model = in->model_name();
    if (!IsInferModel(model)) return NotKnown(model);
    if (model == "flaky") {
      absl::MutexLock lock(&state_->mu);
      ++state_->flaky_attempts;
      if (state_->flaky_failures > 0) {
        --state_->flaky_failures;
        return grpc::Status(grpc::StatusCode::UNAVAILABLE, "flaky: not this time");
      }
    }
    if (model == "slow") {
      auto until = std::chrono::steady_clock::now() + std::chrono::seconds(2);
      while (std::chrono::steady_clock::now() < until && !ctx->IsCancelled()) {
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
    }
    if (in->raw_input_contents_size() != in->inputs_size()) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                          "raw_input_contents does not match inputs");
    }
    out->set_model_name(model);
    for (int i = 0; i < in->inputs_size(); ++i) {
      const auto& input = in->inputs(i);
      if (input.datatype() != "FP32") {
        return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                            absl::StrCat("input \"", input.name(),
                                         "\": datatype ", input.datatype()));
      }
      auto* o = out->add_outputs();
      o->set_name(absl::StrCat("neg_", input.name()));
      o->set_datatype("FP32");
      *o->mutable_shape() = input.shape();
      // The negation of every float32 of the input, bytes in the same order.
      std::string bytes = in->raw_input_contents(i);
      for (size_t j = 0; j + 4 <= bytes.size(); j += 4) {
        float v;
        std::memcpy(&v, &bytes[j], 4);
        v = -v;
        std::memcpy(&bytes[j], &v, 4);
      }
      if (model == "bad") bytes.resize(bytes.size() / 2);
      out->add_raw_output_contents(std::move(bytes));
    }
    // A timeline when asked for one (model "neg" only, as a server that
    // cannot trace would not send one).
    auto trace = in->parameters().find("trace");
    if (model == "neg" && trace != in->parameters().end() && trace->second.bool_param()) {
      (*out->mutable_parameters())["trace"].set_string_param("{\"traceEvents\":[]}\n");
    }
    return grpc::Status::OK;
  }

 private:
  State* state_;
};

class ModelServiceImpl final : public ModelService::Service {
 public:
  explicit ModelServiceImpl(State* state) : state_(state) {}

  grpc::Status Upload(grpc::ServerContext*,
                      grpc::ServerReader<UploadRequest>* reader,
                      UploadResponse* out) override {
    FakeServer::Upload up;
    UploadRequest request;
    uLong crc = crc32(0L, Z_NULL, 0);
    bool last = false;
    uint64_t total = 0;
    uint32_t claimed_crc = 0;
    while (reader->Read(&request)) {
      if (up.messages++ == 0) {
        up.name = request.name();
        up.options = request.options();
        if (up.name == "reject") {  // refused before the data is read
          return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                              "model \"reject\": refused");
        }
      }
      if (last) {
        return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                            "message after the last one");
      }
      crc = crc32(crc, reinterpret_cast<const Bytef*>(request.data().data()),
                  static_cast<uInt>(request.data().size()));
      up.bytes += request.data().size();
      if (request.last()) {
        last = true;
        total = request.total_bytes();
        claimed_crc = request.crc32();
      }
    }
    up.crc32 = static_cast<uint32_t>(crc);
    if (up.name.empty()) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                          "the first message names no model");
    }
    if (!last) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                          "upload ended without a last message");
    }
    if (total != up.bytes || claimed_crc != up.crc32) {
      return grpc::Status(
          grpc::StatusCode::DATA_LOSS,
          absl::StrCat("received ", up.bytes, " bytes with CRC-32 ", up.crc32,
                       ", the client sent ", total, " with ", claimed_crc));
    }
    out->set_name(up.name);
    out->set_bytes(up.bytes);
    out->set_num_stages(std::max(1, up.options.num_stages()));
    absl::MutexLock lock(&state_->mu);
    state_->uploads.push_back(std::move(up));
    return grpc::Status::OK;
  }

  grpc::Status GetPlan(grpc::ServerContext*, const GetPlanRequest* in,
                       GetPlanResponse* out) override {
    absl::MutexLock lock(&state_->mu);
    auto it = state_->plans.find(in->name());
    if (it == state_->plans.end()) return NotKnown(in->name());
    *out = it->second;
    return grpc::Status::OK;
  }

  grpc::Status ListModels(grpc::ServerContext*, const ListModelsRequest*,
                          ListModelsResponse* out) override {
    absl::MutexLock lock(&state_->mu);
    for (const FakeServer::Upload& up : state_->uploads) {
      ModelSummary* m = out->add_models();
      m->set_name(up.name);
      m->set_state("READY");
      m->set_num_stages(std::max(1, up.options.num_stages()));
      m->set_bytes(up.bytes);
    }
    return grpc::Status::OK;
  }

 private:
  State* state_;
};

// Model "count": the tokens after the prompt's last, counting up by one,
// max_tokens of them; the request as received is kept.
class GenerationServiceImpl final : public GenerationService::Service {
 public:
  grpc::Status Generate(grpc::ServerContext*, const GenerateRequest* req,
                        grpc::ServerWriter<GenerateResponse>* writer) override {
    {
      std::lock_guard<std::mutex> l(mu_);
      last_ = *req;
    }
    if (req->model() != "count") {
      return grpc::Status(grpc::StatusCode::NOT_FOUND,
                          "model \"" + req->model() + "\" is not known");
    }
    if (req->prompt().empty()) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "the prompt has no tokens");
    }
    for (int64_t i = 0; i < req->max_tokens(); ++i) {
      GenerateResponse r;
      r.set_token_id(req->prompt(req->prompt_size() - 1) + 1 + i);
      r.set_index(i);
      if (i + 1 == req->max_tokens()) r.set_finish_reason("length");
      if (!writer->Write(r)) break;
    }
    return grpc::Status::OK;
  }
  GenerateRequest last() {
    std::lock_guard<std::mutex> l(mu_);
    return last_;
  }

 private:
  std::mutex mu_;
  GenerateRequest last_;
};

}  // namespace

struct FakeServer::Impl {
  State state;
  InferenceService inference{&state};
  ModelServiceImpl models{&state};
  GenerationServiceImpl generation;
  std::unique_ptr<grpc::Server> server;
  int port = 0;
};

FakeServer::FakeServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

FakeServer::~FakeServer() {
  impl_->server->Shutdown(std::chrono::system_clock::now());
  impl_->server->Wait();
}

std::unique_ptr<FakeServer> FakeServer::Start() {
  grpc::EnableDefaultHealthCheckService(true);
  auto impl = std::make_unique<Impl>();
  grpc::ServerBuilder builder;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(),
                           &impl->port);
  builder.SetMaxReceiveMessageSize(1 << 30);
  builder.SetMaxSendMessageSize(1 << 30);
  builder.RegisterService(&impl->inference);
  builder.RegisterService(&impl->models);
  builder.RegisterService(&impl->generation);
  impl->server = builder.BuildAndStart();
  if (impl->server == nullptr || impl->port == 0) {
    std::cerr << "FakeServer: cannot listen on 127.0.0.1\n";
    std::abort();
  }
  return std::unique_ptr<FakeServer>(new FakeServer(std::move(impl)));
}

std::string FakeServer::address() const {
  return absl::StrCat("127.0.0.1:", impl_->port);
}

std::vector<FakeServer::Upload> FakeServer::uploads() const {
  absl::MutexLock lock(&impl_->state.mu);
  return impl_->state.uploads;
}

void FakeServer::SetPlan(const GetPlanResponse& response) {
  absl::MutexLock lock(&impl_->state.mu);
  impl_->state.plans[response.name()] = response;
}

void FakeServer::SetServing(bool serving) {
  {
    absl::MutexLock lock(&impl_->state.mu);
    impl_->state.serving = serving;
  }
  impl_->server->GetHealthCheckService()->SetServingStatus(serving);
}

void FakeServer::SetFlakyFailures(int n) {
  absl::MutexLock lock(&impl_->state.mu);
  impl_->state.flaky_failures = n;
  impl_->state.flaky_attempts = 0;
}

GenerateRequest FakeServer::last_generate_request() const {
  return impl_->generation.last();
}

int FakeServer::flaky_attempts() const {
  absl::MutexLock lock(&impl_->state.mu);
  return impl_->state.flaky_attempts;
}

}  // namespace pipeserve
