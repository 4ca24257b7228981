// A minimal HTTP/1.1 server for Prometheus: GET /metrics answers with the
// text `render` returns (the exposition format); anything else is 404. The
// coordinator serves its request metrics with it, each stage server its
// stages'.
//
// One thread serves every connection from one poll loop, so no client
// holds up another: each connection has kRequestTimeout from its accept to
// finish sending its request head and reading the answer, at most
// kMaxConnections are open at once (a new one closes the oldest), and a
// request head over 16 KiB is answered 431 and closed. Shutdown (the
// destructor) never waits on a client.
//
//   MetricsHttpServer http([&] { return metrics.Render(coordinator.ListModels()); });
//   RETURN_IF_ERROR(http.Start("0.0.0.0", 8002));
#ifndef PIPESERVE_SERVER_TRANSPORT_METRICS_HTTP_H_
#define PIPESERVE_SERVER_TRANSPORT_METRICS_HTTP_H_

#include <atomic>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"

namespace pipeserve {

class MetricsHttpServer {
 public:
  static constexpr absl::Duration kRequestTimeout = absl::Seconds(5);
  static constexpr int kMaxConnections = 32;

  // `render` is called on the server's thread for every scrape.
  explicit MetricsHttpServer(std::function<std::string()> render);
  // Stops serving within a poll interval (200 ms), closing every connection.
  ~MetricsHttpServer();

  // Listens on host:port: an IPv4 or IPv6 address, or a name ("localhost":
  // every address it resolves to). 0 picks a port (see port()); with
  // `port_file`, the port is written there (atomically) once listening.
  // kInvalidArgument for a host that does not resolve, kUnavailable if the
  // port cannot be bound.
  absl::Status Start(const std::string& host, int port, const std::string& port_file = "");
  int port() const { return port_; }

 private:
  struct Connection;
  void Serve();
  // Reads what `c` sent; once its request head is complete, makes the answer.
  void Read(Connection& c);
  // Writes what is left of `c`'s answer; true when all of it is written.
  bool Write(Connection& c);
  std::string Answer(const std::string& request_head);

  const std::function<std::string()> render_;
  std::vector<int> listeners_;
  int port_ = 0;
  std::atomic<bool> stopping_{false};
  std::thread thread_;
};

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_TRANSPORT_METRICS_HTTP_H_
