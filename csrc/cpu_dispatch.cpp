// Run-time choice of the CPU inner loops: which instruction sets this CPU and build offer,
// the SPECEXT_SIMD cap, and set_simd_level for tests and benchmarks.
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <string>
#include <vector>

#include "common.h"
#include "cpu_isa_table.h"
#include "kernels.h"

namespace specext {

namespace {

bool cpu_has(const char* what) {
#if defined(SPECEXT_HAVE_X86_ISAS) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  const std::string w(what);
  if (w == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (w == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("f16c");
#endif
  (void)what;
  return false;
}

const IsaTable* table_for(const std::string& level) {
#if defined(SPECEXT_HAVE_X86_ISAS)
  if (level == "avx512") return &kIsaAvx512;
  if (level == "avx2") return &kIsaAvx2;
#endif
  if (level == "scalar") return &kIsaScalar;
  return nullptr;
}

const IsaTable* best_table() {
  // SPECEXT_SIMD=scalar|avx2|avx512 caps the level (for testing and for odd CPUs).
  const char* env = std::getenv("SPECEXT_SIMD");
  std::vector<std::string> avail = simd_levels_available();
  if (env && *env) {
    for (const auto& a : avail)
      if (a == env) return table_for(a);
  }
  return table_for(avail.back());
}

std::atomic<const IsaTable*> g_table{nullptr};

}  // namespace

const IsaTable& isa_table() {
  const IsaTable* t = g_table.load(std::memory_order_acquire);
  if (!t) {
    t = best_table();
    g_table.store(t, std::memory_order_release);
  }
  return *t;
}

std::vector<std::string> simd_levels_available() {
  std::vector<std::string> v{"scalar"};
  if (cpu_has("avx2")) v.push_back("avx2");
  if (cpu_has("avx512")) v.push_back("avx512");
  return v;
}

std::string simd_level() { return isa_table().name; }

void set_simd_level(const std::string& level) {
  auto avail = simd_levels_available();
  std::string names;
  for (const auto& a : avail) names += (names.empty() ? "'" : ", '") + a + "'";
  SPECEXT_CHECK(std::find(avail.begin(), avail.end(), level) != avail.end(), ValueError,
                "SIMD level '" << level << "' is not available; valid levels on this CPU/build: " << names);
  g_table.store(table_for(level), std::memory_order_release);
}

}  // namespace specext
