/* Unit tests of the KV memory (xTensor and paged layouts): the invariant checker runs after every
 * operation, including a randomized run of thousands of interleaved grow / share / truncate /
 * free / evict operations in which every stored row is verified against what it should hold. */
#include <string.h>

#include "kv/kv.h"
#include "util/common.h"
#include "testutil.h"

#define NL  2  /* layers */
#define RE  64 /* row elements (f32: 256-byte rows -> 16-token blocks) */
#define CTX 256

static xllm_kv *make(xllm_kv_layout layout, int n_seq, size_t memory, bool background) {
    xllm_kv_params p = {.n_layer = NL,
                        .n_seq = n_seq,
                        .n_ctx = CTX,
                        .row_elems = RE,
                        .type = XLLM_DTYPE_F32,
                        .layout = layout,
                        .memory = memory,
                        .prefix_cache = true,
                        .background = background};
    xllm_kv *kv = NULL;
    char err[256];
    assert_int_equal(xllm_kv_new(&p, &kv, err, sizeof(err)), XLLM_OK);
    return kv;
}

static void check(xllm_kv *kv) {
    char err[256] = "";
    bool ok = xllm_kv_check(kv, err, sizeof(err));
    if (!ok) fprintf(stderr, "xllm_kv_check: %s\n", err);
    assert_true(ok);
}

/* The value stored at a position is a function of the tokens up to it, as real K/V are. */
static float value_at(const int32_t *tokens, int32_t pos, int32_t layer, int kv) {
    uint64_t h = 1469598103934665603ull;
    for (int32_t i = 0; i <= pos; i++) h = (h ^ (uint64_t)tokens[i]) * 1099511628211ull;
    return (float)((h >> 40) % 100000) + 0.25f * (float)layer + 0.5f * (float)kv;
}

static void write_rows(xllm_kv *kv, int32_t seq, const int32_t *tokens, int32_t from, int32_t to) {
    for (int32_t p = from; p < to; p++)
        for (int32_t l = 0; l < NL; l++) {
            float *k = xllm_kv_row_k(kv, l, seq, p), *v = xllm_kv_row_v(kv, l, seq, p);
            for (int e = 0; e < RE; e++) {
                k[e] = value_at(tokens, p, l, 0) + (float)e;
                v[e] = value_at(tokens, p, l, 1) + (float)e;
            }
        }
}

/* Every stored row, read the way attention reads it (spans), holds what it should. */
static void verify_rows(xllm_kv *kv, int32_t seq, const int32_t *tokens) {
    int32_t len = xllm_kv_seq_len(kv, seq);
    xllm_kv_span spans[CTX];
    for (int32_t l = 0; l < NL; l++) {
        int32_t n = xllm_kv_spans(kv, l, seq, len, spans, xllm_kv_max_spans(kv));
        int32_t covered = 0;
        for (int32_t r = 0; r < n; r++) {
            assert_int_equal(spans[r].pos0, covered);
            for (int32_t i = 0; i < spans[r].n; i++) {
                const float *k = (const float *)((const uint8_t *)spans[r].k +
                                                 (size_t)i * xllm_kv_row_bytes(kv));
                const float *v = (const float *)((const uint8_t *)spans[r].v +
                                                 (size_t)i * xllm_kv_row_bytes(kv));
                int32_t p = spans[r].pos0 + i;
                assert_float_equal(k[0], value_at(tokens, p, l, 0), 0);
                assert_float_equal(k[RE - 1], value_at(tokens, p, l, 0) + (float)(RE - 1), 0);
                assert_float_equal(v[3], value_at(tokens, p, l, 1) + 3.0f, 0);
            }
            covered += spans[r].n;
        }
        assert_int_equal(covered, len);
    }
}

/* Appends tokens [from, to) of seq: reserve, record tokens, write rows, commit. */
static xllm_status append(xllm_kv *kv, int32_t seq, const int32_t *tokens, int32_t to) {
    int32_t from = xllm_kv_seq_len(kv, seq);
    xllm_status st = xllm_kv_reserve(kv, seq, to);
    if (st != XLLM_OK) return st;
    xllm_kv_seq_set_tokens(kv, seq, from, tokens + from, to - from);
    write_rows(kv, seq, tokens, from, to);
    xllm_kv_seq_set_len(kv, seq, to);
    return XLLM_OK;
}

