// CUDA kernels. Same contracts as the CPU path (kernels.h); every launch goes to the
// caller's stream on the tensors' device.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "common.h"
#include "kernels.h"

namespace specext {

namespace {

#define SPECEXT_CUDA_CHECK(expr)                                                                 \
  do {                                                                                           \
    cudaError_t err_ = (expr);                                                                   \
    SPECEXT_CHECK(err_ == cudaSuccess, RuntimeError, "CUDA error in " #expr ": " << cudaGetErrorString(err_)); \
  } while (0)

// Makes `device` current for the scope and restores the previous one: this extension
// links its own CUDA runtime, so it cannot rely on the framework's current device.
struct DeviceGuard {
  int prev = -1;
  explicit DeviceGuard(int device) {
    SPECEXT_CUDA_CHECK(cudaGetDevice(&prev));
    if (prev != device) SPECEXT_CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceGuard() {
    int cur = -1;
    if (cudaGetDevice(&cur) == cudaSuccess && cur != prev && prev >= 0) cudaSetDevice(prev);
  }
};

__host__ __device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

template <DType D>
__device__ __forceinline__ float load_f(const void* p, int64_t i) {
  if constexpr (D == DType::F32) return static_cast<const float*>(p)[i];
  if constexpr (D == DType::F16) return __half2float(static_cast<const __half*>(p)[i]);
  if constexpr (D == DType::BF16) return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  if constexpr (D == DType::F64) return float(static_cast<const double*>(p)[i]);
  return 0.f;
}

template <DType D>
__device__ __forceinline__ double load_d(const void* p, int64_t i) {
  if constexpr (D == DType::F64) return static_cast<const double*>(p)[i];
  return double(load_f<D>(p, i));
}

__device__ __forceinline__ int64_t load_label(const void* p, bool i32, int64_t t, int64_t stride) {
  return i32 ? int64_t(static_cast<const int32_t*>(p)[t * stride]) : static_cast<const int64_t*>(p)[t * stride];
}

template <Stat S>
__device__ __forceinline__ float stat_f(float x) {
  if constexpr (S == Stat::Abs) return fabsf(x);
  if constexpr (S == Stat::Square) return __fmul_rn(x, x);
  if constexpr (S == Stat::Relu) return x > 0.f ? x : 0.f;
  return x;
}

// ------------------------------------------------------------------ label check
__global__ void first_bad_label_kernel(const void* labels, bool i32, int64_t T, int64_t stride, int64_t C,
                                       unsigned long long* first) {
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < T; t += int64_t(gridDim.x) * blockDim.x)
    if (load_label(labels, i32, t, stride) >= C) atomicMin(first, (unsigned long long)t);
}

__global__ void counts_kernel(const void* labels, bool i32, int64_t T, int64_t stride, const float* w,
                              int64_t w_stride, float* counts, int64_t counts_stride) {
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < T; t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t lab = load_label(labels, i32, t, stride);
    if (lab >= 0) atomicAdd(counts + lab * counts_stride, w ? w[t * w_stride] : 1.0f);
  }
}

// ------------------------------------------------------------------ category_accumulate
// Grid: x over column groups of kThreads * kVec columns, y over token chunks (grid-strided
// past 65535 chunks). Thread x of a block owns columns base + v * kThreads + x, so every
// load and every atomic of a warp covers adjacent columns. Each thread keeps running sums
// in registers while consecutive tokens share a label and adds them to `sums` with one
// atomic per run: tokens of one prompt share a category, so runs are long in real use.
// Labels and weights of the chunk are staged in shared memory.
constexpr int kThreads = 128;
constexpr int kChunk = 256;
constexpr int kVec = 4;

template <DType D, Stat S>
__global__ void __launch_bounds__(kThreads) accumulate_kernel(AccumulateArgs a, bool i32) {
  __shared__ int64_t s_lab[kChunk];
  __shared__ float s_w[kChunk];
  const int64_t base = int64_t(blockIdx.x) * kThreads * kVec + threadIdx.x;
  const int64_t nchunks = (a.T + kChunk - 1) / kChunk;
  for (int64_t chunk = blockIdx.y; chunk < nchunks; chunk += gridDim.y) {
    const int64_t t0 = chunk * kChunk;
    const int64_t tn = imin(kChunk, a.T - t0);
    __syncthreads();  // the previous chunk's readers are done with s_lab / s_w
    for (int i = threadIdx.x; i < tn; i += blockDim.x) {
      s_lab[i] = load_label(a.labels, i32, t0 + i, a.labels_stride);
      s_w[i] = a.weights ? a.weights[(t0 + i) * a.weights_stride] : 1.0f;
    }
    __syncthreads();
    float acc[kVec];
#pragma unroll
    for (int v = 0; v < kVec; ++v) acc[v] = 0.f;
    int64_t cur = -1;
    for (int64_t i = 0; i < tn; ++i) {
      const int64_t lab = s_lab[i];
      if (lab < 0) continue;
      if (lab != cur) {  // uniform across the block: every thread sees the same labels
        if (cur >= 0) {
#pragma unroll
          for (int v = 0; v < kVec; ++v) {
            const int64_t n = base + int64_t(v) * kThreads;
            if (n < a.N) atomicAdd(a.sums + cur * a.sums_stride0 + n, acc[v]);
            acc[v] = 0.f;
          }
        }
        cur = lab;
      }
      const float w = s_w[i];
      const int64_t row = (t0 + i) * a.acts_stride0;
#pragma unroll
      for (int v = 0; v < kVec; ++v) {
        const int64_t n = base + int64_t(v) * kThreads;
        if (n < a.N) acc[v] = __fadd_rn(acc[v], __fmul_rn(w, stat_f<S>(load_f<D>(a.acts, row + n))));
      }
    }
    if (cur >= 0) {
#pragma unroll
      for (int v = 0; v < kVec; ++v) {
        const int64_t n = base + int64_t(v) * kThreads;
        if (n < a.N) atomicAdd(a.sums + cur * a.sums_stride0 + n, acc[v]);
      }
    }
  }
}

template <DType D>
void launch_accumulate(const AccumulateArgs& a, bool i32, cudaStream_t st) {
  const int64_t nchunks = (a.T + kChunk - 1) / kChunk;
  dim3 grid(unsigned((a.N + kThreads * kVec - 1) / (kThreads * kVec)), unsigned(imin(nchunks, 65535)));
  switch (a.stat) {
    case Stat::Abs: accumulate_kernel<D, Stat::Abs><<<grid, kThreads, 0, st>>>(a, i32); break;
    case Stat::Square: accumulate_kernel<D, Stat::Square><<<grid, kThreads, 0, st>>>(a, i32); break;
    case Stat::Relu: accumulate_kernel<D, Stat::Relu><<<grid, kThreads, 0, st>>>(a, i32); break;
    case Stat::Signed: accumulate_kernel<D, Stat::Signed><<<grid, kThreads, 0, st>>>(a, i32); break;
  }
}

// ------------------------------------------------------------------ neuron_specialization
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
      bad |= !(x >= 0.f && x <= 3.4028234663852886e38f);
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
  if (!live) return;
  a.total[n] = float(tot);
  if (!ok) {
    a.entropy[n] = a.norm_entropy[n] = a.gini[n] = a.top_share[n] = NAN;
    a.top_category[n] = -1;
    return;
  }
  h = h > 0.0 ? h : 0.0;
  a.entropy[n] = float(h);
  a.norm_entropy[n] = a.C > 1 ? float(h / log(double(a.C))) : 0.f;
  a.top_category[n] = arg;
  a.top_share[n] = float(double(mx) * inv);
  a.gini[n] = float(gsum / (double(a.C) * tot));
}

// ------------------------------------------------------------------ value_vector_norms
// Block (32 columns x 8 row groups); any strides (coalesced when columns are adjacent).
template <DType D>
__global__ void norms_kernel(NormsArgs a) {
  __shared__ double part[8][33];
  const int64_t j = int64_t(blockIdx.x) * 32 + threadIdx.x;
  double s = 0.0;
  if (j < a.K)
    for (int64_t r = threadIdx.y; r < a.R; r += 8) {
      const double x = load_d<D>(a.weight, r * a.stride0 + j * a.stride1);
      s += x * x;
    }
  part[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && j < a.K) {
    double t = 0.0;
    for (int y = 0; y < 8; ++y) t += part[y][threadIdx.x];
    a.out[j] = float(sqrt(t));
  }
}

}  // namespace

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // no driver / no device: clear the sticky error and report none
    return 0;
  }
  return n;
}

