// SIMD building blocks for the instruction set this translation unit is compiled for
// (__AVX512F__, __AVX2__ or neither): a float vector type, loads that convert bf16/fp16
// in registers, the accumulate statistics, arithmetic. Included by the *_isa.h inner
// loops; everything has internal linkage (see cpu_isa.h).
#pragma once
#include <cstdint>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "common.h"

namespace specext {
namespace {

// ---------------------------------------------------------------- vector loads
#if defined(__AVX512F__)
constexpr int VW = 16;
using vf = __m512;
template <DType D>
inline vf vload(const void* p, int64_t i) {
  if constexpr (D == DType::F32) return _mm512_loadu_ps(static_cast<const float*>(p) + i);
  if constexpr (D == DType::BF16) {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  if constexpr (D == DType::F16) {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + i));
    return _mm512_cvtph_ps(h);
  }
  return _mm512_setzero_ps();
}
template <Stat S>
inline vf vstat(vf x) {
  if constexpr (S == Stat::Abs) return _mm512_abs_ps(x);
  if constexpr (S == Stat::Square) return _mm512_mul_ps(x, x);
  if constexpr (S == Stat::Relu) return _mm512_max_ps(x, _mm512_setzero_ps());
  return x;
}
inline vf vloadf(const float* p) { return _mm512_loadu_ps(p); }
inline void vstoref(float* p, vf x) { _mm512_storeu_ps(p, x); }
inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline vf vset1(float w) { return _mm512_set1_ps(w); }
#elif defined(__AVX2__)
constexpr int VW = 8;
using vf = __m256;
template <DType D>
inline vf vload(const void* p, int64_t i) {
  if constexpr (D == DType::F32) return _mm256_loadu_ps(static_cast<const float*>(p) + i);
  if constexpr (D == DType::BF16) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  if constexpr (D == DType::F16) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
    return _mm256_cvtph_ps(h);
  }
  return _mm256_setzero_ps();
}
template <Stat S>
inline vf vstat(vf x) {
  if constexpr (S == Stat::Abs) return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x);
  if constexpr (S == Stat::Square) return _mm256_mul_ps(x, x);
  if constexpr (S == Stat::Relu) return _mm256_max_ps(x, _mm256_setzero_ps());
  return x;
}
inline vf vloadf(const float* p) { return _mm256_loadu_ps(p); }
inline void vstoref(float* p, vf x) { _mm256_storeu_ps(p, x); }
inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
inline vf vset1(float w) { return _mm256_set1_ps(w); }
#else
constexpr int VW = 0;  // scalar path: the compiler vectorises the plain loops as it can
#endif

// relu(x) for NaN: max_ps(NaN, 0) returns 0 on x86 (second operand), and the scalar
// apply_stat (hostdevice.h) also gives 0, so every path maps NaN to 0 under relu and
// keeps it under abs/square/signed. The binding documents this.

}  // namespace
}  // namespace specext
