// Kernel entry points on raw pointers. Strides are in elements. Callers (the binding)
// have validated shapes, dtypes and devices; kernels validate data (labels) themselves.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "common.h"

namespace specext {

struct AccumulateArgs {
  const void* acts = nullptr;  // (T, N), unit stride along N
  DType acts_dtype = DType::F32;
  int64_t T = 0, N = 0, acts_stride0 = 0;
  const void* labels = nullptr;  // (T,)
  DType labels_dtype = DType::I64;
  int64_t labels_stride = 1;
  const float* weights = nullptr;  // (T,) or null
  int64_t weights_stride = 1;
  float* sums = nullptr;  // (C, N), unit stride along N
  int64_t C = 0, sums_stride0 = 0;
  float* counts = nullptr;  // (C,)
  int64_t counts_stride = 1;
  Stat stat = Stat::Abs;
  // Null: checked mode, a label >= C throws ValueError before anything is written (on CUDA
  // that costs a stream synchronisation). Non-null: unchecked mode, for callers that build
  // their labels themselves: a token whose label is >= C is skipped (never written) and
  // recorded here on the device, with no allocation, copy or synchronisation:
  // errors[0] += number of such tokens; errors[1] = the first such label and errors[2] its
  // token index, unless errors[1] already holds one (from an earlier call; 0 = none, since
  // a bad label is >= C >= 1). Starts as zeros; the caller reads it once per batch.
  int64_t* errors = nullptr;  // (3,) int64
  int64_t errors_stride = 1;
};

struct SpecializationArgs {
  const float* mass = nullptr;  // (C, N), unit stride along N
  int64_t C = 0, N = 0, mass_stride0 = 0;
  // Outputs, each (N,) contiguous.
  float* entropy = nullptr;
  float* norm_entropy = nullptr;
  float* gini = nullptr;
  int64_t* top_category = nullptr;
  float* top_share = nullptr;
  float* total = nullptr;
};

struct NormsArgs {
  const void* weight = nullptr;  // (R, K) = (d_model, d_ff), any strides
  DType dtype = DType::F32;
  int64_t R = 0, K = 0, stride0 = 0, stride1 = 1;
  float* out = nullptr;  // (K,) contiguous
};

// ---- CPU (thread pool, runtime SIMD dispatch) ----
void category_accumulate_cpu(const AccumulateArgs& a);
void neuron_specialization_cpu(const SpecializationArgs& a);
void value_vector_norms_cpu(const NormsArgs& a);

// Index of the first label >= C, or -1. Used to refuse bad labels before any write.
int64_t first_bad_label_cpu(const void* labels, DType dt, int64_t T, int64_t stride, int64_t C);
int64_t label_at_cpu(const void* labels, DType dt, int64_t i, int64_t stride);

// SIMD level control: "scalar", "avx2", "avx512" (x86) as built and supported.
std::string simd_level();
std::vector<std::string> simd_levels_available();
void set_simd_level(const std::string& level);

// ---- CUDA (only when built with SPECEXT_WITH_CUDA) ----
// `stream` is a cudaStream_t passed as void* so this header stays CUDA-free.
void category_accumulate_cuda(const AccumulateArgs& a, int device, void* stream);
void neuron_specialization_cuda(const SpecializationArgs& a, int device, void* stream);
void value_vector_norms_cuda(const NormsArgs& a, int device, void* stream);
int cuda_device_count();

}  // namespace specext
