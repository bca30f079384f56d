#include "service/server/json_log.h"

#include <cstdio>
#include <string>

#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kvbuffer::server {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

TEST(JsonEscapeTest, EscapesQuotesBackslashesAndControlCharacters) {
  EXPECT_EQ(JsonEscape("plain"), "plain");
  EXPECT_EQ(JsonEscape("a\"b\\c"), "a\\\"b\\\\c");
  EXPECT_EQ(JsonEscape("l1\nl2\r\t"), "l1\\nl2\\r\\t");
  EXPECT_EQ(JsonEscape(std::string("\x01\x1f\x7f\b\f", 5)), "\\u0001\\u001f\\u007f\\b\\f");
  EXPECT_EQ(JsonEscape(std::string("nul\0x", 5)), "nul\\u0000x");
  EXPECT_EQ(JsonEscape("/"), "/");
}

TEST(JsonEscapeTest, KeepsValidUtf8AndReplacesInvalidBytes) {
  EXPECT_EQ(JsonEscape("caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80"),
            "caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80");
  EXPECT_EQ(JsonEscape("\xff"), "\\ufffd");
  EXPECT_EQ(JsonEscape("\xc3"), "\\ufffd");                        // truncated sequence
  EXPECT_EQ(JsonEscape("\xc0\xaf"), "\\ufffd\\ufffd");             // overlong encoding
  EXPECT_EQ(JsonEscape("\xed\xa0\x80"), "\\ufffd\\ufffd\\ufffd");  // surrogate
}

TEST(Rfc3339Test, UtcWithMilliseconds) {
  const absl::Time t = absl::FromUnixMillis(1714564800123);  // 2024-05-01T12:00:00.123Z
  EXPECT_EQ(Rfc3339Utc(t), "2024-05-01T12:00:00.123Z");
  EXPECT_EQ(Rfc3339Utc(absl::UnixEpoch()), "1970-01-01T00:00:00.000Z");
}

TEST(FormatLogLineTest, JsonHasFixedFieldsThenCallerFieldsInOrder) {
  const absl::Time t = absl::FromUnixMillis(1714564800123);
  const std::string line = FormatLogLine(LogFormat::kJson, t, LogLevel::kWarning, "rpc",
                                         {{"request_id", "id-\"1\""},
                                          {"sequences", int64_t{3}},
                                          {"id", uint64_t{18446744073709551615u}},
                                          {"latency_ms", 1.5},
                                          {"ok", false},
                                          {"negative", int32_t{-7}}});
  EXPECT_EQ(line,
            "{\"timestamp\":\"2024-05-01T12:00:00.123Z\",\"level\":\"warning\",\"event\":\"rpc\","
            "\"request_id\":\"id-\\\"1\\\"\",\"sequences\":3,\"id\":18446744073709551615,"
            "\"latency_ms\":1.5,\"ok\":false,\"negative\":-7}");
}

TEST(FormatLogLineTest, JsonWritesNonFiniteNumbersAsNull) {
  const std::string line =
      FormatLogLine(LogFormat::kJson, absl::UnixEpoch(), LogLevel::kInfo, "e", {{"x", 1.0 / 0.0}});
  EXPECT_THAT(line, HasSubstr("\"x\":null}"));
}

TEST(FormatLogLineTest, TextQuotesValuesThatNeedIt) {
  const std::string line =
      FormatLogLine(LogFormat::kText, absl::FromUnixMillis(1714564800123), LogLevel::kInfo,
                    "server_started", {{"backend", "cpu"}, {"note", "a b"}, {"port", int32_t{5}}});
  EXPECT_EQ(line, "2024-05-01T12:00:00.123Z INFO server_started backend=cpu note=\"a b\" port=5");
}

TEST(ParseTest, LevelsAndFormats) {
  EXPECT_EQ(*ParseLogLevel("debug"), LogLevel::kDebug);
  EXPECT_EQ(*ParseLogLevel("INFO"), LogLevel::kInfo);
  EXPECT_EQ(*ParseLogLevel("warn"), LogLevel::kWarning);
  EXPECT_EQ(*ParseLogLevel("error"), LogLevel::kError);
  EXPECT_FALSE(ParseLogLevel("loud").ok());
  EXPECT_EQ(*ParseLogFormat("json"), LogFormat::kJson);
  EXPECT_EQ(*ParseLogFormat("text"), LogFormat::kText);
  EXPECT_FALSE(ParseLogFormat("xml").ok());
}

TEST(LogWriterTest, WritesWholeLinesAtOrAboveItsLevel) {
  char* buffer = nullptr;
  size_t size = 0;
  FILE* out = open_memstream(&buffer, &size);
  ASSERT_NE(out, nullptr);
  {
    LogWriter writer(LogFormat::kJson, LogLevel::kWarning, out);
    EXPECT_FALSE(writer.Enabled(LogLevel::kInfo));
    writer.Log(LogLevel::kInfo, "dropped", {});
    writer.Log(LogLevel::kError, "kept", {{"k", "v"}});
  }
  std::fclose(out);
  const std::string written(buffer, size);
  free(buffer);
  EXPECT_THAT(written, Not(HasSubstr("dropped")));
  EXPECT_THAT(written, HasSubstr("\"level\":\"error\",\"event\":\"kept\",\"k\":\"v\"}\n"));
  EXPECT_EQ(written.front(), '{');
  EXPECT_EQ(std::count(written.begin(), written.end(), '\n'), 1);
}

}  // namespace
}  // namespace kvbuffer::server
