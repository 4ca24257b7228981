#include "server/coordinator/kserve_core.h"

#include <iostream>

#include "absl/strings/str_cat.h"
#include "absl/types/optional.h"
#include "common/model_name.h"
#include "common/status_macros.h"
#include "graph/dtype.h"
#include "server/coordinator/kserve_request.h"
#include "server/coordinator/redact.h"
#include "server/coordinator/trace.h"

namespace pipeserve {
namespace {

// Whether the request asks for its timeline: parameter "trace" true (a
// bool, or the string "true"); kInvalidArgument for anything else.
absl::StatusOr<bool> TraceRequested(const inference::ModelInferRequest& req) {
  auto it = req.parameters().find("trace");
  if (it == req.parameters().end()) return false;
  const inference::InferParameter& p = it->second;
  if (p.parameter_choice_case() == inference::InferParameter::kBoolParam) return p.bool_param();
  if (p.parameter_choice_case() == inference::InferParameter::kStringParam &&
      (p.string_param() == "true" || p.string_param() == "false")) {
    return p.string_param() == "true";
  }
  return absl::InvalidArgumentError(
      "parameter \"trace\" must be a bool (true: the response's parameter \"trace\" holds the "
      "request's timeline as Chrome trace JSON)");
}

// A request's model_version against the version serving: "" for any.
absl::Status CheckVersion(const std::string& model, int64_t serving, const std::string& version) {
  if (version.empty() || version == absl::StrCat(serving)) return absl::OkStatus();
  return absl::NotFoundError(absl::StrCat("model \"", model, "\" has no version \"",
                                          version.substr(0, 64), "\" (it serves version ",
                                          serving, "; each upload of a name is its next version)"));
}


void AddTensorMetadata(const ValueSpec& v,
                       google::protobuf::RepeatedPtrField<
                           inference::ModelMetadataResponse::TensorMetadata>* out) {
  auto* m = out->Add();
  m->set_name(v.name());
  m->set_datatype(KServeName(v.dtype() == DT_INVALID ? DT_FLOAT32 : v.dtype()));
  for (int64_t d : v.shape()) m->add_shape(d);
}

}  // namespace

KServeCore::KServeCore(Coordinator* coordinator, Metrics* metrics, KServeCoreOptions options)
    : coordinator_(coordinator), metrics_(metrics), options_(options) {}

bool KServeCore::ServerReady() { return coordinator_->Serving(); }

void KServeCore::ServerMetadata(inference::ServerMetadataResponse* resp) {
  resp->set_name("pipeserve");
  resp->set_version("0.2.0");
  resp->add_extensions("model_repository");
  resp->add_extensions("pipeline_parallel");
}

absl::Status KServeCore::ModelMetadata(const std::string& name, const std::string& version,
                                       inference::ModelMetadataResponse* resp) {
  ASSIGN_OR_RETURN(ModelInfo info, Model(name, version));
  resp->set_name(info.name);
  resp->add_versions(absl::StrCat(info.version));
  resp->set_platform("pipeserve");
  for (const ValueSpec& in : info.plan->inputs()) AddTensorMetadata(in, resp->mutable_inputs());
  for (const ValueSpec& out : info.plan->outputs()) AddTensorMetadata(out, resp->mutable_outputs());
  return absl::OkStatus();
}

namespace {

absl::Status OneRepository(const std::string& repository) {
  if (repository.empty()) return absl::OkStatus();
  return absl::UnimplementedError(absl::StrCat(
      "repository_name \"", repository.substr(0, 100),
      "\": pipeserve has one model repository, unnamed; leave repository_name empty"));
}

}  // namespace

absl::Status KServeCore::RepositoryIndex(const std::string& repository, bool ready_only,
                                         inference::RepositoryIndexResponse* resp) {
  RETURN_IF_ERROR(OneRepository(repository));
  const std::shared_ptr<const std::vector<std::string>> known =
      coordinator_->StageServerAddresses();
  for (const ModelInfo& m : coordinator_->ListModels()) {
    if (ready_only && m.state != ModelState::kReady) continue;
    auto* idx = resp->add_models();
    idx->set_name(m.name);
    idx->set_version(absl::StrCat(m.version));
    idx->set_state(ModelStateName(m.state));
    idx->set_reason(RedactAddresses(m.reason, *known));
  }
  return absl::OkStatus();
}

absl::Status KServeCore::RepositoryLoad(const std::string& repository, const std::string& model) {
  RETURN_IF_ERROR(OneRepository(repository));
  absl::StatusOr<ModelInfo> info = Model(model, "");
  if (info.status().code() == absl::StatusCode::kNotFound) {
    return absl::UnavailableError(absl::StrCat(
        "model \"", model, "\" is not in the repository: models come in through "
        "pipeserve.ModelService/Upload (pipeserve upload), and are loaded as they do"));
  }
  RETURN_IF_ERROR(info.status());
  if (info->state != ModelState::kReady) {
    return absl::UnavailableError(absl::StrCat(
        "model \"", model, "\" is ", ModelStateName(info->state), ": ", info->reason,
        " (the coordinator redeploys it by itself)"));
  }
  return absl::OkStatus();
}

absl::Status KServeCore::RepositoryUnload(const std::string& repository,
                                          const std::string& model) {
  RETURN_IF_ERROR(OneRepository(repository));
  RETURN_IF_ERROR(ValidModelName(model));
  return absl::UnavailableError(absl::StrCat(
      "model \"", model, "\" cannot be unloaded and kept: pipeserve.ModelService/Unload "
      "(pipeserve unload, with an admin token) unloads a model and deletes it"));
}

absl::Time KServeCore::Capped(absl::Time client_deadline) const {
  if (client_deadline == absl::InfiniteFuture()) {
    return client_deadline;  // none: the default applies (it is below the cap)
  }
  return std::min(client_deadline, absl::Now() + options_.max_timeout);
}

absl::StatusOr<ModelInfo> KServeCore::Model(const std::string& name, const std::string& version) {
  RETURN_IF_ERROR(ValidModelName(name));
  ASSIGN_OR_RETURN(ModelInfo info, coordinator_->GetModel(name));
  RETURN_IF_ERROR(CheckVersion(name, info.version, version));
  return info;
}

absl::StatusOr<std::string> KServeCore::NotReadyBecause(const std::string& name,
                                                        const std::string& version) {
  absl::StatusOr<ModelInfo> info = Model(name, version);
  if (info.status().code() == absl::StatusCode::kNotFound) {
    return std::string(info.status().message());
  }
  RETURN_IF_ERROR(info.status());
  if (info->state == ModelState::kReady) return std::string();
  return absl::StrCat("model \"", name, "\" is ", ModelStateName(info->state));
}

absl::Status KServeCore::Infer(const inference::ModelInferRequest& req, absl::Time deadline,
                                  const std::function<bool()>& cancelled,
                                  inference::ModelInferResponse* resp,
                                  const Coordinator::Admission* admission) {
  absl::Time start = absl::Now();
  absl::Status s = InferUnmetered(req, deadline, cancelled, resp, admission);
  Meter(req.model_name(), s, absl::Now() - start);
  return s;
}

absl::Status KServeCore::Public(const absl::Status& s) {
  if (s.ok()) return s;
  absl::Status shown = RedactAddresses(s, *coordinator_->StageServerAddresses());
  if (shown.message() == s.message()) return shown;
  // The full message goes to the log, at most 10 a second (errors come in
  // bursts exactly when a server fails).
  absl::MutexLock lock(&log_mu_);
  const absl::Time now = absl::Now();
  if (now - log_window_ >= absl::Seconds(1)) {
    if (log_suppressed_ > 0) {
      std::cerr << "coordinator: (" << log_suppressed_ << " more redacted errors not logged)\n";
    }
    log_window_ = now;
    log_lines_ = log_suppressed_ = 0;
  }
  if (log_lines_++ < 10) {
    std::cerr << "coordinator: told a client \"" << shown.message() << "\" for: " << s.message()
              << "\n";
  } else {
    ++log_suppressed_;
  }
  return shown;
}

void KServeCore::Meter(const std::string& model, const absl::Status& s, absl::Duration took) {
  if (metrics_ == nullptr) return;
  // Only models that exist get a series of their own: names from
  // requests would otherwise grow the metrics without bound.
  if (coordinator_->Knows(model)) {
    metrics_->RecordInference(model, s, took);
  } else {
    metrics_->RecordUnknownModelInference(s, took);
  }
}

absl::Status KServeCore::InferUnmetered(const inference::ModelInferRequest& req,
                                           absl::Time deadline,
                                           const std::function<bool()>& cancelled,
                                           inference::ModelInferResponse* resp,
                                           const Coordinator::Admission* admission) {
  RETURN_IF_ERROR(ValidModelName(req.model_name()));
  // One deployment for the whole request: its plan checks the inputs, runs
  // them, and names the outputs (a retry moves only to one with the same
  // signature, and only to the same version if the request named one).
  ASSIGN_OR_RETURN(std::shared_ptr<Deployment> model, coordinator_->Find(req.model_name()));
  const int64_t serving = model->version();
  RETURN_IF_ERROR(CheckVersion(req.model_name(), serving, req.model_version()));
  if (model->plan().has_generation() && !options_.allow_generation_infer) {
    return absl::FailedPreconditionError(absl::StrCat(
        "model \"", req.model_name(), "\" was exported for generation: ask "
        "pipeserve.GenerationService/Generate for its tokens (ModelInfer on its cache-aware "
        "graph could overwrite the KV cache of generations in flight; the coordinator's "
        "--allow_generation_infer allows it)"));
  }
  ASSIGN_OR_RETURN(std::vector<Tensor> inputs, ParseInferInputs(req, model->plan()));
  ASSIGN_OR_RETURN(std::vector<int> chosen, ChooseOutputs(req, model->plan()));
  ASSIGN_OR_RETURN(const bool traced, TraceRequested(req));
  absl::optional<Coordinator::Admission> own;  // a ModelInfer call's (a stream's come admitted)
  if (admission == nullptr) {
    ASSIGN_OR_RETURN(Coordinator::Admission admitted, coordinator_->Admit(model->name()));
    admission = &own.emplace(std::move(admitted));
  }
  int64_t answered = serving;
  std::vector<TraceSpan> spans;
  RequestOptions options;
  options.deadline = deadline;
  options.cancelled = cancelled;
  options.pinned_version = req.model_version().empty() ? 0 : serving;
  options.answered_version = &answered;
  options.trace = traced ? &spans : nullptr;
  absl::StatusOr<std::vector<Tensor>> outputs =
      coordinator_->InferAdmitted(*admission, model, inputs, options);
  if (!outputs.ok()) return outputs.status();
  BuildInferResponse(req, model->plan(), chosen, *outputs, resp);
  resp->set_model_version(absl::StrCat(answered));
  if (traced) {
    // The timeline names stages and replicas, not their servers' addresses
    // (the infer scope does not see those; an admin's plan lists them).
    ModelInfo info = model->Info();
    info.servers.clear();
    (*resp->mutable_parameters())["trace"].set_string_param(TraceToChromeJson(spans, info));
  }
  return absl::OkStatus();
}


}  // namespace pipeserve
