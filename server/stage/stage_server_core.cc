#include "server/stage/stage_server_core.h"

#include <cstring>
#include <set>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/model_name.h"
#include "common/status_macros.h"
#include "graph/validate.h"
#include "runtime/cpu/cpu_backend.h"
#include "server/stage/stage_spec.h"
#include "server/transport/frame_stream.h"

namespace pipeserve {
namespace {

template <typename... Args>
absl::Status Invalid(const Args&... parts) {
  return absl::InvalidArgumentError(absl::StrCat("LoadStage: ", parts...));
}

// The input of one running stage, for in-process callers: pushes into the
// stage and waits, up to the frame's deadline, while it is paused.
class InputSink : public FrameSink,
                  public StageHost::Producer,
                  public std::enable_shared_from_this<InputSink> {
 public:
  InputSink(StageServerCore* core, StageKey key) : core_(core), key_(std::move(key)) {}

  absl::Status Send(Frame frame, absl::Time deadline) override {
    absl::MutexLock lock(&mu_);
    auto go = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return closed_ || !paused_; };
    if (!mu_.AwaitWithDeadline(absl::Condition(&go), deadline)) {
      return absl::DeadlineExceededError(
          absl::StrCat("the deadline passed while ", StageKeyName(key_), " was full"));
    }
    if (closed_) return absl::UnavailableError("the input was closed");
    std::shared_ptr<StageHost> host = core_->Find(key_);
    if (host == nullptr) {
      return absl::UnavailableError(absl::StrCat(StageKeyName(key_), " is not loaded"));
    }
    if (host.get() != host_) {
      // A new load of the key: this sink produces for it from now on.
      if (!host->AddProducer(shared_from_this())) {
        return absl::UnavailableError(absl::StrCat(StageKeyName(key_), " is stopping"));
      }
      host_ = host.get();
    }
    paused_ = !host->Push(std::move(frame), shared_from_this());
    return absl::OkStatus();
  }

  void Close() override {
    absl::MutexLock lock(&mu_);
    closed_ = true;
  }
  void Resume() override {
    absl::MutexLock lock(&mu_);
    paused_ = false;
  }
  void Stopped() override {
    absl::MutexLock lock(&mu_);
    paused_ = false;  // the next Send finds the stage gone (or reloaded)
  }

 private:
  StageServerCore* const core_;
  const StageKey key_;
  absl::Mutex mu_;
  const StageHost* host_ ABSL_GUARDED_BY(mu_) = nullptr;  // identity only
  bool paused_ ABSL_GUARDED_BY(mu_) = false;
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace

class StageServerCore::LoadImpl : public StageServerCore::Load {
 public:
  LoadImpl(StageServerCore* core, StageSpec spec) : core_(core), spec_(std::move(spec)) {
    for (const TensorInfo& info : spec_.stage().graph().params()) infos_[info.fqn()] = &info;
  }
  // Frees its place among the loads in progress.
  ~LoadImpl() override { core_->EndLoad(); }

  absl::Status AddChunk(const WeightChunk& c) override {
    auto info = infos_.find(c.fqn());
    if (info == infos_.end()) {
      return Invalid("weight chunk for \"", c.fqn().substr(0, 256),
                     "\", which the stage does not hold");
    }
    const uint64_t size = info->second->byte_size();
    if (c.offset() > size || c.data().size() > size - c.offset()) {
      return Invalid("chunk of \"", c.fqn(), "\" at offset ", c.offset(), " runs past its ",
                     size, " bytes");
    }
    // A weight's chunks come in order, one weight at a time, and its
    // buffer is made when its first chunk comes: what a load holds beyond
    // the bytes that arrived is at most one weight's remainder.
    uint64_t& got = received_[c.fqn()];
    if (c.offset() != got) {
      return Invalid("chunk of \"", c.fqn(), "\" at offset ", c.offset(), "; expected ", got,
                     " (a weight's chunks come in order)");
    }
    if (!weights_.count(c.fqn())) {
      if (!current_.empty() && received_[current_] != infos_[current_]->byte_size()) {
        return Invalid("weight \"", c.fqn(), "\" started before \"", current_,
                       "\" was complete (weights come one at a time)");
      }
      ASSIGN_OR_RETURN(weights_[c.fqn()], Allocate(*info->second));
      current_ = c.fqn();
    }
    Tensor& t = weights_[c.fqn()];
    std::memcpy(reinterpret_cast<char*>(t.raw_data()) + c.offset(), c.data().data(),
                c.data().size());
    got += c.data().size();
    return absl::OkStatus();
  }

