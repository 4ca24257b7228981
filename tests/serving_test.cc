// pipeserve as a service, end to end: a real coordinator process (local
// launcher, one stage_server process per stage), driven through the C++
// client stub over loopback ports picked at run time.
#include <signal.h>

#include <set>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "client/client.h"
#include "partitioner/graph_builder.h"
#include "proto/grpc_service.grpc.pb.h"
#include "proto/pipeserve_service.grpc.pb.h"
#include "runtime/model_file.h"
#include "server/testing/temp_dir.h"
#include "tests/cluster.h"
#include "tests/compare.h"
#include "tests/fixtures.h"
#include "tests/http_get.h"

namespace pipeserve {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

// One coordinator and the seed's models for the whole suite.
class ServingTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto dir = MakeFixtures({"example_code", "multi_mlp", "param_alias"}, 16);
    ASSERT_TRUE(dir.ok()) << dir.status();
    fixtures_ = new std::string(*dir);
    repository_ = new std::string(TestTempDir("repository"));
    auto c = CoordinatorProcess::Start({*repository_, {}});
    ASSERT_TRUE(c.ok()) << c.status();
    coordinator_ = c->release();
    auto client = Client::Connect(coordinator_->address());
    ASSERT_TRUE(client.ok());
    client_ = client->release();
    for (const char* name : {"example_code", "multi_mlp", "param_alias"}) {
      auto up = client_->Upload(name, absl::StrCat(*fixtures_, "/", name, "/model.psm"), {});
      ASSERT_TRUE(up.ok()) << name << ": " << up.status();
    }
    UploadOptions sixteen;
    sixteen.set_microbatches(16);
    auto deep = client_->Upload("deep", WriteDeepMlp(TestTempDir("deep")), sixteen);
    ASSERT_TRUE(deep.ok()) << deep.status();
  }

  static void TearDownTestSuite() {
    delete client_;
    delete coordinator_;
  }

  static Fixture Load(const std::string& name) {
    auto f = LoadFixture(*fixtures_, name);
    EXPECT_TRUE(f.ok()) << f.status();
    return f.ok() ? *std::move(f) : Fixture();
  }

  static std::vector<NamedTensor> Named(const Fixture& f) {
    std::vector<NamedTensor> in;
    for (int i = 0; i < f.model.graph.inputs_size(); ++i) {
      in.push_back({f.model.graph.inputs(i).name(), f.inputs[i]});
    }
    return in;
  }

  // A request that must work: the server keeps serving after bad ones.
  static void ExpectStillServing() {
    Fixture f = Load("multi_mlp");
    auto out = client_->Infer("multi_mlp", Named(f));
    ASSERT_TRUE(out.ok()) << out.status();
    ExpectMatchesPyTorch((*out)[0].tensor, f.expected[0], f.exact[0]);
  }

  static std::string* fixtures_;
  static std::string* repository_;
  static CoordinatorProcess* coordinator_;
  static Client* client_;
};

std::string* ServingTest::fixtures_ = nullptr;
std::string* ServingTest::repository_ = nullptr;
CoordinatorProcess* ServingTest::coordinator_ = nullptr;
Client* ServingTest::client_ = nullptr;

void ExpectStatus(const absl::Status& s, absl::StatusCode code, const std::string& text) {
  EXPECT_EQ(s.code(), code) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr(text));
}

TEST_F(ServingTest, SeedModelsHaveTheSeedsStageCountsAndFqnProperties) {
  const std::pair<const char*, int> cases[] = {
      {"example_code", 4}, {"multi_mlp", 4}, {"param_alias", 2}};
  for (auto [name, stages] : cases) {
    auto plan = client_->GetPlan(name);
    ASSERT_TRUE(plan.ok()) << plan.status();
    EXPECT_EQ(plan->plan().stages_size(), stages) << name;
    EXPECT_EQ(plan->stage_servers_size(), stages);
    EXPECT_EQ(plan->state(), "READY");
    Fixture f = Load(name);
    std::set<std::string> keys(f.model.graph.state_dict_keys().begin(),
                               f.model.graph.state_dict_keys().end());
    std::set<std::string> covered;
    for (const Stage& s : plan->plan().stages()) {
      for (const std::string& fqn : s.param_fqns()) {
        EXPECT_TRUE(keys.count(fqn)) << fqn;
        covered.insert(fqn);
      }
    }
    for (const auto& [alias, canonical] : f.model.graph.aliases()) {
      if (covered.count(canonical)) covered.insert(alias);
    }
    EXPECT_EQ(covered, keys) << name;
  }
}

