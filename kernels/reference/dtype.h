// Element types of activations on the wire and in buffers, and exact host conversions.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace kvbuffer {

// Element type of a tensor. Values match proto kvbuffer.v1.DType.
enum class DType : uint8_t { kFloat32 = 1, kFloat16 = 2, kBFloat16 = 3 };

// Size in bytes of one element of `t`.
constexpr size_t DTypeSize(DType t) { return t == DType::kFloat32 ? 4 : 2; }

// Upper-case name of `t` as the wire contract spells it ("FP32", "FP16", "BF16").
constexpr const char* DTypeName(DType t) {
  switch (t) {
    case DType::kFloat32: return "FP32";
    case DType::kFloat16: return "FP16";
    case DType::kBFloat16: return "BF16";
  }
  return "UNKNOWN";
}

// Converts a bfloat16 bit pattern to float (exact).
inline float BF16ToFloat(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Converts float to bfloat16 with round-to-nearest-even (NaN stays NaN).
inline uint16_t FloatToBF16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7f800000u) == 0x7f800000u && (bits & 0x007fffffu) != 0) {
    return static_cast<uint16_t>((bits >> 16) | 0x0040u);
  }
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// Converts an IEEE half bit pattern to float (exact, subnormals included).
inline float FP16ToFloat(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do {
        ++e;
        man <<= 1;
      } while ((man & 0x400u) == 0);
      bits = sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Converts float to IEEE half with round-to-nearest-even (overflow to Inf).
inline uint16_t FloatToFP16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  uint32_t sign = (bits >> 16) & 0x8000u;
  uint32_t exp = (bits >> 23) & 0xffu;
  uint32_t man = bits & 0x7fffffu;
  if (exp == 0xffu) return static_cast<uint16_t>(sign | 0x7c00u | (man ? 0x200u : 0u));
  int e = static_cast<int>(exp) - 127 + 15;
  if (e >= 31) return static_cast<uint16_t>(sign | 0x7c00u);
  if (e <= 0) {
    if (e < -10) return static_cast<uint16_t>(sign);
    man |= 0x800000u;
    int shift = 14 - e;
    uint32_t half = man >> shift;
    uint32_t rem = man & ((1u << shift) - 1);
    uint32_t mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (half & 1u))) ++half;
    return static_cast<uint16_t>(sign | half);
  }
  uint32_t half = sign | (static_cast<uint32_t>(e) << 10) | (man >> 13);
  uint32_t rem = man & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (half & 1u))) ++half;
  return static_cast<uint16_t>(half);
}

// Reads element `i` of a buffer of type `t` as float.
inline float LoadAsFloat(const void* data, DType t, size_t i) {
  switch (t) {
    case DType::kFloat32: return static_cast<const float*>(data)[i];
    case DType::kFloat16: return FP16ToFloat(static_cast<const uint16_t*>(data)[i]);
    case DType::kBFloat16: return BF16ToFloat(static_cast<const uint16_t*>(data)[i]);
  }
  return 0.0f;
}

// Writes `v` as element `i` of a buffer of type `t` (rounding to nearest even).
inline void StoreFromFloat(void* data, DType t, size_t i, float v) {
  switch (t) {
    case DType::kFloat32: static_cast<float*>(data)[i] = v; break;
    case DType::kFloat16: static_cast<uint16_t*>(data)[i] = FloatToFP16(v); break;
    case DType::kBFloat16: static_cast<uint16_t*>(data)[i] = FloatToBF16(v); break;
  }
}

}  // namespace kvbuffer
