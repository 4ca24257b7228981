// The one place pipeserve converts between absl::Status and grpc::Status,
// in both directions and for every binary (servers and clients). The codes
// are the same numbers in both (both follow google.rpc.Code); messages
// travel capped, so an error about a huge input never becomes a huge reply.
//
//   return ToGrpcStatus(coordinator->Unload(name));          // in a service
//   return FromGrpcStatus(stub->GetPlan(&ctx, req, &resp));  // in a client
#ifndef PIPESERVE_COMMON_GRPC_STATUS_H_
#define PIPESERVE_COMMON_GRPC_STATUS_H_

#include <cstddef>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "grpcpp/support/status.h"

namespace pipeserve {

// Longest message either conversion passes on; longer ones are cut and end
// in "...".
inline constexpr size_t kMaxStatusMessageBytes = 4096;

// Same code, message capped. A code outside gRPC's range becomes UNKNOWN.
grpc::Status ToGrpcStatus(const absl::Status& status);

// Same code, message capped and prefixed with "<context>: " when `context`
// is not empty.
absl::Status FromGrpcStatus(const grpc::Status& status, absl::string_view context = "");

}  // namespace pipeserve

#endif  // PIPESERVE_COMMON_GRPC_STATUS_H_
