// Which values travel on each hop of a pipeline. Stages are chained
// 0 -> 1 -> ... -> last, so a value made in stage 0 and read in stage 2 (a
// skip connection), or a model input read only by the last stage, rides
// along every hop in between.
//
//   Routing r = RoutePlan(plan);
//   r.to_first     // model inputs sent to stage 0: every one any stage reads
//   r.forward[k]   // names stage k sends on after computing; for the last
//                  // stage, the model outputs in order
#ifndef PIPESERVE_PARTITIONER_ROUTING_H_
#define PIPESERVE_PARTITIONER_ROUTING_H_

#include <string>
#include <vector>

#include "proto/model.pb.h"

namespace pipeserve {

struct Routing {
  std::vector<std::string> to_first;
  std::vector<std::vector<std::string>> forward;
};

Routing RoutePlan(const Plan& plan);

}  // namespace pipeserve

#endif  // PIPESERVE_PARTITIONER_ROUTING_H_
