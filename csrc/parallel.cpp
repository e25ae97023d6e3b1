#include "parallel.h"

#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <new>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <pthread.h>
#include <sched.h>
#endif

#include "common.h"

namespace specext {
namespace {

int default_threads() {
  for (const char* var : {"SPECEXT_NUM_THREADS", "OMP_NUM_THREADS"}) {
    if (const char* s = std::getenv(var)) {
      const int n = std::atoi(s);
      if (n > 0) return n;
    }
  }
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    const int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
#endif
  const unsigned h = std::thread::hardware_concurrency();
  return h > 0 ? int(h) : 1;
}

class Pool {
 public:
  static Pool& get() {
    static Pool* pool = make();  // never destroyed: workers may outlive static teardown
    return *pool;
  }

  int threads() {
    std::lock_guard<std::mutex> g(cfg_);
    return threads_;
  }

  void resize(int n) {
    std::lock_guard<std::mutex> run(run_);
    std::lock_guard<std::mutex> g(cfg_);
    stop_workers();
    threads_ = n;
  }

  void run(int64_t n, const std::function<void(int64_t)>& fn, int max_threads) {
    std::unique_lock<std::mutex> run(run_, std::try_to_lock);
    int64_t t = threads();
    if (max_threads > 0 && max_threads < t) t = max_threads;
    if (n < t) t = n;
    if (t <= 1 || !run.owns_lock()) {
      for (int64_t i = 0; i < n; ++i) fn(i);
      return;
    }
    ensure_workers(threads() - 1);
    {
      std::lock_guard<std::mutex> g(m_);
      job_ = &fn;
      n_ = n;
      next_.store(0);
      // Wake only the workers this job can use: a waking thread costs tens of
      // microseconds on a virtual machine, more than a small job's share of the work.
      tickets_ = pending_ = int(t - 1);
      error_ = nullptr;
    }
    if (t - 1 == int64_t(workers_.size())) {
      cv_work_.notify_all();
    } else {
      for (int64_t i = 0; i < t - 1; ++i) cv_work_.notify_one();
    }
    work(fn);
    std::unique_lock<std::mutex> g(m_);
    cv_done_.wait(g, [&] { return pending_ == 0; });
    job_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  Pool() : threads_(default_threads()) {}

  static Pool* instance_;

  static Pool* make() {
    instance_ = new Pool();
#if defined(__linux__) || defined(__APPLE__)
    // fork() copies the mutexes and condition variables as they are, with the parent's
    // waiting workers still counted inside them (glibc's condvar keeps waiter groups and
    // reference counts): a broadcast in the child then waits for waiters that do not exist
    // and the child hangs on its second call. The child gets new ones instead.
    pthread_atfork(nullptr, nullptr, &Pool::after_fork_child);
#endif
    return instance_;
  }

  // Runs in the child right after fork(), single-threaded: rebuild every synchronisation
  // object in place (the old ones are abandoned, not destroyed: destroying a mutex another
  // thread held, or a condvar with waiters, is undefined) and forget the parent's workers
  // (their std::thread objects are leaked on purpose; destroying a joinable one aborts).
  // The next parallel call starts fresh workers lazily.
  static void after_fork_child() {
    Pool* p = instance_;
    if (!p) return;
    new (&p->run_) std::mutex();
    new (&p->cfg_) std::mutex();
    new (&p->m_) std::mutex();
    new (&p->cv_work_) std::condition_variable();
    new (&p->cv_done_) std::condition_variable();
    p->workers_.release_all();
    p->job_ = nullptr;
    p->next_.store(0);
    p->n_ = 0;
    p->pending_ = 0;
    p->tickets_ = 0;
    p->stop_ = false;
    new (&p->error_) std::exception_ptr();  // a parent's exception is not ours to free
  }

  void work(const std::function<void(int64_t)>& fn) {
    for (;;) {
      const int64_t i = next_.fetch_add(1);
      if (i >= n_) return;
      try {
        fn(i);
      } catch (...) {
        std::lock_guard<std::mutex> g(m_);
        if (!error_) error_ = std::current_exception();
      }
    }
  }

  // A worker takes part in a job by taking one of its tickets; the caller counts a ticket
  // done (pending_) when its holder's share of the work is over. A worker that comes back
  // while tickets remain takes another (it finds the job's tasks gone and returns at once):
  // pending_ reaches zero only when every ticket is taken and finished.
  void worker_loop() {
    for (;;) {
      const std::function<void(int64_t)>* job;
      {
        std::unique_lock<std::mutex> g(m_);
        cv_work_.wait(g, [&] { return stop_ || tickets_ > 0; });
        if (stop_) return;
        --tickets_;
        job = job_;
      }
      work(*job);
      {
        std::lock_guard<std::mutex> g(m_);
        if (--pending_ == 0) cv_done_.notify_one();
      }
    }
  }

  void ensure_workers(int want) {
    if (int(workers_.size()) == want) return;
    stop_workers();
    std::lock_guard<std::mutex> g(m_);
    stop_ = false;
    for (int i = 0; i < want; ++i) workers_.add(new std::thread(&Pool::worker_loop, this));
  }

  void stop_workers() {
    {
      std::lock_guard<std::mutex> g(m_);
      stop_ = true;
    }
    cv_work_.notify_all();
    workers_.join_all();
  }

  struct Workers {
    std::vector<std::thread*> v;
    size_t size() const { return v.size(); }
    void add(std::thread* t) { v.push_back(t); }
    void join_all() {
      for (auto* t : v) {
        if (t->joinable()) t->join();
        delete t;
      }
      v.clear();
    }
    void release_all() { v.clear(); }
  };

  std::mutex run_;  // one parallel_for at a time; others run serially
  std::mutex cfg_;
  int threads_;
  std::mutex m_;
  std::condition_variable cv_work_, cv_done_;
  Workers workers_;
  const std::function<void(int64_t)>* job_ = nullptr;
  std::atomic<int64_t> next_{0};
  int64_t n_ = 0;
  int pending_ = 0;  // tickets not yet finished
  int tickets_ = 0;  // tickets not yet taken
  bool stop_ = false;
  std::exception_ptr error_;
};

Pool* Pool::instance_ = nullptr;

}  // namespace

void parallel_for(int64_t n, const std::function<void(int64_t)>& fn, int max_threads) {
  Pool::get().run(n, fn, max_threads);
}

int num_threads() { return Pool::get().threads(); }

void set_num_threads(int n) {
  SPECEXT_CHECK(n >= 1, ValueError, "num_threads must be >= 1, got " << n);
  Pool::get().resize(n);
}

}  // namespace specext
