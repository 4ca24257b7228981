#include "server/coordinator/generation.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace pipeserve {
namespace {

bool SameConfig(const GenerationConfig& a, const GenerationConfig& b) {
  return a.spec.SerializeAsString() == b.spec.SerializeAsString() &&
         a.input_names == b.input_names && a.logits_output == b.logits_output &&
         a.lanes == b.lanes;
}

}  // namespace

VersionRoute::VersionRoute(Coordinator* coordinator, std::string model,
                           std::shared_ptr<Deployment> d)
    : coordinator_(coordinator), model_(std::move(model)), version_(d->version()) {
  hold_ = Deployment::Hold(d);
  last_ = std::move(d);
}

std::shared_ptr<Deployment> VersionRoute::Target() {
  absl::StatusOr<std::shared_ptr<Deployment>> found = coordinator_->Find(model_);
  absl::MutexLock l(&mu_);
  // The version redeployed after a failure is a new deployment: held from
  // here on instead. Not so after an upload or unload retired it: a later
  // deployment of the same number (after an unload, numbers start again)
  // is another model, with a generator of its own.
  if (found.ok() && (*found)->version() == version_ && *found != last_ && !last_->Retiring()) {
    last_ = *std::move(found);
    hold_ = Deployment::Hold(last_);
  }
  return last_;
}

absl::StatusOr<std::vector<Tensor>> VersionRoute::Step(const std::vector<Tensor>& inputs,
                                                       RequestOptions options) {
  options.pinned_version = version_;
  return coordinator_->InferOn(Target(), inputs, options);
}

Generation::Generation(Coordinator* coordinator, GeneratorOptions options)
    : coordinator_(coordinator), options_(options) {
  coordinator_->SetRetiredListener(
      [this](const std::string& model, int64_t version, bool unloaded) {
        Retired(model, version, unloaded);
      });
}

Generation::~Generation() { coordinator_->SetRetiredListener(nullptr); }

void Generation::Retired(const std::string& model, int64_t version, bool unloaded) {
  std::shared_ptr<Generator> gone;  // destroyed outside the lock
  absl::MutexLock l(&mu_);
  auto made = generators_.find(model);
  if (made != generators_.end() && made->second.version == version) {
    gone = std::move(made->second.generator);
    generators_.erase(made);
    if (unloaded) gone->Stop(absl::UnavailableError(absl::StrCat("model \"", model, "\" was unloaded")));
  }
  auto tokenized = tokenizers_.find(model);
  if (tokenized != tokenizers_.end() && tokenized->second.version == version) {
    tokenizers_.erase(tokenized);
  }
}

absl::StatusOr<std::shared_ptr<Generator>> Generation::For(const std::string& model) {
  ASSIGN_OR_RETURN(std::shared_ptr<Deployment> d, coordinator_->Find(model));
  return ForDeployment(model, &d);
}

absl::StatusOr<TextModel> Generation::Text(const std::string& model) {
  ASSIGN_OR_RETURN(std::shared_ptr<Deployment> d, coordinator_->Find(model));
  TextModel text;
  ASSIGN_OR_RETURN(text.generator, ForDeployment(model, &d));
  const TokenizerSpec& spec = d->plan().tokenizer();
  if (spec.kind_case() == TokenizerSpec::KIND_NOT_SET) {
    return absl::FailedPreconditionError(absl::StrCat(
        "model \"", model, "\" was uploaded without a tokenizer: send token ids, or upload it "
        "with one (UploadOptions.tokenizer)"));
  }
  text.chat = spec.chat_template();
  const int64_t version = d->version();
  {
    absl::MutexLock l(&mu_);
    const Tokenized& t = tokenizers_[model];
    if (t.tokenizer != nullptr && t.version == version) {
      text.tokenizer = t.tokenizer;
      return text;
    }
  }
  // Made outside the lock (loading one takes a while); checked at upload,
  // so only a library that went missing since fails here.
  ASSIGN_OR_RETURN(std::unique_ptr<Tokenizer> made, MakeTokenizer(spec));
  text.tokenizer = std::move(made);
  absl::MutexLock l(&mu_);
  tokenizers_[model] = Tokenized{version, text.tokenizer};
  return text;
}

