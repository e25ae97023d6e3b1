// What the CUDA kernel files share on the host side: error checks and the device guard.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "common.h"
#include "hostdevice.h"

namespace specext {

#define SPECEXT_CUDA_CHECK(expr)                                                                 \
  do {                                                                                           \
    cudaError_t err_ = (expr);                                                                   \
    SPECEXT_CHECK(err_ == cudaSuccess, RuntimeError, "CUDA error in " #expr ": " << cudaGetErrorString(err_)); \
  } while (0)

// Makes `device` current for the scope and restores the previous one: this extension
// links its own CUDA runtime, so it cannot rely on the framework's current device.
struct DeviceGuard {
  explicit DeviceGuard(int device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;
  int prev = -1;
};

SPECEXT_HD inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

}  // namespace specext