  absl::Status Finish() override {
    const Graph& graph = spec_.stage().graph();
    for (const TensorInfo& info : graph.params()) {
      if (!weights_.count(info.fqn()) && info.byte_size() == 0) {
        ASSIGN_OR_RETURN(weights_[info.fqn()], Allocate(info));  // no chunk to wait for
      }
      auto it = weights_.find(info.fqn());
      if (it == weights_.end() || received_[info.fqn()] != info.byte_size() ||
          Crc32(it->second.raw_data(), it->second.byte_size()) != info.crc32()) {
        return absl::DataLossError(absl::StrCat("LoadStage: weights of \"", info.fqn(),
                                                "\" are incomplete or fail their checksum"));
      }
    }
    ASSIGN_OR_RETURN(std::unique_ptr<StageProgram> program, Compile());
    StageHost::Options host_options;
    host_options.queue_capacity = static_cast<size_t>(std::max(1, core_->options_.queue_capacity));
    // As many workers as the program can run at once (2 on a GPU: one
    // microbatch's copies overlap the next one's kernels; 1 on the CPU).
    host_options.workers = program->max_concurrent_runs();
    auto host = std::make_shared<StageHost>(spec_, std::move(program), host_options);
    if (!spec_.next_address().empty()) {
      StageKey next = spec_.key();
      next.set_stage(next.stage() + 1);
      host->SetSink(core_->dialer_->Dial(spec_.next_address(), next));
    }
    std::shared_ptr<StageHost> old = core_->Install(std::move(host));
    if (old) old->Stop();
    return absl::OkStatus();
  }

 private:
  static absl::StatusOr<Tensor> Allocate(const TensorInfo& info) {
    return Tensor::TryEmpty(Shape(info.shape().begin(), info.shape().end()), info.dtype());
  }

  absl::StatusOr<std::unique_ptr<StageProgram>> Compile() {
    const StageServerOptions& o = core_->options_;
    if (o.backend != nullptr) return o.backend->Compile(spec_.stage().graph(), weights_);
    CpuBackendOptions cpu;
    cpu.threads = spec_.threads() > 0 ? spec_.threads() : o.default_threads;
    return MakeCpuBackend(cpu)->Compile(spec_.stage().graph(), weights_);
  }

  StageServerCore* const core_;
  const StageSpec spec_;
  std::map<std::string, const TensorInfo*> infos_;  // into spec_
  WeightMap weights_;                                // those whose bytes began to arrive
  std::map<std::string, uint64_t> received_;
  std::string current_;  // the weight whose chunks come now
};

StageServerCore::StageServerCore(StageServerOptions options, Dialer* dialer)
    : options_(std::move(options)), dialer_(dialer) {}

StageServerCore::~StageServerCore() { UnloadAll(); }

void StageServerCore::UnloadAll() {
  std::map<Key, std::shared_ptr<StageHost>> hosts;
  {
    absl::MutexLock lock(&mu_);
    hosts.swap(hosts_);
  }
  for (auto& [key, host] : hosts) host->Stop();
}

absl::StatusOr<std::unique_ptr<StageServerCore::Load>> StageServerCore::BeginLoad(
    const StageSpec& spec) {
  RETURN_IF_ERROR(ValidateStageSpec(spec, options_.max_stage_bytes));
  {
    // Loads in progress hold places too: their weights arrive into memory.
    absl::MutexLock lock(&mu_);
    const size_t held = hosts_.size() + loading_;
    if (static_cast<int>(held) >= options_.max_stages && !hosts_.count(KeyOf(spec.key()))) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "LoadStage: this server holds or is loading ", held,
          " stages, its limit (--max_stages)"));
    }
    ++loading_;
  }
  // Weights arrive in chunks into buffers shaped by the stage's TensorInfos.
  return std::unique_ptr<Load>(new LoadImpl(this, spec));
}

