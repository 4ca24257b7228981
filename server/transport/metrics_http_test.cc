#include "server/transport/metrics_http.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/time/clock.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/http_get.h"

namespace pipeserve {
namespace {

using ::testing::HasSubstr;

TEST(MetricsHttpServerTest, ServesTheTextOverHttpAnd404sOtherPaths) {
  int scrapes = 0;
  MetricsHttpServer http([&scrapes] {
    return "pipeserve_inference_requests_total{model=\"ex\",code=\"OK\"} " +
           std::to_string(++scrapes) + "\n";
  });
  ASSERT_TRUE(http.Start("127.0.0.1", 0).ok());
  std::string got = HttpGet(http.port(), "/metrics");
  EXPECT_THAT(got, HasSubstr("HTTP/1.1 200 OK"));
  EXPECT_THAT(got, HasSubstr("text/plain; version=0.0.4"));
  EXPECT_THAT(got, HasSubstr("pipeserve_inference_requests_total{model=\"ex\",code=\"OK\"} 1"));
  // Every scrape renders afresh.
  EXPECT_THAT(HttpGet(http.port(), "/metrics"), HasSubstr("code=\"OK\"} 2"));
  EXPECT_THAT(HttpGet(http.port(), "/other"), HasSubstr("404 Not Found"));
}

// A client that connects and then sends its request head one byte every
// 100 ms: too slow ever to finish it.
class SlowClient {
 public:
  explicit SlowClient(int port) : fd_(ConnectLoopback(port)) {
    thread_ = std::thread([this] {
      const std::string head = "GET /metrics HTTP/1.1\r\nX-Slow: " + std::string(1 << 20, 'a');
      for (size_t i = 0; i < head.size() && !stop_; ++i) {
        if (::send(fd_, &head[i], 1, MSG_NOSIGNAL) != 1) break;
        ++sent_;
        absl::SleepFor(absl::Milliseconds(100));
      }
    });
  }
  ~SlowClient() {
    stop_ = true;
    thread_.join();
    if (fd_ >= 0) ::close(fd_);
  }
  bool connected() const { return fd_ >= 0; }
  int sent() const { return sent_; }

 private:
  const int fd_;
  std::atomic<bool> stop_{false};
  std::atomic<int> sent_{0};
  std::thread thread_;
};

// Regression: one thread read each client's request head in turn, waiting
// up to 2 s per read, so a client sending a byte a second held the port:
// scrapes waited behind it, and so did the server's shutdown (the
// coordinator stayed 21 s past SIGTERM).
TEST(MetricsHttpServerTest, ASlowClientHoldsUpNeitherScrapesNorShutdown) {
  auto http = std::make_unique<MetricsHttpServer>([] { return std::string("up 1\n"); });
  ASSERT_TRUE(http->Start("127.0.0.1", 0).ok());
  SlowClient slow(http->port());
  ASSERT_TRUE(slow.connected());
  const absl::Time until = absl::Now() + absl::Seconds(10);
  while (slow.sent() < 3 && absl::Now() < until) absl::SleepFor(absl::Milliseconds(10));
  ASSERT_GE(slow.sent(), 3) << "the slow client's first bytes did not go out in 10 s";
  absl::Time start = absl::Now();
  EXPECT_THAT(HttpGet(http->port(), "/metrics", "127.0.0.1", 5000), HasSubstr("up 1"));
  EXPECT_LT(absl::Now() - start, absl::Seconds(1)) << "the scrape waited for the slow client";
  start = absl::Now();
  http.reset();
  EXPECT_LT(absl::Now() - start, absl::Seconds(1)) << "shutdown waited for the slow client";
}

// Connections that send nothing are closed after a while, and past the
// limit are closed at once: they never crowd out a scrape.
TEST(MetricsHttpServerTest, ManyIdleConnectionsDoNotCrowdOutAScrape) {
  MetricsHttpServer http([] { return std::string("up 1\n"); });
  ASSERT_TRUE(http.Start("127.0.0.1", 0).ok());
  std::vector<int> idle;
  for (int i = 0; i < 100; ++i) {
    const int fd = ConnectLoopback(http.port());
    ASSERT_NE(fd, -1) << "connection " << i;
    idle.push_back(fd);
  }
  absl::Time start = absl::Now();
  EXPECT_THAT(HttpGet(http.port(), "/metrics", "127.0.0.1", 5000), HasSubstr("up 1"));
  EXPECT_LT(absl::Now() - start, absl::Seconds(2));
  for (int fd : idle) ::close(fd);
}

// Regression: --host=localhost or ::1 made the coordinator exit ("metrics:
// bad IPv4 address \"localhost\"").
TEST(MetricsHttpServerTest, ListensOnHostNamesAndIpv6Addresses) {
  MetricsHttpServer by_name([] { return std::string("up 1\n"); });
  absl::Status s = by_name.Start("localhost", 0);
  ASSERT_TRUE(s.ok()) << s;
  EXPECT_THAT(HttpGet(by_name.port(), "/metrics"), HasSubstr("up 1"));
  // IPv6 where this machine has its loopback (a test host without it
  // could not serve ::1 anyway).
  const int probe = ::socket(AF_INET6, SOCK_STREAM, 0);
  sockaddr_in6 lo{};
  lo.sin6_family = AF_INET6;
  lo.sin6_addr = in6addr_loopback;
  const bool has_v6 = probe >= 0 && ::bind(probe, reinterpret_cast<sockaddr*>(&lo), sizeof lo) == 0;
  if (probe >= 0) ::close(probe);
  if (has_v6) {
    MetricsHttpServer v6([] { return std::string("up 1\n"); });
    s = v6.Start("::1", 0);
    ASSERT_TRUE(s.ok()) << s;
    EXPECT_THAT(HttpGet(v6.port(), "/metrics", "::1"), HasSubstr("up 1"));
  }
  MetricsHttpServer bad([] { return std::string(); });
  EXPECT_EQ(bad.Start("not a host", 0).code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace pipeserve
