#include "runtime/model_file.h"

#include <cstdlib>
#include <fstream>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "partitioner/graph_builder.h"

namespace pipeserve {
namespace {

using ::testing::HasSubstr;

std::string TmpPath(const std::string& name) {
  const char* dir = std::getenv("TEST_TMPDIR");
  return std::string(dir ? dir : "/tmp") + "/" + name;
}

Model Small() {
  GraphBuilder b;
  b.Input("x", {-1, 8}).Param("w", {8, 4}).Param("lin.bias", {3});
  b.Op("mm", {"x", "w"}, "h").Output("h");
  return b.Build();
}

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

TEST(ModelFileTest, RoundTripsGraphAndWeightsBitExactly) {
  Model m = Small();
  std::string path = TmpPath("m.psm");
  ASSERT_TRUE(WriteModelFile(path, m.graph, m.weights).ok());
  auto back = ReadModelFile(path);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->graph.nodes_size(), m.graph.nodes_size());
  const Tensor& w = back->weights.at("w");
  ASSERT_EQ(w.numel(), 32);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(w.data()) % 64, 0u);
  for (int i = 0; i < 32; ++i) EXPECT_EQ(w.data()[i], m.weights.at("w").data()[i]);
  EXPECT_EQ(back->graph.params(1).offset() % 64, 0u);
}

TEST(ModelFileTest, FlippedWeightByteIsAChecksumMismatchNamingTheTensor) {
  Model m = Small();
  std::string path = TmpPath("m2.psm");
  ASSERT_TRUE(WriteModelFile(path, m.graph, m.weights).ok());
  std::string bytes = ReadAll(path);
  bytes[bytes.size() - 1] ^= 0x40;  // last byte of "lin.bias"
  auto r = ParseModel(bytes);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(std::string(r.status().message()),
              HasSubstr("parameter \"lin.bias\": checksum mismatch"));
}

TEST(ModelFileTest, TruncatedFileIsDataLoss) {
  Model m = Small();
  std::string path = TmpPath("m3.psm");
  ASSERT_TRUE(WriteModelFile(path, m.graph, m.weights).ok());
  std::string bytes = ReadAll(path);
  auto r = ParseModel(bytes.substr(0, bytes.size() - 8));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("truncated"));
  auto h = ParseModel(bytes.substr(0, 20));
  EXPECT_EQ(h.status().code(), absl::StatusCode::kDataLoss);
}

TEST(ModelFileTest, NotAModelFile) {
  auto r = ParseModel("hello world, this is not a model");
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("PIPESRV1"));
}

TEST(ModelFileTest, ByteSizeThatDoesNotMatchTheShape) {
  Model m = Small();
  m.graph.mutable_params(0)->clear_shape();
  m.graph.mutable_params(0)->add_shape(8);
  m.graph.mutable_params(0)->add_shape(5);
  std::string path = TmpPath("m4.psm");
  ASSERT_TRUE(WriteModelFile(path, m.graph, m.weights).ok());
  auto r = ReadModelFile(path);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(r.status().message()),
              HasSubstr("parameter \"w\": byte_size 128 does not match shape [8,5]"));
}

TEST(ModelFileTest, MissingFileIsNotFound) {
  EXPECT_EQ(ReadModelFile(TmpPath("absent.psm")).status().code(),
            absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace pipeserve
