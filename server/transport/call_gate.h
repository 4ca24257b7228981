// Who may make which call, decided from a call's headers before its body
// is read. gRPC runs a server's AuthMetadataProcessor once a call's
// initial metadata has arrived and reads the request message only if the
// processor lets the call in, so a call without the right token or
// peer identity costs the server its headers, not its body (up to
// --max_message_mb of it). Services keep their own checks as well.
//
// Rules match a call's method path by prefix, first match first; calls no
// rule matches get the default.
//
//   CallGate gate(CallGate::TokenScope(&tokens, Scope::kInfer));   // the default
//   gate.Add("/grpc.health.v1.Health/", CallGate::Anyone());
//   gate.Add("/pipeserve.ModelService/", CallGate::TokenScope(&tokens, Scope::kAdmin));
//   RETURN_IF_ERROR(gate.Attach(credentials.get()));
#ifndef PIPESERVE_SERVER_TRANSPORT_CALL_GATE_H_
#define PIPESERVE_SERVER_TRANSPORT_CALL_GATE_H_

#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "grpcpp/security/auth_metadata_processor.h"
#include "grpcpp/security/server_credentials.h"
#include "server/transport/auth.h"

namespace pipeserve {

// What a rule sees of a call.
struct CallInfo {
  std::string path;  // "/package.Service/Method"
  // A request header by name ("" when absent).
  std::function<std::string(absl::string_view)> header;
  // The peer's certificate common name, "" without client certificates.
  std::string peer_name;
  bool peer_has_certificate = false;
};

class CallGate {
 public:
  // OK lets the call in; any other status ends it with that code and
  // message before its body is read.
  using Rule = std::function<absl::Status(const CallInfo&)>;

  explicit CallGate(Rule default_rule) : default_(std::move(default_rule)) {}

  void Add(std::string path_prefix, Rule rule);

  // The rule's verdict for `call` (for tests and for services without a
  // processor).
  absl::Status Check(const CallInfo& call) const;

  // Installs the gate on `credentials` (which must be TLS or local
  // credentials: gRPC runs no processor for insecure ones; see
  // ServeOptions::gate). The gate must outlive the server.
  void Attach(grpc::ServerCredentials* credentials) const;

  // Rules.
  static Rule Anyone();
  // The `authorization: Bearer <token>` header must grant `scope`; every
  // call passes when `tokens` is null (no tokens configured).
  static Rule TokenScope(const TokenSet* tokens, Scope scope);
  // The cluster token header must match `token` ("" : no token needed),
  // and a peer with a client certificate must be named one of `names`
  // (kPermissionDenied naming who may call, otherwise).
  static Rule ClusterMember(std::string token, std::vector<std::string> names);

 private:
  class Processor;
  Rule default_;
  std::vector<std::pair<std::string, Rule>> rules_;
};

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_TRANSPORT_CALL_GATE_H_