// A version's generator is made once (the same config after an unload
// and upload of the same version number: the stages are new, and the
// sequences rebuilt on them). A new version gets a new one; the old one
// leaves the map and goes, with its route's hold, once its last request
// ends. Two generators of one version would hand out the same blocks of
// the same stages, so a request that found a version older than the
// generator's (an upload came in between) takes the newer generator while
// its version serves the name.
absl::StatusOr<std::shared_ptr<Generator>> Generation::ForDeployment(
    const std::string& model, std::shared_ptr<Deployment>* found) {
  std::shared_ptr<Deployment>& d = *found;
  absl::MutexLock l(&mu_);
  // Replaced or unloaded since the caller found it: whichever version
  // serves now. (A generator made for it here would outlive Retired's
  // erasing, a second one for its version.)
  if (d->LeftService()) {
    ASSIGN_OR_RETURN(d, coordinator_->Find(model));
  }
  ASSIGN_OR_RETURN(GenerationConfig config, GenerationConfigOf(model, d->plan(), d->replicas()));
  Made& made = generators_[model];
  if (made.generator != nullptr && made.version == d->version() &&
      SameConfig(made.generator->config(), config)) {
    return made.generator;
  }
  if (made.generator != nullptr && made.version > d->version()) {
    absl::StatusOr<std::shared_ptr<Deployment>> now = coordinator_->Find(model);
    if (now.ok() && (*now)->version() == made.version) {
      d = *std::move(now);
      return made.generator;
    }
  }
  GeneratorOptions options = options_;
  if (options.steps_in_flight <= 0) {  // one per stage and one more, unless they take turns
    options.steps_in_flight =
        coordinator_->StagesShareCores() ? 1 : d->plan().stages_size() + 1;
  }
  const absl::Duration step_timeout = coordinator_->default_timeout();
  made.version = d->version();
  auto route = std::make_shared<VersionRoute>(coordinator_, model, d);
  made.generator = std::make_shared<Generator>(
      std::move(config), options,
      [route, step_timeout](const std::vector<Tensor>& inputs, absl::Time deadline, int lane) {
        RequestOptions step;
        step.deadline = std::min(deadline, absl::Now() + step_timeout);
        step.lane = lane;
        return route->Step(inputs, step);
      });
  return made.generator;
}

std::vector<std::pair<std::string, GeneratorStats>> Generation::Stats() {
  std::vector<std::pair<std::string, std::shared_ptr<Generator>>> gens;
  {
    absl::MutexLock l(&mu_);
    for (const auto& [name, made] : generators_) gens.emplace_back(name, made.generator);
  }
  std::vector<std::pair<std::string, GeneratorStats>> out;
  for (auto& [name, gen] : gens) out.emplace_back(name, gen->Stats());
  return out;
}

std::string RenderGenerationMetrics(
    const std::vector<std::pair<std::string, GeneratorStats>>& stats) {
  if (stats.empty()) return "";
  std::string out;
  auto family = [&](const char* name, const char* type, const char* help, auto value) {
    absl::StrAppend(&out, "# HELP ", name, " ", help, "\n# TYPE ", name, " ", type, "\n");
    for (const auto& [model, s] : stats) value(model, s);
  };
  auto line = [&](const char* name, const std::string& model, const std::string& extra,
                  double v) {
    absl::StrAppend(&out, name, "{model=\"", model, "\"", extra, "} ", v, "\n");
  };
  family("pipeserve_kv_cache_blocks", "gauge",
         "KV cache blocks of a generation model (every stage holds as many)",
         [&](const std::string& m, const GeneratorStats& s) {
           line("pipeserve_kv_cache_blocks", m, ",state=\"used\"", s.blocks_used);
           line("pipeserve_kv_cache_blocks", m, ",state=\"free\"", s.blocks_total - s.blocks_used);
         });
  family("pipeserve_generation_sequences", "gauge", "Sequences generating or waiting for cache",
         [&](const std::string& m, const GeneratorStats& s) {
           line("pipeserve_generation_sequences", m, ",state=\"running\"", s.running);
           line("pipeserve_generation_sequences", m, ",state=\"waiting\"", s.waiting);
         });
  family("pipeserve_generation_steps_total", "counter", "Generation steps run",
         [&](const std::string& m, const GeneratorStats& s) {
           line("pipeserve_generation_steps_total", m, "", s.steps);
         });
  family("pipeserve_generation_rebuilt_total", "counter",
         "Sequences prefilled again after a stage lost their cache",
         [&](const std::string& m, const GeneratorStats& s) {
           line("pipeserve_generation_rebuilt_total", m, "", s.rebuilt);
         });
  family("pipeserve_generation_preemptions_total", "counter",
         "Times a sequence gave its KV cache blocks up to others (it is prefilled again later)",
         [&](const std::string& m, const GeneratorStats& s) {
           line("pipeserve_generation_preemptions_total", m, "", s.preempted);
         });
  family("pipeserve_generation_finished_total", "counter", "Sequences ended",
         [&](const std::string& m, const GeneratorStats& s) {
           line("pipeserve_generation_finished_total", m, "", s.finished);
         });
  return out;
}

}  // namespace pipeserve
