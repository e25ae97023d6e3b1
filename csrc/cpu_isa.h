// One implementation of the CPU inner loops, compiled once per instruction set
// (cpu_isa_scalar.cpp, cpu_isa_avx2.cpp, cpu_isa_avx512.cpp) with different flags, and
// picked at run time. Everything here has internal linkage except the one table
// SPECEXT_ISA_TABLE, so no instruction of a wider ISA can leak into another path through
// a shared inline function.
//
// Rounding is the same on every path: s = s + w * stat(x) in float (no FMA contraction,
// the CMake flags set -ffp-contract=off), so the SIMD levels agree bit for bit.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "common.h"
#include "convert.h"
#include "cpu_isa_table.h"

namespace specext {
namespace {

// ---------------------------------------------------------------- scalar building blocks
template <DType D>
inline float load_scalar(const void* p, int64_t i) {
  if constexpr (D == DType::F32) return static_cast<const float*>(p)[i];
  if constexpr (D == DType::F16) return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
  if constexpr (D == DType::BF16) return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
  if constexpr (D == DType::F64) return float(static_cast<const double*>(p)[i]);
  return 0.f;
}

template <DType D>
inline double load_scalar_f64(const void* p, int64_t i) {
  if constexpr (D == DType::F64) return static_cast<const double*>(p)[i];
  return double(load_scalar<D>(p, i));
}

template <Stat S>
inline float stat_scalar(float x) {
  if constexpr (S == Stat::Abs) return std::fabs(x);
  if constexpr (S == Stat::Square) return x * x;
  if constexpr (S == Stat::Relu) return x > 0.f ? x : 0.f;
  return x;
}

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
// `x > 0 ? x : 0` also gives 0, so every path maps NaN to 0 under relu and keeps it
// under abs/square/signed. The binding documents this.

// ---------------------------------------------------------------- category_accumulate row
// s[0:n] += w * stat(a[0:n]); `w == 1` skips the multiply (exact either way).
template <DType D, Stat S, bool Weighted>
void accum_row_t(const void* a, float* s, int64_t n, float w) {
  int64_t i = 0;
#if defined(__AVX512F__) || defined(__AVX2__)
  const vf wv = vset1(w);
  for (; i + 2 * VW <= n; i += 2 * VW) {
    vf x0 = vstat<S>(vload<D>(a, i));
    vf x1 = vstat<S>(vload<D>(a, i + VW));
    if constexpr (Weighted) {
      x0 = vmul(wv, x0);
      x1 = vmul(wv, x1);
    }
    vstoref(s + i, vadd(vloadf(s + i), x0));
    vstoref(s + i + VW, vadd(vloadf(s + i + VW), x1));
  }
  for (; i + VW <= n; i += VW) {
    vf x0 = vstat<S>(vload<D>(a, i));
    if constexpr (Weighted) x0 = vmul(wv, x0);
    vstoref(s + i, vadd(vloadf(s + i), x0));
  }
#endif
  for (; i < n; ++i) {
    float x = stat_scalar<S>(load_scalar<D>(a, i));
    if constexpr (Weighted) x = w * x;
    s[i] = s[i] + x;
  }
}

template <DType D, bool Weighted>
void accum_row_stat(const void* a, float* s, int64_t n, float w, Stat st) {
  switch (st) {
    case Stat::Abs: return accum_row_t<D, Stat::Abs, Weighted>(a, s, n, w);
    case Stat::Square: return accum_row_t<D, Stat::Square, Weighted>(a, s, n, w);
    case Stat::Relu: return accum_row_t<D, Stat::Relu, Weighted>(a, s, n, w);
    case Stat::Signed: return accum_row_t<D, Stat::Signed, Weighted>(a, s, n, w);
  }
}

template <DType D>
void accum_row_dtype(const void* a, float* s, int64_t n, float w, Stat st) {
  if (w == 1.0f)
    accum_row_stat<D, false>(a, s, n, w, st);
  else
    accum_row_stat<D, true>(a, s, n, w, st);
}

void accum_row(const void* a, DType dt, float* s, int64_t n, float w, Stat st) {
  switch (dt) {
    case DType::F32: return accum_row_dtype<DType::F32>(a, s, n, w, st);
    case DType::F16: return accum_row_dtype<DType::F16>(a, s, n, w, st);
    case DType::BF16: return accum_row_dtype<DType::BF16>(a, s, n, w, st);
    default: return;  // the binding admits no other dtype
  }
}

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
    const double x = load_scalar_f64<D>(a, i);
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
      const double x = load_scalar_f64<D>(a, i + k);
      p[k] += x * x;
    }
  for (; i < n; ++i) {
    const double x = load_scalar_f64<D>(a, i);
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

// ---------------------------------------------------------------- neuron_specialization tile
// Natural log in double, branch-free so the loops below vectorise: x = 2^e * m with
// m in [sqrt(1/2), sqrt(2)), ln m = 2 atanh(s), s = (m-1)/(m+1), |s| <= 0.1716; the
// series to s^23 is below 1e-17 relative. Valid for positive normal x.
inline double log_pos(double x) {
  uint64_t b;
  std::memcpy(&b, &x, 8);
  // Exponent field as a double without int->double conversion (AVX2 has none for int64):
  // the bits 2^52 + k read as a double are exactly 2^52 + k.
  const uint64_t eb = (b >> 52) | 0x4330000000000000ull;
  double e0;
  std::memcpy(&e0, &eb, 8);
  e0 -= 4503599627370496.0 + 1023.0;
  const uint64_t mb = (b & 0x000fffffffffffffull) | 0x3ff0000000000000ull;
  double m;
  std::memcpy(&m, &mb, 8);
  const double big = m > 1.4142135623730951 ? 1.0 : 0.0;  // a select, no branch
  m = m * (1.0 - 0.5 * big);
  const double e = e0 + big;
  const double s = (m - 1.0) / (m + 1.0);
  const double s2 = s * s;
  double p = 1.0 / 23;
  p = p * s2 + 1.0 / 21;
  p = p * s2 + 1.0 / 19;
  p = p * s2 + 1.0 / 17;
  p = p * s2 + 1.0 / 15;
  p = p * s2 + 1.0 / 13;
  p = p * s2 + 1.0 / 11;
  p = p * s2 + 1.0 / 9;
  p = p * s2 + 1.0 / 7;
  p = p * s2 + 1.0 / 5;
  p = p * s2 + 1.0 / 3;
  p = p * s2 + 1.0;
  const double ln2_hi = 6.93147180369123816490e-01, ln2_lo = 1.90821492927058770002e-10;
  return e * ln2_hi + (2.0 * s * p + e * ln2_lo);
}

constexpr int L = int(kSpecTile);

// Compare-exchange of rows i and j of a (rows, L) tile: one min and one max per lane.
inline void cmpx_rows(float* __restrict a, float* __restrict b) {
#if defined(__AVX512F__)
  static_assert(L == 16, "one AVX-512 register per tile row");
  const __m512 x = _mm512_loadu_ps(a), y = _mm512_loadu_ps(b);
  _mm512_storeu_ps(a, _mm512_min_ps(x, y));
  _mm512_storeu_ps(b, _mm512_max_ps(x, y));
  return;
#elif defined(__AVX2__)
  static_assert(L == 16, "two AVX2 registers per tile row");
  const __m256 x0 = _mm256_loadu_ps(a), y0 = _mm256_loadu_ps(b);
  const __m256 x1 = _mm256_loadu_ps(a + 8), y1 = _mm256_loadu_ps(b + 8);
  _mm256_storeu_ps(a, _mm256_min_ps(x0, y0));
  _mm256_storeu_ps(b, _mm256_max_ps(x0, y0));
  _mm256_storeu_ps(a + 8, _mm256_min_ps(x1, y1));
  _mm256_storeu_ps(b + 8, _mm256_max_ps(x1, y1));
  return;
#endif
  float lo[L], hi[L];
  for (int l = 0; l < L; ++l) {
    const float x = a[l], y = b[l];
    lo[l] = x < y ? x : y;
    hi[l] = x < y ? y : x;
  }
  for (int l = 0; l < L; ++l) {
    a[l] = lo[l];
    b[l] = hi[l];
  }
}

inline void cmpx(float* t, int64_t i, int64_t j) { cmpx_rows(t + i * L, t + j * L); }

// Sorts each of the L columns of a (n, L) tile ascending with Batcher's merge-exchange
// network (Knuth 5.2.2 M), which works for any n: the same comparisons for every column,
// so each comparator is one vector min and max across L neurons. ~n log^2 n / 4
// comparators, no data-dependent branches.
void sort_columns(float* __restrict t, int64_t n) {
  if (n < 2) return;
  int tbits = 0;
  while ((int64_t(1) << tbits) < n) ++tbits;
  for (int64_t p = int64_t(1) << (tbits - 1); p > 0; p >>= 1) {
    int64_t q = int64_t(1) << (tbits - 1), r = 0, d = p;
    for (;;) {
      // The i with (i & p) == r, r in {0, p}: runs of p starting at r, every 2p.
      for (int64_t base = r; base + d < n; base += 2 * p) {
        const int64_t end = base + p < n - d ? base + p : n - d;
        for (int64_t i = base; i < end; ++i) cmpx(t, i, i + d);
      }
      if (q == p) break;
      d = q - p;
      q >>= 1;
      r = p;
    }
  }
}

// Statistics of neurons [n0, n0 + w), w <= L, over C categories. `buf` is (C, L) scratch.
// Lanes past w are zero-padded and their results dropped.
void spec_tile(const float* mass, int64_t C, int64_t ld, int64_t n0, int64_t w, const SpecializationArgs& o,
               float* __restrict buf) {
  double tot[L], h[L], inv[L], num[L];
  float mx[L];
  int32_t arg[L], bad[L];
  for (int l = 0; l < L; ++l) {
    tot[l] = h[l] = num[l] = 0.0;
    mx[l] = -INFINITY;
    arg[l] = -1;
    bad[l] = 0;
  }
  // Pass 1: copy into the tile; totals, first maximum, validity.
  for (int64_t c = 0; c < C; ++c) {
    const float* row = mass + c * ld + n0;
    float* __restrict b = buf + c * L;
    if (w == L) {
      for (int l = 0; l < L; ++l) b[l] = row[l];
    } else {
      for (int l = 0; l < L; ++l) b[l] = l < w ? row[l] : 0.f;
    }
    const int32_t ci = int32_t(c);
    for (int l = 0; l < L; ++l) {
      const float x = b[l];
      tot[l] += double(x);
      bad[l] |= int32_t(x < 0.f) | int32_t(!(x == x)) | int32_t(x > 3.4028234663852886e38f);
      const bool gt = x > mx[l];
      mx[l] = gt ? x : mx[l];
      arg[l] = gt ? ci : arg[l];
    }
  }
  for (int l = 0; l < L; ++l) inv[l] = tot[l] > 0.0 ? 1.0 / tot[l] : 0.0;
  // Pass 2: entropy -sum p ln p with p = x / total, in double; 0 ln 0 = 0.
  for (int64_t c = 0; c < C; ++c) {
    const float* __restrict b = buf + c * L;
    for (int l = 0; l < L; ++l) {
      const double p = double(b[l]) * inv[l];
      const double pos = p > 0.0 ? 1.0 : 0.0;
      h[l] -= pos * p * log_pos(p + (1.0 - pos));  // p = 0 -> log(1) = 0
    }
  }
  // Pass 3: Gini = sum_i (2i - C - 1) x_(i) / (C * total), i = 1..C over ascending masses.
  sort_columns(buf, C);
  for (int64_t c = 0; c < C; ++c) {
    const float* __restrict b = buf + c * L;
    const double coef = double(2 * (c + 1) - C - 1);
    for (int l = 0; l < L; ++l) num[l] += coef * double(b[l]);
  }
  const double lnC = std::log(double(C));
  for (int64_t l = 0; l < w; ++l) {
    const int64_t n = n0 + l;
    o.total[n] = float(tot[l]);
    if (bad[l] || !(tot[l] > 0.0)) {
      o.entropy[n] = o.norm_entropy[n] = o.gini[n] = o.top_share[n] = NAN;
      o.top_category[n] = -1;
      continue;
    }
    const double H = h[l] > 0.0 ? h[l] : 0.0;  // one-hot columns may round to -0
    o.entropy[n] = float(H);
    o.norm_entropy[n] = C > 1 ? float(H / lnC) : 0.f;
    o.top_category[n] = arg[l];
    o.top_share[n] = float(double(mx[l]) * inv[l]);
    o.gini[n] = float(num[l] / (double(C) * tot[l]));
  }
}

}  // namespace

extern const IsaTable SPECEXT_ISA_TABLE;
const IsaTable SPECEXT_ISA_TABLE = {SPECEXT_ISA_NAME, accum_row, sqnorm_row, sqsum, spec_tile};

}  // namespace specext
