#include "client/cli.h"

#include <cstdlib>
#include <sstream>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "partitioner/graph_builder.h"
#include "runtime/npy.h"

namespace pipeserve {
namespace {

using ::testing::HasSubstr;

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
  b.Op("mm", {"x", "w"}, "a").Split().Op("sub", {"a", "y"}, "out").Output("out");
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
  EXPECT_THAT(r.out, HasSubstr("inputs   a [B,4] <- stage 0, y [B,4] <- model input"));
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
  Result r = RunPipeserve({"run-local", "--model", model, "--input", "y=" + Tmp("y.npy"),
                  "--input", Tmp("x.npy"), "--chunks", "2", "--output_dir",
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
  Result r = RunPipeserve({"run-local", "--model", model, "--input", "x=" + Tmp("bad.npy"),
                  "--input", "y=" + Tmp("y2.npy")});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.err, HasSubstr("input \"x\": shape [2,5] does not match [B,4]"));
}

}  // namespace
}  // namespace pipeserve
