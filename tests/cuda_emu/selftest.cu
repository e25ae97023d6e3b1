// Kernels that test the emulator itself (tests/test_cuda_emulated.py): a shared-memory
// exchange with and without the barrier it needs, so that a test can show that the
// emulator's schedules expose a missing __syncthreads() instead of hiding it.
#include <cuda_runtime.h>

#include <cstdint>

namespace {

constexpr int kN = 64;

// Each thread publishes its index; thread t then reads its neighbour's slot.
__global__ void exchange_kernel(int* out, bool with_barrier) {
  __shared__ int slot[kN];
  slot[threadIdx.x] = int(threadIdx.x);
  if (with_barrier) __syncthreads();
  out[blockIdx.x * kN + threadIdx.x] = slot[(threadIdx.x + 1) % kN];
}

}  // namespace

// Writes out[b * 64 + t] for `blocks` blocks of 64 threads; returns whether the launch ran.
extern "C" int specext_emu_selftest_exchange(int* out, int blocks, int with_barrier) {
  exchange_kernel<<<blocks, kN>>>(out, with_barrier != 0);
  return cudaGetLastError() == cudaSuccess;
}

// A launch a GPU refuses (2048 threads a block): returns the error code the runtime reports.
extern "C" int specext_emu_selftest_bad_launch(int* out) {
  exchange_kernel<<<1, 2048>>>(out, true);
  return cudaGetLastError();
}
