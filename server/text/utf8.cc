#include "server/text/utf8.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace pipeserve {
namespace {

constexpr absl::string_view kReplacement = "\xEF\xBF\xBD";  // U+FFFD

// The length of the sequence a lead byte starts (0: not a lead byte).
int SequenceLength(uint8_t lead) {
  if (lead < 0x80) return 1;
  if (lead >= 0xC2 && lead <= 0xDF) return 2;
  if (lead >= 0xE0 && lead <= 0xEF) return 3;
  if (lead >= 0xF0 && lead <= 0xF4) return 4;
  return 0;
}

// Whether `b` may follow `lead` as byte `index` (1..3) of a sequence: no
// overlong forms, no surrogates, nothing beyond U+10FFFF.
bool ValidContinuation(uint8_t lead, int index, uint8_t b) {
  if (index == 1) {
    if (lead == 0xE0) return b >= 0xA0 && b <= 0xBF;
    if (lead == 0xED) return b >= 0x80 && b <= 0x9F;
    if (lead == 0xF0) return b >= 0x90 && b <= 0xBF;
    if (lead == 0xF4) return b >= 0x80 && b <= 0x8F;
  }
  return b >= 0x80 && b <= 0xBF;
}

// How many bytes of the character at s[i] are well formed: its length when
// whole, fewer when it is cut short by the end of s, and 0 when s[i] cannot
// start one or a byte after it does not fit (sets *whole accordingly).
int WellFormed(absl::string_view s, size_t i, bool* whole) {
  const uint8_t lead = static_cast<uint8_t>(s[i]);
  const int len = SequenceLength(lead);
  *whole = false;
  if (len == 0) return 0;
  int k = 1;
  for (; k < len && i + k < s.size(); ++k) {
    if (!ValidContinuation(lead, k, static_cast<uint8_t>(s[i + k]))) return 0;
  }
  *whole = k == len;
  return k;
}

uint32_t CodePointAt(absl::string_view s, size_t i, int len) {
  const uint8_t lead = static_cast<uint8_t>(s[i]);
  uint32_t cp = len == 1 ? lead : lead & (0x7F >> len);
  for (int k = 1; k < len; ++k) cp = cp << 6 | (static_cast<uint8_t>(s[i + k]) & 0x3F);
  return cp;
}

}  // namespace

absl::StatusOr<std::vector<uint32_t>> DecodeUtf8(absl::string_view text) {
  std::vector<uint32_t> out;
  out.reserve(text.size());
  for (size_t i = 0; i < text.size();) {
    bool whole = false;
    const int len = WellFormed(text, i, &whole);
    if (!whole) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "the text is not valid UTF-8: byte 0x%02X at offset %d %s", static_cast<uint8_t>(text[i]),
          i, len > 0 ? "starts a character the text ends inside" : "starts no valid character"));
    }
    out.push_back(CodePointAt(text, i, len));
    i += len;
  }
  return out;
}

void AppendUtf8(uint32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | cp >> 6));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | cp >> 12));
    out->push_back(static_cast<char>(0x80 | (cp >> 6 & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | cp >> 18));
    out->push_back(static_cast<char>(0x80 | (cp >> 12 & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp >> 6 & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

std::string Utf8Stream::Push(absl::string_view bytes) {
  pending_.append(bytes.data(), bytes.size());
  std::string out;
  size_t i = 0;
  while (i < pending_.size()) {
    bool whole = false;
    const int len = WellFormed(pending_, i, &whole);
    if (whole) {
      out.append(pending_, i, len);
      i += len;
    } else if (len > 0 && i + len == pending_.size()) {
      break;  // the rest of this character comes with the next push
    } else {
      out.append(kReplacement.data(), kReplacement.size());
      ++i;
    }
  }
  pending_.erase(0, i);
  return out;
}

std::string Utf8Stream::Finish() {
  std::string out = pending_.empty() ? "" : std::string(kReplacement);
  pending_.clear();
  return out;
}

}  // namespace pipeserve
