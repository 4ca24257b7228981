#include "server/coordinator/in_process_stages.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "server/transport/frame_stream.h"

namespace pipeserve {
namespace {

constexpr size_t kChunkBytes = 1 << 20;

// Frames into a stage of whichever server is at `address` now, the way a
// FrameSender follows its address.
class RoutedSink : public FrameSink {
 public:
  // `link`: a stage's sink to the next (Dial), not the coordinator's.
  RoutedSink(InProcessStages* stages, std::string address, StageKey key, bool link)
      : stages_(stages), address_(std::move(address)), key_(std::move(key)), link_(link) {}

  absl::Status Send(Frame frame, absl::Time deadline) override {
    if (link_ && stages_->TakeLinkFailure(address_)) {
      return absl::UnavailableError(
          absl::StrCat("sending to ", address_, ": the stage ended the stream (a cut link)"));
    }
    std::shared_ptr<FrameSink> inner;
    std::shared_ptr<StageServerCore> server;
    {
      absl::MutexLock lock(&mu_);
      if (closed_) return absl::UnavailableError("the sink is closed");
      server = stages_->Server(address_);
      if (server == nullptr) {
        return absl::UnavailableError(absl::StrCat("no stage server at ", address_));
      }
      if (server.get() != server_) {
        inner_ = server->OpenInput(key_);
        server_ = server.get();
      }
      inner = inner_;
    }
    return inner->Send(std::move(frame), deadline);
  }

  void Close() override {
    std::shared_ptr<FrameSink> inner;
    {
      absl::MutexLock lock(&mu_);
      closed_ = true;
      inner = inner_;
    }
    if (inner) inner->Close();
  }

 private:
  InProcessStages* const stages_;
  const std::string address_;
  const StageKey key_;
  const bool link_;
  absl::Mutex mu_;
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
  const StageServerCore* server_ ABSL_GUARDED_BY(mu_) = nullptr;  // identity only
  std::shared_ptr<FrameSink> inner_ ABSL_GUARDED_BY(mu_);
};

// A last stage's results handed straight to the coordinator's callbacks.
class CallbackSink : public FrameSink {
 public:
  CallbackSink(std::function<void(Frame)> on_frame,
               std::function<void(const absl::Status&)> on_done)
      : on_frame_(std::move(on_frame)), on_done_(std::move(on_done)) {}

  absl::Status Send(Frame frame, absl::Time) override {
    {
      absl::MutexLock lock(&mu_);
      if (closed_) return absl::UnavailableError("the results subscription ended");
    }
    on_frame_(std::move(frame));
    return absl::OkStatus();
  }

  // The stage closed the stream (unloaded, or a new subscriber came).
  void Close() override {
    if (End()) on_done_(absl::UnavailableError("the stage ended the results stream"));
  }

  // Ends without telling the subscriber; true if it was open.
  bool End() {
    absl::MutexLock lock(&mu_);
    bool was_open = !closed_;
    closed_ = true;
    return was_open;
  }

 private:
  const std::function<void(Frame)> on_frame_;
  const std::function<void(const absl::Status&)> on_done_;
  absl::Mutex mu_;
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
};

class InProcessSubscription : public StageClient::Subscription {
 public:
  InProcessSubscription(std::weak_ptr<StageServerCore> server, StageKey key,
                        std::shared_ptr<CallbackSink> sink)
      : server_(std::move(server)), key_(std::move(key)), sink_(std::move(sink)) {}
  ~InProcessSubscription() override {
    sink_->End();
    if (auto server = server_.lock()) server->UnsubscribeResults(key_, sink_.get());
  }

