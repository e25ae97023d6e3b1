// A CPU emulation of the part of the CUDA programming model that csrc/*_cuda.cu uses, so
// that the CUDA kernels run (and are tested against the float64 references) on a machine
// without a GPU. Test-only: tests/cuda_emu.py compiles the unchanged kernel sources as C++
// with this header first on the include path, after rewriting each `k<<<g, b, s, st>>>(...)`
// launch into `::specext_emu::launch(...)`.
//
// Execution model (runtime.cpp): blocks run one after another; the threads of a block are
// fibers (ucontext) on the calling thread, switched only at __syncthreads() and at kernel
// exit. Between two barriers the threads run one at a time in an order chosen per phase
// (forward, reverse or a seeded shuffle), so a read of shared memory that another thread
// writes without a barrier in between sees a different value under some order: the tests
// run every kernel under several orders. The blocks themselves may be shuffled too.
// __shared__ arrays are poisoned at the start of every block (uninitialised shared memory
// holds garbage on a GPU). Launch configurations
// are checked against the hardware limits, and the runtime counts allocations, copies and
// stream synchronisations so that tests can assert that a path issues none.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// One static per array in a section of its own: only one block runs at a time, and the
// runtime poisons the whole section before each block.
#define __shared__ static __attribute__((section("specext_emu_shared")))

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;

// The built-in variables, set by the runtime before each switch into a thread.
extern dim3 threadIdx, blockIdx, blockDim, gridDim;

void __syncthreads();

// Atomics: fibers switch only at barriers, so a read-modify-write is atomic as written.
inline float atomicAdd(float* p, float v) {
  const float old = *p;
  *p = old + v;
  return old;
}
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  const unsigned long long old = *p;
  *p = old + v;
  return old;
}
inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
  const unsigned long long old = *p;
  if (v < old) *p = v;
  return old;
}
inline long long atomicMin(long long* p, long long v) {
  const long long old = *p;
  if (v < old) *p = v;
  return old;
}

// ---------------------------------------------------------------- runtime API (host memory)
typedef int cudaError_t;
enum : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
};
typedef struct specext_emu_stream* cudaStream_t;
enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4
};

enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

const char* cudaGetErrorString(cudaError_t e);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaGetLastError();
cudaError_t cudaGetDevice(int* d);
cudaError_t cudaSetDevice(int d);
cudaError_t cudaGetDeviceCount(int* n);
cudaError_t cudaMallocAsync(void** p, size_t n, cudaStream_t st);
cudaError_t cudaFreeAsync(void* p, cudaStream_t st);
cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t st);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t n, cudaMemcpyKind k, cudaStream_t st);
cudaError_t cudaMemcpy(void* dst, const void* src, size_t n, cudaMemcpyKind k);
cudaError_t cudaStreamSynchronize(cudaStream_t st);

namespace specext_emu {

struct Config {
  dim3 grid, block;
  size_t shared_bytes;
  cudaStream_t stream;
  Config(dim3 g, dim3 b, size_t s = 0, cudaStream_t st = nullptr) : grid(g), block(b), shared_bytes(s), stream(st) {}
};

// Runs `body` for every thread of every block of `cfg` (runtime.cpp); false (and the last
// error set) for a configuration a GPU would refuse.
bool run_grid(const Config& cfg, const std::function<void()>& body);

template <class... P, class... A>
void launch(const Config& cfg, void (*kernel)(P...), A&&... args) {
  // Kernel parameters are copied by value into the launch, as on a GPU.
  std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
  run_grid(cfg, [&]() { std::apply(kernel, params); });
}

}  // namespace specext_emu
