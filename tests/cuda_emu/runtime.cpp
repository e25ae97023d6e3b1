// The emulated CUDA runtime of cuda_runtime.h: fiber-per-thread blocks with barriers, the
// schedule of each phase, shared-memory poisoning, launch limits, host-memory runtime API,
// and counters that the Python tests read through ctypes (extern "C" below).
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <vector>

#include "cuda_runtime.h"

dim3 threadIdx, blockIdx, blockDim, gridDim;

// Bounds of the section that holds every __shared__ array (GNU ld defines these).
extern "C" char __start_specext_emu_shared[] __attribute__((weak));
extern "C" char __stop_specext_emu_shared[] __attribute__((weak));

namespace specext_emu {
namespace {

enum State { kReady, kAtBarrier, kExited };

struct Fiber {
  ucontext_t ctx;
  char* stack = nullptr;
  State state = kReady;
  dim3 tid;
};

constexpr size_t kStack = 256 * 1024;

ucontext_t g_sched;
std::vector<Fiber> g_fibers;
size_t g_cur = 0;
const std::function<void()>* g_body = nullptr;
bool g_in_kernel = false;

// Settings and counters (extern "C" below).
int g_order = 0;  // threads: 0 forward, 1 reverse, 2 seeded shuffle; 3: shuffle blocks too
unsigned long long g_seed = 1;
unsigned g_max_grid_y = 65535;
long long g_launches = 0, g_syncs = 0, g_mallocs = 0, g_copies = 0, g_memsets = 0, g_barriers = 0;
cudaError_t g_last = cudaSuccess;
dim3 g_last_grid;  // the grid of the last launch, as the launcher asked for it
int g_device = 0;
// What the launchers size their grids by (they cache it per device): a small emulated GPU,
// so that test-sized inputs already take the paths large inputs take on a real one.
constexpr int kMultiprocessors = 4;

unsigned long long splitmix(unsigned long long& s) {
  unsigned long long z = (s += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// Fisher-Yates with splitmix: the same seed gives the same order.
template <class V>
void seeded_shuffle(V& v, unsigned long long& rng) {
  for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[splitmix(rng) % i]);
}

void fiber_entry() {
  (*g_body)();
  g_fibers[g_cur].state = kExited;
  // returning resumes uc_link (the scheduler)
}

void fail(const char* what) {
  std::fprintf(stderr, "specext CUDA emulator: %s\n", what);
  std::abort();
}

void run_block(unsigned long long block_no, unsigned char poison) {
  if (__start_specext_emu_shared && __stop_specext_emu_shared)
    std::memset(__start_specext_emu_shared, poison, size_t(__stop_specext_emu_shared - __start_specext_emu_shared));
  for (auto& f : g_fibers) {
    f.state = kReady;
    if (getcontext(&f.ctx) != 0) fail("getcontext failed");
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = &g_sched;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  std::vector<size_t> order;
  unsigned long long rng = g_seed * 0x100000001b3ULL + block_no;
  for (int phase = 0;; ++phase) {
    order.clear();
    for (size_t i = 0; i < g_fibers.size(); ++i)
      if (g_fibers[i].state == kReady) order.push_back(i);
    if (order.empty()) break;
    if (g_order == 1) {
      std::reverse(order.begin(), order.end());
    } else if (g_order >= 2) {
      seeded_shuffle(order, rng);
    }
    for (size_t i : order) {
      g_cur = i;
      threadIdx = g_fibers[i].tid;
      if (swapcontext(&g_sched, &g_fibers[i].ctx) != 0) fail("swapcontext failed");
    }
    bool any = false;
    for (auto& f : g_fibers)
      if (f.state == kAtBarrier) {
        f.state = kReady;
        any = true;
      }
    if (!any) break;
    ++g_barriers;
  }
}

}  // namespace

bool run_grid(const Config& cfg, const std::function<void()>& body) {
  // The binding releases the GIL: launches from two Python threads take turns, as the
  // emulator's state (fibers, built-in variables, the shared section) is global.
  static std::mutex launch_mutex;
  std::lock_guard<std::mutex> lock(launch_mutex);
  ++g_launches;
  const unsigned long long threads = 1ULL * cfg.block.x * cfg.block.y * cfg.block.z;
  // Hardware limits (compute capability 9.0): 1024 threads a block, z <= 64, grid y/z < 65536.
  if (threads == 0 || threads > 1024 || cfg.block.z > 64 || cfg.grid.x == 0 || cfg.grid.y == 0 || cfg.grid.z == 0 ||
      cfg.grid.x > 0x7fffffffu || cfg.grid.y > 65535 || cfg.grid.z > 65535 || cfg.shared_bytes > 48 * 1024) {
    g_last = cudaErrorInvalidConfiguration;
    return false;
  }
  if (g_in_kernel) fail("a kernel launched a kernel");
  g_in_kernel = true;
  g_last_grid = cfg.grid;
  g_body = &body;
  blockDim = cfg.block;
  gridDim = cfg.grid;
  // A test may shrink grid.y to exercise the grid-stride loops over it; kernels see the
  // shrunken gridDim, as they would see any grid the launcher chose.
  if (gridDim.y > g_max_grid_y) gridDim.y = g_max_grid_y;
  g_fibers.resize(threads);
  for (auto& f : g_fibers)
    if (!f.stack) {
      void* p = mmap(nullptr, kStack, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (p == MAP_FAILED) fail("mmap of a fiber stack failed");
      f.stack = static_cast<char*>(p);
    }
  size_t k = 0;
  for (unsigned z = 0; z < cfg.block.z; ++z)
    for (unsigned y = 0; y < cfg.block.y; ++y)
      for (unsigned x = 0; x < cfg.block.x; ++x) g_fibers[k++].tid = dim3(x, y, z);
  std::vector<dim3> blocks;
  for (unsigned bz = 0; bz < gridDim.z; ++bz)
    for (unsigned by = 0; by < gridDim.y; ++by)
      for (unsigned bx = 0; bx < gridDim.x; ++bx) blocks.emplace_back(bx, by, bz);
  if (g_order == 3) {  // a GPU runs blocks in no promised order
    unsigned long long rng = g_seed ^ 0x5bd1e995ULL;
    seeded_shuffle(blocks, rng);
  }
  for (size_t b = 0; b < blocks.size(); ++b) {
    blockIdx = blocks[b];
    run_block(b, (b & 1) ? 0x7f : 0xff);
  }
  g_body = nullptr;
  g_in_kernel = false;
  return true;
}

}  // namespace specext_emu

using namespace specext_emu;

void __syncthreads() {
  if (!g_in_kernel) fail("__syncthreads outside a kernel");
  Fiber& f = g_fibers[g_cur];
  f.state = kAtBarrier;
  if (swapcontext(&f.ctx, &g_sched) != 0) fail("swapcontext failed");
}

const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    default: return "unknown error";
  }
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  if (attr != cudaDevAttrMultiProcessorCount) return cudaErrorInvalidValue;
  *value = kMultiprocessors;
  return cudaSuccess;
}

cudaError_t cudaGetLastError() {
  const cudaError_t e = g_last;
  g_last = cudaSuccess;
  return e;
}

cudaError_t cudaGetDevice(int* d) {
  *d = g_device;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int d) {
  if (d != 0) return cudaErrorInvalidDevice;  // one emulated device
  g_device = d;
  return cudaSuccess;
}

cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}

