#include "server/coordinator/metrics.h"



#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace pipeserve {
namespace {

// Label values are quoted; escape what the format requires.
std::string Escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '\\' || c == '"') out.push_back('\\');
    if (c == '\n') {
      out += "\\n";
      continue;
    }
    out.push_back(c);
  }
  return out;
}

// A gauge with a sample per model: value(model).
template <typename Value>
void ModelGauge(const char* name, const char* help, const std::vector<ModelInfo>& models,
                Value value, std::string* out) {
  absl::StrAppend(out, "# HELP ", name, " ", help, "\n# TYPE ", name, " gauge\n");
  for (const ModelInfo& info : models) {
    absl::StrAppend(out, name, "{model=\"", Escape(info.name), "\"} ", value(info), "\n");
  }
}

}  // namespace

const std::vector<double>& Metrics::Buckets() {
  static const auto* b = new std::vector<double>{0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                                 0.1,   0.25,   0.5,   1,    2.5,   5, 10};
  return *b;
}

void Metrics::RecordInference(const std::string& model, const absl::Status& status,
                              absl::Duration latency) {
  double s = absl::ToDoubleSeconds(latency);
  absl::MutexLock lock(&mu_);
  ++requests_[{model, absl::StatusCodeToString(status.code())}];
  Histogram& h = latency_[model];
  if (h.counts.empty()) h.counts.assign(Buckets().size(), 0);
  for (size_t i = 0; i < Buckets().size(); ++i) {
    if (s <= Buckets()[i]) {
      ++h.counts[i];
      break;
    }
  }
  h.sum += s;
  ++h.count;
}

void Metrics::RecordUnknownModelInference(const absl::Status& status, absl::Duration latency) {
  RecordInference(kUnknownModelLabel, status, latency);
}

std::string Metrics::RenderUploads(int in_progress) {
  return absl::StrCat(
      "# HELP pipeserve_uploads_in_progress Model uploads being received now (at most "
      "--max_concurrent_uploads).\n"
      "# TYPE pipeserve_uploads_in_progress gauge\n"
      "pipeserve_uploads_in_progress ",
      in_progress, "\n");
}

std::string Metrics::Render(const std::vector<ModelInfo>& models) const {
  std::string out;
  absl::StrAppend(&out,
                  "# HELP pipeserve_inference_requests_total Inference requests by model and "
                  "final gRPC status code.\n"
                  "# TYPE pipeserve_inference_requests_total counter\n");
  absl::MutexLock lock(&mu_);
  for (const auto& [key, n] : requests_) {
    absl::StrAppend(&out, "pipeserve_inference_requests_total{model=\"", Escape(key.first),
                    "\",code=\"", key.second, "\"} ", n, "\n");
  }
  absl::StrAppend(&out,
                  "# HELP pipeserve_inference_duration_seconds Inference request latency.\n"
                  "# TYPE pipeserve_inference_duration_seconds histogram\n");
  for (const auto& [model, h] : latency_) {
    uint64_t cumulative = 0;
    std::string m = Escape(model);
    for (size_t i = 0; i < Buckets().size(); ++i) {
      cumulative += h.counts[i];
      absl::StrAppend(&out, "pipeserve_inference_duration_seconds_bucket{model=\"", m,
                      "\",le=\"", Buckets()[i], "\"} ", cumulative, "\n");
    }
    absl::StrAppend(&out, "pipeserve_inference_duration_seconds_bucket{model=\"", m,
                    "\",le=\"+Inf\"} ", h.count, "\n");
    absl::StrAppend(&out, "pipeserve_inference_duration_seconds_sum{model=\"", m, "\"} ",
                    absl::StrFormat("%.6f", h.sum), "\n");
    absl::StrAppend(&out, "pipeserve_inference_duration_seconds_count{model=\"", m, "\"} ",
                    h.count, "\n");
  }
  ModelGauge("pipeserve_model_ready", "1 if the model is READY, else 0.", models,
             [](const ModelInfo& m) { return m.state == ModelState::kReady ? 1 : 0; }, &out);
  ModelGauge("pipeserve_model_stages", "Pipeline stages of each model.", models,
             [](const ModelInfo& m) { return m.plan->stages_size(); }, &out);
  ModelGauge("pipeserve_model_replicas", "Replicas of every stage of each model.", models,
             [](const ModelInfo& m) { return m.replicas; }, &out);
  ModelGauge("pipeserve_model_ready_replicas",
             "Replicas serving now (fewer while one is reloaded after a failure).", models,
             [](const ModelInfo& m) { return m.ready_replicas; }, &out);
  return out;
}

}  // namespace pipeserve