void category_accumulate_cuda(const AccumulateArgs& a, int device, void* stream) {
  if (a.T == 0) return;
  DeviceGuard guard(device);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const bool i32 = a.labels_dtype == DType::I32;
  // Refuse labels >= C before anything is written: one small reduction and a sync.
  unsigned long long* d_first = nullptr;
  SPECEXT_CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&d_first), sizeof(unsigned long long), st));
  SPECEXT_CUDA_CHECK(cudaMemsetAsync(d_first, 0xff, sizeof(unsigned long long), st));
  const unsigned blocks = unsigned(imin((a.T + 255) / 256, 1024));
  first_bad_label_kernel<<<blocks, 256, 0, st>>>(a.labels, i32, a.T, a.labels_stride, a.C, d_first);
  unsigned long long first = 0;
  SPECEXT_CUDA_CHECK(cudaMemcpyAsync(&first, d_first, sizeof(first), cudaMemcpyDeviceToHost, st));
  SPECEXT_CUDA_CHECK(cudaFreeAsync(d_first, st));
  SPECEXT_CUDA_CHECK(cudaStreamSynchronize(st));
  if (first != ~0ull) {
    int64_t bad_label = 0;
    const int64_t esz = i32 ? 4 : 8;
    const char* src = static_cast<const char*>(a.labels) + int64_t(first) * a.labels_stride * esz;
    int32_t l32 = 0;
    SPECEXT_CUDA_CHECK(cudaMemcpy(i32 ? static_cast<void*>(&l32) : static_cast<void*>(&bad_label), src, esz,
                                  cudaMemcpyDeviceToHost));
    if (i32) bad_label = l32;
    SPECEXT_CHECK(false, ValueError,
                  "labels[" << first << "] = " << bad_label << " is out of range for num_categories = " << a.C
                            << " (labels must be < num_categories; negative labels skip the token); nothing was written");
  }
  counts_kernel<<<blocks, 256, 0, st>>>(a.labels, i32, a.T, a.labels_stride, a.weights, a.weights_stride, a.counts,
                                        a.counts_stride);
  SPECEXT_CUDA_CHECK(cudaGetLastError());
  if (a.N == 0) return;
  switch (a.acts_dtype) {
    case DType::F32: launch_accumulate<DType::F32>(a, i32, st); break;
    case DType::F16: launch_accumulate<DType::F16>(a, i32, st); break;
    case DType::BF16: launch_accumulate<DType::BF16>(a, i32, st); break;
    default: SPECEXT_CHECK(false, TypeError, "acts dtype " << dtype_name(a.acts_dtype) << " is not supported");
  }
  SPECEXT_CUDA_CHECK(cudaGetLastError());
}

