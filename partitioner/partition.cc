#include "partitioner/partition.h"

#include <algorithm>
#include <limits>
#include <set>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "graph/op_schema.h"
#include "graph/validate.h"
#include "graph/dtype.h"

namespace pipeserve {
namespace {

bool IsCompute(const Node& node) {
  return node.op() != kParamOp && node.op() != kPipeSplitOp;
}

bool InModule(const Node& node, const std::string& module) {
  return node.module_path() == module ||
         absl::StartsWith(node.module_path(), absl::StrCat(module, "."));
}

// A cut before compute node `position` (index into the compute nodes), and
// what asked for it, for error messages.
struct Cut {
  int position;
  std::string reason;
};

absl::StatusOr<std::vector<Cut>> CutsFromModel(
    const Graph& graph, const std::vector<int>& compute,
    const PartitionOptions& options) {
  std::vector<Cut> cuts;
  // Markers: a cut before the next compute node.
  int seen = 0;
  for (const Node& node : graph.nodes()) {
    if (node.op() == kPipeSplitOp) {
      cuts.push_back({seen, absl::StrCat("pipe_split \"", node.name(), "\"")});
    } else if (IsCompute(node)) {
      ++seen;
    }
  }
  std::map<std::string, SplitPoint> spec = options.split_spec;
  if (spec.empty()) {
    for (const SplitSpecEntry& e : graph.split_spec()) spec[e.module()] = e.point();
  }
  for (const auto& [module, point] : spec) {
    int first = -1, last = -1;
    for (int i = 0; i < static_cast<int>(compute.size()); ++i) {
      if (InModule(graph.nodes(compute[i]), module)) {
        if (first < 0) first = i;
        last = i;
      }
    }
    if (first < 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "split_spec names module \"", module,
          "\", but no node of the graph comes from it"));
    }
    if (point == BEGINNING) {
      cuts.push_back({first, absl::StrCat("split_spec \"", module, "\" BEGINNING")});
    } else if (point == END) {
      cuts.push_back({last + 1, absl::StrCat("split_spec \"", module, "\" END")});
    } else {
      return absl::InvalidArgumentError(absl::StrCat(
          "split_spec for module \"", module, "\" has no split point"));
    }
  }
  // Cuts at one place are one cut, as in PyTorch's pipelining (a
  // pipe_split right after another is dropped) and the exporter's count.
  std::stable_sort(cuts.begin(), cuts.end(),
                   [](const Cut& a, const Cut& b) { return a.position < b.position; });
  cuts.erase(std::unique(cuts.begin(), cuts.end(),
                         [](const Cut& a, const Cut& b) { return a.position == b.position; }),
             cuts.end());
  int total = static_cast<int>(compute.size());
  for (const Cut& c : cuts) {
    if (c.position == 0 || c.position == total) {
      return absl::InvalidArgumentError(absl::StrCat(
          c.reason, " makes an empty stage (it cuts ",
          c.position == 0 ? "before the first node" : "after the last node", ")"));
    }
  }
  return cuts;
}

// Contiguous split of `cost` into k parts minimising the largest part
// (binary search on the bound, greedy fill). Returns k - 1 cut positions.
std::vector<Cut> BalancedCuts(const std::vector<double>& cost, int k) {
  double lo = *std::max_element(cost.begin(), cost.end());
  double hi = 0;
  for (double c : cost) hi += c;
  auto parts_needed = [&](double bound) {
    int parts = 1;
    double acc = 0;
    for (double c : cost) {
      if (acc + c > bound) {
        ++parts;
        acc = 0;
      }
      acc += c;
    }
    return parts;
  };
  for (int iter = 0; iter < 100 && hi - lo > 1e-9 * hi; ++iter) {
    double mid = (lo + hi) / 2;
    (parts_needed(mid) <= k ? hi : lo) = mid;
  }
  // Greedy under the bound, but leave at least one node per remaining part.
  std::vector<Cut> cuts;
  double acc = 0;
  int n = static_cast<int>(cost.size());
  for (int i = 0; i < n; ++i) {
    // Parts still to open after the current one.
    int parts_after = k - 1 - static_cast<int>(cuts.size());
    bool over_bound = acc + cost[i] > hi;
    bool nodes_just_enough = n - i == parts_after;
    if (i > 0 && parts_after > 0 && (over_bound || nodes_just_enough)) {
      cuts.push_back({i, absl::StrCat("automatic cut ", cuts.size() + 1)});
      acc = 0;
    }
    acc += cost[i];
  }
  return cuts;
}

