// A minimal HTTP/1.1 server for Prometheus: GET /metrics answers with the
// text `render` returns (the exposition format); anything else is 404. The
// coordinator serves its request metrics with it, each stage server its
// stages'.
//
//   MetricsHttpServer http([&] { return metrics.Render(coordinator.ListModels()); });
//   RETURN_IF_ERROR(http.Start("0.0.0.0", 8002));
#ifndef PIPESERVE_SERVER_TRANSPORT_METRICS_HTTP_H_
#define PIPESERVE_SERVER_TRANSPORT_METRICS_HTTP_H_

#include <atomic>
#include <functional>
#include <string>
#include <thread>

#include "absl/status/status.h"

namespace pipeserve {

class MetricsHttpServer {
 public:
  // `render` is called on the server's thread for every scrape.
  explicit MetricsHttpServer(std::function<std::string()> render);
  ~MetricsHttpServer();

  // Listens on host:port (0 picks a port; see port()) and, with
  // `port_file`, writes the port there (atomically) once listening.
  // kUnavailable if the port cannot be bound.
  absl::Status Start(const std::string& host, int port, const std::string& port_file = "");
  int port() const { return port_; }

 private:
  void Serve();

  const std::function<std::string()> render_;
  int listener_ = -1;
  int port_ = 0;
  std::atomic<bool> stopping_{false};
  std::thread thread_;
};

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_TRANSPORT_METRICS_HTTP_H_