void neuron_specialization_cuda(const SpecializationArgs& a, int device, void* stream) {
  if (a.N == 0) return;
  SPECEXT_CHECK(a.C > 0, ValueError, "mass must have at least one category (row), got 0");
  DeviceGuard guard(device);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  specialization_kernel<<<unsigned((a.N + kSpecThreads - 1) / kSpecThreads), kSpecThreads, 0, st>>>(a);
  SPECEXT_CUDA_CHECK(cudaGetLastError());
}

void value_vector_norms_cuda(const NormsArgs& a, int device, void* stream) {
  if (a.K == 0) return;
  DeviceGuard guard(device);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  dim3 block(32, 8), grid(unsigned((a.K + 31) / 32));
  switch (a.dtype) {
    case DType::F32: norms_kernel<DType::F32><<<grid, block, 0, st>>>(a); break;
    case DType::F16: norms_kernel<DType::F16><<<grid, block, 0, st>>>(a); break;
    case DType::BF16: norms_kernel<DType::BF16><<<grid, block, 0, st>>>(a); break;
    case DType::F64: norms_kernel<DType::F64><<<grid, block, 0, st>>>(a); break;
    default: SPECEXT_CHECK(false, TypeError, "weight dtype " << dtype_name(a.dtype) << " is not supported");
  }
  SPECEXT_CUDA_CHECK(cudaGetLastError());
}

}  // namespace specext
