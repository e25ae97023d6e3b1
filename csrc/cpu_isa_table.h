#pragma once
#include <cstdint>

#include "common.h"
#include "kernels.h"

namespace specext {

// Neurons per neuron_specialization tile: one SIMD register of floats on AVX-512.
constexpr int64_t kSpecTile = 16;

// The inner loops of the CPU kernels for one instruction set.
struct IsaTable {
  const char* name;
  void (*accum_row)(const void* a, DType dt, float* s, int64_t n, float w, Stat st);
  void (*sqnorm_row)(const void* a, DType dt, double* acc, int64_t n);
  double (*sqsum)(const void* a, DType dt, int64_t n);  // sum of squares of n contiguous
  // buf: (C, kSpecTile) float scratch.
  void (*spec_tile)(const float* mass, int64_t C, int64_t ld, int64_t n0, int64_t w,
                    const SpecializationArgs& o, float* buf);
};

extern const IsaTable kIsaScalar;
#if defined(SPECEXT_HAVE_X86_ISAS)
extern const IsaTable kIsaAvx2;
extern const IsaTable kIsaAvx512;
#endif

}  // namespace specext
