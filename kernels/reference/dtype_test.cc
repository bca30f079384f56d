#include "kernels/reference/dtype.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>

#include "gtest/gtest.h"

namespace kvbuffer {
namespace {

float FromBits(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

TEST(DTypeTest, SizesAndNames) {
  EXPECT_EQ(DTypeSize(DType::kFloat32), 4u);
  EXPECT_EQ(DTypeSize(DType::kFloat16), 2u);
  EXPECT_EQ(DTypeSize(DType::kBFloat16), 2u);
  EXPECT_STREQ(DTypeName(DType::kFloat32), "FP32");
  EXPECT_STREQ(DTypeName(DType::kFloat16), "FP16");
  EXPECT_STREQ(DTypeName(DType::kBFloat16), "BF16");
}

TEST(DTypeTest, BF16RoundTripIsExactForEveryPattern) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = BF16ToFloat(static_cast<uint16_t>(h));
    const uint16_t back = FloatToBF16(f);
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(BF16ToFloat(back))) << h;
    } else {
      EXPECT_EQ(back, h) << h;
    }
  }
}

TEST(DTypeTest, FP16RoundTripIsExactForEveryPattern) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = FP16ToFloat(static_cast<uint16_t>(h));
    const uint16_t back = FloatToFP16(f);
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(FP16ToFloat(back))) << h;
    } else {
      EXPECT_EQ(back, h) << h;
    }
  }
}

TEST(DTypeTest, FP16KnownValues) {
  EXPECT_EQ(FP16ToFloat(0x3c00), 1.0f);
  EXPECT_EQ(FP16ToFloat(0xc000), -2.0f);
  EXPECT_EQ(FP16ToFloat(0x7bff), 65504.0f);
  EXPECT_EQ(FP16ToFloat(0x0001), std::ldexp(1.0f, -24));  // smallest subnormal
  EXPECT_EQ(FP16ToFloat(0x0400), std::ldexp(1.0f, -14));  // smallest normal
  EXPECT_TRUE(std::isinf(FP16ToFloat(0x7c00)));
  EXPECT_EQ(FloatToFP16(65520.0f), 0x7c00);  // rounds up to Inf
  EXPECT_EQ(FloatToFP16(1e-9f), 0x0000);     // underflows to zero
  EXPECT_EQ(FloatToFP16(-0.0f), 0x8000);
  EXPECT_EQ(FloatToBF16(1.0f), 0x3f80);
}

// A float is rounded to the nearer of its two neighbouring 16-bit values, ties to even.
template <typename ToHalf, typename FromHalf>
void ExpectNearestEven(ToHalf to, FromHalf from, float f) {
  const uint16_t h = to(f);
  const double r = from(h);
  if (std::isinf(r)) return;  // overflow handled by the known-value tests
  const double err = std::fabs(static_cast<double>(f) - r);
  // Neighbours one step up and down in magnitude.
  const uint16_t up = static_cast<uint16_t>(h + 1), down = static_cast<uint16_t>(h - 1);
  for (uint16_t n : {up, down}) {
    const double rn = from(n);
    if (std::isnan(rn) || std::isinf(rn) || (std::signbit(rn) != std::signbit(r) && rn != 0)) {
      continue;
    }
    const double en = std::fabs(static_cast<double>(f) - rn);
    ASSERT_LE(err, en) << f;
    if (err == en) {
      ASSERT_EQ(h & 1, 0) << "tie not to even for " << f;
    }
  }
}

TEST(DTypeTest, RoundingIsNearestEven) {
  std::mt19937 rng(11);
  std::uniform_int_distribution<uint32_t> bits;
  for (int i = 0; i < 200000; ++i) {
    uint32_t b = bits(rng);
    // Keep magnitudes inside the finite range of each format.
    const float fb = FromBits(b & 0xbfffffffu);  // |exp| limited: no Inf/NaN
    ExpectNearestEven(FloatToBF16, BF16ToFloat, fb);
    const float fh = std::ldexp(static_cast<float>(b % 100000) / 100000.0f - 0.5f,
                                static_cast<int>((b >> 20) % 40) - 24);
    ExpectNearestEven(FloatToFP16, FP16ToFloat, fh);
  }
  // Exact ties.
  EXPECT_EQ(FloatToBF16(FromBits(0x3f808000u)), 0x3f80);  // tie, even stays
  EXPECT_EQ(FloatToBF16(FromBits(0x3f818000u)), 0x3f82);  // tie, odd rounds up
  EXPECT_EQ(FloatToFP16(1.0f + std::ldexp(1.0f, -11)), 0x3c00);
  EXPECT_EQ(FloatToFP16(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3c02);
}

#ifdef __FLT16_MAX__
TEST(DTypeTest, FP16MatchesCompilerConversion) {
  std::mt19937 rng(12);
  std::uniform_int_distribution<uint32_t> bits;
  for (int i = 0; i < 200000; ++i) {
    const float f = FromBits(bits(rng));
    if (std::isnan(f)) continue;
    const _Float16 h = static_cast<_Float16>(f);
    uint16_t hb;
    std::memcpy(&hb, &h, 2);
    ASSERT_EQ(FloatToFP16(f), hb) << f;
    ASSERT_EQ(FP16ToFloat(hb), static_cast<float>(h));
  }
}
#endif

TEST(DTypeTest, NaNStaysNaN) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  EXPECT_TRUE(std::isnan(BF16ToFloat(FloatToBF16(nan))));
  EXPECT_TRUE(std::isnan(FP16ToFloat(FloatToFP16(nan))));
  EXPECT_TRUE(std::isnan(BF16ToFloat(FloatToBF16(FromBits(0x7f800001u)))));  // payload in low bits
}

TEST(DTypeTest, LoadStoreRoundTrip) {
  std::mt19937 rng(13);
  std::normal_distribution<float> n01;
  for (DType t : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    std::vector<uint8_t> buf(64 * DTypeSize(t));
    for (size_t i = 0; i < 64; ++i) {
      const float v = n01(rng);
      StoreFromFloat(buf.data(), t, i, v);
      const float back = LoadAsFloat(buf.data(), t, i);
      const float tol = t == DType::kFloat32   ? 0.0f
                        : t == DType::kFloat16 ? std::fabs(v) * 0x1p-11f + 0x1p-25f
                                               : std::fabs(v) * 0x1p-8f;
      EXPECT_LE(std::fabs(back - v), tol) << DTypeName(t) << " " << v;
      // Storing a value already representable is exact.
      StoreFromFloat(buf.data(), t, i, back);
      EXPECT_EQ(LoadAsFloat(buf.data(), t, i), back);
    }
  }
}

}  // namespace
}  // namespace kvbuffer
