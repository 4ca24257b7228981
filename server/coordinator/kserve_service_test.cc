// The KServe service over a real coordinator and in-process stage servers,
// through a real gRPC server on loopback: how ModelStreamInfer requests
// wait for threads and count against their model's queue.
#include "server/coordinator/kserve_service.h"

#include <chrono>
#include <filesystem>
#include <memory>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "partitioner/graph_builder.h"
#include "server/coordinator/in_process_stages.h"
#include "server/testing/gated_backend.h"
#include "server/testing/temp_dir.h"
#include "server/testing/upload.h"

namespace pipeserve {
namespace {

using ::testing::HasSubstr;

class KServeServiceTest : public ::testing::Test {
 protected:
  void Start(CoordinatorOptions co, KServeOptions ko) {
    StageServerOptions so;
    so.backend = std::make_shared<GatedBackend>(&gate_);
    stages_ = std::make_unique<InProcessStages>(so);
    stages_->AddServer("s0:9000");
    coordinator_ = std::make_unique<Coordinator>(co, *OpenFileModelStore(TestTempDir("repo")),
                                                 MakeStaticLauncher({"s0:9000"}), stages_.get());
    coordinator_->LoadStoredModels();
    core_ = std::make_unique<KServeCore>(coordinator_.get(), nullptr,
                                         KServeCoreOptions{ko.max_timeout, ko.allow_generation_infer});
    kserve_ = std::make_unique<KServeService>(core_.get(), nullptr, ko);
    grpc::ServerBuilder b;
    int port = 0;
    b.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    b.RegisterService(kserve_.get());
    server_ = b.BuildAndStart();
    ASSERT_NE(port, 0);
    stub_ = inference::GRPCInferenceService::NewStub(
        grpc::CreateChannel(absl::StrCat("127.0.0.1:", port), grpc::InsecureChannelCredentials()));
    ASSERT_TRUE(Upload("m").ok());
  }

  // One stream thread, and every run held at the gate: the first streamed
  // request takes the thread and the rest wait behind it.
  void StartHeld(const CoordinatorOptions& co) {
    KServeOptions ko;
    ko.stream_threads = 1;
    Start(co, ko);
    gate_.Set(false);
  }

  void TearDown() override {
    gate_.Set(true);
    if (server_) server_->Shutdown(std::chrono::system_clock::now());
    server_.reset();
    kserve_.reset();
    coordinator_.reset();
    stages_.reset();
  }

  // x [B, 4] -> relu -> out, one stage.
  absl::Status Upload(const std::string& name) {
    GraphBuilder b;
    b.Input("x", {-1, 4}).Op("relu", {"x"}, "out").Output("out");
    return UploadModel(*coordinator_, name, b.Build()).status();
  }

  static inference::ModelInferRequest Request(const std::string& id) {
    inference::ModelInferRequest req;
    req.set_model_name("m");
    req.set_id(id);
    auto* x = req.add_inputs();
    x->set_name("x");
    x->set_datatype("FP32");
    x->add_shape(1);
    x->add_shape(4);
    req.add_raw_input_contents(std::string(16, '\0'));
    return req;
  }

