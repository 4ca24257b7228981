// Prometheus metrics for the coordinator, in the text exposition format,
// served over plain HTTP (`GET /metrics`, server/transport/metrics_http.h)
// on their own port (8002 by convention, as Triton does).
//
//   Metrics metrics;
//   metrics.RecordInference("example", absl::OkStatus(), absl::Milliseconds(12));
//   MetricsHttpServer http([&] { return metrics.Render(coordinator.ListModels()); });
//   RETURN_IF_ERROR(http.Start("0.0.0.0", 8002));
#ifndef PIPESERVE_SERVER_COORDINATOR_METRICS_H_
#define PIPESERVE_SERVER_COORDINATOR_METRICS_H_

#include <atomic>
#include <functional>
#include <map>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "server/coordinator/deployment.h"

namespace pipeserve {

class Metrics {
 public:
  // Counts one inference request of `model` that ended with `status`,
  // and its latency. Only for models the coordinator knows (a series per
  // name); requests naming anything else go to
  // RecordUnknownModelInference, so made-up names cannot grow the metrics.
  // Thread-safe.
  void RecordInference(const std::string& model, const absl::Status& status,
                       absl::Duration latency);
  // Counts a request for a model that does not exist under the label
  // model="(unknown)" (no valid model name has parentheses).
  void RecordUnknownModelInference(const absl::Status& status, absl::Duration latency);
  static constexpr char kUnknownModelLabel[] = "(unknown)";

  // The exposition text; `models` adds a state gauge per model.
  std::string Render(const std::vector<ModelInfo>& models) const;

  // The uploads gauge: `in_progress` uploads being received now.
  static std::string RenderUploads(int in_progress);

  // Latency histogram bucket bounds, seconds.
  static const std::vector<double>& Buckets();

 private:
  struct Histogram {
    std::vector<uint64_t> counts;  // per bucket, cumulative on render
    double sum = 0;
    uint64_t count = 0;
  };
  mutable absl::Mutex mu_;
  // (model, code) -> requests
  std::map<std::pair<std::string, std::string>, uint64_t> requests_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, Histogram> latency_ ABSL_GUARDED_BY(mu_);
};

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_COORDINATOR_METRICS_H_