// Bytes that cross each cut position p in 0..n (n compute nodes): values
// made before node p (model inputs count as made before node 0) and read at
// or after it (model outputs count as read after the last node), with the
// batch dimension (and any other -1) at `rows`.
std::vector<double> CrossingBytes(const Graph& graph, const std::vector<int>& compute,
                                  const ValueShapes& shapes, const ValueTypes& types,
                                  int64_t rows) {
  const int n = static_cast<int>(compute.size());
  absl::flat_hash_map<std::string, int> made;  // value -> position of its maker
  for (const ValueSpec& in : graph.inputs()) made[in.name()] = -1;
  absl::flat_hash_map<std::string, int> last_read;
  for (int p = 0; p < n; ++p) {
    const Node& node = graph.nodes(compute[p]);
    for (const std::string& v : node.inputs()) last_read[v] = p;
    for (const std::string& v : node.outputs()) made[v] = p;
  }
  for (const std::string& v : graph.outputs()) last_read[v] = n;
  std::vector<double> diff(n + 2, 0.0);
  for (const auto& [v, maker] : made) {
    auto r = last_read.find(v);
    if (r == last_read.end() || r->second <= maker) continue;
    double bytes = ElementSize(types.at(v));
    for (int64_t d : shapes.at(v)) bytes *= static_cast<double>(d < 0 ? rows : d);
    diff[maker + 1] += bytes;  // crosses cuts maker+1 .. last reader
    diff[r->second + 1] -= bytes;
  }
  std::vector<double> crossing(n + 1);
  double acc = 0;
  for (int p = 0; p <= n; ++p) crossing[p] = acc += diff[p];
  return crossing;
}

struct Prediction {
  std::vector<Cut> cuts;
  std::vector<double> compute_seconds;   // per stage
  std::vector<double> transfer_seconds;  // per stage
};

// The k-stage cut of nodes with times `seconds` minimising the slowest
// stage's time: its nodes' seconds plus (bytes crossing its first cut +
// bytes crossing its last) / bw. Exact, in O(k n) per tried bound: a
// bisection on the slowest stage's time, each bound checked by
// FitsUnder. (The plain dynamic programme over cut points is O(k n^2):
// minutes for a graph of 50,000 nodes.)
class CutSearch {
 public:
  CutSearch(const std::vector<double>& seconds, const std::vector<double>& crossing, double bw,
            int k)
      : n_(static_cast<int>(seconds.size())), k_(k), bw_(bw), crossing_(crossing),
        prefix_(n_ + 1, 0.0), reach_(n_ + 1), need_(n_ + 1) {
    for (int i = 0; i < n_; ++i) prefix_[i + 1] = prefix_[i] + seconds[i];
    // A stage of nodes t .. i-1 fits under `limit` when
    //   prefix[i] - prefix[t] + (crossing[t] + crossing[i]) / bw <= limit,
    // that is when reach[t] >= need[i] - limit.
    for (int i = 0; i <= n_; ++i) {
      const double c = bw > 0 ? crossing[i] / bw : 0.0;
      reach_[i] = prefix_[i] - c;
      need_[i] = prefix_[i] + c;
    }
  }

