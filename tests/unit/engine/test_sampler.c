/* Unit tests of the sampler: greedy, seeding, empirical distribution, top-k/top-p/min-p
 * exclusion, penalties. */
#include <math.h>
#include <string.h>

#include "testutil.h"
#include "xllm/xllm.h"

static xllm_sampler_params plain(float temp, uint64_t seed) {
    xllm_sampler_params p = xllm_sampler_default_params();
    p.temperature = temp;
    p.top_k = 0;
    p.top_p = 1.0f;
    p.min_p = 0.0f;
    p.seed = seed;
    return p;
}

static void test_defaults_and_args(void **state) {
    (void)state;
    xllm_sampler_params p = xllm_sampler_default_params();
    assert_true(fabsf(p.temperature - 0.8f) < 1e-6f);
    assert_int_equal(p.top_k, 40);
    assert_int_equal(p.penalty_last_n, 64);
    assert_null(xllm_sampler_new(&p, 0));
    p.penalty_last_n = -2;
    assert_null(xllm_sampler_new(&p, 10));
    xllm_sampler *s = xllm_sampler_new(NULL, 10);
    assert_non_null(s);
    assert_int_equal(xllm_sampler_sample(s, NULL), -1);
    xllm_sampler_accept(s, -5); /* ignored */
    xllm_sampler_accept(s, 99);
    xllm_sampler_free(s);
    xllm_sampler_free(NULL);
}

static void test_greedy(void **state) {
    (void)state;
    uint64_t rs = 7;
    const int32_t n = 50000;
    float *l = malloc(sizeof(float) * n);
    xllm_sampler_params p = plain(0.0f, 1);
    xllm_sampler *s = xllm_sampler_new(&p, n);
    for (int rep = 0; rep < 20; rep++) {
        for (int32_t i = 0; i < n; i++) l[i] = xllm_test_rand_f(&rs) * 10.0f;
        assert_int_equal(xllm_sampler_sample(s, l), (int32_t)xllm_test_argmax(l, n));
    }
    /* ties: lowest id */
    for (int32_t i = 0; i < n; i++) l[i] = 0.0f;
    l[123] = 5.0f;
    l[77] = 5.0f;
    l[40000] = 5.0f;
    assert_int_equal(xllm_sampler_sample(s, l), 77);
    xllm_sampler_free(s);
    /* top_k = 1 with a temperature is greedy too, ties included */
    p = plain(1.5f, 3);
    p.top_k = 1;
    s = xllm_sampler_new(&p, n);
    for (int k = 0; k < 50; k++) assert_int_equal(xllm_sampler_sample(s, l), 77);
    for (int rep = 0; rep < 20; rep++) {
        for (int32_t i = 0; i < n; i++) l[i] = xllm_test_rand_f(&rs) * 10.0f;
        assert_int_equal(xllm_sampler_sample(s, l), (int32_t)xllm_test_argmax(l, n));
    }
    xllm_sampler_free(s);
    free(l);
}

static void draw_seq(uint64_t seed, const float *l, int32_t n, int32_t *out, int k) {
    xllm_sampler_params p = xllm_sampler_default_params();
    p.seed = seed;
    p.temperature = 1.0f;
    xllm_sampler *s = xllm_sampler_new(&p, n);
    for (int i = 0; i < k; i++) out[i] = xllm_sampler_sample(s, l);
    xllm_sampler_free(s);
}

static void test_seeds(void **state) {
    (void)state;
    const int32_t n = 1000;
    float l[1000];
    uint64_t rs = 11;
    for (int32_t i = 0; i < n; i++) l[i] = xllm_test_rand_f(&rs) * 2.0f;
    int32_t a[200], b[200], c[200];
    draw_seq(42, l, n, a, 200);
    draw_seq(42, l, n, b, 200);
    draw_seq(43, l, n, c, 200);
    assert_memory_equal(a, b, sizeof(a));
    assert_true(memcmp(a, c, sizeof(a)) != 0);
    /* reset replays the same sequence */
    xllm_sampler_params p = xllm_sampler_default_params();
    p.seed = 42;
    p.temperature = 1.0f;
    xllm_sampler *s = xllm_sampler_new(&p, n);
    for (int i = 0; i < 50; i++) xllm_sampler_sample(s, l);
    xllm_sampler_reset(s);
    for (int i = 0; i < 200; i++) b[i] = xllm_sampler_sample(s, l);
    assert_memory_equal(a, b, sizeof(a));
    xllm_sampler_free(s);
}

