#include "server/coordinator/admission.h"

#include <optional>
#include <thread>
#include <utility>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace pipeserve {
namespace {

using ::testing::HasSubstr;

TEST(AdmissionQueueTest, BeyondTheLimitARequestIsRefusedNamingIt) {
  AdmissionQueue q(2);
  auto a = q.Admit("m");
  auto b = q.Admit("m");
  ASSERT_TRUE(a.ok() && b.ok());
  auto c = q.Admit("m");
  EXPECT_EQ(c.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(c.status().message()), HasSubstr("model \"m\" has 2 requests"));
  EXPECT_THAT(std::string(c.status().message()), HasSubstr("--max_queued_requests"));
  EXPECT_TRUE(q.Admit("other").ok()) << "each model has its own limit";
  EXPECT_EQ(q.Admitted("m"), 2);
}

TEST(AdmissionQueueTest, ATicketHoldsItsPlaceUntilDestroyedAndMovesWithIt) {
  AdmissionQueue q(1);
  std::optional<AdmissionQueue::Ticket> held;
  {
    auto t = q.Admit("m");
    ASSERT_TRUE(t.ok());
    held.emplace(std::move(*t));  // the moved-from ticket releases nothing
  }
  EXPECT_EQ(q.Admitted("m"), 1);
  EXPECT_FALSE(q.Admit("m").ok());
  held.reset();
  EXPECT_EQ(q.Admitted("m"), 0);
  EXPECT_TRUE(q.Admit("m").ok());
}

TEST(AdmissionQueueTest, WithNoLimitEveryRequestIsAdmitted) {
  AdmissionQueue q(0);
  std::vector<AdmissionQueue::Ticket> tickets;
  for (int i = 0; i < 1000; ++i) tickets.push_back(*q.Admit("m"));
  EXPECT_EQ(q.Admitted("m"), 1000);
}

TEST(AdmissionQueueTest, WaitIdleReturnsOnceTheLastTicketGoes) {
  AdmissionQueue q(4);
  std::optional<AdmissionQueue::Ticket> t(*q.Admit("m"));
  EXPECT_FALSE(q.WaitIdle(absl::Now() + absl::Milliseconds(20)));
  std::thread release([&] {
    absl::SleepFor(absl::Milliseconds(20));
    t.reset();
  });
  EXPECT_TRUE(q.WaitIdle(absl::Now() + absl::Seconds(10)));
  release.join();
}

}  // namespace
}  // namespace pipeserve
