// neuron_specialization on CUDA: one thread per neuron, Gini from pairwise differences;
// same contract as the CPU path (kernels.h).
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "common.h"
#include "cuda_common.cuh"
#include "hostdevice.h"
#include "kernels.h"

namespace specext {

namespace {

// One thread per neuron; a block's 128 neurons are adjacent columns, so every row read is
// coalesced. Gini needs no sort: sum_{i<j} |x_i - x_j| = sum_i (2i - C - 1) x_(i) over the
// ascending masses, so G = sum_{i<j} |x_i - x_j| / (C * total); O(C^2) per neuron, with
// row tiles staged in shared memory.
constexpr int kSpecThreads = 128;
constexpr int kSpecRows = 48;

__global__ void __launch_bounds__(kSpecThreads) specialization_kernel(SpecializationArgs a) {
  __shared__ float tile[kSpecRows][kSpecThreads];
  const int64_t n = int64_t(blockIdx.x) * kSpecThreads + threadIdx.x;
  const bool live = n < a.N;
  double tot = 0.0;
  float mx = -INFINITY;
  int64_t arg = -1;
  bool bad = false;
  if (live) {
    for (int64_t c = 0; c < a.C; ++c) {
      const float x = a.mass[c * a.mass_stride0 + n];
      tot += double(x);
      bad |= invalid_mass(x);
      if (x > mx) {
        mx = x;
        arg = c;
      }
    }
  }
  const bool ok = live && !bad && tot > 0.0;
  const double inv = ok ? 1.0 / tot : 0.0;
  double h = 0.0;
  if (ok) {
    for (int64_t c = 0; c < a.C; ++c) {
      const double p = double(a.mass[c * a.mass_stride0 + n]) * inv;
      if (p > 0.0) h -= p * log(p);
    }
  }
  // Pairwise absolute differences, j-rows staged in shared memory (all threads join the
  // loads and barriers, dead or alive).
  double gsum = 0.0;
  for (int64_t j0 = 0; j0 < a.C; j0 += kSpecRows) {
    const int rows = int(imin(kSpecRows, a.C - j0));
    __syncthreads();
    for (int r = 0; r < rows; ++r) tile[r][threadIdx.x] = live ? a.mass[(j0 + r) * a.mass_stride0 + n] : 0.f;
    __syncthreads();
    if (ok) {
      for (int64_t i = 0; i < imin(a.C, j0 + rows); ++i) {
        const float xi = a.mass[i * a.mass_stride0 + n];
        float part = 0.f;
        const int rstart = i >= j0 ? int(i - j0) + 1 : 0;
        for (int r = rstart; r < rows; ++r) part += fabsf(xi - tile[r][threadIdx.x]);
        gsum += double(part);
      }
    }
  }
  if (live) store_neuron_stats(a, n, a.C, log(double(a.C)), tot, bad, h, arg, mx, gsum);
}

}  // namespace

void neuron_specialization_cuda(const SpecializationArgs& a, int device, void* stream) {
  if (a.N == 0) return;
  SPECEXT_CHECK(a.C > 0, ValueError, "mass must have at least one category (row), got 0");
  DeviceGuard guard(device);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  specialization_kernel<<<unsigned((a.N + kSpecThreads - 1) / kSpecThreads), kSpecThreads, 0, st>>>(a);
  SPECEXT_CUDA_CHECK(cudaGetLastError());
}

}  // namespace specext