cudaError_t cudaMallocAsync(void** p, size_t n, cudaStream_t) {
  ++g_mallocs;
  *p = std::malloc(n ? n : 1);
  return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}

cudaError_t cudaFreeAsync(void* p, cudaStream_t) {
  std::free(p);
  return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) {
  ++g_memsets;
  std::memset(p, v, n);
  return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t n, cudaMemcpyKind, cudaStream_t) {
  ++g_copies;
  std::memcpy(dst, src, n);
  return cudaSuccess;
}

cudaError_t cudaMemcpy(void* dst, const void* src, size_t n, cudaMemcpyKind) {
  ++g_copies;
  ++g_syncs;  // a synchronous copy waits for the device
  std::memcpy(dst, src, n);
  return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t) {
  ++g_syncs;
  return cudaSuccess;
}

// ---------------------------------------------------------------- controls for the tests
extern "C" {

void specext_emu_set_schedule(int order, unsigned long long seed) {
  g_order = order;
  g_seed = seed;
}

void specext_emu_set_max_grid_y(unsigned y) { g_max_grid_y = y ? y : 65535; }

// launches, stream synchronisations, allocations, copies, memsets, completed barriers
void specext_emu_counters(long long* out) {
  out[0] = g_launches;
  out[1] = g_syncs;
  out[2] = g_mallocs;
  out[3] = g_copies;
  out[4] = g_memsets;
  out[5] = g_barriers;
}

void specext_emu_last_grid(unsigned* out) {
  out[0] = g_last_grid.x;
  out[1] = g_last_grid.y;
  out[2] = g_last_grid.z;
}

void specext_emu_reset_counters() { g_launches = g_syncs = g_mallocs = g_copies = g_memsets = g_barriers = 0; }

}  // extern "C"
