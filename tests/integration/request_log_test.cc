// Structured request logs of kvbuffer-server (service/server/request_log.h): a child server's
// stderr is parsed line by line as JSON; every call and Stream message has a line with its request
// id (the client's x-request-id, or one the server made, echoed either way), and no activation
// data ever reaches the log.
#include <signal.h>

#include <cctype>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/str_split.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "grpcpp/client_context.h"
#include "gtest/gtest.h"
#include "tests/integration/test_servers.h"
#include "tests/integration/wire_driver.h"

namespace kvbuffer::testing {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

// A flat JSON object's members: strings unescaped; numbers, true, false and null as written.
using JsonObject = std::map<std::string, std::string>;

// A minimal strict parser of one flat JSON object (no nested objects or arrays, which the log
// never writes); false on any syntax error or trailing text.
class FlatJsonParser {
 public:
  explicit FlatJsonParser(const std::string& text) : s_(text) {}

  bool Parse(JsonObject* out) {
    SkipSpace();
    if (!Eat('{')) return false;
    SkipSpace();
    if (Eat('}')) return AtEnd();
    while (true) {
      std::string key, value;
      SkipSpace();
      if (!String(&key)) return false;
      SkipSpace();
      if (!Eat(':')) return false;
      SkipSpace();
      if (Peek() == '"') {
        if (!String(&value)) return false;
      } else if (!Scalar(&value)) {
        return false;
      }
      if (out->count(key) != 0) return false;  // duplicate keys are a bug in the writer
      (*out)[key] = value;
      SkipSpace();
      if (Eat('}')) return AtEnd();
      if (!Eat(',')) return false;
    }
  }

 private:
  char Peek() const { return i_ < s_.size() ? s_[i_] : '\0'; }
  bool Eat(char c) {
    if (Peek() != c) return false;
    ++i_;
    return true;
  }
  void SkipSpace() {
    while (i_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[i_]))) ++i_;
  }
  bool AtEnd() {
    SkipSpace();
    return i_ == s_.size();
  }
  bool Scalar(std::string* out) {
    for (const char* word : {"true", "false", "null"}) {
      if (s_.compare(i_, std::strlen(word), word) == 0) {
        *out = word;
        i_ += std::strlen(word);
        return true;
      }
    }
    const size_t begin = i_;
    if (Peek() == '-') ++i_;
    if (!std::isdigit(static_cast<unsigned char>(Peek()))) return false;
    while (std::isdigit(static_cast<unsigned char>(Peek())) || Peek() == '.' || Peek() == 'e' ||
           Peek() == 'E' || Peek() == '+' || Peek() == '-') {
      ++i_;
    }
    *out = s_.substr(begin, i_ - begin);
    return true;
  }
  bool String(std::string* out) {
    if (!Eat('"')) return false;
    while (i_ < s_.size()) {
      const char c = s_[i_++];
      if (c == '"') return true;
      if (static_cast<unsigned char>(c) < 0x20) return false;  // must have been escaped
      if (c != '\\') {
        *out += c;
        continue;
      }
      if (i_ >= s_.size()) return false;
      const char e = s_[i_++];
      switch (e) {
        case '"':
        case '\\':
        case '/':
          *out += e;
          break;
        case 'n':
          *out += '\n';
          break;
        case 'r':
          *out += '\r';
          break;
        case 't':
          *out += '\t';
          break;
        case 'b':
          *out += '\b';
          break;
        case 'f':
          *out += '\f';
          break;
        case 'u': {
          if (i_ + 4 > s_.size()) return false;
          for (size_t k = 0; k < 4; ++k) {
            if (!std::isxdigit(static_cast<unsigned char>(s_[i_ + k]))) return false;
          }
          *out += "\\u" + s_.substr(i_, 4);  // kept escaped: the tests only compare ASCII
          i_ += 4;
          break;
        }
        default:
          return false;
      }
    }
    return false;
  }

  const std::string& s_;
  size_t i_ = 0;
};

// Every line of `text` that starts with '{', parsed; a line that does not parse fails the test.
std::vector<JsonObject> JsonLines(const std::string& text) {
  std::vector<JsonObject> lines;
  for (absl::string_view line : absl::StrSplit(text, '\n', absl::SkipEmpty())) {
    if (line.front() != '{') continue;
    JsonObject object;
    const std::string copy(line);
    EXPECT_TRUE(FlatJsonParser(copy).Parse(&object)) << "not one JSON object: " << copy;
    lines.push_back(std::move(object));
  }
  return lines;
}

// The lines whose `key` is `value`.
std::vector<JsonObject> Where(const std::vector<JsonObject>& lines, const std::string& key,
                              const std::string& value) {
  std::vector<JsonObject> out;
  for (const JsonObject& o : lines) {
    auto it = o.find(key);
    if (it != o.end() && it->second == value) out.push_back(o);
  }
  return out;
}

std::string EchoedId(const grpc::ClientContext& context) {
  const auto& md = context.GetServerInitialMetadata();
  auto it = md.find("x-request-id");
  return it == md.end() ? "" : std::string(it->second.data(), it->second.size());
}