TEST_F(ServingTest, SeedModelsThroughTheServiceMatchPyTorch) {
  for (const char* name : {"example_code", "multi_mlp", "param_alias"}) {
    Fixture f = Load(name);
    auto out = client_->Infer(name, Named(f));
    ASSERT_TRUE(out.ok()) << name << ": " << out.status();
    ASSERT_EQ(out->size(), 1u);
    EXPECT_EQ((*out)[0].name, f.model.graph.outputs(0));
    ExpectMatchesPyTorch((*out)[0].tensor, f.expected[0], f.exact[0]);
  }
}

TEST_F(ServingTest, ThirtyTwoConcurrentClientsAllGetCorrectAnswers) {
  Fixture f = Load("example_code");
  std::vector<NamedTensor> in = Named(f);
  std::atomic<int> good{0};
  std::vector<std::string> errors(32);
  std::vector<std::thread> clients;
  for (int c = 0; c < 32; ++c) {
    clients.emplace_back([&, c] {
      auto client = Client::Connect(coordinator_->address());
      for (int r = 0; r < 4; ++r) {
        auto out = (*client)->Infer("example_code", in);
        if (!out.ok()) {
          errors[c] = out.status().ToString();
          return;
        }
        const Tensor& t = (*out)[0].tensor;
        if (t.shape() != f.expected[0].shape() ||
            AssertCloseRatio(t.data(), f.exact[0]) >
                std::max(1.0, 2 * AssertCloseRatio(f.expected[0].data(), f.exact[0]))) {
          errors[c] = "wrong answer";
          return;
        }
        ++good;
      }
    });
  }
  for (auto& t : clients) t.join();
  for (int c = 0; c < 32; ++c) EXPECT_EQ(errors[c], "") << "client " << c;
  EXPECT_EQ(good.load(), 128);
}

TEST_F(ServingTest, Batch256WithMicrobatch16IsCorrect) {
  auto dir = MakeFixtures({"example_code"}, 256);
  ASSERT_TRUE(dir.ok());
  UploadOptions opts;
  opts.set_microbatches(16);
  auto up = client_->Upload("example_mb16", *dir + "/example_code/model.psm", opts);
  ASSERT_TRUE(up.ok()) << up.status();
  EXPECT_EQ(client_->GetPlan("example_mb16")->microbatches(), 16);
  auto f = LoadFixture(*dir, "example_code");
  ASSERT_TRUE(f.ok());
  auto out = client_->Infer("example_mb16", Named(*f));
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ((*out)[0].tensor.shape(), (Shape{256, 512}));
  ExpectMatchesPyTorch((*out)[0].tensor, f->expected[0], f->exact[0]);
}

TEST_F(ServingTest, UnknownModelIsNotFound) {
  Fixture f = Load("multi_mlp");
  ExpectStatus(client_->Infer("no_such_model", Named(f)).status(), absl::StatusCode::kNotFound,
               "model \"no_such_model\" is not known");
  ExpectStatus(client_->GetPlan("no_such_model").status(), absl::StatusCode::kNotFound,
               "not known");
  ExpectStillServing();
}

TEST_F(ServingTest, WrongInputsAreInvalidArgumentNamingTheInput) {
  Fixture f = Load("multi_mlp");
  std::vector<NamedTensor> in = Named(f);
  // Wrong name.
  auto renamed = in;
  renamed[1].name = "z";
  ExpectStatus(client_->Infer("multi_mlp", renamed).status(),
               absl::StatusCode::kInvalidArgument, "unexpected input \"z\"");
  // Wrong count.
  ExpectStatus(client_->Infer("multi_mlp", {in[0]}).status(),
               absl::StatusCode::kInvalidArgument, "missing input \"y\"");
  // Wrong shape.
  auto bad_shape = in;
  bad_shape[1].tensor = Tensor::Zeros({16, 256});
  ExpectStatus(client_->Infer("multi_mlp", bad_shape).status(),
               absl::StatusCode::kInvalidArgument,
               "input \"y\": shape [16,256] does not match [B,512]");
  ExpectStillServing();
}

