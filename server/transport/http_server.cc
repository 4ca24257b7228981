#include "server/transport/http_server.h"

#include <arpa/inet.h>
#include <microhttpd.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <system_error>
#include <thread>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "server/transport/listen.h"

namespace pipeserve {
namespace {

// Bytes a stream may queue ahead of the connection before Write waits.
constexpr size_t kMaxQueuedStreamBytes = size_t{1} << 20;

// libmicrohttpd's idle timeout, whole seconds (at least 1).
unsigned TimeoutSeconds(const HttpServerOptions& o) {
  return static_cast<unsigned>(std::max<int64_t>(1, absl::ToInt64Seconds(o.idle_timeout)));
}

bool PeerClosed(int fd) {
  pollfd p{fd, POLLRDHUP, 0};
  return ::poll(&p, 1, 0) > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR)) != 0;
}

std::string PeerOf(MHD_Connection* c) {
  const MHD_ConnectionInfo* info = MHD_get_connection_info(c, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
  if (info == nullptr || info->client_addr == nullptr) return "";
  char host[INET6_ADDRSTRLEN] = {};
  const sockaddr* a = info->client_addr;
  if (a->sa_family == AF_INET6) {
    const auto* in6 = reinterpret_cast<const sockaddr_in6*>(a);
    ::inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof host);
    return absl::StrCat("[", host, "]:", ntohs(in6->sin6_port));
  }
  const auto* in = reinterpret_cast<const sockaddr_in*>(a);
  ::inet_ntop(AF_INET, &in->sin_addr, host, sizeof host);
  return absl::StrCat(host, ":", ntohs(in->sin_port));
}

int ConnectionFd(MHD_Connection* c) {
  const MHD_ConnectionInfo* info = MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD);
  return info == nullptr ? -1 : info->connect_fd;
}

MHD_Result AddHeader(void* cls, MHD_ValueKind, const char* key, const char* value) {
  auto* headers = static_cast<absl::flat_hash_map<std::string, std::string>*>(cls);
  (*headers)[absl::AsciiStrToLower(key)] = value == nullptr ? "" : value;
  return MHD_YES;
}

// A streamed response: the producer's thread queues pieces, libmicrohttpd's
// connection thread takes them (Read), and Close (the response freed: sent,
// or the client gone) stops the producer and waits for it. A client that
// takes nothing for `stall` while the queue is full counts as gone: its
// connection is shut, so a reader that stopped reading cannot hold the
// producer (and a generation's KV blocks) for good.
class Stream final : public HttpStream {
 public:
  Stream(int fd, absl::Duration stall) : fd_(fd), stall_(absl::ToChronoMilliseconds(stall)) {}

  bool Write(absl::string_view data) override {
    std::unique_lock<std::mutex> l(mu_);
    if (data.empty()) return !gone_;  // a read of 0 bytes would make libmicrohttpd spin
    if (!cv_.wait_for(l, stall_, [&] { return gone_ || queued_ < kMaxQueuedStreamBytes; })) {
      ShutOut();
    }
    if (gone_) return false;
    pieces_.emplace_back(data);
    queued_ += data.size();
    cv_.notify_all();
    return true;
  }

  bool ClientGone() override {
    std::lock_guard<std::mutex> l(mu_);
    return gone_;
  }

  // Starts the producer; false when no thread could be made.
  bool Run(std::function<void(HttpStream&)> produce) {
    try {
      producer_ = std::thread([this, produce = std::move(produce)] {
        produce(*this);
        std::unique_lock<std::mutex> l(mu_);
        done_ = true;
        cv_.notify_all();
        // A client that takes nothing of what is left for `stall` is shut
        // out: its connection has no idle timeout while it streams.
        while (!pieces_.empty() && !gone_) {
          const size_t taken = taken_;
          auto moved = [&] { return pieces_.empty() || gone_ || taken_ != taken; };
          if (!cv_.wait_for(l, stall_, moved)) ShutOut();
        }
      });
    } catch (const std::system_error&) {
      return false;
    }
    return true;
  }

