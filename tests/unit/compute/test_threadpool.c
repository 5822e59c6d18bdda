/* Unit tests of src/compute/threadpool.c: every task runs once on every thread, in the spinning
 * regime (tasks back to back) and in the sleeping one (pauses longer than the spin between
 * tasks, so workers block on the start condition; a slow worker, so the caller blocks on the
 * done condition). A lost wake-up hangs the test, which ctest's timeout turns into a failure.
 * Shared tasks (any thread takes any item): every item done once, no call after the caller
 * returned, mixed with the every-thread tasks, and the caller not held by a worker asleep. */
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <time.h>

#include "testutil.h"
#include "compute/threadpool.h"

enum { MAX_THREADS = 8 };

typedef struct task {
    atomic_int runs[MAX_THREADS]; /* calls per thread index */
    atomic_int nth_seen;          /* nth passed to the calls (all must agree) */
    int slow_thread;              /* this thread sleeps slow_us in the task (-1: none) */
    int slow_us;
    int64_t sum[MAX_THREADS]; /* each thread's share of 0 + 1 + ... + n - 1 */
    int64_t n;
} task;

static void sleep_us(int us) {
    struct timespec ts = {.tv_sec = us / 1000000, .tv_nsec = (long)(us % 1000000) * 1000};
    nanosleep(&ts, NULL);
}

static void task_fn(void *arg, int ith, int nth) {
    task *t = arg;
    atomic_fetch_add(&t->runs[ith], 1);
    atomic_store(&t->nth_seen, nth);
    if (ith == t->slow_thread) sleep_us(t->slow_us);
    int64_t lo, hi, s = 0;
    xllm_split_range(t->n, ith, nth, &lo, &hi);
    for (int64_t i = lo; i < hi; i++) s += i;
    t->sum[ith] = s;
}

/* Runs n_tasks tasks on a pool of nt threads with the given pauses; checks each ran exactly
 * once per thread and that the results of all threads were visible to the caller on return. */
static void check_pool(int nt, int n_tasks, int pause_us, int slow_thread, int slow_us) {
    xllm_threadpool *tp = xllm_threadpool_new(nt);
    assert_non_null(tp);
    assert_int_equal(xllm_threadpool_n_threads(tp), nt);
    for (int k = 0; k < n_tasks; k++) {
        task t = {.slow_thread = slow_thread, .slow_us = slow_us, .n = 1000 + k};
        for (int i = 0; i < MAX_THREADS; i++) atomic_init(&t.runs[i], 0);
        atomic_init(&t.nth_seen, 0);
        xllm_threadpool_run(tp, task_fn, &t);
        int64_t total = 0;
        for (int i = 0; i < nt; i++) {
            assert_int_equal(atomic_load(&t.runs[i]), 1);
            total += t.sum[i];
        }
        for (int i = nt; i < MAX_THREADS; i++) assert_int_equal(atomic_load(&t.runs[i]), 0);
        assert_int_equal(atomic_load(&t.nth_seen), nt);
        assert_true(total == t.n * (t.n - 1) / 2);
        if (pause_us) sleep_us(pause_us);
    }
    xllm_threadpool_free(tp);
}

static void test_back_to_back(void **state) {
    (void)state;
    for (int nt = 1; nt <= 4; nt++) check_pool(nt, nt <= 2 ? 20000 : 500, 0, -1, 0);
}

static void test_sleeping_workers(void **state) {
    (void)state;
    /* 3 ms between tasks: longer than the workers spin, so every start wakes sleepers */
    for (int nt = 2; nt <= 4; nt++) check_pool(nt, 60, 3000, -1, 0);
}

static void test_sleeping_caller(void **state) {
    (void)state;
    /* the last worker takes 3 ms: the caller gives up spinning and waits to be signalled */
    for (int nt = 2; nt <= 4; nt++) check_pool(nt, 60, 0, nt - 1, 3000);
    /* both at once, and alternating with back-to-back tasks */
    check_pool(3, 40, 2500, 1, 2500);
    for (int r = 0; r < 20; r++) {
        check_pool(2, 50, 0, -1, 0);
        check_pool(2, 2, 2000, 1, 2000);
    }
}

/* A shared task: items taken from one counter by whichever thread comes; an item's value is
 * written by exactly one thread. `over` is set when the caller has returned: a call after it
 * would be a worker using a dead task. */
typedef struct stask {
    atomic_int next, calls, late;
    atomic_bool over;
    int n, slow_us;
    int8_t done[4096];
} stask;