// Requests the C++ client would never send, through the raw KServe stub.
TEST_F(ServingTest, WrongDatatypeAndRawSizeAreInvalidArgumentNamingTheInput) {
  auto channel = grpc::CreateChannel(coordinator_->address(), grpc::InsecureChannelCredentials());
  auto stub = inference::GRPCInferenceService::NewStub(channel);
  auto request = [](const std::string& dtype, size_t y_bytes) {
    inference::ModelInferRequest req;
    req.set_model_name("multi_mlp");
    for (const char* name : {"x", "y"}) {
      auto* in = req.add_inputs();
      in->set_name(name);
      in->set_datatype(std::string(name) == "y" ? dtype : "FP32");
      in->add_shape(2);
      in->add_shape(512);
    }
    req.add_raw_input_contents(std::string(2 * 512 * 4, '\0'));
    req.add_raw_input_contents(std::string(y_bytes, '\0'));
    return req;
  };
  {
    grpc::ClientContext ctx;
    inference::ModelInferResponse resp;
    grpc::Status s = stub->ModelInfer(&ctx, request("FP64", 2 * 512 * 4), &resp);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_THAT(s.error_message(), HasSubstr("input \"y\": datatype FP64 is not supported"));
  }
  {
    grpc::ClientContext ctx;
    inference::ModelInferResponse resp;
    grpc::Status s = stub->ModelInfer(&ctx, request("FP32", 100), &resp);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_THAT(s.error_message(),
                HasSubstr("input \"y\": raw contents hold 100 bytes, but FP32 [2,512] needs 4096"));
  }
  {
    // And a well-formed raw request works through the same stub.
    grpc::ClientContext ctx;
    inference::ModelInferResponse resp;
    grpc::Status s = stub->ModelInfer(&ctx, request("FP32", 2 * 512 * 4), &resp);
    ASSERT_TRUE(s.ok()) << s.error_message();
    ASSERT_EQ(resp.outputs_size(), 1);
    EXPECT_EQ(resp.outputs(0).datatype(), "FP32");
    EXPECT_EQ(resp.raw_output_contents(0).size(), 2u * 512 * 4);
  }
  ExpectStillServing();
}

TEST_F(ServingTest, UploadWithBadChecksumOrTruncatedStreamStoresNothing) {
  auto channel = grpc::CreateChannel(coordinator_->address(), grpc::InsecureChannelCredentials());
  auto stub = ModelService::NewStub(channel);
  {
    grpc::ClientContext ctx;
    UploadResponse resp;
    auto w = stub->Upload(&ctx, &resp);
    UploadRequest req;
    req.set_name("corrupt");
    req.set_data("not really a model");
    req.set_last(true);
    req.set_total_bytes(18);
    req.set_crc32(12345);
    w->Write(req);
    w->WritesDone();
    grpc::Status s = w->Finish();
    EXPECT_EQ(s.error_code(), grpc::StatusCode::DATA_LOSS);
    EXPECT_THAT(s.error_message(), HasSubstr("upload of \"corrupt\" is corrupt: CRC-32"));
  }
  {
    grpc::ClientContext ctx;
    UploadResponse resp;
    auto w = stub->Upload(&ctx, &resp);
    UploadRequest req;
    req.set_name("truncated");
    req.set_data("first chunk only");
    w->Write(req);
    w->WritesDone();  // no message with last = true
    grpc::Status s = w->Finish();
    EXPECT_EQ(s.error_code(), grpc::StatusCode::DATA_LOSS);
    EXPECT_THAT(s.error_message(), HasSubstr("without its last chunk; nothing was stored"));
  }
  auto models = client_->ListModels();
  ASSERT_TRUE(models.ok());
  for (const ModelSummary& m : *models) {
    EXPECT_NE(m.name(), "corrupt");
    EXPECT_NE(m.name(), "truncated");
  }
  ExpectStillServing();
}

