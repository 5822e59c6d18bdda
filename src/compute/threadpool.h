/* A pool of persistent worker threads that run one parallel task at a time: the caller's
 * thread takes part as worker 0, workers spin briefly, then sleep on a condition variable. */
#ifndef XLLM_COMPUTE_THREADPOOL_H
#define XLLM_COMPUTE_THREADPOOL_H

#include <stdint.h>

typedef struct xllm_threadpool xllm_threadpool;

/* fn is called once per thread with ith in [0, nth). */
typedef void (*xllm_task_fn)(void *arg, int ith, int nth);

/* n_threads >= 1 (the caller counts as one). Returns NULL when threads cannot be started. */
xllm_threadpool *xllm_threadpool_new(int n_threads);
void xllm_threadpool_free(xllm_threadpool *tp); /* accepts NULL */
int xllm_threadpool_n_threads(const xllm_threadpool *tp);

/* Runs fn on every thread and returns when all have finished. Called from one thread at a
 * time (the pool's owner). */
void xllm_threadpool_run(xllm_threadpool *tp, xllm_task_fn fn, void *arg);
/* As xllm_threadpool_run for a task whose work any thread may take (fn returns when none is
 * left to take; per-thread scratch by ith is fine): returns when the caller's fn has returned
 * and the workers that started fn meanwhile have finished it. A worker the OS has not run by
 * the time the caller's fn returns does not call fn at all, so a busy host's scheduling delays
 * do not hold the caller once the work is done. */
void xllm_threadpool_run_shared(xllm_threadpool *tp, xllm_task_fn fn, void *arg);

/* Number of CPU cores available to this process. */
int xllm_cpu_count(void);

/* Splits [0, n) into nth near-equal ranges; returns this thread's [*lo, *hi). */
static inline void xllm_split_range(int64_t n, int ith, int nth, int64_t *lo, int64_t *hi) {
    int64_t per = n / nth, rem = n % nth;
    *lo = ith * per + (ith < rem ? ith : rem);
    *hi = *lo + per + (ith < rem ? 1 : 0);
}

#endif
