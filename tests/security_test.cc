// Authenticated links, end to end: a coordinator serving TLS with bearer
// tokens, its stage servers on mutual TLS with a cluster CA, certificates
// from tools/make_dev_certs.sh; and the rule that plaintext stays on
// loopback unless asked otherwise.
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include <chrono>
#include <cstdio>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/credentials.h"
#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "client/client.h"
#include "partitioner/graph_builder.h"
#include "proto/grpc_service.grpc.pb.h"
#include "proto/pipeserve_service.grpc.pb.h"
#include "runtime/model_file.h"
#include "server/testing/proc_status.h"
#include "server/testing/temp_dir.h"
#include "tests/cluster.h"
#include "tests/fixtures.h"

namespace pipeserve {
namespace {

using ::testing::HasSubstr;

// Runs tools/make_dev_certs.sh into a new folder.
std::string MakeCerts(const std::string& name) {
  std::string dir = TestTempDir(name);
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
    flags.repository = TestTempDir("secure_repo");
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
    std::string path = TestTempDir("secure_model") + "/m.psm";
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

// A StageService stub presenting `role`'s certificate from `certs`.
std::unique_ptr<StageService::Stub> StageStub(const std::string& address, const std::string& certs,
                                              const std::string& role) {
  auto creds = MakeChannelCredentials(
      {certs + "/" + role + ".crt", certs + "/" + role + ".key", certs + "/ca.crt"});
  EXPECT_TRUE(creds.ok()) << creds.status();
  return StageService::NewStub(grpc::CreateChannel(address, *creds));
}

std::unique_ptr<grpc::ClientContext> Context() {
  auto ctx = std::make_unique<grpc::ClientContext>();
  ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  return ctx;
}

// Regression: stage servers checked that a peer's certificate was signed by
// the cluster CA, never whose it was. Every stage pod holds one, so any
// of them could load, unload and list stages and take results on every
// other stage server. Control calls and results now take the coordinator's
// certificate only; frames the coordinator's or a stage server's.
TEST_F(SecurityTest, AStageServersCertificateCannotControlAnotherStageServer) {
  auto server = StageServerProcess::Start(
      "", {"--cluster_ca=" + *certs_ + "/ca.crt", "--cluster_cert=" + *certs_ + "/stage.crt",
           "--cluster_key=" + *certs_ + "/stage.key"});
  ASSERT_TRUE(server.ok()) << server.status();
  const std::string address = (*server)->address();
  auto stage = StageStub(address, *certs_, "stage");
  auto denied = [](const grpc::Status& s, const std::string& what) {
    EXPECT_EQ(s.error_code(), grpc::StatusCode::PERMISSION_DENIED) << what << ": " << s.error_message();
    EXPECT_THAT(s.error_message(), HasSubstr("pipeserve coordinator")) << what;
  };
  {
    ListStagesResponse resp;
    denied(stage->ListStages(Context().get(), {}, &resp), "ListStages");
  }
  {
    UnloadStageRequest req;
    UnloadStageResponse resp;
    denied(stage->UnloadStage(Context().get(), req, &resp), "UnloadStage");
  }
  {
    StageStatsRequest req;
    StageStatsResponse resp;
    denied(stage->GetStageStats(Context().get(), req, &resp), "GetStageStats");
  }
  {
    auto ctx = Context();
    LoadStageResponse resp;
    auto writer = stage->LoadStage(ctx.get(), &resp);
    LoadStageRequest req;
    req.mutable_spec()->mutable_key()->set_model("intruder");
    writer->Write(req);
    writer->WritesDone();
    denied(writer->Finish(), "LoadStage");
  }
  {
    auto ctx = Context();
    auto reader = stage->Results(ctx.get(), ResultsRequest());
    FrameHeader h;
    while (reader->Read(&h)) {
    }
    denied(reader->Finish(), "Results");
  }
  {
    // Frames: a stage server may send them (this stage is not loaded).
    auto ctx = Context();
    ctx->AddMetadata("pipeserve-model", "m");
    ctx->AddMetadata("pipeserve-deployment", "1");
    ctx->AddMetadata("pipeserve-stage", "1");
    auto stream = stage->Process(ctx.get());
    stream->WritesDone();
    FrameHeader h;
    while (stream->Read(&h)) {
    }
    grpc::Status s = stream->Finish();
    EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << s.error_message();
  }
  ListStagesResponse listed;
  grpc::Status s = StageStub(address, *certs_, "coordinator")->ListStages(Context().get(), {}, &listed);
  EXPECT_TRUE(s.ok()) << "the coordinator's certificate may: " << s.error_message();
}

// Regression: tokens were checked inside the handlers, after gRPC had read
// a call's whole message (up to --max_message_mb): six tokenless calls of
// 200 MB raised the coordinator from 20 MB to 2.67 GB. Calls are now
// checked on their headers, and refused before the body is read.
TEST(AuthBeforeBodyTest, TokenlessCallsCostTheCoordinatorTheirHeadersNotTheirBodies) {
  const std::string certs = MakeCerts("gate_certs");
  auto c = CoordinatorProcess::Start(
      {TestTempDir("gate_repo"), {"--auth_tokens=" + certs + "/tokens"}});
  ASSERT_TRUE(c.ok()) << c.status();
  const int64_t before = ProcStatus((*c)->pid(), "VmHWM");
  inference::ModelInferRequest req;
  req.set_model_name("m");
  auto* x = req.add_inputs();
  x->set_name("x");
  x->set_datatype("FP32");
  x->add_shape(25 << 20);
  req.add_raw_input_contents(std::string(100 << 20, '\0'));
  grpc::ChannelArguments args;
  args.SetMaxSendMessageSize(-1);
  auto stub = inference::GRPCInferenceService::NewStub(
      grpc::CreateCustomChannel((*c)->address(), grpc::InsecureChannelCredentials(), args));
  std::vector<std::thread> calls;
  for (int i = 0; i < 4; ++i) {
    calls.emplace_back([&] {
      inference::ModelInferResponse resp;
      grpc::Status s = stub->ModelInfer(Context().get(), req, &resp);
      EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAUTHENTICATED) << s.error_message();
    });
  }
  for (auto& t : calls) t.join();
  const int64_t grew = ProcStatus((*c)->pid(), "VmHWM") - before;
  std::printf("4 tokenless calls of 100 MiB: the coordinator's peak memory grew %lld KiB\n",
              static_cast<long long>(grew));
  EXPECT_LT(grew, 64 << 10) << "the bodies were read";
}

TEST(ListenTest, PlaintextOnANonLoopbackAddressNeedsTheFlag) {
  auto refused = CoordinatorProcess::Start({TestTempDir("open_repo"), {"--host=0.0.0.0"}});
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
      {TestTempDir("open_repo2"), {"--host=0.0.0.0", "--allow_insecure"}});
  ASSERT_TRUE(allowed.ok()) << allowed.status();
  std::ifstream in((*allowed)->log_path());
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_THAT(text, HasSubstr("WARNING: serving plaintext on 0.0.0.0"));
}

}  // namespace
}  // namespace pipeserve
