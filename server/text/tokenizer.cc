#include "server/text/tokenizer.h"

#include <algorithm>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "common/status_macros.h"
#include "server/text/gpt2_bpe.h"
#include "server/text/sentencepiece_model.h"

namespace pipeserve {
namespace {

class Gpt2Tokenizer : public Tokenizer {
 public:
  explicit Gpt2Tokenizer(std::unique_ptr<Gpt2Bpe> bpe) : bpe_(std::move(bpe)) {
    if (const int64_t eot = bpe_->SymbolId("<|endoftext|>"); eot >= 0) {
      specials_.emplace_back("<|endoftext|>", eot);
      stop_tokens_.push_back(eot);
    }
  }
  std::string TokenBytes(int64_t id) const override {
    for (const auto& special : specials_) {
      if (special.second == id) return "";
    }
    absl::StatusOr<absl::string_view> b = bpe_->TokenBytes(id);
    return b.ok() ? std::string(*b) : "";
  }
  int64_t size() const override { return bpe_->vocab_size(); }

 private:
  absl::StatusOr<std::vector<int64_t>> EncodePlain(absl::string_view text) const override {
    return bpe_->Encode(text);
  }
  std::unique_ptr<Gpt2Bpe> bpe_;
};

class SentencePieceTokenizer : public Tokenizer {
 public:
  explicit SentencePieceTokenizer(std::unique_ptr<SentencePieceModel> sp) : sp_(std::move(sp)) {
    bos_ = sp_->bos_id();
    if (sp_->eos_id() >= 0) stop_tokens_.push_back(sp_->eos_id());
    for (int id = 0; id < sp_->size(); ++id) {
      if (sp_->IsControl(id) && !sp_->Piece(id).empty()) specials_.emplace_back(sp_->Piece(id), id);
    }
  }
  std::string TokenBytes(int64_t id) const override {
    if (id < 0 || id >= size()) return "";
    const int i = static_cast<int>(id);
    if (sp_->IsControl(i)) return "";
    if (sp_->IsUnknown(i)) return " \xE2\x81\x87 ";  // SentencePiece's " ⁇ "
    const std::string piece = sp_->Piece(i);
    int byte = 0;
    if (sp_->IsByte(i) && piece.size() == 6 && absl::SimpleHexAtoi(piece.substr(3, 2), &byte)) {
      return std::string(1, static_cast<char>(byte));  // <0xNN>
    }
    return absl::StrReplaceAll(piece, {{"\xE2\x96\x81", " "}});  // "▁" is a space
  }
  bool StripsLeadingSpace() const override { return true; }
  int64_t size() const override { return sp_->size(); }

