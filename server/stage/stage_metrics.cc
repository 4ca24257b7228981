#include "server/stage/stage_metrics.h"

#include <functional>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace pipeserve {
namespace {

struct Row {
  std::string labels;  // model="m",deployment="..",stage="0",replica="0"
  StageHost::Stats stats;
  uint64_t weight_bytes = 0;
};

// One metric family: its HELP and TYPE lines, then a sample per stage.
void Family(std::string* out, const std::vector<Row>& rows, const char* name, const char* type,
            const char* help, const std::function<std::string(const Row&)>& value,
            const std::string& extra_labels = "") {
  absl::StrAppend(out, "# HELP ", name, " ", help, "\n# TYPE ", name, " ", type, "\n");
  for (const Row& r : rows) {
    absl::StrAppend(out, name, "{", r.labels, extra_labels, "} ", value(r), "\n");
  }
}

std::string Seconds(double s) { return absl::StrFormat("%.6f", s); }

// The KV cache families, for the stages that keep one (generation models).
void RenderKvCache(std::string* out, const std::vector<Row>& all) {
  std::vector<Row> rows;
  for (const Row& r : all) {
    if (r.stats.kv_cache.blocks > 0) rows.push_back(r);
  }
  if (rows.empty()) return;
  Family(out, rows, "pipeserve_stage_kv_cache_blocks", "gauge",
         "Blocks the stage's KV cache may hold (every stage of a model holds as many).",
         [](const Row& r) { return absl::StrCat(r.stats.kv_cache.blocks); });
  Family(out, rows, "pipeserve_stage_kv_cache_blocks_allocated", "gauge",
         "Blocks with memory taken; kept for reuse once taken.",
         [](const Row& r) { return absl::StrCat(r.stats.kv_cache.blocks_allocated); });
  Family(out, rows, "pipeserve_stage_kv_cache_bytes", "gauge",
         "Bytes of KV cache the stage holds (allocated blocks).", [](const Row& r) {
           return absl::StrCat(r.stats.kv_cache.blocks_allocated * r.stats.kv_cache.block_bytes);
         });
}

// A row per stage `core` holds now.
std::vector<Row> RowsOf(StageServerCore& core) {
  std::vector<Row> rows;
  for (const StageKey& key : core.Keys()) {
    std::shared_ptr<StageHost> host = core.Find(key);
    if (host == nullptr) continue;  // unloaded meanwhile
    Row r;
    // Model names are [A-Za-z0-9_.-] (ValidModelName): nothing to escape.
    r.labels = absl::StrCat("model=\"", key.model(), "\",deployment=\"",
                            absl::Hex(key.deployment(), absl::kZeroPad16), "\",stage=\"",
                            key.stage(), "\",replica=\"", key.replica(), "\"");
    r.stats = host->stats();
    for (const TensorInfo& p : host->spec().stage().graph().params()) r.weight_bytes += p.byte_size();
    rows.push_back(std::move(r));
  }
  return rows;
}

void RenderDrops(std::string* out, const std::vector<Row>& rows) {
  absl::StrAppend(out,
                  "# HELP pipeserve_stage_frames_dropped_total Frames dropped, by reason.\n"
                  "# TYPE pipeserve_stage_frames_dropped_total counter\n");
  const std::pair<const char*, uint64_t StageHost::Stats::*> reasons[] = {
      {"deadline", &StageHost::Stats::dropped_deadline},
      {"cancelled", &StageHost::Stats::dropped_cancelled},
      {"rejected", &StageHost::Stats::rejected},
      {"undeliverable", &StageHost::Stats::undeliverable}};
  for (const Row& r : rows) {
    for (const auto& [reason, field] : reasons) {
      absl::StrAppend(out, "pipeserve_stage_frames_dropped_total{", r.labels, ",reason=\"",
                      reason, "\"} ", r.stats.*field, "\n");
    }
  }
}

}  // namespace

std::string RenderStageMetrics(StageServerCore& core) {
  const std::vector<Row> rows = RowsOf(core);
  std::string out;
  auto count = [](uint64_t StageHost::Stats::*field) {
    return [field](const Row& r) { return absl::StrCat(r.stats.*field); };
  };
  auto seconds = [](double StageHost::Stats::*field) {
    return [field](const Row& r) { return Seconds(r.stats.*field); };
  };
  Family(&out, rows, "pipeserve_stage_frames_received_total", "counter",
         "Activation frames that arrived and fit the stage.", count(&StageHost::Stats::frames_in));
  Family(&out, rows, "pipeserve_stage_received_bytes_total", "counter",
         "Tensor bytes of those frames.", count(&StageHost::Stats::bytes_in));
  Family(&out, rows, "pipeserve_stage_frames_sent_total", "counter",
         "Frames sent on to the next stage (or, from the last, the coordinator).",
         count(&StageHost::Stats::frames_out));
  Family(&out, rows, "pipeserve_stage_sent_bytes_total", "counter",
         "Tensor bytes of those frames.", count(&StageHost::Stats::bytes_out));
  Family(&out, rows, "pipeserve_stage_frames_computed_total", "counter",
         "Frames the stage computed.", count(&StageHost::Stats::processed));
  Family(&out, rows, "pipeserve_stage_program_runs_total", "counter",
         "Program runs that computed them (fewer when queued microbatches of a request were "
         "joined into one run).",
         count(&StageHost::Stats::runs));
  Family(&out, rows, "pipeserve_stage_compute_seconds_total", "counter",
         "Time spent computing frames.", seconds(&StageHost::Stats::compute_seconds));
  Family(&out, rows, "pipeserve_stage_queue_seconds_total", "counter",
         "Time frames waited in the stage's queue before a worker took them.",
         seconds(&StageHost::Stats::queue_seconds));
  Family(&out, rows, "pipeserve_stage_send_seconds_total", "counter",
         "Time spent sending frames on, waiting for room downstream included.",
         seconds(&StageHost::Stats::send_seconds));
  RenderDrops(&out, rows);
  Family(&out, rows, "pipeserve_stage_queue_depth", "gauge", "Frames waiting in the queue now.",
         count(&StageHost::Stats::queue_depth));
  Family(&out, rows, "pipeserve_stage_downstream_up", "gauge",
         "1 while sends downstream succeed, 0 after one failed.",
         [](const Row& r) { return r.stats.downstream_error.empty() ? "1" : "0"; });
  Family(&out, rows, "pipeserve_stage_weight_bytes", "gauge", "Bytes of weights the stage holds.",
         [](const Row& r) { return absl::StrCat(r.weight_bytes); });
  RenderKvCache(&out, rows);
  return out;
}

}  // namespace pipeserve
