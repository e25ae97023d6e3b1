// CPU drivers: validation of data, thread-pool work split, SIMD level selection. The inner
// loops live in cpu_isa.h, compiled once per instruction set.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>


#include "common.h"
#include "convert.h"
#include "cpu_isa_table.h"
#include "kernels.h"
#include "parallel.h"

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

const IsaTable& isa() {
  const IsaTable* t = g_table.load(std::memory_order_acquire);
  if (!t) {
    t = best_table();
    g_table.store(t, std::memory_order_release);
  }
  return *t;
}

template <class F>
inline void for_labels(const void* labels, DType dt, int64_t T, int64_t stride, F&& f) {
  if (dt == DType::I32) {
    const int32_t* p = static_cast<const int32_t*>(labels);
    for (int64_t t = 0; t < T; ++t) f(t, int64_t(p[t * stride]));
  } else {
    const int64_t* p = static_cast<const int64_t*>(labels);
    for (int64_t t = 0; t < T; ++t) f(t, p[t * stride]);
  }
}

int max_threads() { return num_threads(); }

// Width of a column tile: the tile of `rows` float rows stays in L2 (~512 KiB), there are
// enough tiles for every thread (4 per thread for balance), and widths are multiples of 64
// so rows start on cache-line boundaries for 16-bit inputs.
int64_t tile_width(int64_t N, int64_t rows, int64_t elem_bytes) {
  const int64_t budget = 512 * 1024;
  int64_t w = budget / std::max<int64_t>(1, rows * elem_bytes);
  w = std::clamp<int64_t>(w, 64, 4096);
  const int64_t want_tiles = 4 * int64_t(max_threads());
  const int64_t even = (N + want_tiles - 1) / want_tiles;
  w = std::min(w, std::max<int64_t>(64, even));
  return (w + 63) / 64 * 64;
}

}  // namespace

std::vector<std::string> simd_levels_available() {
  std::vector<std::string> v{"scalar"};
  if (cpu_has("avx2")) v.push_back("avx2");
  if (cpu_has("avx512")) v.push_back("avx512");
  return v;
}

std::string simd_level() { return isa().name; }

void set_simd_level(const std::string& level) {
  auto avail = simd_levels_available();
  SPECEXT_CHECK(std::find(avail.begin(), avail.end(), level) != avail.end(), ValueError,
                "SIMD level '" << level << "' is not available on this CPU/build");
  g_table.store(table_for(level), std::memory_order_release);
}

int64_t label_at_cpu(const void* labels, DType dt, int64_t i, int64_t stride) {
  return dt == DType::I32 ? int64_t(static_cast<const int32_t*>(labels)[i * stride])
                          : static_cast<const int64_t*>(labels)[i * stride];
}

int64_t first_bad_label_cpu(const void* labels, DType dt, int64_t T, int64_t stride, int64_t C) {
  int64_t bad = -1;
  for_labels(labels, dt, T, stride, [&](int64_t t, int64_t lab) {
    if (bad < 0 && lab >= C) bad = t;
  });
  return bad;
}

void category_accumulate_cpu(const AccumulateArgs& a) {
  if (a.T == 0) return;
  const int64_t bad = first_bad_label_cpu(a.labels, a.labels_dtype, a.T, a.labels_stride, a.C);
  SPECEXT_CHECK(bad < 0, ValueError,
                "labels[" << bad << "] = " << label_at_cpu(a.labels, a.labels_dtype, bad, a.labels_stride)
                          << " is out of range for num_categories = " << a.C
                          << " (labels must be < num_categories; negative labels skip the token); nothing was written");
  // Counts first: serial, in token order, so repeated calls add up like one call.
  for_labels(a.labels, a.labels_dtype, a.T, a.labels_stride, [&](int64_t t, int64_t lab) {
    if (lab < 0) return;
    const float w = a.weights ? a.weights[t * a.weights_stride] : 1.0f;
    float& c = a.counts[lab * a.counts_stride];
    c = c + w;
  });
  if (a.N == 0) return;
  // Tokens in label order (a stable counting sort): a tile walks one category at a time,
  // so that category's row of `sums` stays in L1 while all its tokens stream in, whatever
  // the number of categories. Every element of `sums` still receives its tokens in token
  // order, so the result is bit-identical to walking the tokens in order, and chunked
  // calls equal one call. Each thread owns column tiles: no atomics, no private copies.
  std::vector<int64_t> start(static_cast<size_t>(a.C) + 1, 0);
  for_labels(a.labels, a.labels_dtype, a.T, a.labels_stride, [&](int64_t, int64_t lab) {
    if (lab >= 0) ++start[lab + 1];
  });
  for (int64_t c = 0; c < a.C; ++c) start[c + 1] += start[c];
  std::vector<int64_t> order(static_cast<size_t>(start[a.C]));
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for_labels(a.labels, a.labels_dtype, a.T, a.labels_stride, [&](int64_t t, int64_t lab) {
      if (lab >= 0) order[fill[lab]++] = t;
    });
  }
  const IsaTable& k = isa();
  const int64_t esz = dtype_size(a.acts_dtype);
  const char* acts = static_cast<const char*>(a.acts);
  // Wide tiles stream long contiguous row segments (measured: one tile per thread beats
  // L2-sized tiles by 1.3-2x); capped so a tile's sums row stays cache-resident.
  const int64_t per_thread = (a.N + max_threads() - 1) / max_threads();
  const int64_t tw = std::max<int64_t>(64, (std::min<int64_t>(per_thread, 8192) + 63) / 64 * 64);
  const int64_t ntiles = (a.N + tw - 1) / tw;
  parallel_for(ntiles, [&](int64_t tile) {
    const int64_t n0 = tile * tw;
    const int64_t w = std::min(tw, a.N - n0);
    for (int64_t c = 0; c < a.C; ++c) {
      float* srow = a.sums + c * a.sums_stride0 + n0;
      for (int64_t i = start[c]; i < start[c + 1]; ++i) {
        const int64_t t = order[i];
        const float wt = a.weights ? a.weights[t * a.weights_stride] : 1.0f;
        k.accum_row(acts + (t * a.acts_stride0 + n0) * esz, a.acts_dtype, srow, w, wt, a.stat);
      }
    }
  });
}

