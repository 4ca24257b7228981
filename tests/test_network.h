// Network namespaces for end-to-end tests, on one machine: the test process
// moves into a namespace of its own (call Enter before any thread starts:
// a namespace is per thread), with a bridge at 10.77.0.1, and each host i
// gets a namespace linked to it by a veth pair, at 10.77.0.10+i. Nothing
// reaches the machine's own network. Needs root and iproute2.
//
//   TestNetwork net;
//   if (std::string why = TestNetwork::Unsupported(); !why.empty()) GTEST_SKIP() << why;
//   ASSERT_TRUE(net.Enter().ok());
//   ASSERT_TRUE(net.AddHost(0).ok());
//   StageServerProcess::Start(token, {"--host=" + TestNetwork::Ip(0)}, net.Prefix(0));
#ifndef PIPESERVE_TESTS_TEST_NETWORK_H_
#define PIPESERVE_TESTS_TEST_NETWORK_H_

#include <string>
#include <vector>

#include "absl/status/status.h"

namespace pipeserve {

// Runs a shell command quietly; its exit status (0: success).
int Sh(const std::string& cmd);

class TestNetwork {
 public:
  // Why namespaces cannot be made here ("" when they can).
  static std::string Unsupported();
  // Deletes the hosts' namespaces.
  ~TestNetwork();

  absl::Status Enter();
  // Every process started from here on (in the hosts' namespaces too)
  // resolves names through the DNS server at `ip` (port 53): this process
  // moves into a mount namespace of its own, where /etc/resolv.conf is a
  // file of the test's. Call right after Enter, before any thread starts.
  absl::Status UseNameserver(const std::string& ip);
  absl::Status AddHost(int i);

  // Names unique to this run: namespaces psn<pid>s<i>, host-side veths
  // psv<pid>s<i> (at most 15 characters), addresses 10.77.0.10+i.
  static std::string Ns(int i);
  static std::string Veth(int i);
  static std::string Ip(int i);
  // A command prefix that runs a program in host i's namespace.
  static std::vector<std::string> Prefix(int i) { return {"ip", "netns", "exec", Ns(i)}; }

 private:
  std::vector<std::string> made_;
};

}  // namespace pipeserve

#endif  // PIPESERVE_TESTS_TEST_NETWORK_H_
