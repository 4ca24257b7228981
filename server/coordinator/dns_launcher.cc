#include "server/coordinator/dns_launcher.h"

#include <arpa/inet.h>
#include <arpa/nameser.h>
#include <netdb.h>
#include <netinet/in.h>
#include <resolv.h>

#include <algorithm>
#include <cctype>
#include <cstring>
#include <tuple>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"

namespace pipeserve {
namespace {

class SystemSrvResolver : public SrvResolver {
 public:
  explicit SystemSrvResolver(std::string server) : server_(std::move(server)) {}

  absl::StatusOr<std::vector<SrvTarget>> Lookup(const std::string& name) override {
    struct __res_state state;
    std::memset(&state, 0, sizeof(state));
    if (res_ninit(&state) != 0) return absl::UnavailableError("the resolver does not start");
    state.retrans = 2;  // seconds per try, and two tries: a silent server costs
    state.retry = 2;    // the repair loop seconds, not half a minute
    if (!server_.empty()) {
      absl::Status s = UseServer(&state);
      if (!s.ok()) {
        res_nclose(&state);
        return s;
      }
    }
    std::vector<unsigned char> answer(65536);
    // With the search list of resolv.conf, so that a name without the
    // cluster's domain (..svc) resolves in any cluster.
    const int n = res_nsearch(&state, name.c_str(), ns_c_in, ns_t_srv, answer.data(),
                              static_cast<int>(answer.size()));
    const int herr = state.res_h_errno;
    res_nclose(&state);
    if (n < 0) {
      if (herr == HOST_NOT_FOUND || herr == NO_DATA) {
        return absl::NotFoundError(absl::StrCat("DNS has no SRV records for ", name));
      }
      return absl::UnavailableError(absl::StrCat("DNS lookup of ", name, " failed (",
                                                 hstrerror(herr), ")"));
    }
    return Parse(answer.data(), n, name);
  }

 private:
  absl::Status UseServer(struct __res_state* state) {
    std::vector<std::string> parts = absl::StrSplit(server_, ':');
    int port = 53;
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    if (parts.size() > 2 || inet_pton(AF_INET, parts[0].c_str(), &addr.sin_addr) != 1 ||
        (parts.size() == 2 && (!absl::SimpleAtoi(parts[1], &port) || port < 1 || port > 65535))) {
      return absl::InvalidArgumentError(
          absl::StrCat("DNS server \"", server_, "\" is not an IPv4 address[:port]"));
    }
    addr.sin_port = htons(static_cast<uint16_t>(port));
    state->nsaddr_list[0] = addr;
    state->nscount = 1;
    return absl::OkStatus();
  }

  static absl::StatusOr<std::vector<SrvTarget>> Parse(const unsigned char* msg, int len,
                                                      const std::string& name) {
    ns_msg handle;
    if (ns_initparse(msg, len, &handle) != 0) {
      return absl::UnavailableError(absl::StrCat("DNS answer for ", name, " does not parse"));
    }
    std::vector<SrvTarget> out;
    for (int i = 0; i < ns_msg_count(handle, ns_s_an); ++i) {
      ns_rr rr;
      if (ns_parserr(&handle, ns_s_an, i, &rr) != 0 || ns_rr_type(rr) != ns_t_srv ||
          ns_rr_rdlen(rr) < 7) {
        continue;
      }
      const unsigned char* rd = ns_rr_rdata(rr);  // priority, weight, port, target
      char host[NS_MAXDNAME];
      if (dn_expand(ns_msg_base(handle), ns_msg_end(handle), rd + 6, host, sizeof(host)) < 0) {
        continue;
      }
      out.push_back({host, (rd[4] << 8) | rd[5]});
    }
    if (out.empty()) return absl::NotFoundError(absl::StrCat("DNS has no SRV records for ", name));
    return out;
  }