void StageServerCore::EndLoad() {
  absl::MutexLock lock(&mu_);
  --loading_;
}

std::shared_ptr<StageHost> StageServerCore::Install(std::shared_ptr<StageHost> host) {
  absl::MutexLock lock(&mu_);
  std::shared_ptr<StageHost>& slot = hosts_[KeyOf(host->spec().key())];
  std::swap(slot, host);
  return host;
}

absl::Status StageServerCore::Unload(const StageKey& key) {
  std::shared_ptr<StageHost> old;
  {
    absl::MutexLock lock(&mu_);
    auto it = hosts_.find(KeyOf(key));
    if (it == hosts_.end()) {
      return absl::NotFoundError(absl::StrCat(StageKeyName(key), " is not loaded here"));
    }
    old = std::move(it->second);
    hosts_.erase(it);
  }
  old->Stop();
  return absl::OkStatus();
}

bool StageServerCore::FinishQueued(absl::Time deadline) {
  std::vector<std::shared_ptr<StageHost>> hosts;
  {
    absl::MutexLock lock(&mu_);
    for (auto& [key, host] : hosts_) hosts.push_back(host);
  }
  bool all = true;
  for (const auto& h : hosts) all = h->FinishHeld(deadline) && all;
  return all;
}

std::shared_ptr<StageHost> StageServerCore::Find(const StageKey& key) {
  absl::MutexLock lock(&mu_);
  auto it = hosts_.find(KeyOf(key));
  return it == hosts_.end() ? nullptr : it->second;
}

absl::StatusOr<StageStatsResponse> StageServerCore::Stats(const StageKey& key) {
  std::shared_ptr<StageHost> host = Find(key);
  if (host == nullptr) {
    return absl::NotFoundError(absl::StrCat(StageKeyName(key), " is not loaded here"));
  }
  StageHost::Stats s = host->stats();
  StageStatsResponse r;
  r.set_frames_processed(s.processed);
  r.set_compute_seconds(s.compute_seconds);
  r.set_frames_dropped_deadline(s.dropped_deadline);
  r.set_frames_dropped_cancelled(s.dropped_cancelled);
  r.set_program_runs(s.runs);
  r.set_kv_cache_blocks(s.kv_cache.blocks);
  r.set_kv_cache_blocks_allocated(s.kv_cache.blocks_allocated);
  r.set_frames_rejected(s.rejected);
  r.set_frames_undeliverable(s.undeliverable);
  r.set_queue_depth(s.queue_depth);
  r.set_downstream_error(s.downstream_error);
  r.set_last_stage(host->last_stage());
  r.set_results_subscribed(host->last_stage() && s.has_sink);
  r.set_fingerprint(host->spec().fingerprint());
  return r;
}

absl::Status StageServerCore::SubscribeResults(const StageKey& key,
                                               std::shared_ptr<FrameSink> sink) {
  std::shared_ptr<StageHost> host = Find(key);
  if (host == nullptr) {
    return absl::NotFoundError(absl::StrCat(StageKeyName(key), " is not loaded here"));
  }
  if (!host->last_stage()) {
    return absl::FailedPreconditionError(
        absl::StrCat(StageKeyName(key), " is not the last stage; only its results stream"));
  }
  std::shared_ptr<FrameSink> old = host->SetSink(std::move(sink));
  if (old) old->Close();
  return absl::OkStatus();
}

void StageServerCore::UnsubscribeResults(const StageKey& key, const FrameSink* sink) {
  if (std::shared_ptr<StageHost> host = Find(key)) host->ClearSink(sink);
}

std::shared_ptr<FrameSink> StageServerCore::OpenInput(const StageKey& key) {
  return std::make_shared<InputSink>(this, key);
}

std::vector<StageKey> StageServerCore::Keys() {
  absl::MutexLock lock(&mu_);
  std::vector<StageKey> keys;
  for (const auto& [key, host] : hosts_) keys.push_back(host->spec().key());
  return keys;
}

size_t StageServerCore::size() {
  absl::MutexLock lock(&mu_);
  return hosts_.size();
}

}  // namespace pipeserve