  Prediction Fastest() {
    // Any cut bounds it: the first k-1 nodes alone (doubled, so the
    // rearranged sums above cannot round it out of reach).
    double hi = 0;
    for (int s = 0; s < k_; ++s) hi = std::max(hi, StageTime(s, s + 1 < k_ ? s + 1 : n_));
    hi = 2 * hi + 1.0;
    double lo = 0;
    if (FitsUnder(lo, nullptr)) hi = lo;  // nothing costs anything
    for (int iter = 0; iter < 200; ++iter) {
      const double mid = lo + (hi - lo) / 2;
      if (mid <= lo || mid >= hi) break;  // as close as doubles go
      (FitsUnder(mid, nullptr) ? hi : lo) = mid;
    }
    std::vector<int> starts;
    FitsUnder(hi, &starts);
    Prediction p;
    for (int s = 0; s < k_; ++s) {
      int begin = starts[s], end = s + 1 < k_ ? starts[s + 1] : n_;
      if (s > 0) p.cuts.push_back({begin, absl::StrCat("measured cut ", s)});
      p.compute_seconds.push_back(prefix_[end] - prefix_[begin]);
      p.transfer_seconds.push_back(Transfer(begin, end));
    }
    return p;
  }

 private:
  double Transfer(int from, int to) const {
    return bw_ > 0 ? (crossing_[from] + crossing_[to]) / bw_ : 0.0;
  }
  double StageTime(int from, int to) const {  // nodes from .. to-1
    return prefix_[to] - prefix_[from] + Transfer(from, to);
  }

  // ends[j][i]: j stages, each under `limit`, can hold exactly nodes
  // 0 .. i-1. Stage j can end at i when some t < i where j-1 stages end
  // has reach[t] >= need[i] - limit: one pass per stage keeping the best
  // reach so far. With `starts`, also the first node of each stage.
  bool FitsUnder(double limit, std::vector<int>* starts) {
    std::vector<bool> prev(n_ + 1, false), cur(n_ + 1);
    prev[0] = true;
    if (starts != nullptr) ends_.assign(1, prev);
    for (int j = 1; j <= k_; ++j) {
      double best = -std::numeric_limits<double>::infinity();
      for (int i = 0; i <= n_; ++i) {
        cur[i] = i > 0 && best >= need_[i] - limit;
        if (prev[i]) best = std::max(best, reach_[i]);
      }
      prev.swap(cur);
      if (starts != nullptr) ends_.push_back(prev);
    }
    if (!prev[n_] || starts == nullptr) return prev[n_];
    // Back from the end: each stage starts at the first node where the
    // stages before it can end and it reaches its end under the limit
    // (of equally fast cuts, the earliest).
    starts->assign(k_, 0);
    for (int j = k_, i = n_; j >= 1; --j) {
      int t = j - 1;
      while (!(ends_[j - 1][t] && reach_[t] >= need_[i] - limit)) ++t;
      (*starts)[j - 1] = t;
      i = t;
    }
    return true;
  }

  const int n_, k_;
  const double bw_;
  const std::vector<double>& crossing_;
  std::vector<double> prefix_, reach_, need_;
  std::vector<std::vector<bool>> ends_;
};

Prediction FastestCuts(const std::vector<double>& seconds, const std::vector<double>& crossing,
                       double bw, int k) {
  return CutSearch(seconds, crossing, bw, k).Fastest();
}

ValueSpec SpecFor(const std::string& name, const ValueShapes& shapes,
                  const ValueTypes& types,
                  const absl::flat_hash_set<std::string>& unbatched) {
  ValueSpec spec;
  spec.set_name(name);
  spec.set_dtype(types.at(name));
  const Shape& s = shapes.at(name);
  for (int64_t d : s) spec.add_shape(d);
  spec.set_batched(!s.empty() && s[0] < 0 && !unbatched.contains(name));
  return spec;
}

// Where the stages begin, how many there are and what chose them.
struct CutChoice {
  std::vector<Cut> cuts;
  int num_stages = 1;
  std::string balance = "one stage";
  Prediction prediction;  // filled when cut by measured times
};

