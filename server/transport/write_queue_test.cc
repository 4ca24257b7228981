#include "server/transport/write_queue.h"

#include <atomic>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace pipeserve {
namespace {

using ::testing::HasSubstr;

grpc::ByteBuffer Message(const std::string& text) {
  grpc::Slice s(text.data(), text.size());
  return grpc::ByteBuffer(&s, 1);
}

std::string Text(const grpc::ByteBuffer* bb) {
  grpc::Slice s;
  EXPECT_TRUE(bb->DumpToSingleSlice(&s).ok());
  return std::string(reinterpret_cast<const char*>(s.begin()), s.size());
}

// Records what a stream was asked to write; the test plays gRPC and says
// when each write is done.
struct FakeStream {
  explicit FakeStream(size_t capacity = 2, size_t merge_bytes = 0)
      : queue(
            capacity,
            [this](const grpc::ByteBuffer* m) {
              absl::MutexLock lock(&mu);
              started.push_back(Text(m));
            },
            nullptr, merge_bytes) {}
  absl::Mutex mu;
  std::vector<std::string> started ABSL_GUARDED_BY(mu);
  WriteQueue queue;
  std::vector<std::string> Started() {
    absl::MutexLock lock(&mu);
    return started;
  }
};

TEST(WriteQueueTest, OneWriteInFlightAndTheRestInOrder) {
  FakeStream s;
  absl::Time later = absl::Now() + absl::Seconds(5);
  ASSERT_TRUE(s.queue.Push(Message("a"), later).ok());
  ASSERT_TRUE(s.queue.Push(Message("b"), later).ok());
  ASSERT_TRUE(s.queue.Push(Message("c"), later).ok());
  EXPECT_EQ(s.Started(), std::vector<std::string>({"a"}));
  EXPECT_EQ(s.queue.size(), 2u);
  s.queue.WriteDone(true);
  EXPECT_EQ(s.Started(), std::vector<std::string>({"a", "b"}));
  s.queue.WriteDone(true);
  s.queue.WriteDone(true);
  EXPECT_EQ(s.Started(), std::vector<std::string>({"a", "b", "c"}));
  // Idle again: the next push starts at once.
  ASSERT_TRUE(s.queue.Push(Message("d"), later).ok());
  EXPECT_EQ(s.Started().back(), "d");
}

TEST(WriteQueueTest, MessagesWaitingBehindAWriteGoOutAsOneUpToTheMergeLimit) {
  FakeStream s(8, /*merge_bytes=*/10);
  absl::Time later = absl::Now() + absl::Seconds(5);
  for (const char* m : {"aaa", "bb", "cc", "dddd", "eeeeeeeeeeee", "f"}) {
    ASSERT_TRUE(s.queue.Push(Message(m), later).ok());
  }
  for (int i = 0; i < 4; ++i) s.queue.WriteDone(true);
  // "aaa" went at once; then what waited, in order, in writes of at most
  // 10 bytes; the 12-byte message alone, though it is over the limit.
  EXPECT_EQ(s.Started(), std::vector<std::string>({"aaa", "bbccdddd", "eeeeeeeeeeee", "f"}));
  EXPECT_EQ(s.queue.writes(), 4u);
  EXPECT_EQ(s.queue.messages_written(), 6u);
}

// A message of several frames counts each toward kMaxMerged, so a merged
// write never holds more frames than a receiver takes in one message.
TEST(WriteQueueTest, MergingCountsTheFramesAMessageHolds) {
  FakeStream s(8, /*merge_bytes=*/1 << 20);
  absl::Time later = absl::Now() + absl::Seconds(5);
  ASSERT_TRUE(s.queue.Push(Message("a"), later).ok());
  ASSERT_TRUE(s.queue.Push(Message("b"), later, WriteQueue::kMaxMerged - 2).ok());
  ASSERT_TRUE(s.queue.Push(Message("c"), later, 2).ok());
  ASSERT_TRUE(s.queue.Push(Message("d"), later).ok());
  ASSERT_TRUE(s.queue.Push(Message("e"), later).ok());
  ASSERT_TRUE(s.queue.Push(Message("f"), later, WriteQueue::kMaxMerged + 1).ok());
  for (int i = 0; i < 4; ++i) s.queue.WriteDone(true);
  // b and c make kMaxMerged frames; d and e go next; f, over the limit
  // alone, goes by itself.
  EXPECT_EQ(s.Started(), std::vector<std::string>({"a", "bc", "de", "f"}));
}

// Regression: FrameSender::Send waited on a full queue with no deadline, so
// requests blocked behind a wedged stage outlived their deadlines and
// SIGTERM hung behind them.
TEST(WriteQueueTest, PushOnAFullQueueGivesUpAtTheDeadline) {
  FakeStream s;
  absl::Time later = absl::Now() + absl::Seconds(5);
  for (const char* m : {"a", "b", "c"}) ASSERT_TRUE(s.queue.Push(Message(m), later).ok());
  absl::Time start = absl::Now();
  absl::Status st = s.queue.Push(Message("d"), start + absl::Milliseconds(100));
  absl::Duration waited = absl::Now() - start;
  EXPECT_EQ(st.code(), absl::StatusCode::kDeadlineExceeded) << st;
  EXPECT_GE(waited, absl::Milliseconds(90));
  EXPECT_LT(waited, absl::Seconds(3));
  EXPECT_EQ(s.queue.size(), 2u) << "the late message must not be queued";
}

TEST(WriteQueueTest, CloseWakesABlockedPushWithTheReason) {
  FakeStream s;
  absl::Time later = absl::Now() + absl::Seconds(30);
  for (const char* m : {"a", "b", "c"}) ASSERT_TRUE(s.queue.Push(Message(m), later).ok());
  absl::Status blocked;
  absl::Notification done;
  std::thread t([&] {
    blocked = s.queue.Push(Message("d"), absl::InfiniteFuture());
    done.Notify();
  });
  EXPECT_FALSE(done.WaitForNotificationWithTimeout(absl::Milliseconds(50)));
  s.queue.Close("the stage was unloaded");
  t.join();
  EXPECT_EQ(blocked.code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(blocked.message()), HasSubstr("the stage was unloaded"));
  EXPECT_TRUE(s.queue.closed());
  EXPECT_EQ(s.queue.Push(Message("e"), later).code(), absl::StatusCode::kUnavailable);
}

TEST(WriteQueueTest, AFailedWriteClosesTheQueue) {
  FakeStream s;
  absl::Time later = absl::Now() + absl::Seconds(5);
  ASSERT_TRUE(s.queue.Push(Message("a"), later).ok());
  ASSERT_TRUE(s.queue.Push(Message("b"), later).ok());
  s.queue.WriteDone(false);
  EXPECT_EQ(s.Started(), std::vector<std::string>({"a"})) << "nothing starts after a failure";
  absl::Status st = s.queue.Push(Message("c"), later);
  EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(st.message()), HasSubstr("stream broke"));
}