static void test_distribution(void **state) {
    (void)state;
    const float l[6] = {1.0f, 2.0f, 0.5f, -1.0f, 2.5f, 0.0f};
    const float temps[2] = {1.0f, 0.7f};
    for (int ti = 0; ti < 2; ti++) {
        float T = temps[ti];
        double want[6], z = 0;
        for (int i = 0; i < 6; i++) z += want[i] = exp(l[i] / T);
        for (int i = 0; i < 6; i++) want[i] /= z;
        xllm_sampler_params p = plain(T, 1234 + (uint64_t)ti);
        xllm_sampler *s = xllm_sampler_new(&p, 6);
        const int N = 200000;
        int hist[6] = {0};
        for (int k = 0; k < N; k++) {
            int32_t t = xllm_sampler_sample(s, l);
            assert_true(t >= 0 && t < 6);
            hist[t]++;
        }
        for (int i = 0; i < 6; i++) {
            double f = (double)hist[i] / N;
            double sd = sqrt(want[i] * (1 - want[i]) / N);
            if (fabs(f - want[i]) > 5 * sd + 1e-4)
                fail_msg("T=%.1f token %d: freq %.5f want %.5f", T, i, f, want[i]);
        }
        xllm_sampler_free(s);
    }
}

static void test_top_k(void **state) {
    (void)state;
    const int32_t n = 1000;
    float l[1000];
    for (int32_t i = 0; i < n; i++) l[i] = (float)((i * 37) % n) * 0.001f; /* a permutation */
    xllm_sampler_params p = plain(5.0f, 9);
    p.top_k = 10;
    xllm_sampler *s = xllm_sampler_new(&p, n);
    int seen[1000] = {0};
    for (int k = 0; k < 20000; k++) seen[xllm_sampler_sample(s, l)]++;
    int distinct = 0;
    for (int32_t i = 0; i < n; i++) {
        if (!seen[i]) continue;
        distinct++;
        assert_true(l[i] >= 0.990f - 1e-6f); /* the 10 best are 0.990 ... 0.999 */
    }
    assert_int_equal(distinct, 10);
    xllm_sampler_free(s);
}

static void test_top_p(void **state) {
    (void)state;
    /* probabilities 0.5, 0.25, 0.125, 0.0625, ... over 12 tokens (plus a tiny remainder) */
    const int32_t n = 12;
    float l[12];
    for (int32_t i = 0; i < n; i++) l[(i * 5) % n] = -(float)i * logf(2.0f);
    /* top_p 0.8: keeps 0.5+0.25+0.125 = 0.875 >= 0.8 -> ranks 0, 1, 2 */
    xllm_sampler_params p = plain(1.0f, 5);
    p.top_p = 0.8f;
    xllm_sampler *s = xllm_sampler_new(&p, n);
    int seen[12] = {0};
    for (int k = 0; k < 30000; k++) seen[xllm_sampler_sample(s, l)]++;
    for (int32_t i = 0; i < n; i++) {
        int rank = 0;
        while ((rank * 5) % n != i) rank++;
        if (rank < 3)
            assert_true(seen[i] > 0);
        else
            assert_int_equal(seen[i], 0);
    }
    /* renormalized: rank 0 gets 0.5/0.875 */
    double f0 = (double)seen[0] / 30000;
    assert_true(fabs(f0 - 0.5 / 0.875) < 0.02);
    xllm_sampler_free(s);

    /* a large flat-ish vocabulary: top_p keeps exactly the expected prefix */
    const int32_t big = 150000;
    float *lb = malloc(sizeof(float) * big);
    for (int32_t i = 0; i < big; i++) lb[i] = -20.0f;
    for (int32_t i = 0; i < 300; i++) lb[(i * 499) % big] = 5.0f - (float)i * 0.001f;
    p = plain(1.0f, 6);
    p.top_p = 0.5f;
    s = xllm_sampler_new(&p, big);
    /* the 300 high tokens hold almost all the mass; 0.5 of it is about the first 150 */
    for (int k = 0; k < 500; k++) {
        int32_t t = xllm_sampler_sample(s, lb);
        assert_true(lb[t] > 5.0f - 0.160f);
    }
    xllm_sampler_free(s);
    free(lb);
}

