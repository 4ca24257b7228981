#include "server/coordinator/generate_json.h"

#include <random>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "nlohmann/json.hpp"
#include "server/coordinator/kserve_json.h"

namespace pipeserve {
namespace {

using Json = nlohmann::json;

absl::Status Invalid(absl::string_view key, absl::string_view want) {
  return absl::InvalidArgumentError(absl::StrCat("\"", key, "\" must be ", want));
}

absl::StatusOr<std::vector<int64_t>> Ids(const Json& v, absl::string_view key) {
  if (!v.is_array()) return Invalid(key, "an array of token ids");
  std::vector<int64_t> ids;
  for (const Json& id : v) {
    if (!id.is_number_integer()) return Invalid(key, "an array of token ids (integers)");
    ids.push_back(id.get<int64_t>());
  }
  return ids;
}

// Words as TensorRT-LLM's Triton models take them: a string, or a list of
// strings; "" and empty strings are none.
absl::StatusOr<std::vector<std::string>> Words(const Json& v, absl::string_view key) {
  const Json list = v.is_string() ? Json::array({v}) : v;
  if (!list.is_array() || list.size() > 16) return Invalid(key, "a string or a list of up to 16");
  std::vector<std::string> words;
  for (const Json& w : list) {
    if (!w.is_string()) return Invalid(key, "a string or a list of up to 16 strings");
    if (!w.get<std::string>().empty()) words.push_back(w.get<std::string>());
  }
  return words;
}

// TensorRT-LLM's keys: end_id a stop token, pad_id nothing here (no
// padding), stop_words stop strings, bad_words only when none. False when
// `key` is none of them.
absl::StatusOr<bool> TrtLlmKey(const std::string& key, const Json& v, GenerationRequest* r,
                               TextPrompt* text) {
  if (key == "end_id" || key == "pad_id") {
    if (!v.is_number_integer()) return Invalid(key, "an integer (a token id)");
    if (key == "end_id") r->sampling.stop_token_ids.push_back(v.get<int64_t>());
    return true;
  }
  if (key == "stop_words") {
    ASSIGN_OR_RETURN(std::vector<std::string> words, Words(v, key));
    text->stop.insert(text->stop.end(), words.begin(), words.end());
    return true;
  }
  if (key == "bad_words") {
    ASSIGN_OR_RETURN(std::vector<std::string> words, Words(v, key));
    if (!words.empty()) {
      return absl::InvalidArgumentError(
          "\"bad_words\" is not supported: the sampler bans no tokens (give \"\" or none)");
    }
    return true;
  }
  return false;
}

// One sampling key into `p`; kInvalidArgument for an unknown key or a
// value of the wrong type (ranges are checked by CheckSampling).
absl::Status SamplingKey(const std::string& key, const Json& v, SamplingParams* p, bool* seeded) {
  if (key == "max_tokens" || key == "top_k" || key == "seed") {
    if (!v.is_number_integer()) return Invalid(key, "an integer");
    if (key == "max_tokens") p->max_tokens = v.get<int64_t>();
    if (key == "top_k") p->top_k = v.get<int64_t>();
    if (key == "seed") {
      p->seed = v.is_number_unsigned() ? v.get<uint64_t>() : static_cast<uint64_t>(v.get<int64_t>());
      *seeded = true;
    }
    return absl::OkStatus();
  }
  if (key == "temperature" || key == "top_p" || key == "repetition_penalty" ||
      key == "frequency_penalty") {
    if (!v.is_number()) return Invalid(key, "a number");
    const double x = v.get<double>();
    if (key == "temperature") p->temperature = x;
    if (key == "top_p") p->top_p = x;
    if (key == "repetition_penalty") p->repetition_penalty = x;
    if (key == "frequency_penalty") p->frequency_penalty = x;
    return absl::OkStatus();
  }
  if (key == "stop_token_ids") {
    ASSIGN_OR_RETURN(p->stop_token_ids, Ids(v, key));
    return absl::OkStatus();
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown key \"", key.substr(0, 64), "\" (a generate request takes input_ids or "
      "text_input, "
      "max_tokens, temperature, top_k, top_p, repetition_penalty, frequency_penalty, "
      "stop_token_ids, seed, and TensorRT-LLM's end_id, pad_id, stop_words, bad_words; at the "
      "top or under \"parameters\")"));
}

}  // namespace

