// Ends calls that go quiet: a client stream that sends nothing for
// `timeout`, with nothing of its own in flight, is cancelled, once. The
// coordinator's uploads and ModelStreamInfer streams are watched by one
// each, so an idle client cannot hold a handler thread for good.
//
//   IdleWatchdog watchdog(absl::Seconds(30));
//   IdleWatchdog::Watch watch(&watchdog, [ctx] { ctx->TryCancel(); });
//   while (reader->Read(&req)) { watch.Touch(); ... }
//   if (watch.cancelled()) return grpc::Status(grpc::StatusCode::CANCELLED, ...);
#ifndef PIPESERVE_SERVER_TRANSPORT_IDLE_WATCHDOG_H_
#define PIPESERVE_SERVER_TRANSPORT_IDLE_WATCHDOG_H_

#include <functional>
#include <list>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace pipeserve {

class IdleWatchdog {
 private:
  struct Entry {
    std::function<void()> cancel;
    std::function<bool()> busy;
    absl::Time last_active;
    bool cancelled = false;
  };

 public:
  // Looks every min(250 ms, timeout / 4).
  explicit IdleWatchdog(absl::Duration timeout);
  // Stops within a look; every Watch must be gone first.
  ~IdleWatchdog();
  IdleWatchdog(const IdleWatchdog&) = delete;
  IdleWatchdog& operator=(const IdleWatchdog&) = delete;

  absl::Duration timeout() const { return timeout_; }

  // One watched call, active from construction, unwatched at destruction.
  // Thread-safe.
  class Watch {
   public:
    // `cancel` ends the call; it runs on the watchdog's thread, holding
    // its lock, so it must not call into the Watch. `busy` (null: never)
    // says whether the call has work of its own in flight, which keeps it
    // from being idle; it runs the same way.
    Watch(IdleWatchdog* watchdog, std::function<void()> cancel,
          std::function<bool()> busy = nullptr);
    ~Watch();
    Watch(const Watch&) = delete;
    Watch& operator=(const Watch&) = delete;

    // The call was active now. Not to be called holding a lock that
    // `busy` takes.
    void Touch();
    // Whether the watchdog cancelled the call.
    bool cancelled() const;

   private:
    IdleWatchdog* const watchdog_;
    std::list<Entry>::iterator entry_;
  };

 private:
  void Run();

  const absl::Duration timeout_;
  mutable absl::Mutex mu_;
  std::list<Entry> entries_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_TRANSPORT_IDLE_WATCHDOG_H_
