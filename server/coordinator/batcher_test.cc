#include "server/coordinator/batcher.h"

#include <memory>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace pipeserve {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

// A model that echoes its input, logs the rows of every run, and holds
// runs while closed.
class Echo {
 public:
  Batcher::Run run() {
    return [this](const std::vector<Tensor>& in, absl::Time deadline, const std::function<bool()>&,
                  bool) -> absl::StatusOr<std::vector<Tensor>> {
      absl::MutexLock lock(&mu_);
      runs_.push_back(in[0].dim(0));
      for (int64_t i = 0; i < in[0].numel(); ++i) {
        if (in[0].data()[i] == poison_) {
          return absl::InvalidArgumentError(
              absl::StrCat("embedding id 5000 (at flat index ", i, ") is out of range"));
        }
      }
      ++running_;
      auto open = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return open_; };
      mu_.AwaitWithDeadline(absl::Condition(&open), deadline);
      --running_;
      if (!error_.ok()) return error_;
      return in;
    };
  }
  void Set(bool open) {
    absl::MutexLock lock(&mu_);
    open_ = open;
  }
  // Runs holding a value equal to `tag` fail, naming its flat index.
  void Poison(float tag) {
    absl::MutexLock lock(&mu_);
    poison_ = tag;
  }
  void Fail(absl::Status s) {
    absl::MutexLock lock(&mu_);
    error_ = std::move(s);
  }
  // Waits until `n` runs are held.
  bool WaitRunning(int n) {
    absl::MutexLock lock(&mu_);
    auto held = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return running_ >= n; };
    return mu_.AwaitWithTimeout(absl::Condition(&held), absl::Seconds(10));
  }
  std::vector<int64_t> runs() {
    absl::MutexLock lock(&mu_);
    return runs_;
  }

 private:
  absl::Mutex mu_;
  bool open_ ABSL_GUARDED_BY(mu_) = true;
  int running_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Status error_ ABSL_GUARDED_BY(mu_);
  float poison_ ABSL_GUARDED_BY(mu_) = -1;
  std::vector<int64_t> runs_ ABSL_GUARDED_BY(mu_);
};

// `rows` rows of width 2 whose values are `tag`.
Tensor Rows(int64_t rows, float tag, int64_t width = 2) {
  Tensor t = Tensor::Empty({rows, width});
  for (int64_t i = 0; i < t.numel(); ++i) t.data()[i] = tag;
  return t;
}

bool AllEqual(const Tensor& t, float tag) {
  for (int64_t i = 0; i < t.numel(); ++i) {
    if (t.data()[i] != tag) return false;
  }
  return true;
}

absl::Time Soon() { return absl::Now() + absl::Seconds(10); }


enum class Queue { kInOrder, kNot };

// Runs requests of `rows` each (tagged 1, 2, ...) on their own threads.
// With Queue::kInOrder each request is in the batcher's queue before the
// next starts, so they queue in this order; kNot: requests that run at once.
struct Clients {
  std::vector<std::thread> threads;
  std::vector<absl::StatusOr<std::vector<Tensor>>> out;
  Clients(Batcher& b, const std::vector<int64_t>& rows, absl::Duration timeout = absl::Seconds(10),
          const std::vector<int64_t>& widths = {}, Queue queue = Queue::kInOrder)
      : out(rows.size()) {
    const size_t before = b.queued();
    for (size_t i = 0; i < rows.size(); ++i) {
      // By value: the thread may start after the caller's vectors are gone.
      const int64_t r = rows[i], w = widths.empty() ? 2 : widths[i];
      threads.emplace_back([this, &b, i, r, w, timeout] {
        out[i] = b.Infer({Rows(r, i + 1.0f, w)}, absl::Now() + timeout, nullptr);
      });
      if (queue == Queue::kNot) continue;
      const absl::Time until = absl::Now() + absl::Seconds(10);
      while (b.queued() < before + i + 1 && absl::Now() < until) {
        absl::SleepFor(absl::Microseconds(200));  // polls the queue, no guess
      }
      EXPECT_GE(b.queued(), before + i + 1) << "request " << i << " never queued";
    }
  }
  void Join() {
    for (auto& t : threads) t.join();
  }
};

// Makes the model busy: one request of `rows` runs, held by `echo`
// (closed) until echo.Set(true).
std::unique_ptr<Clients> Busy(Batcher& b, Echo& echo, int64_t rows = 1) {
  echo.Set(false);
  auto busy = std::make_unique<Clients>(b, std::vector<int64_t>{rows}, absl::Seconds(10),
                                        std::vector<int64_t>{}, Queue::kNot);
  EXPECT_TRUE(echo.WaitRunning(1));
  return busy;
}

TEST(BatcherTest, ARequestToAnIdleModelRunsAloneAtOnce) {
  Echo echo;
  Batcher b({64, absl::ZeroDuration(), 2}, true, echo.run());
  auto out = b.Infer({Rows(3, 7)}, Soon(), nullptr);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_TRUE(AllEqual((*out)[0], 7));
  EXPECT_THAT(echo.runs(), ElementsAre(3));
  EXPECT_EQ(b.merged_requests(), 0u);
}

TEST(BatcherTest, RequestsQueuedWhileTheModelIsBusyRunMergedAndGetTheirOwnRows) {
  Echo echo;
  Batcher b({64, absl::ZeroDuration(), 1}, true, echo.run());
  auto first = Busy(b, echo, 2);
  Clients queued(b, {1, 3, 1, 2});
  echo.Set(true);
  first->Join();
  queued.Join();
  EXPECT_THAT(echo.runs(), ElementsAre(2, 7)) << "the four queued ones ran as one";
  for (size_t i = 0; i < queued.out.size(); ++i) {
    ASSERT_TRUE(queued.out[i].ok()) << queued.out[i].status();
    EXPECT_EQ((*queued.out[i])[0].dim(0), std::vector<int64_t>({1, 3, 1, 2})[i]);
    EXPECT_TRUE(AllEqual((*queued.out[i])[0], i + 1.0f)) << "request " << i;
  }
  EXPECT_EQ(b.merged_requests(), 4u);
  EXPECT_EQ(b.batches(), 2u);
}

