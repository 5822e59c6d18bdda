/* Batch invariance and batch validation: several sequences evaluated in one batch give the
 * logits each gives alone; malformed batches are rejected without touching the KV state. */
#include <string.h>

#include "testutil.h"
#include "xllm/xllm.h"

static xllm_model *load(const char *rel) {
    xllm_model *m = NULL;
    char err[512];
    if (xllm_model_load(xllm_test_shared(rel), NULL, &m, err, sizeof(err)) != XLLM_OK)
        fprintf(stderr, "%s\n", err);
    assert_non_null(m);
    return m;
}

static xllm_kv_layout g_layout = XLLM_KV_LAYOUT_XTENSOR;

static xllm_context *new_ctx(const xllm_model *m, int n_seq) {
    xllm_context_params cp = xllm_context_default_params();
    cp.kv_layout = g_layout;
    cp.n_ctx = 128;
    cp.n_seq_max = n_seq;
    cp.n_batch = 128;
    cp.n_threads = 2;
    cp.kv_type = XLLM_DTYPE_F32;
    xllm_context *ctx = NULL;
    char err[256];
    assert_int_equal(xllm_context_new(m, &cp, &ctx, err, sizeof(err)), XLLM_OK);
    return ctx;
}

#define NS 3
static const int32_t k_len[NS] = {7, 12, 3}; /* prompt lengths */
static const int32_t k_steps = 4;            /* decode steps after the prompts */

static int32_t tok_of(int s, int i, int32_t n_vocab) {
    return (int32_t)((s * 97 + i * 31 + 5) % n_vocab);
}

/* Runs the NS sequences alone (prompt in one batch, then one token per step) and stores the
 * logits of every row: ref[s][i]. */
static void run_alone(const xllm_model *m, float **ref) {
    const int32_t V = xllm_model_n_vocab(m);
    for (int s = 0; s < NS; s++) {
        xllm_context *ctx = new_ctx(m, 1);
        int32_t tok[64], pos[64], seq[64] = {0};
        int8_t want[64];
        for (int i = 0; i < k_len[s]; i++) {
            tok[i] = tok_of(s, i, V);
            pos[i] = i;
            want[i] = 1;
        }
        xllm_batch b = {k_len[s], tok, pos, seq, want};
        assert_int_equal(xllm_decode(ctx, &b), XLLM_OK);
        for (int i = 0; i < k_len[s]; i++)
            memcpy(ref[s] + (size_t)i * V, xllm_get_logits(ctx, i), sizeof(float) * V);
        for (int j = 0; j < k_steps; j++) {
            int i = k_len[s] + j;
            int32_t t = tok_of(s, i, V), p = i, q = 0;
            xllm_batch d = {1, &t, &p, &q, NULL};
            assert_int_equal(xllm_decode(ctx, &d), XLLM_OK);
            memcpy(ref[s] + (size_t)i * V, xllm_get_logits(ctx, 0), sizeof(float) * V);
        }
        xllm_context_free(ctx);
    }
}

static void check_invariance(const char *rel) {
    xllm_model *m = load(rel);
    const int32_t V = xllm_model_n_vocab(m);
    float *ref[NS];
    for (int s = 0; s < NS; s++) ref[s] = calloc((size_t)(k_len[s] + k_steps) * V, sizeof(float));
    run_alone(m, ref);

    /* all prompts in one batch, rows interleaved round-robin */
    xllm_context *ctx = new_ctx(m, NS);
    int32_t tok[64], pos[64], seq[64], idx[64];
    int n = 0;
    for (int i = 0; i < 12; i++)
        for (int s = 0; s < NS; s++)
            if (i < k_len[s]) {
                tok[n] = tok_of(s, i, V);
                pos[n] = i;
                seq[n] = s;
                idx[n] = i;
                n++;
            }
    int8_t want[64];
    memset(want, 1, sizeof(want));
    xllm_batch b = {n, tok, pos, seq, want};
    assert_int_equal(xllm_decode(ctx, &b), XLLM_OK);
    double worst = 0;
    for (int r = 0; r < n; r++) {
        double e = xllm_test_norm_err(xllm_get_logits(ctx, r), ref[seq[r]] + (size_t)idx[r] * V, V);
        worst = e > worst ? e : worst;
    }
    /* then decode steps with all sequences in each batch (continuous batching) */
    for (int j = 0; j < k_steps; j++) {
        int32_t t[NS], p[NS], q[NS];
        for (int s = 0; s < NS; s++) {
            p[s] = k_len[s] + j;
            t[s] = tok_of(s, p[s], V);
            q[s] = s;
            assert_int_equal(xllm_seq_len(ctx, s), p[s]);
        }
        xllm_batch d = {NS, t, p, q, NULL};
        assert_int_equal(xllm_decode(ctx, &d), XLLM_OK);
        for (int s = 0; s < NS; s++) {
            double e = xllm_test_norm_err(xllm_get_logits(ctx, s), ref[s] + (size_t)p[s] * V, V);
            worst = e > worst ? e : worst;
        }
    }
    fprintf(stderr, "%s (%s): worst normalized error batched vs alone %g\n", rel,
            g_layout == XLLM_KV_LAYOUT_PAGED ? "paged" : "xtensor", worst);
    assert_true(worst <= 1e-5);
    xllm_context_free(ctx);
    for (int s = 0; s < NS; s++) free(ref[s]);
    xllm_model_free(m);
}

