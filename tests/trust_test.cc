// The trust defects of issue 7 that a client can reach, end to end: a real
// coordinator and stage server processes, driven through the client stub
// and raw KServe / ModelService stubs as a careless or hostile client
// would. Each test failed (or crashed the coordinator) before the fix.
#include <signal.h>
#include <sys/wait.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/strip.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "client/client.h"
#include "common/status_macros.h"
#include "partitioner/graph_builder.h"
#include "proto/grpc_service.grpc.pb.h"
#include "proto/pipeserve_service.grpc.pb.h"
#include "runtime/model_file.h"
#include "server/testing/temp_dir.h"
#include "tests/cluster.h"
#include "tests/http_get.h"

namespace pipeserve {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

// x [B, width] -> (mm w_i, relu) `layers` times per stage -> out.
std::string WriteMlp(const std::string& dir, int stages, int64_t width = 8, int layers = 1) {
  GraphBuilder b;
  b.Input("x", {-1, width});
  std::string h = "x";
  for (int i = 0; i < stages * layers; ++i) {
    if (i > 0 && i % layers == 0) b.Split();
    std::string w = absl::StrCat("w", i);
    b.Param(w, {width, width});
    b.Op("mm", {h, w}, absl::StrCat("m", i)).Op("relu", {absl::StrCat("m", i)}, absl::StrCat("h", i));
    h = absl::StrCat("h", i);
  }
  b.Output(h);
  Model m = b.Build();
  std::string path = absl::StrCat(dir, "/mlp", stages, "x", layers, ".psm");
  EXPECT_TRUE(WriteModelFile(path, m.graph, m.weights).ok());
  return path;
}

inference::ModelInferRequest Request(const std::string& model, std::vector<int64_t> shape,
                                     const std::string& raw) {
  inference::ModelInferRequest req;
  req.set_model_name(model);
  auto* x = req.add_inputs();
  x->set_name("x");
  x->set_datatype("FP32");
  for (int64_t d : shape) x->add_shape(d);
  req.add_raw_input_contents(raw);
  return req;
}

std::unique_ptr<inference::GRPCInferenceService::Stub> KServeStub(const std::string& address) {
  return inference::GRPCInferenceService::NewStub(
      grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
}

// A coordinator of a test's own, started with `flags`, and a client that
// has uploaded a `stages`-stage MLP to it as `model`.
struct OwnCoordinator {
  std::unique_ptr<CoordinatorProcess> process;
  std::unique_ptr<Client> client;
};

absl::StatusOr<OwnCoordinator> StartWithMlp(const std::string& name,
                                            std::vector<std::string> flags,
                                            const std::string& model, int stages,
                                            absl::Duration timeout) {
  OwnCoordinator own;
  ASSIGN_OR_RETURN(own.process,
                   CoordinatorProcess::Start({TestTempDir(name + "_repo"), std::move(flags)}));
  ASSIGN_OR_RETURN(own.client,
                   Client::Connect(own.process->address(), {.timeout = timeout}));
  RETURN_IF_ERROR(own.client->Upload(model, WriteMlp(TestTempDir(name + "_models"), stages), {})
                      .status());
  return own;
}

// A coordinator with a two-stage model for the tests that share one.
class TrustTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto c = CoordinatorProcess::Start({TestTempDir("trust_repo"), {}});
    ASSERT_TRUE(c.ok()) << c.status();
    coordinator_ = c->release();
    client_ = Client::Connect(coordinator_->address())->release();
    dir_ = new std::string(TestTempDir("trust_models"));
    auto up = client_->Upload("mlp", WriteMlp(*dir_, 2), {});
    ASSERT_TRUE(up.ok()) << up.status();
  }
  static void TearDownTestSuite() {
    delete client_;
    delete coordinator_;
    delete dir_;
  }

  static std::unique_ptr<inference::GRPCInferenceService::Stub> KServe() {
    return KServeStub(coordinator_->address());
  }

  // Writes `m` to `name`.psm in dir_ and uploads it as `name`: the upload's
  // answer, or the write's error.
  static absl::StatusOr<UploadResult> UploadBuilt(const std::string& name, const Model& m) {
    const std::string path = absl::StrCat(*dir_, "/", name, ".psm");
    RETURN_IF_ERROR(WriteModelFile(path, m.graph, m.weights));
    return client_->Upload(name, path, {});
  }

