#include "server/coordinator/openai_rest.h"

#include <algorithm>
#include <atomic>
#include <system_error>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "common/status_macros.h"
#include "server/coordinator/kserve_rest.h"
#include "server/coordinator/text_completion.h"

namespace pipeserve {
namespace {

HttpResponse ErrorResponse(int status, absl::string_view message) {
  HttpResponse r;
  r.status = status;
  r.body = OpenAiErrorJson(status, message);
  return r;
}

// Calls run(i) for i in [0, n), each on a thread of its own when n > 1
// (on this one, after the others, where no thread can be had).
void RunAll(size_t n, const std::function<void(size_t)>& run) {
  if (n == 1) return run(0);
  std::vector<std::thread> threads;
  std::vector<size_t> here;
  for (size_t i = 0; i < n; ++i) {
    try {
      threads.emplace_back(run, i);
    } catch (const std::system_error&) {
      here.push_back(i);
    }
  }
  for (size_t i : here) run(i);
  for (std::thread& t : threads) t.join();
}

// The job of prompt `p`, checked as Generate would before it runs, so that
// a stream starts only for a request that can run (a request that could
// never fit the cache is a bad request here: trying again cannot help).
// Without max_tokens, `to_the_end` lets it run to the last position.
absl::StatusOr<OpenAiRest::Job> JobOf(const OpenAiPrompt& prompt, size_t p, const OpenAiCommon& c,
                                      const TextModel& text, bool to_the_end) {
  OpenAiRest::Job job;
  job.request.prompt = prompt.ids;
  if (prompt.is_text) {
    ASSIGN_OR_RETURN(job.request.prompt, text.tokenizer->Encode(prompt.text, /*add_bos=*/true));
  }
  if (job.request.prompt.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("prompt ", p, " is empty (no tokens)"));
  }
  job.request.sampling = c.sampling;
  const int64_t length = static_cast<int64_t>(job.request.prompt.size());
  if (to_the_end && !c.max_tokens_given) {
    job.request.sampling.max_tokens = std::max<int64_t>(1, text.generator->MaxPositions() - length + 1);
  }
  if (absl::Status s = text.generator->Check(job.request); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("prompt ", p, ": ", s.message()));
  }
  return job;
}

// The jobs of `prompts` (each n times, the seed of choice k seed + k).
absl::StatusOr<std::vector<OpenAiRest::Job>> Jobs(const std::vector<OpenAiPrompt>& prompts,
                                                  const OpenAiCommon& c, const TextModel& text,
                                                  bool echo, bool to_the_end,
                                                  int64_t* prompt_tokens) {
  std::vector<OpenAiRest::Job> jobs;
  for (size_t p = 0; p < prompts.size(); ++p) {
    ASSIGN_OR_RETURN(OpenAiRest::Job job, JobOf(prompts[p], p, c, text, to_the_end));
    *prompt_tokens += static_cast<int64_t>(job.request.prompt.size());
    if (echo) {
      job.echo = prompts[p].is_text ? prompts[p].text : text.tokenizer->Decode(job.request.prompt, true);
    }
    for (int k = 0; k < c.n; ++k) {
      jobs.push_back(job);
      jobs.back().request.sampling.seed += jobs.size() - 1;
    }
  }
  return jobs;
}

}  // namespace

absl::StatusOr<std::string> RenderChat(const std::string& model, const ChatTemplate& chat,
                                       const std::vector<ChatMessage>& messages) {
  if (chat.roles().empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "model \"", model, "\" was uploaded without a chat template: use /v1/completions, or "
        "upload it with one (TokenizerSpec.chat_template)"));
  }
  std::string prompt = chat.prefix();
  for (const ChatMessage& m : messages) {
    auto format = chat.roles().find(m.role);
    if (format == chat.roles().end()) {
      std::vector<std::string> roles;
      for (const auto& [role, f] : chat.roles()) roles.push_back(role);
      std::sort(roles.begin(), roles.end());
      return absl::InvalidArgumentError(absl::StrCat(
          "role \"", m.role.substr(0, 64), "\" is not in the chat template of \"", model,
          "\" (it has ", absl::StrJoin(roles, ", "), ")"));
    }
    absl::StrAppend(&prompt, absl::StrReplaceAll(format->second, {{"{content}", m.content}}));
  }
  absl::StrAppend(&prompt, chat.generation_prompt());
  return prompt;
}