absl::StatusOr<GenerationRequest> GenerationRequestFromJson(absl::string_view body,
                                                            TextPrompt* text) {
  ASSIGN_OR_RETURN(Json j, ParseJsonBody(body));
  if (!j.is_object()) return absl::InvalidArgumentError("the request must be a JSON object");
  GenerationRequest r;
  bool seeded = false;
  auto option = [&](const std::string& key, const Json& v) -> absl::Status {
    ASSIGN_OR_RETURN(bool taken, TrtLlmKey(key, v, &r, text));
    return taken ? absl::OkStatus() : SamplingKey(key, v, &r.sampling, &seeded);
  };
  for (const auto& [key, v] : j.items()) {
    if (key == "input_ids") {
      ASSIGN_OR_RETURN(r.prompt, Ids(v, key));
    } else if (key == "text_input") {
      if (!v.is_string() || v.get<std::string>().empty()) return Invalid(key, "non-empty text");
      text->input = v.get<std::string>();
    } else if (key == "parameters") {
      if (!v.is_object()) return Invalid(key, "an object");
      for (const auto& [k, pv] : v.items()) RETURN_IF_ERROR(option(k, pv));
    } else {
      RETURN_IF_ERROR(option(key, v));
    }
  }
  if (!text->input.empty() && !r.prompt.empty()) {
    return absl::InvalidArgumentError("give input_ids or text_input, not both");
  }
  if (r.prompt.empty() && text->input.empty()) {
    return Invalid("input_ids", "a non-empty array of token ids (or give text_input)");
  }
  if (!text->stop.empty() && text->input.empty()) {
    return Invalid("stop_words", "given with text_input (stop strings are matched on text; "
                                 "with input_ids give stop_token_ids)");
  }
  if (!seeded) {
    std::random_device rd;
    r.sampling.seed = (static_cast<uint64_t>(rd()) << 32) | rd();
  }
  return r;
}

std::string TokenEventJson(const GeneratedToken& t, int64_t prompt_tokens) {
  Json j{{"token_id", t.id}, {"index", t.index}};
  if (!t.finish_reason.empty()) {
    j["finish_reason"] = t.finish_reason;
    j["prompt_tokens"] = prompt_tokens;
  }
  return j.dump();
}

std::string GenerateResponseJson(const std::string& model, const std::vector<int64_t>& ids,
                                 const std::string& finish_reason, int64_t prompt_tokens) {
  return Json{{"model_name", model},
              {"token_ids", ids},
              {"finish_reason", finish_reason},
              {"prompt_tokens", prompt_tokens}}
      .dump(-1, ' ', false, Json::error_handler_t::replace);
}

namespace {

Json TextJson(const std::string& model, absl::string_view text, const std::string& finish_reason,
              int64_t prompt_tokens, int64_t completion_tokens) {
  Json j{{"model_name", model}, {"text_output", std::string(text)}};
  if (!finish_reason.empty()) {
    j["finish_reason"] = finish_reason;
    j["prompt_tokens"] = prompt_tokens;
    j["completion_tokens"] = completion_tokens;
  }
  return j;
}

}  // namespace

std::string TextEventJson(const std::string& model, absl::string_view text,
                          const std::string& finish_reason, int64_t prompt_tokens,
                          int64_t completion_tokens) {
  return TextJson(model, text, finish_reason, prompt_tokens, completion_tokens)
      .dump(-1, ' ', false, Json::error_handler_t::replace);
}

std::string GenerateTextResponseJson(const std::string& model, const std::string& text,
                                     const std::string& finish_reason, int64_t prompt_tokens,
                                     int64_t completion_tokens) {
  return TextEventJson(model, text, finish_reason, prompt_tokens, completion_tokens);
}

}  // namespace pipeserve
