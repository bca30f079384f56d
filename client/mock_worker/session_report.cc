#include "client/mock_worker/session_report.h"

#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"

namespace kvbuffer::mock {

namespace {

std::string Bytes(int64_t b) {
  if (b >= (int64_t{1} << 30)) return absl::StrFormat("%.2f GiB", b / double(int64_t{1} << 30));
  if (b >= (int64_t{1} << 20)) return absl::StrFormat("%.2f MiB", b / double(int64_t{1} << 20));
  if (b >= (int64_t{1} << 10)) return absl::StrFormat("%.1f KiB", b / 1024.0);
  return absl::StrCat(b, " B");
}

}  // namespace

std::string FormatReport(const MockSessionReport& r) {
  const MockSessionOptions& o = r.options;
  const v1::GetServerInfoResponse& info = r.info_before;
  const v1::ModelShapes& m = info.model();
  const v1::Capacity& cap = r.info_after.has_capacity() ? r.info_after.capacity() : info.capacity();
  std::string out;
  absl::StrAppend(&out, "kvbuffer-mock-worker: ", r.ok() ? "PASS" : "FAIL", "\n");
  absl::StrAppendFormat(&out,
                        "server      %s: kvbuffer %s, backend %s, model %s (L=%d H=%d HV=%d K=%d "
                        "V=%d W=%d), C=%d, stateless_limit=%d, max_drafts=%d\n",
                        o.servers.empty() ? o.server : "routed over " + o.servers, info.version(),
                        info.backend(), m.name(), m.num_layers(), m.num_k_heads(), m.num_v_heads(),
                        m.head_k_dim(), m.head_v_dim(), m.conv_width(),
                        info.buffer().flush_interval(), info.buffer().stateless_limit(),
                        info.buffer().max_drafts());
  absl::StrAppendFormat(
      &out,
      "session     mode %s, %d worker(s) x %s (batch %d), layers %d of "
      "%d, seed %d, steps <= %d, prompts <= %d, %s\n",
      o.mode, o.concurrency,
      o.rounds > 0 ? absl::StrCat(o.rounds, " rounds") : absl::StrCat(o.sequences, " sequences"),
      o.batch, r.layers_played, m.num_layers(), o.seed, o.steps, o.max_prompt,
      absl::FormatDuration(absl::Trunc(r.wall, absl::Milliseconds(1))));
  absl::StrAppendFormat(&out, "sequences   %d (%d with prompts under the stateless limit)\n",
                        r.sequences, r.short_prompts);
  absl::StrAppendFormat(&out,
                        "tokens      prefill %d, decode %d, drafts verified %d (accepted %d), "
                        "flushed %d time(s), %d replayed answer(s)\n",
                        r.prefill_tokens, r.decode_tokens, r.drafts_verified, r.drafts_accepted,
                        r.flushes, r.replayed_answers);
  absl::StrAppendFormat(&out, "calls       %d\n", r.latencies.total_calls());
  const double seconds = absl::ToDoubleSeconds(r.wall);
  if (seconds > 0) {
    absl::StrAppendFormat(
        &out, "throughput  %.0f tokens/s (prefill + decode + drafts verified), %.0f calls/s\n",
        static_cast<double>(r.prefill_tokens + r.decode_tokens + r.drafts_verified) / seconds,
        static_cast<double>(r.latencies.total_calls()) / seconds);
  }
  absl::StrAppendFormat(&out, "latency     %-15s %8s %10s %10s %10s\n", "rpc", "calls", "p50 ms",
                        "p99 ms", "max ms");
  for (const auto& [rpc, s] : r.latencies.Summarize()) {
    absl::StrAppendFormat(&out, "            %-15s %8d %10.3f %10.3f %10.3f\n", rpc, s.calls,
                          s.p50_ms, s.p99_ms, s.max_ms);
  }
  absl::StrAppendFormat(&out,
                        "accuracy    max relative error %.3g vs fp64 oracle (tolerance %.3g), %d "
                        "mismatch(es) in %d checks\n",
                        r.max_relative_error, r.tolerance, r.mismatches, r.checks);
  absl::StrAppendFormat(
      &out,
      "memory      pool %s: state slots %d x %s (%d free), buffer pages %d x %s (%d free), "
      "sequences %d x %s conv (%d open)%s\n",
      Bytes(cap.pool_bytes()), cap.state_slots(), Bytes(cap.state_slot_bytes()),
      cap.free_state_slots(), cap.buffer_pages(), Bytes(cap.buffer_page_bytes()),
      cap.free_buffer_pages(), cap.max_sequences(), Bytes(cap.conv_slot_bytes()),
      cap.open_sequences(),
      cap.device_total_bytes() > 0 ? absl::StrCat(", device ", Bytes(cap.device_free_bytes()),
                                                  " free of ", Bytes(cap.device_total_bytes()))
                                   : std::string());
  for (const v1::CapacityEstimate& e : cap.estimates()) {
    absl::StrAppendFormat(&out,
                          "capacity    %d tokens, %d drafts: %s/sequence kvbuffer vs %s recurrent "
                          "(x%.2f); %d fit now\n",
                          e.length(), e.drafts(), Bytes(e.kvbuffer_bytes_per_sequence()),
                          Bytes(e.recurrent_bytes_per_sequence()), e.ratio(),
                          e.max_sequences_now());
  }
  if (r.info_after.has_counters()) {
    const v1::Counters& c = r.info_after.counters();
    absl::StrAppendFormat(&out,
                          "server     flushes %d, drafts verified %d, accepted %d (since start)\n",
                          c.flushes(), c.drafts_verified(), c.drafts_accepted());
  }
  if (!r.first_mismatch.empty()) absl::StrAppend(&out, "MISMATCH    ", r.first_mismatch, "\n");
  if (!r.first_error.empty()) absl::StrAppend(&out, "ERROR       ", r.first_error, "\n");
  return out;
}

}  // namespace kvbuffer::mock