HttpResponse OpenAiRest::Error(const absl::Status& s) {
  const absl::Status p = core_->Public(s);
  return ErrorResponse(HttpStatusOf(p.code()), p.message());
}

HttpResponse OpenAiRest::Handle(const HttpRequest& r) {
  if (absl::Status auth = AuthorizeCall(tokens_, r.Header("authorization"), Scope::kInfer);
      !auth.ok()) {
    HttpResponse denied = Error(auth);
    if (denied.status == 401) denied.headers.emplace_back("WWW-Authenticate", "Bearer");
    return denied;
  }
  const std::vector<std::string> p = absl::StrSplit(r.path, '/', absl::SkipEmpty());
  const bool get = r.method == "GET" || r.method == "HEAD";
  if (generation_ != nullptr && p.size() >= 2 && p.size() <= 3 && p[0] == "v1" &&
      p[1] == "models" && get) {
    return Models(p.size() == 3 ? p[2] : "");
  }
  if (generation_ != nullptr && r.method == "POST" && p.size() == 2 && p[0] == "v1" &&
      p[1] == "completions") {
    return Completions(r);
  }
  if (generation_ != nullptr && r.method == "POST" && p.size() == 3 && p[0] == "v1" &&
      p[1] == "chat" && p[2] == "completions") {
    return Chat(r);
  }
  return ErrorResponse(404, absl::StrCat("no route ", r.method, " ", r.path.substr(0, 200),
                                         " (OpenAI: POST /v1/completions, POST "
                                         "/v1/chat/completions, GET /v1/models[/{model}])"));
}

HttpResponse OpenAiRest::Models(const std::string& only) {
  std::vector<std::string> names;
  for (const ModelInfo& m : core_->coordinator()->ListModels()) {
    if (m.state == ModelState::kReady && m.plan->has_tokenizer() && (only.empty() || m.name == only)) {
      names.push_back(m.name);
    }
  }
  if (!only.empty()) {
    if (names.empty()) {
      return ErrorResponse(404, absl::StrCat("the model \"", only.substr(0, 200),
                                             "\" does not exist, or has no tokenizer"));
    }
    HttpResponse one;
    one.body = OpenAiModelJson(names[0]);
    return one;
  }
  HttpResponse out;
  out.body = OpenAiModelsJson(names);
  return out;
}

HttpResponse OpenAiRest::Completions(const HttpRequest& r) {
  absl::StatusOr<CompletionRequest> req = CompletionRequestFromJson(r.body);
  if (!req.ok()) return Error(req.status());
  absl::StatusOr<TextModel> text = generation_->Text(req->common.model);
  if (!text.ok()) return Error(text.status());
  int64_t prompt_tokens = 0;
  absl::StatusOr<std::vector<Job>> jobs =
      Jobs(req->prompts, req->common, *text, req->echo, /*to_the_end=*/false, &prompt_tokens);
  if (!jobs.ok()) return Error(jobs.status());
  return Run(r, *text, NewHeader(req->common.model, false), req->common, *std::move(jobs),
             prompt_tokens);
}

HttpResponse OpenAiRest::Chat(const HttpRequest& r) {
  absl::StatusOr<ChatRequest> req = ChatRequestFromJson(r.body);
  if (!req.ok()) return Error(req.status());
  absl::StatusOr<TextModel> text = generation_->Text(req->common.model);
  if (!text.ok()) return Error(text.status());
  absl::StatusOr<std::string> prompt = RenderChat(req->common.model, text->chat, req->messages);
  if (!prompt.ok()) return Error(prompt.status());
  // Without max_tokens, a reply may run to the last position the model
  // (and the cache) holds.
  int64_t prompt_tokens = 0;
  absl::StatusOr<std::vector<Job>> jobs = Jobs({OpenAiPrompt{true, *prompt, {}}}, req->common,
                                               *text, false, /*to_the_end=*/true, &prompt_tokens);
  if (!jobs.ok()) return Error(jobs.status());
  return Run(r, *text, NewHeader(req->common.model, true), req->common, *std::move(jobs),
             prompt_tokens);
}

// One request's choices as they run, shared by their threads.
struct OpenAiRest::Choices {
  TextModel text;
  OpenAiHeader header;
  OpenAiCommon common;
  std::vector<OpenAiRest::Job> jobs;
  absl::Time deadline;
  std::atomic<bool> failed{false};  // one failed: the others stop
  absl::Mutex mu;
  absl::Status error ABSL_GUARDED_BY(mu);
  OpenAiUsage usage ABSL_GUARDED_BY(mu);

