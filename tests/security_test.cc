// Authenticated links, end to end: a coordinator serving TLS with bearer
// tokens, its stage servers on mutual TLS with a cluster CA, certificates
// from tools/make_dev_certs.sh; and the rule that plaintext stays on
// loopback unless asked otherwise.
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "client/client.h"
#include "partitioner/graph_builder.h"
#include "runtime/model_file.h"
#include "tests/cluster.h"
#include "tests/fixtures.h"

namespace pipeserve {
namespace {

using ::testing::HasSubstr;

// Runs tools/make_dev_certs.sh into a new folder.
std::string MakeCerts(const std::string& name) {
  std::string dir = TempDir(name);
  std::string cmd = absl::StrCat(RunfilesRoot(), "/tools/make_dev_certs.sh ", dir,
                                 "/certs >", dir, "/log 2>&1");
  EXPECT_EQ(std::system(cmd.c_str()), 0) << "see " << dir << "/log";
  return dir + "/certs";
}

std::string ReadToken(const std::string& path) {
  std::ifstream in(path);
  std::string token;
  in >> token;
  return token;
}

class SecurityTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    certs_ = new std::string(MakeCerts("certs"));
    other_ = new std::string(MakeCerts("other_certs"));  // a CA nobody trusts
    const std::string& c = *certs_;
    CoordinatorFlags flags;
    flags.repository = TempDir("secure_repo");
    flags.extra = {"--tls_cert=" + c + "/coordinator.crt", "--tls_key=" + c + "/coordinator.key",
                   "--auth_tokens=" + c + "/tokens",        "--cluster_ca=" + c + "/ca.crt",
                   "--cluster_cert=" + c + "/coordinator.crt",
                   "--cluster_key=" + c + "/coordinator.key"};
    flags.client.tls_ca_file = c + "/ca.crt";
    auto coordinator = CoordinatorProcess::Start(flags);
    ASSERT_TRUE(coordinator.ok()) << coordinator.status();
    coordinator_ = coordinator->release();
    admin_ = Connect(ReadToken(c + "/admin.token"));
    GraphBuilder b;
    b.Input("x", {-1, 8}).Param("w", {8, 8});
    b.Op("mm", {"x", "w"}, "h").Split().Op("relu", {"h"}, "y").Output("y");
    Model m = b.Build();
    std::string path = TempDir("secure_model") + "/m.psm";
    ASSERT_TRUE(WriteModelFile(path, m.graph, m.weights).ok());
    auto up = admin_->Upload("m", path, {});
    ASSERT_TRUE(up.ok()) << up.status();
  }
  static void TearDownTestSuite() {
    delete admin_;
    delete coordinator_;
  }

  static Client* Connect(const std::string& token, const std::string& ca = "") {
    ClientOptions o;
    o.timeout = absl::Seconds(10);
    o.tls_ca_file = ca.empty() ? *certs_ + "/ca.crt" : ca;
    o.token = token;
    return Client::Connect(coordinator_->address(), o)->release();
  }

  static std::string* certs_;
  static std::string* other_;
  static CoordinatorProcess* coordinator_;
  static Client* admin_;
};

std::string* SecurityTest::certs_ = nullptr;
std::string* SecurityTest::other_ = nullptr;
CoordinatorProcess* SecurityTest::coordinator_ = nullptr;
Client* SecurityTest::admin_ = nullptr;

TEST_F(SecurityTest, WithTheRightTokensEverythingWorksOverTls) {
  std::unique_ptr<Client> infer(Connect(ReadToken(*certs_ + "/infer.token")));
  auto out = infer->Infer("m", {{"x", Tensor::Zeros({2, 8})}});
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ((*out)[0].tensor.shape(), (Shape{2, 8}));
  EXPECT_TRUE(admin_->Infer("m", {{"x", Tensor::Zeros({2, 8})}}).ok()) << "admin includes infer";
  EXPECT_TRUE(admin_->GetPlan("m").ok());
}

TEST_F(SecurityTest, AMissingOrUnknownTokenIsUnauthenticated) {
  std::unique_ptr<Client> none(Connect(""));
  auto r = none->Infer("m", {{"x", Tensor::Zeros({2, 8})}});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnauthenticated) << r.status();
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("authorization: Bearer"));
  EXPECT_EQ(none->ListModels().status().code(), absl::StatusCode::kUnauthenticated);
  std::unique_ptr<Client> guess(Connect("0123456789abcdef0123456789abcdef"));
  EXPECT_EQ(guess->Infer("m", {{"x", Tensor::Zeros({2, 8})}}).status().code(),
            absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(guess->ModelMetadata("m").status().code(), absl::StatusCode::kUnauthenticated);
}

