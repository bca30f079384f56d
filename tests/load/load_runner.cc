#include "tests/load/load_runner.h"

#include <algorithm>
#include <atomic>
#include <fstream>
#include <sstream>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "client/cpp/kvbuffer_client.h"

namespace kvbuffer::load {

int64_t ReadRssKb(pid_t pid) {
  if (pid <= 0) return -1;
  std::ifstream in(absl::StrCat("/proc/", pid, "/status"));
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("VmRSS:", 0) == 0) {
      std::istringstream fields(line.substr(6));
      int64_t kb = -1;
      fields >> kb;
      return kb;
    }
  }
  return -1;
}

absl::StatusOr<std::unique_ptr<testing::ChildServer>> StartLoadServer(
    LoadOptions* o, const std::vector<std::string>& extra_args) {
  const int32_t seqs = o->sessions * o->batch;
  std::vector<std::string> args = {absl::StrCat("--max_sequences=", seqs + 8),
                                   absl::StrCat("--state_slots=", seqs + 8),
                                   absl::StrCat("--buffer_pages=", 6 * seqs), "--metrics_port=0"};
  args.insert(args.end(), extra_args.begin(), extra_args.end());
  absl::StatusOr<std::unique_ptr<testing::ChildServer>> server = testing::ChildServer::Start(args);
  if (!server.ok()) return server.status();
  absl::StatusOr<std::string> line = (*server)->ReadStdoutLine(absl::Seconds(30));
  if (!line.ok()) return line.status();
  // "metrics on http://127.0.0.1:PORT/metrics"
  const size_t colon = line->rfind(':');
  const size_t slash = line->rfind("/metrics");
  int port = -1;
  if (line->rfind("metrics on http://", 0) != 0 || colon == std::string::npos ||
      slash == std::string::npos || slash <= colon ||
      !absl::SimpleAtoi(line->substr(colon + 1, slash - colon - 1), &port)) {
    return absl::InternalError(
        absl::StrCat("expected \"metrics on http://HOST:PORT/metrics\" from "
                     "the server, got \"",
                     *line, "\""));
  }
  o->server = (*server)->address();
  o->server_pid = (*server)->pid();
  o->metrics_port = port;
  return server;
}

absl::StatusOr<int64_t> ReadHeapInUseKb(int port) {
  absl::StatusOr<std::string> page = testing::HttpGet(port, "/metrics");
  if (!page.ok()) return page.status();
  static constexpr std::string_view kSample =
      "\nkvbuffer_process_memory_bytes{kind=\"heap_in_use\"} ";
  const size_t at = page->find(kSample);
  if (at == std::string::npos) return -1;
  const size_t begin = at + kSample.size();
  const size_t end = page->find('\n', begin);
  double bytes = 0;
  if (!absl::SimpleAtod(page->substr(begin, end - begin), &bytes)) {
    return absl::InternalError(
        absl::StrCat("unreadable heap_in_use sample: ", page->substr(at + 1, end - at - 1)));
  }
  return static_cast<int64_t>(bytes / 1024);
}

absl::StatusOr<LoadResult> RunLoad(const LoadOptions& o) {
  LoadResult result;
  result.options = o;
  auto client = client::Client::Connect(o.server);
  if (absl::Status s = client->WaitUntilReady(absl::Seconds(30)); !s.ok()) return s;
  for (int32_t pass = 0; pass < o.passes; ++pass) {
    PassResult p;
    // Sample the server's RSS while the pass runs.
    std::atomic<bool> done{false};
    std::atomic<int64_t> peak{ReadRssKb(o.server_pid)};
    std::thread sampler([&] {
      while (!done.load()) {
        const int64_t kb = ReadRssKb(o.server_pid);
        int64_t seen = peak.load();
        while (kb > seen && !peak.compare_exchange_weak(seen, kb)) {
        }
        absl::SleepFor(absl::Milliseconds(100));
      }
    });
    mock::MockSessionOptions m;
    m.server = o.server;
    m.mode = "stream";
    m.concurrency = o.sessions;
    m.rounds = o.rounds;
    m.batch = o.batch;
    m.steps = o.steps;
    m.max_prompt = o.max_prompt;
    m.verify_fraction = o.verify_fraction;
    m.seed = o.seed + static_cast<uint64_t>(pass) * 1000;
    m.id_base = (static_cast<uint64_t>(pass) + 1) << 40;
    absl::StatusOr<mock::MockSessionReport> report = mock::RunMockSession(m);
    done = true;
    sampler.join();
    if (!report.ok()) return report.status();
    p.report = *std::move(report);
    p.rss_kb = ReadRssKb(o.server_pid);
    p.rss_peak_kb = std::max(peak.load(), p.rss_kb);
    if (o.metrics_port > 0) {
      absl::StatusOr<int64_t> heap = ReadHeapInUseKb(o.metrics_port);
      if (!heap.ok()) return heap.status();
      p.heap_kb = *heap;
    }
    absl::StatusOr<v1::GetServerInfoResponse> info = client->GetServerInfo();
    if (!info.ok()) return info.status();
    const v1::Capacity& cap = info->capacity();
    p.open_sequences = cap.open_sequences();
    p.free_state_slots = cap.free_state_slots();
    p.state_slots = cap.state_slots();
    p.free_buffer_pages = cap.free_buffer_pages();
    p.buffer_pages = cap.buffer_pages();
    const std::string where = absl::StrCat("pass ", pass + 1, ": ");
    if (!p.report.ok()) {
      result.failures.push_back(absl::StrCat(where, p.report.mismatches, " mismatch(es) ",
                                             p.report.first_mismatch, " ", p.report.first_error));
    }
    if (p.report.checks == 0) result.failures.push_back(where + "no output was checked");
    if (p.open_sequences != 0 || p.free_state_slots != p.state_slots ||
        p.free_buffer_pages != p.buffer_pages) {
      result.failures.push_back(
          absl::StrCat(where, "after every sequence closed: ", p.open_sequences,
                       " open, state slots ", p.free_state_slots, "/", p.state_slots,
                       " free, pages ", p.free_buffer_pages, "/", p.buffer_pages, " free"));
    }
    result.passes.push_back(std::move(p));
  }
  // Growth from the end of the warm-up passes to the end of the last, against a slack.
  const size_t warm = static_cast<size_t>(std::max(o.warmup_passes, 1));
  const auto check_growth = [&result, warm](const char* what, int64_t first, int64_t last,
                                            int64_t slack_kb, double slack_fraction) {
    const int64_t allowed =
        std::max<int64_t>(slack_kb, static_cast<int64_t>(first * slack_fraction));
    if (first <= 0 || last - first > allowed) {
      result.failures.push_back(absl::StrCat(
          "server ", what, " grew from ", first, " KiB after pass ", warm, " to ", last,
          " KiB after pass ", result.passes.size(), " (more than ", allowed, " KiB)"));
    }
  };
  if (result.passes.size() > warm) {
    const PassResult& first = result.passes[warm - 1];
    const PassResult& last = result.passes.back();
    if (o.server_pid > 0) {
      check_growth("RSS", first.rss_kb, last.rss_kb, o.rss_slack_kb, o.rss_slack_fraction);
    }
    if (first.heap_kb >= 0) {
      check_growth("heap in use", first.heap_kb, last.heap_kb, o.heap_slack_kb,
                   o.heap_slack_fraction);
    }
  }
  return result;
}