// Cuts for options.num_stages stages where the model marks none: by the
// measured node times when given, else by estimated costs.
absl::StatusOr<CutChoice> CutsByCost(const Graph& graph, const std::vector<int>& compute,
                                     const ValueShapes& shapes, const ValueTypes& types,
                                     const PartitionOptions& options) {
  CutChoice c;
  c.num_stages = std::max(1, options.num_stages);
  if (c.num_stages > static_cast<int>(compute.size())) {
    return absl::InvalidArgumentError(absl::StrCat(
        "cannot cut ", compute.size(), " nodes into ", c.num_stages, " non-empty stages"));
  }
  if (c.num_stages == 1) return c;
  if (options.node_seconds.empty()) {
    c.cuts = BalancedCuts(EstimatedNodeCosts(graph, shapes), c.num_stages);
    c.balance = kEstimatedBalance;
    return c;
  }
  if (options.node_seconds.size() != compute.size()) {
    return absl::InvalidArgumentError(absl::StrCat("node_seconds has ",
                                                   options.node_seconds.size(), " entries for ",
                                                   compute.size(), " compute nodes"));
  }
  std::vector<double> crossing = CrossingBytes(graph, compute, shapes, types, options.cost_rows);
  const double bw = options.link_bytes_per_second;
  c.prediction = FastestCuts(options.node_seconds, crossing, bw, c.num_stages);
  c.cuts = c.prediction.cuts;
  c.balance = absl::StrCat(options.cost_source.empty() ? "measured" : options.cost_source,
                           bw > 0 ? absl::StrCat("; link ", bw / 1e9, " GB/s")
                                  : std::string("; transfers not counted"));
  return c;
}

// The model's own cut points (pipe_split, split_spec) when it has any,
// else CutsByCost.
absl::StatusOr<CutChoice> ChooseCuts(const Graph& graph, const std::vector<int>& compute,
                                     const ValueShapes& shapes, const ValueTypes& types,
                                     const PartitionOptions& options) {
  ASSIGN_OR_RETURN(std::vector<Cut> cuts, CutsFromModel(graph, compute, options));
  if (cuts.empty()) return CutsByCost(graph, compute, shapes, types, options);
  CutChoice c;
  c.num_stages = static_cast<int>(cuts.size()) + 1;
  if (options.num_stages != 0 && options.num_stages != c.num_stages) {
    return absl::InvalidArgumentError(absl::StrCat("num_stages ", options.num_stages,
                                                   " conflicts with the model's ", cuts.size(),
                                                   " cut points (", c.num_stages, " stages)"));
  }
  c.cuts = std::move(cuts);
  c.balance = "the model's cut points";
  return c;
}

// Where each compute node runs, and what that makes of each value.
struct Placement {
  std::vector<std::vector<const Node*>> stage_nodes;
  // The stage that makes each value (-1: a model input; parameters are
  // placed with each reader and not recorded).
  absl::flat_hash_map<std::string, int> value_stage;
  // The last stage that reads each value.
  absl::flat_hash_map<std::string, int> last_reader;
  absl::flat_hash_map<std::string, const Node*> param_node;  // by output value
  absl::flat_hash_map<std::string, const TensorInfo*> param_info;  // by FQN
};

Placement Place(const Graph& graph, const std::vector<int>& compute, const CutChoice& choice) {
  Placement p;
  p.stage_nodes.resize(choice.num_stages);
  for (const ValueSpec& in : graph.inputs()) p.value_stage[in.name()] = -1;
  size_t next_cut = 0;
  int stage = 0;
  for (size_t c = 0; c < compute.size(); ++c) {
    while (next_cut < choice.cuts.size() &&
           choice.cuts[next_cut].position == static_cast<int>(c)) {
      ++stage;
      ++next_cut;
    }
    const Node& n = graph.nodes(compute[c]);
    p.stage_nodes[stage].push_back(&n);
    for (const std::string& out : n.outputs()) p.value_stage[out] = stage;
    for (const std::string& v : n.inputs()) p.last_reader[v] = stage;
  }
  for (const Node& n : graph.nodes()) {
    if (n.op() == kParamOp) p.param_node[n.outputs(0)] = &n;
  }
  for (const TensorInfo& t : graph.params()) p.param_info[t.fqn()] = &t;
  return p;
}

