// value_vector_norms inner loops, compiled once per instruction set (cpu_isa.h).
#pragma once
#include <cstdint>

#include "common.h"
#include "cpu_simd.h"
#include "hostdevice.h"

namespace specext {
namespace {

// ---------------------------------------------------------------- value-vector norms row
// acc[0:n] += double(a[0:n])^2. Squares of float inputs are exact in double.
template <DType D>
void sqnorm_row_t(const void* a, double* acc, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  if constexpr (D != DType::F64) {
    for (; i + 16 <= n; i += 16) {
      vf x = vload<D>(a, i);
      __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(x));
      __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
      _mm512_storeu_pd(acc + i, _mm512_add_pd(_mm512_loadu_pd(acc + i), _mm512_mul_pd(lo, lo)));
      _mm512_storeu_pd(acc + i + 8, _mm512_add_pd(_mm512_loadu_pd(acc + i + 8), _mm512_mul_pd(hi, hi)));
    }
  }
#elif defined(__AVX2__)
  if constexpr (D != DType::F64) {
    for (; i + 8 <= n; i += 8) {
      vf x = vload<D>(a, i);
      __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(x));
      __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1));
      _mm256_storeu_pd(acc + i, _mm256_add_pd(_mm256_loadu_pd(acc + i), _mm256_mul_pd(lo, lo)));
      _mm256_storeu_pd(acc + i + 4, _mm256_add_pd(_mm256_loadu_pd(acc + i + 4), _mm256_mul_pd(hi, hi)));
    }
  }
#endif
  for (; i < n; ++i) {
    const double x = load_as_f64<D>(a, i);
    acc[i] = acc[i] + x * x;
  }
}

void sqnorm_row(const void* a, DType dt, double* acc, int64_t n) {
  switch (dt) {
    case DType::F32: return sqnorm_row_t<DType::F32>(a, acc, n);
    case DType::F16: return sqnorm_row_t<DType::F16>(a, acc, n);
    case DType::BF16: return sqnorm_row_t<DType::BF16>(a, acc, n);
    case DType::F64: return sqnorm_row_t<DType::F64>(a, acc, n);
    default: return;
  }
}

// Sum of squares of n contiguous elements, in double, with independent partial sums so
// the adds pipeline (the order is fixed per path, so each SIMD level is deterministic).
template <DType D>
double sqsum_t(const void* a, int64_t n) {
  int64_t i = 0;
  double total = 0.0;
#if defined(__AVX512F__)
  if constexpr (D != DType::F64) {
    __m512d s0 = _mm512_setzero_pd(), s1 = _mm512_setzero_pd();
    for (; i + 16 <= n; i += 16) {
      vf x = vload<D>(a, i);
      __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(x));
      __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
      s0 = _mm512_add_pd(s0, _mm512_mul_pd(lo, lo));
      s1 = _mm512_add_pd(s1, _mm512_mul_pd(hi, hi));
    }
    double tmp[8];
    _mm512_storeu_pd(tmp, _mm512_add_pd(s0, s1));
    for (double v : tmp) total += v;
  }
#elif defined(__AVX2__)
  if constexpr (D != DType::F64) {
    __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
    for (; i + 8 <= n; i += 8) {
      vf x = vload<D>(a, i);
      __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(x));
      __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1));
      s0 = _mm256_add_pd(s0, _mm256_mul_pd(lo, lo));
      s1 = _mm256_add_pd(s1, _mm256_mul_pd(hi, hi));
    }
    double tmp[4];
    _mm256_storeu_pd(tmp, _mm256_add_pd(s0, s1));
    for (double v : tmp) total += v;
  }
#endif
  double p[4] = {0.0, 0.0, 0.0, 0.0};
  for (; i + 4 <= n; i += 4)
    for (int k = 0; k < 4; ++k) {
      const double x = load_as_f64<D>(a, i + k);
      p[k] += x * x;
    }
  for (; i < n; ++i) {
    const double x = load_as_f64<D>(a, i);
    p[0] += x * x;
  }
  return total + ((p[0] + p[1]) + (p[2] + p[3]));
}

double sqsum(const void* a, DType dt, int64_t n) {
  switch (dt) {
    case DType::F32: return sqsum_t<DType::F32>(a, n);
    case DType::F16: return sqsum_t<DType::F16>(a, n);
    case DType::BF16: return sqsum_t<DType::BF16>(a, n);
    case DType::F64: return sqsum_t<DType::F64>(a, n);
    default: return 0.0;
  }
}

}  // namespace
}  // namespace specext
