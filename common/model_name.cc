#include "common/model_name.h"

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"

namespace pipeserve {

absl::Status ValidModelName(absl::string_view name) {
  bool ok = !name.empty() && name.size() <= kMaxModelNameBytes && name[0] != '.';
  for (char c : name) {
    ok = ok && (absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '-' ||
                c == '.');
  }
  if (ok) return absl::OkStatus();
  std::string shown = absl::CHexEscape(name.substr(0, 64));
  return absl::InvalidArgumentError(absl::StrCat(
      "bad model name \"", shown, name.size() > 64 ? "...\"" : "\"", " (", name.size(),
      " bytes): use 1-128 of A-Z a-z 0-9 _ . - (not starting with '.')"));
}

}  // namespace pipeserve
