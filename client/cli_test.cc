#include "client/cli.h"

#include <cstdlib>
#include <fstream>
#include <sstream>

#include "client/fake_server.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "partitioner/graph_builder.h"
#include "partitioner/partition.h"
#include "runtime/npy.h"

namespace pipeserve {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

struct Result {
  int code;
  std::string out, err;
};

Result RunPipeserve(std::vector<std::string> args) {
  std::ostringstream out, err;
  int code = RunCli(args, out, err);
  return {code, out.str(), err.str()};
}

std::string Tmp(const std::string& name) {
  const char* d = std::getenv("TEST_TMPDIR");
  return std::string(d ? d : "/tmp") + "/" + name;
}

std::string WriteSmallModel() {
  GraphBuilder b;
  b.Input("x", {-1, 4}).Input("y", {-1, 4}).Param("w", {4, 4});
  b.Op("mm", {"x", "w"}, "a")
      .Split()
      .Op("sub", {"a", "y"}, "out")
      .Output("out");
  Model m = b.Build();
  std::string path = Tmp("small.psm");
  EXPECT_TRUE(WriteModelFile(path, m.graph, m.weights).ok());
  return path;
}

TEST(CliTest, EverySubcommandHasHelp) {
  for (const char* cmd : {"plan", "run-local"}) {
    Result r = RunPipeserve({cmd, "--help"});
    EXPECT_EQ(r.code, 0) << cmd;
    EXPECT_THAT(r.out, HasSubstr(std::string("usage: pipeserve ") + cmd));
    EXPECT_THAT(r.out, HasSubstr("--model PATH"));
  }
  for (const char* cmd : {"upload", "models", "infer", "health", "plan"}) {
    Result r = RunPipeserve({cmd, "--help"});
    EXPECT_EQ(r.code, 0) << cmd;
    EXPECT_THAT(r.out, HasSubstr(std::string("usage: pipeserve ") + cmd));
    EXPECT_THAT(r.out, HasSubstr("--server HOST:PORT"));
    EXPECT_THAT(r.out, HasSubstr("(default localhost:8001)"));
  }
}

TEST(CliTest, UsageListsEveryCommand) {
  Result r = RunPipeserve({"--help"});
  EXPECT_EQ(r.code, 0);
  for (const char* cmd :
       {"plan", "run-local", "upload", "models", "infer", "health"}) {
    EXPECT_THAT(r.out, HasSubstr(std::string("  ") + cmd + " ")) << cmd;
  }
}

TEST(CliTest, UnknownCommandAndFlagAreUsageErrors) {
  Result r = RunPipeserve({"frobnicate"});
  EXPECT_EQ(r.code, 2);
  EXPECT_THAT(r.err, HasSubstr("unknown command \"frobnicate\""));
  r = RunPipeserve({"plan", "--modle", "x"});
  EXPECT_EQ(r.code, 2);
  EXPECT_THAT(r.err, HasSubstr("unknown flag --modle"));
  r = RunPipeserve({"plan"});
  EXPECT_EQ(r.code, 2);
  EXPECT_THAT(r.err, HasSubstr("missing required flag --model"));
}

TEST(CliTest, PlanPrintsStages) {
  Result r = RunPipeserve({"plan", "--model", WriteSmallModel()});
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("2 stages"));
  EXPECT_THAT(r.out,
              HasSubstr("inputs   a [B,4] <- stage 0, y [B,4] <- model input"));
}

