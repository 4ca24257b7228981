#include "server/text/utf8.h"

#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace pipeserve {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

TEST(Utf8Test, DecodesEveryLengthAndEncodesBack) {
  const std::string text = "a\xC3\xA9\xE6\x9D\xB1\xF0\x9F\x9A\x80";  // a é 東 🚀
  auto cps = DecodeUtf8(text);
  ASSERT_TRUE(cps.ok()) << cps.status();
  EXPECT_THAT(*cps, ElementsAre(0x61, 0xE9, 0x6771, 0x1F680));
  std::string back;
  for (uint32_t cp : *cps) AppendUtf8(cp, &back);
  EXPECT_EQ(back, text);
}

TEST(Utf8Test, MalformedTextIsRefusedNamingTheOffset) {
  const struct {
    std::string text;
    const char* why;
  } cases[] = {
      {"ab\xFF", "byte 0xFF at offset 2 starts no valid character"},
      {"\xC0\xAF", "byte 0xC0 at offset 0"},                   // overlong '/'
      {"x\xED\xA0\x80", "byte 0xED at offset 1"},              // a surrogate
      {"\xF4\x90\x80\x80", "byte 0xF4 at offset 0"},           // beyond U+10FFFF
      {"ok\xE6\x9D", "offset 2 starts a character the text ends inside"},
      {"\x80", "byte 0x80 at offset 0"},
  };
  for (const auto& c : cases) {
    auto cps = DecodeUtf8(c.text);
    ASSERT_FALSE(cps.ok()) << c.why;
    EXPECT_EQ(cps.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(cps.status().message()), HasSubstr(c.why));
  }
}

// A character whose bytes two tokens share comes out whole, once both are in.
TEST(Utf8Test, AStreamHandsOutOnlyWholeCharacters) {
  Utf8Stream s;
  EXPECT_EQ(s.Push("go \xF0\x9F"), "go ");
  EXPECT_EQ(s.Push("\x9A"), "");
  EXPECT_EQ(s.Push("\x80!"), "\xF0\x9F\x9A\x80!");
  EXPECT_EQ(s.Finish(), "");
}

TEST(Utf8Test, AStreamReplacesMalformedBytesAndACutEnd) {
  Utf8Stream s;
  EXPECT_EQ(s.Push("a\xFF" "b"), "a\xEF\xBF\xBD" "b");
  EXPECT_EQ(s.Push("\xE6\x9D"), "");
  EXPECT_EQ(s.Push("x"), "\xEF\xBF\xBD\xEF\xBF\xBDx") << "a lead byte not continued";
  EXPECT_EQ(s.Push("\xC3"), "");
  EXPECT_EQ(s.Finish(), "\xEF\xBF\xBD");
}

}  // namespace
}  // namespace pipeserve
