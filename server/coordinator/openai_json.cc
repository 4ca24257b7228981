#include "server/coordinator/openai_json.h"

#include <random>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "common/status_macros.h"
#include "nlohmann/json.hpp"
#include "server/coordinator/kserve_json.h"

namespace pipeserve {
namespace {

using Json = nlohmann::json;

absl::Status Invalid(absl::string_view key, absl::string_view want) {
  return absl::InvalidArgumentError(absl::StrCat("\"", key, "\" must be ", want));
}

absl::Status Unsupported(absl::string_view key, absl::string_view why) {
  return absl::InvalidArgumentError(absl::StrCat("\"", key, "\" is not supported: ", why));
}

uint64_t RandomSeed() {
  std::random_device rd;
  return (static_cast<uint64_t>(rd()) << 32) | rd();
}

absl::StatusOr<std::vector<int64_t>> Ids(const Json& v, absl::string_view key) {
  std::vector<int64_t> ids;
  for (const Json& id : v) {
    if (!id.is_number_integer()) return Invalid(key, "text, token ids, or a list of either");
    ids.push_back(id.get<int64_t>());
  }
  return ids;
}

absl::Status Stop(const Json& given, std::vector<std::string>* stop) {
  const Json v = given.is_string() ? Json::array({given}) : given;
  if (!v.is_array() || v.size() > 4) return Invalid("stop", "a string or a list of up to 4");
  for (const Json& s : v) {
    if (!s.is_string() || s.get<std::string>().empty()) {
      return Invalid("stop", "a string or a list of up to 4 non-empty strings");
    }
    stop->push_back(s.get<std::string>());
  }
  return absl::OkStatus();
}

absl::Status Number(const std::string& key, const Json& v, double* out) {
  if (!v.is_number()) return Invalid(key, "a number");
  *out = v.get<double>();
  return absl::OkStatus();
}

absl::Status Integer(const std::string& key, const Json& v, int64_t* out) {
  if (!v.is_number_integer()) return Invalid(key, "an integer");
  *out = v.get<int64_t>();
  return absl::OkStatus();
}

// Keys OpenAI has that pipeserve accepts only at their neutral value.
absl::Status Neutral(const std::string& key, const Json& v, bool* handled) {
  *handled = true;
  if (key == "logprobs" || key == "top_logprobs") {
    if ((v.is_boolean() && !v.get<bool>()) || (v.is_number_integer() && v.get<int64_t>() == 0)) {
      return absl::OkStatus();
    }
    return Unsupported(key, "pipeserve does not return log probabilities yet");
  }
  if (key == "presence_penalty") {
    if (v.is_number() && v.get<double>() == 0) return absl::OkStatus();
    return Unsupported(key, "use frequency_penalty or repetition_penalty");
  }
  if (key == "logit_bias") {
    if (v.is_object() && v.empty()) return absl::OkStatus();
    return Unsupported(key, "only {} is accepted");
  }
  if (key == "user") return v.is_string() ? absl::OkStatus() : Invalid(key, "a string");
  *handled = false;
  return absl::OkStatus();
}

// The sampling keys; `handled` false for other keys.
absl::Status SamplingKey(const std::string& key, const Json& v, OpenAiCommon* c, bool* handled) {
  *handled = true;
  SamplingParams& p = c->sampling;
  if (key == "max_tokens" || key == "max_completion_tokens") {
    c->max_tokens_given = true;
    return Integer(key, v, &p.max_tokens);
  }
  if (key == "temperature") return Number(key, v, &p.temperature);
  if (key == "top_p") return Number(key, v, &p.top_p);
  if (key == "frequency_penalty") return Number(key, v, &p.frequency_penalty);
  if (key == "repetition_penalty") return Number(key, v, &p.repetition_penalty);
  if (key == "top_k") {
    RETURN_IF_ERROR(Integer(key, v, &p.top_k));
    if (p.top_k == -1) p.top_k = 0;  // vLLM's "every token"
    return absl::OkStatus();
  }
  if (key == "seed") {
    if (!v.is_number_integer()) return Invalid(key, "an integer");
    p.seed = v.is_number_unsigned() ? v.get<uint64_t>() : static_cast<uint64_t>(v.get<int64_t>());
    c->seeded = true;
    return absl::OkStatus();
  }
  if (key == "stop") return Stop(v, &c->stop);
  if (key == "stop_token_ids") {
    if (!v.is_array()) return Invalid(key, "a list of token ids");
    ASSIGN_OR_RETURN(p.stop_token_ids, Ids(v, key));
    return absl::OkStatus();
  }
  return Neutral(key, v, handled);
}

// The keys both requests share; `handled` false for others.
absl::Status CommonKey(const std::string& key, const Json& v, OpenAiCommon* c, bool* handled) {
  *handled = true;
  if (key == "model") {
    if (!v.is_string() || v.get<std::string>().empty()) return Invalid(key, "a model's name");
    c->model = v.get<std::string>();
    return absl::OkStatus();
  }
  if (key == "n") {
    int64_t n = 0;
    RETURN_IF_ERROR(Integer(key, v, &n));
    if (n < 1 || n > kMaxChoices) return Invalid(key, absl::StrCat("in [1, ", kMaxChoices, "]"));
    c->n = static_cast<int>(n);
    return absl::OkStatus();
  }
  if (key == "stream") {
    if (!v.is_boolean()) return Invalid(key, "true or false");
    c->stream = v.get<bool>();
    return absl::OkStatus();
  }
  if (key == "stream_options") {
    if (!v.is_object()) return Invalid(key, "an object");
    for (const auto& [k, o] : v.items()) {
      if (k != "include_usage" || !o.is_boolean()) {
        return Invalid(key, "{\"include_usage\": true or false}");
      }
      c->include_usage = o.get<bool>();
    }
    c->stream_options = true;
    return absl::OkStatus();
  }
  return SamplingKey(key, v, c, handled);
}

absl::Status UnknownKey(const std::string& key, absl::string_view takes) {
  return absl::InvalidArgumentError(absl::StrCat(
      "unrecognized request argument \"", key.substr(0, 64), "\" (", takes, ")"));
}

constexpr char kCompletionKeys[] =
    "a completion takes model, prompt, max_tokens, temperature, top_p, top_k, n, stream, "
    "stream_options, stop, seed, echo, frequency_penalty, repetition_penalty, stop_token_ids, "
    "best_of, user; logprobs, presence_penalty, logit_bias and suffix only at their defaults";
constexpr char kChatKeys[] =
    "a chat completion takes model, messages, max_tokens, max_completion_tokens, temperature, "
    "top_p, top_k, n, stream, stream_options, stop, seed, frequency_penalty, "
    "repetition_penalty, stop_token_ids, user; logprobs, top_logprobs, presence_penalty and "
    "logit_bias only at their defaults";

absl::Status Prompts(const Json& v, std::vector<OpenAiPrompt>* prompts) {
  auto one = [&](const Json& p) -> absl::Status {
    OpenAiPrompt prompt;
    if (p.is_string()) {
      prompt.text = p.get<std::string>();
    } else if (p.is_array()) {
      prompt.is_text = false;
      ASSIGN_OR_RETURN(prompt.ids, Ids(p, "prompt"));
    } else {
      return Invalid("prompt", "text, token ids, or a list of either");
    }
    prompts->push_back(std::move(prompt));
    return absl::OkStatus();
  };
  // A list of strings or of id lists is a batch; a list of integers is one prompt.
  if (v.is_array() && !v.empty() && (v[0].is_string() || v[0].is_array())) {
    for (const Json& p : v) RETURN_IF_ERROR(one(p));
    return absl::OkStatus();
  }
  return one(v);
}

absl::Status CheckCommon(const OpenAiCommon& c, size_t prompts) {
  if (c.model.empty()) return absl::InvalidArgumentError("\"model\" is missing");
  if (c.stream_options && !c.stream) {  // as OpenAI and vLLM: not silently unused
    return absl::InvalidArgumentError("\"stream_options\" is only taken with \"stream\": true");
  }
  if (prompts * c.n > kMaxChoices) {
    return absl::InvalidArgumentError(absl::StrCat(
        prompts, " prompts x n = ", c.n, " asks for more than ", kMaxChoices, " choices"));
  }
  return absl::OkStatus();
}

absl::StatusOr<Json> Object(absl::string_view body) {
  ASSIGN_OR_RETURN(Json j, ParseJsonBody(body));
  if (!j.is_object()) return absl::InvalidArgumentError("the request must be a JSON object");
  return j;
}

OpenAiCommon Defaults() {
  OpenAiCommon c;
  c.sampling.temperature = 1;  // OpenAI's default
  c.sampling.seed = RandomSeed();
  return c;
}

absl::StatusOr<ChatMessage> Message(const Json& m) {
  if (!m.is_object() || !m.contains("role") || !m["role"].is_string()) {
    return Invalid("messages", "a list of {\"role\": ..., \"content\": ...}");
  }
  ChatMessage msg{m["role"].get<std::string>(), ""};
  const Json content = m.value("content", Json());
  if (content.is_string()) {
    msg.content = content.get<std::string>();
  } else if (content.is_array()) {  // parts: only text
    for (const Json& part : content) {
      // Checked key by key: a const json's [] of a missing key asserts, and
      // value() of a key of another type throws.
      const bool text_part = part.is_object() && part.contains("type") &&
                             part["type"].is_string() && part["type"] == "text" &&
                             part.contains("text") && part["text"].is_string();
      if (!text_part) {
        return Invalid("messages", "text: content parts other than {\"type\": \"text\"} are "
                                   "not supported");
      }
      msg.content += part["text"].get<std::string>();
    }
  } else if (!content.is_null()) {
    return Invalid("messages", "messages whose content is text or a list of text parts");
  }
  return msg;
}

}  // namespace

absl::StatusOr<CompletionRequest> CompletionRequestFromJson(absl::string_view body) {
  ASSIGN_OR_RETURN(Json j, Object(body));
  CompletionRequest r;
  r.common = Defaults();
  bool has_prompt = false;
  Json best_of;
  for (const auto& [key, v] : j.items()) {
    if (v.is_null()) continue;  // as absent, as OpenAI takes it
    bool handled = false;
    RETURN_IF_ERROR(CommonKey(key, v, &r.common, &handled));
    if (handled) continue;
    if (key == "prompt") {
      RETURN_IF_ERROR(Prompts(v, &r.prompts));
      has_prompt = true;
    } else if (key == "echo") {
      if (!v.is_boolean()) return Invalid(key, "true or false");
      r.echo = v.get<bool>();
    } else if (key == "best_of") {
      best_of = v;
    } else if (key == "suffix") {
      return Unsupported(key, "pipeserve does not insert text");
    } else {
      return UnknownKey(key, kCompletionKeys);
    }
  }
  if (!has_prompt) return absl::InvalidArgumentError("\"prompt\" is missing");
  if (!best_of.is_null() && !(best_of.is_number_integer() && best_of.get<int64_t>() == r.common.n)) {
    return Unsupported("best_of", "only best_of = n (no choices are dropped)");
  }
  RETURN_IF_ERROR(CheckCommon(r.common, r.prompts.size()));
  return r;
}

absl::StatusOr<ChatRequest> ChatRequestFromJson(absl::string_view body) {
  ASSIGN_OR_RETURN(Json j, Object(body));
  ChatRequest r;
  r.common = Defaults();
  for (const auto& [key, v] : j.items()) {
    if (v.is_null()) continue;
    bool handled = false;
    RETURN_IF_ERROR(CommonKey(key, v, &r.common, &handled));
    if (handled) continue;
    if (key != "messages") return UnknownKey(key, kChatKeys);
    if (!v.is_array()) return Invalid(key, "a list of {\"role\": ..., \"content\": ...}");
    for (const Json& m : v) {
      ASSIGN_OR_RETURN(ChatMessage msg, Message(m));
      r.messages.push_back(std::move(msg));
    }
  }
  if (r.messages.empty()) return Invalid("messages", "a non-empty list of messages");
  RETURN_IF_ERROR(CheckCommon(r.common, 1));
  return r;
}

OpenAiHeader NewHeader(const std::string& model, bool chat) {
  std::random_device rd;
  return OpenAiHeader{absl::StrFormat("%s-%08x%08x", chat ? "chatcmpl" : "cmpl", rd(), rd()),
                      absl::ToUnixSeconds(absl::Now()), model, chat};
}

namespace {

Json Base(const OpenAiHeader& h, bool chunk) {
  const char* object = h.chat ? (chunk ? "chat.completion.chunk" : "chat.completion")
                              : "text_completion";
  return Json{{"id", h.id}, {"object", object}, {"created", h.created}, {"model", h.model}};
}

Json UsageJson(const OpenAiUsage& u) {
  return Json{{"prompt_tokens", u.prompt_tokens},
              {"completion_tokens", u.completion_tokens},
              {"total_tokens", u.prompt_tokens + u.completion_tokens}};
}

Json FinishJson(const std::string& finish_reason) {
  return finish_reason.empty() ? Json() : Json(finish_reason);
}

std::string Dump(const Json& j) { return j.dump(-1, ' ', false, Json::error_handler_t::replace); }

}  // namespace

std::string OpenAiResponseJson(const OpenAiHeader& h, const std::vector<OpenAiChoice>& choices,
                               const OpenAiUsage& usage) {
  Json j = Base(h, false);
  Json list = Json::array();
  for (size_t i = 0; i < choices.size(); ++i) {
    Json c{{"index", i}, {"logprobs", nullptr}, {"finish_reason", FinishJson(choices[i].finish_reason)}};
    if (h.chat) {
      c["message"] = Json{{"role", "assistant"}, {"content", choices[i].text}};
    } else {
      c["text"] = choices[i].text;
    }
    list.push_back(std::move(c));
  }
  j["choices"] = std::move(list);
  j["usage"] = UsageJson(usage);
  return Dump(j);
}

std::string OpenAiChunkJson(const OpenAiHeader& h, int index, absl::string_view text,
                            const std::string& finish_reason, bool first,
                            const OpenAiUsage* usage) {
  Json j = Base(h, true);
  Json c{{"index", index}, {"logprobs", nullptr}, {"finish_reason", FinishJson(finish_reason)}};
  if (h.chat) {
    Json delta = Json::object();
    if (first) delta["role"] = "assistant";
    if (!text.empty() || first) delta["content"] = std::string(text);
    c["delta"] = std::move(delta);
  } else {
    c["text"] = std::string(text);
  }
  j["choices"] = Json::array({std::move(c)});
  if (usage != nullptr) j["usage"] = UsageJson(*usage);
  return Dump(j);
}

std::string OpenAiUsageChunkJson(const OpenAiHeader& h, const OpenAiUsage& usage) {
  Json j = Base(h, true);
  j["choices"] = Json::array();
  j["usage"] = UsageJson(usage);
  return Dump(j);
}

std::string OpenAiErrorJson(int status, absl::string_view message) {
  const char* type = status == 401   ? "authentication_error"
                     : status == 403 ? "permission_error"
                     : status == 404 ? "not_found_error"
                     : status == 429 ? "rate_limit_error"
                     : status >= 500 ? "server_error"
                                     : "invalid_request_error";
  return Dump(Json{{"error", Json{{"message", std::string(message)},
                                  {"type", type},
                                  {"param", nullptr},
                                  {"code", status}}}});
}

namespace {

Json ModelJson(const std::string& model) {
  return Json{{"id", model}, {"object", "model"}, {"created", 0}, {"owned_by", "pipeserve"}};
}

}  // namespace

std::string OpenAiModelsJson(const std::vector<std::string>& models) {
  Json data = Json::array();
  for (const std::string& m : models) data.push_back(ModelJson(m));
  return Dump(Json{{"object", "list"}, {"data", std::move(data)}});
}

std::string OpenAiModelJson(const std::string& model) { return Dump(ModelJson(model)); }

}  // namespace pipeserve