TEST(BatcherTest, AMergedRequestKeepsToMaxRowsAndToOneShape) {
  Echo echo;
  Batcher b({4, absl::ZeroDuration(), 1}, true, echo.run());
  auto first = Busy(b, echo);
  // 3 and 1 fit 4 rows; 2 waits; the width-3 one never merges with them.
  Clients queued(b, {3, 2, 1, 1}, absl::Seconds(10), {2, 2, 2, 3});
  echo.Set(true);
  first->Join();
  queued.Join();
  EXPECT_THAT(echo.runs(), ElementsAre(1, 4, 2, 1));
  for (const auto& o : queued.out) EXPECT_TRUE(o.ok()) << o.status();
  // As many rows as max_rows or more: alone, never queued.
  auto busy = Busy(b, echo);
  Clients big(b, {4}, absl::Seconds(10), {}, Queue::kNot);
  ASSERT_TRUE(echo.WaitRunning(2)) << "ran beside the busy one";
  echo.Set(true);
  busy->Join();
  big.Join();
}

TEST(BatcherTest, AQueuedRequestWhoseDeadlinePassesIsNotRun) {
  Echo echo;
  Batcher b({64, absl::ZeroDuration(), 1}, true, echo.run());
  auto first = Busy(b, echo);
  auto late = b.Infer({Rows(1, 9)}, absl::Now() + absl::Milliseconds(50), nullptr);
  EXPECT_EQ(late.status().code(), absl::StatusCode::kDeadlineExceeded) << late.status();
  EXPECT_THAT(std::string(late.status().message()), HasSubstr("waiting to be batched"));
  echo.Set(true);
  first->Join();
  EXPECT_THAT(echo.runs(), ElementsAre(1)) << "the late request never ran";
}

TEST(BatcherTest, AMergedRequestsErrorIsEveryMembers) {
  Echo echo;
  Batcher b({64, absl::ZeroDuration(), 1}, true, echo.run());
  auto first = Busy(b, echo);
  Clients queued(b, {1, 1});
  echo.Fail(absl::UnavailableError("a stage went away"));
  echo.Set(true);
  first->Join();
  queued.Join();
  for (const auto& o : queued.out) {
    EXPECT_EQ(o.status().code(), absl::StatusCode::kUnavailable) << o.status();
  }
}

// Regression: a merged run that failed handed its error to every member
// (23 of 60 valid requests failed with another client's "embedding id 5000
// (at flat index 16) is out of range"). A merged run that fails for a
// reason other than UNAVAILABLE or a deadline runs each member alone, so
// only the bad request fails, with its own positions.
TEST(BatcherTest, AMergedRunThatFailsRunsEachMemberAloneSoOnlyTheBadOneFails) {
  Echo echo;
  Batcher b({64, absl::ZeroDuration(), 1}, true, echo.run());
  auto first = Busy(b, echo);
  echo.Poison(2);  // the second queued request's rows
  Clients queued(b, {1, 2, 1});
  echo.Set(true);
  first->Join();
  queued.Join();
  EXPECT_THAT(echo.runs(), ElementsAre(1, 4, 1, 2, 1)) << "merged, then each alone";
  ASSERT_TRUE(queued.out[0].ok()) << queued.out[0].status();
  EXPECT_TRUE(AllEqual((*queued.out[0])[0], 1));
  EXPECT_EQ(queued.out[1].status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(queued.out[1].status().message()), HasSubstr("at flat index 0)"))
      << "its own position, not the merged request's";
  ASSERT_TRUE(queued.out[2].ok()) << queued.out[2].status();
  EXPECT_TRUE(AllEqual((*queued.out[2])[0], 3));
}

TEST(BatcherTest, WithAQueueDelayRequestsToAnIdleModelWaitForCompany) {
  Echo echo;
  // 3 rows of 64: only the delay's timer sends them, after 2 s, long
  // enough on any machine for all three to have arrived.
  Batcher b({64, absl::Seconds(2), 2}, true, echo.run());
  // Not waited into the queue one by one: a batcher without the delay
  // sends the first alone.
  const absl::Time start = absl::Now();
  Clients three(b, {1, 1, 1}, absl::Seconds(30), {}, Queue::kNot);
  three.Join();
  EXPECT_GE(absl::Now() - start, absl::Seconds(2)) << "sent before the delay ran out";
  EXPECT_THAT(echo.runs(), ElementsAre(3));
  for (const auto& o : three.out) EXPECT_TRUE(o.ok()) << o.status();
}

TEST(BatcherTest, OffOrUnmergeableEveryRequestRunsAloneAtOnce) {
  for (auto [rows, mergeable] : {std::pair<int64_t, bool>{0, true}, {64, false}}) {
    Echo echo;
    Batcher b({rows, absl::ZeroDuration(), 1}, mergeable, echo.run());
    echo.Set(false);
    Clients two(b, {1, 1}, absl::Seconds(10), {}, Queue::kNot);
    ASSERT_TRUE(echo.WaitRunning(2)) << "both ran at once";
    echo.Set(true);
    two.Join();
    EXPECT_THAT(echo.runs(), ElementsAre(1, 1));
  }
}

}  // namespace
}  // namespace pipeserve
