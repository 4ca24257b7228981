// A readable table of a plan: one block per stage with its parameters,
// the values it receives (and from where) and the values it sends on.
//
//   std::cout << FormatPlan(plan);
//
//   cut by   the model's cut points
//   stage 0: 4 nodes, 1 parameter (1.0 MiB)
//     params   mm_param1 [512,512]
//     inputs   x [B,512] <- model input, y [B,512] <- model input
//     outputs  mm [B,512] -> stage 2, relu [B,512] -> stage 1
//
// Stages cut by measured times also show their predicted time per
// microbatch, and next to it the time measured while serving when
// `measured_us` (per stage) is given.
#ifndef PIPESERVE_PARTITIONER_PLAN_TEXT_H_
#define PIPESERVE_PARTITIONER_PLAN_TEXT_H_

#include <string>
#include <vector>

#include "proto/model.pb.h"

namespace pipeserve {

// `servers[i]`, when given, is printed as stage i's address.
std::string FormatPlan(const Plan& plan,
                       const std::vector<std::string>& servers = {},
                       const std::vector<double>& measured_us = {});

}  // namespace pipeserve

#endif  // PIPESERVE_PARTITIONER_PLAN_TEXT_H_
