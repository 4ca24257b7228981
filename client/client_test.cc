// Tests of the C++ client against FakeServer (client/fake_server.h), an
// in-process gRPC server on a loopback port: upload chunking and CRC,
// inference round trips, error codes and messages, deadlines, health.
#include "client/client.h"

#include <unistd.h>
#include <zlib.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>

#include "client/fake_server.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace pipeserve {
namespace {

using ::testing::HasSubstr;

std::string Tmp(const std::string& name) {
  const char* d = std::getenv("TEST_TMPDIR");
  return std::string(d ? d : "/tmp") + "/" + name;
}

// Writes `n` pseudo-random bytes to `path`; returns their CRC-32.
uint32_t WriteFile(const std::string& path, size_t n) {
  std::string bytes(n, '\0');
  uint32_t x = 12345;
  for (char& c : bytes) {
    x = x * 1103515245u + 12345u;
    c = static_cast<char>(x >> 24);
  }
  std::ofstream(path, std::ios::binary) << bytes;
  return static_cast<uint32_t>(
      crc32(0, reinterpret_cast<const Bytef*>(bytes.data()), bytes.size()));
}

class ClientTest : public ::testing::Test {
 protected:
  void SetUp() override {
    server_ = FakeServer::Start();
    auto c = Client::Connect(server_->address());
    ASSERT_TRUE(c.ok()) << c.status();
    client_ = std::move(*c);
  }
  std::unique_ptr<FakeServer> server_;
  std::unique_ptr<Client> client_;
};

TEST_F(ClientTest, UploadStreamsTheFileInMiBChunksWithItsCrc) {
  const size_t size = 5 * (1 << 20) / 2;  // 2.5 MiB: chunks of 1, 1, 0.5 MiB
  std::string path = Tmp("upload.psm");
  uint32_t crc = WriteFile(path, size);
  UploadOptions options;
  options.set_num_stages(3);
  options.set_microbatches(8);
  std::vector<std::pair<uint64_t, uint64_t>> calls;
  auto result = client_->Upload(
      "m", path, options,
      [&](uint64_t sent, uint64_t total) { calls.emplace_back(sent, total); });
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->name, "m");
  EXPECT_EQ(result->bytes, size);
  EXPECT_EQ(result->num_stages, 3);

  std::vector<FakeServer::Upload> ups = server_->uploads();
  ASSERT_EQ(ups.size(), 1);
  EXPECT_EQ(ups[0].messages, 3);
  EXPECT_EQ(ups[0].bytes, size);
  EXPECT_EQ(ups[0].crc32, crc);
  EXPECT_EQ(ups[0].options.num_stages(), 3);
  EXPECT_EQ(ups[0].options.microbatches(), 8);

  ASSERT_EQ(calls.size(), 3);
  EXPECT_EQ(calls[0], std::make_pair(uint64_t{1 << 20}, uint64_t{size}));
  EXPECT_EQ(calls.back(), std::make_pair(uint64_t{size}, uint64_t{size}));
}

TEST_F(ClientTest, UploadOfAnEmptyFileSendsOneLastMessage) {
  std::string path = Tmp("empty.psm");
  WriteFile(path, 0);
  auto result = client_->Upload("empty", path, UploadOptions());
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->bytes, 0);
  ASSERT_EQ(server_->uploads().size(), 1);
  EXPECT_EQ(server_->uploads()[0].messages, 1);
}

