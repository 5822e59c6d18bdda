/* Persistent thread pool: a generation counter announces each task; workers spin on it for a
 * short while (decode steps come back to back) and then block on a condition variable.
 * A shared task (xllm_threadpool_run_shared) ends when the caller's part is done and the
 * workers that joined it have left: a worker the OS has not run by then skips it, so a busy
 * host's scheduling delays hold no region whose work the others have already taken. */
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

/* The task's state word: its generation (low 32 bits) in the high half, then whether it is
 * shared, whether it is closed to joining, and the number of workers in it (an every-thread
 * task counts them all in from the start, closed). */
#define ST_SHARED ((uint64_t)1 << 31)
#define ST_CLOSED ((uint64_t)1 << 30)
#define ST_JOINED (ST_CLOSED - 1)

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
    atomic_bool stop;
    /* Workers blocked (or about to block) on cv_start, and whether the caller is on cv_done:
     * a task's start and end take the mutex and signal only when someone sleeps (while they
     * spin, the lock and the condition's lines would cross between the cores for nothing).
     * Each side publishes its flag, then reads the other's state, both sequentially
     * consistent, so at least one of the two sees the other. */
    atomic_int sleepers;
    atomic_bool caller_waits;
    atomic_uint_fast64_t state; /* ST_*: of the current task */
    xllm_task_fn fn;
    void *arg;
};

static void wake_caller(xllm_threadpool *tp) {
    pthread_mutex_lock(&tp->mu);
    pthread_cond_signal(&tp->cv_done);
    pthread_mutex_unlock(&tp->mu);
}

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
        uint64_t st = atomic_load(&tp->state);
        /* a newer task already: this one was shared and ended without this worker */
        if ((uint32_t)(st >> 32) != (uint32_t)gen) continue;
        /* a shared task is joined unless it is over or closed (every-thread tasks count their
         * workers in when posted); fn and arg are the task's only once in (the caller does not
         * return while a worker is in) */
        bool in = !(st & ST_SHARED);
        while (!in && (uint32_t)(st >> 32) == (uint32_t)gen && !(st & ST_CLOSED))
            in = atomic_compare_exchange_weak(&tp->state, &st, st + 1);
        if (!in) continue;
        tp->fn(tp->arg, w->ith, tp->n_threads);
        st = atomic_fetch_sub(&tp->state, 1) - 1;
        if ((st & ST_CLOSED) && !(st & ST_JOINED) && atomic_load(&tp->caller_waits))
            wake_caller(tp);
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

/* Publishes task fn(arg) as the next generation and wakes sleeping workers. */
static void post(xllm_threadpool *tp, xllm_task_fn fn, void *arg, bool shared) {
    tp->fn = fn;
    tp->arg = arg;
    const uint64_t gen = atomic_load_explicit(&tp->generation, memory_order_relaxed) + 1;
    atomic_store(&tp->state, (uint64_t)(uint32_t)gen << 32 |
                                 (shared ? ST_SHARED : ST_CLOSED | (uint64_t)(tp->n_threads - 1)));
    atomic_store_explicit(&tp->generation, gen, memory_order_release);
    if (atomic_load(&tp->sleepers) > 0) {
        pthread_mutex_lock(&tp->mu);
        pthread_cond_broadcast(&tp->cv_start);
        pthread_mutex_unlock(&tp->mu);
    }
}

/* Whether every worker in the current task has left it. */
static bool all_left(xllm_threadpool *tp) {
    return !(atomic_load(&tp->state) & ST_JOINED);
}

/* Waits, spinning and then blocking, until the workers in the task have left it. */
static void await_workers(xllm_threadpool *tp) {
    int spins = 0;
    while (!all_left(tp) && spins < SPIN_ITERS) spin_pause(++spins);
    if (!all_left(tp)) {
        pthread_mutex_lock(&tp->mu);
        atomic_store(&tp->caller_waits, true);
        while (!all_left(tp)) pthread_cond_wait(&tp->cv_done, &tp->mu);
        atomic_store(&tp->caller_waits, false);
        pthread_mutex_unlock(&tp->mu);
    }
}

static void run(xllm_threadpool *tp, xllm_task_fn fn, void *arg, bool shared) {
    if (tp->n_threads == 1) {
        fn(arg, 0, 1);
        return;
    }
    post(tp, fn, arg, shared);
    fn(arg, 0, tp->n_threads);
    if (shared) atomic_fetch_or(&tp->state, ST_CLOSED);
    await_workers(tp);
}

void xllm_threadpool_run(xllm_threadpool *tp, xllm_task_fn fn, void *arg) {
    run(tp, fn, arg, false);
}

void xllm_threadpool_run_shared(xllm_threadpool *tp, xllm_task_fn fn, void *arg) {
    run(tp, fn, arg, true);
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
