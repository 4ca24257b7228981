#include "server/text/gpt2_bpe.h"

#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "common/status_macros.h"
#include "nlohmann/json.hpp"
#include "server/text/unicode_classes.h"
#include "server/text/utf8.h"

namespace pipeserve {
namespace {

enum class Class { kLetter, kNumber, kSpace, kOther };

Class ClassOf(uint32_t cp) {
  if (IsLetter(cp)) return Class::kLetter;
  if (IsNumber(cp)) return Class::kNumber;
  if (IsSpace(cp)) return Class::kSpace;
  return Class::kOther;
}

// The end of a contraction ('s 't 're 've 'm 'll 'd, ASCII and lower case
// only, as GPT-2's pattern has them) at i, or i.
size_t Contraction(const std::vector<uint32_t>& t, size_t i) {
  if (t[i] != '\'' || i + 1 >= t.size()) return i;
  const uint32_t a = t[i + 1];
  if (a == 's' || a == 't' || a == 'm' || a == 'd') return i + 2;
  if (i + 2 >= t.size()) return i;
  const uint32_t b = t[i + 2];
  if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return i + 3;
  return i;
}

// The end of the piece that starts at i: the first of GPT-2's alternatives
// that matches there, as a regular expression engine tries them.
size_t PieceEnd(const std::vector<uint32_t>& t, size_t i) {
  const size_t n = t.size();
  if (size_t e = Contraction(t, i); e > i) return e;
  // " ?\p{L}+", " ?\p{N}+", " ?[^\s\p{L}\p{N}]+": one optional space, then a run.
  const Class c = ClassOf(t[i]);
  size_t start = n;
  if (t[i] == ' ' && i + 1 < n && ClassOf(t[i + 1]) != Class::kSpace) {
    start = i + 1;
  } else if (c != Class::kSpace) {
    start = i;
  }
  if (start < n) {
    const Class run = ClassOf(t[start]);
    size_t e = start + 1;
    while (e < n && ClassOf(t[e]) == run) ++e;
    return e;
  }
  // "\s+(?!\S)": whitespace up to the end, or all but the last before a
  // non-space; else "\s+": one.
  size_t e = i + 1;
  while (e < n && ClassOf(t[e]) == Class::kSpace) ++e;
  if (e == n) return n;
  return e - i >= 2 ? e - 1 : e;
}

// GPT-2's printable stand-ins for bytes: the printable Latin-1 bytes stand
// for themselves, the other 68 for U+0100 onwards, in order.
std::array<uint32_t, 256> ByteCodePoints() {
  std::array<uint32_t, 256> cps{};
  uint32_t next = 256;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
    cps[b] = printable ? static_cast<uint32_t>(b) : next++;
  }
  return cps;
}

}  // namespace

std::vector<std::pair<size_t, size_t>> Gpt2Pieces(const std::vector<uint32_t>& text) {
  std::vector<std::pair<size_t, size_t>> pieces;
  for (size_t i = 0; i < text.size();) {
    const size_t e = PieceEnd(text, i);
    pieces.emplace_back(i, e);
    i = e;
  }
  return pieces;
}

Gpt2Bpe::Gpt2Bpe() {
  const std::array<uint32_t, 256> cps = ByteCodePoints();
  for (int b = 0; b < 256; ++b) {
    AppendUtf8(cps[b], &byte_symbol_[b]);
    symbol_byte_[cps[b]] = static_cast<uint8_t>(b);
  }
}

