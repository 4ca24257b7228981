// The Unicode classes GPT-2's pre-tokenizer splits text by: letters
// (\p{L}: Lu, Ll, Lt, Lm, Lo), numbers (\p{N}: Nd, Nl, No) and whitespace
// (JavaScript's \s), as ranges of code points generated from Node's
// regular expressions (tools/gpt2_bpe_oracle/unicode_classes.js), so they
// match the oracle the tests compare with exactly. (glibc's iswalpha
// counts combining marks and other scripts' digits as letters.)
//
//   if (IsLetter(cp)) ...
#ifndef PIPESERVE_SERVER_TEXT_UNICODE_CLASSES_H_
#define PIPESERVE_SERVER_TEXT_UNICODE_CLASSES_H_

#include <cstdint>

#include "absl/types/span.h"

namespace pipeserve {

struct CodePointRange {
  uint32_t first, last;  // inclusive
};

// Sorted, disjoint ranges of each class.
absl::Span<const CodePointRange> LetterRanges();
absl::Span<const CodePointRange> NumberRanges();
absl::Span<const CodePointRange> SpaceRanges();

bool InRanges(absl::Span<const CodePointRange> ranges, uint32_t cp);
inline bool IsLetter(uint32_t cp) { return InRanges(LetterRanges(), cp); }
inline bool IsNumber(uint32_t cp) { return InRanges(NumberRanges(), cp); }
inline bool IsSpace(uint32_t cp) { return InRanges(SpaceRanges(), cp); }

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_TEXT_UNICODE_CLASSES_H_