static void stask_fn(void *arg, int ith, int nth) {
    stask *t = arg;
    (void)nth;
    atomic_fetch_add(&t->calls, 1);
    if (atomic_load(&t->over)) atomic_fetch_add(&t->late, 1);
    for (int i; (i = atomic_fetch_add(&t->next, 1)) < t->n;) {
        t->done[i]++;
        if (ith > 0 && t->slow_us) sleep_us(t->slow_us); /* a worker slower than the caller */
    }
}

static stask *stask_new(int n, int slow_us) {
    stask *t = calloc(1, sizeof(*t));
    assert_non_null(t);
    atomic_init(&t->next, 0);
    atomic_init(&t->calls, 0);
    atomic_init(&t->late, 0);
    atomic_init(&t->over, false);
    t->n = n;
    t->slow_us = slow_us;
    return t;
}

static void stask_check(stask *t, int nt) {
    for (int i = 0; i < t->n; i++) assert_int_equal(t->done[i], 1);
    const int calls = atomic_load(&t->calls);
    assert_true(calls >= 1 && calls <= nt);
}

static void test_shared(void **state) {
    (void)state;
    for (int nt = 1; nt <= 4; nt++) {
        xllm_threadpool *tp = xllm_threadpool_new(nt);
        assert_non_null(tp);
        /* the tasks' memory is kept to the end, so that a late call is counted, not a crash */
        enum { N = 3000 };
        stask **ts = calloc(N, sizeof(*ts));
        int late_total = 0;
        for (int k = 0; k < N; k++) {
            /* sizes from 1 item (the caller alone, mostly) to 4096, slow workers now and then,
             * pauses that put the workers to sleep now and then, every-thread tasks between */
            ts[k] = stask_new(k % 7 == 0 ? 4096 : 1 + k % 97, k % 50 == 0 ? 200 : 0);
            xllm_threadpool_run_shared(tp, stask_fn, ts[k]);
            atomic_store(&ts[k]->over, true);
            stask_check(ts[k], nt);
            if (k % 10 == 0) {
                task t = {.slow_thread = -1, .n = 500 + k};
                for (int i = 0; i < MAX_THREADS; i++) atomic_init(&t.runs[i], 0);
                atomic_init(&t.nth_seen, 0);
                xllm_threadpool_run(tp, task_fn, &t);
                for (int i = 0; i < nt; i++) assert_int_equal(atomic_load(&t.runs[i]), 1);
            }
            if (k % 500 == 499) sleep_us(3000);
        }
        xllm_threadpool_free(tp); /* joins the workers: no call can come after this */
        for (int k = 0; k < N; k++) {
            late_total += atomic_load(&ts[k]->late);
            free(ts[k]);
        }
        free(ts);
        assert_int_equal(late_total, 0);
    }
}

/* A worker asleep when a shared task starts does not hold the caller: the caller does all
 * the work and returns without waiting for the worker's wake-up (a worker that did come in
 * took items, so the task counts its calls). */
static void test_shared_skips_sleepers(void **state) {
    (void)state;
    xllm_threadpool *tp = xllm_threadpool_new(2);
    int alone = 0;
    for (int k = 0; k < 40; k++) {
        sleep_us(3000); /* the worker gives up spinning and blocks */
        stask *t = stask_new(1, 0);
        xllm_threadpool_run_shared(tp, stask_fn, t);
        atomic_store(&t->over, true);
        stask_check(t, 2);
        alone += atomic_load(&t->calls) == 1;
        sleep_us(2000); /* (a late worker would have called by now) */
        assert_int_equal(atomic_load(&t->late), 0);
        free(t);
    }
    /* waking a blocked thread takes far longer than one item: mostly the caller alone */
    assert_true(alone >= 30);
    xllm_threadpool_free(tp);
}

static void test_split_range(void **state) {
    (void)state;
    for (int64_t n = 0; n < 50; n++)
        for (int nth = 1; nth <= 7; nth++) {
            int64_t next = 0;
            for (int i = 0; i < nth; i++) {
                int64_t lo, hi;
                xllm_split_range(n, i, nth, &lo, &hi);
                assert_true(lo == next && hi >= lo && hi - lo <= n / nth + 1);
                next = hi;
            }
            assert_true(next == n);
        }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_back_to_back),          cmocka_unit_test(test_sleeping_workers),
        cmocka_unit_test(test_sleeping_caller),       cmocka_unit_test(test_shared),
        cmocka_unit_test(test_shared_skips_sleepers), cmocka_unit_test(test_split_range),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