  // Up to `max` bytes for the connection; waits for the producer, checking
  // the client meanwhile.
  ssize_t Read(char* buf, size_t max) {
    std::unique_lock<std::mutex> l(mu_);
    while (pieces_.empty() && !done_ && !gone_) {
      if (cv_.wait_for(l, std::chrono::milliseconds(50)) == std::cv_status::timeout &&
          PeerClosed(fd_)) {
        gone_ = true;
        cv_.notify_all();
      }
    }
    if (gone_) return MHD_CONTENT_READER_END_WITH_ERROR;
    if (pieces_.empty()) return MHD_CONTENT_READER_END_OF_STREAM;
    std::string& front = pieces_.front();
    const size_t n = std::min(max, front.size() - offset_);
    std::memcpy(buf, front.data() + offset_, n);
    offset_ += n;
    queued_ -= n;
    taken_ += n;
    if (offset_ == front.size()) {
      pieces_.pop_front();
      offset_ = 0;
    }
    cv_.notify_all();
    return static_cast<ssize_t>(n);
  }

  void Close() {
    {
      std::lock_guard<std::mutex> l(mu_);
      gone_ = true;  // the producer stops, or stops waiting for its last pieces to go
      cv_.notify_all();
    }
    if (producer_.joinable()) producer_.join();
  }

 private:
  // The client took nothing for stall_: gone, and its connection shut
  // (libmicrohttpd then closes it and frees the stream). Under mu_.
  void ShutOut() {
    gone_ = true;
    ::shutdown(fd_, SHUT_RDWR);
    cv_.notify_all();
  }

  const int fd_;
  const std::chrono::milliseconds stall_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::string> pieces_;
  size_t offset_ = 0, queued_ = 0, taken_ = 0;
  bool done_ = false, gone_ = false;
  std::thread producer_;
};

ssize_t ReadStream(void* cls, uint64_t, char* buf, size_t max) {
  return static_cast<Stream*>(cls)->Read(buf, max);
}

void FreeStream(void* cls) {
  auto* s = static_cast<Stream*>(cls);
  s->Close();
  delete s;
}

MHD_Result Queue(MHD_Connection* c, const HttpResponse& r, const HttpServerOptions& o) {
  MHD_Response* resp;
  if (r.stream) {
    auto* s = new Stream(ConnectionFd(c), o.idle_timeout);
    resp = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 32 << 10, &ReadStream, s,
                                             &FreeStream);
    if (resp == nullptr) {
      delete s;
      return MHD_NO;
    }
    if (!s->Run(r.stream)) {
      MHD_destroy_response(resp);  // frees s
      return Queue(c, HttpResponse::Text(503, "no thread is free for the stream; try again\n"), o);
    }
    // A stream may be silent longer than the idle timeout (a long prompt,
    // blocks to wait for), and libmicrohttpd's timer runs while Read waits:
    // its connection has none until the request completes (Completed).
    // Read's check for a closed peer and Write's bound on a stalled queue
    // still end it when the client goes away.
    MHD_set_connection_option(c, MHD_CONNECTION_OPTION_TIMEOUT, 0u);
  } else {
    resp = MHD_create_response_from_buffer(r.body.size(), const_cast<char*>(r.body.data()),
                                           MHD_RESPMEM_MUST_COPY);
  }
  if (resp == nullptr) return MHD_NO;
  MHD_add_response_header(resp, "Content-Type", r.content_type.c_str());
  for (const auto& [k, v] : r.headers) MHD_add_response_header(resp, k.c_str(), v.c_str());
  const MHD_Result queued = MHD_queue_response(c, static_cast<unsigned>(r.status), resp);
  MHD_destroy_response(resp);
  return queued;
}

}  // namespace

