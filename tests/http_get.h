// A plain HTTP GET, for tests of HTTP endpoints (metrics).
#ifndef PIPESERVE_TESTS_HTTP_GET_H_
#define PIPESERVE_TESTS_HTTP_GET_H_

#include <string>

namespace pipeserve {

// The whole response (status line, headers, body) of GET `path` on
// `host`:`port` (an IPv4 or IPv6 address), or "" if the connection fails
// or the server has not answered within `timeout_ms`.
std::string HttpGet(int port, const std::string& path, const std::string& host = "127.0.0.1",
                    int timeout_ms = 10000);

// A TCP connection to 127.0.0.1:`port`: its socket, or -1.
int ConnectLoopback(int port);

}  // namespace pipeserve

#endif  // PIPESERVE_TESTS_HTTP_GET_H_
