// What a model may be called: 1-128 of [A-Za-z0-9_.-], not starting with
// '.'. Names become file names in the model repository and label values in
// metrics, so every entry point checks them the same way.
#ifndef PIPESERVE_COMMON_MODEL_NAME_H_
#define PIPESERVE_COMMON_MODEL_NAME_H_

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace pipeserve {

inline constexpr size_t kMaxModelNameBytes = 128;

// kInvalidArgument explaining the rule (quoting at most the first 64 bytes
// of a bad name).
absl::Status ValidModelName(absl::string_view name);

}  // namespace pipeserve

#endif  // PIPESERVE_COMMON_MODEL_NAME_H_
