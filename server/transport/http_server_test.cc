#include "server/transport/http_server.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/strings/match.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/http_get.h"

namespace pipeserve {
namespace {

using ::testing::HasSubstr;
using ::testing::StartsWith;

void Send(int fd, const std::string& data) {
  for (size_t sent = 0; sent < data.size();) {
    const ssize_t n = ::send(fd, data.data() + sent, data.size() - sent, MSG_NOSIGNAL);
    if (n <= 0) return;
    sent += n;
  }
}

// What the server sends until it closes, `until` appears, or the time is up.
std::string Receive(int fd, absl::Duration timeout, const std::string& until = "") {
  std::string got;
  const absl::Time end = absl::Now() + timeout;
  while (absl::Now() < end && (until.empty() || got.find(until) == std::string::npos)) {
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, 20) <= 0) continue;
    char buf[4096];
    const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n <= 0) break;
    got.append(buf, n);
  }
  return got;
}

// Whether the server closed `fd` within `timeout`.
bool ClosedWithin(int fd, absl::Duration timeout) {
  const absl::Time end = absl::Now() + timeout;
  while (absl::Now() < end) {
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, 20) <= 0) continue;
    char buf[256];
    if (::recv(fd, buf, sizeof buf, 0) <= 0) return true;
  }
  return false;
}

std::string Exchange(int port, const std::string& request) {
  int fd = ConnectLoopback(port);
  Send(fd, request);
  std::string got = Receive(fd, absl::Seconds(10));
  ::close(fd);
  return got;
}

class HttpServerTest : public ::testing::Test {
 protected:
  void Start(HttpServerOptions options = {}) {
    auto s = HttpServer::Start("127.0.0.1", 0, options, [this](const HttpRequest& r) {
      if (r.path == "/slow") {  // pieces further apart than the idle timeout
        HttpResponse resp;
        resp.stream = [](HttpStream& out) {
          for (int i = 0; i < 3 && out.Write(absl::StrCat("piece ", i, "\n")); ++i) {
            absl::SleepFor(absl::Milliseconds(2500));
          }
        };
        return resp;
      }
      if (r.path == "/flood") {  // as much as the client takes, 64 KiB a piece
        HttpResponse resp;
        resp.stream = [this](HttpStream& out) {
          const std::string piece(64 << 10, 'x');
          while (out.Write(piece)) {
          }
          flood_ended_ = true;
        };
        return resp;
      }
      if (r.path == "/slow_whole") {  // a whole answer later than the idle timeout
        absl::SleepFor(absl::Milliseconds(2500));
        return HttpResponse::Text(200, "done at last");
      }
      if (r.path == "/stream") {
        HttpResponse resp;
        resp.content_type = "text/event-stream";
        resp.stream = [this](HttpStream& out) {
          for (int i = 0; i < 200 && out.Write(absl::StrCat("data: ", i, "\n\n")); ++i) {
            absl::SleepFor(absl::Milliseconds(i < 3 ? 1 : 50));
          }
          stream_saw_gone_ = out.ClientGone();
          stream_ended_ = true;
        };
        return resp;
      }
      return HttpResponse::Text(200, absl::StrCat(r.method, " ", r.path, " [", r.body, "] ",
                                                  r.Header("x-test")));
    });
    ASSERT_TRUE(s.ok()) << s.status();
    server_ = std::move(*s);
  }
  // A server with an idle timeout of 1 s, and a connection that asked it
  // for GET `path`.
  int GetWithAOneSecondIdleTimeout(const std::string& path) {
    HttpServerOptions o;
    o.idle_timeout = absl::Seconds(1);
    Start(o);
    const int fd = ConnectLoopback(server_->port());
    Send(fd, "GET " + path + " HTTP/1.1\r\nHost: x\r\n\r\n");
    return fd;
  }
  std::unique_ptr<HttpServer> server_;
  std::atomic<bool> stream_ended_{false}, stream_saw_gone_{false}, flood_ended_{false};
};

