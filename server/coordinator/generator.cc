#include "server/coordinator/generator.h"

#include <algorithm>
#include <random>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "runtime/cpu/cpu_ops.h"
#include "graph/dtype.h"

namespace pipeserve {

struct Generator::Sequence {
  int64_t id = 0;
  std::vector<int64_t> tokens;  // the prompt, then what was generated
  int64_t prompt_len = 0;
  int64_t cached = 0;           // positions every stage holds
  std::vector<int64_t> blocks;  // its block table (the prompt's at admission, then as it grows)
  bool running = false;         // admitted (holds blocks), not waiting
  SamplingParams sampling;
  absl::Time deadline;
  bool in_flight = false;       // a step holds it
  bool ended = false;
  bool stop = false;            // end it when its step comes back, with `stop_status`
  absl::Status stop_status;
  int rebuilds = 0;
  absl::Status status;          // once ended
  std::deque<GeneratedToken> out;  // sampled, not yet handed to the caller
};

// One step: its sequences, and per sequence the first position fed and
// how many.
struct Generator::Batch {
  std::vector<SeqPtr> seqs;
  std::vector<int64_t> from, count;
  std::vector<int64_t> tokens;
  // The step's own (not its sequences': one short deadline must not fail
  // the others; each sequence's is checked on its own).
  absl::Time deadline = absl::InfiniteFuture();
  int lane = -1;  // the lane holding its sequences' caches (-1: the model has one)
};

namespace {

bool IsCacheMiss(const absl::Status& s) {
  return s.code() == absl::StatusCode::kFailedPrecondition &&
         absl::StrContains(s.message(), "is not in this stage's cache");
}

}  // namespace

absl::StatusOr<GenerationConfig> GenerationConfigOf(const std::string& model, const Plan& plan,
                                                    int lanes) {
  if (!plan.has_generation() || plan.generation().num_blocks() <= 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "model \"", model, "\" was not exported for generation (pipeserve.export(..., "
        "generation=True))"));
  }
  GenerationConfig c;
  c.spec = plan.generation();
  c.lanes = std::max(1, lanes);
  for (const ValueSpec& in : plan.inputs()) c.input_names.push_back(in.name());
  c.logits_output = -1;
  for (int i = 0; i < plan.outputs_size(); ++i) {
    if (plan.outputs(i).name() == c.spec.logits()) c.logits_output = i;
  }
  if (c.logits_output < 0) {
    return absl::InvalidArgumentError(absl::StrCat("model \"", model, "\": its logits output \"",
                                                   c.spec.logits(), "\" is not an output"));
  }
  for (int i = 0; i < plan.outputs_size() && !c.spec.sampled_tokens().empty(); ++i) {
    if (plan.outputs(i).name() == c.spec.sampled_tokens()) c.tokens_output = i;
  }
  if (!c.spec.sampled_tokens().empty() && c.tokens_output < 0) {
    return absl::InvalidArgumentError(absl::StrCat("model \"", model, "\": its tokens output \"",
                                                   c.spec.sampled_tokens(), "\" is not an output"));
  }
  return c;
}

Generator::Generator(GenerationConfig config, GeneratorOptions options, Forward forward)
    : config_(std::move(config)), options_(options), forward_(std::move(forward)),
      id_base_(static_cast<int64_t>(std::random_device{}() & 0x3fffffff) << 32),
      reserve_blocks_(options_.reserve_blocks >= 0
                          ? options_.reserve_blocks
                          : std::max<int64_t>(1, config_.spec.num_blocks() / 100)) {
  for (int64_t b = config_.spec.num_blocks() - 1; b >= 0; --b) free_blocks_.push_back(b);
  stats_.blocks_total = config_.spec.num_blocks();
  for (int i = 0; i < std::max(1, options_.steps_in_flight); ++i) {
    threads_.emplace_back([this] { StepLoop(); });
  }
}