HttpResponse HttpResponse::EventStream(std::function<void(HttpStream&)> produce) {
  HttpResponse events;
  events.content_type = "text/event-stream";
  events.headers.emplace_back("Cache-Control", "no-cache");
  events.stream = std::move(produce);
  return events;
}

bool WriteEvent(HttpStream& out, absl::string_view data) {
  return out.Write(absl::StrCat("data: ", data, "\n\n"));
}

std::string HttpRequest::Header(const std::string& name) const {
  auto it = headers.find(name);
  return it == headers.end() ? "" : it->second;
}

HttpResponse HttpResponse::Text(int status, std::string body, std::string content_type) {
  HttpResponse r;
  r.status = status;
  r.body = std::move(body);
  r.content_type = std::move(content_type);
  return r;
}

// libmicrohttpd calls Handle for a request's head, for each piece of its
// body, and once more at the body's end; `state` keeps the request meanwhile.
struct HttpServer::Context {
  struct Pending {
    HttpRequest request;
    bool refused = false;    // answered already (413)
    bool too_large = false;  // its body grew past max_body_bytes
    uint64_t received = 0;   // body bytes read, kept or not
  };

  static MHD_Result Handle(void* cls, MHD_Connection* c, const char* url, const char* method,
                           const char*, const char* upload, size_t* upload_size, void** state) {
    auto* server = static_cast<HttpServer*>(cls);
    auto* p = static_cast<Pending*>(*state);
    if (p == nullptr) return Begin(server, c, url, method, state);
    if (*upload_size > 0) {
      // A body that grows too large (chunked) is read to its end unkept,
      // then refused: libmicrohttpd answers only once the upload is done.
      if (p->request.body.size() + *upload_size > server->options_.max_body_bytes) {
        p->too_large = true;
        p->request.body.clear();
      }
      if (!p->too_large) p->request.body.append(upload, *upload_size);
      p->received += *upload_size;
      *upload_size = 0;
      // Past twice the limit it is not read to its end: the connection closes.
      return p->received > 2 * server->options_.max_body_bytes ? MHD_NO : MHD_YES;
    }
    if (p->refused) return MHD_YES;
    if (p->too_large) {
      p->refused = true;
      return Queue(c, TooLarge(server), server->options_);
    }
    const int fd = ConnectionFd(c);
    p->request.client_gone = [fd] { return PeerClosed(fd); };
    HttpResponse answer;
    try {  // nothing may unwind into libmicrohttpd's C
      answer = server->handler_(p->request);
    } catch (const std::exception& e) {
      answer = HttpResponse::Text(500, absl::StrCat("internal error: ", e.what(), "\n"));
    }
    return Queue(c, answer, server->options_);
  }

  static MHD_Result Begin(HttpServer* server, MHD_Connection* c, const char* url,
                          const char* method, void** state) {
    auto* p = new Pending;
    *state = p;
    p->request.method = method;
    p->request.path = url;
    p->request.peer = PeerOf(c);
    MHD_get_connection_values(c, MHD_HEADER_KIND, &AddHeader, &p->request.headers);
    if (const int open = server->open_connections_.load();
        open > server->options_.max_connections) {
      p->refused = true;
      HttpResponse busy = HttpResponse::Text(
          503, absl::StrCat("too many connections: ", open, " are open, and this server takes ",
                            server->options_.max_connections, "; try again\n"));
      busy.headers.emplace_back("Connection", "close");
      busy.headers.emplace_back("Retry-After", "1");
      return Queue(c, busy, server->options_);
    }
    uint64_t length = 0;
    if (absl::SimpleAtoi(p->request.Header("content-length"), &length) &&
        length > server->options_.max_body_bytes) {
      p->refused = true;  // before a byte of it is read
      return Queue(c, TooLarge(server), server->options_);
    }
    return MHD_YES;
  }

