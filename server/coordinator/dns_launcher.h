// A launcher that finds its stage servers in DNS, as a Kubernetes headless
// Service publishes a StatefulSet's ready pods: the SRV records of a name
// (`_grpc._tcp.pipeserve-stages.default.svc.cluster.local`) list every
// server as a stable host name and a port (stage-0.pipeserve-stages...:9000).
// Each ServersFor looks again, so a scale-up is used by the next upload or
// repair, and a replaced pod (same name, new address) by the next
// connection; nothing is restarted. Servers are taken in order of name
// (stage-2 before stage-10), one per stage: unlike the static launcher it
// never puts two stages on one server, so a model of S stages in R
// replicas needs R x S listed; with fewer it gets kUnavailable naming what
// it waits for, and is deployed as soon as enough answer (a stored model by
// the coordinator's repair loop; an upload when the client tries again).
//
//   std::unique_ptr<Launcher> l = MakeDnsLauncher({.name = "_grpc._tcp.stages"});
#ifndef PIPESERVE_SERVER_COORDINATOR_DNS_LAUNCHER_H_
#define PIPESERVE_SERVER_COORDINATOR_DNS_LAUNCHER_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "server/coordinator/launcher.h"

namespace pipeserve {

struct SrvTarget {
  std::string host;
  int port = 0;
};

// Looks up SRV records. kNotFound when the name has none, kUnavailable when
// the DNS server does not answer.
class SrvResolver {
 public:
  virtual ~SrvResolver() = default;
  virtual absl::StatusOr<std::vector<SrvTarget>> Lookup(const std::string& name) = 0;
};

// The system's resolver (/etc/resolv.conf), or the DNS server at `server`
// ("ip" or "ip:port") when it is not empty.
std::unique_ptr<SrvResolver> MakeSystemSrvResolver(const std::string& server = "");

struct DnsLauncherOptions {
  std::string name;                    // the SRV name
  std::unique_ptr<SrvResolver> resolver;  // null: the system's
};

std::unique_ptr<Launcher> MakeDnsLauncher(DnsLauncherOptions options);

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_COORDINATOR_DNS_LAUNCHER_H_
