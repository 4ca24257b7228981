// dnsmasq (Debian's dnsmasq-base) as a test's own DNS server on a loopback
// port, serving the SRV records the test gives it, which it can change.
//
//   Dnsmasq dns({"_grpc._tcp.stages.test,localhost,9000"});
//   MakeSystemSrvResolver(dns.address());
//   dns.Restart({... the new records ...});   // same port
//
// Or on an address of the test's own (port 53, where /etc/resolv.conf can
// point), with A records for the SRV targets' names:
//   Dnsmasq dns({.srv_hosts = {"_grpc._tcp.s.test,a.s.test,9000"},
//                .host_records = {"a.s.test,10.77.0.10"}, .listen = "10.77.0.1"});
#ifndef PIPESERVE_SERVER_TESTING_DNSMASQ_H_
#define PIPESERVE_SERVER_TESTING_DNSMASQ_H_

#include <sys/types.h>

#include <string>
#include <vector>

namespace pipeserve {

struct DnsRecords {
  // dnsmasq's --srv-host values ("_service._proto.name,target,port").
  std::vector<std::string> srv_hosts;
  // dnsmasq's --host-record values ("name,ipv4"), served with TTL 0.
  std::vector<std::string> host_records;
  // Where it listens: "" for 127.0.0.1 on a free port, else this IPv4
  // address on port 53.
  std::string listen;
};

class Dnsmasq {
 public:
  // Whether dnsmasq is installed (tests skip without it).
  static bool Installed();
  // `srv_hosts`: dnsmasq's --srv-host values ("_service._proto.name,target,port").
  explicit Dnsmasq(const std::vector<std::string>& srv_hosts);
  explicit Dnsmasq(DnsRecords records);
  ~Dnsmasq();
  Dnsmasq(const Dnsmasq&) = delete;
  Dnsmasq& operator=(const Dnsmasq&) = delete;

  // Serves `srv_hosts` instead, on the same address.
  void Restart(const std::vector<std::string>& srv_hosts);
  // Serves `srv_hosts` and `host_records` instead, on the same address.
  void Restart(std::vector<std::string> srv_hosts, std::vector<std::string> host_records);
  // "127.0.0.1:port", or "<listen>:53"
  std::string address() const;

 private:
  void Run();
  void Stop();
  DnsRecords records_;
  int port_ = 0;
  pid_t pid_ = -1;
};

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_TESTING_DNSMASQ_H_
