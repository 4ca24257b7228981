// Who may call what.
//
// Clients of the coordinator present bearer tokens (`authorization: Bearer
// <token>` metadata) from a token file with two scopes: `infer` for the
// KServe inference API and `admin` for model management (upload, unload,
// plan, list); admin includes infer. Missing or unknown token:
// kUnauthenticated; a token without the scope: kPermissionDenied. Tokens
// are compared in constant time.
//
// Members of a cluster (coordinator and stage servers) may also share a
// cluster token, sent as "pipeserve-cluster-token" metadata on every
// StageService call; the local launcher makes one for the stage servers it
// starts, so other local users cannot drive them.
//
// Token file:
//   # scopes  token
//   admin     6f1c0a...
//   infer     93be27...
//
//   ASSIGN_OR_RETURN(TokenSet tokens, TokenSet::Load("/etc/pipeserve/tokens"));
//   RETURN_IF_ERROR(tokens.Authorize("Bearer 93be27...", Scope::kInfer));
#ifndef PIPESERVE_SERVER_TRANSPORT_AUTH_H_
#define PIPESERVE_SERVER_TRANSPORT_AUTH_H_

#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "grpcpp/server_context.h"

namespace pipeserve {

enum class Scope { kInfer, kAdmin };
const char* ScopeName(Scope scope);

inline constexpr char kAuthorizationKey[] = "authorization";
inline constexpr char kClusterTokenKey[] = "pipeserve-cluster-token";

// Compares without an early exit, so the time taken does not tell how much
// of a guess was right (only, at most, the stored token's length).
bool ConstantTimeEquals(absl::string_view a, absl::string_view b);

class TokenSet {
 public:
  // kInvalidArgument naming the line for a line that is not `<scopes>
  // <token>`, an unknown scope, a token shorter than 16 characters, or a
  // token listed twice; also for a file with no tokens.
  static absl::StatusOr<TokenSet> Parse(absl::string_view text);
  static absl::StatusOr<TokenSet> Load(const std::string& path);

  // Checks an `authorization` metadata value ("Bearer <token>").
  absl::Status Authorize(absl::string_view authorization, Scope scope) const;

  size_t size() const { return entries_.size(); }

 private:
  struct Entry {
    std::string token;
    bool infer = false;
    bool admin = false;
  };
  std::vector<Entry> entries_;
};

// The value of request metadata `key`, or "": in a call's metadata (either
// kind of server context), or in the headers an AuthMetadataProcessor gets.
std::string MetadataValue(const std::multimap<grpc::string_ref, grpc::string_ref>& metadata,
                          absl::string_view key);
std::string MetadataValue(const grpc::ServerContextBase& ctx, absl::string_view key);

// For services: OK when `tokens` is null (no authentication configured),
// else the call's token (`authorization`, or the call's metadata) must
// grant `scope`.
absl::Status AuthorizeCall(const TokenSet* tokens, absl::string_view authorization, Scope scope);
absl::Status AuthorizeCall(const TokenSet* tokens, const grpc::ServerContextBase& ctx,
                           Scope scope);

// For the stage service: OK when `expected` is empty, else the call must
// carry it as its cluster token (kUnauthenticated otherwise): `given`, or
// the call's metadata.
absl::Status CheckClusterToken(const std::string& expected, absl::string_view given);
absl::Status CheckClusterToken(const std::string& expected, const grpc::ServerContextBase& ctx);

// 32 random bytes from the system's CSPRNG, as 64 hex digits.
absl::StatusOr<std::string> RandomToken();

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_TRANSPORT_AUTH_H_
