#include "server/transport/listen.h"

#include <netdb.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"

namespace pipeserve {
namespace {

// Binds a listening socket to `ai` (its port replaced by `port`); -1 with
// errno set on failure.
int Listen(const addrinfo& ai, int port) {
  int fd = ::socket(ai.ai_family, ai.ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, ai.ai_protocol);
  if (fd < 0) return -1;
  int one = 1;
  ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (ai.ai_family == AF_INET6) ::setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
  sockaddr_storage addr{};
  std::memcpy(&addr, ai.ai_addr, ai.ai_addrlen);
  if (ai.ai_family == AF_INET6) {
    reinterpret_cast<sockaddr_in6*>(&addr)->sin6_port = htons(port);
  } else {
    reinterpret_cast<sockaddr_in*>(&addr)->sin_port = htons(port);
  }
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), ai.ai_addrlen) != 0 || ::listen(fd, 64) != 0) {
    const int saved = errno;
    ::close(fd);
    errno = saved;
    return -1;
  }
  return fd;
}

int BoundPort(int fd) {
  sockaddr_storage addr{};
  socklen_t len = sizeof addr;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  return ntohs(addr.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&addr)->sin6_port
                                          : reinterpret_cast<sockaddr_in*>(&addr)->sin_port);
}

}  // namespace

absl::StatusOr<Listeners> ListenOn(const std::string& host, int port, const std::string& what) {
  std::string name = host;
  if (name.size() > 2 && name.front() == '[' && name.back() == ']') {
    name = name.substr(1, name.size() - 2);
  }
  const bool plausible = !name.empty() && std::all_of(name.begin(), name.end(), [](char c) {
    return absl::ascii_isalnum(c) || c == '.' || c == '-' || c == ':' || c == '_' || c == '%';
  });
  if (!plausible) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": \"", host.substr(0, 128), "\" is not a host name or address"));
  }
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  addrinfo* found = nullptr;
  if (int rc = ::getaddrinfo(name.c_str(), nullptr, &hints, &found); rc != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": cannot resolve host \"", host, "\": ", ::gai_strerror(rc)));
  }
  Listeners l;
  std::string failure;
  for (const addrinfo* ai = found; ai != nullptr; ai = ai->ai_next) {
    int fd = Listen(*ai, port);
    if (fd < 0) {
      failure = std::strerror(errno);
      continue;
    }
    if (port == 0) port = BoundPort(fd);
    l.fds.push_back(fd);
  }
  ::freeaddrinfo(found);
  if (l.fds.empty()) {
    return absl::UnavailableError(
        absl::StrCat(what, ": cannot listen on ", host, ":", port, ": ", failure));
  }
  l.port = port;
  return l;
}

void WritePortFile(const std::string& path, int port) {
  std::ofstream(path + ".tmp") << port << "\n";
  std::rename((path + ".tmp").c_str(), path.c_str());
}

}  // namespace pipeserve