// Builds one stage's graph: its nodes, the parameters they read (a copy
// each), the values other stages send it, and the values it sends on.
class StageFiller {
 public:
  StageFiller(const Graph& graph, const Placement& placement, const ValueShapes& shapes,
              const ValueTypes& types, const absl::flat_hash_set<std::string>& unbatched)
      : graph_(graph), placement_(placement), shapes_(shapes), types_(types),
        unbatched_(unbatched),
        model_outputs_(graph.outputs().begin(), graph.outputs().end()) {}

  // Stage s; the last one also holds and sends `param_outputs` (model
  // outputs that are parameters themselves).
  absl::Status Fill(int s, const std::vector<std::string>& param_outputs, Stage* stage) const {
    Graph* g = stage->mutable_graph();
    absl::flat_hash_set<std::string> have;  // values available in s
    absl::flat_hash_set<std::string> params_added;
    for (const Node* n : placement_.stage_nodes[s]) {
      for (const std::string& v : n->inputs()) {
        if (!have.insert(v).second) continue;
        auto pn = placement_.param_node.find(v);
        if (pn != placement_.param_node.end()) {
          AddParam(*pn->second, &params_added, stage);
        } else {
          *g->add_inputs() = SpecFor(v, shapes_, types_, unbatched_);
          stage->add_input_sources(placement_.value_stage.at(v));
        }
      }
      *g->add_nodes() = *n;
      for (const std::string& out : n->outputs()) have.insert(out);
    }
    for (const std::string& v : param_outputs) {
      if (have.insert(v).second) AddParam(*placement_.param_node.at(v), &params_added, stage);
      g->add_outputs(v);
    }
    AddSentValues(s, g);
    for (const std::string& fqn : stage->param_fqns()) {
      for (const auto& [alias, canonical] : graph_.aliases()) {
        if (canonical == fqn) (*g->mutable_aliases())[alias] = canonical;
      }
    }
    if (g->outputs().empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "stage ", s, " computes nothing that a later stage or the model's outputs use"));
    }
    return absl::OkStatus();
  }

 private:
  // A parameter's node, and its tensor once a stage.
  void AddParam(const Node& pn, absl::flat_hash_set<std::string>* added, Stage* stage) const {
    *stage->mutable_graph()->add_nodes() = pn;
    const std::string& fqn = pn.attrs().at("fqn").s();
    if (added->insert(fqn).second) {
      *stage->mutable_graph()->add_params() = *placement_.param_info.at(fqn);
      stage->add_param_fqns(fqn);
    }
  }

  // Outputs: values made in s that later stages or the model read.
  void AddSentValues(int s, Graph* g) const {
    for (const Node* n : placement_.stage_nodes[s]) {
      for (const std::string& out : n->outputs()) {
        auto r = placement_.last_reader.find(out);
        if ((r != placement_.last_reader.end() && r->second > s) ||
            model_outputs_.contains(out)) {
          g->add_outputs(out);
        }
      }
    }
  }

  const Graph& graph_;
  const Placement& placement_;
  const ValueShapes& shapes_;
  const ValueTypes& types_;
  const absl::flat_hash_set<std::string>& unbatched_;
  const absl::flat_hash_set<std::string> model_outputs_;
};

}  // namespace