Generator::~Generator() {
  {
    absl::MutexLock l(&mu_);
    stopping_ = true;
    std::vector<SeqPtr> all(running_.begin(), running_.end());
    all.insert(all.end(), waiting_.begin(), waiting_.end());
    for (const SeqPtr& s : all) End(s, absl::UnavailableError("the generator is stopping"));
  }
  for (std::thread& t : threads_) t.join();
}

absl::Status Generator::Check(const GenerationRequest& request) const {
  const GenerationSpec& spec = config_.spec;
  if (request.prompt.empty()) return absl::InvalidArgumentError("the prompt has no tokens");
  for (size_t i = 0; i < request.prompt.size(); ++i) {
    if (request.prompt[i] < 0 || request.prompt[i] >= spec.vocab()) {
      return absl::InvalidArgumentError(absl::StrCat("prompt token ", i, " is ", request.prompt[i],
                                                     ", not in [0, ", spec.vocab(), ")"));
    }
  }
  RETURN_IF_ERROR(CheckSampling(request.sampling, spec.vocab()));
  const int64_t positions =
      static_cast<int64_t>(request.prompt.size()) + request.sampling.max_tokens - 1;
  if (spec.max_positions() > 0 && positions > spec.max_positions()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "a prompt of ", request.prompt.size(), " tokens and max_tokens ",
        request.sampling.max_tokens, " need ", positions, " positions; the model has ",
        spec.max_positions()));
  }
  if (const int64_t need = BlocksFor(positions); need > spec.num_blocks()) {
    // Never, not just not now: kInvalidArgument (400), not 429, which a
    // client would retry.
    return absl::InvalidArgumentError(absl::StrCat(
        "the request needs ", need, " KV cache blocks of ", spec.block_size(),
        " tokens (prompt plus max_tokens); each stage holds ", spec.num_blocks(),
        " (--kv_cache_mb)"));
  }
  return absl::OkStatus();
}

int64_t Generator::MaxPositions() const {
  const GenerationSpec& spec = config_.spec;
  const int64_t cached = spec.num_blocks() * spec.block_size();
  return spec.max_positions() > 0 ? std::min(spec.max_positions(), cached) : cached;
}

int64_t Generator::BlocksFor(int64_t positions) const {
  const int64_t bs = config_.spec.block_size();
  return std::max<int64_t>(1, (positions + bs - 1) / bs);
}

absl::StatusOr<Generator::SeqPtr> Generator::Enqueue(const GenerationRequest& request) {
  absl::MutexLock l(&mu_);  // Check refused what could not finish even alone
  if (stopping_) return absl::UnavailableError("the generator is stopping");
  auto s = std::make_shared<Sequence>();
  s->id = id_base_ + next_id_++;
  s->tokens = request.prompt;
  s->prompt_len = static_cast<int64_t>(request.prompt.size());
  s->sampling = request.sampling;
  s->deadline = request.deadline;
  waiting_.push_back(s);
  Admit();
  if (static_cast<int>(waiting_.size()) > options_.max_waiting) {  // s did not get in
    waiting_.pop_back();
    return absl::ResourceExhaustedError(absl::StrCat(
        options_.max_waiting, " requests already wait for KV cache blocks (the queue's limit, "
        "--max_generation_waiting)"));
  }
  return s;
}

void Generator::Admit() {
  while (!waiting_.empty() && static_cast<int>(running_.size()) < options_.max_running) {
    SeqPtr s = waiting_.front();
    const int64_t need = BlocksFor(static_cast<int64_t>(s->tokens.size()));
    const int64_t reserve = running_.empty() ? 0 : reserve_blocks_;
    if (need + reserve > static_cast<int64_t>(free_blocks_.size())) return;
    waiting_.pop_front();
    s->cached = 0;  // a preempted sequence is prefilled again
    s->running = true;
    running_.push_back(s);
    Grow(s, static_cast<int64_t>(s->tokens.size()));
  }
}