TEST(WriteQueueTest, ManyWritersLoseNothing) {
  absl::Mutex mu;
  std::vector<std::string> written;
  int to_complete = 0;  // writes started and not yet done
  bool stop = false;
  WriteQueue queue(3, [&](const grpc::ByteBuffer* m) {
    absl::MutexLock lock(&mu);
    written.push_back(Text(m));
    ++to_complete;
  });
  // Completes writes on its own thread, as gRPC does (never inline).
  std::thread completer([&] {
    while (true) {
      {
        absl::MutexLock lock(&mu);
        auto ready = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) { return stop || to_complete > 0; };
        mu.Await(absl::Condition(&ready));
        if (to_complete == 0) return;
        --to_complete;
      }
      queue.WriteDone(true);
    }
  });
  std::vector<std::thread> writers;
  for (int w = 0; w < 4; ++w) {
    writers.emplace_back([&, w] {
      for (int i = 0; i < 50; ++i) {
        EXPECT_TRUE(queue.Push(Message(absl::StrCat(w, ":", i)), absl::InfiniteFuture()).ok());
      }
    });
  }
  for (auto& t : writers) t.join();
  {
    absl::MutexLock lock(&mu);
    auto all = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) { return written.size() == 200; };
    EXPECT_TRUE(mu.AwaitWithTimeout(absl::Condition(&all), absl::Seconds(10)));
    stop = true;
  }
  completer.join();
  absl::MutexLock lock(&mu);
  EXPECT_EQ(written.size(), 200u);
}

// The owner drops its hold (client) or finishes (server) in on_closed, so
// it must not run while a StartWrite is still under way.
TEST(WriteQueueTest, OnClosedWaitsForAStartUnderWayAndRunsOnce) {
  absl::Notification in_start, let_start_finish;
  std::atomic<int> closed_calls{0};
  std::atomic<bool> start_returned{false};
  WriteQueue queue(
      2,
      [&](const grpc::ByteBuffer*) {
        in_start.Notify();
        let_start_finish.WaitForNotification();
        start_returned = true;
      },
      [&] {
        EXPECT_TRUE(start_returned.load()) << "on_closed ran during a StartWrite";
        ++closed_calls;
      });
  std::thread writer([&] {
    EXPECT_TRUE(queue.Push(Message("a"), absl::InfiniteFuture()).ok());
  });
  in_start.WaitForNotification();
  queue.Close("closing");
  EXPECT_EQ(closed_calls.load(), 0);
  let_start_finish.Notify();
  writer.join();
  EXPECT_EQ(closed_calls.load(), 1);
  queue.WriteDone(false);  // the write's completion after the close
  queue.Close("again");
  EXPECT_EQ(closed_calls.load(), 1);
}

}  // namespace
}  // namespace pipeserve
