#include "server/coordinator/redact.h"

#include <algorithm>
#include <cctype>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_replace.h"

namespace pipeserve {
namespace {

constexpr char kReplacement[] = "a stage server";

bool HostChar(char c) { return absl::ascii_isalnum(c) || c == '.' || c == '-' || c == '_'; }

// The length of an address starting at text[i] (0 if none starts there):
// [scheme:]host:port, where the host is bracketed IPv6, has a dot, or is
// localhost; or a unix: path.
size_t AddressAt(absl::string_view text, size_t i) {
  absl::string_view rest = text.substr(i);
  size_t at = 0;
  for (absl::string_view scheme : {"ipv4:", "ipv6:", "dns:///", "dns:"}) {
    if (absl::StartsWithIgnoreCase(rest, scheme)) {
      at = scheme.size();
      break;
    }
  }
  if (absl::StartsWithIgnoreCase(rest, "unix:")) {
    size_t end = 5;
    while (end < rest.size() && !absl::ascii_isspace(rest[end]) && rest[end] != ')' &&
           rest[end] != ',' && rest[end] != ';' && rest[end] != '"') {
      ++end;
    }
    return end > 5 ? end : 0;
  }
  size_t host_end = at;
  bool ipv6 = false;
  if (host_end < rest.size() && rest[host_end] == '[') {
    host_end = rest.find(']', host_end);
    if (host_end == absl::string_view::npos) return 0;
    ++host_end;
    ipv6 = true;
  } else {
    while (host_end < rest.size() && HostChar(rest[host_end])) ++host_end;
  }
  absl::string_view host = rest.substr(at, host_end - at);
  if (host.empty() || host_end >= rest.size() || rest[host_end] != ':') return 0;
  size_t end = host_end + 1;
  while (end < rest.size() && absl::ascii_isdigit(rest[end])) ++end;
  if (end == host_end + 1) return 0;  // no port
  const bool hostish = ipv6 || at > 0 || absl::StrContains(host, '.') ||
                       absl::EqualsIgnoreCase(host, "localhost");
  return hostish ? end : 0;
}

}  // namespace

std::string RedactAddresses(absl::string_view message, const std::vector<std::string>& known) {
  std::vector<std::pair<const absl::string_view, absl::string_view>> replacements;
  for (const std::string& k : known) {
    if (!k.empty()) replacements.emplace_back(k, kReplacement);
  }
  const std::string named = absl::StrReplaceAll(message, replacements);
  std::string out;
  out.reserve(named.size());
  for (size_t i = 0; i < named.size();) {
    // Only at the start of a word: "x1.example.com:80", not its tail.
    const bool word_start = i == 0 || !HostChar(named[i - 1]);
    const size_t n = word_start ? AddressAt(named, i) : 0;
    if (n > 0) {
      out += kReplacement;
      i += n;
    } else {
      out += named[i++];
    }
  }
  return out;
}

absl::Status RedactAddresses(const absl::Status& s, const std::vector<std::string>& known) {
  if (s.ok()) return s;
  std::string message = RedactAddresses(s.message(), known);
  if (message == s.message()) return s;
  absl::Status out(s.code(), message);
  s.ForEachPayload([&out](absl::string_view url, const absl::Cord& payload) {
    out.SetPayload(url, payload);
  });
  return out;
}

}  // namespace pipeserve
