// A plain HTTP GET over loopback, for tests of HTTP endpoints (metrics).
#ifndef PIPESERVE_TESTS_HTTP_GET_H_
#define PIPESERVE_TESTS_HTTP_GET_H_

#include <string>

namespace pipeserve {

// The whole response (status line, headers, body) of GET `path` on
// 127.0.0.1:`port`, or "" if the connection fails.
std::string HttpGet(int port, const std::string& path);

}  // namespace pipeserve

#endif  // PIPESERVE_TESTS_HTTP_GET_H_