  // Runs choice i; `on_text` gets its text, `cancelled` says to stop. Its
  // tokens are in `usage` when it returns.
  absl::StatusOr<Completion> Complete(size_t i, const std::function<bool(absl::string_view)>& on_text,
                                      const std::function<bool()>& cancelled) {
    GenerationRequest request = jobs[i].request;
    request.deadline = deadline;
    absl::StatusOr<Completion> c = pipeserve::Complete(
        *text.generator, *text.tokenizer, std::move(request), common.stop, on_text,
        [&] { return failed.load() || (cancelled && cancelled()); });
    absl::MutexLock l(&mu);
    if (!c.ok()) {
      if (!failed.exchange(true)) error = c.status();
      return c;
    }
    usage.completion_tokens += c->tokens;
    return c;
  }
};

HttpResponse OpenAiRest::Run(const HttpRequest& r, const TextModel& text, const OpenAiHeader& h,
                             const OpenAiCommon& common, std::vector<Job> jobs,
                             int64_t prompt_tokens) {
  auto run = std::make_shared<Choices>();
  run->text = text;
  run->header = h;
  run->common = common;
  run->jobs = std::move(jobs);
  run->deadline = core_->coordinator()->GenerationDeadline();
  {
    absl::MutexLock l(&run->mu);
    run->usage.prompt_tokens = prompt_tokens;
  }
  if (!common.stream) return RunWhole(r, *run);
  KServeCore* core = core_;
  return HttpResponse::EventStream([run, core](HttpStream& out) { Stream(*run, core, out); });
}

HttpResponse OpenAiRest::RunWhole(const HttpRequest& r, Choices& run) {
  std::vector<OpenAiChoice> out(run.jobs.size());
  RunAll(out.size(), [&](size_t i) {
    out[i].text = run.jobs[i].echo;
    absl::StatusOr<Completion> c = run.Complete(
        i, [&](absl::string_view s) { return out[i].text.append(s.data(), s.size()), true; },
        r.client_gone);
    if (c.ok()) out[i].finish_reason = c->finish_reason;
  });
  absl::MutexLock l(&run.mu);
  if (run.failed.load()) return Error(run.error);
  HttpResponse resp;
  resp.body = OpenAiResponseJson(run.header, out, run.usage);
  return resp;
}

void OpenAiRest::Stream(Choices& run, KServeCore* core, HttpStream& out) {
  absl::Mutex write_mu;
  // Choices whose last chunk is still to be written: the one that writes
  // the last of those writes the stream's last chunk, and carries the usage.
  size_t finals_left = run.jobs.size();  // under write_mu
  auto write = [&](const std::string& json) {
    absl::MutexLock l(&write_mu);
    return WriteEvent(out, json);
  };
  const OpenAiHeader& h = run.header;
  RunAll(run.jobs.size(), [&](size_t i) {
    const int index = static_cast<int>(i);
    if (h.chat) write(OpenAiChunkJson(h, index, "", "", /*first=*/true, nullptr));
    if (!run.jobs[i].echo.empty()) {
      write(OpenAiChunkJson(h, index, run.jobs[i].echo, "", false, nullptr));
    }
    absl::StatusOr<Completion> c = run.Complete(
        i, [&](absl::string_view s) { return write(OpenAiChunkJson(h, index, s, "", false, nullptr)); },
        [&out] { return out.ClientGone(); });
    if (!c.ok()) return;
    // Counted and written under one lock: a choice that finished earlier
    // cannot write its last chunk after the one carrying the usage (all
    // choices have added theirs by then).
    absl::MutexLock l(&write_mu);
    const bool last = --finals_left == 0 && !run.common.include_usage;
    OpenAiUsage usage;
    if (last) {
      absl::MutexLock u(&run.mu);
      usage = run.usage;
    }
    WriteEvent(out, OpenAiChunkJson(h, index, "", c->finish_reason, false, last ? &usage : nullptr));
  });
  if (out.ClientGone()) return;
  absl::Status error;
  OpenAiUsage usage;
  {
    absl::MutexLock l(&run.mu);
    error = run.error;
    usage = run.usage;
  }
  if (run.failed.load()) {
    const absl::Status p = core->Public(error);
    write(OpenAiErrorJson(HttpStatusOf(p.code()), p.message()));
  } else if (run.common.include_usage) {
    write(OpenAiUsageChunkJson(h, usage));
  }
  WriteEvent(out, "[DONE]");
}

}  // namespace pipeserve