bool Generator::Grow(const SeqPtr& s, int64_t positions) {
  const size_t need = static_cast<size_t>(BlocksFor(positions));
  while (s->blocks.size() < need) {
    if (free_blocks_.empty()) {
      // The sequence admitted last that no step holds gives its blocks up:
      // one after `s`, or `s` itself.
      auto victim = running_.end();
      for (auto it = running_.end(); it != running_.begin();) {
        --it;
        if (*it == s || !(*it)->in_flight) {
          victim = it;
          break;
        }
      }
      SeqPtr v = *victim;
      Preempt(v);
      if (v == s) return false;
      continue;
    }
    s->blocks.push_back(free_blocks_.back());
    free_blocks_.pop_back();
  }
  return true;
}

void Generator::Preempt(const SeqPtr& s) {
  running_.erase(std::find(running_.begin(), running_.end(), s));
  free_blocks_.insert(free_blocks_.end(), s->blocks.begin(), s->blocks.end());
  s->blocks.clear();
  s->cached = 0;
  s->running = false;
  waiting_.push_front(s);
  ++stats_.preempted;
}

void Generator::End(const SeqPtr& s, absl::Status status) {
  if (s->ended) return;
  if (s->in_flight) {  // its step's thread ends it when the step comes back
    if (!s->stop) s->stop_status = std::move(status);
    s->stop = true;
    return;
  }
  s->ended = true;
  s->status = std::move(status);
  if (!s->status.ok()) s->out.clear();
  Release(s);
  ++stats_.finished;
}

void Generator::Release(const SeqPtr& s) {
  if (s->running) {
    running_.erase(std::find(running_.begin(), running_.end(), s));
    free_blocks_.insert(free_blocks_.end(), s->blocks.begin(), s->blocks.end());
    s->blocks.clear();
    s->running = false;
  } else {
    waiting_.erase(std::remove(waiting_.begin(), waiting_.end(), s), waiting_.end());
  }
  Admit();
}

absl::Status Generator::Generate(const GenerationRequest& request,
                                 const std::function<bool(const GeneratedToken&)>& on_token,
                                 const std::function<bool()>& cancelled) {
  RETURN_IF_ERROR(Check(request));
  ASSIGN_OR_RETURN(SeqPtr s, Enqueue(request));
  absl::MutexLock l(&mu_);
  bool abandoned = false;  // the client stopped reading: nothing more is handed over
  while (true) {
    while (!s->out.empty() && !abandoned) {
      GeneratedToken t = std::move(s->out.front());
      s->out.pop_front();
      mu_.Unlock();
      abandoned = !on_token(t);
      mu_.Lock();
    }
    if (abandoned) {
      s->out.clear();  // nothing more is handed over (and nothing to wake for)
      End(s, absl::CancelledError("the client stopped reading the tokens"));
      if (s->ended) return absl::CancelledError("the client stopped reading the tokens");
    }
    if (s->ended) return s->status;
    if (cancelled != nullptr && cancelled()) {
      End(s, absl::CancelledError("generation cancelled by the client"));
    } else if (absl::Now() > s->deadline) {
      End(s, absl::DeadlineExceededError(absl::StrCat(
                 "the request's deadline passed after ", s->tokens.size() - s->prompt_len,
                 " tokens")));
    }
    auto ready = [&s]() { return !s->out.empty() || s->ended; };
    mu_.AwaitWithTimeout(absl::Condition(&ready), absl::Milliseconds(20));
  }
}

void Generator::Stop(const absl::Status& why) {
  absl::MutexLock l(&mu_);
  std::vector<SeqPtr> all(running_.begin(), running_.end());
  all.insert(all.end(), waiting_.begin(), waiting_.end());
  for (const SeqPtr& s : all) End(s, why);
  stopping_ = true;
}

