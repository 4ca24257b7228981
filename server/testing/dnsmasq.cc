#include "server/testing/dnsmasq.h"

#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>

#include "absl/strings/str_cat.h"

namespace pipeserve {
namespace {

int FreeUdpPort() {
  const int fd = socket(AF_INET, SOCK_DGRAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
  socklen_t len = sizeof a;
  getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  close(fd);
  return ntohs(a.sin_port);
}

}  // namespace

bool Dnsmasq::Installed() { return system("command -v dnsmasq > /dev/null 2>&1") == 0; }

Dnsmasq::Dnsmasq(const std::vector<std::string>& srv_hosts) : port_(FreeUdpPort()) {
  Run(srv_hosts);
}

Dnsmasq::~Dnsmasq() { Stop(); }

void Dnsmasq::Restart(const std::vector<std::string>& srv_hosts) {
  Stop();
  Run(srv_hosts);
}

std::string Dnsmasq::address() const { return absl::StrCat("127.0.0.1:", port_); }

void Dnsmasq::Run(const std::vector<std::string>& srv_hosts) {
  std::vector<std::string> args = {
      "dnsmasq", "--no-daemon", "--no-resolv", "--no-hosts", "--conf-file=/dev/null",
      "--cache-size=0", "--listen-address=127.0.0.1", "--bind-interfaces",
      absl::StrCat("--port=", port_)};
  if (geteuid() == 0) {  // else it would switch to a user "dnsmasq" that may not exist
    args.push_back("--user=root");
    args.push_back("--group=root");
  }
  for (const std::string& s : srv_hosts) args.push_back("--srv-host=" + s);
  pid_ = fork();
  if (pid_ == 0) {
    std::vector<char*> argv;
    for (std::string& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    execvp("dnsmasq", argv.data());
    _exit(127);
  }
}

void Dnsmasq::Stop() {
  if (pid_ <= 0) return;
  kill(pid_, SIGTERM);
  waitpid(pid_, nullptr, 0);
  pid_ = -1;
}

}  // namespace pipeserve
