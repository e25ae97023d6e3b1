// category_accumulate on CPU: label check (or, unchecked, the error record), counts, a
// stable counting sort of the tokens by label, and column tiles on the thread pool. The
// row loop is accumulate_isa.h.
#include <algorithm>
#include <cstdlib>
#include <vector>

#include "common.h"
#include "cpu_isa_table.h"
#include "hostdevice.h"
#include "kernels.h"
#include "parallel.h"

namespace specext {

namespace {

// Elements of work (selected tokens x neurons) per thread of one call; see below.
// SPECEXT_ACCUMULATE_GRAIN overrides it (read once; for measuring other machines).
int64_t accumulate_grain() {
  static const int64_t g = [] {
    if (const char* s = std::getenv("SPECEXT_ACCUMULATE_GRAIN")) {
      const long long v = std::atoll(s);
      if (v > 0) return int64_t(v);
    }
    return int64_t(1) << 21;
  }();
  return g;
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

}  // namespace

int64_t label_at_cpu(const void* labels, DType dt, int64_t i, int64_t stride) {
  return load_label(labels, dt == DType::I32, i, stride);
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
  if (a.errors) {
    // Unchecked mode: record (kernels.h, AccumulateArgs::errors); the tokens are skipped below.
    if (bad >= 0) {
      int64_t n = 0;
      for_labels(a.labels, a.labels_dtype, a.T, a.labels_stride, [&](int64_t, int64_t lab) { n += lab >= a.C; });
      int64_t* e = a.errors;
      const int64_t s = a.errors_stride;
      e[0] += n;
      if (e[s] == 0) {
        e[s] = label_at_cpu(a.labels, a.labels_dtype, bad, a.labels_stride);
        e[2 * s] = bad;
      }
    }
  } else {
    SPECEXT_CHECK(bad < 0, ValueError,
                  "labels[" << bad << "] = " << label_at_cpu(a.labels, a.labels_dtype, bad, a.labels_stride)
                            << " is out of range for num_categories = " << a.C
                            << " (labels must be < num_categories; negative labels skip the token); nothing was written");
  }
  // From here on a token counts iff 0 <= label < C (only unchecked mode can have label >= C).
  // Counts first: serial, in token order, so repeated calls add up like one call.
  for_labels(a.labels, a.labels_dtype, a.T, a.labels_stride, [&](int64_t t, int64_t lab) {
    if (lab < 0 || lab >= a.C) return;
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
    if (lab >= 0 && lab < a.C) ++start[lab + 1];
  });
  for (int64_t c = 0; c < a.C; ++c) start[c + 1] += start[c];
  std::vector<int64_t> order(static_cast<size_t>(start[a.C]));
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for_labels(a.labels, a.labels_dtype, a.T, a.labels_stride, [&](int64_t t, int64_t lab) {
      if (lab >= 0 && lab < a.C) order[fill[lab]++] = t;
    });
  }
  const IsaTable& k = isa_table();
  const int64_t esz = dtype_size(a.acts_dtype);
  const char* acts = static_cast<const char*>(a.acts);
  // Threads: one per accumulate_grain() elements of work (selected tokens x neurons), at
  // most the pool's. Waking a thread costs tens of microseconds on a virtual machine, so a
  // forward hook's small call runs faster on the caller alone (measured on 2 vCPUs,
  // float32: 240 x 512 tokens x neurons, 23 us on one thread vs 74 us on two; 2048 x 8192,
  // 6.4 ms vs 4.4 ms; the two break even near 2-4 M elements).
  const int64_t work = start[a.C] * a.N;
  const int64_t use = std::max<int64_t>(1, std::min<int64_t>(num_threads(), work / accumulate_grain()));
  // Wide tiles stream long contiguous row segments (measured: one tile per thread beats
  // L2-sized tiles by 1.3-2x); capped so a tile's sums row stays cache-resident.
  const int64_t per_thread = (a.N + use - 1) / use;
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
  }, int(use));
}

}  // namespace specext
