// Status helpers shared by every pipeserve module. Debian's Abseil
// (20220623) ships no status macros, so the usual pair is defined once here.
//
//   absl::StatusOr<Plan> MakePlan(const Graph& g) {
//     RETURN_IF_ERROR(Validate(g));
//     ASSIGN_OR_RETURN(std::vector<int> order, TopoOrder(g));
//     ...
//   }
#ifndef PIPESERVE_COMMON_STATUS_MACROS_H_
#define PIPESERVE_COMMON_STATUS_MACROS_H_

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define PIPESERVE_CONCAT_INNER_(a, b) a##b
#define PIPESERVE_CONCAT_(a, b) PIPESERVE_CONCAT_INNER_(a, b)

// Returns the status from the enclosing function if `expr` is not OK.
#define RETURN_IF_ERROR(expr)                    \
  do {                                           \
    ::absl::Status _pipeserve_status = (expr);   \
    if (!_pipeserve_status.ok()) return _pipeserve_status; \
  } while (0)

// `lhs` = the value of the StatusOr `rexpr`, or returns its error.
#define ASSIGN_OR_RETURN(lhs, rexpr) \
  PIPESERVE_ASSIGN_OR_RETURN_IMPL_(PIPESERVE_CONCAT_(_statusor_, __LINE__), lhs, rexpr)

#define PIPESERVE_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, rexpr) \
  auto statusor = (rexpr);                                     \
  if (!statusor.ok()) return std::move(statusor).status();     \
  lhs = std::move(statusor).value()

#endif  // PIPESERVE_COMMON_STATUS_MACROS_H_
