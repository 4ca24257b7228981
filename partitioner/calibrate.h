// Measuring what each node of a graph costs on a compute backend, so the
// partitioner can balance stages by time instead of by estimate.
//
//   CalibrationOptions opts;            // 16-row microbatches
//   opts.joined_rows = 64;              // run 4 at a time by a loaded stage
//   ASSIGN_OR_RETURN(Calibration c,
//                    Calibrate(graph, ReadFromFile(reader), *cpu, opts));
//   PartitionOptions p;
//   p.num_stages = 4;
//   p.node_seconds = c.node_seconds;
//   p.cost_rows = opts.rows;
//   p.cost_source = c.Describe();
//
// Each compute node runs alone, compiled as a one-node graph with its own
// parameters (read one node at a time, dropped after), on inputs that the
// nodes before it made from random model inputs (integers: zeros, which
// are valid indices), so shapes stay consistent through reshapes. A node
// whose parameters exceed max_node_bytes is not run: its time is its
// estimated cost (EstimatedNodeCosts) times the seconds per unit of
// estimate that the measured nodes reading weights showed (all measured
// nodes if none does), and its outputs are zeros.
#ifndef PIPESERVE_PARTITIONER_CALIBRATE_H_
#define PIPESERVE_PARTITIONER_CALIBRATE_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "proto/model.pb.h"
#include "runtime/backend.h"
#include "runtime/tensor.h"

namespace pipeserve {

struct CalibrationOptions {
  // Rows of the batch dimension (and any other dimension left -1): the
  // microbatch size the times are for.
  int64_t rows = 16;
  // Rows a loaded stage computes in one run, where it joins the queued
  // microbatches of a request (StageSpec.merge_rows); 0 or <= rows: none.
  // Nodes then run on this many rows of the batch dimension and each is
  // charged its time pro rata per `rows`-row microbatch, as the stage
  // pays it under load: per-node overheads shrink, per-row work does not.
  int64_t joined_rows = 0;
  // Timed runs per node after one warm-up; the median counts.
  int repeats = 5;
  // Nodes reading more parameter bytes than this are estimated, not run,
  // so calibrating never holds more than one such node's weights.
  uint64_t max_node_bytes = uint64_t{64} << 20;
};

struct Calibration {
  // Seconds per compute node, in ComputeNodes order.
  std::vector<double> node_seconds;
  int measured = 0;   // nodes run
  int estimated = 0;  // nodes over max_node_bytes
  std::string backend;
  int64_t rows = 0;         // the microbatch the times are per
  int64_t joined_rows = 0;  // rows the nodes ran on, where more than `rows`

  // "measured on cpu at 16 rows (12 nodes run; 2 ... estimated)", or
  // "measured on cpu at 64 rows joined, per 16-row microbatch (...)".
  std::string Describe() const;
};

// Reads one parameter's bytes (the TensorInfo of graph.params) into a
// tensor of its dtype and shape.
using ParamReader = std::function<absl::StatusOr<Tensor>(const TensorInfo&)>;

// Times every compute node of `graph` (which must be valid) on `backend`.
// Errors: the backend's, or the reader's, prefixed with the node's name; a
// caller can fall back to the estimate.
absl::StatusOr<Calibration> Calibrate(const Graph& graph, const ParamReader& read,
                                      ComputeBackend& backend,
                                      const CalibrationOptions& options);

}  // namespace pipeserve

#endif  // PIPESERVE_PARTITIONER_CALIBRATE_H_
