// Listening sockets for the HTTP servers: every address a host name
// resolves to ("localhost": 127.0.0.1 and ::1), on one port (0: the first
// socket bound picks it), non-blocking, IPv6 ones IPv6 only.
//
//   ASSIGN_OR_RETURN(Listeners l, ListenOn("127.0.0.1", 0, "metrics"));
//   l.fds; l.port;
#ifndef PIPESERVE_SERVER_TRANSPORT_LISTEN_H_
#define PIPESERVE_SERVER_TRANSPORT_LISTEN_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace pipeserve {

struct Listeners {
  std::vector<int> fds;
  int port = 0;
};

// kInvalidArgument (naming `what`) for a host that is not a name or
// address or does not resolve, kUnavailable when no address can be bound.
absl::StatusOr<Listeners> ListenOn(const std::string& host, int port, const std::string& what);

// Writes `port` to `path` atomically (a port file).
void WritePortFile(const std::string& path, int port);

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_TRANSPORT_LISTEN_H_
