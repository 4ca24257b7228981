#include "common/grpc_status.h"

#include <string>

#include "gtest/gtest.h"

namespace pipeserve {
namespace {

TEST(GrpcStatusTest, CodesAndMessagesSurviveTheRoundTrip) {
  for (int c = 1; c <= 16; ++c) {
    absl::Status s(static_cast<absl::StatusCode>(c), "input \"y\" is wrong");
    grpc::Status g = ToGrpcStatus(s);
    EXPECT_EQ(static_cast<int>(g.error_code()), c);
    EXPECT_EQ(g.error_message(), "input \"y\" is wrong");
    EXPECT_EQ(FromGrpcStatus(g), s);
  }
  EXPECT_TRUE(ToGrpcStatus(absl::OkStatus()).ok());
  EXPECT_TRUE(FromGrpcStatus(grpc::Status::OK, "ignored").ok());
}

TEST(GrpcStatusTest, ContextPrefixesTheMessage) {
  absl::Status s = FromGrpcStatus(grpc::Status(grpc::StatusCode::NOT_FOUND, "no stage"),
                                  "loading stage 2");
  EXPECT_EQ(s, absl::NotFoundError("loading stage 2: no stage"));
}

TEST(GrpcStatusTest, HugeMessagesAreCappedBothWays) {
  std::string huge(1 << 20, 'x');
  grpc::Status g = ToGrpcStatus(absl::InvalidArgumentError(huge));
  EXPECT_EQ(g.error_message().size(), kMaxStatusMessageBytes);
  EXPECT_EQ(g.error_message().substr(kMaxStatusMessageBytes - 3), "...");
  absl::Status a = FromGrpcStatus(grpc::Status(grpc::StatusCode::INTERNAL, huge));
  EXPECT_EQ(a.message().size(), kMaxStatusMessageBytes);
}

// (gRPC's StatusCode has no fixed underlying type, so a value outside it
// cannot even be made without undefined behaviour; absl's can.)
TEST(GrpcStatusTest, AbslCodesOutsideTheRangeBecomeUnknown) {
  EXPECT_EQ(ToGrpcStatus(absl::Status(static_cast<absl::StatusCode>(99), "odd")).error_code(),
            grpc::StatusCode::UNKNOWN);
}

}  // namespace
}  // namespace pipeserve
