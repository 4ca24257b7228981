// UTF-8 for the text APIs: decoding a string into code points (refusing
// malformed input, naming where), encoding one, and a stream decoder that
// hands out only whole characters, so text streamed token by token never
// splits a character whose bytes two tokens share (GPT-2's byte-level
// tokens often do: "🚀" is three of them).
//
//   Utf8Stream stream;
//   for (int64_t id : ids) Send(stream.Push(tokenizer.TokenBytes(id)));
//   Send(stream.Finish());
#ifndef PIPESERVE_SERVER_TEXT_UTF8_H_
#define PIPESERVE_SERVER_TEXT_UTF8_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace pipeserve {

// The code points of `text`; kInvalidArgument naming the byte offset of
// the first malformed sequence (overlong forms, surrogates and code points
// beyond U+10FFFF included).
absl::StatusOr<std::vector<uint32_t>> DecodeUtf8(absl::string_view text);

// Appends the UTF-8 bytes of `cp` (a valid code point) to `out`.
void AppendUtf8(uint32_t cp, std::string* out);

class Utf8Stream {
 public:
  // The whole characters of what was pushed so far and not yet returned;
  // an incomplete last character waits for the next push. Malformed bytes
  // come out as U+FFFD, as a decoder that replaces does.
  std::string Push(absl::string_view bytes);
  // What is left: an incomplete character at the end becomes U+FFFD.
  std::string Finish();

 private:
  std::string pending_;
};

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_TEXT_UTF8_H_
