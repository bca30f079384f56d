#include "service/server/metrics/service_metrics.h"

#include "service/server/metrics/process_memory.h"

namespace kvbuffer::metrics {

std::string_view RpcName(Rpc rpc) {
  static constexpr std::string_view kNames[kNumRpcs] = {
      "GetServerInfo", "OpenSequences", "CloseSequences", "Prefill", "DecodeStep",
      "VerifyDrafts",  "CommitDrafts",  "Flush",          "Stream"};
  const int i = static_cast<int>(rpc);
  return i >= 0 && i < kNumRpcs ? kNames[i] : std::string_view("unknown");
}

bool RpcFromName(std::string_view name, Rpc* rpc) {
  for (int i = 0; i < kNumRpcs; ++i) {
    if (RpcName(static_cast<Rpc>(i)) == name) {
      *rpc = static_cast<Rpc>(i);
      return true;
    }
  }
  return false;
}

std::string_view CodeName(int grpc_code) {
  static constexpr std::string_view kNames[kNumCodes] = {"OK",
                                                         "CANCELLED",
                                                         "UNKNOWN",
                                                         "INVALID_ARGUMENT",
                                                         "DEADLINE_EXCEEDED",
                                                         "NOT_FOUND",
                                                         "ALREADY_EXISTS",
                                                         "PERMISSION_DENIED",
                                                         "RESOURCE_EXHAUSTED",
                                                         "FAILED_PRECONDITION",
                                                         "ABORTED",
                                                         "OUT_OF_RANGE",
                                                         "UNIMPLEMENTED",
                                                         "INTERNAL",
                                                         "UNAVAILABLE",
                                                         "DATA_LOSS",
                                                         "UNAUTHENTICATED"};
  return grpc_code >= 0 && grpc_code < kNumCodes ? kNames[grpc_code] : std::string_view("UNKNOWN");
}

ServiceMetrics::ServiceMetrics(Registry* registry) : registry_(registry) {
  Registry& r = *registry;
  requests_ = &r.AddCounter("kvbuffer_requests_total",
                            "Calls finished, by RPC (Stream messages by their call) and gRPC code.",
                            {"rpc", "code"});
  duration_family_ =
      &r.AddHistogram("kvbuffer_request_duration_seconds", "Server-side duration of calls, by RPC.",
                      {"rpc"}, DefaultLatencyBuckets());
  for (int i = 0; i < kNumRpcs; ++i) {
    durations_[i] = &duration_family_->Labels({std::string(RpcName(static_cast<Rpc>(i)))});
  }
  active_sequences_ = &r.AddGauge("kvbuffer_active_sequences", "Open sequences.").Get();
  auto& slots = r.AddGauge("kvbuffer_state_slots",
                           "State pool slots (one sequence's states on every layer).", {"state"});
  state_used_ = &slots.Labels({"used"});
  state_free_ = &slots.Labels({"free"});
  auto& pages = r.AddGauge("kvbuffer_buffer_pages",
                           "Buffer pool pages (page_tokens rows on every layer).", {"state"});
  pages_used_ = &pages.Labels({"used"});
  pages_free_ = &pages.Labels({"free"});
  auto& conv =
      r.AddGauge("kvbuffer_conv_slots", "Conv window slots (one per open sequence).", {"state"});
  conv_used_ = &conv.Labels({"used"});
  conv_free_ = &conv.Labels({"free"});
  flushes_ = &r.AddCounter("kvbuffer_flushes_total",
                           "Folds of a buffer into a state (per sequence and layer).")
                  .Get();
  drafts_verified_ =
      &r.AddCounter("kvbuffer_drafts_verified_total", "Draft tokens verified.").Get();
  drafts_accepted_ =
      &r.AddCounter("kvbuffer_drafts_accepted_total", "Draft tokens accepted by CommitDrafts.")
           .Get();
  bytes_received_ =
      &r.AddCounter("kvbuffer_bytes_received_total", "Request payload bytes received.").Get();
  bytes_sent_ = &r.AddCounter("kvbuffer_bytes_sent_total", "Response payload bytes sent.").Get();
  auto& mem = r.AddGauge("kvbuffer_device_memory_bytes",
                         "Memory: pool (allocated by the pools), total and free (of the device).",
                         {"kind"});
  mem_pool_ = &mem.Labels({"pool"});
  mem_total_ = &mem.Labels({"total"});
  mem_free_ = &mem.Labels({"free"});
  auto& process = r.AddGauge(
      "kvbuffer_process_memory_bytes",
      "The server process: resident (RSS) and heap_in_use (allocated by malloc, not yet freed; "
      "absent under sanitizers).",
      {"kind"});
  const ProcessMemory now = ReadProcessMemory();
  process_resident_ = now.resident_bytes >= 0 ? &process.Labels({"resident"}) : nullptr;
  process_heap_ = now.heap_in_use_bytes >= 0 ? &process.Labels({"heap_in_use"}) : nullptr;
  r.AddCollectHook([this] {
    const ProcessMemory m = ReadProcessMemory();
    if (process_resident_ != nullptr && m.resident_bytes >= 0) {
      process_resident_->Set(static_cast<double>(m.resident_bytes));
    }
    if (process_heap_ != nullptr && m.heap_in_use_bytes >= 0) {
      process_heap_->Set(static_cast<double>(m.heap_in_use_bytes));
    }
  });
  build_info_ = &r.AddGauge("kvbuffer_build_info", "Version, backend and model; value 1.",
                            {"version", "backend", "model"});
}

void ServiceMetrics::ObserveRequest(Rpc rpc, int grpc_code, double seconds) {
  const int ri = static_cast<int>(rpc);
  if (ri < 0 || ri >= kNumRpcs) return;
  const int ci = grpc_code >= 0 && grpc_code < kNumCodes ? grpc_code : kNumCodes;
  std::atomic<Counter*>& slot = request_counters_[ri][ci];
  Counter* c = slot.load(std::memory_order_acquire);
  if (c == nullptr) {
    c = &requests_->Labels({std::string(RpcName(rpc)), std::string(CodeName(grpc_code))});
    slot.store(c, std::memory_order_release);
  }
  c->Inc();
  durations_[ri]->Observe(seconds);
}

void ServiceMetrics::SetEngine(const EngineGauges& g) {
  active_sequences_->Set(static_cast<double>(g.open_sequences));
  state_used_->Set(static_cast<double>(g.state_slots_used));
  state_free_->Set(static_cast<double>(g.state_slots_free));
  pages_used_->Set(static_cast<double>(g.buffer_pages_used));
  pages_free_->Set(static_cast<double>(g.buffer_pages_free));
  conv_used_->Set(static_cast<double>(g.conv_slots_used));
  conv_free_->Set(static_cast<double>(g.conv_slots_free));
  mem_pool_->Set(static_cast<double>(g.pool_bytes));
  mem_total_->Set(static_cast<double>(g.device_total_bytes));
  mem_free_->Set(static_cast<double>(g.device_free_bytes));
  flushes_->SetMonotonic(static_cast<double>(g.flushes));
  drafts_verified_->SetMonotonic(static_cast<double>(g.drafts_verified));
  drafts_accepted_->SetMonotonic(static_cast<double>(g.drafts_accepted));
}

void ServiceMetrics::CollectFrom(std::function<EngineGauges()> fill) {
  registry_->AddCollectHook([this, fill = std::move(fill)] { SetEngine(fill()); });
}

void ServiceMetrics::SetBuildInfo(const std::string& version, const std::string& backend,
                                  const std::string& model) {
  build_info_->Labels({version, backend, model}).Set(1);
}

}  // namespace kvbuffer::metrics
