#include "partitioner/plan_text.h"

#include <map>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "runtime/tensor.h"

namespace pipeserve {
namespace {

std::string SpecText(const ValueSpec& v) {
  return absl::StrCat(v.name(), " ",
                      ShapeToString(Shape(v.shape().begin(), v.shape().end())));
}

std::string Bytes(uint64_t b) {
  if (b >= (1u << 20)) return absl::StrFormat("%.1f MiB", b / 1048576.0);
  if (b >= 1024) return absl::StrFormat("%.1f KiB", b / 1024.0);
  return absl::StrCat(b, " B");
}

// What a generation model's stages hold ("" for other models).
std::string KvCacheLine(const GenerationSpec& g) {
  if (g.num_blocks() <= 0) return "";
  return absl::StrCat(
      "KV cache ", g.num_blocks(), " blocks of ", g.block_size(), " tokens per stage (",
      g.num_blocks() * g.block_size(), " tokens of all sequences together; ", g.layers(),
      " cached attentions",
      g.max_positions() > 0 ? absl::StrCat(", sequences up to ", g.max_positions(), " positions")
                            : std::string(),
      ")\n");
}

}  // namespace

namespace {

// Which stages read each value, for the "-> stage k" arrows.
using Readers = std::map<std::string, std::set<std::string>>;

// A stage's header and params lines.
std::string StageHeader(const Stage& s, const std::vector<std::string>& servers) {
  int compute = 0;
  for (const Node& n : s.graph().nodes()) {
    if (n.op() != "param" && n.op() != "pipe_split") ++compute;
  }
  uint64_t bytes = 0;
  std::vector<std::string> params;
  for (const TensorInfo& p : s.graph().params()) {
    bytes += p.byte_size();
    params.push_back(
        absl::StrCat(p.fqn(), " ", ShapeToString(Shape(p.shape().begin(), p.shape().end()))));
  }
  return absl::StrCat(
      "stage ", s.index(),
      static_cast<size_t>(s.index()) < servers.size() ? absl::StrCat(" @ ", servers[s.index()])
                                                      : "",
      ": ", compute, " nodes, ", params.size(), " parameter", params.size() == 1 ? "" : "s", " (",
      Bytes(bytes), ")\n", "  params   ", params.empty() ? "-" : absl::StrJoin(params, ", "),
      "\n");
}

// A stage's inputs (and where from) and outputs (and where to) lines.
std::string StageValues(const Stage& s, const Readers& readers) {
  std::vector<std::string> ins;
  for (int i = 0; i < s.graph().inputs_size(); ++i) {
    int src = s.input_sources(i);
    ins.push_back(absl::StrCat(SpecText(s.graph().inputs(i)), " <- ",
                               src < 0 ? "model input" : absl::StrCat("stage ", src)));
  }
  std::vector<std::string> outs;
  for (const std::string& o : s.graph().outputs()) {
    auto r = readers.find(o);
    outs.push_back(absl::StrCat(
        o, " -> ", r == readers.end() ? std::string() : absl::StrJoin(r->second, ", ")));
  }
  return absl::StrCat("  inputs   ", absl::StrJoin(ins, ", "), "\n", "  outputs  ",
                      absl::StrJoin(outs, ", "), "\n");
}

// A stage's time line: predicted and measured, when there are any.
std::string StageTime(const Stage& s, const std::vector<double>& measured_us) {
  const bool predicted = s.predicted_compute_us() > 0 || s.predicted_transfer_us() > 0;
  const double measured =
      static_cast<size_t>(s.index()) < measured_us.size() ? measured_us[s.index()] : 0;
  if (!predicted && measured <= 0) return "";
  std::string text = "  time     ";
  if (predicted) {
    absl::StrAppend(&text, absl::StrFormat("predicted %.1f us compute + %.1f us transfer",
                                           s.predicted_compute_us(), s.predicted_transfer_us()));
  }
  if (measured > 0) {
    absl::StrAppend(&text, predicted ? "; " : "",
                    absl::StrFormat("measured %.1f us compute", measured));
  }
  return absl::StrCat(text, " per microbatch\n");
}

}  // namespace

std::string FormatPlan(const Plan& plan, const std::vector<std::string>& servers,
                       const std::vector<double>& measured_us) {
  Readers readers;
  for (const Stage& s : plan.stages()) {
    for (const ValueSpec& in : s.graph().inputs()) {
      readers[in.name()].insert(absl::StrCat("stage ", s.index()));
    }
  }
  for (const ValueSpec& out : plan.outputs()) readers[out.name()].insert("output");

  std::string text =
      absl::StrCat(plan.stages_size(), " stage", plan.stages_size() == 1 ? "" : "s", "\n");
  if (!plan.balance().empty()) absl::StrAppend(&text, "cut by   ", plan.balance(), "\n");
  absl::StrAppend(&text, KvCacheLine(plan.generation()));
  for (const Stage& s : plan.stages()) {
    absl::StrAppend(&text, StageHeader(s, servers), StageValues(s, readers),
                    StageTime(s, measured_us));
  }
  if (plan.unused_state_dict_keys_size() > 0) {
    absl::StrAppend(&text, "unused parameters (never read by forward): ",
                    absl::StrJoin(plan.unused_state_dict_keys(), ", "), "\n");
  }
  return text;
}

}  // namespace pipeserve