  static void ExpectStillServing() {
    auto out = client_->Infer("mlp", {{"x", Tensor::Zeros({3, 8})}});
    ASSERT_TRUE(out.ok()) << out.status();
    EXPECT_EQ((*out)[0].tensor.shape(), (Shape{3, 8}));
  }

  static CoordinatorProcess* coordinator_;
  static Client* client_;
  static std::string* dir_;
};

CoordinatorProcess* TrustTest::coordinator_ = nullptr;
Client* TrustTest::client_ = nullptr;
std::string* TrustTest::dir_ = nullptr;

// Was: std::bad_alloc on the request's thread, std::terminate, the
// coordinator gone.
TEST_F(TrustTest, StreamInferWithAShapeOfTwoToTheFiftyIsAnErrorAndTheServerLives) {
  auto stub = KServe();
  grpc::ClientContext ctx;
  auto stream = stub->ModelStreamInfer(&ctx);
  inference::ModelInferRequest req;
  req.set_model_name("mlp");
  req.set_id("huge");
  auto* x = req.add_inputs();
  x->set_name("x");
  x->set_datatype("FP32");
  x->add_shape(int64_t{1} << 50);
  ASSERT_TRUE(stream->Write(req));
  stream->WritesDone();
  inference::ModelStreamInferResponse resp;
  ASSERT_TRUE(stream->Read(&resp));
  EXPECT_THAT(resp.error_message(), HasSubstr("INVALID_ARGUMENT"));
  EXPECT_THAT(resp.error_message(), HasSubstr("input \"x\""));
  EXPECT_TRUE(stream->Finish().ok());
  ExpectStillServing();
}

// Was: UNKNOWN "Unexpected error in RPC handling" (an exception in the
// handler) for [1<<53, 32] with no bytes.
TEST_F(TrustTest, InferWithAShapeItsBytesDoNotBackIsInvalidArgument) {
  auto stub = KServe();
  for (std::vector<int64_t> shape : {std::vector<int64_t>{int64_t{1} << 53, 32},
                                     std::vector<int64_t>{int64_t{1} << 31, int64_t{1} << 31}}) {
    grpc::ClientContext ctx;
    inference::ModelInferResponse resp;
    grpc::Status s = stub->ModelInfer(&ctx, Request("mlp", shape, ""), &resp);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
    EXPECT_THAT(s.error_message(), HasSubstr("input \"x\""));
  }
  ExpectStillServing();
}

// Was: zero microbatches were sent and nothing completed the request until
// its deadline.
TEST_F(TrustTest, BatchOfZeroRowsAnswersAtOnce) {
  absl::Time start = absl::Now();
  auto out = client_->Infer("mlp", {{"x", Tensor::Zeros({0, 8})}}, absl::Seconds(30));
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ((*out)[0].tensor.shape(), (Shape{0, 8}));
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));
}

// Was: every made-up model name became a Prometheus series, forever.
TEST_F(TrustTest, MadeUpModelNamesDoNotBecomeMetricsSeries) {
  ExpectStillServing();
  for (int i = 0; i < 3; ++i) {
    client_->Infer(absl::StrCat("nonexistent_", i), {{"x", Tensor::Zeros({1, 8})}}).IgnoreError();
  }
  // And a name far longer than any model's.
  auto stub = KServe();
  grpc::ClientContext ctx;
  inference::ModelInferResponse resp;
  grpc::Status s = stub->ModelInfer(&ctx, Request(std::string(1 << 20, 'n'), {1, 8},
                                                  std::string(32, '\0')), &resp);
  EXPECT_NE(s.error_code(), grpc::StatusCode::OK);
  EXPECT_LT(s.error_message().size(), 4200u);
  std::string text = HttpGet(coordinator_->metrics_port(), "/metrics");
  ASSERT_THAT(text, HasSubstr("HTTP/1.1 200 OK"));
  EXPECT_THAT(text, HasSubstr("pipeserve_inference_requests_total{model=\"mlp\""))
      << "the model that exists keeps its own series";
  EXPECT_THAT(text, Not(HasSubstr("nonexistent_")));
  EXPECT_THAT(text, Not(HasSubstr("nnnnnnnnnnnnnnnn")));
  EXPECT_LT(text.size(), 64u << 10);
}

