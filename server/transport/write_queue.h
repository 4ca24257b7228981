// The write side of one gRPC stream in the callback API, where only one
// write may be in flight: messages wait in a bounded queue and the next
// starts when the last is done. Both ends of pipeserve's frame streams use
// it: the client writing frames into a stage (FrameSender) and the stage
// server writing results back to the coordinator.
//
//   WriteQueue queue_{8, [this](const grpc::ByteBuffer* m) { StartWrite(m); }};
//   RETURN_IF_ERROR(queue_.Push(std::move(message), deadline));  // any thread
//   void OnWriteDone(bool ok) override { queue_.WriteDone(ok); }
//   void OnDone(...) override { queue_.Close("the stream ended"); ... }
//
// Push blocks while the queue is full: that is how backpressure reaches the
// writer, and the deadline bounds how long it waits. `start_write` runs
// without the queue's lock (StartWrite may write to the socket on the
// calling thread). `on_closed` runs once the queue is closed and no
// StartWrite is under way, after which none starts again: then the owner
// may Finish (server) or drop its hold (client).
//
// With `merge_bytes` set, the messages waiting when a write starts go out
// together as one message (their slices, not copied) up to that many bytes
// in all: a burst of small frames for one stream then costs one write and
// one completion instead of one each. The receiver must split them (frame
// streams: FramesFromByteBuffer).
#ifndef PIPESERVE_SERVER_TRANSPORT_WRITE_QUEUE_H_
#define PIPESERVE_SERVER_TRANSPORT_WRITE_QUEUE_H_

#include <cstddef>
#include <deque>
#include <functional>
#include <string>

#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "grpcpp/support/byte_buffer.h"

namespace pipeserve {

class WriteQueue {
 public:
  // At most `capacity` (at least 1) messages wait besides the one being
  // written. `start_write` starts writing a message, which stays valid until
  // the matching WriteDone.
  // `on_closed`, if set, runs once when the queue is closed and no write is
  // being started (outside the lock).
  // Messages queued behind a write are merged into one of at most
  // `merge_bytes` bytes (0: never merged; one message larger than it goes
  // alone).
  WriteQueue(size_t capacity, std::function<void(const grpc::ByteBuffer*)> start_write,
             std::function<void()> on_closed = nullptr, size_t merge_bytes = 0);

  // Most parts (a message's `parts`: the frames it holds) merged into one
  // write. A message of more parts than this goes alone.
  static constexpr size_t kMaxMerged = 64;

  // Queues `message`, waiting while the queue is full. kDeadlineExceeded if
  // `deadline` passes first (the message is not queued), kUnavailable once
  // the queue is closed (with the reason). Thread-safe.
  // `parts`: how many units (frames) the message holds, for kMaxMerged.
  absl::Status Push(grpc::ByteBuffer message, absl::Time deadline, size_t parts = 1);

  // Call from OnWriteDone: releases the written message and starts the
  // next. `ok` false (the stream broke) closes the queue.
  void WriteDone(bool ok);

  // Wakes every waiting Push and fails later ones with kUnavailable naming
  // `reason`; queued messages that were not started are dropped. The first
  // reason given sticks. Thread-safe.
  void Close(const std::string& reason);

  // Whether the queue is closed.
  bool closed() const;
  // Messages waiting (not counting the one being written).
  size_t size() const;
  // Writes started, and the messages they carried (more than the writes
  // when messages were merged).
  uint64_t writes() const;
  uint64_t messages_written() const;
  // Messages that were taken by Push but never fully written: dropped from
  // the queue by a close, or in a write that failed.
  uint64_t dropped() const;

 private:
  const size_t capacity_;
  const std::function<void(const grpc::ByteBuffer*)> start_write_;
  const std::function<void()> on_closed_;
  const size_t merge_bytes_;

  mutable absl::Mutex mu_;
  struct Queued {
    grpc::ByteBuffer message;
    size_t parts;
  };
  std::deque<Queued> queue_ ABSL_GUARDED_BY(mu_);
  // The message being written: set under the lock before its start, read
  // by gRPC until its WriteDone, which clears it under the lock.
  grpc::ByteBuffer current_;
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  int starting_ ABSL_GUARDED_BY(mu_) = 0;  // StartWrite calls under way (0 or 1)
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
  bool closed_reported_ ABSL_GUARDED_BY(mu_) = false;
  std::string reason_ ABSL_GUARDED_BY(mu_);
  uint64_t writes_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t dropped_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t messages_written_ ABSL_GUARDED_BY(mu_) = 0;

  // Moves the front message (merged with those behind it, as merge_bytes
  // allows) into current_.
  void TakeNext() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // Starts writing current_, outside the lock.
  void StartCurrent();
  // Runs on_closed once the queue is closed and no start is under way.
  void MaybeFireClosed();
};

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_TRANSPORT_WRITE_QUEUE_H_