GeneratorStats Generator::Stats() {
  absl::MutexLock l(&mu_);
  GeneratorStats s = stats_;
  s.blocks_used = s.blocks_total - static_cast<int64_t>(free_blocks_.size());
  s.running = static_cast<int64_t>(running_.size());
  s.waiting = static_cast<int64_t>(waiting_.size());
  return s;
}

bool Generator::HasWork() const {
  if (stopping_) return true;
  for (const SeqPtr& s : running_) {
    if (!s->in_flight) return true;
  }
  return false;
}

void Generator::StepLoop() {
  absl::MutexLock l(&mu_);
  while (true) {
    mu_.Await(absl::Condition(this, &Generator::HasWork));
    if (stopping_) return;
    Batch b = Take();
    if (b.seqs.empty()) continue;
    std::vector<Tensor> inputs = Inputs(b);
    mu_.Unlock();
    absl::StatusOr<std::vector<Tensor>> out = forward_(inputs, b.deadline, b.lane);
    mu_.Lock();
    Apply(b, out);
  }
}

Generator::Batch Generator::Take() {
  const absl::Time now = absl::Now();
  std::vector<SeqPtr> ready;
  for (const SeqPtr& s : running_) {
    if (!s->in_flight) ready.push_back(s);
  }
  for (const SeqPtr& s : ready) {
    if (s->stop) End(s, s->stop_status);
    if (!s->ended && now > s->deadline) {
      End(s, absl::DeadlineExceededError("the request's deadline passed while it generated"));
    }
  }
  // As many sequences per step as keeps steps_in_flight steps busy.
  const int64_t per_step =
      std::max<int64_t>(1, (static_cast<int64_t>(running_.size()) + options_.steps_in_flight - 1) /
                               options_.steps_in_flight);
  Batch b;
  int64_t budget = options_.max_step_tokens;
  const int64_t lane = NextLane(ready);  // the home lane of the step's sequences
  // Decoding sequences first (one token each), then prompts in chunks.
  for (int pass = 0; pass < 2; ++pass) {
    for (const SeqPtr& s : ready) {
      if (s->ended || !s->running || s->in_flight) continue;
      if (static_cast<int64_t>(b.seqs.size()) >= per_step) continue;
      const int64_t left = static_cast<int64_t>(s->tokens.size()) - s->cached;
      if ((pass == 0) != (left == 1) || budget <= 0) continue;
      if (HomeLane(*s) != lane) continue;
      const int64_t n = std::min(left, budget);
      if (!Grow(s, s->cached + n)) continue;  // preempted: it waits for blocks
      budget -= n;
      s->in_flight = true;
      b.seqs.push_back(s);
      b.from.push_back(s->cached);
      b.count.push_back(n);
      b.tokens.insert(b.tokens.end(), s->tokens.begin() + s->cached,
                      s->tokens.begin() + s->cached + n);
    }
  }
  if (config_.lanes > 1) b.lane = static_cast<int>(lane);
  return b;
}

// The lanes take turns: the first after the last step's lane with a
// sequence to step. (Taking the oldest sequence's lane kept every step on
// one lane while its sequences lasted, with one step in flight: the other
// lanes' sequences held their blocks and waited, unprefilled.)
int64_t Generator::NextLane(const std::vector<SeqPtr>& ready) {
  for (int64_t k = 0; k < config_.lanes; ++k) {
    const int64_t lane = (next_lane_ + k) % config_.lanes;
    for (const SeqPtr& s : ready) {
      if (s->ended || !s->running || s->in_flight || HomeLane(*s) != lane) continue;
      next_lane_ = (lane + 1) % config_.lanes;
      return lane;
    }
  }
  return 0;
}

int64_t Generator::HomeLane(const Sequence& s) const {
  return ((s.id % config_.lanes) + config_.lanes) % config_.lanes;
}

