// The generators of a coordinator's cache-aware models, one per model and
// version, made at the first request to the version. Each step of a
// generator is a request through the Coordinator to its version
// (VersionRoute), which carries it across stage server failures; a stage
// that comes back without the sequence's cache makes the generator
// rebuild it (generator.h). After a new upload the old version's
// generator finishes the sequences it has on the old stages, which hold
// their caches, and the old version drains until it has (or
// --drain_timeout_s is up).
//
//   Generation generation(&coordinator, GeneratorOptions{});
//   ASSIGN_OR_RETURN(std::shared_ptr<Generator> gen, generation.For("gpt2"));
#ifndef PIPESERVE_SERVER_COORDINATOR_GENERATION_H_
#define PIPESERVE_SERVER_COORDINATOR_GENERATION_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "server/coordinator/core.h"
#include "server/coordinator/generator.h"
#include "server/text/tokenizer.h"

namespace pipeserve {

// A model's generator with the tokenizer it was uploaded with.
struct TextModel {
  std::shared_ptr<Generator> generator;
  std::shared_ptr<const Tokenizer> tokenizer;
  ChatTemplate chat;  // no roles: the model has no chat template
};

// Where a generator's steps go: the version of the model it was made for,
// as found by name while that version serves it, else the deployment it
// last ran on, which a Deployment::Hold keeps serving after a new upload
// retires it, until the generator (and so this route) goes.
class VersionRoute {
 public:
  VersionRoute(Coordinator* coordinator, std::string model, std::shared_ptr<Deployment> d);
  // InferOn the version's deployment, pinned to the version.
  absl::StatusOr<std::vector<Tensor>> Step(const std::vector<Tensor>& inputs,
                                           RequestOptions options);

 private:
  std::shared_ptr<Deployment> Target();

  Coordinator* const coordinator_;
  const std::string model_;
  const int64_t version_;
  absl::Mutex mu_;
  std::shared_ptr<Deployment> last_ ABSL_GUARDED_BY(mu_);
  std::shared_ptr<void> hold_ ABSL_GUARDED_BY(mu_);
};

class Generation {
 public:
  // `coordinator` must outlive this. options.steps_in_flight 0 means a
  // model's stages + 1 (every stage busy when each has its own machine),
  // or 1 where the stages share cores (Coordinator::StagesShareCores).
  Generation(Coordinator* coordinator, GeneratorOptions options);
  ~Generation();

  // kNotFound / kUnavailable as Coordinator::Find; kFailedPrecondition for
  // a model not exported for generation.
  absl::StatusOr<std::shared_ptr<Generator>> For(const std::string& model);
  // For, with the model's tokenizer (made once per version of the model);
  // kFailedPrecondition, naming the model, for one uploaded without a
  // tokenizer.
  absl::StatusOr<TextModel> Text(const std::string& model);

  // Every generator's model and stats (for metrics).
  std::vector<std::pair<std::string, GeneratorStats>> Stats();

 private:
  struct Tokenized {
    int64_t version = 0;
    std::shared_ptr<const Tokenizer> tokenizer;
  };
  struct Made {
    int64_t version = 0;
    std::shared_ptr<Generator> generator;
  };
  // The generator of `*d`'s version; `*d` becomes the deployment serving
  // now when it left service since it was found.
  absl::StatusOr<std::shared_ptr<Generator>> ForDeployment(const std::string& model,
                                                           std::shared_ptr<Deployment>* d);
  // `version` of `model` left service: its generator and tokenizer leave
  // the map, and the generator goes with its route's hold once no request
  // holds it (at once when none runs), so a replaced version's stages
  // close without waiting out --drain_timeout_s. An unloaded model's
  // sequences end (kUnavailable): a later upload may bring the same
  // version number, whose new stages the old generator's route would take
  // for its own, beside the new generator.
  void Retired(const std::string& model, int64_t version, bool unloaded);

  Coordinator* const coordinator_;
  const GeneratorOptions options_;
  absl::Mutex mu_;
  absl::flat_hash_map<std::string, Made> generators_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::string, Tokenized> tokenizers_ ABSL_GUARDED_BY(mu_);
};

// Prometheus text for `stats`: per model, KV cache blocks used and free,
// sequences running and waiting, steps, sequences rebuilt after a lost
// cache, preemptions, sequences finished.
std::string RenderGenerationMetrics(
    const std::vector<std::pair<std::string, GeneratorStats>>& stats);

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_COORDINATOR_GENERATION_H_
