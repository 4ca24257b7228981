#include "server/text/gpt2_bpe.h"

#include <functional>
#include <limits>
#include <queue>
#include <tuple>
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
    RETURN_IF_ERROR(bpe->AddMerge(parts[0], parts[1], rank++));
  }
  for (int b = 0; b < 256; ++b) {
    auto it = bpe->ids_.find(bpe->byte_symbol_[b]);
    bpe->byte_id_[b] = it != bpe->ids_.end() ? it->second : -1;
  }
  return bpe;
}

absl::Status Gpt2Bpe::AddMerge(absl::string_view left, absl::string_view right, int rank) {
  auto l = ids_.find(left), r = ids_.find(right), m = ids_.find(absl::StrCat(left, right));
  if (l == ids_.end() || r == ids_.end() || m == ids_.end()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "merge ", rank + 1, " (\"", left.substr(0, 40), " ", right.substr(0, 40),
        "\") has a symbol, or makes one, that the vocabulary lacks"));
  }
  merges_.try_emplace(PairKey(l->second, r->second), Merge{rank, m->second});
  return absl::OkStatus();
}

// Merges as GPT-2 does (the ranked pair of lowest rank, all its
// occurrences left to right, again until no pair is ranked), in
// O(n log n): symbols are a linked list, candidate pairs a heap by (rank,
// position); all of one rank merge before the pairs they make are looked at.
void Gpt2Bpe::EncodePiece(absl::string_view bytes, std::vector<int64_t>* ids) const {
  const int n = static_cast<int>(bytes.size());
  std::vector<int64_t> sym(n);
  std::vector<int> next(n), prev(n);
  for (int i = 0; i < n; ++i) {
    sym[i] = byte_id_[static_cast<uint8_t>(bytes[i])];
    next[i] = i + 1;
    prev[i] = i - 1;
  }
  struct Candidate {
    int rank, at;
    int64_t left, right;
    bool operator>(const Candidate& o) const { return std::tie(rank, at) > std::tie(o.rank, o.at); }
  };
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> heap;
  auto consider = [&](int i) {
    if (i < 0 || i >= n || next[i] >= n || sym[i] < 0 || sym[next[i]] < 0) return;
    auto m = merges_.find(PairKey(sym[i], sym[next[i]]));
    if (m != merges_.end()) heap.push({m->second.rank, i, sym[i], sym[next[i]]});
  };
  for (int i = 0; i + 1 < n; ++i) consider(i);
  std::vector<int> merged;
  while (!heap.empty()) {
    const int rank = heap.top().rank;
    merged.clear();
    while (!heap.empty() && heap.top().rank == rank) {
      const Candidate c = heap.top();
      heap.pop();
      // Stale: an earlier merge took one of its symbols.
      if (sym[c.at] != c.left || next[c.at] >= n || sym[next[c.at]] != c.right) continue;
      const int j = next[c.at];
      sym[c.at] = merges_.at(PairKey(c.left, c.right)).id;
      sym[j] = -2;  // gone
      next[c.at] = next[j];
      if (next[j] < n) prev[next[j]] = c.at;
      merged.push_back(c.at);
    }
    for (int i : merged) {
      if (sym[i] < 0) continue;
      consider(prev[i]);
      consider(i);
    }
  }
  for (int i = 0; i < n; i = next[i]) ids->push_back(sym[i]);
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