void neuron_specialization_cpu(const SpecializationArgs& a) {
  if (a.N == 0) return;
  SPECEXT_CHECK(a.C > 0, ValueError, "mass must have at least one category (row), got 0");
  const IsaTable& k = isa();
  const int64_t ntiles = (a.N + kSpecTile - 1) / kSpecTile;
  const int64_t per_task = 16;  // tiles per task: a few hundred KB of work, scratch reused
  parallel_for((ntiles + per_task - 1) / per_task, [&](int64_t task) {
    std::vector<float> buf(static_cast<size_t>(kSpecTile * a.C));
    const int64_t t1 = std::min(ntiles, (task + 1) * per_task);
    for (int64_t tile = task * per_task; tile < t1; ++tile) {
      const int64_t n0 = tile * kSpecTile;
      k.spec_tile(a.mass, a.C, a.mass_stride0, n0, std::min(kSpecTile, a.N - n0), a, buf.data());
    }
  });
}

void value_vector_norms_cpu(const NormsArgs& a) {
  if (a.K == 0) return;
  const IsaTable& k = isa();
  const int64_t esz = dtype_size(a.dtype);
  const char* base = static_cast<const char*>(a.weight);
  if (a.stride1 == 1 || a.K == 1) {
    // Row-major (d_model, d_ff): a thread owns a column tile and walks all rows.
    const int64_t tw = tile_width(a.K, 1, 8);
    const int64_t ntiles = (a.K + tw - 1) / tw;
    parallel_for(ntiles, [&](int64_t tile) {
      std::vector<double> acc(static_cast<size_t>(tw), 0.0);
      const int64_t j0 = tile * tw;
      const int64_t w = std::min(tw, a.K - j0);
      for (int64_t r = 0; r < a.R; ++r) k.sqnorm_row(base + (r * a.stride0 + j0) * esz, a.dtype, acc.data(), w);
      for (int64_t j = 0; j < w; ++j) a.out[j0 + j] = float(std::sqrt(acc[j]));
    });
    return;
  }
  if (a.stride0 == 1 || a.R == 1) {
    // Column-major (a transposed view, as GPT-2's Conv1D gives): each column is contiguous.
    const int64_t per_task = 64;
    parallel_for((a.K + per_task - 1) / per_task, [&](int64_t task) {
      const int64_t j1 = std::min(a.K, (task + 1) * per_task);
      for (int64_t j = task * per_task; j < j1; ++j)
        a.out[j] = float(std::sqrt(k.sqsum(base + j * a.stride1 * esz, a.dtype, a.R)));
    });
    return;
  }
  // Any other strides: plain loops, one element at a time.
  parallel_for((a.K + 63) / 64, [&](int64_t task) {
    const int64_t j1 = std::min(a.K, (task + 1) * 64);
    for (int64_t j = task * 64; j < j1; ++j) {
      double s = 0.0;
      for (int64_t r = 0; r < a.R; ++r) {
        double x = 0.0;
        k.sqnorm_row(base + (r * a.stride0 + j * a.stride1) * esz, a.dtype, &x, 1);
        s += x;
      }
      a.out[j] = float(std::sqrt(s));
    }
  });
}

}  // namespace specext
