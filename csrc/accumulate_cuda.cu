// category_accumulate on CUDA: label check (or, unchecked, the error record on the device),
// counts, and the accumulation kernel; same contract as the CPU path (kernels.h), every
// launch on the caller's stream.
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>

#include "common.h"
#include "cuda_common.cuh"
#include "hostdevice.h"
#include "kernels.h"

namespace specext {

namespace {

// ------------------------------------------------------------------ label check
__global__ void first_bad_label_kernel(const void* labels, bool i32, int64_t T, int64_t stride, int64_t C,
                                       unsigned long long* first) {
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < T; t += int64_t(gridDim.x) * blockDim.x)
    if (load_label(labels, i32, t, stride) >= C) atomicMin(first, (unsigned long long)t);
}

// Unchecked mode (AccumulateArgs::errors): every bad token adds 1 to errors[0]. The first
// one's index is staged in errors[1] as INT64_MIN + t: negative, so atomicMin keeps the
// lowest index and beats 0 ("none"). A positive errors[1] is a label recorded by an earlier
// call (this call only ever writes negatives there), which is kept. resolve_first_bad_kernel,
// next on the stream, turns the staged index into the label (errors[1]) and index (errors[2]).
constexpr long long kStaged = -0x7fffffffffffffffLL - 1;

__device__ void note_bad_token(int64_t* e, int64_t s, int64_t t) {
  atomicAdd(reinterpret_cast<unsigned long long*>(e), 1ull);
  if (*reinterpret_cast<volatile long long*>(e + s) <= 0) atomicMin(reinterpret_cast<long long*>(e + s), kStaged + t);
}

__global__ void resolve_first_bad_kernel(const void* labels, bool i32, int64_t stride, int64_t* e, int64_t s) {
  const long long staged = e[s];
  if (staged >= 0) return;
  const int64_t t = staged - kStaged;
  e[2 * s] = t;
  e[s] = load_label(labels, i32, t, stride);
}

// Counts of the tokens with 0 <= label < C; in unchecked mode also the error record.
__global__ void counts_kernel(const AccumulateArgs a, bool i32) {
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < a.T; t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t lab = load_label(a.labels, i32, t, a.labels_stride);
    if (lab >= a.C) {
      if (a.errors) note_bad_token(a.errors, a.errors_stride, t);
    } else if (lab >= 0) {
      atomicAdd(a.counts + lab * a.counts_stride, a.weights ? a.weights[t * a.weights_stride] : 1.0f);
    }
  }
}

// ------------------------------------------------------------------ category_accumulate
// Grid: x over column groups of kThreads * kVec columns, y over chunks of `chunk_len` tokens
// (grid-strided past 65535 chunks). Thread x of a block owns columns base + v * kThreads + x,
// so every load and every atomic of a warp covers adjacent columns. Each thread keeps
// running sums in registers while consecutive tokens share a label and adds them to `sums`
// with one atomic per run: tokens of one prompt share a category, so runs are long in real
// use. Labels and weights of the chunk are staged in shared memory.
constexpr int kThreads = 128;
constexpr int kMaxChunk = 256;
constexpr int kVec = 4;

