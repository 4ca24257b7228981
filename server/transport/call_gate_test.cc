#include "server/transport/call_gate.h"

#include <map>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace pipeserve {
namespace {

using ::testing::HasSubstr;

CallInfo Call(const std::string& path, std::map<std::string, std::string> headers = {},
              const std::string& peer = "", bool certificate = false) {
  CallInfo c;
  c.path = path;
  c.header = [headers](absl::string_view key) {
    auto it = headers.find(std::string(key));
    return it == headers.end() ? std::string() : it->second;
  };
  c.peer_name = peer;
  c.peer_has_certificate = certificate;
  return c;
}

TEST(CallGateTest, RulesMatchByPathPrefixFirstMatchFirstElseTheDefault) {
  auto tokens = TokenSet::Parse("admin 0123456789abcdef-admin\ninfer 0123456789abcdef-infer\n");
  ASSERT_TRUE(tokens.ok());
  CallGate gate(CallGate::TokenScope(&*tokens, Scope::kInfer));
  gate.Add("/grpc.health.v1.Health/", CallGate::Anyone());
  gate.Add("/pipeserve.ModelService/", CallGate::TokenScope(&*tokens, Scope::kAdmin));
  EXPECT_TRUE(gate.Check(Call("/grpc.health.v1.Health/Check")).ok());
  EXPECT_EQ(gate.Check(Call("/inference.GRPCInferenceService/ModelInfer")).code(),
            absl::StatusCode::kUnauthenticated);
  const std::map<std::string, std::string> infer = {
      {"authorization", "Bearer 0123456789abcdef-infer"}};
  EXPECT_TRUE(gate.Check(Call("/inference.GRPCInferenceService/ModelInfer", infer)).ok());
  absl::Status upload = gate.Check(Call("/pipeserve.ModelService/Upload", infer));
  EXPECT_EQ(upload.code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(std::string(upload.message()), HasSubstr("\"admin\" scope"));
  CallGate open(CallGate::TokenScope(nullptr, Scope::kAdmin));
  EXPECT_TRUE(open.Check(Call("/pipeserve.ModelService/Upload")).ok()) << "no tokens configured";
}

TEST(CallGateTest, ClusterMembersNeedTheTokenAndAPermittedCertificateName) {
  CallGate gate(CallGate::ClusterMember("cluster-secret-0123", {"pipeserve coordinator"}));
  gate.Add("/pipeserve.StageService/Process",
           CallGate::ClusterMember("cluster-secret-0123", {"pipeserve coordinator", "pipeserve stage"}));
  const std::map<std::string, std::string> token = {{"pipeserve-cluster-token", "cluster-secret-0123"}};
  EXPECT_EQ(gate.Check(Call("/pipeserve.StageService/ListStages")).code(),
            absl::StatusCode::kUnauthenticated);
  EXPECT_TRUE(gate.Check(Call("/pipeserve.StageService/ListStages", token)).ok())
      << "token only, no certificates: plaintext on loopback";
  EXPECT_TRUE(gate.Check(Call("/pipeserve.StageService/ListStages", token,
                              "pipeserve coordinator", true)).ok());
  absl::Status s = gate.Check(Call("/pipeserve.StageService/LoadStage", token, "pipeserve stage", true));
  EXPECT_EQ(s.code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(std::string(s.message()), HasSubstr("named \"pipeserve coordinator\""));
  EXPECT_TRUE(gate.Check(Call("/pipeserve.StageService/Process", token, "pipeserve stage", true)).ok());
  EXPECT_EQ(gate.Check(Call("/pipeserve.StageService/Process", token, "someone else", true)).code(),
            absl::StatusCode::kPermissionDenied);
}

}  // namespace
}  // namespace pipeserve
