#include "common/grpc_status.h"

#include <string>

#include "absl/strings/str_cat.h"

namespace pipeserve {
namespace {

std::string Capped(absl::string_view message) {
  if (message.size() <= kMaxStatusMessageBytes) return std::string(message);
  return absl::StrCat(message.substr(0, kMaxStatusMessageBytes - 3), "...");
}

// Both enums are google.rpc.Code: 0 (OK) through 16 (UNAUTHENTICATED).
bool KnownCode(int code) { return code >= 0 && code <= 16; }

}  // namespace

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  int code = static_cast<int>(status.code());
  return grpc::Status(
      KnownCode(code) ? static_cast<grpc::StatusCode>(code) : grpc::StatusCode::UNKNOWN,
      Capped(status.message()));
}

absl::Status FromGrpcStatus(const grpc::Status& status, absl::string_view context) {
  if (status.ok()) return absl::OkStatus();
  int code = static_cast<int>(status.error_code());
  std::string message = context.empty() ? status.error_message()
                                        : absl::StrCat(context, ": ", status.error_message());
  return absl::Status(
      KnownCode(code) ? static_cast<absl::StatusCode>(code) : absl::StatusCode::kUnknown,
      Capped(message));
}

}  // namespace pipeserve