  Gate gate_;
  std::unique_ptr<InProcessStages> stages_;
  std::unique_ptr<Coordinator> coordinator_;
  std::unique_ptr<KServeCore> core_;
  std::unique_ptr<KServeService> kserve_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<inference::GRPCInferenceService::Stub> stub_;
};

// Regression: ModelReady for an unknown model or version failed with
// NOT_FOUND, where Triton answers ready: false (tritonclient's
// is_model_ready raised instead of returning False).
TEST_F(KServeServiceTest, ModelReadyForAnUnknownModelOrVersionIsFalseNotAnError) {
  Start(CoordinatorOptions{}, KServeOptions{});
  auto ready = [&](const std::string& name, const std::string& version) {
    grpc::ClientContext ctx;
    inference::ModelReadyRequest req;
    req.set_name(name);
    req.set_version(version);
    inference::ModelReadyResponse resp;
    grpc::Status s = stub_->ModelReady(&ctx, req, &resp);
    return s.ok() ? (resp.ready() ? "ready" : "not ready") : s.error_message();
  };
  EXPECT_EQ(ready("m", ""), "ready");
  EXPECT_EQ(ready("m", "1"), "ready");
  EXPECT_EQ(ready("nope", ""), "not ready");
  EXPECT_EQ(ready("m", "7"), "not ready");
}

// Regression: ServerMetadata claimed the model_repository extension, but
// RepositoryModelLoad and RepositoryModelUnload were UNIMPLEMENTED. A load
// of a model that serves succeeds; any other load, and an unload, names
// ModelService, which uploads and unloads; a named repository is refused.
TEST_F(KServeServiceTest, RepositoryLoadAndUnloadAnswerAsTheExtensionSays) {
  Start(CoordinatorOptions{}, KServeOptions{});
  auto load = [&](const std::string& repository, const std::string& model, bool unload) {
    grpc::ClientContext ctx;
    grpc::Status s;
    if (unload) {
      inference::RepositoryModelUnloadRequest req;
      req.set_repository_name(repository);
      req.set_model_name(model);
      inference::RepositoryModelUnloadResponse resp;
      s = stub_->RepositoryModelUnload(&ctx, req, &resp);
    } else {
      inference::RepositoryModelLoadRequest req;
      req.set_repository_name(repository);
      req.set_model_name(model);
      inference::RepositoryModelLoadResponse resp;
      s = stub_->RepositoryModelLoad(&ctx, req, &resp);
    }
    return s;
  };
  EXPECT_TRUE(load("", "m", false).ok());
  grpc::Status s = load("", "nope", false);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_THAT(s.error_message(), HasSubstr("ModelService/Upload"));
  s = load("", "m", true);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_THAT(s.error_message(), HasSubstr("ModelService/Unload"));
  s = load("other", "m", false);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNIMPLEMENTED);
  EXPECT_THAT(s.error_message(), HasSubstr("repository_name \"other\""));
  grpc::ClientContext ctx;
  inference::RepositoryIndexRequest req;
  req.set_repository_name("other");
  inference::RepositoryIndexResponse resp;
  EXPECT_EQ(stub_->RepositoryIndex(&ctx, req, &resp).error_code(), grpc::StatusCode::UNIMPLEMENTED);
}

// Regression: a streamed request's default deadline started when a pool
// thread took it, not when it arrived, so one that had waited out its
// whole deadline behind a slow request still ran in full afterwards.
TEST_F(KServeServiceTest, AStreamedRequestsDeadlineRunsFromItsArrival) {
  CoordinatorOptions co;
  co.default_timeout = absl::Seconds(1);
  StartHeld(co);
  grpc::ClientContext ctx;
  auto stream = stub_->ModelStreamInfer(&ctx);
  ASSERT_TRUE(stream->Write(Request("slow")));
  ASSERT_TRUE(gate_.WaitHeld(1)) << "the pool's only thread is busy";
  ASSERT_TRUE(stream->Write(Request("queued")));
  absl::SleepFor(absl::Seconds(3));  // past the queued one's deadline, however late it was read
  gate_.Set(true);
  stream->WritesDone();
  std::map<std::string, std::string> errors;
  inference::ModelStreamInferResponse resp;
  while (stream->Read(&resp)) errors[resp.infer_response().id()] = resp.error_message();
  EXPECT_TRUE(stream->Finish().ok());
  ASSERT_TRUE(errors.count("queued"));
  EXPECT_THAT(errors["queued"], HasSubstr("DEADLINE_EXCEEDED"));
}

// Regression: requests queued for the stream pool were not counted against
// their model's queue (--max_queued_requests): a stream could park any
// number, each holding a full copy of its request, behind a busy model.
TEST_F(KServeServiceTest, StreamedRequestsCountAgainstTheModelsQueueBeforeTheyWait) {
  CoordinatorOptions co;
  co.max_queued_requests = 2;
  StartHeld(co);
  grpc::ClientContext ctx;
  // Refusals that waited for the gate would never come: the deadline ends
  // the reads, and the test fails instead of hanging.
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  auto stream = stub_->ModelStreamInfer(&ctx);
  for (int i = 0; i < 5; ++i) ASSERT_TRUE(stream->Write(Request(absl::StrCat("r", i))));
  ASSERT_TRUE(gate_.WaitHeld(1));
  // Three are refused at once, while the gate is still shut.
  std::vector<std::string> refused;
  inference::ModelStreamInferResponse resp;
  for (int i = 0; i < 3 && stream->Read(&resp); ++i) {
    EXPECT_THAT(resp.error_message(), HasSubstr("RESOURCE_EXHAUSTED"));
    EXPECT_THAT(resp.error_message(), HasSubstr("--max_queued_requests"));
    refused.push_back(resp.infer_response().id());
  }
  EXPECT_THAT(refused, ::testing::ElementsAre("r2", "r3", "r4"));
  gate_.Set(true);
  stream->WritesDone();
  int ok = 0;
  while (stream->Read(&resp)) ok += resp.error_message().empty();
  EXPECT_EQ(ok, 2) << "the two admitted ran";
  EXPECT_TRUE(stream->Finish().ok());
}

// Regression: a stream's deadline was capped at --max_timeout_s from the
// stream's opening, so on a stream open longer than that every later
// request failed at once with DEADLINE_EXCEEDED. The cap runs from each
// request's arrival.
TEST_F(KServeServiceTest, TheDeadlineCapRunsFromEachStreamedRequestsArrival) {
  KServeOptions ko;
  ko.max_timeout = absl::Seconds(2);
  Start(CoordinatorOptions(), ko);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  auto stream = stub_->ModelStreamInfer(&ctx);
  ASSERT_TRUE(stream->Write(Request("first")));
  inference::ModelStreamInferResponse resp;
  ASSERT_TRUE(stream->Read(&resp));
  EXPECT_EQ(resp.error_message(), "");
  absl::SleepFor(absl::Seconds(3));  // the stream is now open longer than the cap
  ASSERT_TRUE(stream->Write(Request("later")));
  ASSERT_TRUE(stream->Read(&resp));
  EXPECT_EQ(resp.infer_response().id(), "later");
  EXPECT_EQ(resp.error_message(), "");
  stream->WritesDone();
  EXPECT_TRUE(stream->Finish().ok());
}

}  // namespace
}  // namespace pipeserve
