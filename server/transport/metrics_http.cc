#include "server/transport/metrics_http.h"

#include <utility>

#include "server/transport/listen.h"

namespace pipeserve {

MetricsHttpServer::MetricsHttpServer(std::function<std::string()> render)
    : render_(std::move(render)) {}

MetricsHttpServer::~MetricsHttpServer() = default;

absl::Status MetricsHttpServer::Start(const std::string& host, int port,
                                      const std::string& port_file) {
  HttpServerOptions options;
  options.max_connections = kMaxConnections;
  options.max_header_bytes = size_t{16} << 10;
  options.max_body_bytes = size_t{64} << 10;
  options.idle_timeout = kRequestTimeout;
  absl::StatusOr<std::unique_ptr<HttpServer>> http = HttpServer::Start(
      host, port, options, [this](const HttpRequest& r) { return Answer(r); });
  if (!http.ok()) return http.status();
  http_ = *std::move(http);
  if (!port_file.empty()) WritePortFile(port_file, http_->port());
  return absl::OkStatus();
}

HttpResponse MetricsHttpServer::Answer(const HttpRequest& r) const {
  HttpResponse answer;
  if (r.path != "/metrics") {
    answer = HttpResponse::Text(404, "not found: try /metrics\n");
  } else if (r.method != "GET" && r.method != "HEAD") {
    answer = HttpResponse::Text(405, "GET /metrics\n");
    answer.headers.emplace_back("Allow", "GET");
  } else {
    answer = HttpResponse::Text(200, render_(), "text/plain; version=0.0.4; charset=utf-8");
  }
  // One scrape per connection, as before: clients that read to the end
  // of the connection get their answer at once.
  answer.headers.emplace_back("Connection", "close");
  return answer;
}

}  // namespace pipeserve
