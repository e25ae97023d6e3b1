// category_accumulate inner loop, compiled once per instruction set (cpu_isa.h).
//
// Rounding is the same on every path: s = s + w * stat(x) in float (no FMA contraction,
// the CMake flags set -ffp-contract=off), so the SIMD levels agree bit for bit.
#pragma once
#include <cstdint>

#include "common.h"
#include "cpu_simd.h"
#include "hostdevice.h"

namespace specext {
namespace {

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
    float x = apply_stat<S>(load_as_f32<D>(a, i));
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
}  // namespace
}  // namespace specext
