#include "threadpool.h"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace lowbit {
namespace {

thread_local bool t_in_pool_task = false;

class Pool {
   public:
    ~Pool() {
        {
            std::lock_guard<std::mutex> lock(mu_);
            stop_ = true;
        }
        cv_.notify_all();
        for (auto& t : workers_) t.join();
    }

    int size() {
        std::lock_guard<std::mutex> lock(mu_);
        return (int)workers_.size();
    }

    // Runs tasks 1..n_tasks-1 on workers and task 0 here; returns when all are done.
    void run(int n_tasks, const std::function<void(int)>& task) {
        std::lock_guard<std::mutex> run_lock(run_mu_);  // one parallel region at a time
        {
            std::lock_guard<std::mutex> lock(mu_);
            while ((int)workers_.size() < n_tasks - 1)
                workers_.emplace_back([this, id = (int)workers_.size()] { loop(id + 1); });
            task_ = &task;
            n_tasks_ = n_tasks;
            pending_ = n_tasks - 1;
            error_ = nullptr;
            ++generation_;
        }
        cv_.notify_all();
        std::exception_ptr mine;
        t_in_pool_task = true;
        try {
            task(0);
        } catch (...) {
            mine = std::current_exception();
        }
        t_in_pool_task = false;
        std::unique_lock<std::mutex> lock(mu_);
        done_cv_.wait(lock, [this] { return pending_ == 0; });
        task_ = nullptr;
        if (mine) std::rethrow_exception(mine);
        if (error_) std::rethrow_exception(error_);
    }

   private:
    void loop(int id) {
        uint64_t seen = 0;
        t_in_pool_task = true;
        for (;;) {
            const std::function<void(int)>* task;
            {
                std::unique_lock<std::mutex> lock(mu_);
                cv_.wait(lock, [&] { return stop_ || generation_ != seen; });
                if (stop_) return;
                seen = generation_;
                if (id >= n_tasks_) continue;
                task = task_;
            }
            std::exception_ptr err;
            try {
                (*task)(id);
            } catch (...) {
                err = std::current_exception();
            }
            {
                std::lock_guard<std::mutex> lock(mu_);
                if (err && !error_) error_ = err;
                if (--pending_ == 0) done_cv_.notify_one();
            }
        }
    }

    std::mutex run_mu_;
    std::mutex mu_;
    std::condition_variable cv_, done_cv_;
    std::vector<std::thread> workers_;
    const std::function<void(int)>* task_ = nullptr;
    int n_tasks_ = 0;
    int pending_ = 0;
    uint64_t generation_ = 0;
    bool stop_ = false;
    std::exception_ptr error_;
};

std::atomic<Pool*> g_pool{nullptr};

void forget_pool_after_fork() {
    // The child of a fork has none of the pool's threads (and perhaps a mutex some other parent
    // thread held): leave that pool behind untouched and start a fresh one on first use.
    g_pool.store(nullptr);
}

Pool& pool() {
    // Leaked on purpose: joining threads during interpreter shutdown can deadlock.
    static const bool registered = [] { return pthread_atfork(nullptr, nullptr, forget_pool_after_fork) == 0; }();
    (void)registered;
    Pool* p = g_pool.load();
    if (p == nullptr) {
        Pool* fresh = new Pool();
        if (g_pool.compare_exchange_strong(p, fresh)) {
            p = fresh;
        } else {
            delete fresh;  // another thread won; it has no workers yet, so nothing to join
        }
    }
    return *p;
}

}  // namespace

void parallel_for(int64_t n, int n_threads, int64_t grain,
                  const std::function<void(int64_t, int64_t)>& fn) {
    if (n <= 0) return;
    grain = std::max<int64_t>(grain, 1);
    int64_t max_chunks = (n + grain - 1) / grain;
    int chunks = (int)std::min<int64_t>({(int64_t)std::max(n_threads, 1), max_chunks, 256});
    if (chunks <= 1 || t_in_pool_task) {
        fn(0, n);
        return;
    }
    // Chunk boundaries rounded to the grain so that SIMD row blocks stay whole.
    int64_t per = ((max_chunks + chunks - 1) / chunks) * grain;
    pool().run(chunks, [&](int c) {
        int64_t b = c * per, e = std::min<int64_t>(n, b + per);
        if (b < e) fn(b, e);
    });
}

int pool_size() { return pool().size(); }

}  // namespace lowbit
