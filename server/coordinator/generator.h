// Token generation for one cache-aware model (export(generation=True)):
// sequences admitted against the stages' KV cache blocks, scheduled step by
// step (continuous batching: each step carries the next token of every
// sequence it holds, and new prompts in chunks), sampled on the last stage
// (or here, for models whose logits cover every position), streamed to
// their callers. It knows nothing of gRPC or of stage servers: a step is
// one call of `Forward` (Coordinator::Infer in the server, a local
// pipeline in tests), with every sequence's tokens packed along dim 1.
//
// Several steps are in flight at once (GeneratorOptions::steps_in_flight,
// at least the model's stages), each with its own sequences, so that every
// stage has work while the others compute (Orca's and vLLM's pipeline
// schedule). A sequence is admitted when the blocks of its prompt, plus a
// reserve while others run, are free; it waits in a bounded queue until
// they are. It takes more blocks as it grows. When none is free, the
// sequence admitted last that no step holds is preempted (vLLM's
// recompute preemption): its blocks go to the others, and it goes back to
// the front of the queue, to be prefilled again (prompt and tokens so far)
// once blocks are free. Its caller sees only a pause.
//
// A step that fails because a stage no longer holds a sequence's cache (a
// stage server that died and was replaced: KvCache refuses, it never
// guesses) rebuilds that sequence: its prompt and the tokens generated so
// far are prefilled again, and it goes on. The caller sees no error, no
// repeated and no missing token, and sampling draws the same numbers
// again (sampler.h), so its tokens are those of an undisturbed run.
//
//   Generator gen(config, options, forward);
//   absl::Status done = gen.Generate(request, [&](const GeneratedToken& t) {
//     return stream.Write(t);  // false: the client went away
//   }, [&] { return context.IsCancelled(); });
#ifndef PIPESERVE_SERVER_COORDINATOR_GENERATOR_H_
#define PIPESERVE_SERVER_COORDINATOR_GENERATOR_H_

#include <cstdint>
#include <deque>
#include <functional>
#include <list>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "proto/model.pb.h"
#include "runtime/tensor.h"
#include "runtime/sampler.h"

namespace pipeserve {

// What the generator needs of the model's plan.
struct GenerationConfig {
  GenerationSpec spec;                   // with num_blocks (SizeKvCache)
  std::vector<std::string> input_names;  // the plan's inputs, in order
  int logits_output = 0;                 // index of spec.logits among the outputs
  // Index of spec.sampled_tokens among the outputs: the last stage samples
  // (-1: this generator samples from the logits).
  int tokens_output = -1;
  // Replicas of the model: a step holds sequences of one home lane only
  // (sequence id modulo lanes), and runs there (RequestOptions::lane).
  int lanes = 1;
};

// The config of `plan` (kFailedPrecondition, naming the model, when it was
// not exported for generation).
absl::StatusOr<GenerationConfig> GenerationConfigOf(const std::string& model, const Plan& plan,
                                                    int lanes = 1);

struct GeneratorOptions {
  int steps_in_flight = 4;         // steps running at once
  int max_running = 256;           // sequences holding cache blocks
  int max_waiting = 256;           // queued for blocks; beyond, kResourceExhausted
  int64_t max_step_tokens = 256;   // tokens per step: longer prompts prefill in chunks
  int max_rebuilds = 4;            // times one sequence may be rebuilt after losing its cache
  // Blocks that must stay free beyond a prompt's for it to start while
  // other sequences run, so they can grow (-1: 1% of the cache, at least 1).
  int64_t reserve_blocks = -1;
};

struct GenerationRequest {
  std::vector<int64_t> prompt;
  SamplingParams sampling;
  absl::Time deadline = absl::InfiniteFuture();
};

struct GeneratedToken {
  int64_t id = 0;
  int64_t index = 0;          // 0 for the first generated token
  std::string finish_reason;  // on the last: "stop" (a stop token) or "length"
};

struct GeneratorStats {
  int64_t blocks_total = 0, blocks_used = 0;
  int64_t running = 0, waiting = 0;
  uint64_t steps = 0, rebuilt = 0, finished = 0;
  uint64_t preempted = 0;  // times a sequence gave its blocks up to others
};

class Generator {
 public:
  // Runs one step on `lane`, the replica whose stages hold its sequences'
  // caches (-1 when the model has one lane).
  using Forward = std::function<absl::StatusOr<std::vector<Tensor>>(
      const std::vector<Tensor>& inputs, absl::Time deadline, int lane)>;