std::vector<Tensor> Generator::Inputs(const Batch& b) const {
  const int64_t t = static_cast<int64_t>(b.tokens.size());
  const int64_t n = static_cast<int64_t>(b.seqs.size());
  std::vector<int64_t> positions, seq, ids;
  size_t width = 0;
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t k = 0; k < b.count[i]; ++k) {
      positions.push_back(b.from[i] + k);
      seq.push_back(i);
    }
    ids.push_back(b.seqs[i]->id);
    width = std::max(width, b.seqs[i]->blocks.size());
  }
  std::vector<int64_t> blocks;
  for (const SeqPtr& s : b.seqs) {
    blocks.insert(blocks.end(), s->blocks.begin(), s->blocks.end());
    blocks.resize(blocks.size() + width - s->blocks.size(), s->blocks[0]);
  }
  std::vector<Tensor> inputs;
  for (const std::string& name : config_.input_names) {
    if (name == config_.spec.tokens()) {
      inputs.push_back(Tensor::FromInt64s({1, t}, b.tokens));
    } else if (name == "kv_positions") {
      inputs.push_back(Tensor::FromInt64s({t}, positions));
    } else if (name == "kv_seq") {
      inputs.push_back(Tensor::FromInt64s({t}, seq));
    } else if (name == "kv_blocks") {
      inputs.push_back(Tensor::FromInt64s({n, static_cast<int64_t>(width)}, blocks));
    } else if (absl::StartsWith(name, "sample_") || name == "logits_rows") {
      inputs.push_back(SampleInput(name, b));
    } else if (name == "kv_last") {
      std::vector<int64_t> last;
      int64_t end = 0;
      for (int64_t i = 0; i < n; ++i) last.push_back((end += b.count[i]) - 1);
      inputs.push_back(Tensor::FromInt64s({n}, last));
    } else {
      inputs.push_back(Tensor::FromInt64s({n}, ids));
    }
  }
  return inputs;
}

Tensor Generator::SampleInput(const std::string& name, const Batch& b) const {
  const int64_t n = static_cast<int64_t>(b.seqs.size());
  if (name == "sample_floats") {
    Tensor t = Tensor::Zeros({n, 4}, DT_FLOAT32);
    for (int64_t i = 0; i < n; ++i) {
      const SamplingParams& p = b.seqs[i]->sampling;
      float* row = t.data() + i * 4;
      row[0] = static_cast<float>(p.temperature);
      row[1] = static_cast<float>(p.top_p);
      row[2] = static_cast<float>(p.repetition_penalty);
      row[3] = static_cast<float>(p.frequency_penalty);
    }
    return t;
  }
  std::vector<int64_t> values, ends;
  int64_t end = 0;
  for (const SeqPtr& s : b.seqs) {
    const SamplingParams& p = s->sampling;
    const int64_t generated = static_cast<int64_t>(s->tokens.size()) - s->prompt_len;
    if (name == "sample_ints") {
      values.insert(values.end(), {p.top_k, static_cast<int64_t>(p.seed), generated});
    } else if (p.repetition_penalty != 1 || p.frequency_penalty != 0) {
      // The context only where a penalty reads it; the ends need only its size.
      if (name == "sample_context") values.insert(values.end(), s->tokens.begin(), s->tokens.end());
      end += static_cast<int64_t>(s->tokens.size());
    }
    ends.push_back(end);
  }
  if (name == "sample_ints") return Tensor::FromInt64s({n, 3}, values);
  if (name == "sample_context_ends") return Tensor::FromInt64s({n}, ends);
  if (name == "sample_context") {
    return Tensor::FromInt64s({static_cast<int64_t>(values.size())}, values);
  }
  return Tensor::FromInt64s({0}, {});  // logits_rows: none travel back
}

