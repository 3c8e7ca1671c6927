// A small persistent thread pool (no OpenMP: PyTorch ships its own libgomp and two OpenMP
// runtimes fighting over 2 cores is catastrophic, ../shared/reference/kernels.md §5).
#ifndef LOWBIT_THREADPOOL_H
#define LOWBIT_THREADPOOL_H

#include <cstdint>
#include <functional>

namespace lowbit {

// Splits [0, n) into at most n_threads contiguous chunks (each a multiple of `grain`, except
// the last) and runs fn(begin, end) on them; the calling thread runs the first chunk.
// Called from inside a pool task it runs serially (no nested parallelism).
void parallel_for(int64_t n, int n_threads, int64_t grain,
                  const std::function<void(int64_t, int64_t)>& fn);

// Number of worker threads currently alive (grows on demand, never beyond 256).
int pool_size();

}  // namespace lowbit

#endif
