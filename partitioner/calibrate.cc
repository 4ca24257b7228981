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

absl::StatusOr<Calibration> Calibrate(const Graph& graph, const ParamReader& read,
                                      ComputeBackend& backend,
                                      const CalibrationOptions& options) {
  ValueTypes types;
  ASSIGN_OR_RETURN(ValueShapes shapes, ValidateGraph(graph, &types));
  const std::vector<int> compute = ComputeNodes(graph);
  absl::flat_hash_map<std::string, const Node*> param_node;  // value -> param node
  for (const Node& n : graph.nodes()) {
    if (n.op() == kParamOp) param_node[n.outputs(0)] = &n;
  }
  absl::flat_hash_map<std::string, const TensorInfo*> info;
  for (const TensorInfo& p : graph.params()) info[p.fqn()] = &p;
  absl::flat_hash_set<std::string> unbatched;  // dim 0 free but not the batch
  for (const ValueSpec& in : graph.inputs()) {
    if (!in.batched()) unbatched.insert(in.name());
  }
  for (const Node& n : graph.nodes()) {
    if (n.unbatched()) unbatched.insert(n.outputs().begin(), n.outputs().end());
  }
  absl::flat_hash_map<std::string, int> last_read;  // value -> last reader's position
  for (int p = 0; p < static_cast<int>(compute.size()); ++p) {
    for (const std::string& v : graph.nodes(compute[p]).inputs()) last_read[v] = p;
  }

  const int64_t batch_rows = std::max(options.rows, options.joined_rows);
  std::mt19937 rng(1);
  absl::flat_hash_map<std::string, Tensor> values;
  for (const ValueSpec& in : graph.inputs()) {
    Shape shape(in.shape().begin(), in.shape().end());
    values[in.name()] = Sample(Concrete(shape, in.batched(), batch_rows, options.rows),
                               in.dtype(), &rng);
  }
  Calibration c;
  c.backend = backend.Name();
  c.rows = options.rows;
  if (batch_rows > options.rows) c.joined_rows = batch_rows;
  c.node_seconds.assign(compute.size(), -1);  // -1: estimated below
  std::vector<bool> reads_weights(compute.size(), false);
  for (int p = 0; p < static_cast<int>(compute.size()); ++p) {
    const Node& node = graph.nodes(compute[p]);
    // The node as a graph of its own: its non-parameter inputs, the param
    // nodes it reads, itself.
    Graph g;
    std::vector<Tensor> inputs;
    uint64_t weight_bytes = 0;
    absl::flat_hash_set<std::string> seen;
    for (const std::string& v : node.inputs()) {
      if (!seen.insert(v).second) continue;
      auto pn = param_node.find(v);
      if (pn != param_node.end()) {
        *g.add_nodes() = *pn->second;
        const TensorInfo* p_info = info.at(pn->second->attrs().at("fqn").s());
        *g.add_params() = *p_info;
        weight_bytes += p_info->byte_size();
        continue;
      }
      ValueSpec* spec = g.add_inputs();
      spec->set_name(v);
      spec->set_dtype(types.at(v));
      const Shape& shape = shapes.at(v);
      for (int64_t d : shape) spec->add_shape(d);
      spec->set_batched(!shape.empty() && shape[0] < 0 && !unbatched.contains(v));
      inputs.push_back(values.at(v));
    }
    *g.add_nodes() = node;
    for (const std::string& out : node.outputs()) g.add_outputs(out);
    reads_weights[p] = weight_bytes > 0;

    std::vector<Tensor> outputs;
    if (weight_bytes > options.max_node_bytes) {
      ++c.estimated;
      for (const std::string& out : node.outputs()) {
        outputs.push_back(Tensor::Zeros(
            Concrete(shapes.at(out), !unbatched.contains(out), batch_rows, options.rows),
            types.at(out)));
      }
    } else {
      auto fail = [&](const absl::Status& s) {
        return absl::Status(s.code(), absl::StrCat("calibrating node \"", node.name(), "\" (",
                                                   node.op(), "): ", s.message()));
      };
      WeightMap weights;
      for (const TensorInfo& p : g.params()) {
        absl::StatusOr<Tensor> w = read(p);
        if (!w.ok()) return fail(w.status());
        weights[p.fqn()] = *std::move(w);
      }
      absl::StatusOr<std::unique_ptr<StageProgram>> program = backend.Compile(g, weights);
      if (!program.ok()) return fail(program.status());
      std::vector<double> times;
      for (int r = 0; r <= options.repeats; ++r) {
        auto start = std::chrono::steady_clock::now();
        absl::StatusOr<std::vector<Tensor>> out = (*program)->Run(inputs);
        if (!out.ok()) return fail(out.status());
        if (r > 0) times.push_back(Seconds(std::chrono::steady_clock::now() - start));
        outputs = *std::move(out);
      }
      std::nth_element(times.begin(), times.begin() + times.size() / 2, times.end());
      // Per `rows`-row microbatch of the joined run.
      c.node_seconds[p] = times[times.size() / 2] * options.rows / batch_rows;
      ++c.measured;
    }
    for (size_t k = 0; k < outputs.size(); ++k) {
      if (last_read.contains(node.outputs(k))) values[node.outputs(k)] = std::move(outputs[k]);
    }
    for (const std::string& v : node.inputs()) {
      if (last_read.contains(v) && last_read.at(v) == p) values.erase(v);
    }
  }
  if (c.estimated > 0) {
    // Seconds per unit of estimate, from the nodes that ran and read
    // weights as the skipped ones do (GEMMs, embeddings), else from all
    // that ran.
    std::vector<double> estimate = EstimatedNodeCosts(graph, shapes);
    double run_seconds = 0, run_estimate = 0;
    for (bool weighted : {true, false}) {
      for (size_t p = 0; p < compute.size(); ++p) {
        if (c.node_seconds[p] >= 0 && (reads_weights[p] || !weighted)) {
          run_seconds += c.node_seconds[p];
          run_estimate += estimate[p];
        }
      }
      if (run_estimate > 0) break;
    }
    if (run_estimate == 0) {
      return absl::FailedPreconditionError(absl::StrCat(
          "every node reads more than ", options.max_node_bytes,
          " bytes of weights: nothing to calibrate with"));
    }
    for (size_t p = 0; p < compute.size(); ++p) {
      if (c.node_seconds[p] < 0) c.node_seconds[p] = estimate[p] * run_seconds / run_estimate;
    }
  }
  return c;
}

}  // namespace pipeserve