  const std::string server_;
};

// <0, 0, >0 as `a` sorts before, with or after `b`, runs of digits compared
// by value.
int NaturalCompare(const std::string& a, const std::string& b) {
  size_t i = 0, j = 0;
  while (i < a.size() && j < b.size()) {
    if (std::isdigit(static_cast<unsigned char>(a[i])) &&
        std::isdigit(static_cast<unsigned char>(b[j]))) {
      size_t ie = i, je = j;
      while (ie < a.size() && std::isdigit(static_cast<unsigned char>(a[ie]))) ++ie;
      while (je < b.size() && std::isdigit(static_cast<unsigned char>(b[je]))) ++je;
      const std::string x = a.substr(i, ie - i), y = b.substr(j, je - j);
      const size_t xs = x.find_first_not_of('0'), ys = y.find_first_not_of('0');
      const std::string xv = xs == std::string::npos ? "" : x.substr(xs);
      const std::string yv = ys == std::string::npos ? "" : y.substr(ys);
      if (xv.size() != yv.size()) return xv.size() < yv.size() ? -1 : 1;
      if (xv != yv) return xv < yv ? -1 : 1;
      i = ie;
      j = je;
    } else {
      if (a[i] != b[j]) return a[i] < b[j] ? -1 : 1;
      ++i;
      ++j;
    }
  }
  return (a.size() - i) == (b.size() - j) ? 0 : (a.size() - i) < (b.size() - j) ? -1 : 1;
}

class DnsLauncher : public Launcher {
 public:
  explicit DnsLauncher(DnsLauncherOptions o) : options_(std::move(o)) {
    if (options_.resolver == nullptr) options_.resolver = MakeSystemSrvResolver();
  }
  std::string Name() const override { return "dns"; }

  absl::StatusOr<std::vector<std::string>> ServersFor(int num_stages) override {
    absl::StatusOr<std::vector<std::string>> servers = Servers();
    if (!servers.ok()) {
      return absl::UnavailableError(absl::StrCat("waiting for ", num_stages,
                                                 " stage servers: ", servers.status().message()));
    }
    if (static_cast<int>(servers->size()) < num_stages) {
      return absl::UnavailableError(absl::StrCat(
          "waiting for ", num_stages, " stage servers: the DNS name ", options_.name, " lists ",
          servers->size(), servers->empty() ? "" : " (", absl::StrJoin(*servers, ", "),
          servers->empty() ? "" : ")"));
    }
    servers->resize(num_stages);  // one server a stage, the first in order
    return servers;
  }
  int ThreadsPerStage(bool) const override { return 0; }
  bool ServersComeLater() const override { return true; }
  std::vector<std::string> ExistingServers() const override {
    absl::StatusOr<std::vector<std::string>> servers = Servers();
    return servers.ok() ? *servers : std::vector<std::string>{};
  }

 private:
  // Every server the name lists, "host:port", in order of host (numbers in
  // it by value: stage-2 before stage-10, as a StatefulSet counts its pods),
  // then port.
  absl::StatusOr<std::vector<std::string>> Servers() const {
    absl::StatusOr<std::vector<SrvTarget>> targets = options_.resolver->Lookup(options_.name);
    if (!targets.ok()) return targets.status();
    std::sort(targets->begin(), targets->end(), [](const SrvTarget& a, const SrvTarget& b) {
      const int c = NaturalCompare(a.host, b.host);
      return c != 0 ? c < 0 : a.port < b.port;
    });
    std::vector<std::string> out;
    for (const SrvTarget& t : *targets) {
      std::string host = t.host;
      if (!host.empty() && host.back() == '.') host.pop_back();
      std::string address = absl::StrCat(host, ":", t.port);
      if (out.empty() || out.back() != address) out.push_back(std::move(address));
    }
    return out;
  }

  DnsLauncherOptions options_;
};

}  // namespace

std::unique_ptr<SrvResolver> MakeSystemSrvResolver(const std::string& server) {
  return std::make_unique<SystemSrvResolver>(server);
}

std::unique_ptr<Launcher> MakeDnsLauncher(DnsLauncherOptions options) {
  return std::make_unique<DnsLauncher>(std::move(options));
}

}  // namespace pipeserve
