// What an operator sees of a served model, end to end: every stage
// server's Prometheus metrics (GET /metrics, checked by promtool) account
// for each microbatch each stage computed, the bytes that crossed, and
// where the time went.
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "gtest/gtest.h"
#include "client/client.h"
#include "server/testing/temp_dir.h"
#include "tests/cluster.h"
#include "tests/fixtures.h"
#include "tests/http_get.h"
#include "tests/load.h"
#include "tests/promtool.h"

namespace pipeserve {
namespace {

// The value of sample `name{labels}` in exposition `text`, or -1.
double Sample(const std::string& text, const std::string& name, const std::string& labels) {
  const std::string key = absl::StrCat("\n", name, "{", labels, "} ");
  size_t at = text.find(key);
  if (at == std::string::npos) return -1;
  at += key.size();
  double v = -1;
  if (!absl::SimpleAtod(text.substr(at, text.find('\n', at) - at), &v)) return -1;
  return v;
}

// The labels of stage `stage` (replica 0) of model "m"'s deployment.
std::string StageLabels(uint64_t deployment, int stage) {
  return absl::StrCat("model=\"m\",deployment=\"", absl::Hex(deployment, absl::kZeroPad16),
                      "\",stage=\"", stage, "\",replica=\"0\"");
}

// Whether every stage of the 4 (stage i on server i mod 2) has sent all
// `frames` and has none queued.
bool AllSent(const std::vector<std::string>& texts, uint64_t deployment, double frames) {
  for (int stage = 0; stage < 4; ++stage) {
    const std::string& text = texts[stage % 2];
    const std::string labels = StageLabels(deployment, stage);
    if (Sample(text, "pipeserve_stage_frames_sent_total", labels) != frames ||
        Sample(text, "pipeserve_stage_queue_depth", labels) != 0) {
      return false;
    }
  }
  return true;
}

// Each server's /metrics page ("" where it did not answer 200 OK).
std::vector<std::string> Scrape(const std::vector<std::unique_ptr<StageServerProcess>>& servers) {
  std::vector<std::string> texts;
  for (const auto& s : servers) {
    std::string got = HttpGet(s->metrics_port(), "/metrics");
    const size_t body = got.find("\r\n\r\n");
    texts.push_back(got.find("200 OK") == std::string::npos || body == std::string::npos
                        ? std::string()
                        : got.substr(body + 4));
  }
  return texts;
}

// The pages, read again every 50 ms until `settled` holds of them or
// `limit` has passed.
template <typename Settled>
std::vector<std::string> ScrapeUntil(const std::vector<std::unique_ptr<StageServerProcess>>& servers,
                                     Settled settled, absl::Duration limit) {
  std::vector<std::string> texts = Scrape(servers);
  for (absl::Time until = absl::Now() + limit; !settled(texts) && absl::Now() < until;) {
    absl::SleepFor(absl::Milliseconds(50));
    texts = Scrape(servers);
  }
  return texts;
}

TEST(ObservabilityTest, StageServersExportMetricsThatAccountForEveryMicrobatch) {
  auto dir = MakeFixtures({"example_code"}, 16);
  ASSERT_TRUE(dir.ok()) << dir.status();
  auto f = LoadFixture(*dir, "example_code");
  ASSERT_TRUE(f.ok()) << f.status();
  const std::string token = absl::StrCat("observability-test-token-", ::getpid());
  std::vector<std::unique_ptr<StageServerProcess>> servers;
  std::vector<std::string> addresses;
  for (int i = 0; i < 2; ++i) {
    auto s = StageServerProcess::Start(token);
    ASSERT_TRUE(s.ok()) << s.status();
    ASSERT_GT((*s)->metrics_port(), 0);
    addresses.push_back((*s)->address());
    servers.push_back(*std::move(s));
  }
  auto c = CoordinatorProcess::Start(
      {TestTempDir("observability_repo"),
       {"--launcher=static", "--stage_servers=" + absl::StrJoin(addresses, ",")},
       token});
  ASSERT_TRUE(c.ok()) << c.status();
  auto want = UploadAndAnswer((*c)->address(), "m", *f);  // 1 request
  ASSERT_TRUE(want.ok()) << want.status();
  auto client = Client::Connect((*c)->address());
  ASSERT_TRUE(client.ok());
  for (int i = 0; i < 4; ++i) ASSERT_TRUE((*client)->Infer("m", NamedInputs(*f)).ok());
  const GetPlanResponse plan = *(*client)->GetPlan("m");
  ASSERT_EQ(plan.plan().stages_size(), 4);
  const double frames = 5.0 * plan.microbatches();  // 5 requests

  auto labels_of = [&](int stage) { return StageLabels(plan.deployment(), stage); };
  // A stage counts a frame sent once its send returned, which may be after
  // the next stage (and the client) had it: read until every stage has
  // counted all, or 10 s.
  std::vector<std::string> texts = ScrapeUntil(
      servers, [&](const auto& t) { return AllSent(t, plan.deployment(), frames); },
      absl::Seconds(10));
  for (const std::string& text : texts) {
    ASSERT_FALSE(text.empty()) << "a stage server's /metrics did not answer 200 OK";
    EXPECT_EQ(PromtoolProblems(text), "");
  }
  for (int stage = 0; stage < 4; ++stage) {
    // Stage i is on server i mod 2 (the static launcher's placement).
    const std::string& text = texts[stage % 2];
    const std::string labels = labels_of(stage);
    SCOPED_TRACE(labels);
    EXPECT_EQ(Sample(text, "pipeserve_stage_frames_received_total", labels), frames);
    EXPECT_EQ(Sample(text, "pipeserve_stage_frames_computed_total", labels), frames);
    EXPECT_EQ(Sample(text, "pipeserve_stage_frames_sent_total", labels), frames);
    EXPECT_GT(Sample(text, "pipeserve_stage_received_bytes_total", labels), 0);
    EXPECT_GT(Sample(text, "pipeserve_stage_sent_bytes_total", labels), 0);
    EXPECT_GT(Sample(text, "pipeserve_stage_compute_seconds_total", labels), 0);
    EXPECT_GT(Sample(text, "pipeserve_stage_weight_bytes", labels), 0);
    EXPECT_EQ(Sample(text, "pipeserve_stage_queue_depth", labels), 0);
    EXPECT_EQ(Sample(text, "pipeserve_stage_downstream_up", labels), 1);
  }
}

}  // namespace
}  // namespace pipeserve
