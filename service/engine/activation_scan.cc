#include "service/engine/activation_scan.h"

#include <cstring>

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

}  // namespace

size_t CopyAndFindFirstMagnitudeAtLeast(const void* src, void* dst, size_t n, DType dtype,
                                        uint32_t limit_bits) {
  const auto* s = static_cast<const uint8_t*>(src);
  auto* d = static_cast<uint8_t*>(dst);
  if (dtype == DType::kFloat32) return CopyAndFindFirst<uint32_t>(s, d, n, limit_bits);
  return CopyAndFindFirst<uint16_t>(s, d, n, limit_bits);
}

size_t FindFirstMagnitudeAtLeast(const void* data, size_t n, DType dtype, uint32_t limit_bits) {
  const auto* p = static_cast<const uint8_t*>(data);
  if (dtype == DType::kFloat32) return FindFirst<uint32_t>(p, n, limit_bits);
  return FindFirst<uint16_t>(p, n, limit_bits);
}

}  // namespace kvbuffer