absl::StatusOr<std::vector<int64_t>> Generator::NextTokens(const Batch& b,
                                                           const std::vector<Tensor>& out) const {
  const int64_t n = static_cast<int64_t>(b.seqs.size());
  if (config_.tokens_output >= 0) {
    const Tensor& t = out[config_.tokens_output];
    if (t.dtype() != DT_INT64 || t.shape() != Shape{n}) {
      return absl::InternalError(absl::StrCat("a step's tokens came back as ",
                                              TorchName(t.dtype()), " ", ShapeToString(t.shape()),
                                              ", expected int64 [", n, "]"));
    }
    const int64_t* ids = t.data_as<int64_t>();
    return std::vector<int64_t>(ids, ids + n);
  }
  const int64_t vocab = config_.spec.vocab();
  const Tensor& logits = out[config_.logits_output];
  const int64_t t = static_cast<int64_t>(b.tokens.size());
  const bool last_only = config_.spec.last_only();
  // Logits of every token [1, T, vocab], or of each sequence's last [N, vocab].
  const Shape want = last_only ? Shape{n, vocab} : Shape{1, t, vocab};
  if (!IsFloatingPoint(logits.dtype()) || logits.shape() != want) {
    return absl::InternalError(absl::StrCat(
        "a step's logits came back as ", TorchName(logits.dtype()), " ",
        ShapeToString(logits.shape()), ", expected floating point ", ShapeToString(want)));
  }
  // Float32 logits (a bfloat16 or float16 model's widened once per step).
  const Tensor logits_f = ToFloat32(logits);
  std::vector<int64_t> next(n, -1);
  int64_t row = 0;
  for (int64_t i = 0; i < n; ++i) {
    const SeqPtr& s = b.seqs[i];
    row += b.count[i];
    if (b.from[i] + b.count[i] != static_cast<int64_t>(s->tokens.size())) continue;  // mid-prompt
    const int64_t r = last_only ? i : row - 1;
    next[i] = SampleToken(absl::MakeConstSpan(logits_f.data() + r * vocab, vocab), s->sampling,
                          s->tokens, static_cast<int64_t>(s->tokens.size()) - s->prompt_len);
  }
  return next;
}

void Generator::Apply(Batch& b, const absl::StatusOr<std::vector<Tensor>>& out) {
  ++stats_.steps;
  for (const SeqPtr& s : b.seqs) s->in_flight = false;
  absl::StatusOr<std::vector<int64_t>> next =
      out.ok() ? NextTokens(b, *out) : absl::StatusOr<std::vector<int64_t>>(out.status());
  const absl::Status failed = next.status();
  for (size_t i = 0; i < b.seqs.size(); ++i) {
    const SeqPtr& s = b.seqs[i];
    if (s->ended) continue;
    if (IsCacheMiss(failed) && ++s->rebuilds <= options_.max_rebuilds) {
      s->cached = 0;  // prefill its prompt and output again, then go on
      ++stats_.rebuilt;
    } else if (!failed.ok()) {
      End(s, absl::Status(failed.code(), absl::StrCat("a generation step failed: ",
                                                      failed.message())));
      continue;
    } else {
      s->cached = b.from[i] + b.count[i];
      if (s->cached == static_cast<int64_t>(s->tokens.size()) && !s->stop) {
        Sampled(s, (*next)[i]);
      }
    }
    if (s->stop) End(s, s->stop_status);
  }
}

void Generator::Sampled(const SeqPtr& s, int64_t token) {
  s->tokens.push_back(token);
  const int64_t generated = static_cast<int64_t>(s->tokens.size()) - s->prompt_len;
  GeneratedToken t{token, generated - 1, ""};
  const std::vector<int64_t>& stops = s->sampling.stop_token_ids;
  if (std::find(stops.begin(), stops.end(), token) != stops.end()) {
    t.finish_reason = "stop";
  } else if (generated >= s->sampling.max_tokens) {
    t.finish_reason = "length";
  }
  s->out.push_back(std::move(t));
  if (!s->out.back().finish_reason.empty()) End(s, absl::OkStatus());
}

}  // namespace pipeserve