bool IsRfc3339Utc(const std::string& s) {
  absl::Time t;
  std::string error;
  return s.size() == 24 && s.back() == 'Z' && absl::ParseTime(absl::RFC3339_full, s, &t, &error);
}

// The one float written all over the qkv tensor below, and forms its text could take.
constexpr float kMarker = 8675.30859375f;  // exactly representable

TEST(RequestLogTest, EveryCallIsLoggedAsJsonWithItsRequestIdAndNoActivations) {
  absl::StatusOr<std::unique_ptr<ChildServer>> server =
      ChildServer::Start({"--model=tiny", "--log_level=info"});
  ASSERT_TRUE(server.ok()) << server.status();

  WireDriver driver((*server)->address(), "unary");
  ASSERT_TRUE(driver.Init().ok());
  mock::CheckedSequence* seq = driver.NewSequence(4242);
  ASSERT_TRUE(driver.Open({seq}).ok());
  v1::AttentionService::Stub* stub = driver.client()->stub();

  // 1. A DecodeStep whose qkv is the marker everywhere, with the client's request id.
  v1::StreamRequest call = driver.DecodeCall(0, {seq});
  v1::DecodeStepRequest decode = call.decode_step();
  // The driver sends bf16: widen a and b exactly to fp32, and make qkv the marker everywhere.
  ASSERT_EQ(decode.qkv().dtype(), v1::BF16);
  for (v1::Tensor* t : {decode.mutable_a(), decode.mutable_b()}) {
    std::string wide(t->data().size() * 2, '\0');
    for (size_t i = 0; i + 2 <= t->data().size(); i += 2) {
      uint16_t half;
      std::memcpy(&half, t->data().data() + i, 2);
      const uint32_t bits = static_cast<uint32_t>(half) << 16;
      std::memcpy(wide.data() + i * 2, &bits, 4);
    }
    t->set_data(wide);
    t->set_dtype(v1::FP32);
  }
  std::string* data = decode.mutable_qkv()->mutable_data();
  data->assign(data->size() * 2, '\0');
  decode.mutable_qkv()->set_dtype(v1::FP32);
  ASSERT_GE(data->size(), 8u);
  for (size_t i = 0; i + sizeof(float) <= data->size(); i += sizeof(float)) {
    std::memcpy(data->data() + i, &kMarker, sizeof(float));
  }
  const std::string qkv_bytes = *data;
  {
    grpc::ClientContext context;
    context.AddMetadata("x-request-id", "client-id-\"quoted\"-1");
    v1::LayerOutput out;
    grpc::Status status = stub->DecodeStep(&context, decode, &out);
    ASSERT_TRUE(status.ok()) << status.error_message();
    EXPECT_EQ(EchoedId(context), "client-id-\"quoted\"-1");
  }
  // 2. A call without an id: the server makes one and echoes it.
  std::string generated;
  {
    grpc::ClientContext context;
    v1::GetServerInfoResponse info;
    ASSERT_TRUE(stub->GetServerInfo(&context, v1::GetServerInfoRequest(), &info).ok());
    generated = EchoedId(context);
    EXPECT_EQ(generated.size(), 32u) << generated;
  }
  // 3. A failing call (unknown sequence) with an unusable id (too long): replaced.
  std::string replaced;
  {
    grpc::ClientContext context;
    context.AddMetadata("x-request-id", std::string(200, 'x'));
    v1::FlushRequest flush;
    flush.add_ids(999999);
    v1::FlushResponse out;
    EXPECT_EQ(stub->Flush(&context, flush, &out).error_code(), grpc::StatusCode::NOT_FOUND);
    replaced = EchoedId(context);
    EXPECT_EQ(replaced.size(), 32u);
  }
  // 4. A Stream of two messages under one request id.
  {
    grpc::ClientContext context;
    context.AddMetadata("x-request-id", "stream-id-7");
    auto stream = stub->Stream(&context);
    v1::StreamRequest info;
    info.set_request_id(77);
    info.mutable_get_server_info();
    ASSERT_TRUE(stream->Write(info));
    v1::StreamRequest flush;
    flush.set_request_id(78);
    flush.mutable_flush()->add_ids(4242);
    ASSERT_TRUE(stream->Write(flush));
    stream->WritesDone();
    v1::StreamResponse response;
    int answers = 0;
    while (stream->Read(&response)) ++answers;
    EXPECT_EQ(answers, 2);
    ASSERT_TRUE(stream->Finish().ok());
    EXPECT_EQ(EchoedId(context), "stream-id-7");
  }

  (*server)->Signal(SIGTERM);
  absl::StatusOr<int> code = (*server)->WaitExit(absl::Seconds(30));
  ASSERT_TRUE(code.ok()) << code.status();
  EXPECT_EQ(*code, 0);

  const std::string err = (*server)->Stderr();
  const std::vector<JsonObject> lines = JsonLines(err);
  for (const JsonObject& o : lines) {
    EXPECT_TRUE(IsRfc3339Utc(o.at("timestamp"))) << o.at("timestamp");
    EXPECT_TRUE(o.count("level") && o.count("event"));
  }
  for (const char* event :
       {"server_started", "server_draining", "server_shutdown", "server_stopped"}) {
    EXPECT_EQ(Where(lines, "event", event).size(), 1u) << event << "\n" << err;
  }
  EXPECT_EQ(Where(lines, "event", "server_started")[0].at("model"), "tiny");

  // The DecodeStep, under the client's id: one sequence, one token, sizes and an OK status.
  std::vector<JsonObject> d = Where(lines, "request_id", "client-id-\"quoted\"-1");
  ASSERT_EQ(d.size(), 1u) << err;
  EXPECT_EQ(d[0].at("event"), "rpc");
  EXPECT_EQ(d[0].at("level"), "info");
  EXPECT_EQ(d[0].at("rpc"), "DecodeStep");
  EXPECT_EQ(d[0].at("status"), "OK");
  EXPECT_EQ(d[0].at("sequences"), "1");
  EXPECT_EQ(d[0].at("tokens"), "1");
  EXPECT_EQ(d[0].at("request_bytes"), std::to_string(decode.ByteSizeLong()));
  EXPECT_GT(std::stoll(d[0].at("response_bytes")), 0);
  EXPECT_GE(std::stod(d[0].at("latency_ms")), 0.0);
  EXPECT_THAT(d[0].at("peer"), HasSubstr("127.0.0.1"));
  EXPECT_EQ(d[0].count("tenant"), 0u);  // authentication is off

  std::vector<JsonObject> g = Where(lines, "request_id", generated);
  ASSERT_EQ(g.size(), 1u);
  EXPECT_EQ(g[0].at("rpc"), "GetServerInfo");

  std::vector<JsonObject> f = Where(lines, "request_id", replaced);
  ASSERT_EQ(f.size(), 1u);
  EXPECT_EQ(f[0].at("rpc"), "Flush");
  EXPECT_EQ(f[0].at("status"), "NOT_FOUND");
  EXPECT_EQ(f[0].at("level"), "warning");
  EXPECT_EQ(f[0].at("sequences"), "1");
  EXPECT_EQ(f[0].at("response_bytes"), "0");

  std::vector<JsonObject> s = Where(lines, "request_id", "stream-id-7");
  ASSERT_EQ(s.size(), 3u) << err;  // two messages, then the stream
  EXPECT_EQ(s[0].at("event"), "stream_message");
  EXPECT_EQ(s[0].at("stream_request_id"), "77");
  EXPECT_EQ(s[0].at("rpc"), "GetServerInfo");
  EXPECT_EQ(s[1].at("stream_request_id"), "78");
  EXPECT_EQ(s[1].at("rpc"), "Flush");
  EXPECT_EQ(s[1].at("sequences"), "1");
  EXPECT_EQ(s[2].at("event"), "rpc");
  EXPECT_EQ(s[2].at("rpc"), "Stream");
  EXPECT_EQ(s[2].at("messages"), "2");
  EXPECT_EQ(s[2].at("status"), "OK");

  // No activation data: not the raw bytes, not their hex or base64, not the value as text.
  EXPECT_THAT(err, Not(HasSubstr(qkv_bytes.substr(0, 8))));
  EXPECT_THAT(err, Not(HasSubstr(absl::BytesToHexString(qkv_bytes.substr(0, 8)))));
  EXPECT_THAT(err, Not(HasSubstr(absl::Base64Escape(qkv_bytes.substr(0, 12)))));
  EXPECT_THAT(err, Not(HasSubstr("8675.3")));
  EXPECT_THAT(err, Not(HasSubstr("8.6753")));
}

