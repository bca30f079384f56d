// The KVBuffer server's metrics, named per Prometheus conventions:
//   kvbuffer_requests_total{rpc,code}              counter   calls finished, by RPC and gRPC code
//   kvbuffer_request_duration_seconds{rpc}         histogram server-side latency
//   kvbuffer_active_sequences                      gauge     open sequences
//   kvbuffer_state_slots{state="used|free"}        gauge     state pool
//   kvbuffer_buffer_pages{state="used|free"}       gauge     buffer page pool
//   kvbuffer_conv_slots{state="used|free"}         gauge     conv window pool
//   kvbuffer_flushes_total                         counter   folds of a buffer into a state
//   kvbuffer_drafts_verified_total                 counter   draft tokens verified
//   kvbuffer_drafts_accepted_total                 counter   draft tokens kept by CommitDrafts
//   kvbuffer_bytes_received_total                  counter   request payload bytes
//   kvbuffer_bytes_sent_total                      counter   response payload bytes
//   kvbuffer_device_memory_bytes{kind="pool|total|free"} gauge
//   kvbuffer_build_info{version,backend,model}     gauge     1
// Messages of a Stream count under their call's name (rpc="DecodeStep", ...); the stream itself
// counts once as rpc="Stream" when it ends. No engine or gRPC type appears here: the server fills
// EngineGauges from Engine::Info() and passes gRPC codes as ints.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>

#include "service/server/metrics/metrics.h"

namespace kvbuffer::metrics {

enum class Rpc : uint8_t {
  kGetServerInfo = 0,
  kOpenSequences,
  kCloseSequences,
  kPrefill,
  kDecodeStep,
  kVerifyDrafts,
  kCommitDrafts,
  kFlush,
  kStream,
};
inline constexpr int kNumRpcs = 9;
inline constexpr int kNumCodes = 17;  // grpc::StatusCode 0 (OK) .. 16 (UNAUTHENTICATED)

// "GetServerInfo", ..., "Stream".
std::string_view RpcName(Rpc rpc);
// The Rpc called `name` ("Prefill", ...); false if none is.
bool RpcFromName(std::string_view name, Rpc* rpc);
// "OK", "CANCELLED", ..., "UNAUTHENTICATED"; "UNKNOWN" outside 0..16.
std::string_view CodeName(int grpc_code);

// What the engine reports, as plain numbers (see Engine::Info()).
struct EngineGauges {
  int64_t open_sequences = 0;
  int64_t state_slots_used = 0;
  int64_t state_slots_free = 0;
  int64_t buffer_pages_used = 0;
  int64_t buffer_pages_free = 0;
  int64_t conv_slots_used = 0;
  int64_t conv_slots_free = 0;
  int64_t pool_bytes = 0;
  int64_t device_total_bytes = 0;  // 0 on the CPU backend
  int64_t device_free_bytes = 0;
  int64_t flushes = 0;  // engine totals since start (exported as counters)
  int64_t drafts_verified = 0;
  int64_t drafts_accepted = 0;
};

class ServiceMetrics {
 public:
  // Registers every family in `registry` (which must outlive this object).
  explicit ServiceMetrics(Registry* registry);

  // One call finished with `grpc_code` after `seconds`. Lock-free after the first call of each
  // (rpc, code) pair.
  void ObserveRequest(Rpc rpc, int grpc_code, double seconds);
  // The same by RPC name (as RunUnary has it); unknown names are ignored.
  void ObserveRequest(std::string_view rpc_name, int grpc_code, double seconds) {
    Rpc rpc;
    if (RpcFromName(rpc_name, &rpc)) ObserveRequest(rpc, grpc_code, seconds);
  }

  // Payload bytes of requests received and responses sent.
  void AddBytes(int64_t received, int64_t sent) {
    if (received > 0) bytes_received_->Inc(static_cast<double>(received));
    if (sent > 0) bytes_sent_->Inc(static_cast<double>(sent));
  }

  // Pool gauges and engine totals.
  void SetEngine(const EngineGauges& g);

  // Calls `fill` and SetEngine before every scrape (a Registry collect hook).
  void CollectFrom(std::function<EngineGauges()> fill);

  // kvbuffer_build_info{version,backend,model} 1.
  void SetBuildInfo(const std::string& version, const std::string& backend,
                    const std::string& model);

  Registry* registry() const { return registry_; }

 private:
  Registry* registry_;
  Family<Counter>* requests_;
  Family<Histogram>* duration_family_;
  std::array<Histogram*, kNumRpcs> durations_{};
  std::array<std::array<std::atomic<Counter*>, kNumCodes + 1>, kNumRpcs> request_counters_{};
  Gauge* active_sequences_;
  Gauge* state_used_;
  Gauge* state_free_;
  Gauge* pages_used_;
  Gauge* pages_free_;
  Gauge* conv_used_;
  Gauge* conv_free_;
  Counter* flushes_;
  Counter* drafts_verified_;
  Counter* drafts_accepted_;
  Counter* bytes_received_;
  Counter* bytes_sent_;
  Gauge* mem_pool_;
  Gauge* mem_total_;
  Gauge* mem_free_;
  Gauge* process_resident_;  // null where the number cannot be read
  Gauge* process_heap_;
  Family<Gauge>* build_info_;
};

}  // namespace kvbuffer::metrics