static void test_min_p(void **state) {
    (void)state;
    /* probs proportional to exp(l): min_p 0.2 drops tokens with exp(l - max) < 0.2 */
    const float l[5] = {0.0f, -1.0f, -1.5f, -2.0f, -3.0f}; /* ratios 1, .37, .22, .135, .05 */
    xllm_sampler_params p = plain(1.0f, 77);
    p.min_p = 0.2f;
    xllm_sampler *s = xllm_sampler_new(&p, 5);
    int seen[5] = {0};
    for (int k = 0; k < 30000; k++) seen[xllm_sampler_sample(s, l)]++;
    assert_true(seen[0] > 0 && seen[1] > 0 && seen[2] > 0);
    assert_int_equal(seen[3], 0);
    assert_int_equal(seen[4], 0);
    xllm_sampler_free(s);
}

static void test_penalties(void **state) {
    (void)state;
    float l[4] = {2.0f, 1.9f, -1.0f, -1.2f};
    /* repeat penalty: positive logits are divided */
    xllm_sampler_params p = plain(0.0f, 1);
    p.repeat_penalty = 1.2f;
    xllm_sampler *s = xllm_sampler_new(&p, 4);
    assert_int_equal(xllm_sampler_sample(s, l), 0);
    xllm_sampler_accept(s, 0);
    assert_int_equal(xllm_sampler_sample(s, l), 1); /* 2.0/1.2 < 1.9 */
    assert_true(l[0] == 2.0f);                      /* logits not modified */
    xllm_sampler_reset(s);
    assert_int_equal(xllm_sampler_sample(s, l), 0);
    xllm_sampler_free(s);

    /* negative logits are multiplied */
    float m[3] = {-1.0f, -1.1f, -5.0f};
    s = xllm_sampler_new(&p, 3);
    xllm_sampler_accept(s, 0);
    assert_int_equal(xllm_sampler_sample(s, m), 1); /* -1.2 < -1.1 */
    xllm_sampler_free(s);

    /* window: only the last penalty_last_n tokens count */
    p.penalty_last_n = 2;
    s = xllm_sampler_new(&p, 4);
    xllm_sampler_accept(s, 0);
    assert_int_equal(xllm_sampler_sample(s, l), 1);
    xllm_sampler_accept(s, 3);
    xllm_sampler_accept(s, 3); /* token 0 leaves the window */
    assert_int_equal(xllm_sampler_sample(s, l), 0);
    xllm_sampler_free(s);

    /* penalty_last_n = 0: no penalty at all */
    p.penalty_last_n = 0;
    s = xllm_sampler_new(&p, 4);
    xllm_sampler_accept(s, 0);
    assert_int_equal(xllm_sampler_sample(s, l), 0);
    xllm_sampler_free(s);

    /* frequency: 0.04 per occurrence; presence: once */
    p = plain(0.0f, 1);
    p.frequency_penalty = 0.04f;
    s = xllm_sampler_new(&p, 4);
    xllm_sampler_accept(s, 0);
    xllm_sampler_accept(s, 0);
    assert_int_equal(xllm_sampler_sample(s, l), 0); /* 2.0 - 0.08 > 1.9 */
    xllm_sampler_accept(s, 0);
    assert_int_equal(xllm_sampler_sample(s, l), 1); /* 2.0 - 0.12 < 1.9 */
    xllm_sampler_free(s);

    p = plain(0.0f, 1);
    p.presence_penalty = 0.15f;
    p.penalty_last_n = -1;
    s = xllm_sampler_new(&p, 4);
    for (int i = 0; i < 100; i++) xllm_sampler_accept(s, 1);
    assert_int_equal(xllm_sampler_sample(s, l), 0);
    xllm_sampler_accept(s, 0);
    assert_int_equal(xllm_sampler_sample(s, l), 0); /* both penalised by 0.15 */
    xllm_sampler_free(s);

    /* penalties apply before sampling too: a penalised token is never drawn with top_k 1 */
    p = plain(1.0f, 1);
    p.top_k = 1;
    p.repeat_penalty = 1.2f;
    s = xllm_sampler_new(&p, 4);
    xllm_sampler_accept(s, 0);
    for (int i = 0; i < 100; i++) assert_int_equal(xllm_sampler_sample(s, l), 1);
    xllm_sampler_free(s);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_defaults_and_args),
        cmocka_unit_test(test_greedy),
        cmocka_unit_test(test_seeds),
        cmocka_unit_test(test_distribution),
        cmocka_unit_test(test_top_k),
        cmocka_unit_test(test_top_p),
        cmocka_unit_test(test_min_p),
        cmocka_unit_test(test_penalties),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