TEST(RequestLogTest, TextFormatAndLevelFilter) {
  absl::StatusOr<std::unique_ptr<ChildServer>> server =
      ChildServer::Start({"--model=tiny", "--log_format=text", "--log_level=warning"});
  ASSERT_TRUE(server.ok()) << server.status();
  auto client = client::Client::Connect((*server)->address());
  ASSERT_TRUE(client->GetServerInfo().ok());                   // info: filtered out
  EXPECT_FALSE(client->Flush(std::vector<uint64_t>{5}).ok());  // NOT_FOUND: warning
  (*server)->Signal(SIGTERM);
  ASSERT_TRUE((*server)->WaitExit(absl::Seconds(30)).ok());
  const std::string err = (*server)->Stderr();
  EXPECT_THAT(err, Not(HasSubstr("rpc=GetServerInfo")));
  EXPECT_THAT(err, HasSubstr("WARNING rpc request_id="));
  EXPECT_THAT(err, HasSubstr("rpc=Flush"));
  EXPECT_THAT(err, HasSubstr("status=NOT_FOUND"));
  EXPECT_THAT(err, Not(HasSubstr("server_started")));  // info
  EXPECT_TRUE(JsonLines(err).empty());
}

TEST(RequestLogTest, BadLogFlagsStopTheServer) {
  EXPECT_FALSE(ChildServer::Start({"--model=tiny", "--log_format=xml"}).ok());
  EXPECT_FALSE(ChildServer::Start({"--model=tiny", "--log_level=loud"}).ok());
}

}  // namespace
}  // namespace kvbuffer::testing