TEST_F(ClientTest, UploadOfAMissingFileIsNotFoundNamingIt) {
  auto result = client_->Upload("m", Tmp("nope.psm"), UploadOptions());
  EXPECT_EQ(result.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(result.status().message(), HasSubstr("nope.psm"));
  EXPECT_TRUE(server_->uploads().empty());
}

TEST_F(ClientTest, FileThatShrinksDuringUploadIsDataLossAndCancels) {
  std::string path = Tmp("shrinks.psm");
  WriteFile(path, 3 << 20);
  auto result =
      client_->Upload("m", path, UploadOptions(), [&](uint64_t, uint64_t) {
        ASSERT_EQ(truncate(path.c_str(), (1 << 20) + 10), 0);
      });
  EXPECT_EQ(result.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(result.status().message(),
              HasSubstr("read 1048586 of 3145728 bytes"));
  EXPECT_TRUE(server_->uploads().empty());
}

TEST_F(ClientTest, UploadRefusedMidStreamReturnsTheServerError) {
  std::string path = Tmp("refused.psm");
  WriteFile(path, 8 << 20);
  auto result = client_->Upload("reject", path, UploadOptions());
  EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(result.status().message(), "model \"reject\": refused");
}

TEST_F(ClientTest, ListModelsReturnsTheUploads) {
  std::string path = Tmp("list.psm");
  WriteFile(path, 1000);
  ASSERT_TRUE(client_->Upload("a", path, UploadOptions()).ok());
  auto models = client_->ListModels();
  ASSERT_TRUE(models.ok()) << models.status();
  ASSERT_EQ(models->size(), 1);
  EXPECT_EQ((*models)[0].name(), "a");
  EXPECT_EQ((*models)[0].state(), "READY");
  EXPECT_EQ((*models)[0].bytes(), 1000);
}

TEST_F(ClientTest, InferRoundTripsShapesAndValues) {
  Tensor x = Tensor::FromVector({2, 3}, {1, 2, 3, 4, 5, 6});
  Tensor y = Tensor::FromVector({1, 2, 2}, {0.5f, -1.5f, 0, 1e30f});
  auto outputs = client_->Infer("neg", {{"x", x}, {"y", y}});
  ASSERT_TRUE(outputs.ok()) << outputs.status();
  ASSERT_EQ(outputs->size(), 2);
  EXPECT_EQ((*outputs)[0].name, "neg_x");
  EXPECT_EQ((*outputs)[0].tensor.shape(), (Shape{2, 3}));
  EXPECT_EQ((*outputs)[1].name, "neg_y");
  EXPECT_EQ((*outputs)[1].tensor.shape(), (Shape{1, 2, 2}));
  for (int i = 0; i < 6; ++i) {
    EXPECT_EQ((*outputs)[0].tensor.data()[i], -x.data()[i]);
  }
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ((*outputs)[1].tensor.data()[i], -y.data()[i]);
  }
}

// Issue 9: idempotent calls that fail with UNAVAILABLE are tried again
// (gRPC's retry policy), up to retry_attempts in all.
TEST_F(ClientTest, InferRetriesUnavailableAndSucceeds) {
  Tensor x = Tensor::FromVector({1, 3}, {1, 2, 3});
  // A request larger than gRPC's default retry buffer (256 KiB) too.
  Tensor big = Tensor::Zeros({512, 1024});
  server_->SetFlakyFailures(3);
  auto outputs = client_->Infer("flaky", {{"x", x}, {"y", big}});
  ASSERT_TRUE(outputs.ok()) << outputs.status();
  EXPECT_EQ((*outputs)[0].tensor.data()[2], -3);
  EXPECT_EQ(server_->flaky_attempts(), 4);
}

TEST_F(ClientTest, RetriesStopAtTheAttemptLimitWithTheServersError) {
  server_->SetFlakyFailures(100);
  auto outputs = client_->Infer("flaky", {{"x", Tensor::Zeros({1, 1})}});
  EXPECT_EQ(outputs.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(outputs.status().message()), HasSubstr("flaky: not this time"));
  EXPECT_EQ(server_->flaky_attempts(), 5);
}

TEST_F(ClientTest, RetriesCanBeTurnedOff) {
  ClientOptions options;
  options.retry_attempts = 1;
  auto client = Client::Connect(server_->address(), options);
  ASSERT_TRUE(client.ok());
  server_->SetFlakyFailures(1);
  EXPECT_EQ((*client)->Infer("flaky", {{"x", Tensor::Zeros({1, 1})}}).status().code(),
            absl::StatusCode::kUnavailable);
  EXPECT_EQ(server_->flaky_attempts(), 1);
}

TEST_F(ClientTest, InferOfAnEmptyBatchWorks) {
  auto outputs = client_->Infer("neg", {{"x", Tensor::Zeros({0, 4})}});
  ASSERT_TRUE(outputs.ok()) << outputs.status();
  EXPECT_EQ((*outputs)[0].tensor.shape(), (Shape{0, 4}));
}

TEST_F(ClientTest, ServerErrorKeepsItsCodeAndMessage) {
  auto outputs = client_->Infer("x", {{"x", Tensor::Zeros({1, 1})}});
  EXPECT_EQ(outputs.status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(outputs.status().message(), "model \"x\" is not known");
  auto plan = client_->GetPlan("x");
  EXPECT_EQ(plan.status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(plan.status().message(), "model \"x\" is not known");
}

TEST_F(ClientTest, MalformedResponseIsInternalNamingTheOutput) {
  auto outputs = client_->Infer("bad", {{"x", Tensor::Zeros({2, 2})}});
  EXPECT_EQ(outputs.status().code(), absl::StatusCode::kInternal);
  EXPECT_THAT(
      outputs.status().message(),
      HasSubstr("output \"neg_x\": contents do not match shape [2,2] (16 bytes expected)"));
}

TEST_F(ClientTest, InferTimeoutIsDeadlineExceeded) {
  auto outputs = client_->Infer("slow", {{"x", Tensor::Zeros({1, 1})}},
                                absl::Milliseconds(100));
  EXPECT_EQ(outputs.status().code(), absl::StatusCode::kDeadlineExceeded);
}

TEST_F(ClientTest, MetadataAndReadiness) {
  auto meta = client_->ModelMetadata("neg");
  ASSERT_TRUE(meta.ok()) << meta.status();
  ASSERT_EQ(meta->inputs_size(), 2);
  EXPECT_EQ(meta->inputs(0).name(), "x");
  EXPECT_EQ(meta->outputs(1).name(), "neg_y");
  EXPECT_EQ(*client_->ServerLive(), true);
  EXPECT_EQ(*client_->ServerReady(), true);
  EXPECT_EQ(*client_->ModelReady("neg"), true);
  EXPECT_EQ(*client_->ModelReady("nope"), false);
}

TEST_F(ClientTest, HealthReportsTheServingStatus) {
  auto health = client_->Health();
  ASSERT_TRUE(health.ok()) << health.status();
  EXPECT_EQ(*health, "SERVING");
  server_->SetServing(false);
  EXPECT_EQ(*client_->Health(), "NOT_SERVING");
  EXPECT_EQ(*client_->ServerReady(), false);
}

TEST(ClientConnectTest, UnreachableServerIsUnavailable) {
  // A port that was just free: nothing listens there.
  std::string address;
  {
    auto server = FakeServer::Start();
    address = server->address();
  }
  ClientOptions options;
  options.timeout = absl::Seconds(5);
  auto client = Client::Connect(address, options);
  ASSERT_TRUE(client.ok());
  EXPECT_EQ((*client)->ServerLive().status().code(),
            absl::StatusCode::kUnavailable);
}

TEST(ClientConnectTest, EmptyAddressIsInvalid) {
  EXPECT_EQ(Client::Connect("").status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace pipeserve
