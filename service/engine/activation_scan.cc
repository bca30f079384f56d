#include "service/engine/activation_scan.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <thread>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/synchronization/mutex.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace kvbuffer {
namespace {

// Bytes per block: a block is scanned whole, then the scan stops at the first block with a hit.
constexpr size_t kBlockBytes = 8192;

// With x the bits without the sign of a lane of `Bits` bits, x + (2^(Bits-1) - limit) sets the
// lane's top bit exactly when x >= limit, and never carries into the next lane (x < 2^(Bits-1)).
template <typename Lane>
size_t FindFirst(const uint8_t* p, size_t n, uint32_t limit) {
  constexpr int kBits = 8 * sizeof(Lane);
  constexpr size_t kLanes = 8 / sizeof(Lane);
  constexpr uint64_t kOnes = kBits == 16 ? 0x0001000100010001ull : 0x0000000100000001ull;
  constexpr uint64_t kSign = kOnes << (kBits - 1);
  const uint64_t magnitude = kSign - kOnes;  // every bit but the sign, per lane
  const uint64_t bias = ((uint64_t{1} << (kBits - 1)) - limit) * kOnes;
  constexpr size_t kWords = kBlockBytes / 8;
  const size_t n_words = n / kLanes;
  size_t w = 0;
  for (; w < n_words; w += kWords) {
    const size_t words = n_words - w < kWords ? n_words - w : kWords;
    uint64_t hit = 0;
    for (size_t j = 0; j < words; ++j) {
      uint64_t x;
      std::memcpy(&x, p + (w + j) * 8, 8);
      hit |= ((x & magnitude) + bias) & kSign;
    }
    if (hit != 0) break;
  }
  if (w > n_words) w = n_words;
  // The block with a hit (if any) and the tail, element by element.
  const Lane mask = static_cast<Lane>(magnitude);
  for (size_t i = w * kLanes; i < n; ++i) {
    Lane x;
    std::memcpy(&x, p + i * sizeof(Lane), sizeof(Lane));
    if ((x & mask) >= limit) return i;
  }
  return n;
}

// Copies `bytes` bytes; with SSE2 and a 16-byte aligned `dst`, by non-temporal stores: the
// destination (staging that a device reads) is neither read for ownership nor kept in the caches.
void CopyStreaming(uint8_t* dst, const uint8_t* src, size_t bytes) {
#if defined(__SSE2__)
  if (reinterpret_cast<uintptr_t>(dst) % 16 == 0) {
    size_t i = 0;
    for (; i + 64 <= bytes; i += 64) {
      const __m128i x0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
      const __m128i x1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 16));
      const __m128i x2 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 32));
      const __m128i x3 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 48));
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i), x0);
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 16), x1);
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 32), x2);
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 48), x3);
    }
    if (i < bytes) std::memcpy(dst + i, src + i, bytes - i);
    return;
  }
#endif
  std::memcpy(dst, src, bytes);
}

// Scans each block of the source (bringing it into the first-level cache), then copies it.
template <typename Lane>
size_t CopyAndFindFirst(const uint8_t* src, uint8_t* dst, size_t n, uint32_t limit) {
  constexpr size_t kLanesPerBlock = kBlockBytes / sizeof(Lane);
  size_t found = n;
  for (size_t i = 0; i < n; i += kLanesPerBlock) {
    const size_t lanes = n - i < kLanesPerBlock ? n - i : kLanesPerBlock;
    const size_t hit = FindFirst<Lane>(src + i * sizeof(Lane), lanes, limit);
    if (hit < lanes) {
      found = i + hit;
      break;
    }
    CopyStreaming(dst + i * sizeof(Lane), src + i * sizeof(Lane), lanes * sizeof(Lane));
  }
#if defined(__SSE2__)
  _mm_sfence();  // the streamed stores are visible before anyone is told about the copy
#endif
  return found;
}

// Helper threads that run the chunks of large scans. One scan at a time uses them; a scan that
// finds them busy runs on its caller alone.
class ScanPool {
 public:
  static ScanPool& Get() {
    static ScanPool* pool = new ScanPool();  // never destroyed: threads outlive static teardown
    return *pool;
  }

  void SetHelpers(int helpers) {
    absl::MutexLock lock(&mu_);
    want_ = std::max(0, helpers);
  }

  // Runs fn(c) for every chunk c in [0, chunks): chunk 0 on the caller, the others on up to
  // chunks - 1 helpers (fewer when the pool is busy or small: the caller then takes more).
  void Run(int chunks, absl::FunctionRef<void(int)> fn) {
    if (chunks > 1 && run_mu_.TryLock()) {
      int helpers = 0;
      {
        absl::MutexLock lock(&mu_);
        while (static_cast<int>(threads_.size()) < std::min(want_, chunks - 1)) {
          threads_.emplace_back([this] { Loop(); });
        }
        helpers = std::min(static_cast<int>(threads_.size()), chunks - 1);
        fn_ = &fn;
        chunks_ = chunks;
        next_.store(1, std::memory_order_relaxed);
        active_ = helpers;
        ++generation_;
      }
      RunChunks(fn, chunks);
      {
        absl::MutexLock lock(&mu_);
        // Every helper of this run has picked it up and left its chunks.
        auto done = [this]()
                        ABSL_SHARED_LOCKS_REQUIRED(mu_) { return active_ == 0 && running_ == 0; };
        mu_.Await(absl::Condition(&done));
        fn_ = nullptr;
      }
      run_mu_.Unlock();
      return;
    }
    for (int c = 0; c < chunks; ++c) fn(c);
  }

  int MaxHelpers() {
    absl::MutexLock lock(&mu_);
    return want_;
  }

 private:
  ScanPool() {
    const int hw = static_cast<int>(std::thread::hardware_concurrency());
    want_ = std::min(3, hw / 4);
  }

