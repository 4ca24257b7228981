// simt.h's 16-bit storage types on the host: bit-exact stand-ins for CUDA's
// __half and __nv_bfloat16 with the same round-to-nearest-even conversions
// (__float2half_rn, __float2bfloat16_rn), so a kernel's Half or Bf16 output
// matches the GPU's bit for bit. Storage only, as in kernels: compute in
// float through ToFloat / FromFloat<T>. Include simt.h, not this file.
#ifndef PIPESERVE_RUNTIME_CUDA_SIMT_HOST_NUMBERS_H_
#define PIPESERVE_RUNTIME_CUDA_SIMT_HOST_NUMBERS_H_

#include <cstdint>
#include <cstring>

namespace pipeserve::simt {

// IEEE binary16: 1 sign, 5 exponent, 10 mantissa bits.
struct Half {
  uint16_t bits;
};

// bfloat16: the top 16 bits of a float32.
struct Bf16 {
  uint16_t bits;
};

namespace internal {

inline uint32_t FloatBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

inline float BitsToFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// |f| below 2^-14 (bits `x`, sign removed): a half subnormal or zero.
inline uint16_t SubnormalHalfBits(uint32_t x) {
  if (x < 0x33000000u) return 0;      // below 2^-25: rounds to zero
  const uint32_t exponent = x >> 23;  // 102..112
  const uint32_t mantissa = (x & 0x7fffffu) | 0x800000u;
  // The value is mantissa * 2^(exponent - 150); half subnormals count
  // units of 2^-24.
  const uint32_t shift = 126 - exponent;  // 14..24
  uint32_t r = mantissa >> shift;
  const uint32_t rest = mantissa & ((1u << shift) - 1);
  const uint32_t halfway = 1u << (shift - 1);
  if (rest > halfway || (rest == halfway && (r & 1u))) ++r;
  return static_cast<uint16_t>(r);
}

inline uint16_t FloatToHalfBits(float f) {
  const uint32_t u = FloatBits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t x = u & 0x7fffffffu;
  if (x > 0x7f800000u) return 0x7fffu;          // NaN: CUDA's canonical one
  if (x >= 0x477ff000u) return sign | 0x7c00u;  // from 65520 on: inf
  if (x < 0x38800000u)
    return static_cast<uint16_t>(sign | SubnormalHalfBits(x));
  // Rebias the exponent (127 -> 15) and round the 13 dropped bits to even;
  // a carry out of the mantissa correctly bumps the exponent.
  const uint32_t r = x - 0x38000000u;
  return static_cast<uint16_t>(sign | (r + 0xfffu + ((r >> 13) & 1u)) >> 13);
}

inline float HalfBitsToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0x1f) {  // inf keeps its sign; NaN becomes CUDA's
    return BitsToFloat(mantissa == 0 ? sign | 0x7f800000u : 0x7fffffffu);
  }
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact
    const float magnitude = static_cast<float>(mantissa) * 0x1p-24f;
    return sign ? -magnitude : magnitude;
  }
  return BitsToFloat(sign | (exponent + 112) << 23 | mantissa << 13);
}

inline uint16_t FloatToBf16Bits(float f) {
  const uint32_t u = FloatBits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;  // CUDA's NaN
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline float Bf16BitsToFloat(uint16_t b) {
  return BitsToFloat(static_cast<uint32_t>(b) << 16);
}

}  // namespace internal

inline float ToFloat(float x) { return x; }
inline float ToFloat(Half x) { return internal::HalfBitsToFloat(x.bits); }
inline float ToFloat(Bf16 x) { return internal::Bf16BitsToFloat(x.bits); }

template <typename T>
T FromFloat(float x) {
  static_assert(sizeof(T) == 0, "FromFloat<T>: T is float, Half or Bf16");
}
template <>
inline float FromFloat<float>(float x) {
  return x;
}
template <>
inline Half FromFloat<Half>(float x) {
  return Half{internal::FloatToHalfBits(x)};
}
template <>
inline Bf16 FromFloat<Bf16>(float x) {
  return Bf16{internal::FloatToBf16Bits(x)};
}

}  // namespace pipeserve::simt

#endif  // PIPESERVE_RUNTIME_CUDA_SIMT_HOST_NUMBERS_H_
