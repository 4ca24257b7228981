// A traced request's timeline as Chrome trace-event JSON, the format
// Perfetto (ui.perfetto.dev) and chrome://tracing open: a process per
// stage replica, named with its server, with a track each for compute,
// queue and transfer in; one for the coordinator with the request, each
// microbatch's send and its results' transfer back. Times are
// microseconds from the request's start. Spans come from each process's
// clock: one clock on one machine; across machines they line up as well
// as the machines' clocks do (NTP).
//
//   std::vector<TraceSpan> spans;
//   coordinator.InferOn(model, inputs, deadline, nullptr, 0, nullptr, &spans);
//   std::string json = TraceToChromeJson(spans, model->Info());
#ifndef PIPESERVE_SERVER_COORDINATOR_TRACE_H_
#define PIPESERVE_SERVER_COORDINATOR_TRACE_H_

#include <string>
#include <vector>

#include "proto/pipeserve_service.pb.h"
#include "server/coordinator/deployment.h"

namespace pipeserve {

std::string TraceToChromeJson(const std::vector<TraceSpan>& spans, const ModelInfo& model);

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_COORDINATOR_TRACE_H_
