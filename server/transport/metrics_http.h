// Prometheus's endpoint: GET /metrics answers with the text `render`
// returns (the exposition format); anything else is 404. The coordinator
// serves its request metrics with it, each stage server its stages'.
//
// It runs on HttpServer (libmicrohttpd, a thread per connection), so no
// client holds up another: a connection silent for kRequestTimeout is
// closed, at most kMaxConnections are open at once (more are closed at
// once), a request head over 16 KiB is answered 431, and shutdown (the
// destructor) never waits on a client.
//
//   MetricsHttpServer http([&] { return metrics.Render(coordinator.ListModels()); });
//   RETURN_IF_ERROR(http.Start("0.0.0.0", 8002));
#ifndef PIPESERVE_SERVER_TRANSPORT_METRICS_HTTP_H_
#define PIPESERVE_SERVER_TRANSPORT_METRICS_HTTP_H_

#include <functional>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "server/transport/http_server.h"

namespace pipeserve {

class MetricsHttpServer {
 public:
  static constexpr absl::Duration kRequestTimeout = absl::Seconds(5);
  static constexpr int kMaxConnections = 256;

  // `render` is called on a connection's thread for every scrape.
  explicit MetricsHttpServer(std::function<std::string()> render);
  ~MetricsHttpServer();

  // Listens on host:port: an IPv4 or IPv6 address, or a name ("localhost":
  // every address it resolves to). 0 picks a port (see port()); with
  // `port_file`, the port is written there (atomically) once listening.
  // kInvalidArgument for a host that does not resolve, kUnavailable if the
  // port cannot be bound.
  absl::Status Start(const std::string& host, int port, const std::string& port_file = "");
  int port() const { return http_ == nullptr ? 0 : http_->port(); }

 private:
  HttpResponse Answer(const HttpRequest& r) const;

  const std::function<std::string()> render_;
  std::unique_ptr<HttpServer> http_;
};

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_TRANSPORT_METRICS_HTTP_H_