TEST_F(SecurityTest, AnInferTokenCannotAdminister) {
  std::unique_ptr<Client> infer(Connect(ReadToken(*certs_ + "/infer.token")));
  auto up = infer->Upload("intruder", "/dev/null", {});
  EXPECT_EQ(up.status().code(), absl::StatusCode::kPermissionDenied) << up.status();
  EXPECT_THAT(std::string(up.status().message()), HasSubstr("\"admin\" scope"));
  EXPECT_EQ(infer->GetPlan("m").status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(infer->ListModels().status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(infer->Unload("m").code(), absl::StatusCode::kPermissionDenied);
  EXPECT_TRUE(admin_->ModelReady("m").ok());
}

TEST_F(SecurityTest, HealthAndReadinessAnswerWithoutATokenForProbes) {
  std::unique_ptr<Client> none(Connect(""));
  EXPECT_EQ(*none->Health(), "SERVING");
  EXPECT_TRUE(*none->ServerLive());
  EXPECT_TRUE(*none->ServerReady());
}

TEST_F(SecurityTest, PlaintextAndUntrustingClientsCannotConnect) {
  ClientOptions plain;
  plain.timeout = absl::Seconds(5);
  plain.token = ReadToken(*certs_ + "/infer.token");
  auto p = *Client::Connect(coordinator_->address(), plain);
  EXPECT_EQ(p->Infer("m", {{"x", Tensor::Zeros({2, 8})}}).status().code(),
            absl::StatusCode::kUnavailable);
  std::unique_ptr<Client> wrong_ca(
      Connect(ReadToken(*certs_ + "/infer.token"), *other_ + "/ca.crt"));
  EXPECT_EQ(wrong_ca->Infer("m", {{"x", Tensor::Zeros({2, 8})}}).status().code(),
            absl::StatusCode::kUnavailable);
}

// A stage server takes calls only from holders of a certificate the
// cluster CA signed.
TEST_F(SecurityTest, StageServersTakeOnlyClusterCertificates) {
  auto plan = admin_->GetPlan("m");
  ASSERT_TRUE(plan.ok());
  const std::string stage = plan->stage_servers(0);
  auto health = [&](ClientOptions o) {
    o.timeout = absl::Seconds(5);
    return (*Client::Connect(stage, o))->Health();
  };
  EXPECT_EQ(health({}).status().code(), absl::StatusCode::kUnavailable) << "plaintext";
  ClientOptions no_cert;
  no_cert.tls_ca_file = *certs_ + "/ca.crt";
  EXPECT_EQ(health(no_cert).status().code(), absl::StatusCode::kUnavailable) << "no client cert";
  ClientOptions stranger = no_cert;
  stranger.tls_cert_file = *other_ + "/stage.crt";
  stranger.tls_key_file = *other_ + "/stage.key";
  EXPECT_EQ(health(stranger).status().code(), absl::StatusCode::kUnavailable)
      << "a certificate from another CA";
  ClientOptions member = no_cert;
  member.tls_cert_file = *certs_ + "/stage.crt";
  member.tls_key_file = *certs_ + "/stage.key";
  auto h = health(member);
  ASSERT_TRUE(h.ok()) << h.status();
  EXPECT_EQ(*h, "SERVING");
}

TEST(ListenTest, PlaintextOnANonLoopbackAddressNeedsTheFlag) {
  auto refused = CoordinatorProcess::Start({TempDir("open_repo"), {"--host=0.0.0.0"}});
  ASSERT_FALSE(refused.ok());
  // The coordinator said why before it exited.
  std::string log;
  for (const auto& e : std::filesystem::directory_iterator(std::getenv("TEST_TMPDIR"))) {
    std::ifstream in(e.path() / "coordinator.log");
    std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    if (text.find("refusing to serve plaintext") != std::string::npos) log = text;
  }
  EXPECT_THAT(log, HasSubstr("pass --allow_insecure"));
  auto allowed = CoordinatorProcess::Start(
      {TempDir("open_repo2"), {"--host=0.0.0.0", "--allow_insecure"}});
  ASSERT_TRUE(allowed.ok()) << allowed.status();
  std::ifstream in((*allowed)->log_path());
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_THAT(text, HasSubstr("WARNING: serving plaintext on 0.0.0.0"));
}

}  // namespace
}  // namespace pipeserve
