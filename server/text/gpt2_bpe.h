// GPT-2's tokenizer: byte-level BPE over its vocabulary (encoder.json:
// symbol -> id) and ranked merges (vocab.bpe), as OpenAI's encoder.py and
// npm gpt-3-encoder do it. Text is split by GPT-2's pattern (contractions,
// runs of letters, of numbers, of other symbols, each with one space
// before it, and whitespace), each piece's UTF-8 bytes become symbols, and
// the adjacent pair of lowest rank is merged until none is ranked. Every
// byte has a symbol, so any text encodes; ids decode back to its bytes.
// //server/text:gpt2_bpe_test checks it token for token against
// gpt-3-encoder on GPT-2's real files (third_party/gpt2_bpe).
//
//   ASSIGN_OR_RETURN(std::unique_ptr<Gpt2Bpe> bpe, Gpt2Bpe::Load(vocab_json, merges));
//   ASSIGN_OR_RETURN(std::vector<int64_t> ids, bpe->Encode("Hello world"));  // {15496, 995}
//   ASSIGN_OR_RETURN(std::string text, bpe->Decode(ids));
#ifndef PIPESERVE_SERVER_TEXT_GPT2_BPE_H_
#define PIPESERVE_SERVER_TEXT_GPT2_BPE_H_

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace pipeserve {

class Gpt2Bpe {
 public:
  // From the contents of encoder.json and vocab.bpe. kInvalidArgument
  // naming what does not parse: JSON that is not an object of ids, an id
  // given twice or beyond the entries, a symbol with a character no byte
  // maps to, a merge line that is not two symbols.
  static absl::StatusOr<std::unique_ptr<Gpt2Bpe>> Load(absl::string_view vocab_json,
                                                       absl::string_view merges);

  // The ids of `text`; kInvalidArgument when it is not valid UTF-8
  // (naming the byte offset). Thread-safe.
  absl::StatusOr<std::vector<int64_t>> Encode(absl::string_view text) const;

  // The bytes token `id` stands for: a few of a character's bytes only,
  // for some (Utf8Stream joins them). kInvalidArgument beyond the vocabulary.
  absl::StatusOr<absl::string_view> TokenBytes(int64_t id) const;
  // The bytes of `ids`, in order.
  absl::StatusOr<std::string> Decode(absl::Span<const int64_t> ids) const;

  int64_t vocab_size() const { return static_cast<int64_t>(token_bytes_.size()); }
  // The id of a vocabulary symbol as written in the vocabulary
  // ("<|endoftext|>"), or -1.
  int64_t SymbolId(absl::string_view symbol) const {
    auto it = ids_.find(symbol);
    return it != ids_.end() ? it->second : -1;
  }

 private:
  Gpt2Bpe();
  struct Merge {
    int rank;
    int64_t id;  // of the merged symbol
  };
  static uint64_t PairKey(int64_t left, int64_t right) {
    return (static_cast<uint64_t>(left) << 32) | static_cast<uint64_t>(right);
  }
  absl::Status AddMerge(absl::string_view left, absl::string_view right, int rank);
  // Appends the ids of one piece (its UTF-8 bytes) after merging.
  void EncodePiece(absl::string_view bytes, std::vector<int64_t>* ids) const;

  std::array<std::string, 256> byte_symbol_;   // byte -> its symbol (UTF-8)
  absl::flat_hash_map<uint32_t, uint8_t> symbol_byte_;  // and back, per code point
  absl::flat_hash_map<std::string, int64_t> ids_;       // symbol -> id
  std::array<int64_t, 256> byte_id_;                    // byte -> its symbol's id (-1: none)
  absl::flat_hash_map<uint64_t, Merge> merges_;         // PairKey(left, right) -> merge
  std::vector<std::string> token_bytes_;                // id -> bytes
};

// GPT-2's pre-tokenizer: `text`'s pieces, as [begin, end) indices into its
// code points. (Exposed for tests.)
std::vector<std::pair<size_t, size_t>> Gpt2Pieces(const std::vector<uint32_t>& text);

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_TEXT_GPT2_BPE_H_