  static HttpResponse TooLarge(HttpServer* server) {
    return HttpResponse::Text(
        413, absl::StrCat("the request body is larger than this server takes (",
                          server->options_.max_body_bytes, " bytes)\n"));
  }

  // Also gives the connection back the idle timeout a stream took away
  // (Queue): a kept-alive connection that streamed once was never closed.
  static void Completed(void* cls, MHD_Connection* c, void** state, MHD_RequestTerminationCode) {
    delete static_cast<Pending*>(*state);
    *state = nullptr;
    const auto* server = static_cast<const HttpServer*>(cls);
    MHD_set_connection_option(c, MHD_CONNECTION_OPTION_TIMEOUT, TimeoutSeconds(server->options_));
  }

  static void Connection(void* cls, MHD_Connection*, void**, MHD_ConnectionNotificationCode code) {
    auto* server = static_cast<HttpServer*>(cls);
    server->open_connections_ += code == MHD_CONNECTION_NOTIFY_STARTED ? 1 : -1;
  }
};

absl::StatusOr<std::unique_ptr<HttpServer>> HttpServer::Start(const std::string& host, int port,
                                                              const HttpServerOptions& options,
                                                              HttpHandler handler) {
  absl::StatusOr<Listeners> listeners = ListenOn(host, port, "http");
  if (!listeners.ok()) return listeners.status();
  std::unique_ptr<HttpServer> server(new HttpServer(options, std::move(handler)));
  server->port_ = listeners->port;
  const unsigned timeout_s = TimeoutSeconds(options);
  for (size_t i = 0; i < listeners->fds.size(); ++i) {
    const int fd = listeners->fds[i];
    const HttpServerOptions& o = server->options_;
    std::vector<MHD_OptionItem> items = {
        {MHD_OPTION_LISTEN_SOCKET, fd, nullptr},
        {MHD_OPTION_CONNECTION_LIMIT, o.max_connections + kConnectionOverflow, nullptr},
        {MHD_OPTION_CONNECTION_TIMEOUT, timeout_s, nullptr},
        {MHD_OPTION_CONNECTION_MEMORY_LIMIT, static_cast<intptr_t>(o.max_header_bytes), nullptr},
        {MHD_OPTION_NOTIFY_COMPLETED, reinterpret_cast<intptr_t>(&Context::Completed),
         server.get()},
        {MHD_OPTION_NOTIFY_CONNECTION, reinterpret_cast<intptr_t>(&Context::Connection),
         server.get()},
    };
    unsigned flags = MHD_USE_THREAD_PER_CONNECTION | MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_POLL;
    if (!o.tls_cert_pem.empty()) {
      flags |= MHD_USE_TLS;
      // Not copied: the options (and so the PEM) live as long as the server.
      items.push_back({MHD_OPTION_HTTPS_MEM_KEY, 0, const_cast<char*>(o.tls_key_pem.c_str())});
      items.push_back({MHD_OPTION_HTTPS_MEM_CERT, 0, const_cast<char*>(o.tls_cert_pem.c_str())});
    }
    items.push_back({MHD_OPTION_END, 0, nullptr});
    MHD_Daemon* d = MHD_start_daemon(flags, 0, nullptr, nullptr, &Context::Handle, server.get(),
                                     MHD_OPTION_ARRAY, items.data(), MHD_OPTION_END);
    if (d == nullptr) {
      for (size_t k = i; k < listeners->fds.size(); ++k) ::close(listeners->fds[k]);
      return absl::UnavailableError(absl::StrCat(
          "http: cannot serve on ", host, ":", listeners->port,
          o.tls_cert_pem.empty() ? "" : " (is the TLS certificate and key a PEM pair?)"));
    }
    server->daemons_.push_back(d);
  }
  return server;
}

HttpServer::~HttpServer() {
  for (MHD_Daemon* d : daemons_) MHD_stop_daemon(d);  // closes its listening socket too
}

}  // namespace pipeserve
