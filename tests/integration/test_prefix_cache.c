/* Prefix caching through the public API: a second request whose prompt starts with the same
 * 512 tokens reuses the cached blocks, computes only the rest (counted), and gives exactly the
 * outputs of a run without the cache. */
#include <string.h>

#include "testutil.h"
#include "xllm/xllm.h"

#define N_PREFIX 512
#define N_SUFFIX 40
#define N_GEN    8

static xllm_context *new_ctx(const xllm_model *m, xllm_kv_layout layout, bool cache) {
    xllm_context_params cp = xllm_context_default_params();
    cp.n_ctx = 1024;
    cp.n_seq_max = 2;
    cp.n_batch = 256;
    cp.n_threads = 2;
    cp.kv_type = XLLM_DTYPE_F32;
    cp.kv_layout = layout;
    cp.no_prefix_cache = !cache;
    xllm_context *ctx = NULL;
    char err[256];
    assert_int_equal(xllm_context_new(m, &cp, &ctx, err, sizeof(err)), XLLM_OK);
    return ctx;
}

/* Evaluates prompt[start..n) of seq in chunks, then N_GEN greedy tokens; writes the final
 * prompt logits into last (n_vocab) and the generated ids into gen. */
static void run(xllm_context *ctx, const xllm_model *m, int32_t seq, const int32_t *prompt,
                int32_t start, int32_t n, float *last, int32_t *gen) {
    const int32_t V = xllm_model_n_vocab(m);
    int32_t pos[256], sq[256];
    const float *logits = NULL;
    for (int32_t at = start; at < n; at += 256) {
        int32_t k = n - at < 256 ? n - at : 256;
        for (int32_t i = 0; i < k; i++) {
            pos[i] = at + i;
            sq[i] = seq;
        }
        xllm_batch b = {k, prompt + at, pos, sq, NULL};
        assert_int_equal(xllm_decode(ctx, &b), XLLM_OK);
        logits = xllm_get_logits(ctx, k - 1);
    }
    memcpy(last, logits, sizeof(float) * (size_t)V);
    int32_t p = n;
    for (int g = 0; g < N_GEN; g++) {
        int32_t t = (int32_t)xllm_test_argmax(logits, V);
        gen[g] = t;
        xllm_batch b = {1, &t, &p, &seq, NULL};
        assert_int_equal(xllm_decode(ctx, &b), XLLM_OK);
        logits = xllm_get_logits(ctx, 0);
        p++;
    }
}

static void check_layout(xllm_kv_layout layout) {
    xllm_model *m = NULL;
    char err[512];
    assert_int_equal(xllm_model_load(xllm_test_shared("models/tiny/qwen3-tiny-f32.gguf"), NULL, &m,
                                     err, sizeof(err)),
                     XLLM_OK);
    const int32_t V = xllm_model_n_vocab(m);
    int32_t a[N_PREFIX + N_SUFFIX], b[N_PREFIX + N_SUFFIX];
    uint64_t rng = 7;
    for (int i = 0; i < N_PREFIX + N_SUFFIX; i++) {
        a[i] = (int32_t)(xllm_test_rand_u64(&rng) % (uint64_t)V);
        b[i] = i < N_PREFIX ? a[i] : (int32_t)(xllm_test_rand_u64(&rng) % (uint64_t)V);
    }
    const int32_t n = N_PREFIX + N_SUFFIX;
    float *want = malloc(sizeof(float) * V), *got = malloc(sizeof(float) * V);
    int32_t gen_want[N_GEN], gen_got[N_GEN];

    /* reference: request b alone, no cache */
    xllm_context *ref = new_ctx(m, layout, false);
    run(ref, m, 0, b, 0, n, want, gen_want);
    assert_int_equal(xllm_seq_reuse_prefix(ref, 1, b, n), 0); /* cache off: nothing */
    xllm_context_free(ref);

    /* with the cache: request a, then b (same 512-token prefix) in another sequence */
    xllm_context *ctx = new_ctx(m, layout, true);
    run(ctx, m, 0, a, 0, n, got, gen_got);
    uint64_t before = xllm_context_tokens_evaluated(ctx);
    int32_t hit = xllm_seq_reuse_prefix(ctx, 1, b, n);
    xllm_kv_stats st;
    xllm_context_kv_stats(ctx, &st);
    fprintf(stderr, "%s: block %d tokens, reused %d of %d prompt tokens\n",
            layout == XLLM_KV_LAYOUT_PAGED ? "paged" : "xtensor", st.block_tokens, hit, n);
    assert_int_equal(hit, N_PREFIX / st.block_tokens * st.block_tokens);
    assert_true(hit >= N_PREFIX - st.block_tokens + 1);
    assert_int_equal(xllm_seq_len(ctx, 1), hit);
    run(ctx, m, 1, b, hit, n, got, gen_got);
    /* prefill work dropped by the cached share: only n - hit prompt rows (plus generation) */
    assert_int_equal(xllm_context_tokens_evaluated(ctx) - before, (uint64_t)(n - hit + N_GEN));
    double e = xllm_test_norm_err(got, want, V);
    fprintf(stderr, "  last prompt row error vs no cache: %g\n", e);
    assert_true(e <= 1e-6);
    assert_memory_equal(gen_got, gen_want, sizeof(gen_want));
    /* both sequences share the prefix pages */
    assert_true(st.used_pages < 2 * ((n + st.block_tokens - 1) / st.block_tokens));
    /* the whole-prompt repeat of a: everything but the last block is reused */
    xllm_seq_truncate(ctx, 1, 0);
    int32_t hit2 = xllm_seq_reuse_prefix(ctx, 1, a, n);
    assert_int_equal(hit2, (n - 1) / st.block_tokens * st.block_tokens);
    xllm_context_free(ctx);
    free(want);
    free(got);
    xllm_model_free(m);
}

static void test_prefix_reuse(void **state) {
    (void)state;
    check_layout(XLLM_KV_LAYOUT_XTENSOR);
    check_layout(XLLM_KV_LAYOUT_PAGED);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_prefix_reuse),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
