#include "partitioner/calibrate.h"

#include <algorithm>
#include <chrono>
#include <random>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "graph/op_schema.h"
#include "partitioner/partition.h"
#include "graph/validate.h"

namespace pipeserve {
namespace {

// `shape` with its free dimensions set: the batch dimension (dim 0 of a
// value that follows the batch) to `batch_rows`, any other to `rows`.
Shape Concrete(const Shape& shape, bool batched, int64_t batch_rows, int64_t rows) {
  Shape out = shape;
  for (size_t i = 0; i < out.size(); ++i) {
    if (out[i] < 0) out[i] = i == 0 && batched ? batch_rows : rows;
  }
  return out;
}

Tensor Sample(const Shape& shape, DataType dtype, std::mt19937* rng) {
  Tensor t = Tensor::Zeros(shape, dtype);
  if (dtype == DT_FLOAT32) {
    std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
    for (int64_t i = 0; i < t.numel(); ++i) t.data()[i] = uniform(*rng);
  }
  return t;
}

double Seconds(std::chrono::steady_clock::duration d) {
  return std::chrono::duration<double>(d).count();
}

}  // namespace

std::string Calibration::Describe() const {
  std::string s = joined_rows > rows
                      ? absl::StrCat("measured on ", backend, " at ", joined_rows,
                                     " rows joined, per ", rows, "-row microbatch (", measured,
                                     " nodes run")
                      : absl::StrCat("measured on ", backend, " at ", rows, " rows (", measured,
                                     " nodes run");
  if (estimated > 0) absl::StrAppend(&s, "; ", estimated, " over the weight limit estimated");
  return absl::StrCat(s, ")");
}

namespace {

// Runs each compute node alone, in order, on sampled inputs and the
// outputs of the nodes before it, and times it.
class Calibrator {
 public:
  Calibrator(const Graph& graph, const ValueShapes& shapes, const ValueTypes& types,
             const ParamReader& read, ComputeBackend& backend, const CalibrationOptions& options)
      : graph_(graph), shapes_(shapes), types_(types), read_(read), backend_(backend),
        options_(options), compute_(ComputeNodes(graph)), unbatched_(UnbatchedValues(graph)),
        batch_rows_(std::max(options.rows, options.joined_rows)) {
    for (const Node& n : graph.nodes()) {
      if (n.op() == kParamOp) param_node_[n.outputs(0)] = &n;
    }
    for (const TensorInfo& p : graph.params()) info_[p.fqn()] = &p;
    for (int p = 0; p < static_cast<int>(compute_.size()); ++p) {
      for (const std::string& v : graph.nodes(compute_[p]).inputs()) last_read_[v] = p;
    }
  }

  absl::StatusOr<Calibration> Run() {
    std::mt19937 rng(1);
    for (const ValueSpec& in : graph_.inputs()) {
      Shape shape(in.shape().begin(), in.shape().end());
      values_[in.name()] = Sample(Concrete(shape, in.batched(), batch_rows_, options_.rows),
                                  in.dtype(), &rng);
    }
    Calibration c;
    c.backend = backend_.Name();
    c.rows = options_.rows;
    if (batch_rows_ > options_.rows) c.joined_rows = batch_rows_;
    c.node_seconds.assign(compute_.size(), -1);  // -1: estimated below
    std::vector<bool> reads_weights(compute_.size(), false);
    for (int p = 0; p < static_cast<int>(compute_.size()); ++p) {
      const Node& node = graph_.nodes(compute_[p]);
      NodeAlone alone = Alone(node);
      reads_weights[p] = alone.weight_bytes > 0;
      std::vector<Tensor> outputs;
      if (alone.weight_bytes > options_.max_node_bytes) {
        ++c.estimated;
        outputs = ZeroOutputs(node);
      } else {
        ASSIGN_OR_RETURN(c.node_seconds[p], Time(node, alone, &outputs));
        ++c.measured;
      }
      KeepOutputs(node, p, &outputs);
    }
    if (c.estimated > 0) RETURN_IF_ERROR(EstimateSkipped(reads_weights, &c));
    return c;
  }

 private:
  // A node as a graph of its own (its non-parameter inputs, the param
  // nodes it reads, itself), its inputs' values, and the bytes of
  // weights it reads.
  struct NodeAlone {
    Graph graph;
    std::vector<Tensor> inputs;
    uint64_t weight_bytes = 0;
  };

  NodeAlone Alone(const Node& node) const {
    NodeAlone a;
    absl::flat_hash_set<std::string> seen;
    for (const std::string& v : node.inputs()) {
      if (!seen.insert(v).second) continue;
      auto pn = param_node_.find(v);
      if (pn != param_node_.end()) {
        *a.graph.add_nodes() = *pn->second;
        const TensorInfo* p_info = info_.at(pn->second->attrs().at("fqn").s());
        *a.graph.add_params() = *p_info;
        a.weight_bytes += p_info->byte_size();
        continue;
      }
      ValueSpec* spec = a.graph.add_inputs();
      spec->set_name(v);
      spec->set_dtype(types_.at(v));
      const Shape& shape = shapes_.at(v);
      for (int64_t d : shape) spec->add_shape(d);
      spec->set_batched(!shape.empty() && shape[0] < 0 && !unbatched_.contains(v));
      a.inputs.push_back(values_.at(v));
    }
    *a.graph.add_nodes() = node;
    for (const std::string& out : node.outputs()) a.graph.add_outputs(out);
    return a;
  }