  void RunChunks(absl::FunctionRef<void(int)> fn, int chunks) {
    fn(0);
    for (int c = next_.fetch_add(1); c < chunks; c = next_.fetch_add(1)) fn(c);
  }

  void Loop() {
    uint64_t seen = 0;
    absl::MutexLock lock(&mu_);
    while (true) {
      auto work = [this, &seen]() ABSL_SHARED_LOCKS_REQUIRED(mu_) {
        return generation_ != seen && active_ > 0;
      };
      mu_.Await(absl::Condition(&work));
      seen = generation_;
      --active_;  // this helper's claim; it may find no chunk left
      const absl::FunctionRef<void(int)>* fn = fn_;
      const int chunks = chunks_;
      ++running_;
      mu_.Unlock();
      for (int c = next_.fetch_add(1); c < chunks; c = next_.fetch_add(1)) (*fn)(c);
      mu_.Lock();
      --running_;
    }
  }

  absl::Mutex run_mu_;  // held by the scan using the helpers
  absl::Mutex mu_;
  std::vector<std::thread> threads_ ABSL_GUARDED_BY(mu_);
  int want_ ABSL_GUARDED_BY(mu_) = 0;
  const absl::FunctionRef<void(int)>* fn_ ABSL_GUARDED_BY(mu_) = nullptr;
  int chunks_ ABSL_GUARDED_BY(mu_) = 0;
  int active_ ABSL_GUARDED_BY(mu_) = 0;   // helpers yet to pick up the current run
  int running_ ABSL_GUARDED_BY(mu_) = 0;  // helpers inside a run's chunks
  uint64_t generation_ ABSL_GUARDED_BY(mu_) = 0;
  std::atomic<int> next_{0};
};

// Splits [0, n) lanes into chunks of whole blocks (at least kParallelScanBytes / 2 each) and runs
// scan(begin, count) -> first hit (or count) on each; the first hit in order, or n.
template <typename Lane, typename Scan>
size_t InChunks(size_t n, Scan scan) {
  const size_t bytes = n * sizeof(Lane);
  ScanPool& pool = ScanPool::Get();
  const int helpers = bytes >= kParallelScanBytes ? pool.MaxHelpers() : 0;
  if (helpers == 0) return scan(size_t{0}, n);
  constexpr size_t kBlockLanes = kBlockBytes / sizeof(Lane);
  const size_t max_chunks = std::max<size_t>(1, bytes / (kParallelScanBytes / 2));
  const int chunks = static_cast<int>(std::min<size_t>(helpers + 1, max_chunks));
  const size_t per = (n / chunks + kBlockLanes - 1) / kBlockLanes * kBlockLanes;
  std::vector<size_t> found(chunks, n);
  pool.Run(chunks, [&](int c) {
    const size_t begin = std::min(n, c * per);
    const size_t count = std::min(n - begin, per);
    const size_t hit = count == 0 ? 0 : scan(begin, count);
    found[c] = hit < count ? begin + hit : n;
  });
  return *std::min_element(found.begin(), found.end());
}

template <typename Lane>
size_t CopyAndFindFirstParallel(const uint8_t* src, uint8_t* dst, size_t n, uint32_t limit) {
  return InChunks<Lane>(n, [&](size_t begin, size_t count) {
    return CopyAndFindFirst<Lane>(src + begin * sizeof(Lane), dst + begin * sizeof(Lane), count,
                                  limit);
  });
}

template <typename Lane>
size_t FindFirstParallel(const uint8_t* p, size_t n, uint32_t limit) {
  return InChunks<Lane>(n, [&](size_t begin, size_t count) {
    return FindFirst<Lane>(p + begin * sizeof(Lane), count, limit);
  });
}

}  // namespace

void SetActivationScanHelpers(int helpers) { ScanPool::Get().SetHelpers(helpers); }

int ActivationScanHelpers() { return ScanPool::Get().MaxHelpers(); }

size_t CopyAndFindFirstMagnitudeAtLeast(const void* src, void* dst, size_t n, DType dtype,
                                        uint32_t limit_bits) {
  const auto* s = static_cast<const uint8_t*>(src);
  auto* d = static_cast<uint8_t*>(dst);
  if (dtype == DType::kFloat32) return CopyAndFindFirstParallel<uint32_t>(s, d, n, limit_bits);
  return CopyAndFindFirstParallel<uint16_t>(s, d, n, limit_bits);
}

bool CopyRowsBelowMagnitude(const void* src, size_t src_stride, void* dst, size_t dst_stride,
                            size_t rows, size_t n, DType dtype, uint32_t limit_bits) {
  const auto* s = static_cast<const uint8_t*>(src);
  auto* d = static_cast<uint8_t*>(dst);
  const size_t row_bytes = n * DTypeSize(dtype);
  bool ok = true;
  for (size_t r = 0; r < rows && ok; ++r) {
    const uint8_t* from = s + r * src_stride;
    ok = (dtype == DType::kFloat32 ? FindFirst<uint32_t>(from, n, limit_bits)
                                   : FindFirst<uint16_t>(from, n, limit_bits)) == n;
    if (ok) CopyStreaming(d + r * dst_stride, from, row_bytes);
  }
#if defined(__SSE2__)
  _mm_sfence();  // one fence for all the rows' streamed stores
#endif
  return ok;
}

size_t FindFirstMagnitudeAtLeast(const void* data, size_t n, DType dtype, uint32_t limit_bits) {
  const auto* p = static_cast<const uint8_t*>(data);
  if (dtype == DType::kFloat32) return FindFirstParallel<uint32_t>(p, n, limit_bits);
  return FindFirstParallel<uint16_t>(p, n, limit_bits);
}

}  // namespace kvbuffer
