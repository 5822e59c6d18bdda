/* Persistent thread pool: a generation counter announces each task; workers spin on it for a
 * short while (decode steps come back to back) and then block on a condition variable. */
#include "compute/threadpool.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <unistd.h>

#include "util/common.h"

#define SPIN_ITERS 20000
/* Waiting threads only pause: yielding the core (sched_yield) was measured to cost far more
 * (the yielding thread can lose its core for a whole time slice) than it saves. */
static inline void spin_pause(int spins) {
    (void)spins;
#if defined(__x86_64__)
    __builtin_ia32_pause();
#endif
}

typedef struct worker {
    xllm_threadpool *tp;
    int ith;
    pthread_t thread;
} worker;

struct xllm_threadpool {
    int n_threads;
    worker *workers; /* n_threads - 1 */
    pthread_mutex_t mu;
    pthread_cond_t cv_start;
    pthread_cond_t cv_done;
    atomic_uint_fast64_t generation;
    atomic_int pending; /* workers still running the current task */
    atomic_bool stop;
    /* Workers blocked (or about to block) on cv_start, and whether the caller is on cv_done:
     * a task's start and end take the mutex and signal only when someone sleeps (while they
     * spin, the lock and the condition's lines would cross between the cores for nothing).
     * Each side publishes its flag, then reads the other's state, both sequentially
     * consistent, so at least one of the two sees the other. */
    atomic_int sleepers;
    atomic_bool caller_waits;
    xllm_task_fn fn;
    void *arg;
};

static void *worker_main(void *p) {
    worker *w = p;
    xllm_threadpool *tp = w->tp;
    uint64_t seen = 0;
    for (;;) {
        uint64_t gen;
        int spins = 0;
        while ((gen = atomic_load_explicit(&tp->generation, memory_order_acquire)) == seen &&
               !atomic_load(&tp->stop) && spins < SPIN_ITERS) {
            spin_pause(++spins);
        }
        if (gen == seen && !atomic_load(&tp->stop)) {
            pthread_mutex_lock(&tp->mu);
            atomic_fetch_add(&tp->sleepers, 1);
            while ((gen = atomic_load(&tp->generation)) == seen && !atomic_load(&tp->stop))
                pthread_cond_wait(&tp->cv_start, &tp->mu);
            atomic_fetch_sub(&tp->sleepers, 1);
            pthread_mutex_unlock(&tp->mu);
        }
        if (atomic_load(&tp->stop)) break;
        seen = gen;
        tp->fn(tp->arg, w->ith, tp->n_threads);
        if (atomic_fetch_sub(&tp->pending, 1) == 1 && atomic_load(&tp->caller_waits)) {
            pthread_mutex_lock(&tp->mu);
            pthread_cond_signal(&tp->cv_done);
            pthread_mutex_unlock(&tp->mu);
        }
    }
    return NULL;
}

xllm_threadpool *xllm_threadpool_new(int n_threads) {
    if (n_threads < 1) n_threads = 1;
    xllm_threadpool *tp = xllm_xcalloc(1, sizeof(*tp));
    tp->n_threads = n_threads;
    pthread_mutex_init(&tp->mu, NULL);
    pthread_cond_init(&tp->cv_start, NULL);
    pthread_cond_init(&tp->cv_done, NULL);
    tp->workers = xllm_xcalloc((size_t)n_threads, sizeof(worker));
    for (int i = 1; i < n_threads; i++) {
        tp->workers[i].tp = tp;
        tp->workers[i].ith = i;
        if (pthread_create(&tp->workers[i].thread, NULL, worker_main, &tp->workers[i]) != 0) {
            tp->n_threads = i; /* join those started */
            xllm_threadpool_free(tp);
            return NULL;
        }
    }
    return tp;
}

void xllm_threadpool_free(xllm_threadpool *tp) {
    if (!tp) return;
    pthread_mutex_lock(&tp->mu);
    atomic_store(&tp->stop, true);
    pthread_cond_broadcast(&tp->cv_start);
    pthread_mutex_unlock(&tp->mu);
    for (int i = 1; i < tp->n_threads; i++) pthread_join(tp->workers[i].thread, NULL);
    pthread_mutex_destroy(&tp->mu);
    pthread_cond_destroy(&tp->cv_start);
    pthread_cond_destroy(&tp->cv_done);
    free(tp->workers);
    free(tp);
}

int xllm_threadpool_n_threads(const xllm_threadpool *tp) {
    return tp->n_threads;
}

void xllm_threadpool_run(xllm_threadpool *tp, xllm_task_fn fn, void *arg) {
    if (tp->n_threads == 1) {
        fn(arg, 0, 1);
        return;
    }
    tp->fn = fn;
    tp->arg = arg;
    atomic_store(&tp->pending, tp->n_threads - 1);
    atomic_fetch_add(&tp->generation, 1);
    if (atomic_load(&tp->sleepers) > 0) {
        pthread_mutex_lock(&tp->mu);
        pthread_cond_broadcast(&tp->cv_start);
        pthread_mutex_unlock(&tp->mu);
    }
    fn(arg, 0, tp->n_threads);
    int spins = 0;
    while (atomic_load_explicit(&tp->pending, memory_order_acquire) > 0 && spins < SPIN_ITERS)
        spin_pause(++spins);
    if (atomic_load(&tp->pending) > 0) {
        pthread_mutex_lock(&tp->mu);
        atomic_store(&tp->caller_waits, true);
        while (atomic_load(&tp->pending) > 0) pthread_cond_wait(&tp->cv_done, &tp->mu);
        atomic_store(&tp->caller_waits, false);
        pthread_mutex_unlock(&tp->mu);
    }
}

int xllm_cpu_count(void) {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) {
        int n = CPU_COUNT(&set);
        if (n > 0) return n;
    }
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}