  Generator(GenerationConfig config, GeneratorOptions options, Forward forward);
  // Ends every sequence (kUnavailable) and stops the step threads.
  ~Generator();
  Generator(const Generator&) = delete;
  Generator& operator=(const Generator&) = delete;

  // Generates for one request, blocking until its last token: `on_token`
  // gets each token (on this thread) as soon as it is sampled. When
  // `on_token` returns false or `cancelled` turns true the sequence stops
  // (kCancelled) and its blocks are free again within one step. Errors:
  // kInvalidArgument (an empty prompt, a token outside the vocabulary,
  // sampling out of range, prompt + max_tokens beyond the model's
  // positions or more than the cache could ever hold), kResourceExhausted
  // (max_waiting requests wait already: it names the limit),
  // kDeadlineExceeded, kUnavailable (the generator is stopping), or what a
  // step failed with.
  absl::Status Generate(const GenerationRequest& request,
                        const std::function<bool(const GeneratedToken&)>& on_token,
                        const std::function<bool()>& cancelled = nullptr);

  // Ends every sequence with `why` (their blocks free within a step) and
  // takes no more.
  void Stop(const absl::Status& why);

  GeneratorStats Stats();
  const GenerationConfig& config() const { return config_; }

  // What Generate refuses a request for before it runs: kInvalidArgument
  // (an empty prompt, a token outside the vocabulary, sampling out of
  // range, more positions than the model's, or more KV cache blocks than
  // a stage holds: it could never run).
  absl::Status Check(const GenerationRequest& request) const;
  // The most positions one sequence can reach: the model's, and what the
  // cache holds.
  int64_t MaxPositions() const;

 private:
  struct Sequence;
  struct Batch;
  using SeqPtr = std::shared_ptr<Sequence>;

  // Blocks that hold `positions` positions.
  int64_t BlocksFor(int64_t positions) const;
  absl::StatusOr<SeqPtr> Enqueue(const GenerationRequest& request);
  void Admit() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Ends `s` with `status` (and frees its blocks) unless a step holds it.
  void End(const SeqPtr& s, absl::Status status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Release(const SeqPtr& s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Gives `s` the blocks for `positions` positions, preempting the
  // sequences admitted after it that no step holds, or `s` itself, when
  // too few are free. False when `s` was preempted.
  bool Grow(const SeqPtr& s, int64_t positions) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Frees the blocks of running, idle `s` and queues it first again.
  void Preempt(const SeqPtr& s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void StepLoop();
  bool HasWork() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  Batch Take() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The home lane of the next step's sequences (0 with one lane).
  int64_t NextLane(const std::vector<SeqPtr>& ready) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The lane whose stages hold `s`'s cache.
  int64_t HomeLane(const Sequence& s) const;
  std::vector<Tensor> Inputs(const Batch& b) const;
  // The sample_* and logits_rows inputs of `b` (GenerationSpec), by name.
  Tensor SampleInput(const std::string& name, const Batch& b) const;
  // Each sequence's next token from the step's outputs (the last stage's
  // samples, or sampled here from the logits), or why there is none.
  absl::StatusOr<std::vector<int64_t>> NextTokens(const Batch& b,
                                                  const std::vector<Tensor>& out) const;
  void Apply(Batch& b, const absl::StatusOr<std::vector<Tensor>>& out)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Sampled(const SeqPtr& s, int64_t token) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const GenerationConfig config_;
  const GeneratorOptions options_;
  const Forward forward_;
  const int64_t id_base_;  // random: a restarted coordinator's ids never match old tags
  const int64_t reserve_blocks_;

  absl::Mutex mu_;
  std::vector<int64_t> free_blocks_ ABSL_GUARDED_BY(mu_);
  std::list<SeqPtr> running_ ABSL_GUARDED_BY(mu_);
  std::deque<SeqPtr> waiting_ ABSL_GUARDED_BY(mu_);
  int64_t next_id_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t next_lane_ ABSL_GUARDED_BY(mu_) = 0;  // the lane a step looks at first
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  GeneratorStats stats_ ABSL_GUARDED_BY(mu_);
  std::vector<std::thread> threads_;
};

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_COORDINATOR_GENERATOR_H_
