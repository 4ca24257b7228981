#include "server/transport/metrics_http.h"

#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "server/transport/listen.h"

namespace pipeserve {
namespace {

constexpr size_t kMaxRequestHead = 16 << 10;
constexpr int kPollMillis = 200;

}  // namespace

// One client: what it sent so far, then the answer going out.
struct MetricsHttpServer::Connection {
  int fd = -1;
  absl::Time deadline;
  std::string in;
  std::string out;  // the answer, once the request head is in
  size_t written = 0;

  bool answering() const { return !out.empty(); }
};

MetricsHttpServer::MetricsHttpServer(std::function<std::string()> render)
    : render_(std::move(render)) {}

MetricsHttpServer::~MetricsHttpServer() {
  stopping_ = true;
  if (thread_.joinable()) thread_.join();
  for (int fd : listeners_) ::close(fd);
}

absl::Status MetricsHttpServer::Start(const std::string& host, int port,
                                      const std::string& port_file) {
  absl::StatusOr<Listeners> l = ListenOn(host, port, "metrics");
  if (!l.ok()) return l.status();
  listeners_ = std::move(l->fds);
  port = l->port;
  port_ = port;
  thread_ = std::thread([this] { Serve(); });
  if (!port_file.empty()) WritePortFile(port_file, port_);
  return absl::OkStatus();
}

std::string MetricsHttpServer::Answer(const std::string& head) {
  std::string body, status = "200 OK", type = "text/plain; version=0.0.4; charset=utf-8";
  if (head.size() >= kMaxRequestHead && !absl::StrContains(head, "\r\n\r\n")) {
    status = "431 Request Header Fields Too Large";
    body = "the request head is over 16 KiB\n";
  } else if (absl::StartsWith(head, "GET /metrics ") || absl::StartsWith(head, "GET /metrics?")) {
    body = render_();
  } else {
    status = "404 Not Found";
    body = "pipeserve serves GET /metrics here\n";
  }
  return absl::StrCat("HTTP/1.1 ", status, "\r\nContent-Type: ", type,
                      "\r\nContent-Length: ", body.size(), "\r\nConnection: close\r\n\r\n", body);
}

void MetricsHttpServer::Read(Connection& c) {
  char buf[4096];
  bool complete = false;
  while (!complete && c.in.size() < kMaxRequestHead) {
    const ssize_t n = ::read(c.fd, buf, std::min(sizeof buf, kMaxRequestHead - c.in.size()));
    if (n <= 0) {
      // The client closed (or failed) before its head was complete.
      if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK)) c.deadline = absl::InfinitePast();
      break;
    }
    c.in.append(buf, n);
    complete = absl::StrContains(c.in, "\r\n\r\n");
  }
  if (complete || c.in.size() >= kMaxRequestHead) c.out = Answer(c.in);
}

bool MetricsHttpServer::Write(Connection& c) {
  while (c.written < c.out.size()) {
    const ssize_t n = ::send(c.fd, c.out.data() + c.written, c.out.size() - c.written, MSG_NOSIGNAL);
    if (n <= 0) {
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return false;
      return true;  // the client went away: nothing more to write
    }
    c.written += n;
  }
  return true;
}

void MetricsHttpServer::Serve() {
  std::vector<Connection> conns;
  std::vector<pollfd> fds;
  while (!stopping_) {
    fds.clear();
    for (int l : listeners_) fds.push_back({l, POLLIN, 0});
    absl::Time wake = absl::Now() + absl::Milliseconds(kPollMillis);
    for (const Connection& c : conns) {
      fds.push_back({c.fd, static_cast<short>(c.answering() ? POLLOUT : POLLIN), 0});
      wake = std::min(wake, c.deadline);
    }
    const int ms = static_cast<int>(std::max<int64_t>(0, absl::ToInt64Milliseconds(wake - absl::Now())));
    if (::poll(fds.data(), fds.size(), ms) < 0 && errno != EINTR) break;
    const size_t first_conn = listeners_.size();
    // Existing connections first (fds holds them in conns' order).
    for (size_t i = 0; i < conns.size(); ++i) {
      Connection& c = conns[i];
      const short ev = fds[first_conn + i].revents;
      if (ev & (POLLIN | POLLHUP | POLLERR) && !c.answering()) Read(c);
      if (c.answering() && Write(c)) c.deadline = absl::InfinitePast();  // done: close
    }
    // Close the finished and the too slow.
    const absl::Time now = absl::Now();
    auto done = [now](const Connection& c) { return c.deadline <= now; };
    for (const Connection& c : conns) {
      if (done(c)) ::close(c.fd);
    }
    conns.erase(std::remove_if(conns.begin(), conns.end(), done), conns.end());
    // Then new ones. At the limit the oldest goes: a flood of clients that
    // connect and send nothing never keeps a scrape out for long.
    auto close_oldest = [&conns] {
      ::close(conns.front().fd);
      conns.erase(conns.begin());
    };
    for (size_t i = 0; i < first_conn; ++i) {
      if (!(fds[i].revents & POLLIN)) continue;
      while (true) {
        int fd = ::accept4(listeners_[i], nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0 && (errno == EMFILE || errno == ENFILE)) {
          // Out of descriptors: free the oldest connection's and try again,
          // or with none to free, wait instead of polling in a tight loop.
          if (conns.empty()) {
            absl::SleepFor(absl::Milliseconds(100));
            break;
          }
          close_oldest();
          continue;
        }
        if (fd < 0) break;
        if (conns.size() >= static_cast<size_t>(kMaxConnections)) close_oldest();
        Connection c;
        c.fd = fd;
        c.deadline = now + kRequestTimeout;
        conns.push_back(std::move(c));
      }
    }
  }
  for (const Connection& c : conns) ::close(c.fd);
}

}  // namespace pipeserve
