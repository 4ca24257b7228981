// Running a gRPC server the way every pipeserve binary does: health
// checking and reflection on, no message size limit, the chosen port
// written to a file (for launchers and tests that pick ports at run time),
// and a clean shutdown on SIGINT/SIGTERM.
#ifndef PIPESERVE_SERVER_SERVE_H_
#define PIPESERVE_SERVER_SERVE_H_

#include <functional>
#include <string>
#include <vector>

#include "grpcpp/grpcpp.h"

namespace pipeserve {

// Blocks SIGINT and SIGTERM in the calling thread and in every thread it
// starts afterwards, so Serve() can wait for them. Call it first in main().
void BlockShutdownSignals();

// Builds and runs a server with `services` on host:port until a signal
// arrives. Requests over `max_receive_bytes` (-1: no limit) get
// RESOURCE_EXHAUSTED from gRPC. `on_started` (optional) runs once serving, with the server.
// Returns the process exit code.
int Serve(const std::vector<grpc::Service*>& services, const std::string& host,
          int port, const std::string& port_file, const std::string& name,
          std::function<void(grpc::Server*)> on_started = nullptr,
          int max_receive_bytes = -1);

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_SERVE_H_