 private:
  absl::StatusOr<std::vector<int64_t>> EncodePlain(absl::string_view text) const override {
    std::vector<int> ids;
    std::string error;
    if (!sp_->Encode(std::string(text), &ids, &error)) {
      return absl::InvalidArgumentError(absl::StrCat("SentencePiece: ", error));
    }
    return std::vector<int64_t>(ids.begin(), ids.end());
  }
  std::unique_ptr<SentencePieceModel> sp_;
};

absl::StatusOr<std::unique_ptr<Tokenizer>> MakeKind(const TokenizerSpec& spec) {
  switch (spec.kind_case()) {
    case TokenizerSpec::kGpt2Bpe: {
      absl::StatusOr<std::unique_ptr<Gpt2Bpe>> bpe =
          Gpt2Bpe::Load(spec.gpt2_bpe().vocab_json(), spec.gpt2_bpe().merges());
      if (!bpe.ok()) {
        return absl::InvalidArgumentError(
            absl::StrCat("the GPT-2 BPE tokenizer: ", bpe.status().message()));
      }
      return std::unique_ptr<Tokenizer>(std::make_unique<Gpt2Tokenizer>(*std::move(bpe)));
    }
    case TokenizerSpec::kSentencepieceModel: {
      std::string error;
      std::unique_ptr<SentencePieceModel> sp =
          SentencePieceModel::Load(spec.sentencepiece_model(), &error);
      if (sp == nullptr) {
        return absl::InvalidArgumentError(
            absl::StrCat("the SentencePiece model does not load: ", error));
      }
      return std::unique_ptr<Tokenizer>(std::make_unique<SentencePieceTokenizer>(std::move(sp)));
    }
    default:
      return absl::InvalidArgumentError(
          "the tokenizer has no kind: give gpt2_bpe (vocab.json and merges.txt) or "
          "sentencepiece_model");
  }
}

absl::Status CheckChatTemplate(const ChatTemplate& chat) {
  for (const auto& [role, format] : chat.roles()) {
    if (role.empty() || format.find("{content}") == std::string::npos) {
      return absl::InvalidArgumentError(absl::StrCat(
          "the chat template's format for role \"", role.substr(0, 64),
          "\" lacks \"{content}\", where a message's text goes"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> MakeTokenizer(const TokenizerSpec& spec) {
  ASSIGN_OR_RETURN(std::unique_ptr<Tokenizer> t, MakeKind(spec));
  for (int64_t id : spec.stop_token_ids()) {
    if (id < 0 || id >= t->size()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "stop token ", id, " is not in the tokenizer's vocabulary [0, ", t->size(), ")"));
    }
    t->stop_tokens_.push_back(id);
  }
  RETURN_IF_ERROR(CheckChatTemplate(spec.chat_template()));
  return t;
}

absl::StatusOr<std::vector<int64_t>> Tokenizer::Encode(absl::string_view text,
                                                       bool add_bos) const {
  RETURN_IF_ERROR(DecodeUtf8(text).status());
  std::vector<int64_t> ids;
  if (add_bos && bos_ >= 0) {
    bool written = false;  // the text starts with it already
    for (const auto& [s, id] : specials_) written |= id == bos_ && absl::StartsWith(text, s);
    if (!written) ids.push_back(bos_);
  }
  // Each special's next place in the text, searched again only once the
  // scan has passed it: linear in the text (searching the whole rest
  // again after each special found took minutes for a megabyte of them).
  std::vector<size_t> next(specials_.size());
  for (size_t k = 0; k < specials_.size(); ++k) next[k] = text.find(specials_[k].first);
  size_t from = 0;
  while (from < text.size()) {
    // The earliest special token in the rest (the longest where two start at once).
    size_t at = absl::string_view::npos, len = 0;
    int64_t special = -1;
    for (size_t k = 0; k < specials_.size(); ++k) {
      if (next[k] != absl::string_view::npos && next[k] < from) {
        next[k] = text.find(specials_[k].first, from);
      }
      const std::string& s = specials_[k].first;
      if (next[k] != absl::string_view::npos && (next[k] < at || (next[k] == at && s.size() > len))) {
        at = next[k];
        len = s.size();
        special = specials_[k].second;
      }
    }
    const size_t end = std::min(at, text.size());
    if (end > from) {
      ASSIGN_OR_RETURN(std::vector<int64_t> plain, EncodePlain(text.substr(from, end - from)));
      ids.insert(ids.end(), plain.begin(), plain.end());
    }
    if (at == absl::string_view::npos) break;
    ids.push_back(special);
    from = at + len;
  }
  return ids;
}

std::string Tokenizer::Decode(absl::Span<const int64_t> ids, bool at_start) const {
  TextDecoder d(*this, at_start);
  std::string out;
  for (int64_t id : ids) out += d.Push(id);
  return out + d.Finish();
}

std::string TextDecoder::Push(int64_t id) {
  std::string bytes = tokenizer_.TokenBytes(id);
  if (at_start_ && !bytes.empty()) {
    if (tokenizer_.StripsLeadingSpace() && bytes[0] == ' ') bytes.erase(0, 1);
    at_start_ = false;
  }
  return utf8_.Push(bytes);
}

}  // namespace pipeserve
