#include "server/testing/dnsmasq.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

namespace pipeserve {
namespace {

// Whether 127.0.0.1:`port` can be bound with `type` (SOCK_DGRAM or
// SOCK_STREAM) now; with `port` 0, the port it got instead (or 0).
int TryBind(int type, int port) {
  const int fd = socket(AF_INET, type, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons(static_cast<uint16_t>(port));
  int got = 0;
  if (bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0) {
    socklen_t len = sizeof a;
    getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
    got = ntohs(a.sin_port);
  }
  close(fd);
  return got;
}

// A port free for both UDP and TCP (dnsmasq takes both).
int FreePort() {
  for (int i = 0; i < 100; ++i) {
    const int port = TryBind(SOCK_DGRAM, 0);
    if (port != 0 && TryBind(SOCK_STREAM, port) == port) return port;
  }
  return 0;
}

// Whether a DNS server on `ip`:`port` answers a query (for "test.", type
// A) within 100 ms.
bool Answers(const std::string& ip, int port) {
  static const unsigned char kQuery[] = {0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0,
                                         4, 't', 'e', 's', 't', 0, 0, 1, 0, 1};
  const int fd = socket(AF_INET, SOCK_DGRAM, 0);
  timeval timeout{0, 100000};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  inet_pton(AF_INET, ip.c_str(), &a.sin_addr);
  a.sin_port = htons(static_cast<uint16_t>(port));
  char reply[512];
  const bool answered =
      sendto(fd, kQuery, sizeof kQuery, 0, reinterpret_cast<sockaddr*>(&a), sizeof a) > 0 &&
      recv(fd, reply, sizeof reply, 0) > 0;
  close(fd);
  return answered;
}

// Debian installs it in /usr/sbin, which a user's PATH may lack.
std::string Binary() {
  return access("/usr/sbin/dnsmasq", X_OK) == 0 ? "/usr/sbin/dnsmasq" : "dnsmasq";
}

}  // namespace

bool Dnsmasq::Installed() {
  return access("/usr/sbin/dnsmasq", X_OK) == 0 ||
         system("command -v dnsmasq > /dev/null 2>&1") == 0;
}

Dnsmasq::Dnsmasq(const std::vector<std::string>& srv_hosts)
    : Dnsmasq(DnsRecords{.srv_hosts = srv_hosts}) {}

Dnsmasq::Dnsmasq(DnsRecords records) : records_(std::move(records)) {
  if (records_.listen.empty()) {
    records_.listen = "127.0.0.1";
    port_ = FreePort();
  } else {
    port_ = 53;
  }
  Run();
}

Dnsmasq::~Dnsmasq() { Stop(); }

void Dnsmasq::Restart(const std::vector<std::string>& srv_hosts) {
  Restart(srv_hosts, {});
}

void Dnsmasq::Restart(std::vector<std::string> srv_hosts, std::vector<std::string> host_records) {
  Stop();
  records_.srv_hosts = std::move(srv_hosts);
  records_.host_records = std::move(host_records);
  Run();
}

std::string Dnsmasq::address() const { return absl::StrCat(records_.listen, ":", port_); }

void Dnsmasq::Run() {
  std::vector<std::string> args = {
      Binary(), "--no-daemon", "--no-resolv", "--no-hosts", "--conf-file=/dev/null",
      "--cache-size=0", "--local-ttl=0", "--listen-address=" + records_.listen,
      "--bind-interfaces", absl::StrCat("--port=", port_)};
  if (geteuid() == 0) {  // else it would switch to a user "dnsmasq" that may not exist
    args.push_back("--user=root");
    args.push_back("--group=root");
  }
  for (const std::string& s : records_.srv_hosts) args.push_back("--srv-host=" + s);
  for (const std::string& h : records_.host_records) args.push_back("--host-record=" + h);
  pid_ = fork();
  if (pid_ == 0) {
    std::vector<char*> argv;
    for (std::string& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    execvp(argv[0], argv.data());
    _exit(127);
  }
  // Ready once it answers a query (any answer).
  const absl::Time end = absl::Now() + absl::Seconds(10);
  while (!Answers(records_.listen, port_) && absl::Now() < end) {
  }
}

void Dnsmasq::Stop() {
  if (pid_ <= 0) return;
  kill(pid_, SIGTERM);
  waitpid(pid_, nullptr, 0);
  pid_ = -1;
}

}  // namespace pipeserve