absl::StatusOr<Plan> Partition(const Graph& graph, const PartitionOptions& options) {
  ValueTypes types;
  ASSIGN_OR_RETURN(ValueShapes shapes, ValidateGraph(graph, &types));
  if (options.num_stages < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_stages must be >= 0, got ", options.num_stages));
  }
  const std::vector<int> compute = ComputeNodes(graph);
  if (compute.empty()) return absl::InvalidArgumentError("the graph has no compute nodes");
  ASSIGN_OR_RETURN(CutChoice choice, ChooseCuts(graph, compute, shapes, types, options));
  const Placement placement = Place(graph, compute, choice);
  const absl::flat_hash_set<std::string> unbatched = UnbatchedValues(graph);

  Plan plan;
  plan.set_balance(choice.balance);
  for (const ValueSpec& in : graph.inputs()) *plan.add_inputs() = in;
  // A model output may be a parameter itself (a model that returns a
  // weight): the last stage holds a copy and sends it.
  std::vector<std::string> param_outputs;
  for (const std::string& out : graph.outputs()) {
    *plan.add_outputs() = SpecFor(out, shapes, types, unbatched);
    auto made = placement.value_stage.find(out);
    if (made != placement.value_stage.end()) {
      plan.add_output_stages(made->second);
    } else {
      plan.add_output_stages(choice.num_stages - 1);
      param_outputs.push_back(out);
    }
  }
  const StageFiller filler(graph, placement, shapes, types, unbatched);
  for (int s = 0; s < choice.num_stages; ++s) {
    Stage* stage = plan.add_stages();
    stage->set_index(s);
    if (!choice.prediction.compute_seconds.empty()) {
      stage->set_predicted_compute_us(choice.prediction.compute_seconds[s] * 1e6);
      stage->set_predicted_transfer_us(choice.prediction.transfer_seconds[s] * 1e6);
    }
    const bool last = s == choice.num_stages - 1;
    RETURN_IF_ERROR(filler.Fill(s, last ? param_outputs : std::vector<std::string>(), stage));
  }
  std::vector<std::string> covered = CoveredStateDictKeys(graph, plan);
  absl::flat_hash_set<std::string> covered_set(covered.begin(), covered.end());
  for (const std::string& key : graph.state_dict_keys()) {
    if (!covered_set.contains(key)) plan.add_unused_state_dict_keys(key);
  }
  return plan;
}

absl::flat_hash_set<std::string> UnbatchedValues(const Graph& graph) {
  absl::flat_hash_set<std::string> unbatched;
  for (const Node& n : graph.nodes()) {
    if (n.unbatched()) unbatched.insert(n.outputs().begin(), n.outputs().end());
  }
  for (const ValueSpec& in : graph.inputs()) {
    if (!in.batched()) unbatched.insert(in.name());
  }
  return unbatched;
}

bool FollowsTheBatch(const Plan& plan) {
  bool batched = plan.inputs_size() > 0;
  for (const ValueSpec& v : plan.inputs()) batched = batched && v.batched();
  for (const ValueSpec& v : plan.outputs()) batched = batched && v.batched();
  return batched;
}

std::vector<int> ComputeNodes(const Graph& graph) {
  std::vector<int> compute;
  for (int i = 0; i < graph.nodes_size(); ++i) {
    if (IsCompute(graph.nodes(i))) compute.push_back(i);
  }
  return compute;
}

std::vector<double> EstimatedNodeCosts(const Graph& graph, const ValueShapes& shapes) {
  absl::flat_hash_map<std::string, double> param_bytes;  // param value -> bytes
  absl::flat_hash_map<std::string, const TensorInfo*> info;
  for (const TensorInfo& p : graph.params()) info[p.fqn()] = &p;
  for (const Node& n : graph.nodes()) {
    if (n.op() != kParamOp) continue;
    auto it = info.find(n.attrs().at("fqn").s());
    if (it != info.end()) param_bytes[n.outputs(0)] = static_cast<double>(it->second->byte_size());
  }
  std::vector<double> cost;
  for (int i : ComputeNodes(graph)) {
    const Node& n = graph.nodes(i);
    std::vector<Shape> in;
    double bytes = 0;
    for (const std::string& v : n.inputs()) {
      in.push_back(shapes.at(v));
      auto it = param_bytes.find(v);
      if (it != param_bytes.end()) bytes += it->second;
    }
    cost.push_back(FindOp(n.op())->flops(in) + bytes + 1.0);
  }
  return cost;
}

std::vector<std::string> CoveredStateDictKeys(const Graph& graph,
                                              const Plan& plan) {
  std::set<std::string> held;
  for (const Stage& s : plan.stages()) {
    for (const std::string& fqn : s.param_fqns()) held.insert(fqn);
  }
  std::set<std::string> covered = held;
  for (const auto& [alias, canonical] : graph.aliases()) {
    if (held.count(canonical) > 0) covered.insert(alias);
  }
  return std::vector<std::string>(covered.begin(), covered.end());
}

}  // namespace pipeserve