TEST_F(ServingTest, InvalidGraphReturnsThePartitionersMessage) {
  GraphBuilder b;
  b.Input("x", {-1, 8}).Param("w", {4, 4});
  b.Op("mm", {"x", "w"}, "h").Output("h");
  Model m = b.Build();
  std::string path = TestTempDir("badgraph") + "/bad.psm";
  ASSERT_TRUE(WriteModelFile(path, m.graph, m.weights).ok());
  auto up = client_->Upload("bad_graph", path, {});
  ExpectStatus(up.status(), absl::StatusCode::kInvalidArgument,
               "node \"h\" (mm): mm inner dimensions differ: [B,8] and [4,4]");
  EXPECT_EQ(client_->GetPlan("bad_graph").status().code(), absl::StatusCode::kNotFound);
  ExpectStillServing();
}

// Sum of frames the stages dropped (deadline or cancel) for the model.
uint64_t DroppedFrames(const GetPlanResponse& plan, const std::string& token) {
  uint64_t dropped = 0;
  for (int s = 0; s < plan.stage_servers_size(); ++s) {
    auto stats = StageStats(plan, s, token);
    EXPECT_TRUE(stats.ok()) << "stage " << s << ": " << stats.status();
    if (stats.ok()) dropped += stats->frames_dropped_deadline() + stats->frames_dropped_cancelled();
  }
  return dropped;
}

TEST_F(ServingTest, ExpiredDeadlineIsDeadlineExceededAndStagesDropTheWork) {
  auto plan = client_->GetPlan("deep");
  ASSERT_TRUE(plan.ok());
  std::vector<NamedTensor> in = {{"x", Tensor::Zeros({1024, 512})}};
  ASSERT_TRUE(client_->Infer("deep", in).ok());  // warm
  absl::Time start = absl::Now();
  ASSERT_TRUE(client_->Infer("deep", in).ok());
  absl::Duration whole = absl::Now() - start;
  uint64_t dropped_before = DroppedFrames(*plan, coordinator_->cluster_token());
  // Four times the rows in the time 1024 took here now (these machines
  // vary, and one timing may be slow or fast by 2x): the request reaches
  // the stages but cannot finish.
  std::vector<NamedTensor> four = {{"x", Tensor::Zeros({4096, 512})}};
  auto out = client_->Infer("deep", four, std::max(whole, absl::Milliseconds(20)));
  EXPECT_EQ(out.status().code(), absl::StatusCode::kDeadlineExceeded) << out.status();
  // The stages saw the deadline (or the cancel that followed) and dropped
  // frames instead of computing them.
  uint64_t dropped = dropped_before;
  absl::Time until = absl::Now() + absl::Seconds(20);
  while (dropped == dropped_before && absl::Now() < until) {
    dropped = DroppedFrames(*plan, coordinator_->cluster_token());
  }
  EXPECT_GT(dropped, dropped_before) << "request took " << whole;
  ExpectStillServing();
}

TEST_F(ServingTest, ClientCancellationReachesTheStages) {
  auto plan = client_->GetPlan("deep");
  ASSERT_TRUE(plan.ok());
  auto stage0 = StageStats(*plan, 0, coordinator_->cluster_token());
  ASSERT_TRUE(stage0.ok()) << stage0.status();
  uint64_t dropped_before = DroppedFrames(*plan, coordinator_->cluster_token());
  auto channel = grpc::CreateChannel(coordinator_->address(), grpc::InsecureChannelCredentials());
  auto stub = inference::GRPCInferenceService::NewStub(channel);
  inference::ModelInferRequest req;
  req.set_model_name("deep");
  auto* x = req.add_inputs();
  x->set_name("x");
  x->set_datatype("FP32");
  // 4096 rows: each stage spends tens of ms on each of the 16 microbatches,
  // so the cancel lands long before the stages could drain the request
  // (with 1024 rows, fast stages sometimes finished first under load).
  x->add_shape(4096);
  x->add_shape(512);
  req.add_raw_input_contents(std::string(4096 * 512 * 4, '\0'));
  grpc::ClientContext ctx;
  inference::ModelInferResponse resp;
  grpc::Status status;
  absl::Notification finished;
  std::thread call([&] {
    status = stub->ModelInfer(&ctx, req, &resp);
    finished.Notify();
  });
  // Cancel once stage 0 has computed a microbatch of it (15 wait).
  absl::Time until = absl::Now() + absl::Seconds(20);
  while (absl::Now() < until && !finished.HasBeenNotified()) {
    auto stats = StageStats(*plan, 0, coordinator_->cluster_token());
    if (stats.ok() && stats->frames_processed() > stage0->frames_processed()) break;
  }
  ctx.TryCancel();
  call.join();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::CANCELLED) << status.error_message();
  uint64_t dropped = dropped_before;
  until = absl::Now() + absl::Seconds(20);
  while (dropped == dropped_before && absl::Now() < until) {
    dropped = DroppedFrames(*plan, coordinator_->cluster_token());
  }
  EXPECT_GT(dropped, dropped_before) << "no stage dropped the cancelled request's frames";
  ExpectStillServing();
}