TEST_F(HttpServerTest, AnswersRequestsAndKeepsTheConnectionAlive) {
  Start();
  const int fd = ConnectLoopback(server_->port());
  Send(fd, "GET /a?q=1 HTTP/1.1\r\nHost: x\r\nX-Test: yes\r\n\r\n");
  std::string first = Receive(fd, absl::Seconds(10), "GET /a [] yes");
  EXPECT_THAT(first, StartsWith("HTTP/1.1 200"));
  EXPECT_THAT(first, HasSubstr("GET /a [] yes"));
  Send(fd, "POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello");
  EXPECT_THAT(Receive(fd, absl::Seconds(10), "POST /b [hello]"), HasSubstr("POST /b [hello]"))
      << "the same connection serves a second request";
  ::close(fd);
}

TEST_F(HttpServerTest, AHeadBeyondTheLimitGets431) {
  HttpServerOptions o;
  o.max_header_bytes = 4096;
  Start(o);
  const std::string got = Exchange(
      server_->port(), "GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + std::string(8000, 'a') + "\r\n\r\n");
  EXPECT_THAT(got, StartsWith("HTTP/1.1 431"));
}

TEST_F(HttpServerTest, ABodyBeyondTheLimitGets413BeforeItIsSent) {
  HttpServerOptions o;
  o.max_body_bytes = 1000;
  Start(o);
  // Content-Length says too much, and nothing of the body is sent.
  std::string got =
      Exchange(server_->port(), "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n");
  EXPECT_THAT(got, StartsWith("HTTP/1.1 413"));
  EXPECT_THAT(got, HasSubstr("larger than this server takes (1000 bytes)"));
  // A chunked body that grows past the limit.
  const std::string chunk = "3e8\r\n" + std::string(1000, 'x') + "\r\n";
  got = Exchange(server_->port(),
                 "POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                 "Transfer-Encoding: chunked\r\n\r\n" + chunk +
                     chunk + "0\r\n\r\n");
  EXPECT_THAT(got, StartsWith("HTTP/1.1 413"));
  EXPECT_THAT(Exchange(server_->port(), "GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
              HasSubstr("GET /ok")) << "the server serves on";
}

TEST_F(HttpServerTest, AStreamArrivesPieceByPieceChunked) {
  Start();
  const int fd = ConnectLoopback(server_->port());
  Send(fd, "GET /stream HTTP/1.1\r\nHost: x\r\n\r\n");
  const std::string got = Receive(fd, absl::Seconds(10), "data: 2\n\n");
  EXPECT_THAT(got, StartsWith("HTTP/1.1 200"));
  EXPECT_THAT(got, HasSubstr("Transfer-Encoding: chunked"));
  EXPECT_THAT(got, HasSubstr("text/event-stream"));
  EXPECT_THAT(got, HasSubstr("data: 0\n\n"));
  EXPECT_THAT(got, HasSubstr("data: 2\n\n"));
  EXPECT_FALSE(stream_ended_) << "the first pieces came before the stream's end";
  ::close(fd);
}

// Regression: libmicrohttpd's idle timer ran while a stream waited for
// its next piece, so a generation whose next token took longer than the
// idle timeout (a long prompt, blocks to wait for) was cut off mid-body.
TEST_F(HttpServerTest, AStreamOutlivesTheIdleTimeoutBetweenPieces) {
  const int fd = GetWithAOneSecondIdleTimeout("/slow");
  const std::string got = Receive(fd, absl::Seconds(15), "\r\n0\r\n\r\n");
  EXPECT_THAT(got, HasSubstr("piece 2"));
  EXPECT_THAT(got, HasSubstr("\r\n0\r\n\r\n")) << "the chunked body ends properly";
  ::close(fd);
}

// A handler that answers whole (a completion without streaming) after
// more than the idle timeout still gets its answer sent (a review
// suspected libmicrohttpd's timer would close the connection first).
TEST_F(HttpServerTest, AWholeAnswerOutlivesTheIdleTimeout) {
  const int fd = GetWithAOneSecondIdleTimeout("/slow_whole");
  const std::string got = Receive(fd, absl::Seconds(15), "done at last");
  EXPECT_THAT(got, StartsWith("HTTP/1.1 200"));
  EXPECT_THAT(got, HasSubstr("done at last"));
  ::close(fd);
}

// Regression: a stream switched its connection's idle timeout off for
// good, so a kept-alive connection that had streamed once was never closed.
TEST_F(HttpServerTest, AConnectionIdleAfterAStreamIsClosed) {
  const int fd = GetWithAOneSecondIdleTimeout("/stream");
  const std::string got = Receive(fd, absl::Seconds(30), "\r\n0\r\n\r\n");
  ASSERT_THAT(got, HasSubstr("data: 199\n\n"));
  EXPECT_TRUE(ClosedWithin(fd, absl::Seconds(5))) << "idle for 5 s after its stream";
  ::close(fd);
}

// Regression: a client that keeps its connection but stops reading held
// the stream's producer in Write for good (a generation and its KV
// blocks); now a queue that does not drain for the idle timeout ends it.
TEST_F(HttpServerTest, AClientThatStopsReadingEndsTheStream) {
  const int fd = GetWithAOneSecondIdleTimeout("/flood");
  const absl::Time end = absl::Now() + absl::Seconds(20);
  while (!flood_ended_ && absl::Now() < end) absl::SleepFor(absl::Milliseconds(20));
  EXPECT_TRUE(flood_ended_) << "the producer still waits for a reader that never reads";
  EXPECT_TRUE(ClosedWithin(fd, absl::Seconds(30))) << "and the connection is shut";
  ::close(fd);
}

// A client that goes away mid-stream ends the stream's producer: its
// writes fail and ClientGone turns true.
TEST_F(HttpServerTest, AClientThatHangsUpEndsTheStream) {
  Start();
  const int fd = ConnectLoopback(server_->port());
  Send(fd, "GET /stream HTTP/1.1\r\nHost: x\r\n\r\n");
  Receive(fd, absl::Seconds(10), "data: 3\n\n");
  ::close(fd);
  const absl::Time end = absl::Now() + absl::Seconds(5);
  while (!stream_ended_ && absl::Now() < end) absl::SleepFor(absl::Milliseconds(10));
  EXPECT_TRUE(stream_ended_) << "200 pieces at 50 ms would take 10 s";
  EXPECT_TRUE(stream_saw_gone_);
}

TEST_F(HttpServerTest, AnIdleConnectionIsClosed) {
  HttpServerOptions o;
  o.idle_timeout = absl::Seconds(1);
  Start(o);
  const int fd = ConnectLoopback(server_->port());
  Send(fd, "GET / HTTP/1.1\r\n");  // a head never finished
  EXPECT_TRUE(ClosedWithin(fd, absl::Seconds(5)));
  ::close(fd);
}

TEST_F(HttpServerTest, ARequestBeyondTheConnectionLimitGets503) {
  HttpServerOptions o;
  o.max_connections = 2;
  Start(o);
  const int a = ConnectLoopback(server_->port()), b = ConnectLoopback(server_->port());
  absl::SleepFor(absl::Milliseconds(200));  // both accepted
  const int c = ConnectLoopback(server_->port());
  Send(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n");
  const std::string busy = Receive(c, absl::Seconds(10), "try again");
  EXPECT_THAT(busy, StartsWith("HTTP/1.1 503"));
  EXPECT_THAT(busy, HasSubstr("too many connections: 3 are open, and this server takes 2"));
  EXPECT_TRUE(ClosedWithin(c, absl::Seconds(5))) << "the refused connection closes";
  ::close(a);
  ::close(b);
  ::close(c);
  absl::Time end = absl::Now() + absl::Seconds(5);
  std::string got;
  // Until the server has seen them close: 503, or closed at accept.
  while (!absl::StrContains(got, "GET /again") && absl::Now() < end) {
    got = Exchange(server_->port(), "GET /again HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
  }
  EXPECT_THAT(got, HasSubstr("GET /again")) << "room again once they closed";
}

TEST(HttpServerStartTest, AHostThatIsNoAddressIsRefused) {
  auto s = HttpServer::Start("not a host!", 0, {}, [](const HttpRequest&) { return HttpResponse(); });
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.status().message()), HasSubstr("is not a host name or address"));
}

}  // namespace
}  // namespace pipeserve
