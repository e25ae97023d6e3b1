// The per-element arithmetic that the CPU and CUDA kernels share, compiled for host and
// device alike: 16-bit float conversions, element loads, the accumulate statistics and the
// per-neuron specialisation outputs. One definition, so the scalar CPU loops (and the tails
// of the SIMD loops) round exactly as the CUDA kernels do. The SIMD bodies vectorise their
// own conversions (cpu_simd.h) and are tested bit-identical to these.
//
// Internal linkage (an unnamed namespace): each CPU SIMD translation unit gets its own
// copy, compiled with its own flags, so the linker cannot hand an AVX-512 build of a
// helper to the scalar path.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common.h"
#include "kernels.h"

#if defined(__CUDACC__)
#define SPECEXT_HD __host__ __device__
#else
#define SPECEXT_HD
#endif

namespace specext {
namespace {

// ---------------------------------------------------------------- bits and rounding
// memcpy is the portable bit cast on host and device alike (nvcc has a device memcpy);
// both compilers reduce it to a register move.
template <class To, class From>
SPECEXT_HD inline To bit_cast(const From& x) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast between types of different sizes");
  To y;
  memcpy(&y, &x, sizeof(To));
  return y;
}

// a * b and a + b rounded once each: nvcc would otherwise contract a * b + c into an FMA
// (host code is built with -ffp-contract=off, so plain operators already are).
SPECEXT_HD inline float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

SPECEXT_HD inline float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// ---------------------------------------------------------------- 16-bit floats, by hand
// No dependence on compiler support for _Float16/__bf16 or on cuda_fp16.h.
SPECEXT_HD inline float bf16_to_f32(uint16_t h) { return bit_cast<float>(uint32_t(h) << 16); }

// Branch-free IEEE half -> float: place exponent+mantissa in float position and rebias by
// multiplying with 2^112, which also turns half subnormals into exact float normals.
SPECEXT_HD inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;
  float f = bit_cast<float>(em << 13) * 0x1p112f;
  uint32_t u = bit_cast<uint32_t>(f);
  u = (em >= 0x7c00u) ? ((em << 13) | 0x7f800000u) : u;  // inf / nan keep their payload
  return bit_cast<float>(u | sign);
}

// ---------------------------------------------------------------- element loads
template <DType D>
SPECEXT_HD inline float load_as_f32(const void* p, int64_t i) {
  if constexpr (D == DType::F32) return static_cast<const float*>(p)[i];
  if constexpr (D == DType::F16) return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
  if constexpr (D == DType::BF16) return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
  if constexpr (D == DType::F64) return float(static_cast<const double*>(p)[i]);
  return 0.f;
}

// float64 stays float64 (value_vector_norms reads float64 weights without rounding).
template <DType D>
SPECEXT_HD inline double load_as_f64(const void* p, int64_t i) {
  if constexpr (D == DType::F64) return static_cast<const double*>(p)[i];
  return double(load_as_f32<D>(p, i));
}

SPECEXT_HD inline int64_t load_label(const void* p, bool i32, int64_t i, int64_t stride) {
  return i32 ? int64_t(static_cast<const int32_t*>(p)[i * stride]) : static_cast<const int64_t*>(p)[i * stride];
}

// ---------------------------------------------------------------- category_accumulate
// The per-token statistic. relu maps NaN to 0 (as x86 max_ps(NaN, 0) does in the SIMD
// paths); abs, square and signed keep NaN.
template <Stat S>
SPECEXT_HD inline float apply_stat(float x) {
  if constexpr (S == Stat::Abs) return fabsf(x);
  if constexpr (S == Stat::Square) return mul_rn(x, x);
  if constexpr (S == Stat::Relu) return x > 0.f ? x : 0.f;
  return x;
}

// ---------------------------------------------------------------- neuron_specialization
// A mass that makes its neuron invalid: negative, NaN or infinite. Branch-free (bitwise
// or), so the CPU tile loop vectorises.
SPECEXT_HD inline bool invalid_mass(float x) {
  return (x < 0.f) | !(x == x) | (x > 3.4028234663852886e38f);
}

// Writes neuron n's outputs from its reductions over the C categories: total mass, whether
// a mass was invalid, entropy -sum p ln p, the first maximum (index and mass), and the Gini
// numerator sum_i (2i - C - 1) x_(i) over ascending masses. lnC = ln C. Dead (total 0) and
// invalid neurons get NaN statistics and top_category -1, with the total still reported.
SPECEXT_HD inline void store_neuron_stats(const SpecializationArgs& o, int64_t n, int64_t C, double lnC, double tot,
                                          bool bad, double entropy, int64_t top, float top_mass, double gini_num) {
  o.total[n] = float(tot);
  if (bad || !(tot > 0.0)) {
    o.entropy[n] = o.norm_entropy[n] = o.gini[n] = o.top_share[n] = NAN;
    o.top_category[n] = -1;
    return;
  }
  const double H = entropy > 0.0 ? entropy : 0.0;  // one-hot columns may round to -0
  o.entropy[n] = float(H);
  o.norm_entropy[n] = C > 1 ? float(H / lnC) : 0.f;
  o.top_category[n] = top;
  o.top_share[n] = float(double(top_mass) * (1.0 / tot));
  o.gini[n] = float(gini_num / (double(C) * tot));
}

}  // namespace
}  // namespace specext
