// The tokenizer a model was uploaded with (TokenizerSpec): GPT-2's
// byte-level BPE or a SentencePiece model, behind one interface for the
// text APIs. Special tokens written in a text ("<|endoftext|>", "</s>")
// encode as their ids, as Hugging Face's tokenizers do; a SentencePiece
// tokenizer starts a prompt with its BOS, as Llama's does.
//
//   ASSIGN_OR_RETURN(std::unique_ptr<Tokenizer> t, MakeTokenizer(spec));
//   ASSIGN_OR_RETURN(std::vector<int64_t> ids, t->Encode("Hello", /*add_bos=*/true));
//   TextDecoder text(*t, /*at_start=*/false);  // continues the prompt
//   for (int64_t id : generated) Send(text.Push(id));  // whole characters only
//   Send(text.Finish());
#ifndef PIPESERVE_SERVER_TEXT_TOKENIZER_H_
#define PIPESERVE_SERVER_TEXT_TOKENIZER_H_

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "proto/model.pb.h"
#include "server/text/utf8.h"

namespace pipeserve {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  // The ids of `text` (valid UTF-8, else kInvalidArgument naming the byte
  // offset), its special tokens as their ids; with `add_bos`, the BOS
  // first where the tokenizer has one (unless the text starts with it).
  absl::StatusOr<std::vector<int64_t>> Encode(absl::string_view text, bool add_bos) const;
  // The bytes token `id` adds to a text: empty for special tokens and ids
  // beyond the vocabulary, a part of a character for some.
  virtual std::string TokenBytes(int64_t id) const = 0;
  // Whether a text's first piece drops the space it starts with
  // (SentencePiece's dummy prefix).
  virtual bool StripsLeadingSpace() const { return false; }
  // Tokens: ids are in [0, size()).
  virtual int64_t size() const = 0;
  // The tokens that end a text (the tokenizer's own, then the spec's).
  const std::vector<int64_t>& stop_tokens() const { return stop_tokens_; }

  // The text of `ids`; malformed UTF-8 becomes U+FFFD. `at_start`: the
  // ids begin a text (a prompt), not continue one.
  std::string Decode(absl::Span<const int64_t> ids, bool at_start) const;

 protected:
  friend absl::StatusOr<std::unique_ptr<Tokenizer>> MakeTokenizer(const TokenizerSpec& spec);
  std::vector<int64_t> stop_tokens_;
  // Special tokens' texts and ids, which Encode finds in a text.
  std::vector<std::pair<std::string, int64_t>> specials_;
  int64_t bos_ = -1;
  // The ids of text without special tokens (Encode splits at those).
  virtual absl::StatusOr<std::vector<int64_t>> EncodePlain(absl::string_view text) const = 0;
};

// kInvalidArgument naming what is wrong: no kind, files that do not parse,
// a stop token beyond the tokenizer, a chat role without "{content}".
absl::StatusOr<std::unique_ptr<Tokenizer>> MakeTokenizer(const TokenizerSpec& spec);

// Text of generated tokens as they come, in whole characters: a character
// whose bytes two tokens share comes out with the second.
class TextDecoder {
 public:
  TextDecoder(const Tokenizer& tokenizer, bool at_start)
      : tokenizer_(tokenizer), at_start_(at_start) {}
  std::string Push(int64_t id);
  // An incomplete character left at the end becomes U+FFFD.
  std::string Finish() { return utf8_.Finish(); }

 private:
  const Tokenizer& tokenizer_;
  bool at_start_;
  Utf8Stream utf8_;
};

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_TEXT_TOKENIZER_H_
