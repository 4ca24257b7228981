// Keeps stage-server addresses out of what clients of the inference API
// see: failure reasons name the stage ("stage 1 (replica 0) failed its
// health check"), and the address, like gRPC's own peer strings, becomes
// "a stage server". Only administrators (ModelService: plan, models) and
// the coordinator's log get the addresses.
//
//   std::string shown = RedactAddresses(status.message(), {"10.0.0.7:9000"});
#ifndef PIPESERVE_SERVER_COORDINATOR_REDACT_H_
#define PIPESERVE_SERVER_COORDINATOR_REDACT_H_

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace pipeserve {

// `message` with every address replaced: each of `known` (host:port as the
// launcher lists them), gRPC peer and target strings (ipv4:..., ipv6:...,
// unix:..., dns:///...), and any host:port whose host has a dot or is
// "localhost" or a bracketed IPv6 address.
std::string RedactAddresses(absl::string_view message, const std::vector<std::string>& known);

// `s` with its message redacted (its code and payloads kept).
absl::Status RedactAddresses(const absl::Status& s, const std::vector<std::string>& known);

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_COORDINATOR_REDACT_H_
