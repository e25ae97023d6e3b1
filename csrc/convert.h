// Scalar conversions of 16-bit floats, by hand: the CPU path must not depend on compiler
// support for _Float16/__bf16. Internal linkage, so each SIMD translation unit gets its own.
#pragma once
#include <cstdint>
#include <cstring>

namespace specext {
namespace {

inline float bits_to_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint32_t f32_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float bf16_to_f32(uint16_t h) { return bits_to_f32(uint32_t(h) << 16); }

// Branch-free IEEE half -> float: place exponent+mantissa in float position and rebias by
// multiplying with 2^112, which also turns half subnormals into exact float normals.
inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;
  float f = bits_to_f32(em << 13) * 0x1p112f;
  uint32_t u = f32_to_bits(f);
  u = (em >= 0x7c00u) ? ((em << 13) | 0x7f800000u) : u;  // inf / nan keep their payload
  return bits_to_f32(u | sign);
}

}  // namespace
}  // namespace specext
