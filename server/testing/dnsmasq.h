// dnsmasq (Debian's dnsmasq-base) as a test's own DNS server on a loopback
// port, serving the SRV records the test gives it, which it can change.
//
//   Dnsmasq dns({"_grpc._tcp.stages.test,localhost,9000"});
//   MakeSystemSrvResolver(dns.address());
//   dns.Restart({... the new records ...});   // same port
#ifndef PIPESERVE_SERVER_TESTING_DNSMASQ_H_
#define PIPESERVE_SERVER_TESTING_DNSMASQ_H_

#include <sys/types.h>

#include <string>
#include <vector>

namespace pipeserve {

class Dnsmasq {
 public:
  // Whether dnsmasq is installed (tests skip without it).
  static bool Installed();
  // `srv_hosts`: dnsmasq's --srv-host values ("_service._proto.name,target,port").
  explicit Dnsmasq(const std::vector<std::string>& srv_hosts);
  ~Dnsmasq();
  Dnsmasq(const Dnsmasq&) = delete;
  Dnsmasq& operator=(const Dnsmasq&) = delete;

  // Serves `srv_hosts` instead, on the same address.
  void Restart(const std::vector<std::string>& srv_hosts);
  // "127.0.0.1:port"
  std::string address() const;

 private:
  void Run(const std::vector<std::string>& srv_hosts);
  void Stop();
  int port_ = 0;
  pid_t pid_ = -1;
};

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_TESTING_DNSMASQ_H_
