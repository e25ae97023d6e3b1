// value_vector_norms on CPU: row-major, column-major (a transposed view) or any strides,
// split over the thread pool. The row loops are norms_isa.h.
#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"
#include "cpu_isa_table.h"
#include "kernels.h"
#include "parallel.h"

namespace specext {

namespace {

// Width of a column tile: the tile of `rows` float rows stays in L2 (~512 KiB), there are
// enough tiles for every thread (4 per thread for balance), and widths are multiples of 64
// so rows start on cache-line boundaries for 16-bit inputs.
int64_t tile_width(int64_t N, int64_t rows, int64_t elem_bytes) {
  const int64_t budget = 512 * 1024;
  int64_t w = budget / std::max<int64_t>(1, rows * elem_bytes);
  w = std::clamp<int64_t>(w, 64, 4096);
  const int64_t want_tiles = 4 * int64_t(num_threads());
  const int64_t even = (N + want_tiles - 1) / want_tiles;
  w = std::min(w, std::max<int64_t>(64, even));
  return (w + 63) / 64 * 64;
}

}  // namespace

void value_vector_norms_cpu(const NormsArgs& a) {
  if (a.K == 0) return;
  const IsaTable& k = isa_table();
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
