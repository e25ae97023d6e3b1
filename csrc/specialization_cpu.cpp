// neuron_specialization on CPU: tiles of kSpecTile neurons on the thread pool. The tile
// itself (totals, entropy, a sorting network for Gini) is specialization_isa.h.
#include <algorithm>
#include <vector>

#include "common.h"
#include "cpu_isa_table.h"
#include "kernels.h"
#include "parallel.h"

namespace specext {

void neuron_specialization_cpu(const SpecializationArgs& a) {
  if (a.N == 0) return;
  SPECEXT_CHECK(a.C > 0, ValueError, "mass must have at least one category (row), got 0");
  const IsaTable& k = isa_table();
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

}  // namespace specext
