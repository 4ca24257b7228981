#include "server/transport/auth.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace pipeserve {
namespace {

using ::testing::HasSubstr;

constexpr char kFile[] = R"(# scopes  token
admin     admin-token-0123456789
infer     infer-token-0123456789

infer,admin  both-token-0123456789
)";

TEST(TokenSetTest, ScopesGrantWhatTheySay) {
  auto tokens = TokenSet::Parse(kFile);
  ASSERT_TRUE(tokens.ok()) << tokens.status();
  EXPECT_EQ(tokens->size(), 3u);
  EXPECT_TRUE(tokens->Authorize("Bearer infer-token-0123456789", Scope::kInfer).ok());
  EXPECT_TRUE(tokens->Authorize("Bearer admin-token-0123456789", Scope::kAdmin).ok());
  EXPECT_TRUE(tokens->Authorize("Bearer admin-token-0123456789", Scope::kInfer).ok())
      << "admin includes infer";
  EXPECT_TRUE(tokens->Authorize("bearer both-token-0123456789", Scope::kAdmin).ok())
      << "the scheme is case-insensitive";
}

TEST(TokenSetTest, MissingOrUnknownTokenIsUnauthenticated) {
  auto tokens = TokenSet::Parse(kFile);
  ASSERT_TRUE(tokens.ok());
  absl::Status none = tokens->Authorize("", Scope::kInfer);
  EXPECT_EQ(none.code(), absl::StatusCode::kUnauthenticated);
  EXPECT_THAT(std::string(none.message()), HasSubstr("authorization: Bearer <token>"));
  EXPECT_EQ(tokens->Authorize("Bearer infer-token-012345678", Scope::kInfer).code(),
            absl::StatusCode::kUnauthenticated)
      << "a prefix of a token is not the token";
  EXPECT_EQ(tokens->Authorize("Basic infer-token-0123456789", Scope::kInfer).code(),
            absl::StatusCode::kUnauthenticated);
}

TEST(TokenSetTest, WrongScopeIsPermissionDenied) {
  auto tokens = TokenSet::Parse(kFile);
  ASSERT_TRUE(tokens.ok());
  absl::Status s = tokens->Authorize("Bearer infer-token-0123456789", Scope::kAdmin);
  EXPECT_EQ(s.code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(std::string(s.message()), HasSubstr("lacks the \"admin\" scope"));
}

TEST(TokenSetTest, BadFilesAreRefusedNamingTheLine) {
  EXPECT_THAT(std::string(TokenSet::Parse("admin a b\n").status().message()),
              HasSubstr("line 1: expected `<scopes> <token>`"));
  EXPECT_THAT(std::string(TokenSet::Parse("\nroot 0123456789abcdef\n").status().message()),
              HasSubstr("line 2: unknown scope \"root\""));
  EXPECT_THAT(std::string(TokenSet::Parse("infer short\n").status().message()),
              HasSubstr("at least 16 characters"));
  EXPECT_THAT(std::string(TokenSet::Parse("infer 0123456789abcdef\nadmin 0123456789abcdef\n")
                              .status()
                              .message()),
              HasSubstr("line 2: this token is listed twice"));
  EXPECT_THAT(std::string(TokenSet::Parse("# nothing\n").status().message()),
              HasSubstr("lists no tokens"));
}

TEST(ConstantTimeEqualsTest, EqualOnlyWhenIdentical) {
  EXPECT_TRUE(ConstantTimeEquals("abcdef", "abcdef"));
  EXPECT_FALSE(ConstantTimeEquals("abcdeg", "abcdef"));
  EXPECT_FALSE(ConstantTimeEquals("abc", "abcdef"));
  EXPECT_FALSE(ConstantTimeEquals("abcdefabcdef", "abcdef"));
  EXPECT_FALSE(ConstantTimeEquals("", "abcdef"));
  EXPECT_TRUE(ConstantTimeEquals("", ""));
}

TEST(RandomTokenTest, SixtyFourHexDigitsAndNeverTheSame) {
  auto a = RandomToken();
  auto b = RandomToken();
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->size(), 64u);
  EXPECT_EQ(a->find_first_not_of("0123456789abcdef"), std::string::npos);
  EXPECT_NE(*a, *b);
}

}  // namespace
}  // namespace pipeserve
