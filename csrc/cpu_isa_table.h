// The CPU inner loops as a table of function pointers, one table per instruction set
// (cpu_isa.h), chosen at run time by cpu_dispatch.cpp.
#pragma once
#include <cstdint>

#include "common.h"
#include "kernels.h"

namespace specext {

// Neurons per neuron_specialization tile: one SIMD register of floats on AVX-512.
constexpr int64_t kSpecTile = 16;

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

// The table in use: the best level this CPU supports, capped by SPECEXT_SIMD, or the one
// set_simd_level chose.
const IsaTable& isa_table();

}  // namespace specext
