#include "server/transport/auth.h"

#include <sys/random.h>

#include <cstdint>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "common/credentials.h"

namespace pipeserve {

const char* ScopeName(Scope scope) { return scope == Scope::kAdmin ? "admin" : "infer"; }

bool ConstantTimeEquals(absl::string_view a, absl::string_view b) {
  // Always walks all of `b`; `a` is read modulo its length so a short guess
  // costs the same time as a long one.
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  for (size_t i = 0; i < b.size(); ++i) {
    unsigned char x = a.empty() ? 0 : static_cast<unsigned char>(a[i % a.size()]);
    diff |= x ^ static_cast<unsigned char>(b[i]);
  }
  return diff == 0;
}

absl::StatusOr<TokenSet> TokenSet::Parse(absl::string_view text) {
  TokenSet set;
  int line_no = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++line_no;
    line = absl::StripAsciiWhitespace(line);
    if (line.empty() || line[0] == '#') continue;
    std::vector<absl::string_view> fields =
        absl::StrSplit(line, absl::ByAnyChar(" \t"), absl::SkipEmpty());
    if (fields.size() != 2) {
      return absl::InvalidArgumentError(absl::StrCat(
          "token file line ", line_no, ": expected `<scopes> <token>`, got ", fields.size(),
          " fields"));
    }
    Entry e;
    for (absl::string_view scope : absl::StrSplit(fields[0], ',')) {
      if (scope == "infer") {
        e.infer = true;
      } else if (scope == "admin") {
        e.admin = e.infer = true;
      } else {
        return absl::InvalidArgumentError(absl::StrCat(
            "token file line ", line_no, ": unknown scope \"", scope.substr(0, 32),
            "\" (scopes: infer, admin)"));
      }
    }
    e.token = std::string(fields[1]);
    if (e.token.size() < 16) {
      return absl::InvalidArgumentError(absl::StrCat(
          "token file line ", line_no, ": a token needs at least 16 characters"));
    }
    for (const Entry& other : set.entries_) {
      if (other.token == e.token) {
        return absl::InvalidArgumentError(
            absl::StrCat("token file line ", line_no, ": this token is listed twice"));
      }
    }
    set.entries_.push_back(std::move(e));
  }
  if (set.entries_.empty()) return absl::InvalidArgumentError("the token file lists no tokens");
  return set;
}

absl::StatusOr<TokenSet> TokenSet::Load(const std::string& path) {
  absl::StatusOr<std::string> text = ReadSecretFile(path);
  if (!text.ok()) return text.status();
  absl::StatusOr<TokenSet> set = Parse(*text);
  if (!set.ok()) {
    return absl::Status(set.status().code(), absl::StrCat(path, ": ", set.status().message()));
  }
  return set;
}

absl::Status TokenSet::Authorize(absl::string_view authorization, Scope scope) const {
  absl::string_view token = absl::StripAsciiWhitespace(authorization);
  if (token.size() < 7 || !absl::EqualsIgnoreCase(token.substr(0, 7), "bearer ")) {
    return absl::UnauthenticatedError(
        "this server needs a token: send `authorization: Bearer <token>` metadata");
  }
  token = absl::StripLeadingAsciiWhitespace(token.substr(7));
  // Every entry is compared, matched or not.
  const Entry* match = nullptr;
  for (const Entry& e : entries_) {
    if (ConstantTimeEquals(token, e.token)) match = &e;
  }
  if (match == nullptr) return absl::UnauthenticatedError("the token is not valid here");
  if (scope == Scope::kAdmin ? match->admin : match->infer) return absl::OkStatus();
  return absl::PermissionDeniedError(
      absl::StrCat("the token lacks the \"", ScopeName(scope), "\" scope this call needs"));
}

std::string MetadataValue(const std::multimap<grpc::string_ref, grpc::string_ref>& metadata,
                          absl::string_view key) {
  auto it = metadata.find(grpc::string_ref(key.data(), key.size()));
  if (it == metadata.end()) return "";
  return std::string(it->second.data(), it->second.size());
}

std::string MetadataValue(const grpc::ServerContextBase& ctx, absl::string_view key) {
  return MetadataValue(ctx.client_metadata(), key);
}

absl::Status AuthorizeCall(const TokenSet* tokens, absl::string_view authorization, Scope scope) {
  if (tokens == nullptr) return absl::OkStatus();
  return tokens->Authorize(authorization, scope);
}

absl::Status AuthorizeCall(const TokenSet* tokens, const grpc::ServerContextBase& ctx,
                           Scope scope) {
  if (tokens == nullptr) return absl::OkStatus();  // the metadata need not be read
  return AuthorizeCall(tokens, MetadataValue(ctx, kAuthorizationKey), scope);
}

absl::Status CheckClusterToken(const std::string& expected, absl::string_view given) {
  if (expected.empty() || ConstantTimeEquals(given, expected)) return absl::OkStatus();
  return absl::UnauthenticatedError(
      "stage servers take calls only from members of their cluster (no valid cluster token)");
}

absl::Status CheckClusterToken(const std::string& expected, const grpc::ServerContextBase& ctx) {
  return CheckClusterToken(expected, MetadataValue(ctx, kClusterTokenKey));
}

absl::StatusOr<std::string> RandomToken() {
  uint8_t bytes[32];
  size_t got = 0;
  while (got < sizeof bytes) {
    ssize_t n = ::getrandom(bytes + got, sizeof bytes - got, 0);
    if (n <= 0) return absl::UnavailableError("getrandom failed");
    got += static_cast<size_t>(n);
  }
  static const char kHex[] = "0123456789abcdef";
  std::string out;
  for (uint8_t b : bytes) {
    out.push_back(kHex[b >> 4]);
    out.push_back(kHex[b & 15]);
  }
  return out;
}

}  // namespace pipeserve
