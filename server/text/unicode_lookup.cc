#include <algorithm>

#include "server/text/unicode_classes.h"

namespace pipeserve {

bool InRanges(absl::Span<const CodePointRange> ranges, uint32_t cp) {
  auto it = std::upper_bound(ranges.begin(), ranges.end(), cp,
                             [](uint32_t c, const CodePointRange& r) { return c < r.first; });
  return it != ranges.begin() && cp <= (it - 1)->last;
}

}  // namespace pipeserve