static void test_basic(void **state) {
    (void)state;
    for (int layout = 0; layout < 2; layout++) {
        xllm_kv *kv = make((xllm_kv_layout)layout, 2, 0, layout == 0);
        int32_t tok[CTX];
        for (int i = 0; i < CTX; i++) tok[i] = i * 7 % 50;
        assert_int_equal(xllm_kv_block_tokens(kv), 16);
        check(kv);
        assert_int_equal(append(kv, 0, tok, 1), XLLM_OK);
        check(kv);
        assert_int_equal(append(kv, 0, tok, 40), XLLM_OK);
        check(kv);
        verify_rows(kv, 0, tok);
        assert_int_equal(xllm_kv_seq_len(kv, 0), 40);
        assert_true(xllm_kv_seq_pages(kv, 0) >= 3);
        /* the context limit */
        assert_int_equal(xllm_kv_reserve(kv, 0, CTX + 1), XLLM_ERR_KV_FULL);
        assert_non_null(strstr(xllm_kv_last_error(kv), "context"));
        /* a second sequence with the same prompt reuses the two full blocks */
        assert_int_equal(xllm_kv_seq_reuse_prefix(kv, 1, tok, 40), 32);
        check(kv);
        verify_rows(kv, 1, tok);
        xllm_kv_stats st;
        xllm_kv_get_stats(kv, &st);
        assert_int_equal(st.prefix_hit_tokens, 32);
        /* the shared pages are not copied */
        assert_true(st.used_pages <= xllm_kv_seq_pages(kv, 0) + 2);
        /* diverge: seq 1 continues differently, seq 0 truncates into a shared block */
        int32_t tok2[CTX];
        memcpy(tok2, tok, sizeof(tok));
        for (int i = 32; i < CTX; i++) tok2[i] = 99 - i % 40;
        assert_int_equal(append(kv, 1, tok2, 70), XLLM_OK);
        check(kv);
        xllm_kv_seq_set_len(kv, 0, 20); /* block 1 is shared with seq 1: made private */
        check(kv);
        tok[20] = 42;
        assert_int_equal(append(kv, 0, tok, 30), XLLM_OK);
        check(kv);
        verify_rows(kv, 0, tok);
        verify_rows(kv, 1, tok2);
        xllm_kv_seq_free(kv, 0);
        xllm_kv_seq_free(kv, 1);
        check(kv);
        xllm_kv_get_stats(kv, &st);
        assert_int_equal(st.used_pages, 0);
        assert_true(st.cached_pages > 0); /* idle cached blocks stay for reuse */
        assert_int_equal(st.free_pages + st.cached_pages, st.n_pages);
        xllm_kv_free(kv);
    }
}

static void test_pool_exhaustion_and_eviction(void **state) {
    (void)state;
    /* 6 pages of 16 tokens */
    size_t page = 16 * RE * 4 * 2 * NL;
    xllm_kv *kv = make(XLLM_KV_LAYOUT_XTENSOR, 3, 6 * page, false);
    int32_t a[CTX], b[CTX];
    for (int i = 0; i < CTX; i++) {
        a[i] = i;
        b[i] = 1000 + i;
    }
    assert_int_equal(append(kv, 0, a, 64), XLLM_OK); /* 4 pages */
    assert_int_equal(append(kv, 1, b, 32), XLLM_OK); /* 2 pages */
    assert_int_equal(xllm_kv_pages_available(kv), 0);
    assert_int_equal(xllm_kv_reserve(kv, 2, 1), XLLM_ERR_KV_FULL);
    assert_non_null(strstr(xllm_kv_last_error(kv), "out of KV pages"));
    check(kv);
    xllm_kv_seq_free(kv, 0); /* its 4 full blocks become idle cached pages */
    check(kv);
    assert_int_equal(xllm_kv_pages_available(kv), 4);
    assert_int_equal(xllm_kv_pages_needed(kv, 2, 48), 3);
    assert_int_equal(append(kv, 2, b + 100, 48), XLLM_OK); /* evicts 3 */
    check(kv);
    xllm_kv_stats st;
    xllm_kv_get_stats(kv, &st);
    assert_int_equal(st.evictions, 3);
    /* the surviving cached block is the most recently used one */
    xllm_kv_free(kv);
}

static void test_map_limit(void **state) {
    (void)state;
    /* a tiny mapping budget: creation picks larger blocks; a forced small block fails cleanly */
    xllm_kv_params p = {.n_layer = NL,
                        .n_seq = 2,
                        .n_ctx = CTX,
                        .row_elems = RE,
                        .type = XLLM_DTYPE_F32,
                        .layout = XLLM_KV_LAYOUT_XTENSOR,
                        .prefix_cache = true,
                        .max_map_count = 2048 + 40};
    xllm_kv *kv = NULL;
    char err[256];
    assert_int_equal(xllm_kv_new(&p, &kv, err, sizeof(err)), XLLM_OK);
    assert_true(xllm_kv_block_tokens(kv) > 16);
    xllm_kv_free(kv);
    p.block_tokens = 16;
    assert_int_equal(xllm_kv_new(&p, &kv, err, sizeof(err)), XLLM_OK);
    int32_t tok[CTX];
    for (int i = 0; i < CTX; i++) tok[i] = i;
    /* interleave two sequences so their pages never merge into one mapping */
    xllm_status st = XLLM_OK;
    for (int32_t n = 16; n <= CTX && st == XLLM_OK; n += 16) {
        st = append(kv, 0, tok, n);
        if (st == XLLM_OK) st = append(kv, 1, tok + 1, n);
    }
    assert_int_equal(st, XLLM_ERR_KV_FULL);
    assert_non_null(strstr(xllm_kv_last_error(kv), "max_map_count"));
    check(kv);
    xllm_kv_free(kv);
    p.block_tokens = 24; /* not a whole number of OS pages per layer */
    assert_int_equal(xllm_kv_new(&p, &kv, err, sizeof(err)), XLLM_ERR_INVALID_ARG);
    assert_non_null(strstr(err, "multiple of 16"));
}

