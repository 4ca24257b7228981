#include "server/coordinator/metrics.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/promtool.h"

namespace pipeserve {
namespace {

using ::testing::HasSubstr;

TEST(MetricsTest, CountsRequestsByCodeAndBucketsLatency) {
  Metrics m;
  m.RecordInference("ex", absl::OkStatus(), absl::Milliseconds(3));
  m.RecordInference("ex", absl::OkStatus(), absl::Milliseconds(30));
  m.RecordInference("ex", absl::NotFoundError("x"), absl::Milliseconds(1));
  ModelInfo info;
  info.name = "ex";
  info.state = ModelState::kReady;
  info.replicas = 2;
  info.ready_replicas = 1;
  std::string text = m.Render({info});
  EXPECT_THAT(text, HasSubstr("pipeserve_inference_requests_total{model=\"ex\",code=\"OK\"} 2\n"));
  EXPECT_THAT(text, HasSubstr(
                        "pipeserve_inference_requests_total{model=\"ex\",code=\"NOT_FOUND\"} 1\n"));
  // 1 ms and 3 ms are under 5 ms; 30 ms is not.
  EXPECT_THAT(text, HasSubstr("pipeserve_inference_duration_seconds_bucket{model=\"ex\",le=\"0.005\"} 2\n"));
  EXPECT_THAT(text, HasSubstr("pipeserve_inference_duration_seconds_bucket{model=\"ex\",le=\"+Inf\"} 3\n"));
  EXPECT_THAT(text, HasSubstr("pipeserve_model_ready{model=\"ex\"} 1\n"));
  EXPECT_THAT(text, HasSubstr("pipeserve_model_replicas{model=\"ex\"} 2\n"));
  EXPECT_THAT(text, HasSubstr("pipeserve_model_ready_replicas{model=\"ex\"} 1\n"));
  EXPECT_EQ(PromtoolProblems(text), "");
}

TEST(MetricsTest, UploadsInProgressIsAGauge) {
  const std::string text = Metrics::RenderUploads(2);
  EXPECT_THAT(text, HasSubstr("# TYPE pipeserve_uploads_in_progress gauge\n"));
  EXPECT_THAT(text, HasSubstr("\npipeserve_uploads_in_progress 2\n"));
  EXPECT_EQ(PromtoolProblems(text), "");
}

// Regression: every model name a request made up became a series of its
// own, forever (a 200 MiB name was a 200 MiB label).
TEST(MetricsTest, UnknownModelsShareOneSeries) {
  Metrics m;
  for (int i = 0; i < 100; ++i) {
    m.RecordUnknownModelInference(absl::NotFoundError("x"), absl::Milliseconds(1));
  }
  std::string text = m.Render({});
  EXPECT_THAT(text, HasSubstr(
      "pipeserve_inference_requests_total{model=\"(unknown)\",code=\"NOT_FOUND\"} 100\n"));
  EXPECT_LT(text.size(), 3000u);
}

}  // namespace
}  // namespace pipeserve