 private:
  std::weak_ptr<StageServerCore> server_;
  const StageKey key_;
  std::shared_ptr<CallbackSink> sink_;
};

}  // namespace

InProcessStages::InProcessStages(StageServerOptions options) : options_(std::move(options)) {}

InProcessStages::~InProcessStages() {
  std::map<std::string, std::shared_ptr<StageServerCore>> servers;
  {
    absl::MutexLock lock(&mu_);
    servers.swap(servers_);
  }
  servers.clear();  // each core stops its stages
}

void InProcessStages::AddServer(const std::string& address) {
  auto core = std::make_shared<StageServerCore>(options_, this);
  std::shared_ptr<StageServerCore> old;
  {
    absl::MutexLock lock(&mu_);
    old = std::exchange(servers_[address], std::move(core));
  }
}

void InProcessStages::KillServer(const std::string& address) {
  std::shared_ptr<StageServerCore> old;
  {
    absl::MutexLock lock(&mu_);
    auto it = servers_.find(address);
    if (it == servers_.end()) return;
    old = std::move(it->second);
    servers_.erase(it);
  }
  old->UnloadAll();
}

std::shared_ptr<StageServerCore> InProcessStages::Server(const std::string& address) {
  absl::MutexLock lock(&mu_);
  auto it = servers_.find(address);
  return it == servers_.end() ? nullptr : it->second;
}

absl::StatusOr<std::shared_ptr<StageServerCore>> InProcessStages::Reach(
    const std::string& address) {
  std::shared_ptr<StageServerCore> s = Server(address);
  if (s == nullptr) return absl::UnavailableError(absl::StrCat("no stage server at ", address));
  return s;
}

absl::Status InProcessStages::LoadStage(const std::string& address, const StageSpec& spec,
                                        const WeightReader& weights, absl::Time) {
  ++load_calls_;
  ASSIGN_OR_RETURN(std::shared_ptr<StageServerCore> server, Reach(address));
  ASSIGN_OR_RETURN(std::unique_ptr<StageServerCore::Load> load, server->BeginLoad(spec));
  std::string buffer;
  for (const TensorInfo& info : spec.stage().graph().params()) {
    for (uint64_t off = 0; off < info.byte_size(); off += kChunkBytes) {
      size_t n = static_cast<size_t>(std::min<uint64_t>(kChunkBytes, info.byte_size() - off));
      buffer.resize(n);
      RETURN_IF_ERROR(weights(info.fqn(), off, n, buffer.data()));
      WeightChunk chunk;
      chunk.set_fqn(info.fqn());
      chunk.set_offset(off);
      chunk.set_data(buffer);
      RETURN_IF_ERROR(load->AddChunk(chunk));
    }
  }
  return load->Finish();
}

absl::Status InProcessStages::UnloadStage(const std::string& address, const StageKey& key,
                                          absl::Time) {
  ASSIGN_OR_RETURN(std::shared_ptr<StageServerCore> server, Reach(address));
  return server->Unload(key);
}

absl::StatusOr<std::vector<StageKey>> InProcessStages::ListStages(const std::string& address,
                                                                  absl::Time) {
  ASSIGN_OR_RETURN(std::shared_ptr<StageServerCore> server, Reach(address));
  return server->Keys();
}

absl::StatusOr<StageStatsResponse> InProcessStages::GetStageStats(const std::string& address,
                                                                  const StageKey& key,
                                                                  absl::Time) {
  ASSIGN_OR_RETURN(std::shared_ptr<StageServerCore> server, Reach(address));
  return server->Stats(key);
}

std::shared_ptr<FrameSink> InProcessStages::OpenInput(const std::string& address,
                                                      const StageKey& key) {
  return std::make_shared<RoutedSink>(this, address, key, /*link=*/false);
}

std::shared_ptr<FrameSink> InProcessStages::Dial(const std::string& address,
                                                 const StageKey& key) {
  return std::make_shared<RoutedSink>(this, address, key, /*link=*/true);
}

void InProcessStages::FailLinkSends(const std::string& address, int n) {
  absl::MutexLock lock(&mu_);
  failing_link_sends_[address] = n;
}

bool InProcessStages::TakeLinkFailure(const std::string& address) {
  absl::MutexLock lock(&mu_);
  auto it = failing_link_sends_.find(address);
  if (it == failing_link_sends_.end() || it->second <= 0) return false;
  --it->second;
  return true;
}

absl::StatusOr<std::unique_ptr<StageClient::Subscription>> InProcessStages::SubscribeResults(
    const std::string& address, const StageKey& key, std::function<void(Frame)> on_frame,
    std::function<void(const absl::Status&)> on_done, absl::Time) {
  ASSIGN_OR_RETURN(std::shared_ptr<StageServerCore> server, Reach(address));
  auto sink = std::make_shared<CallbackSink>(std::move(on_frame), std::move(on_done));
  RETURN_IF_ERROR(server->SubscribeResults(key, sink));
  return std::unique_ptr<Subscription>(new InProcessSubscription(server, key, sink));
}

}  // namespace pipeserve