TEST_F(ServingTest, PrometheusMetricsCountRequestsByModelAndCode) {
  Fixture f = Load("multi_mlp");
  ASSERT_TRUE(client_->Infer("multi_mlp", Named(f)).ok());
  client_->Infer("metrics_unknown", Named(f)).IgnoreError();
  std::string text = HttpGet(coordinator_->metrics_port(), "/metrics");
  EXPECT_THAT(text, HasSubstr("HTTP/1.1 200 OK"));
  EXPECT_THAT(text, HasSubstr("pipeserve_inference_requests_total{model=\"multi_mlp\",code=\"OK\"} "));
  // A name that is no model's shares one series (regression: each made-up
  // name became a series of its own, forever).
  EXPECT_THAT(text, HasSubstr(
      "pipeserve_inference_requests_total{model=\"(unknown)\",code=\"NOT_FOUND\"} "));
  EXPECT_THAT(text, Not(HasSubstr("metrics_unknown")));
  EXPECT_THAT(text, HasSubstr("pipeserve_model_ready{model=\"multi_mlp\"} 1\n"));
  EXPECT_THAT(text, HasSubstr("pipeserve_model_stages{model=\"example_code\"} 4\n"));
}

TEST_F(ServingTest, KServeMetadataReadinessAndRepositoryIndex) {
  auto meta = client_->ModelMetadata("multi_mlp");
  ASSERT_TRUE(meta.ok()) << meta.status();
  EXPECT_EQ(meta->platform(), "pipeserve");
  ASSERT_EQ(meta->inputs_size(), 2);
  EXPECT_EQ(meta->inputs(0).name(), "x");
  EXPECT_EQ(meta->inputs(0).datatype(), "FP32");
  EXPECT_EQ(meta->inputs(0).shape(0), -1);
  EXPECT_TRUE(*client_->ServerLive());
  EXPECT_TRUE(*client_->ServerReady());
  EXPECT_TRUE(*client_->ModelReady("multi_mlp"));
  auto channel = grpc::CreateChannel(coordinator_->address(), grpc::InsecureChannelCredentials());
  auto stub = inference::GRPCInferenceService::NewStub(channel);
  grpc::ClientContext ctx;
  inference::RepositoryIndexRequest req;
  inference::RepositoryIndexResponse resp;
  ASSERT_TRUE(stub->RepositoryIndex(&ctx, req, &resp).ok());
  std::set<std::string> names;
  for (const auto& m : resp.models()) {
    names.insert(m.name());
    EXPECT_EQ(m.state(), "READY") << m.name();
  }
  EXPECT_TRUE(names.count("example_code") && names.count("param_alias"));
}