static void test_invariance_dense(void **state) {
    (void)state;
    for (int l = 0; l < 2; l++) {
        g_layout = (xllm_kv_layout)l;
        check_invariance("models/tiny/qwen3-tiny-f32.gguf");
        check_invariance("models/tiny/llama-tiny-q4_k_m.gguf");
    }
    g_layout = XLLM_KV_LAYOUT_XTENSOR;
}

static void test_invariance_moe(void **state) {
    (void)state;
    for (int l = 0; l < 2; l++) {
        g_layout = (xllm_kv_layout)l;
        check_invariance("models/tiny/qwen3moe-tiny-f32.gguf");
    }
    g_layout = XLLM_KV_LAYOUT_XTENSOR;
}

static void test_bad_batches(void **state) {
    (void)state;
    xllm_model *m = load("models/tiny/qwen2-tiny-q8_0.gguf");
    xllm_context *ctx = new_ctx(m, 2);
    int32_t tok[2] = {5, 6}, pos[2] = {0, 1}, seq[2] = {0, 0};
    xllm_batch b = {2, tok, pos, seq, NULL};
    assert_int_equal(xllm_decode(ctx, &b), XLLM_OK);
    assert_int_equal(xllm_seq_len(ctx, 0), 2);
    assert_null(xllm_get_logits(ctx, 0)); /* only the last row by default */
    assert_non_null(xllm_get_logits(ctx, 1));

    int32_t p_wrong[1] = {5}, s0[1] = {0}, s9[1] = {9}, t_bad[1] = {1 << 20}, t_ok[1] = {3};
    int32_t p2[1] = {2};
    xllm_batch gap = {1, t_ok, p_wrong, s0, NULL};
    assert_int_equal(xllm_decode(ctx, &gap), XLLM_ERR_INVALID_ARG);
    xllm_batch badseq = {1, t_ok, p2, s9, NULL};
    assert_int_equal(xllm_decode(ctx, &badseq), XLLM_ERR_INVALID_ARG);
    xllm_batch badtok = {1, t_bad, p2, s0, NULL};
    assert_int_equal(xllm_decode(ctx, &badtok), XLLM_ERR_INVALID_ARG);
    xllm_batch empty = {0, t_ok, p2, s0, NULL};
    assert_int_equal(xllm_decode(ctx, &empty), XLLM_ERR_INVALID_ARG);
    assert_int_equal(xllm_seq_len(ctx, 0), 2); /* untouched */

    /* the context is full after n_ctx positions */
    assert_int_equal(xllm_seq_truncate(ctx, 0, 0), XLLM_OK);
    assert_int_equal(xllm_seq_len(ctx, 0), 0);
    int32_t bt[128], bp[128], bs[128] = {0};
    for (int i = 0; i < 128; i++) {
        bt[i] = i % 100;
        bp[i] = i;
    }
    xllm_batch full = {128, bt, bp, bs, NULL};
    assert_int_equal(xllm_decode(ctx, &full), XLLM_OK);
    int32_t p128[1] = {128};
    xllm_batch over = {1, t_ok, p128, s0, NULL};
    assert_int_equal(xllm_decode(ctx, &over), XLLM_ERR_KV_FULL);
    assert_int_equal(xllm_seq_len(ctx, 0), 128);
    xllm_context_free(ctx);
    xllm_model_free(m);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_invariance_dense),
        cmocka_unit_test(test_invariance_moe),
        cmocka_unit_test(test_bad_batches),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