TEST(CliTest, PlanCutsAutomaticallyByEstimateOrByTimesMeasuredHere) {
  GraphBuilder b;
  b.Input("x", {-1, 64}).Param("w0", {64, 64}).Param("w1", {64, 64});
  b.Op("mm", {"x", "w0"}, "a").Op("relu", {"a"}, "r").Op("mm", {"r", "w1"}, "out");
  b.Output("out");
  Model m = b.Build();
  const std::string path = Tmp("uncut.psm");
  ASSERT_TRUE(WriteModelFile(path, m.graph, m.weights).ok());
  Result r = RunPipeserve({"plan", "--model", path, "--num_stages", "2"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("cut by   estimated cost (FLOPs + parameter bytes)\n"));
  EXPECT_THAT(r.out, Not(HasSubstr("predicted")));
  r = RunPipeserve({"plan", "--model", path, "--num_stages", "2", "--balance", "measured",
                    "--link_gb_per_s", "4"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("cut by   measured on cpu at 64 rows joined, per 16-row "
                               "microbatch (3 nodes run); link 4 GB/s\n"));
  EXPECT_THAT(r.out, HasSubstr("  time     predicted "));
  r = RunPipeserve({"plan", "--model", path, "--num_stages", "2", "--balance", "measured",
                    "--max_batch_rows", "-1"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("cut by   measured on cpu at 16 rows (3 nodes run); link 1 GB/s\n"));
  r = RunPipeserve({"plan", "--model", path, "--num_stages", "2", "--balance", "guessed"});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.err, HasSubstr("--balance must be measured or estimated, got \"guessed\""));
}

TEST(CliTest, PlanOfMissingFileNamesIt) {
  Result r = RunPipeserve({"plan", "--model", Tmp("nope.psm")});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.err, HasSubstr("cannot open model file"));
}

TEST(CliTest, RunLocalWritesOutputs) {
  std::string model = WriteSmallModel();
  Tensor x = Tensor::FromVector({2, 4}, {1, 2, 3, 4, 5, 6, 7, 8});
  Tensor y = Tensor::FromVector({2, 4}, {1, 1, 1, 1, 2, 2, 2, 2});
  ASSERT_TRUE(WriteNpy(Tmp("x.npy"), x).ok());
  ASSERT_TRUE(WriteNpy(Tmp("y.npy"), y).ok());
  Result r = RunPipeserve(
      {"run-local", "--model", model, "--input", "y=" + Tmp("y.npy"), "--input",
       Tmp("x.npy"), "--chunks", "2", "--output_dir",
       std::getenv("TEST_TMPDIR") ? std::getenv("TEST_TMPDIR") : "/tmp"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("output 0 (out): [2,4]"));
  auto out = ReadNpy(Tmp("out_0.npy"));
  ASSERT_TRUE(out.ok());
  EXPECT_EQ(out->shape(), (Shape{2, 4}));
}

TEST(CliTest, RunLocalRejectsWrongInputShapeNamingTheInput) {
  std::string model = WriteSmallModel();
  ASSERT_TRUE(WriteNpy(Tmp("bad.npy"), Tensor::Zeros({2, 5})).ok());
  ASSERT_TRUE(WriteNpy(Tmp("y2.npy"), Tensor::Zeros({2, 4})).ok());
  Result r =
      RunPipeserve({"run-local", "--model", model, "--input",
                    "x=" + Tmp("bad.npy"), "--input", "y=" + Tmp("y2.npy")});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.err,
              HasSubstr("input \"x\": shape [2,5] does not match [B,4]"));
}

TEST(CliTest, PlanTakesEitherAFileOrADeployedModel) {
  Result r = RunPipeserve({"plan", "--model", "m.psm", "--name", "m"});
  EXPECT_EQ(r.code, 2);
  EXPECT_THAT(r.err, HasSubstr("not both"));
  r = RunPipeserve({"plan", "--server", "localhost:1"});
  EXPECT_EQ(r.code, 2);
  EXPECT_THAT(r.err, HasSubstr("--server needs --name"));
  r = RunPipeserve({"plan", "--name", "m", "--num_stages", "2"});
  EXPECT_EQ(r.code, 2);
  EXPECT_THAT(r.err, HasSubstr("apply to a local --model"));
}

// Remote subcommands against an in-process fake coordinator.
class CliRemoteTest : public ::testing::Test {
 protected:
  void SetUp() override { server_ = FakeServer::Start(); }
  Result Run(std::vector<std::string> args) {
    args.insert(args.begin() + 1, {"--server", server_->address()});
    return RunPipeserve(args);
  }
  std::unique_ptr<FakeServer> server_;
};

TEST_F(CliRemoteTest, GeneratePrintsTokensAsTheyComeThenTheRates) {
  Result r = Run({"generate", "--name", "count", "--prompt", "4, 9", "--max_tokens", "3",
                  "--temperature", "0.5", "--top_k", "7", "--top_p", "0.9", "--seed", "11",
                  "--stop_token_ids", "1,2"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("10 11 12\n3 tokens (length), time to first token "));
  EXPECT_THAT(r.out, HasSubstr(" tokens/s after it\n"));
  GenerateRequest req = server_->last_generate_request();
  EXPECT_EQ(std::vector<int64_t>(req.prompt().begin(), req.prompt().end()),
            std::vector<int64_t>({4, 9}));
  EXPECT_EQ(req.temperature(), 0.5);
  EXPECT_EQ(req.top_k(), 7);
  EXPECT_EQ(req.top_p(), 0.9);
  EXPECT_TRUE(req.has_seed());
  EXPECT_EQ(req.seed(), 11u);
  EXPECT_EQ(req.stop_token_ids_size(), 2);
  r = Run({"generate", "--name", "count", "--prompt", "4,x"});
  EXPECT_NE(r.code, 0);
  EXPECT_THAT(r.err, HasSubstr("--prompt: \"x\" is not a token id"));
  r = Run({"generate", "--name", "nope", "--prompt", "1"});
  EXPECT_THAT(r.err, HasSubstr("model \"nope\" is not known"));
}

TEST_F(CliRemoteTest, UploadShowsProgressAndTheResult) {
  std::string model = WriteSmallModel();
  Result r = Run({"upload", "--name", "small", "--model", model, "--num_stages",
                  "2", "--microbatches", "8", "--replicas", "3", "--split",
                  "lin:END", "--max_batch_rows", "16", "--max_queue_delay_us",
                  "500", "--balance", "measured", "--link_gb_per_s", "2.5"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.err, HasSubstr("\r[##############################] "));
  EXPECT_THAT(r.err, HasSubstr(" MiB/s\n"));
  EXPECT_THAT(r.out, HasSubstr("uploaded model \"small\": "));
  EXPECT_THAT(r.out, HasSubstr(" bytes ("));
  EXPECT_THAT(r.out, HasSubstr("), 2 stages"));
  std::vector<FakeServer::Upload> ups = server_->uploads();
  ASSERT_EQ(ups.size(), 1);
  EXPECT_EQ(ups[0].options.num_stages(), 2);
  EXPECT_EQ(ups[0].options.microbatches(), 8);
  EXPECT_EQ(ups[0].options.replicas(), 3);
  EXPECT_EQ(ups[0].options.max_batch_rows(), 16);
  EXPECT_EQ(ups[0].options.max_queue_delay_us(), 500);
  EXPECT_EQ(ups[0].options.balance(), UploadOptions::BALANCE_MEASURED);
  EXPECT_EQ(ups[0].options.link_gb_per_s(), 2.5);
  ASSERT_EQ(ups[0].options.split_spec_size(), 1);
  EXPECT_EQ(ups[0].options.split_spec(0).module(), "lin");
  EXPECT_EQ(ups[0].options.split_spec(0).point(), END);
}

TEST_F(CliRemoteTest, UploadChecksBalanceAndLinkFlags) {
  std::string model = WriteSmallModel();
  Result r = Run({"upload", "--name", "small", "--model", model, "--balance", "fastest"});
  EXPECT_NE(r.code, 0);
  EXPECT_THAT(r.err, HasSubstr("--balance must be measured or estimated, got \"fastest\""));
  r = Run({"upload", "--name", "small", "--model", model, "--link_gb_per_s", "-1"});
  EXPECT_NE(r.code, 0);
  EXPECT_THAT(r.err, HasSubstr("--link_gb_per_s must be a number >= 0, got \"-1\""));
  EXPECT_TRUE(server_->uploads().empty());
  ASSERT_EQ(Run({"upload", "--name", "small", "--model", model, "--balance", "estimated"}).code,
            0);
  EXPECT_EQ(server_->uploads()[0].options.balance(), UploadOptions::BALANCE_ESTIMATED);
}

std::string WriteText(const std::string& name, const std::string& text) {
  std::ofstream(Tmp(name), std::ios::binary) << text;
  return Tmp(name);
}

TEST_F(CliRemoteTest, UploadSendsTheTokenizerFlags) {
  const std::string model = WriteSmallModel();
  const std::string vocab = WriteText("vocab.json", R"({"a": 0})");
  const std::string merges = WriteText("merges.txt", "#version: 0.2\n");
  const std::string chat = WriteText(
      "chat.json", R"({"roles": {"user": "U: {content}"}, "generation_prompt": "A:"})");
  ASSERT_EQ(Run({"upload", "--name", "small", "--model", model, "--gpt2_vocab", vocab,
                 "--gpt2_merges", merges, "--chat_template", chat, "--stop_token", "7",
                 "--stop_token", "9"})
                .code,
            0);
  ASSERT_EQ(server_->uploads().size(), 1u);
  const TokenizerSpec t = server_->uploads()[0].options.tokenizer();
  EXPECT_EQ(t.gpt2_bpe().vocab_json(), R"({"a": 0})");
  EXPECT_EQ(t.gpt2_bpe().merges(), "#version: 0.2\n");
  EXPECT_EQ(t.chat_template().roles().at("user"), "U: {content}");
  EXPECT_EQ(t.chat_template().generation_prompt(), "A:");
  EXPECT_THAT(t.stop_token_ids(), ::testing::ElementsAre(7, 9));
  const std::pair<std::vector<std::string>, std::string> bad[] = {
      {{"--gpt2_vocab", vocab}, "--gpt2_vocab and --gpt2_merges go together"},
      {{"--sentencepiece", Tmp("missing.model")}, "--sentencepiece: cannot read"},
      {{"--sentencepiece", Tmp("")}, "(not a file)"},
      {{"--chat_template", merges, "--sentencepiece", vocab}, "--chat_template " + merges + ": [json.exception.parse_error"},
      {{"--chat_template", vocab, "--sentencepiece", vocab}, "\"a\" is not roles"},
      {{"--stop_token", "7"}, "need a tokenizer"},
      {{"--stop_token", "x", "--sentencepiece", vocab}, "--stop_token \"x\" is not a token id"},
  };
  for (const auto& [flags, want] : bad) {
    std::vector<std::string> args = {"upload", "--name", "small", "--model", model};
    args.insert(args.end(), flags.begin(), flags.end());
    Result r = Run(args);
    EXPECT_NE(r.code, 0) << want;
    EXPECT_THAT(r.err, HasSubstr(want));
  }
  EXPECT_EQ(server_->uploads().size(), 1u);
}

TEST_F(CliRemoteTest, ModelsPrintsATable) {
  Result r = Run({"models"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out, "no models\n");
  ASSERT_EQ(
      Run({"upload", "--name", "small", "--model", WriteSmallModel()}).code, 0);
  r = Run({"models"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("NAME   STATE  STAGES  SIZE"));
  EXPECT_THAT(r.out, HasSubstr("small  READY  1       "));
}

TEST_F(CliRemoteTest, PlanOfADeployedModelShowsStageServersAndMicrobatches) {
  GraphBuilder b;
  b.Input("x", {-1, 4}).Input("y", {-1, 4}).Param("w", {4, 4});
  b.Op("mm", {"x", "w"}, "a")
      .Split()
      .Op("sub", {"a", "y"}, "out")
      .Output("out");
  Model m = b.Build();
  auto plan = Partition(m.graph, PartitionOptions());
  ASSERT_TRUE(plan.ok()) << plan.status();
  GetPlanResponse response;
  response.set_name("small");
  *response.mutable_plan() = *plan;
  response.add_stage_servers("10.0.0.1:9000");
  response.add_stage_servers("10.0.0.2:9000");
  response.set_microbatches(4);
  response.set_state("READY");
  server_->SetPlan(response);

  Result r = Run({"plan", "--name", "small"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("model \"small\" on " + server_->address() +
                               " (READY)"));
  EXPECT_THAT(r.out, HasSubstr("stage 0 @ 10.0.0.1:9000: "));
  EXPECT_THAT(r.out, HasSubstr("stage 1 @ 10.0.0.2:9000: "));
  EXPECT_THAT(r.out, HasSubstr("4 microbatches per request"));

  EXPECT_THAT(r.out, Not(HasSubstr("replica")));
  EXPECT_THAT(r.out, HasSubstr("cut by   the model's cut points\n"));
  EXPECT_THAT(r.out, Not(HasSubstr("measured")));
  // Measured compute times from the stage servers, per stage.
  response.add_measured_compute_us(120.5);
  response.add_measured_compute_us(80.25);
  server_->SetPlan(response);
  r = Run({"plan", "--name", "small"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("  time     measured 120.5 us compute per microbatch\n"));
  EXPECT_THAT(r.out, HasSubstr("  time     measured 80.2 us compute per microbatch\n"));
  response.clear_measured_compute_us();

  // Two replicas: lane 1's servers on a line of their own.
  response.add_stage_servers("10.0.0.3:9000");
  response.add_stage_servers("10.0.0.4:9000");
  response.set_replicas(2);
  response.set_ready_replicas(1);
  server_->SetPlan(response);
  r = Run({"plan", "--name", "small"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("stage 1 @ 10.0.0.2:9000: "));
  EXPECT_THAT(r.out, HasSubstr("replica 1: 10.0.0.3:9000 10.0.0.4:9000\n"));
  EXPECT_THAT(r.out, HasSubstr("2 replicas of every stage (1 serving)"));
  EXPECT_THAT(r.out, Not(HasSubstr("dynamic batching")));
  response.set_max_batch_rows(64);
  response.set_max_batches_in_flight(4);
  server_->SetPlan(response);
  r = Run({"plan", "--name", "small"});
  EXPECT_THAT(r.out, HasSubstr("dynamic batching: requests merged up to 64 rows "
                               "while 4 merged requests run\n"));

  r = Run({"plan", "--name", "other"});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.err, HasSubstr("pipeserve plan: model \"other\" is not known"));
}

TEST_F(CliRemoteTest, InferTakesInputsByNameOrOrderAndWritesOutputs) {
  Tensor x = Tensor::FromVector({2, 2}, {1, 2, 3, 4});
  Tensor y = Tensor::FromVector({1, 3}, {5, 6, 7});
  ASSERT_TRUE(WriteNpy(Tmp("ix.npy"), x).ok());
  ASSERT_TRUE(WriteNpy(Tmp("iy.npy"), y).ok());
  std::string dir = Tmp("infer_out");
  // y by name, x by position: the model's inputs are (x, y).
  Result r = Run({"infer", "--name", "neg", "--input", "y=" + Tmp("iy.npy"),
                  "--input", Tmp("ix.npy"), "--output_dir", dir});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out,
              HasSubstr("output 0 (neg_x): [2,2] -> " + dir + "/neg_x.npy"));
  EXPECT_THAT(r.out,
              HasSubstr("output 1 (neg_y): [1,3] -> " + dir + "/neg_y.npy"));
  EXPECT_THAT(r.out, HasSubstr("latency "));
  auto ny = ReadNpy(dir + "/neg_y.npy");
  ASSERT_TRUE(ny.ok()) << ny.status();
  EXPECT_EQ(ny->shape(), (Shape{1, 3}));
  EXPECT_EQ(ny->data()[2], -7.0f);

  r = Run({"infer", "--name", "neg", "--input", Tmp("ix.npy")});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.err, HasSubstr("no --input for model input \"y\""));
  r = Run({"infer", "--name", "nope", "--input", Tmp("ix.npy")});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.err, HasSubstr("pipeserve infer: model \"nope\" is not known"));
  r = Run({"infer", "--name", "slow", "--input", Tmp("ix.npy"), "--input",
           Tmp("iy.npy"), "--timeout_ms", "50"});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.err, HasSubstr("Deadline Exceeded"));
}

TEST_F(CliRemoteTest, InferWritesTheTimelineItAskedFor) {
  ASSERT_TRUE(WriteNpy(Tmp("tx.npy"), Tensor::FromVector({1, 1}, {1})).ok());
  const std::string path = Tmp("trace.json");
  Result r = Run({"infer", "--name", "neg", "--input", Tmp("tx.npy"), "--input",
                  Tmp("tx.npy"), "--trace", path});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("trace -> " + path + " (open it in ui.perfetto.dev)"));
  std::ifstream in(path);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_EQ(text, "{\"traceEvents\":[]}\n");
  // A server that sends no timeline is an error, not an empty file.
  r = Run({"infer", "--name", "slow", "--input", Tmp("tx.npy"), "--input", Tmp("tx.npy"),
           "--trace", Tmp("none.json")});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.err, HasSubstr("--trace: the server sent no timeline"));
}

TEST_F(CliRemoteTest, HealthExitsOneWhenNotServing) {
  Result r = Run({"health"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out,
              HasSubstr("live    true\nready   true\nhealth  SERVING\n"));
  server_->SetServing(false);
  r = Run({"health"});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.out, HasSubstr("ready   false"));
  EXPECT_THAT(r.out, HasSubstr("health  NOT_SERVING"));
  EXPECT_THAT(r.err, HasSubstr("is not serving"));
}

TEST(CliTest, UnreachableServerIsNamed) {
  std::string address;
  {
    auto server = FakeServer::Start();
    address = server->address();
  }
  Result r = RunPipeserve({"models", "--server", address});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.err,
              HasSubstr("cannot reach a pipeserve server at " + address));
}

}  // namespace
}  // namespace pipeserve
