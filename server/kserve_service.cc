#include "server/kserve_service.h"

#include <cstring>
#include <thread>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"
#include "server/stage_service.h"

namespace pipeserve {
namespace {

constexpr char kVersion[] = "1";

absl::Status CheckVersion(const std::string& model, const std::string& version) {
  if (version.empty() || version == kVersion) return absl::OkStatus();
  return absl::NotFoundError(absl::StrCat("model \"", model, "\" has no version \"",
                                          version, "\" (pipeserve serves version ", kVersion, ")"));
}

absl::Time DeadlineOf(grpc::ServerContext* ctx) {
  auto d = ctx->deadline();
  if (d >= std::chrono::system_clock::time_point::max() - std::chrono::hours(24 * 365)) {
    return absl::InfiniteFuture();
  }
  return absl::FromChrono(d);
}

// Tensors for the request's inputs, in the plan's input order.
absl::StatusOr<std::vector<Tensor>> ParseInputs(const inference::ModelInferRequest& req,
                                                const Plan& plan) {
  const bool raw = req.raw_input_contents_size() > 0;
  if (raw && req.raw_input_contents_size() != req.inputs_size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "raw_input_contents has ", req.raw_input_contents_size(), " entries for ",
        req.inputs_size(), " inputs (one per input, in order)"));
  }
  absl::flat_hash_map<std::string, int> want;
  std::vector<std::string> names;
  for (int i = 0; i < plan.inputs_size(); ++i) {
    want[plan.inputs(i).name()] = i;
    names.push_back(plan.inputs(i).name());
  }
  std::vector<Tensor> tensors(plan.inputs_size());
  std::vector<bool> seen(plan.inputs_size(), false);
  for (int k = 0; k < req.inputs_size(); ++k) {
    const auto& in = req.inputs(k);
    auto it = want.find(in.name());
    if (it == want.end()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "unexpected input \"", in.name(), "\" (the model's inputs: ",
          absl::StrJoin(names, ", "), ")"));
    }
    if (seen[it->second]) {
      return absl::InvalidArgumentError(absl::StrCat("input \"", in.name(), "\" is given twice"));
    }
    seen[it->second] = true;
    if (in.datatype() != "FP32") {
      return absl::InvalidArgumentError(absl::StrCat(
          "input \"", in.name(), "\": datatype ", in.datatype().empty() ? "(none)" : in.datatype(),
          " is not supported (expected FP32)"));
    }
    Shape shape(in.shape().begin(), in.shape().end());
    for (int64_t d : shape) {
      if (d < 0) {
        return absl::InvalidArgumentError(absl::StrCat(
            "input \"", in.name(), "\": shape ", ShapeToString(shape), " has a negative dimension"));
      }
    }
    Tensor t = Tensor::Empty(shape);
    if (raw) {
      if (in.has_contents()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "input \"", in.name(), "\": contents must be empty when raw_input_contents is used"));
      }
      const std::string& bytes = req.raw_input_contents(k);
      if (bytes.size() != static_cast<size_t>(t.byte_size())) {
        return absl::InvalidArgumentError(absl::StrCat(
            "input \"", in.name(), "\": raw contents hold ", bytes.size(), " bytes, but FP32 ",
            ShapeToString(shape), " needs ", t.byte_size()));
      }
      if (!bytes.empty()) std::memcpy(t.data(), bytes.data(), bytes.size());
    } else {
      const auto& values = in.contents().fp32_contents();
      if (values.size() != t.numel()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "input \"", in.name(), "\": contents.fp32_contents holds ", values.size(),
            " values, but ", ShapeToString(shape), " needs ", t.numel()));
      }
      if (t.numel() > 0) std::memcpy(t.data(), values.data(), t.byte_size());
    }
    tensors[it->second] = std::move(t);
  }
  for (int i = 0; i < plan.inputs_size(); ++i) {
    if (!seen[i]) {
      return absl::InvalidArgumentError(absl::StrCat(
          "missing input \"", plan.inputs(i).name(), "\" (the model's inputs: ",
          absl::StrJoin(names, ", "), ")"));
    }
  }
  return tensors;
}

void AddTensorMetadata(const ValueSpec& v,
                       google::protobuf::RepeatedPtrField<
                           inference::ModelMetadataResponse::TensorMetadata>* out) {
  auto* m = out->Add();
  m->set_name(v.name());
  m->set_datatype("FP32");
  for (int64_t d : v.shape()) m->add_shape(d);
}

}  // namespace

grpc::Status KServeService::ServerLive(grpc::ServerContext*, const inference::ServerLiveRequest*,
                                       inference::ServerLiveResponse* resp) {
  resp->set_live(true);
  return grpc::Status::OK;
}

grpc::Status KServeService::ServerReady(grpc::ServerContext*,
                                        const inference::ServerReadyRequest*,
                                        inference::ServerReadyResponse* resp) {
  // Ready: serving requests (models may still be loading; ask ModelReady).
  resp->set_ready(true);
  return grpc::Status::OK;
}

grpc::Status KServeService::ModelReady(grpc::ServerContext*, const inference::ModelReadyRequest* req,
                                       inference::ModelReadyResponse* resp) {
  absl::Status v = CheckVersion(req->name(), req->version());
  if (!v.ok()) return ToGrpc(v);
  absl::StatusOr<ModelInfo> info = coordinator_->GetModel(req->name());
  if (!info.ok()) return ToGrpc(info.status());
  resp->set_ready(info->state == ModelState::kReady);
  return grpc::Status::OK;
}

