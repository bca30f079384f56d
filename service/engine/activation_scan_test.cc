#include "service/engine/activation_scan.h"

#include <algorithm>
#include <cstring>
#include <random>
#include <tuple>
#include <vector>

#include "gtest/gtest.h"

namespace kvbuffer {
namespace {

// The plain per-element test the scan must agree with.
size_t Reference(const uint8_t* p, size_t n, DType dtype, uint32_t limit) {
  for (size_t i = 0; i < n; ++i) {
    uint32_t x = 0;
    if (dtype == DType::kFloat32) {
      std::memcpy(&x, p + 4 * i, 4);
      x &= 0x7fffffffu;
    } else {
      uint16_t h;
      std::memcpy(&h, p + 2 * i, 2);
      x = h & 0x7fffu;
    }
    if (x >= limit) return i;
  }
  return n;
}

TEST(ActivationScanTest, AgreesWithThePerElementTestAtEveryOffsetAndLength) {
  std::mt19937 rng(7);
  const struct {
    DType dtype;
    uint32_t limit;
    uint32_t bad;  // a value at the limit
  } cases[] = {{DType::kBFloat16, 0x7f80, 0xff80},        {DType::kBFloat16, 0x4980, 0x4980},
               {DType::kFloat16, 0x7c00, 0x7e01},         {DType::kFloat32, 0x7f800000, 0x7fc00000},
               {DType::kFloat32, 0x49800000, 0xc9800001}, {DType::kBFloat16, 1, 0x8001}};
  for (const auto& c : cases) {
    const size_t es = DTypeSize(c.dtype);
    for (size_t n : {0, 1, 3, 4, 5, 63, 4096, 4097, 8191, 20000}) {
      for (size_t misalign : {0, 1, 2, 6}) {
        std::vector<uint8_t> buf(n * es + misalign + 8);
        uint8_t* p = buf.data() + misalign;
        // Values just below the limit, with random signs and mantissas.
        for (size_t i = 0; i < n; ++i) {
          const uint32_t below = rng() % (c.limit == 0 ? 1 : c.limit);
          const uint32_t v = below | ((rng() & 1) ? (es == 4 ? 0x80000000u : 0x8000u) : 0u);
          std::memcpy(p + i * es, &v, es);  // little-endian: the low bytes
        }
        EXPECT_EQ(FindFirstMagnitudeAtLeast(p, n, c.dtype, c.limit),
                  Reference(p, n, c.dtype, c.limit));
        std::vector<uint8_t> dst(n * es + 8);
        EXPECT_EQ(
            CopyAndFindFirstMagnitudeAtLeast(p, dst.data() + misalign % 2, n, c.dtype, c.limit),
            Reference(p, n, c.dtype, c.limit));
        EXPECT_EQ(std::memcmp(dst.data() + misalign % 2, p, n * es), 0);
        for (size_t at : {size_t{0}, n / 2, n > 0 ? n - 1 : 0}) {
          if (at >= n) continue;
          std::vector<uint8_t> copy(buf);
          uint8_t* q = copy.data() + misalign;
          std::memcpy(q + at * es, &c.bad, es);
          const size_t want = Reference(q, n, c.dtype, c.limit);
          ASSERT_EQ(want, at);
          EXPECT_EQ(FindFirstMagnitudeAtLeast(q, n, c.dtype, c.limit), want)
              << DTypeName(c.dtype) << " n=" << n << " at=" << at << " misalign=" << misalign;
          std::vector<uint8_t> dst(n * es);
          EXPECT_EQ(CopyAndFindFirstMagnitudeAtLeast(q, dst.data(), n, c.dtype, c.limit), want);
        }
      }
    }
  }
}

TEST(ActivationScanTest, LargeTensorsSplitOverHelpersFindTheFirstHit) {
  std::mt19937 rng(11);
  const size_t n = 3 * kParallelScanBytes / 2 + 12345;  // bf16 elements: ~3 MB, uneven chunks
  std::vector<uint16_t> x(n);
  for (uint16_t& v : x) v = static_cast<uint16_t>(rng() % 0x4980) | ((rng() & 1) << 15);
  const int default_helpers = ActivationScanHelpers();
  for (int helpers : {0, 1, 3}) {
    SetActivationScanHelpers(helpers);
    std::vector<uint16_t> dst(n);
    EXPECT_EQ(FindFirstMagnitudeAtLeast(x.data(), n, DType::kBFloat16, 0x4980), n);
    EXPECT_EQ(CopyAndFindFirstMagnitudeAtLeast(x.data(), dst.data(), n, DType::kBFloat16, 0x4980),
              n);
    EXPECT_EQ(dst, x);
    for (size_t at : {size_t{5}, n / 3, n / 2 + 7, n - 1}) {
      std::vector<uint16_t> y = x;
      y[at] = 0x7f80;              // +Inf
      y[n - 1 - at / 2] = 0xffc0;  // a NaN further on (or the same place)
      const size_t want = std::min(at, n - 1 - at / 2);
      EXPECT_EQ(FindFirstMagnitudeAtLeast(y.data(), n, DType::kBFloat16, 0x4980), want);
      EXPECT_EQ(CopyAndFindFirstMagnitudeAtLeast(y.data(), dst.data(), n, DType::kBFloat16, 0x4980),
                want);
    }
  }
  SetActivationScanHelpers(default_helpers);
}

// Strided rows (one shard's heads of each token): copied exactly where every element is below the
// limit, refused where any one is, in any row and at any position, for each element size.
TEST(ActivationScanTest, StridedRowsAreCopiedOrRefused) {
  std::mt19937 rng(12);
  for (const auto& [dtype, limit, bad] :
       {std::tuple<DType, uint32_t, uint32_t>{DType::kBFloat16, 0x4980, 0x7fc0},
        {DType::kFloat32, 0x49800000u, 0x7f800000u}}) {
    const size_t es = DTypeSize(dtype);
    const size_t rows = 37, n = 300, src_stride = 1000 * es, dst_stride = 320 * es;
    std::vector<uint8_t> src(rows * src_stride), dst(rows * dst_stride, 0xab);
    for (size_t r = 0; r < rows; ++r) {
      for (size_t i = 0; i < n + 50; ++i) {  // 50 elements past each row that are not copied
        const uint32_t v = es == 2 ? static_cast<uint32_t>(rng() % 0x4980)
                                   : static_cast<uint32_t>(rng() % 0x49800000u);
        std::memcpy(src.data() + r * src_stride + i * es, &v, es);
      }
    }
    ASSERT_TRUE(CopyRowsBelowMagnitude(src.data(), src_stride, dst.data(), dst_stride, rows, n,
                                       dtype, limit));
    for (size_t r = 0; r < rows; ++r) {
      EXPECT_EQ(std::memcmp(dst.data() + r * dst_stride, src.data() + r * src_stride, n * es), 0);
      EXPECT_EQ(dst[r * dst_stride + n * es], 0xab);  // nothing past the row's n elements
    }
    for (const auto& [r, i] : {std::pair<size_t, size_t>{0, 0}, {17, 123}, {rows - 1, n - 1}}) {
      std::vector<uint8_t> y = src;
      std::memcpy(y.data() + r * src_stride + i * es, &bad, es);
      EXPECT_FALSE(CopyRowsBelowMagnitude(y.data(), src_stride, dst.data(), dst_stride, rows, n,
                                          dtype, limit));
    }
    // A bad value just past the rows' n elements is not theirs.
    std::vector<uint8_t> y = src;
    std::memcpy(y.data() + 3 * src_stride + n * es, &bad, es);
    EXPECT_TRUE(CopyRowsBelowMagnitude(y.data(), src_stride, dst.data(), dst_stride, rows, n, dtype,
                                       limit));
  }
}

}  // namespace
}  // namespace kvbuffer
