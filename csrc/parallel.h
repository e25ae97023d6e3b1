// A small blocking thread pool for the CPU kernels.
//
// Why not OpenMP: libgomp's default wait policy spins, and on virtual machines with
// pause-loop exiting every spin-wait hands the vCPU back to the hypervisor: each parallel
// region then cost ~8 ms on the 2-vCPU machines this project runs on (and slowed torch's
// own OpenMP regions that followed), against ~0.1 ms with a blocking wait. Only the
// environment variable OMP_WAIT_POLICY changes that, and it is read once when libgomp
// loads, usually by torch before us. This pool waits on condition variables, never spins.
#pragma once
#include <cstdint>
#include <functional>

namespace specext {

// Runs fn(i) for every i in [0, n) on the pool's threads and the caller; returns when all
// are done. At most min(n, max_threads, num_threads()) threads take part (the caller
// included; max_threads <= 0: no cap), and only that many are woken. Serial when that is
// one, or when the pool is busy with another caller (concurrent callers never deadlock).
void parallel_for(int64_t n, const std::function<void(int64_t)>& fn, int max_threads = 0);

int num_threads();
void set_num_threads(int n);

}  // namespace specext