std::string FormatLoadResult(const LoadResult& r) {
  const LoadOptions& o = r.options;
  std::string out = absl::StrFormat(
      "load: %d Stream sessions x %d rounds x %d passes, batch %d, sequences of <= %d steps, "
      "prompts <= %d, verify fraction %.2f\n\n",
      o.sessions, o.rounds, o.passes, o.batch, o.steps, o.max_prompt, o.verify_fraction);
  absl::StrAppend(
      &out,
      "| pass | sequences | prefill tok | decode tok | drafts (acc.) | calls | checks | "
      "mismatches | max rel err | open after | free slots | free pages | RSS MiB "
      "(peak) | heap MiB | wall s | tok/s |\n|---|---|---|---|---|---|---|---|---|---|---|---|---"
      "|---|---|---|\n");
  for (size_t i = 0; i < r.passes.size(); ++i) {
    const PassResult& p = r.passes[i];
    const mock::MockSessionReport& m = p.report;
    const double wall = absl::ToDoubleSeconds(m.wall);
    absl::StrAppendFormat(
        &out,
        "| %d | %d | %d | %d | %d (%d) | %d | %d | %d | %.2g | %d | %d/%d | %d/%d | %.1f (%.1f) | "
        "%s | %.1f | %.0f |\n",
        i + 1, m.sequences, m.prefill_tokens, m.decode_tokens, m.drafts_verified, m.drafts_accepted,
        m.latencies.total_calls(), m.checks, m.mismatches, m.max_relative_error, p.open_sequences,
        p.free_state_slots, p.state_slots, p.free_buffer_pages, p.buffer_pages, p.rss_kb / 1024.0,
        p.rss_peak_kb / 1024.0,
        p.heap_kb >= 0 ? absl::StrFormat("%.2f", p.heap_kb / 1024.0) : std::string("-"), wall,
        wall > 0 ? (m.prefill_tokens + m.decode_tokens + m.drafts_verified) / wall : 0.0);
  }
  if (!r.passes.empty()) {
    const mock::MockSessionReport& last = r.passes.back().report;
    absl::StrAppend(&out, "\nclient-side latency, last pass (every call of every session):\n\n",
                    "| rpc | calls | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|\n");
    for (const auto& [rpc, s] : last.latencies.Summarize()) {
      absl::StrAppendFormat(&out, "| %s | %d | %.3f | %.3f | %.3f |\n", rpc, s.calls, s.p50_ms,
                            s.p99_ms, s.max_ms);
    }
    const double wall = absl::ToDoubleSeconds(last.wall);
    absl::StrAppendFormat(
        &out, "\nthroughput, last pass: %.0f calls/s, %.0f tokens/s\n",
        wall > 0 ? last.latencies.total_calls() / wall : 0.0,
        wall > 0 ? (last.prefill_tokens + last.decode_tokens + last.drafts_verified) / wall : 0.0);
  }
  absl::StrAppend(&out, r.ok() ? "\nverdict: HELD\n" : "\nverdict: FAILED\n");
  for (const std::string& f : r.failures) absl::StrAppend(&out, "  - ", f, "\n");
  return out;
}

}  // namespace kvbuffer::load
