#include "tests/test_network.h"

#include <sched.h>
#include <sys/mount.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "server/testing/temp_dir.h"

namespace pipeserve {

int Sh(const std::string& cmd) {
  int rc = std::system(("(" + cmd + ") >/dev/null 2>&1").c_str());
  return rc == -1 ? -1 : WEXITSTATUS(rc);
}

std::string TestNetwork::Unsupported() {
  if (::geteuid() != 0) return "needs root to create network namespaces";
  if (Sh("command -v ip && command -v tc") != 0) return "needs iproute2 (ip, tc)";
  return "";
}

std::string TestNetwork::Ns(int i) { return absl::StrCat("psn", ::getpid() % 100000, "s", i); }
std::string TestNetwork::Veth(int i) { return absl::StrCat("psv", ::getpid() % 100000, "s", i); }
std::string TestNetwork::Ip(int i) { return absl::StrCat("10.77.0.", 10 + i); }

absl::Status TestNetwork::Enter() {
  // This process, and every process and thread it starts from here on,
  // lives in a namespace of its own.
  if (::unshare(CLONE_NEWNET) != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot create a network namespace (unshare: ", std::strerror(errno), ")"));
  }
  if (Sh("ip link set lo up") != 0 ||
      Sh("ip link add psbr type bridge && ip addr add 10.77.0.1/24 dev psbr && "
         "ip link set psbr up") != 0) {
    return absl::InternalError("cannot bring up lo and the bridge psbr");
  }
  return absl::OkStatus();
}

absl::Status TestNetwork::UseNameserver(const std::string& ip) {
  const std::string conf = TestTempDir("resolv") + "/resolv.conf";
  std::ofstream(conf) << "nameserver " << ip << "\noptions timeout:1 attempts:2\n";
  // Private mounts: the bind below is seen by this process and its
  // children only, never by the machine.
  if (::unshare(CLONE_NEWNS) != 0 ||
      ::mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0 ||
      ::mount(conf.c_str(), "/etc/resolv.conf", nullptr, MS_BIND, nullptr) != 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "cannot point /etc/resolv.conf at ", ip, " in a mount namespace: ", std::strerror(errno)));
  }
  return absl::OkStatus();
}

absl::Status TestNetwork::AddHost(int i) {
  made_.push_back(Ns(i));
  if (Sh(absl::StrCat("ip netns add ", Ns(i))) != 0) {
    return absl::InternalError(absl::StrCat("ip netns add ", Ns(i)));
  }
  if (Sh(absl::StrCat("ip link add ", Veth(i), " type veth peer name eth0 netns ", Ns(i),
                      " && ip link set ", Veth(i), " master psbr up && ip -n ", Ns(i),
                      " addr add ", Ip(i), "/24 dev eth0 && ip -n ", Ns(i),
                      " link set eth0 up && ip -n ", Ns(i), " link set lo up")) != 0) {
    return absl::InternalError(absl::StrCat("cannot link namespace ", Ns(i)));
  }
  return absl::OkStatus();
}

TestNetwork::~TestNetwork() {
  for (const std::string& ns : made_) Sh("ip netns del " + ns);
}

}  // namespace pipeserve
