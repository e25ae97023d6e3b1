// neuron_specialization tile, compiled once per instruction set (cpu_isa.h).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common.h"
#include "cpu_isa_table.h"
#include "cpu_simd.h"
#include "hostdevice.h"
#include "kernels.h"

namespace specext {
namespace {

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
      bad[l] |= int32_t(invalid_mass(x));
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
  for (int64_t l = 0; l < w; ++l)
    store_neuron_stats(o, n0 + l, C, lnC, tot[l], bad[l] != 0, h[l], arg[l], mx[l], num[l]);
}

}  // namespace
}  // namespace specext
