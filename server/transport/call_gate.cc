#include "server/transport/call_gate.h"

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace pipeserve {

// gRPC's side: runs the gate on each call's headers, inline (every rule
// is a few comparisons).
class CallGate::Processor : public grpc::AuthMetadataProcessor {
 public:
  explicit Processor(const CallGate* gate) : gate_(gate) {}
  bool IsBlocking() const override { return false; }

  grpc::Status Process(const InputMetadata& metadata, grpc::AuthContext* context,
                       OutputMetadata*, OutputMetadata*) override {
    CallInfo call;
    auto value = [&metadata](absl::string_view key) { return MetadataValue(metadata, key); };
    call.path = value(":path");
    call.header = value;
    if (context != nullptr) {
      std::vector<grpc::string_ref> names = context->FindPropertyValues("x509_common_name");
      call.peer_has_certificate = !context->FindPropertyValues("x509_pem_cert").empty();
      if (!names.empty()) call.peer_name = std::string(names[0].data(), names[0].size());
    }
    absl::Status s = gate_->Check(call);
    if (s.ok()) return grpc::Status::OK;
    return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
  }

 private:
  const CallGate* const gate_;
};

void CallGate::Add(std::string path_prefix, Rule rule) {
  rules_.emplace_back(std::move(path_prefix), std::move(rule));
}

absl::Status CallGate::Check(const CallInfo& call) const {
  for (const auto& [prefix, rule] : rules_) {
    if (absl::StartsWith(call.path, prefix)) return rule(call);
  }
  return default_(call);
}

void CallGate::Attach(grpc::ServerCredentials* credentials) const {
  credentials->SetAuthMetadataProcessor(std::make_shared<Processor>(this));
}

CallGate::Rule CallGate::Anyone() {
  return [](const CallInfo&) { return absl::OkStatus(); };
}

CallGate::Rule CallGate::TokenScope(const TokenSet* tokens, Scope scope) {
  return [tokens, scope](const CallInfo& call) {
    return AuthorizeCall(tokens, call.header(kAuthorizationKey), scope);
  };
}

CallGate::Rule CallGate::ClusterMember(std::string token, std::vector<std::string> names) {
  return [token = std::move(token), names = std::move(names)](const CallInfo& call) {
    if (absl::Status s = CheckClusterToken(token, call.header(kClusterTokenKey)); !s.ok()) {
      return s;
    }
    if (!call.peer_has_certificate) return absl::OkStatus();
    for (const std::string& n : names) {
      if (call.peer_name == n) return absl::OkStatus();
    }
    return absl::PermissionDeniedError(absl::StrCat(
        call.path, " takes calls only from a peer whose certificate is named \"",
        absl::StrJoin(names, "\" or \""), "\"; this one is named \"", call.peer_name.substr(0, 128),
        "\""));
  };
}

}  // namespace pipeserve
