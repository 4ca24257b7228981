#include "runtime/npy.h"

#include <cstdlib>
#include <fstream>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace pipeserve {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

std::string TmpPath(const std::string& name) {
  const char* dir = std::getenv("TEST_TMPDIR");
  return std::string(dir ? dir : "/tmp") + "/" + name;
}

TEST(NpyTest, RoundTripsShapeAndValues) {
  Tensor t = Tensor::FromVector({2, 3}, {1, 2, 3, 4, 5, -6.5});
  std::string path = TmpPath("a.npy");
  ASSERT_TRUE(WriteNpy(path, t).ok());
  auto back = ReadNpy(path);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_THAT(back->shape(), ElementsAre(2, 3));
  EXPECT_EQ(back->data()[5], -6.5f);
}

TEST(NpyTest, RoundTripsRankOne) {
  std::string path = TmpPath("b.npy");
  ASSERT_TRUE(WriteNpy(path, Tensor::FromVector({4}, {1, 2, 3, 4})).ok());
  auto back = ReadNpy(path);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_THAT(back->shape(), ElementsAre(4));
}

TEST(NpyTest, Float64IsRejectedWithTheDtype) {
  std::string header = "{'descr': '<f8', 'fortran_order': False, 'shape': (2,), }";
  std::string bytes = std::string("\x93NUMPY\x01\x00", 8) +
                      std::string(1, char(header.size())) + std::string(1, '\0') +
                      header + std::string(16, '\0');
  auto t = ParseNpy(bytes);
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(t.status().message()), HasSubstr("'<f8'"));
}

TEST(NpyTest, TruncatedDataIsDataLoss) {
  std::string path = TmpPath("c.npy");
  ASSERT_TRUE(WriteNpy(path, Tensor::Zeros({8, 8})).ok());
  std::ifstream in(path, std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  auto t = ParseNpy(bytes.substr(0, bytes.size() - 4));
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().code(), absl::StatusCode::kDataLoss);
}

TEST(NpyTest, MissingFileIsNotFound) {
  EXPECT_EQ(ReadNpy(TmpPath("nope.npy")).status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace pipeserve
