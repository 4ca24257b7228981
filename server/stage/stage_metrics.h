// Prometheus metrics of a stage server (GET /metrics on --metrics_port):
// for every stage it holds, labelled by model, deployment, stage and
// replica, the frames and bytes in and out, the time spent computing,
// queued and sending on, drops by reason, queue depth, whether the link
// downstream works, and the weights held.
//
//   MetricsHttpServer http([&core] { return RenderStageMetrics(core); });
#ifndef PIPESERVE_SERVER_STAGE_STAGE_METRICS_H_
#define PIPESERVE_SERVER_STAGE_STAGE_METRICS_H_

#include <string>

#include "server/stage/stage_server_core.h"

namespace pipeserve {

// The exposition text (version 0.0.4) for every stage `core` holds now.
std::string RenderStageMetrics(StageServerCore& core);

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_STAGE_STAGE_METRICS_H_
