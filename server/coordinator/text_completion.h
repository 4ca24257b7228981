// One text completion: a prompt's token ids through a model's Generator,
// the tokens back as text. Knows nothing of HTTP or JSON: the OpenAI and
// Triton routes (openai_rest, kserve_rest) are thin over it.
//
// Text comes out in whole characters (TextDecoder) as tokens are sampled.
// The tokenizer's stop tokens end it, and add no text. Stop strings end it
// too, cut off before the string; text that may be the start of one is
// held back until the next token shows it is not, so a streamed client
// never sees part of a stop string.
//
//   ASSIGN_OR_RETURN(Completion c, Complete(*text.generator, *text.tokenizer, request,
//                                           {"\n\n"}, [&](absl::string_view s) {
//     return stream.Write(s);  // false: the client went away
//   }));
#ifndef PIPESERVE_SERVER_COORDINATOR_TEXT_COMPLETION_H_
#define PIPESERVE_SERVER_COORDINATOR_TEXT_COMPLETION_H_

#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "server/coordinator/generator.h"
#include "server/text/tokenizer.h"

namespace pipeserve {

struct Completion {
  std::string finish_reason;  // "stop" (a stop token or string) or "length"
  int64_t tokens = 0;         // generated, a stop token included
};

// Errors as Generator::Generate; kCancelled when `on_text` returns false
// or `cancelled` turns true.
absl::StatusOr<Completion> Complete(Generator& generator, const Tokenizer& tokenizer,
                                    GenerationRequest request,
                                    const std::vector<std::string>& stop,
                                    const std::function<bool(absl::string_view)>& on_text,
                                    const std::function<bool()>& cancelled = nullptr);

// The length of the longest end of `text` that begins one of `stop` (the
// part to hold back).
size_t StopPrefixAtEnd(absl::string_view text, const std::vector<std::string>& stop);

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_COORDINATOR_TEXT_COMPLETION_H_
