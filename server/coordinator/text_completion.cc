#include "server/coordinator/text_completion.h"

#include <algorithm>

namespace pipeserve {
namespace {

// Where the earliest stop string in `text` begins, or npos.
size_t FindStop(absl::string_view text, const std::vector<std::string>& stop) {
  size_t at = absl::string_view::npos;
  for (const std::string& s : stop) {
    if (!s.empty()) at = std::min(at, text.find(s));
  }
  return at;
}

}  // namespace

size_t StopPrefixAtEnd(absl::string_view text, const std::vector<std::string>& stop) {
  size_t hold = 0;
  for (const std::string& s : stop) {
    for (size_t n = std::min(s.size() - (s.empty() ? 0 : 1), text.size()); n > hold; --n) {
      if (text.substr(text.size() - n) == absl::string_view(s).substr(0, n)) {
        hold = n;
        break;
      }
    }
  }
  return hold;
}

absl::StatusOr<Completion> Complete(Generator& generator, const Tokenizer& tokenizer,
                                    GenerationRequest request,
                                    const std::vector<std::string>& stop,
                                    const std::function<bool(absl::string_view)>& on_text,
                                    const std::function<bool()>& cancelled) {
  std::vector<int64_t>& stops = request.sampling.stop_token_ids;
  for (int64_t id : tokenizer.stop_tokens()) {
    if (std::find(stops.begin(), stops.end(), id) == stops.end()) stops.push_back(id);
  }
  Completion c;
  TextDecoder decoder(tokenizer, /*at_start=*/false);
  std::string pending;  // decoded, not yet handed out
  bool stopped = false;  // by a stop string
  absl::Status s = generator.Generate(
      request,
      [&](const GeneratedToken& t) {
        ++c.tokens;
        c.finish_reason = t.finish_reason;
        if (t.finish_reason != "stop") pending += decoder.Push(t.id);
        if (!t.finish_reason.empty()) pending += decoder.Finish();
        if (const size_t at = FindStop(pending, stop); at != absl::string_view::npos) {
          pending.resize(at);
          c.finish_reason = "stop";
          stopped = true;
        }
        const size_t hold = c.finish_reason.empty() ? StopPrefixAtEnd(pending, stop) : 0;
        const size_t send = pending.size() - hold;
        bool more = true;
        if (send > 0) {
          more = on_text(absl::string_view(pending).substr(0, send));
          pending.erase(0, send);
        }
        return more && !stopped;
      },
      cancelled);
  if (stopped) return c;  // Generate says kCancelled: this stopped it
  if (!s.ok()) return s;
  return c;
}

}  // namespace pipeserve