/* Thousands of random operations with a pool small enough to force eviction. */
static void run_random(xllm_kv_layout layout, bool background, int ops) {
    const int NS = 5;
    size_t page = 16 * RE * 4 * 2 * NL;
    xllm_kv *kv = make(layout, NS, 40 * page, background);
    int32_t tokens[5][CTX];
    uint64_t rng = 12345 + (uint64_t)layout;
    /* a few shared prompt prefixes so that the cache gets hits */
    int32_t prefixes[3][CTX];
    for (int k = 0; k < 3; k++)
        for (int i = 0; i < CTX; i++) prefixes[k][i] = (int32_t)(xllm_test_rand_u64(&rng) % 64);
    int n_ops[5] = {0};
    for (int it = 0; it < ops; it++) {
        int s = (int)(xllm_test_rand_u64(&rng) % NS);
        int op = (int)(xllm_test_rand_u64(&rng) % 10);
        int32_t len = xllm_kv_seq_len(kv, s);
        if (len == 0 && op < 5) {
            /* start: a shared prefix then random tokens; reuse what the cache has */
            int k = (int)(xllm_test_rand_u64(&rng) % 3);
            int32_t shared = (int32_t)(xllm_test_rand_u64(&rng) % 120);
            for (int i = 0; i < CTX; i++)
                tokens[s][i] =
                    i < shared ? prefixes[k][i] : (int32_t)(xllm_test_rand_u64(&rng) % 64);
            int32_t want = 1 + (int32_t)(xllm_test_rand_u64(&rng) % 150);
            int32_t hit = xllm_kv_seq_reuse_prefix(kv, s, tokens[s], want);
            assert_true(hit % 16 == 0 && hit < want);
            if (append(kv, s, tokens[s], want) != XLLM_OK) xllm_kv_seq_free(kv, s);
        } else if (op < 6) {
            int32_t to = XLLM_MIN(len + 1 + (int32_t)(xllm_test_rand_u64(&rng) % 20), CTX);
            if (append(kv, s, tokens[s], to) != XLLM_OK) xllm_kv_seq_free(kv, s); /* preempt */
        } else if (op < 8 && len > 0) {
            int32_t to = (int32_t)(xllm_test_rand_u64(&rng) % (uint64_t)len);
            if (to == 0)
                xllm_kv_seq_free(kv, s);
            else
                xllm_kv_seq_set_len(kv, s, to);
            /* the rewritten tail will differ */
            for (int i = to; i < CTX; i++) tokens[s][i] = (int32_t)(xllm_test_rand_u64(&rng) % 64);
        } else if (op == 8) {
            xllm_kv_seq_free(kv, s);
        } else {
            for (int q = 0; q < NS; q++) verify_rows(kv, q, tokens[q]);
        }
        n_ops[s]++;
        check(kv);
    }
    for (int q = 0; q < NS; q++) verify_rows(kv, q, tokens[q]);
    xllm_kv_stats st;
    xllm_kv_get_stats(kv, &st);
    fprintf(stderr, "%s%s: %d ops, hits %llu/%llu tokens, evictions %llu, bg maps %llu\n",
            layout == XLLM_KV_LAYOUT_XTENSOR ? "xtensor" : "paged", background ? "+bg" : "", ops,
            (unsigned long long)st.prefix_hit_tokens, (unsigned long long)st.prefix_query_tokens,
            (unsigned long long)st.evictions, (unsigned long long)st.bg_maps);
    assert_true(st.prefix_hit_tokens > 0);
    assert_true(st.evictions > 0);
    xllm_kv_free(kv);
}

static void test_random_xtensor(void **state) {
    (void)state;
    run_random(XLLM_KV_LAYOUT_XTENSOR, false, 4000);
    run_random(XLLM_KV_LAYOUT_XTENSOR, true, 2000);
}

static void test_random_paged(void **state) {
    (void)state;
    run_random(XLLM_KV_LAYOUT_PAGED, false, 4000);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_basic),        cmocka_unit_test(test_pool_exhaustion_and_eviction),
        cmocka_unit_test(test_map_limit),    cmocka_unit_test(test_random_xtensor),
        cmocka_unit_test(test_random_paged),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