template <DType D, Stat S>
__global__ void __launch_bounds__(kThreads) accumulate_kernel(AccumulateArgs a, bool i32, int64_t chunk_len) {
  __shared__ int64_t s_lab[kMaxChunk];
  __shared__ float s_w[kMaxChunk];
  const int64_t base = int64_t(blockIdx.x) * kThreads * kVec + threadIdx.x;
  const int64_t nchunks = (a.T + chunk_len - 1) / chunk_len;
  for (int64_t chunk = blockIdx.y; chunk < nchunks; chunk += gridDim.y) {
    const int64_t t0 = chunk * chunk_len;
    const int64_t tn = imin(chunk_len, a.T - t0);
    __syncthreads();  // the previous chunk's readers are done with s_lab / s_w
    for (int i = threadIdx.x; i < tn; i += blockDim.x) {
      const int64_t lab = load_label(a.labels, i32, t0 + i, a.labels_stride);
      s_lab[i] = lab < a.C ? lab : -1;  // unchecked mode: a bad label is skipped like a negative one
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
        if (n < a.N) acc[v] = add_rn(acc[v], mul_rn(w, apply_stat<S>(load_as_f32<D>(a.acts, row + n))));
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

// Streaming multiprocessors of `device`, asked once per device (an attribute query, not a
// stream operation: allowed while a graph is being captured).
int multiprocessors(int device) {
  static std::atomic<int> cache[64] = {};
  if (device < 0 || device >= 64) return 0;
  int n = cache[device].load(std::memory_order_relaxed);
  if (n == 0) {
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || n <= 0) {
      cudaGetLastError();
      return 0;
    }
    cache[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

// Tokens per block. 256-token chunks fill a GPU only for long inputs: a forward hook of a 1B
// model sees about 2048 tokens x 8192 columns, i.e. 16 column groups x 8 chunks = 128 blocks
// of 4 warps, one per SM, too few loads in flight to use the memory bandwidth. So chunks
// shrink (down to 32 tokens) until there are about 8 blocks per SM; each extra chunk costs
// a barrier pair and one atomic per label run and column. SPECEXT_CUDA_CHUNK=N (1-256)
// fixes the length, for benchmarks and tests.
int64_t chunk_length(int64_t T, int64_t col_groups, int device) {
  if (const char* env = std::getenv("SPECEXT_CUDA_CHUNK")) {
    char* end = nullptr;
    const long v = std::strtol(env, &end, 10);
    if (end != env && *end == '\0' && v >= 1 && v <= kMaxChunk) return v;
  }
  const int sms = multiprocessors(device);
  if (sms <= 0 || T <= 32) return kMaxChunk;
  const int64_t want_chunks = (8 * int64_t(sms) + col_groups - 1) / col_groups;
  int64_t len = (T + want_chunks - 1) / want_chunks;
  len = (len + 31) / 32 * 32;  // whole warps of tokens for the staging loop
  return len < 32 ? 32 : len > kMaxChunk ? kMaxChunk : len;
}

template <DType D>
void launch_accumulate(const AccumulateArgs& a, bool i32, int device, cudaStream_t st) {
  const int64_t col_groups = (a.N + kThreads * kVec - 1) / (kThreads * kVec);
  const int64_t len = chunk_length(a.T, col_groups, device);
  const int64_t nchunks = (a.T + len - 1) / len;
  dim3 grid(unsigned(col_groups), unsigned(imin(nchunks, 65535)));
  switch (a.stat) {
    case Stat::Abs: accumulate_kernel<D, Stat::Abs><<<grid, kThreads, 0, st>>>(a, i32, len); break;
    case Stat::Square: accumulate_kernel<D, Stat::Square><<<grid, kThreads, 0, st>>>(a, i32, len); break;
    case Stat::Relu: accumulate_kernel<D, Stat::Relu><<<grid, kThreads, 0, st>>>(a, i32, len); break;
    case Stat::Signed: accumulate_kernel<D, Stat::Signed><<<grid, kThreads, 0, st>>>(a, i32, len); break;
  }
}

// Checked mode: refuse labels >= C before anything is written (one small reduction, a copy
// and a stream synchronisation per call). Everything runs on the caller's stream; the
// scratch word is freed on every path, errors included.
struct StreamScratch {
  unsigned long long* p = nullptr;
  cudaStream_t st;
  explicit StreamScratch(cudaStream_t s) : st(s) {
    SPECEXT_CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&p), 2 * sizeof(unsigned long long), st));
  }
  ~StreamScratch() { cudaFreeAsync(p, st); }
  StreamScratch(const StreamScratch&) = delete;
  StreamScratch& operator=(const StreamScratch&) = delete;
};

__global__ void read_label_kernel(const void* labels, bool i32, int64_t stride, const unsigned long long* first,
                                  unsigned long long* out) {
  if (*first != ~0ull) out[0] = static_cast<unsigned long long>(load_label(labels, i32, int64_t(*first), stride));
}

void check_labels(const AccumulateArgs& a, bool i32, unsigned blocks, cudaStream_t st) {
  StreamScratch scratch(st);  // [0] first bad token (~0 if none), [1] its label
  SPECEXT_CUDA_CHECK(cudaMemsetAsync(scratch.p, 0xff, sizeof(unsigned long long), st));
  first_bad_label_kernel<<<blocks, 256, 0, st>>>(a.labels, i32, a.T, a.labels_stride, a.C, scratch.p);
  read_label_kernel<<<1, 1, 0, st>>>(a.labels, i32, a.labels_stride, scratch.p, scratch.p + 1);
  SPECEXT_CUDA_CHECK(cudaGetLastError());
  unsigned long long host[2] = {0, 0};
  SPECEXT_CUDA_CHECK(cudaMemcpyAsync(host, scratch.p, sizeof(host), cudaMemcpyDeviceToHost, st));
  SPECEXT_CUDA_CHECK(cudaStreamSynchronize(st));
  if (host[0] != ~0ull) {
    const int64_t bad_label = static_cast<int64_t>(host[1]);
    SPECEXT_CHECK(false, ValueError,
                  "labels[" << host[0] << "] = " << bad_label << " is out of range for num_categories = " << a.C
                            << " (labels must be < num_categories; negative labels skip the token); nothing was written");
  }
}

}  // namespace

void category_accumulate_cuda(const AccumulateArgs& a, int device, void* stream) {
  if (a.T == 0) return;
  DeviceGuard guard(device);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const bool i32 = a.labels_dtype == DType::I32;
  const unsigned blocks = unsigned(imin((a.T + 255) / 256, 1024));
  // Unchecked mode issues no allocation, copy or synchronisation: graph-capturable.
  if (!a.errors) check_labels(a, i32, blocks, st);
  counts_kernel<<<blocks, 256, 0, st>>>(a, i32);
  if (a.errors) resolve_first_bad_kernel<<<1, 1, 0, st>>>(a.labels, i32, a.labels_stride, a.errors, a.errors_stride);
  SPECEXT_CUDA_CHECK(cudaGetLastError());
  if (a.N == 0) return;
  switch (a.acts_dtype) {
    case DType::F32: launch_accumulate<DType::F32>(a, i32, device, st); break;
    case DType::F16: launch_accumulate<DType::F16>(a, i32, device, st); break;
    case DType::BF16: launch_accumulate<DType::BF16>(a, i32, device, st); break;
    default: SPECEXT_CHECK(false, TypeError, "acts dtype " << dtype_name(a.acts_dtype) << " is not supported");
  }
  SPECEXT_CUDA_CHECK(cudaGetLastError());
}

}  // namespace specext