grpc::Status KServeService::ServerMetadata(grpc::ServerContext*,
                                           const inference::ServerMetadataRequest*,
                                           inference::ServerMetadataResponse* resp) {
  resp->set_name("pipeserve");
  resp->set_version("0.1.0");
  resp->add_extensions("model_repository");
  resp->add_extensions("pipeline_parallel");
  return grpc::Status::OK;
}

grpc::Status KServeService::ModelMetadata(grpc::ServerContext*,
                                          const inference::ModelMetadataRequest* req,
                                          inference::ModelMetadataResponse* resp) {
  absl::Status v = CheckVersion(req->name(), req->version());
  if (!v.ok()) return ToGrpc(v);
  absl::StatusOr<ModelInfo> info = coordinator_->GetModel(req->name());
  if (!info.ok()) return ToGrpc(info.status());
  resp->set_name(info->name);
  resp->add_versions(kVersion);
  resp->set_platform("pipeserve");
  for (const ValueSpec& in : info->plan->inputs()) AddTensorMetadata(in, resp->mutable_inputs());
  for (const ValueSpec& out : info->plan->outputs()) AddTensorMetadata(out, resp->mutable_outputs());
  return grpc::Status::OK;
}

absl::Status KServeService::Infer(const inference::ModelInferRequest& req, absl::Time deadline,
                                  std::function<bool()> cancelled,
                                  inference::ModelInferResponse* resp) {
  absl::Time start = absl::Now();
  absl::Status s = InferUnmetered(req, deadline, std::move(cancelled), resp);
  if (metrics_ != nullptr) metrics_->RecordInference(req.model_name(), s, absl::Now() - start);
  return s;
}

absl::Status KServeService::InferUnmetered(const inference::ModelInferRequest& req,
                                           absl::Time deadline, std::function<bool()> cancelled,
                                           inference::ModelInferResponse* resp) {
  RETURN_IF_ERROR(CheckVersion(req.model_name(), req.model_version()));
  ASSIGN_OR_RETURN(ModelInfo info, coordinator_->GetModel(req.model_name()));
  ASSIGN_OR_RETURN(std::vector<Tensor> inputs, ParseInputs(req, *info.plan));
  // Which outputs to return: all, or those asked for, in the asked order.
  std::vector<int> chosen;
  if (req.outputs_size() == 0) {
    for (int j = 0; j < info.plan->outputs_size(); ++j) chosen.push_back(j);
  } else {
    for (const auto& o : req.outputs()) {
      int found = -1;
      for (int j = 0; j < info.plan->outputs_size(); ++j) {
        if (info.plan->outputs(j).name() == o.name()) found = j;
      }
      if (found < 0) {
        return absl::InvalidArgumentError(absl::StrCat("unknown output \"", o.name(),
                                                       "\" requested"));
      }
      chosen.push_back(found);
    }
  }
  ASSIGN_OR_RETURN(std::vector<Tensor> outputs,
                   coordinator_->Infer(req.model_name(), inputs, deadline, std::move(cancelled)));
  resp->set_model_name(req.model_name());
  resp->set_model_version(kVersion);
  resp->set_id(req.id());
  for (int j : chosen) {
    auto* o = resp->add_outputs();
    o->set_name(info.plan->outputs(j).name());
    o->set_datatype("FP32");
    for (int64_t d : outputs[j].shape()) o->add_shape(d);
    resp->add_raw_output_contents(reinterpret_cast<const char*>(outputs[j].data()),
                                  outputs[j].byte_size());
  }
  return absl::OkStatus();
}

grpc::Status KServeService::ModelInfer(grpc::ServerContext* ctx,
                                       const inference::ModelInferRequest* req,
                                       inference::ModelInferResponse* resp) {
  return ToGrpc(Infer(*req, DeadlineOf(ctx), [ctx] { return ctx->IsCancelled(); }, resp));
}

grpc::Status KServeService::ModelStreamInfer(
    grpc::ServerContext* ctx,
    grpc::ServerReaderWriter<inference::ModelStreamInferResponse, inference::ModelInferRequest>*
        stream) {
  // Each request runs on its own thread so requests on one stream pipeline
  // together; responses are written as they finish, under one lock.
  absl::Mutex write_mu;
  std::vector<std::thread> workers;
  inference::ModelInferRequest req;
  while (stream->Read(&req)) {
    workers.emplace_back([this, ctx, stream, &write_mu, req] {
      inference::ModelStreamInferResponse out;
      absl::Status s = Infer(req, DeadlineOf(ctx), [ctx] { return ctx->IsCancelled(); },
                             out.mutable_infer_response());
      if (!s.ok()) {
        out.clear_infer_response();
        out.set_error_message(absl::StrCat(absl::StatusCodeToString(s.code()), ": ", s.message()));
        out.mutable_infer_response()->set_id(req.id());
        out.mutable_infer_response()->set_model_name(req.model_name());
      }
      absl::MutexLock lock(&write_mu);
      stream->Write(out);
    });
  }
  for (std::thread& t : workers) t.join();
  return grpc::Status::OK;
}

grpc::Status KServeService::RepositoryIndex(grpc::ServerContext*,
                                            const inference::RepositoryIndexRequest* req,
                                            inference::RepositoryIndexResponse* resp) {
  for (const ModelInfo& m : coordinator_->ListModels()) {
    if (req->ready() && m.state != ModelState::kReady) continue;
    auto* idx = resp->add_models();
    idx->set_name(m.name);
    idx->set_version(kVersion);
    idx->set_state(ModelStateName(m.state));
    idx->set_reason(m.reason);
  }
  return grpc::Status::OK;
}

}  // namespace pipeserve
