#include "server/transport/metrics_http.h"

#include <string>

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

}  // namespace
}  // namespace pipeserve
