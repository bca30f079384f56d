// Unit tests of the metrics library: values, the text exposition format, thread safety, and the
// /metrics endpoint scraped over loopback and parsed.
#include "service/server/metrics/metrics.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cmath>
#include <map>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "service/server/metrics/http_server.h"
#include "service/server/metrics/process_memory.h"
#include "service/server/metrics/service_metrics.h"

namespace kvbuffer::metrics {
namespace {

// One sample line of the text format, parsed.
struct Sample {
  std::string name;
  std::map<std::string, std::string> labels;
  double value = 0;
};

double ParseValue(const std::string& s) {
  if (s == "+Inf") return INFINITY;
  if (s == "-Inf") return -INFINITY;
  if (s == "NaN") return NAN;
  size_t used = 0;
  const double v = std::stod(s, &used);
  EXPECT_EQ(used, s.size()) << s;
  return v;
}

// Parses an exposition; fails the test on any malformed line. TYPE lines go to *types.
std::vector<Sample> Parse(const std::string& text, std::map<std::string, std::string>* types) {
  static const std::regex kSample(R"(^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$)");
  static const std::regex kLabel(R"re(([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$))re");
  static const std::regex kType(R"(^# TYPE ([a-zA-Z_:][a-zA-Z0-9_:]*) (counter|gauge|histogram)$)");
  static const std::regex kHelp(R"(^# HELP ([a-zA-Z_:][a-zA-Z0-9_:]*) .*$)");
  std::vector<Sample> out;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    std::smatch m;
    if (line.rfind("# TYPE", 0) == 0) {
      EXPECT_TRUE(std::regex_match(line, m, kType)) << line;
      if (types != nullptr && m.size() > 2) (*types)[m[1]] = m[2];
      continue;
    }
    if (line.rfind("#", 0) == 0) {
      EXPECT_TRUE(std::regex_match(line, kHelp)) << line;
      continue;
    }
    if (!std::regex_match(line, m, kSample)) {
      ADD_FAILURE() << "malformed sample line: " << line;
      continue;
    }
    Sample s;
    s.name = m[1];
    s.value = ParseValue(m[4]);
    std::string labels = m[3];
    for (std::sregex_iterator it(labels.begin(), labels.end(), kLabel), end; it != end; ++it) {
      s.labels[(*it)[1]] = (*it)[2];
    }
    out.push_back(s);
  }
  return out;
}

const Sample* Find(const std::vector<Sample>& samples, const std::string& name,
                   const std::map<std::string, std::string>& labels = {}) {
  for (const auto& s : samples) {
    if (s.name != name) continue;
    bool ok = true;
    for (const auto& [k, v] : labels) {
      auto it = s.labels.find(k);
      ok = ok && it != s.labels.end() && it->second == v;
    }
    if (ok) return &s;
  }
  return nullptr;
}

// GET/HEAD/POST over loopback; returns the raw response.
// Value of the sample; fails the test (and returns NaN) if it is absent.
double ValueOf(const std::vector<Sample>& samples, const std::string& name,
               const std::map<std::string, std::string>& labels = {}) {
  const Sample* s = Find(samples, name, labels);
  if (s == nullptr) {
    ADD_FAILURE() << "no sample " << name;
    return NAN;
  }
  return s->value;
}

std::string Http(int port, const std::string& request) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  EXPECT_GE(fd, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  EXPECT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  size_t sent = 0;
  while (sent < request.size()) {
    const ssize_t n = ::send(fd, request.data() + sent, request.size() - sent, MSG_NOSIGNAL);
    if (n <= 0) break;
    sent += static_cast<size_t>(n);
  }
  std::string resp;
  char buf[4096];
  for (;;) {
    const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n <= 0) break;
    resp.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  return resp;
}

std::string Body(const std::string& resp) {
  const size_t p = resp.find("\r\n\r\n");
  return p == std::string::npos ? "" : resp.substr(p + 4);
}

TEST(MetricsTest, CounterGaugeHistogramValues) {
  Counter c;
  c.Inc();
  c.Inc(2.5);
  c.Inc(-7);  // ignored: counters never go down
  EXPECT_DOUBLE_EQ(c.Value(), 3.5);
  c.SetMonotonic(10);
  c.SetMonotonic(4);
  EXPECT_DOUBLE_EQ(c.Value(), 10);
  Gauge g;
  g.Set(5);
  g.Inc(2);
  g.Dec(4);
  EXPECT_DOUBLE_EQ(g.Value(), 3);
  Histogram h({0.1, 1, 10});
  for (double v : {0.05, 0.1, 0.5, 5.0, 50.0}) h.Observe(v);
  const auto s = h.Collect();
  ASSERT_EQ(s.cumulative.size(), 4u);
  EXPECT_EQ(s.cumulative[0], 2u);  // le=0.1 includes 0.1 itself
  EXPECT_EQ(s.cumulative[1], 3u);
  EXPECT_EQ(s.cumulative[2], 4u);
  EXPECT_EQ(s.cumulative[3], 5u);
  EXPECT_EQ(s.count, 5u);
  EXPECT_DOUBLE_EQ(s.sum, 55.65);
}

TEST(MetricsTest, FormatsValuesAndEscapes) {
  EXPECT_EQ(FormatValue(0), "0");
  EXPECT_EQ(FormatValue(42), "42");
  EXPECT_EQ(FormatValue(-3), "-3");
  EXPECT_EQ(FormatValue(0.001), "0.001");
  EXPECT_EQ(FormatValue(1e20), "1e+20");
  EXPECT_EQ(FormatValue(INFINITY), "+Inf");
  EXPECT_EQ(FormatValue(-INFINITY), "-Inf");
  EXPECT_EQ(FormatValue(NAN), "NaN");
  EXPECT_EQ(ParseValue(FormatValue(0.1 + 0.2)), 0.1 + 0.2);  // shortest round trip
  EXPECT_EQ(EscapeLabelValue("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
  EXPECT_TRUE(ValidMetricName("kvbuffer_requests_total"));
  EXPECT_TRUE(ValidMetricName("a:b_c9"));
  EXPECT_FALSE(ValidMetricName("9abc"));
  EXPECT_FALSE(ValidMetricName("a-b"));
  EXPECT_FALSE(ValidLabelName("__reserved"));
  EXPECT_FALSE(ValidLabelName("a:b"));
}

TEST(MetricsTest, RendersTextFormatExactly) {
  Registry r;
  auto& req = r.AddCounter("x_requests_total", "Requests.\nSecond line \\ here", {"rpc", "code"});
  req.Labels({"Prefill", "OK"}).Inc(3);
  req.Labels({"Prefill", "NOT_FOUND"}).Inc();
  r.AddGauge("x_level", "A level.").Get().Set(1.5);
  auto& h = r.AddHistogram("x_seconds", "Latency.", {"rpc"}, {0.5, 1});
  h.Labels({"a\"b"}).Observe(0.7);
  const std::string want =
      "# HELP x_requests_total Requests.\\nSecond line \\\\ here\n"
      "# TYPE x_requests_total counter\n"
      "x_requests_total{rpc=\"Prefill\",code=\"NOT_FOUND\"} 1\n"
      "x_requests_total{rpc=\"Prefill\",code=\"OK\"} 3\n"
      "# HELP x_level A level.\n"
      "# TYPE x_level gauge\n"
      "x_level 1.5\n"
      "# HELP x_seconds Latency.\n"
      "# TYPE x_seconds histogram\n"
      "x_seconds_bucket{rpc=\"a\\\"b\",le=\"0.5\"} 0\n"
      "x_seconds_bucket{rpc=\"a\\\"b\",le=\"1\"} 1\n"
      "x_seconds_bucket{rpc=\"a\\\"b\",le=\"+Inf\"} 1\n"
      "x_seconds_sum{rpc=\"a\\\"b\"} 0.7\n"
      "x_seconds_count{rpc=\"a\\\"b\"} 1\n";
  EXPECT_EQ(r.Render(), want);
}

TEST(MetricsTest, ConcurrentUpdatesAreExact) {
  Registry r;
  ServiceMetrics m(&r);
  constexpr int kThreads = 4;
  constexpr int kPerThread = 20000;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&m, t] {
      for (int i = 0; i < kPerThread; ++i) {
        m.ObserveRequest(i % 2 ? Rpc::kDecodeStep : Rpc::kPrefill, (i % 10 == 0) ? 5 : 0,
                         1e-4 * (t + 1));
        m.AddBytes(10, 20);
      }
    });
  }
  std::string last;
  for (int i = 0; i < 20; ++i) last = r.Render();  // scrapes race with updates
  for (auto& th : threads) th.join();
  const auto samples = Parse(r.Render(), nullptr);
  double total = 0;
  for (const auto& s : samples) {
    if (s.name == "kvbuffer_requests_total") total += s.value;
  }
  EXPECT_EQ(total, kThreads * kPerThread);
  const Sample* nf =
      Find(samples, "kvbuffer_requests_total", {{"rpc", "Prefill"}, {"code", "NOT_FOUND"}});
  ASSERT_NE(nf, nullptr);
  EXPECT_EQ(nf->value, kThreads * kPerThread / 10);
  EXPECT_EQ(ValueOf(samples, "kvbuffer_bytes_received_total"), 10.0 * kThreads * kPerThread);
  EXPECT_EQ(ValueOf(samples, "kvbuffer_bytes_sent_total"), 20.0 * kThreads * kPerThread);
  const Sample* cnt =
      Find(samples, "kvbuffer_request_duration_seconds_count", {{"rpc", "DecodeStep"}});
  ASSERT_NE(cnt, nullptr);
  EXPECT_EQ(cnt->value, kThreads * kPerThread / 2);
}