  // Zeros in place of the outputs of a node too large to run.
  std::vector<Tensor> ZeroOutputs(const Node& node) const {
    std::vector<Tensor> outputs;
    for (const std::string& out : node.outputs()) {
      outputs.push_back(Tensor::Zeros(
          Concrete(shapes_.at(out), !unbatched_.contains(out), batch_rows_, options_.rows),
          types_.at(out)));
    }
    return outputs;
  }

  // The median seconds of options.repeats runs (after one to warm up), per
  // `rows`-row microbatch of the joined run; the outputs of the last.
  absl::StatusOr<double> Time(const Node& node, const NodeAlone& alone,
                              std::vector<Tensor>* outputs) const {
    auto fail = [&](const absl::Status& s) {
      return absl::Status(s.code(), absl::StrCat("calibrating node \"", node.name(), "\" (",
                                                 node.op(), "): ", s.message()));
    };
    WeightMap weights;
    for (const TensorInfo& p : alone.graph.params()) {
      absl::StatusOr<Tensor> w = read_(p);
      if (!w.ok()) return fail(w.status());
      weights[p.fqn()] = *std::move(w);
    }
    absl::StatusOr<std::unique_ptr<StageProgram>> program = backend_.Compile(alone.graph, weights);
    if (!program.ok()) return fail(program.status());
    std::vector<double> times;
    for (int r = 0; r <= options_.repeats; ++r) {
      auto start = std::chrono::steady_clock::now();
      absl::StatusOr<std::vector<Tensor>> out = (*program)->Run(alone.inputs);
      if (!out.ok()) return fail(out.status());
      if (r > 0) times.push_back(Seconds(std::chrono::steady_clock::now() - start));
      *outputs = *std::move(out);
    }
    std::nth_element(times.begin(), times.begin() + times.size() / 2, times.end());
    return times[times.size() / 2] * options_.rows / batch_rows_;
  }

  // Keeps the outputs later nodes read; drops the inputs node p read last.
  void KeepOutputs(const Node& node, int p, std::vector<Tensor>* outputs) {
    for (size_t k = 0; k < outputs->size(); ++k) {
      if (last_read_.contains(node.outputs(k))) values_[node.outputs(k)] = std::move((*outputs)[k]);
    }
    for (const std::string& v : node.inputs()) {
      if (last_read_.contains(v) && last_read_.at(v) == p) values_.erase(v);
    }
  }

  // Seconds for the nodes not run: their estimates scaled by seconds per
  // unit of estimate of the nodes that ran and read weights as the
  // skipped ones do (GEMMs, embeddings), else of all that ran.
  absl::Status EstimateSkipped(const std::vector<bool>& reads_weights, Calibration* c) const {
    std::vector<double> estimate = EstimatedNodeCosts(graph_, shapes_);
    double run_seconds = 0, run_estimate = 0;
    for (bool weighted : {true, false}) {
      for (size_t p = 0; p < compute_.size(); ++p) {
        if (c->node_seconds[p] >= 0 && (reads_weights[p] || !weighted)) {
          run_seconds += c->node_seconds[p];
          run_estimate += estimate[p];
        }
      }
      if (run_estimate > 0) break;
    }
    if (run_estimate == 0) {
      return absl::FailedPreconditionError(absl::StrCat(
          "every node reads more than ", options_.max_node_bytes,
          " bytes of weights: nothing to calibrate with"));
    }
    for (size_t p = 0; p < compute_.size(); ++p) {
      if (c->node_seconds[p] < 0) c->node_seconds[p] = estimate[p] * run_seconds / run_estimate;
    }
    return absl::OkStatus();
  }

  const Graph& graph_;
  const ValueShapes& shapes_;
  const ValueTypes& types_;
  const ParamReader& read_;
  ComputeBackend& backend_;
  const CalibrationOptions& options_;
  const std::vector<int> compute_;
  const absl::flat_hash_set<std::string> unbatched_;
  const int64_t batch_rows_;
  absl::flat_hash_map<std::string, const Node*> param_node_;  // by output value
  absl::flat_hash_map<std::string, const TensorInfo*> info_;  // by FQN
  absl::flat_hash_map<std::string, int> last_read_;  // value -> last reader's position
  absl::flat_hash_map<std::string, Tensor> values_;  // those later nodes read
};

}  // namespace

absl::StatusOr<Calibration> Calibrate(const Graph& graph, const ParamReader& read,
                                      ComputeBackend& backend,
                                      const CalibrationOptions& options) {
  ValueTypes types;
  ASSIGN_OR_RETURN(ValueShapes shapes, ValidateGraph(graph, &types));
  return Calibrator(graph, shapes, types, read, backend, options).Run();
}

}  // namespace pipeserve