// Each upload of a name is its next version: metadata, the repository
// index and responses say which; a request naming another is NOT_FOUND.
TEST_F(ServingTest, ReuploadsAreNumberedVersionsThatRequestsMayName) {
  Fixture f = Load("multi_mlp");
  const std::string path = absl::StrCat(*fixtures_, "/multi_mlp/model.psm");
  ASSERT_TRUE(client_->Upload("versioned", path, {}).ok());
  ASSERT_TRUE(client_->Upload("versioned", path, {}).ok());
  auto meta = client_->ModelMetadata("versioned");
  ASSERT_TRUE(meta.ok()) << meta.status();
  ASSERT_EQ(meta->versions_size(), 1);
  EXPECT_EQ(meta->versions(0), "2");
  auto stub = inference::GRPCInferenceService::NewStub(
      grpc::CreateChannel(coordinator_->address(), grpc::InsecureChannelCredentials()));
  auto request = [&](const std::string& version) {
    inference::ModelInferRequest req;
    req.set_model_name("versioned");
    req.set_model_version(version);
    for (int i = 0; i < 2; ++i) {
      auto* in = req.add_inputs();
      in->set_name(f.model.graph.inputs(i).name());
      in->set_datatype("FP32");
      for (int64_t d : f.inputs[i].shape()) in->add_shape(d);
      req.add_raw_input_contents(std::string(reinterpret_cast<const char*>(f.inputs[i].data()),
                                             f.inputs[i].byte_size()));
    }
    return req;
  };
  for (const char* version : {"", "2"}) {
    grpc::ClientContext ctx;
    inference::ModelInferResponse resp;
    grpc::Status s = stub->ModelInfer(&ctx, request(version), &resp);
    ASSERT_TRUE(s.ok()) << version << ": " << s.error_message();
    EXPECT_EQ(resp.model_version(), "2");
  }
  grpc::ClientContext ctx;
  inference::ModelInferResponse resp;
  grpc::Status old = stub->ModelInfer(&ctx, request("1"), &resp);
  EXPECT_EQ(old.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_THAT(old.error_message(), HasSubstr("serves version 2"));
  grpc::ClientContext index_ctx;
  inference::RepositoryIndexResponse index;
  ASSERT_TRUE(stub->RepositoryIndex(&index_ctx, {}, &index).ok());
  for (const auto& m : index.models()) {
    if (m.name() == "versioned") {
      EXPECT_EQ(m.version(), "2");
    }
  }
  ASSERT_TRUE(client_->Unload("versioned").ok());
}

TEST_F(ServingTest, StreamInferAnswersEveryRequestOnTheStream) {
  Fixture f = Load("multi_mlp");
  auto channel = grpc::CreateChannel(coordinator_->address(), grpc::InsecureChannelCredentials());
  auto stub = inference::GRPCInferenceService::NewStub(channel);
  grpc::ClientContext ctx;
  auto stream = stub->ModelStreamInfer(&ctx);
  for (int r = 0; r < 8; ++r) {
    inference::ModelInferRequest req;
    req.set_model_name(r == 7 ? "missing" : "multi_mlp");
    req.set_id(absl::StrCat("req", r));
    for (int i = 0; i < 2; ++i) {
      auto* in = req.add_inputs();
      in->set_name(f.model.graph.inputs(i).name());
      in->set_datatype("FP32");
      for (int64_t d : f.inputs[i].shape()) in->add_shape(d);
      req.add_raw_input_contents(reinterpret_cast<const char*>(f.inputs[i].data()),
                                 f.inputs[i].byte_size());
    }
    ASSERT_TRUE(stream->Write(req));
  }
  stream->WritesDone();
  inference::ModelStreamInferResponse resp;
  std::set<std::string> ok_ids;
  int errors = 0;
  while (stream->Read(&resp)) {
    if (resp.error_message().empty()) {
      ok_ids.insert(resp.infer_response().id());
      const std::string& raw = resp.infer_response().raw_output_contents(0);
      Tensor t = Tensor::Empty(f.expected[0].shape());
      ASSERT_EQ(raw.size(), size_t(t.byte_size()));
      std::memcpy(t.data(), raw.data(), raw.size());
      ExpectMatchesPyTorch(t, f.expected[0], f.exact[0]);
    } else {
      ++errors;
      EXPECT_THAT(resp.error_message(), HasSubstr("model \"missing\" is not known"));
    }
  }
  EXPECT_TRUE(stream->Finish().ok());
  EXPECT_EQ(ok_ids.size(), 7u);
  EXPECT_EQ(errors, 1);
}

TEST(ServingRestartTest, CoordinatorRestartKeepsUploadedModels) {
  auto dir = MakeFixtures({"multi_mlp"}, 8);
  ASSERT_TRUE(dir.ok());
  std::string repo = TestTempDir("restart_repo");
  auto f = LoadFixture(*dir, "multi_mlp");
  ASSERT_TRUE(f.ok());
  {
    auto c = CoordinatorProcess::Start({repo, {}});
    ASSERT_TRUE(c.ok()) << c.status();
    auto client = Client::Connect((*c)->address());
    ASSERT_TRUE((*client)->Upload("kept", *dir + "/multi_mlp/model.psm", {}).ok());
  }  // coordinator and its stage servers stop
  auto c = CoordinatorProcess::Start({repo, {}});
  ASSERT_TRUE(c.ok()) << c.status();
  auto client = Client::Connect((*c)->address());
  // The model is redeployed in the background after the restart.
  absl::Time until = absl::Now() + absl::Seconds(60);
  while (absl::Now() < until) {
    auto ready = (*client)->ModelReady("kept");
    if (ready.ok() && *ready) break;
    absl::SleepFor(absl::Milliseconds(50));
  }
  std::vector<NamedTensor> in = {{"x", f->inputs[0]}, {"y", f->inputs[1]}};
  auto out = (*client)->Infer("kept", in);
  ASSERT_TRUE(out.ok()) << out.status();
  ExpectMatchesPyTorch((*out)[0].tensor, f->expected[0], f->exact[0]);
}

TEST(ServingRecoveryTest, AStageServerThatDiesIsReplacedAndTheModelServesAgain) {
  auto dir = MakeFixtures({"multi_mlp"}, 8);
  ASSERT_TRUE(dir.ok());
  auto f = LoadFixture(*dir, "multi_mlp");
  auto c = CoordinatorProcess::Start({TestTempDir("recovery_repo"), {}});
  ASSERT_TRUE(c.ok()) << c.status();
  auto client = Client::Connect((*c)->address());
  ASSERT_TRUE((*client)->Upload("m", *dir + "/multi_mlp/model.psm", {}).ok());
  std::vector<NamedTensor> in = {{"x", f->inputs[0]}, {"y", f->inputs[1]}};
  ASSERT_TRUE((*client)->Infer("m", in).ok());
  std::string before = (*client)->GetPlan("m")->stage_servers(1);

  pid_t victim = (*c)->StageServerPid(1);
  ASSERT_GT(victim, 0);
  ASSERT_EQ(::kill(victim, SIGKILL), 0);

  // The coordinator notices (health checks), redeploys onto a new server,
  // and the model answers correctly again.
  absl::Time until = absl::Now() + absl::Seconds(60);
  absl::StatusOr<std::vector<NamedTensor>> out;
  std::string after = before;
  while (absl::Now() < until) {
    auto plan = (*client)->GetPlan("m");
    if (plan.ok() && plan->state() == "READY" && plan->stage_servers(1) != before) {
      after = plan->stage_servers(1);
      out = (*client)->Infer("m", in);
      if (out.ok()) break;
    }
    absl::SleepFor(absl::Milliseconds(50));
  }
  EXPECT_NE(after, before) << "stage 1 was not moved to a new server";
  ASSERT_TRUE(out.ok()) << out.status();
  ExpectMatchesPyTorch((*out)[0].tensor, f->expected[0], f->exact[0]);
}

TEST(ServingLimitsTest, OversizedRequestIsResourceExhaustedAndTheServerKeepsServing) {
  auto dir = MakeFixtures({"multi_mlp"}, 8);
  ASSERT_TRUE(dir.ok());
  auto c = CoordinatorProcess::Start({TestTempDir("limits_repo"), {"--max_message_mb=2"}});
  ASSERT_TRUE(c.ok()) << c.status();
  auto client = Client::Connect((*c)->address());
  ASSERT_TRUE((*client)->Upload("m", *dir + "/multi_mlp/model.psm", {}).ok());
  std::vector<NamedTensor> big = {{"x", Tensor::Zeros({2048, 512})},
                                  {"y", Tensor::Zeros({2048, 512})}};  // 8 MiB
  auto out = (*client)->Infer("m", big);
  EXPECT_EQ(out.status().code(), absl::StatusCode::kResourceExhausted) << out.status();
  auto f = LoadFixture(*dir, "multi_mlp");
  auto ok = (*client)->Infer("m", {{"x", f->inputs[0]}, {"y", f->inputs[1]}});
  ASSERT_TRUE(ok.ok()) << ok.status();
  ExpectMatchesPyTorch((*ok)[0].tensor, f->expected[0], f->exact[0]);
}

}  // namespace
}  // namespace pipeserve
