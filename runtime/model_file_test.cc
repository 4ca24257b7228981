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

// Writes a file whose header says whatever `graph` says, with `data_bytes`
// zero bytes of data after it.
std::string RawModelFile(const Graph& graph, size_t data_bytes) {
  std::string header = graph.SerializeAsString();
  std::string bytes(kModelMagic, 8);
  for (int i = 0; i < 8; ++i) bytes.push_back(static_cast<char>((header.size() >> (8 * i)) & 0xff));
  bytes += header;
  bytes.resize((bytes.size() + 63) / 64 * 64 + data_bytes, '\0');
  return bytes;
}

// Regression: [2^53, 512] float32 "needs" 2^64 bytes, which wrapped to 0
// in the old arithmetic, so byte_size 0 passed and a CPU stage server
// later wrote out of bounds transposing the weight.
TEST(ModelFileTest, ParameterWhoseSizeOverflowsIsInvalidArgument) {
  Graph g;
  TensorInfo* p = g.add_params();
  p->set_fqn("w");
  p->set_dtype(DT_FLOAT32);
  p->add_shape(int64_t{1} << 53);
  p->add_shape(512);
  p->set_byte_size(0);
  auto r = ParseModel(RawModelFile(g, 64));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(r.status().message()),
              HasSubstr("parameter \"w\": shape [9007199254740992,512] needs more than 2^62 bytes"));
  std::string path = TmpPath("overflow.psm");
  std::ofstream(path, std::ios::binary) << RawModelFile(g, 64);
  EXPECT_EQ(ModelFileReader::Open(path).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(ModelFileTest, ParameterPastTheEndOfTheDataIsDataLossWithoutWrapping) {
  Graph g;
  TensorInfo* p = g.add_params();
  p->set_fqn("w");
  p->set_dtype(DT_FLOAT32);
  p->add_shape(16);
  p->set_byte_size(64);
  p->set_offset(uint64_t{0} - 64);  // offset + size wraps to 0
  auto r = ParseModel(RawModelFile(g, 128));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kDataLoss) << r.status();
}

TEST(ModelFileTest, HeaderLengthLargerThanAnyGraphIsRefused) {
  std::string bytes(kModelMagic, 8);
  bytes += std::string("\xff\xff\xff\xff\xff\xff\xff\x7f", 8);
  bytes.resize(4096, 'x');
  auto r = ParseModel(bytes);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
}

TEST(ModelFileReaderTest, ReadsWeightRangesWithoutLoadingTheFile) {
  Model m = Small();
  std::string path = TmpPath("reader.psm");
  ASSERT_TRUE(WriteModelFile(path, m.graph, m.weights).ok());
  auto r = ModelFileReader::Open(path);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ((*r)->graph().params_size(), 2);
  float got[4];
  ASSERT_TRUE((*r)->Read("w", 8 * 4, sizeof got, reinterpret_cast<char*>(got)).ok());
  for (int i = 0; i < 4; ++i) EXPECT_EQ(got[i], m.weights.at("w").data()[8 + i]);
  EXPECT_EQ((*r)->Read("w", 120, 16, reinterpret_cast<char*>(got)).code(),
            absl::StatusCode::kInvalidArgument)
      << "a range past the weight's end";
  EXPECT_EQ((*r)->Read("nope", 0, 4, reinterpret_cast<char*>(got)).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ModelFileReader::Open(TmpPath("missing.psm")).status().code(),
            absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace pipeserve
