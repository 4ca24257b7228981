// An HTTP/1.1 server for pipeserve's HTTP front door (issue 23), on
// libmicrohttpd (Debian's libmicrohttpd-dev): it parses requests, keeps
// connections alive, and bounds what a client may take, answering as
// HTTP says: a request head over max_header_bytes gets 431, a body over
// max_body_bytes 413 (before it is read, when Content-Length says so), a
// connection silent for idle_timeout is closed, and beyond
// max_connections a new connection is closed at once. Each connection has
// a thread of its own, so a handler may block (run a request, stream a
// generation) without holding up another client.
//
// A handler answers with a whole body, or with a stream: a function that
// writes the body piece by piece (chunked), on a thread of its own, until
// it returns or the client goes away (HttpStream::Write returns false,
// HttpStream::ClientGone turns true: generation stops there).
//
//   ASSIGN_OR_RETURN(std::unique_ptr<HttpServer> http,
//                    HttpServer::Start("127.0.0.1", 8000, {}, [](const HttpRequest& r) {
//                      return HttpResponse::Text(200, "hello\n");
//                    }));
#ifndef PIPESERVE_SERVER_TRANSPORT_HTTP_SERVER_H_
#define PIPESERVE_SERVER_TRANSPORT_HTTP_SERVER_H_

#include <cstddef>
#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

struct MHD_Daemon;

namespace pipeserve {

struct HttpRequest {
  std::string method;  // "GET", "POST", ...
  std::string path;    // without the query string
  absl::flat_hash_map<std::string, std::string> headers;  // names in lower case
  std::string body;
  std::string peer;  // the client's address
  // Whether the client has closed its connection (a long request stops).
  std::function<bool()> client_gone;

  // The header `name` (lower case), or "".
  std::string Header(const std::string& name) const;
};

// Where a streamed response's body goes.
class HttpStream {
 public:
  virtual ~HttpStream() = default;
  // Queues `data` to send; false once the client is gone (stop then).
  // Blocks while much is queued and not yet sent.
  virtual bool Write(absl::string_view data) = 0;
  virtual bool ClientGone() = 0;
};

struct HttpResponse {
  int status = 200;
  std::string content_type = "application/json";
  std::string body;
  std::vector<std::pair<std::string, std::string>> headers;
  // When set, the body is what this writes (chunked, body is ignored).
  std::function<void(HttpStream&)> stream;

  static HttpResponse Text(int status, std::string body,
                           std::string content_type = "text/plain; charset=utf-8");
  // A stream of server-sent events (text/event-stream, not cached) that
  // `produce` writes (WriteEvent).
  static HttpResponse EventStream(std::function<void(HttpStream&)> produce);
};

// Writes one server-sent event, "data: <data>\n\n"; false once the client
// is gone.
bool WriteEvent(HttpStream& out, absl::string_view data);

using HttpHandler = std::function<HttpResponse(const HttpRequest&)>;

struct HttpServerOptions {
  // Open connections, over every listening address. A request on one
  // beyond gets 503 and its connection closes; beyond that by
  // kConnectionOverflow more, connections close as they are accepted.
  int max_connections = 256;
  size_t max_header_bytes = size_t{16} << 10;
  size_t max_body_bytes = size_t{64} << 20;
  absl::Duration idle_timeout = absl::Seconds(30);
  // PEM: with a certificate and its key, HTTPS (clients present none).
  std::string tls_cert_pem, tls_key_pem;
};

class HttpServer {
 public:
  static constexpr int kConnectionOverflow = 16;

  // Listens on host:port (an IPv4 or IPv6 address, or a name: every
  // address it resolves to; port 0 picks one, see port()) and serves
  // `handler`. kInvalidArgument for a host that does not resolve,
  // kUnavailable when the port cannot be bound.
  static absl::StatusOr<std::unique_ptr<HttpServer>> Start(const std::string& host, int port,
                                                           const HttpServerOptions& options,
                                                           HttpHandler handler);
  // Stops listening, closes every connection and waits for the handlers
  // and streams to return (a stream sees ClientGone).
  ~HttpServer();
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  int port() const { return port_; }

  // libmicrohttpd's callbacks (http_server.cc).
  struct Context;

 private:
  HttpServer(HttpServerOptions options, HttpHandler handler)
      : options_(options), handler_(std::move(handler)) {}

  const HttpServerOptions options_;
  const HttpHandler handler_;
  std::vector<MHD_Daemon*> daemons_;
  int port_ = 0;
  std::atomic<int> open_connections_{0};
};

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_TRANSPORT_HTTP_SERVER_H_