// Was: a weight of shape [2^53, 512] claiming 0 bytes was accepted, and a
// CPU stage server wrote out of bounds transposing it.
TEST_F(TrustTest, AWeightWhoseSizeOverflowsIsRefusedAtUpload) {
  GraphBuilder b;
  b.Input("x", {-1, 512}).Param("w", {4, 512});
  b.Op("linear", {"x", "w"}, "y").Output("y");
  Model m = b.Build();
  std::string path = *dir_ + "/overflow.psm";
  ASSERT_TRUE(WriteModelFile(path, m.graph, m.weights).ok());
  // Rewrite the header: w is [2^53, 512] of "0 bytes".
  std::ifstream in(path, std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  uint64_t header_len = 0;
  for (int i = 0; i < 8; ++i) header_len |= uint64_t{uint8_t(bytes[8 + i])} << (8 * i);
  Graph g;
  ASSERT_TRUE(g.ParseFromString(bytes.substr(16, header_len)));
  TensorInfo* w = g.mutable_params(0);
  w->set_shape(0, int64_t{1} << 53);
  w->set_byte_size(0);  // what [2^53, 512] float32 came to when sizes wrapped
  w->set_crc32(0);      // the CRC-32 of no bytes
  std::string header = g.SerializeAsString();
  std::string out = bytes.substr(0, 8);
  for (int i = 0; i < 8; ++i) out.push_back(char((header.size() >> (8 * i)) & 0xff));
  out += header;
  out.resize((out.size() + 63) / 64 * 64, '\0');
  out += bytes.substr((16 + header_len + 63) / 64 * 64);
  std::ofstream(path, std::ios::binary | std::ios::trunc) << out;
  auto up = client_->Upload("overflow", path, {});
  EXPECT_EQ(up.status().code(), absl::StatusCode::kInvalidArgument) << up.status();
  EXPECT_THAT(std::string(up.status().message()), HasSubstr("parameter \"w\""));
  ExpectStillServing();
}

// Regression: INT64 or FP32 [2^40, 0] carries no bytes and passed every
// check; split into 2^38-row microbatches, it hung the stage's kernels for
// good (later requests timed out while health said SERVING).
TEST_F(TrustTest, AnEmptyShapeSpanningHugeDimensionsIsRefusedAndTheModelServesOn) {
  GraphBuilder b;
  b.Input("x", {-1, -1}).Op("softmax", {"x"}, "p", "", {{"dim", AttrI(-1)}}).Output("p");
  ASSERT_TRUE(UploadBuilt("seq", b.Build()).ok());
  auto stub = KServe();
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
  inference::ModelInferResponse resp;
  grpc::Status s = stub->ModelInfer(&ctx, Request("seq", {int64_t{1} << 40, 0}, ""), &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
  EXPECT_THAT(s.error_message(), HasSubstr("input \"x\""));
  auto out = client_->Infer("seq", {{"x", Tensor::Zeros({2, 3})}}, absl::Seconds(10));
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_FLOAT_EQ((*out)[0].tensor.data()[0], 1.0f / 3);
  ExpectStillServing();
}

// Regression: a kernel out of memory threw std::bad_alloc, uncaught: the
// stage server died, and the coordinator replayed the request on every
// replacement until its deadline (35 deaths in 60 s in the attack). Now it
// answers RESOURCE_EXHAUSTED and the stage server lives.
TEST_F(TrustTest, ARequestTooLargeForMemoryIsResourceExhaustedAndTheStageLives) {
  GraphBuilder b;
  b.Input("x", {-1, 1}).Input("y", {1, -1});
  b.Op("mm", {"x", "y"}, "out").Output("out");
  ASSERT_TRUE(UploadBuilt("outer", b.Build()).ok());
  const pid_t stage = coordinator_->StageServerPid(0);
  ASSERT_GT(stage, 0);
  const int64_t n = int64_t{1} << 21;  // [2^21, 1] @ [1, 2^21]: 16 TiB out
  auto out = client_->Infer("outer", {{"x", Tensor::Zeros({n, 1})}, {"y", Tensor::Zeros({1, n})}},
                            absl::Seconds(30));
  EXPECT_EQ(out.status().code(), absl::StatusCode::kResourceExhausted) << out.status();
  EXPECT_THAT(std::string(out.status().message()), HasSubstr("out of memory"));
  EXPECT_EQ(coordinator_->StageServerPid(0), stage) << "the same stage server serves on";
  EXPECT_EQ(::kill(stage, 0), 0);
  auto small = client_->Infer("outer", {{"x", Tensor::Zeros({2, 1})}, {"y", Tensor::Zeros({1, 3})}});
  EXPECT_TRUE(small.ok()) << small.status();
  ExpectStillServing();
}

int StageServersOf(pid_t coordinator) {
  int n = 0;
  std::string parent = absl::StrCat("--parent_pid=", coordinator);
  for (const auto& e : std::filesystem::directory_iterator("/proc")) {
    std::ifstream cmdline(e.path() / "cmdline", std::ios::binary);
    std::string cmd((std::istreambuf_iterator<char>(cmdline)), std::istreambuf_iterator<char>());
    std::replace(cmd.begin(), cmd.end(), '\0', ' ');
    if (cmd.find("stage_server") != std::string::npos && cmd.find(parent) != std::string::npos) ++n;
  }
  return n;
}

// Was: 5000 pipe_split markers made the local launcher fork 5000 stage
// servers.
TEST_F(TrustTest, FiveThousandCutsAreRefusedWithoutStartingServers) {
  int before = StageServersOf(coordinator_->pid());
  GraphBuilder b;
  b.Input("x", {-1, 4});
  std::string h = "x";
  for (int i = 0; i < 5000; ++i) {
    if (i > 0) b.Split();
    b.Op("relu", {h}, absl::StrCat("r", i));
    h = absl::StrCat("r", i);
  }
  b.Output(h);
  auto up = UploadBuilt("cuts", b.Build());
  EXPECT_EQ(up.status().code(), absl::StatusCode::kInvalidArgument) << up.status();
  EXPECT_THAT(std::string(up.status().message()), HasSubstr("5000 stages"));
  EXPECT_EQ(StageServersOf(coordinator_->pid()), before);
  ExpectStillServing();
}

// Was: ServerReady and grpc.health said ready/SERVING whatever the models'
// state.
TEST(TrustReadinessTest, ReadinessIsFalseWhileTheOnlyModelIsDown) {
  absl::StatusOr<OwnCoordinator> own = StartWithMlp("ready", {}, "only", 2, absl::Seconds(30));
  ASSERT_TRUE(own.ok()) << own.status();
  CoordinatorProcess* c = own->process.get();
  Client* client = own->client.get();
  EXPECT_TRUE(*client->ServerReady());
  pid_t stage = c->StageServerPid(1);
  ASSERT_GT(stage, 0);
  ASSERT_EQ(::kill(stage, SIGSTOP), 0);  // stops answering, does not exit
  bool went_down = false;
  absl::Time until = absl::Now() + absl::Seconds(30);
  while (!went_down && absl::Now() < until) {
    auto ready = client->ServerReady();
    auto health = client->Health();
    went_down = ready.ok() && !*ready && health.ok() && *health == "NOT_SERVING";
    if (!went_down) absl::SleepFor(absl::Milliseconds(50));
  }
  ::kill(stage, SIGCONT);
  EXPECT_TRUE(went_down) << "readiness never reflected the model being down";
}

// The coordinator's pipeserve_uploads_in_progress gauge (-1 if absent).
int UploadsInProgress(int metrics_port) {
  for (absl::string_view line : absl::StrSplit(HttpGet(metrics_port, "/metrics"), '\n')) {
    int n;
    if (absl::ConsumePrefix(&line, "pipeserve_uploads_in_progress ") && absl::SimpleAtoi(line, &n)) {
      return n;
    }
  }
  return -1;
}

// Was: an upload could idle forever holding a thread and a file, and any
// number could run at once.
TEST(TrustUploadTest, AnIdleUploadIsCancelledAndFreesItsSlot) {
  constexpr int kIdleS = 5;
  auto c = CoordinatorProcess::Start(
      {TestTempDir("idle_repo"),
       {absl::StrCat("--upload_idle_timeout_s=", kIdleS), "--max_concurrent_uploads=1"}});
  ASSERT_TRUE(c.ok()) << c.status();
  auto stub = ModelService::NewStub(
      grpc::CreateChannel((*c)->address(), grpc::InsecureChannelCredentials()));
  auto client = *Client::Connect((*c)->address());
  std::string path = WriteMlp(TestTempDir("idle_models"), 1);
  EXPECT_EQ(UploadsInProgress((*c)->metrics_port()), 0);
  grpc::ClientContext idle_ctx;  // a watchdog that never fires fails the test, not hangs it
  idle_ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(kIdleS + 60));
  UploadResponse idle_resp;
  absl::Time idle_since = absl::Now();
  auto idle = stub->Upload(&idle_ctx, &idle_resp);
  UploadRequest first;
  first.set_name("idle");
  first.set_data("some bytes, then nothing");
  ASSERT_TRUE(idle->Write(first));
  // The write is only queued: wait until the server has read it and the
  // upload holds the only slot.
  while (UploadsInProgress((*c)->metrics_port()) != 1 &&
         absl::Now() - idle_since < absl::Seconds(30)) {
    absl::SleepFor(absl::Milliseconds(20));
  }
  ASSERT_EQ(UploadsInProgress((*c)->metrics_port()), 1) << "the idle upload never started";
  // While it idles it holds the only slot.
  absl::StatusOr<UploadResult> second = client->Upload("second", path, {});
  EXPECT_EQ(second.status().code(), absl::StatusCode::kResourceExhausted) << second.status();
  EXPECT_THAT(std::string(second.status().message()), HasSubstr("--max_concurrent_uploads"));
  // The server gives up on it, and the slot frees.
  grpc::Status s = idle->Finish();
  EXPECT_FALSE(s.ok());
  EXPECT_LT(absl::Now() - idle_since, absl::Seconds(kIdleS + 10));
  absl::Time until = absl::Now() + absl::Seconds(10);
  while (!second.ok() && absl::Now() < until) {
    second = client->Upload("second", path, {});
    if (!second.ok()) absl::SleepFor(absl::Milliseconds(50));
  }
  EXPECT_TRUE(second.ok()) << second.status();
  EXPECT_EQ(UploadsInProgress((*c)->metrics_port()), 0);
  auto models = client->ListModels();
  ASSERT_TRUE(models.ok());
  for (const ModelSummary& m : *models) EXPECT_NE(m.name(), "idle");
}

// Regression: the idle watchdog went on watching an upload after its last
// chunk, so a model whose deploy took longer than --upload_idle_timeout_s
// had its upload cancelled (CANCELLED) while the coordinator deployed it.
TEST(TrustUploadTest, ADeployLongerThanTheIdleTimeoutIsNotCancelled) {
  auto c =
      CoordinatorProcess::Start({TestTempDir("slow_deploy_repo"), {"--upload_idle_timeout_s=1"}});
  ASSERT_TRUE(c.ok()) << c.status();
  auto client = *Client::Connect((*c)->address());
  // 2 stages of 8192 x 8192 float32: 512 MiB to load, well over a second
  // (256 MiB took 1.1 s on a fast machine, too close to the timeout; a
  // stage server held stopped instead is dropped by the keepalive in 2 s).
  std::string path = WriteMlp(TestTempDir("slow_deploy_models"), 2, 8192);
  absl::Time start = absl::Now();
  absl::StatusOr<UploadResult> up = client->Upload("slow", path, {});
  const absl::Duration took = absl::Now() - start;
  ASSERT_TRUE(up.ok()) << up.status() << " after " << took;
  std::printf("512 MiB uploaded and deployed in %.1f s with a 1 s idle timeout\n",
              absl::ToDoubleSeconds(took));
  EXPECT_GT(took, absl::Seconds(1)) << "the case needs a deploy longer than the timeout";
  auto models = client->ListModels();
  ASSERT_TRUE(models.ok());
  ASSERT_EQ(models->size(), 1u);
  EXPECT_EQ((*models)[0].state(), "READY");
}

// Was: no limit on an upload's size.
TEST(TrustUploadTest, AnUploadOverTheSizeLimitIsRefusedAndStoresNothing) {
  auto c = CoordinatorProcess::Start({TestTempDir("big_repo"), {"--max_upload_mb=1"}});
  ASSERT_TRUE(c.ok()) << c.status();
  auto client = *Client::Connect((*c)->address());
  std::string path = TestTempDir("big_models") + "/big.psm";
  std::ofstream(path, std::ios::binary) << std::string(3 << 20, 'x');
  auto up = client->Upload("big", path, {});
  EXPECT_EQ(up.status().code(), absl::StatusCode::kResourceExhausted) << up.status();
  EXPECT_THAT(std::string(up.status().message()), HasSubstr("larger than this coordinator accepts"));
  EXPECT_TRUE(client->ListModels()->empty());
}

inference::ModelInferRequest MlpRequest(const std::string& id) {
  inference::ModelInferRequest req = Request("mlp", {1, 8}, std::string(32, '\0'));
  req.set_id(id);
  return req;
}

// Regression: each ModelStreamInfer stream holds a handler thread for as
// long as it stays open, and nothing bounded them: with --max_threads=8,
// eight idle streams made ServerLive and ModelInfer answer
// RESOURCE_EXHAUSTED while health said SERVING.
TEST(TrustStreamTest, IdleStreamsCannotTakeEveryHandlerThread) {
  absl::StatusOr<OwnCoordinator> own =
      StartWithMlp("streams", {"--max_threads=8"}, "mlp", 2, absl::Seconds(10));
  ASSERT_TRUE(own.ok()) << own.status();
  CoordinatorProcess* c = own->process.get();
  Client* client = own->client.get();
  auto stub = KServeStub(c->address());
  struct Open {
    grpc::ClientContext ctx;
    std::unique_ptr<grpc::ClientReaderWriter<inference::ModelInferRequest,
                                             inference::ModelStreamInferResponse>> stream;
  };
  std::vector<std::unique_ptr<Open>> streams;
  int answered = 0, refused = 0;
  for (int i = 0; i < 8; ++i) {
    auto o = std::make_unique<Open>();
    o->ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    o->stream = stub->ModelStreamInfer(&o->ctx);
    inference::ModelStreamInferResponse resp;
    if (o->stream->Write(MlpRequest(absl::StrCat(i))) && o->stream->Read(&resp)) {
      ++answered;  // open, and now idle
      streams.push_back(std::move(o));
      continue;
    }
    grpc::Status s = o->stream->Finish();
    EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << s.error_message();
    ++refused;
  }
  EXPECT_GT(answered, 0);
  EXPECT_GT(refused, 0) << "streams are bounded below the handler threads";
  auto live = client->ServerLive();
  ASSERT_TRUE(live.ok()) << live.status();
  auto out = client->Infer("mlp", {{"x", Tensor::Zeros({3, 8})}});
  EXPECT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(*client->Health(), "SERVING");
  for (auto& o : streams) o->ctx.TryCancel();
}

// A stream that sends nothing (and has nothing in flight) for
// --stream_idle_timeout_s is ended, giving its thread back.
TEST(TrustStreamTest, AnIdleStreamIsEndedAfterTheIdleTimeout) {
  absl::StatusOr<OwnCoordinator> own =
      StartWithMlp("idle_stream", {"--stream_idle_timeout_s=1"}, "mlp", 1, absl::Seconds(30));
  ASSERT_TRUE(own.ok()) << own.status();
  CoordinatorProcess* c = own->process.get();
  auto stub = KServeStub(c->address());
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  auto stream = stub->ModelStreamInfer(&ctx);
  inference::ModelStreamInferResponse resp;
  ASSERT_TRUE(stream->Write(MlpRequest("first")));
  ASSERT_TRUE(stream->Read(&resp));
  EXPECT_EQ(resp.error_message(), "");
  absl::Time idle_from = absl::Now();
  EXPECT_FALSE(stream->Read(&resp)) << "ended by the server";
  EXPECT_LT(absl::Now() - idle_from, absl::Seconds(10));
  EXPECT_GE(absl::Now() - idle_from, absl::Milliseconds(500));
  EXPECT_EQ(stream->Finish().error_code(), grpc::StatusCode::CANCELLED);
}

// Regression: failure reasons carried stage-server addresses ("stage 1 on
// 127.0.0.1:40213 failed its health check") to clients holding only the
// infer scope, in request errors and RepositoryIndex.
TEST(TrustAddressTest, InferenceClientsNeverSeeStageServerAddresses) {
  absl::StatusOr<OwnCoordinator> own =
      StartWithMlp("address", {"--default_timeout_s=2"}, "mlp", 2, absl::Seconds(30));
  ASSERT_TRUE(own.ok()) << own.status();
  CoordinatorProcess* c = own->process.get();
  Client* client = own->client.get();
  auto plan = client->GetPlan("mlp");
  ASSERT_TRUE(plan.ok()) << plan.status();
  ASSERT_EQ(plan->stage_servers_size(), 2) << "administrators see the addresses";
  pid_t stage = c->StageServerPid(1);
  ASSERT_GT(stage, 0);
  ASSERT_EQ(::kill(stage, SIGSTOP), 0);  // stops answering its health checks
  auto stub = KServeStub(c->address());
  std::vector<std::string> seen;
  absl::Time until = absl::Now() + absl::Seconds(30);
  bool down = false;
  while (!down && absl::Now() < until) {
    grpc::ClientContext ctx;
    inference::RepositoryIndexResponse index;
    ASSERT_TRUE(stub->RepositoryIndex(&ctx, {}, &index).ok());
    for (const auto& m : index.models()) {
      if (m.state() != "READY") {
        down = true;
        seen.push_back(m.reason());
      }
    }
    if (!down) absl::SleepFor(absl::Milliseconds(50));
  }
  ASSERT_TRUE(down);
  grpc::ClientContext ctx;  // no deadline: the coordinator's default (2 s) ends it
  inference::ModelInferResponse resp;
  grpc::Status s = stub->ModelInfer(&ctx, Request("mlp", {1, 8}, std::string(32, '\0')), &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << s.error_message();
  seen.push_back(s.error_message());
  ::kill(stage, SIGCONT);
  for (const std::string& message : seen) {
    EXPECT_THAT(message, HasSubstr("stage 1")) << "the reason still names the stage";
    for (const std::string& address : plan->stage_servers()) {
      EXPECT_THAT(message, Not(HasSubstr(address)));
      EXPECT_THAT(message, Not(HasSubstr(address.substr(address.rfind(':')))))
          << "not even its port";
    }
  }
}

// Regression: a stage server given SIGTERM while a kernel ran waited for
// the kernel however long it took (StageHost::Stop joined the worker);
// with [2^40, 0] it never ended. It now leaves soon after its grace period.
TEST(TrustShutdownTest, AStageServerLeavesSoonAfterItsGracePeriodWhileAKernelRuns) {
  auto stage = StageServerProcess::Start("", {"--shutdown_grace_s=1", "--threads=1"});
  ASSERT_TRUE(stage.ok()) << stage.status();
  auto c = CoordinatorProcess::Start({TestTempDir("kernel_repo"),
                                      {"--launcher=static", "--shutdown_grace_s=1",
                                       "--stage_servers=" + (*stage)->address()}});
  ASSERT_TRUE(c.ok()) << c.status();
  auto client = *Client::Connect((*c)->address(), {.timeout = absl::Seconds(120)});
  // 64 layers of 1024 x 1024 on 57344 rows in one run: about 7.7 TFLOP,
  // 28 s on one core of a fast machine; the server must not wait for it.
  UploadOptions one_run;
  one_run.set_microbatches(1);
  ASSERT_TRUE(
      client->Upload("slow", WriteMlp(TestTempDir("kernel_models"), 1, 1024, 64), one_run).ok());
  std::thread request([&] {
    client->Infer("slow", {{"x", Tensor::Zeros({57344, 1024})}}, absl::Seconds(120)).IgnoreError();
  });
  // Wait until the stage server computes.
  bool computing = false;
  for (absl::Time until = absl::Now() + absl::Seconds(30); !computing && absl::Now() < until;) {
    for (absl::string_view line : absl::StrSplit(HttpGet((*stage)->metrics_port(), "/metrics"), '\n')) {
      computing = computing || (absl::StartsWith(line, "pipeserve_stage_frames_received_total{") &&
                                absl::StrContains(line, "model=\"slow\"") &&
                                !absl::EndsWith(line, " 0"));
    }
    if (!computing) absl::SleepFor(absl::Milliseconds(50));
  }
  ASSERT_TRUE(computing);
  absl::SleepFor(absl::Milliseconds(300));  // inside the kernels
  const absl::Time term = absl::Now();
  const int status = (*stage)->Terminate(absl::Seconds(20));
  const absl::Duration took = absl::Now() - term;
  std::printf("the stage server left %.1f s after SIGTERM (grace 1 s)\n", absl::ToDoubleSeconds(took));
  ASSERT_NE(status, -1) << "killed, not left";
  EXPECT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 3) << "a shutdown cut short does not report success";
  EXPECT_LT(took, absl::Seconds(10));
  (*c)->Terminate(absl::Seconds(30));  // ends the request waiting for a repair
  request.join();
}

}  // namespace
}  // namespace pipeserve