absl::StatusOr<std::unique_ptr<Gpt2Bpe>> Gpt2Bpe::Load(absl::string_view vocab_json,
                                                       absl::string_view merges) {
  std::unique_ptr<Gpt2Bpe> bpe(new Gpt2Bpe());
  const nlohmann::json vocab = nlohmann::json::parse(vocab_json.begin(), vocab_json.end(),
                                                     nullptr, /*allow_exceptions=*/false);
  if (!vocab.is_object()) {
    return absl::InvalidArgumentError("the vocabulary is not a JSON object of symbol: id");
  }
  bpe->token_bytes_.resize(vocab.size());
  std::vector<bool> seen(vocab.size(), false);
  for (const auto& [symbol, id] : vocab.items()) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0 ||
        id.get<int64_t>() >= static_cast<int64_t>(vocab.size()) || seen[id.get<int64_t>()]) {
      return absl::InvalidArgumentError(absl::StrCat(
          "the vocabulary gives symbol \"", symbol, "\" the id ", id.dump(),
          ": ids must be distinct integers in [0, ", vocab.size(), ")"));
    }
    const int64_t i = id.get<int64_t>();
    seen[i] = true;
    ASSIGN_OR_RETURN(std::vector<uint32_t> cps, DecodeUtf8(symbol));
    for (uint32_t cp : cps) {
      auto b = bpe->symbol_byte_.find(cp);
      if (b == bpe->symbol_byte_.end()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "vocabulary symbol \"", symbol, "\" has ", absl::StrFormat("U+%04X", cp),
            ", which stands for no byte"));
      }
      bpe->token_bytes_[i].push_back(static_cast<char>(b->second));
    }
    bpe->ids_[symbol] = i;
  }
  int rank = 0;
  for (absl::string_view line : absl::StrSplit(merges, '\n')) {
    if (line.empty() || (rank == 0 && absl::StartsWith(line, "#version"))) continue;
    const std::vector<absl::string_view> parts = absl::StrSplit(line, ' ');
    if (parts.size() != 2 || parts[0].empty() || parts[1].empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "merge ", rank + 1, " is \"", line.substr(0, 80), "\", not two symbols and a space"));
    }
    bpe->ranks_.emplace(std::string(line), rank++);
  }
  return bpe;
}

void Gpt2Bpe::EncodePiece(absl::string_view bytes, std::vector<int64_t>* ids) const {
  std::vector<std::string> symbols;
  for (char b : bytes) symbols.push_back(byte_symbol_[static_cast<uint8_t>(b)]);
  std::string key;
  while (symbols.size() > 1) {
    // The ranked pair of lowest rank; all its occurrences merge, left to right.
    int best = std::numeric_limits<int>::max();
    size_t at = 0;
    for (size_t i = 0; i + 1 < symbols.size(); ++i) {
      key = absl::StrCat(symbols[i], " ", symbols[i + 1]);
      auto r = ranks_.find(key);
      if (r != ranks_.end() && r->second < best) {
        best = r->second;
        at = i;
      }
    }
    if (best == std::numeric_limits<int>::max()) break;
    const std::string left = symbols[at], right = symbols[at + 1];
    std::vector<std::string> merged;
    for (size_t i = 0; i < symbols.size(); ++i) {
      if (i + 1 < symbols.size() && symbols[i] == left && symbols[i + 1] == right) {
        merged.push_back(left + right);
        ++i;
      } else {
        merged.push_back(std::move(symbols[i]));
      }
    }
    symbols = std::move(merged);
  }
  for (const std::string& s : symbols) {
    auto it = ids_.find(s);
    // Every byte's symbol is in GPT-2's vocabulary, and so is every merge.
    ids->push_back(it != ids_.end() ? it->second : -1);
  }
}

absl::StatusOr<std::vector<int64_t>> Gpt2Bpe::Encode(absl::string_view text) const {
  ASSIGN_OR_RETURN(std::vector<uint32_t> cps, DecodeUtf8(text));
  std::vector<int64_t> ids;
  std::string piece;
  for (const auto& [begin, end] : Gpt2Pieces(cps)) {
    piece.clear();
    for (size_t i = begin; i < end; ++i) AppendUtf8(cps[i], &piece);
    EncodePiece(piece, &ids);
  }
  for (int64_t id : ids) {
    if (id < 0) {
      return absl::InvalidArgumentError(
          "the vocabulary lacks a symbol its merges make (not GPT-2's files?)");
    }
  }
  return ids;
}

absl::StatusOr<absl::string_view> Gpt2Bpe::TokenBytes(int64_t id) const {
  if (id < 0 || id >= vocab_size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("token id ", id, " is not in the vocabulary [0, ", vocab_size(), ")"));
  }
  return absl::string_view(token_bytes_[id]);
}

absl::StatusOr<std::string> Gpt2Bpe::Decode(absl::Span<const int64_t> ids) const {
  std::string out;
  for (int64_t id : ids) {
    ASSIGN_OR_RETURN(absl::string_view bytes, TokenBytes(id));
    out.append(bytes.data(), bytes.size());
  }
  return out;
}

}  // namespace pipeserve
