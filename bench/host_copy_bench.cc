// host_copy_bench: how fast this host moves a decode step's activations into page-locked memory,
// the copy every host-input step pays (bench/NOTES.md "Tensor parallelism, host path"). Copies a
// B = 256 bf16 Qwen3-Next step (4.3 MB, or --bytes) from ordinary memory into page-locked memory
// (cudaHostAlloc) with 1..N threads at once, each its own share, by: plain memcpy; the engine's
// checked copy (CopyAndFindFirstMagnitudeAtLeast: scan + streaming stores); the per-shard strided
// checked copy (CopyRowsBelowMagnitude, rows of 2 KiB). Prints GB/s (bytes copied per second).
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "service/engine/activation_check.h"
#include "service/engine/activation_scan.h"

ABSL_FLAG(size_t, bytes, 256 * (2 * 2048 + 4096 + 64) * 2, "bytes per copy (all threads together)");
ABSL_FLAG(int, max_threads, 8, "largest thread count");
ABSL_FLAG(int, reps, 200, "copies per measurement");

namespace {

using Clock = std::chrono::steady_clock;

enum class Way { kMemcpy, kChecked, kRows };

double Measure(Way way, int threads, const uint8_t* src, uint8_t* dst, size_t bytes, int reps) {
  const size_t share = bytes / threads / 4096 * 4096;
  std::vector<double> times;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = Clock::now();
    std::vector<std::thread> pool;
    auto work = [&](int i) {
      const uint8_t* s = src + i * share;
      uint8_t* d = dst + i * share;
      const uint32_t limit = kvbuffer::ActivationLimitBits(kvbuffer::DType::kBFloat16);
      if (way == Way::kMemcpy) {
        std::memcpy(d, s, share);
      } else if (way == Way::kChecked) {
        kvbuffer::CopyAndFindFirstMagnitudeAtLeast(s, d, share / 2, kvbuffer::DType::kBFloat16,
                                                   limit);
      } else {
        kvbuffer::CopyRowsBelowMagnitude(s, 4096, d, 2048, share / 4096, 1024,
                                         kvbuffer::DType::kBFloat16, limit);
        kvbuffer::CopyRowsBelowMagnitude(s + 2048, 4096, d + share / 2, 2048, share / 4096, 1024,
                                         kvbuffer::DType::kBFloat16, limit);
      }
    };
    for (int i = 1; i < threads; ++i) pool.emplace_back(work, i);
    work(0);
    for (std::thread& t : pool) t.join();
    times.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
  }
  std::sort(times.begin(), times.end());
  return static_cast<double>(share) * threads / times[times.size() / 2] / 1e9;
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  kvbuffer::SetActivationScanHelpers(0);  // each thread copies its own share only
  const size_t bytes = absl::GetFlag(FLAGS_bytes);
  std::vector<uint8_t> src(bytes);
  for (size_t i = 0; i < bytes; i += 2) {
    const uint16_t v = static_cast<uint16_t>(0x3c00 + (i * 7919) % 0x0700);  // moderate bf16
    std::memcpy(&src[i], &v, 2);
  }
  uint8_t* pinned = nullptr;
  if (cudaHostAlloc(reinterpret_cast<void**>(&pinned), bytes, cudaHostAllocPortable) !=
      cudaSuccess) {
    std::fprintf(stderr, "cudaHostAlloc failed\n");
    return 1;
  }
  std::vector<uint8_t> plain(bytes);
  std::printf("host_copy_bench: %zu bytes, %u hardware threads; GB/s (median of %d)\n", bytes,
              std::thread::hardware_concurrency(), absl::GetFlag(FLAGS_reps));
  std::printf("%-8s %12s %14s %14s %16s\n", "threads", "memcpy", "memcpy pinned", "checked pinned",
              "rows pinned");
  for (int t = 1; t <= absl::GetFlag(FLAGS_max_threads); t *= 2) {
    const int reps = absl::GetFlag(FLAGS_reps);
    std::printf("%-8d %12.2f %14.2f %14.2f %16.2f\n", t,
                Measure(Way::kMemcpy, t, src.data(), plain.data(), bytes, reps),
                Measure(Way::kMemcpy, t, src.data(), pinned, bytes, reps),
                Measure(Way::kChecked, t, src.data(), pinned, bytes, reps),
                Measure(Way::kRows, t, src.data(), pinned, bytes, reps));
  }
  cudaFreeHost(pinned);
  return 0;
}