TEST(MetricsHttpTest, ScrapesServiceMetricsOverLoopback) {
  Registry r;
  ServiceMetrics m(&r);
  m.SetBuildInfo("0.1.0", "cpu", "tiny");
  int scrapes = 0;
  m.CollectFrom([&scrapes] {
    ++scrapes;
    EngineGauges g;
    g.open_sequences = 3;
    g.state_slots_used = 1;
    g.state_slots_free = 63;
    g.buffer_pages_used = 5;
    g.buffer_pages_free = 1019;
    g.conv_slots_used = 3;
    g.conv_slots_free = 253;
    g.pool_bytes = 123456;
    g.flushes = 7;
    g.drafts_verified = 12;
    g.drafts_accepted = 9;
    return g;
  });
  m.ObserveRequest(Rpc::kPrefill, 0, 0.002);
  m.ObserveRequest(Rpc::kPrefill, 0, 0.004);
  m.ObserveRequest(Rpc::kDecodeStep, 9, 0.0001);  // FAILED_PRECONDITION
  m.ObserveRequest("Flush", 5, 0.0001);           // by name: NOT_FOUND
  m.ObserveRequest("NoSuchRpc", 0, 0.0001);       // ignored
  m.AddBytes(1000, 2000);

  MetricsHttpServer server(&r);
  std::string error;
  ASSERT_TRUE(server.Start("127.0.0.1", 0, &error)) << error;
  ASSERT_GT(server.port(), 0);

  const std::string resp = Http(server.port(), "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
  ASSERT_EQ(resp.rfind("HTTP/1.1 200 OK\r\n", 0), 0u) << resp.substr(0, 200);
  EXPECT_NE(resp.find("Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"),
            std::string::npos);
  const std::string body = Body(resp);
  EXPECT_NE(resp.find("Content-Length: " + std::to_string(body.size()) + "\r\n"),
            std::string::npos);
  std::map<std::string, std::string> types;
  const auto samples = Parse(body, &types);
  EXPECT_EQ(scrapes, 1);

  EXPECT_EQ(types["kvbuffer_requests_total"], "counter");
  EXPECT_EQ(types["kvbuffer_request_duration_seconds"], "histogram");
  EXPECT_EQ(types["kvbuffer_active_sequences"], "gauge");
  EXPECT_EQ(types["kvbuffer_flushes_total"], "counter");
  EXPECT_EQ(ValueOf(samples, "kvbuffer_requests_total", {{"rpc", "Prefill"}, {"code", "OK"}}), 2);
  EXPECT_EQ(ValueOf(samples, "kvbuffer_requests_total",
                    {{"rpc", "DecodeStep"}, {"code", "FAILED_PRECONDITION"}}),
            1);
  EXPECT_EQ(ValueOf(samples, "kvbuffer_requests_total", {{"rpc", "Flush"}, {"code", "NOT_FOUND"}}),
            1);
  EXPECT_EQ(Find(samples, "kvbuffer_requests_total", {{"rpc", "NoSuchRpc"}}), nullptr);
  EXPECT_EQ(ValueOf(samples, "kvbuffer_active_sequences"), 3);
  EXPECT_EQ(ValueOf(samples, "kvbuffer_state_slots", {{"state", "used"}}), 1);
  EXPECT_EQ(ValueOf(samples, "kvbuffer_state_slots", {{"state", "free"}}), 63);
  EXPECT_EQ(ValueOf(samples, "kvbuffer_buffer_pages", {{"state", "used"}}), 5);
  EXPECT_EQ(ValueOf(samples, "kvbuffer_buffer_pages", {{"state", "free"}}), 1019);
  EXPECT_EQ(ValueOf(samples, "kvbuffer_flushes_total"), 7);
  EXPECT_EQ(ValueOf(samples, "kvbuffer_drafts_verified_total"), 12);
  EXPECT_EQ(ValueOf(samples, "kvbuffer_drafts_accepted_total"), 9);
  EXPECT_EQ(ValueOf(samples, "kvbuffer_bytes_received_total"), 1000);
  EXPECT_EQ(ValueOf(samples, "kvbuffer_bytes_sent_total"), 2000);
  EXPECT_EQ(ValueOf(samples, "kvbuffer_device_memory_bytes", {{"kind", "pool"}}), 123456);
  EXPECT_EQ(ValueOf(samples, "kvbuffer_build_info", {{"backend", "cpu"}, {"model", "tiny"}}), 1);
  EXPECT_GT(ValueOf(samples, "kvbuffer_process_memory_bytes", {{"kind", "resident"}}), 1 << 20);
  if (ReadProcessMemory().heap_in_use_bytes >= 0) {
    EXPECT_GT(ValueOf(samples, "kvbuffer_process_memory_bytes", {{"kind", "heap_in_use"}}), 0);
  } else {
    EXPECT_EQ(Find(samples, "kvbuffer_process_memory_bytes", {{"kind", "heap_in_use"}}), nullptr);
  }

  // Histogram: buckets cumulative, ascending le, +Inf equal to _count, sum right.
  double prev_le = -INFINITY, prev_count = 0;
  int buckets = 0;
  for (const auto& s : samples) {
    if (s.name != "kvbuffer_request_duration_seconds_bucket" || s.labels.at("rpc") != "Prefill") {
      continue;
    }
    const double le = ParseValue(s.labels.at("le"));
    EXPECT_GT(le, prev_le);
    EXPECT_GE(s.value, prev_count);
    prev_le = le;
    prev_count = s.value;
    ++buckets;
  }
  EXPECT_GT(buckets, 5);
  EXPECT_TRUE(std::isinf(prev_le));
  EXPECT_EQ(prev_count,
            ValueOf(samples, "kvbuffer_request_duration_seconds_count", {{"rpc", "Prefill"}}));
  EXPECT_NEAR(ValueOf(samples, "kvbuffer_request_duration_seconds_sum", {{"rpc", "Prefill"}}),
              0.006, 1e-12);
  EXPECT_EQ(ValueOf(samples, "kvbuffer_request_duration_seconds_bucket",
                    {{"rpc", "Prefill"}, {"le", "0.001"}}),
            0);
  EXPECT_EQ(ValueOf(samples, "kvbuffer_request_duration_seconds_bucket",
                    {{"rpc", "Prefill"}, {"le", "0.005"}}),
            2);

  // Query strings are ignored; HEAD has headers only; anything else is 404.
  EXPECT_EQ(Http(server.port(), "GET /metrics?x=1 HTTP/1.0\r\n\r\n").rfind("HTTP/1.1 200", 0), 0u);
  const std::string head = Http(server.port(), "HEAD /metrics HTTP/1.1\r\n\r\n");
  EXPECT_EQ(head.rfind("HTTP/1.1 200", 0), 0u);
  EXPECT_EQ(Body(head), "");
  EXPECT_EQ(Http(server.port(), "GET / HTTP/1.1\r\n\r\n").rfind("HTTP/1.1 404", 0), 0u);
  EXPECT_EQ(Http(server.port(), "GET /metricsx HTTP/1.1\r\n\r\n").rfind("HTTP/1.1 404", 0), 0u);
  EXPECT_EQ(Http(server.port(), "POST /metrics HTTP/1.1\r\n\r\n").rfind("HTTP/1.1 404", 0), 0u);
  EXPECT_EQ(Http(server.port(), "garbage\r\n\r\n").rfind("HTTP/1.1 400", 0), 0u);
  EXPECT_EQ(Http(server.port(), std::string(10000, 'A')).rfind("HTTP/1.1 431", 0), 0u);

  // Scrapes keep working while the hot path updates from other threads.
  std::atomic<bool> stop{false};
  std::thread writer([&] {
    while (!stop.load()) m.ObserveRequest(Rpc::kVerifyDrafts, 0, 1e-3);
  });
  for (int i = 0; i < 20; ++i) {
    const std::string r2 = Http(server.port(), "GET /metrics HTTP/1.1\r\n\r\n");
    ASSERT_EQ(r2.rfind("HTTP/1.1 200", 0), 0u);
    Parse(Body(r2), nullptr);
  }
  stop = true;
  writer.join();
  server.Stop();
  server.Stop();  // idempotent
  EXPECT_GE(server.requests_served(), 28u);
}

TEST(ProcessMemoryTest, HeapAndResidentFollowAnAllocation) {
  const ProcessMemory before = ReadProcessMemory();
  ASSERT_GT(before.resident_bytes, 0);
  constexpr size_t kBytes = size_t{64} << 20;
  std::vector<char> block(kBytes, 1);  // written, so resident
  const ProcessMemory held = ReadProcessMemory();
  EXPECT_GE(held.resident_bytes, before.resident_bytes + static_cast<int64_t>(kBytes) / 2);
  block.clear();
  block.shrink_to_fit();
  const ProcessMemory after = ReadProcessMemory();
  if (before.heap_in_use_bytes < 0) {
    EXPECT_EQ(held.heap_in_use_bytes, -1);
    GTEST_SKIP() << "the allocator (a sanitizer's) does not report heap in use";
  }
  EXPECT_GE(held.heap_in_use_bytes, before.heap_in_use_bytes + static_cast<int64_t>(kBytes));
  EXPECT_LT(after.heap_in_use_bytes, held.heap_in_use_bytes - static_cast<int64_t>(kBytes) / 2);
}

TEST(MetricsHttpTest, ReportsBindFailure) {
  Registry r;
  MetricsHttpServer a(&r);
  std::string error;
  ASSERT_TRUE(a.Start("127.0.0.1", 0, &error)) << error;
  MetricsHttpServer b(&r);
  EXPECT_FALSE(b.Start("127.0.0.1", a.port(), &error));
  EXPECT_NE(error.find("cannot listen"), std::string::npos) << error;
}

}  // namespace
}  // namespace kvbuffer::metrics
