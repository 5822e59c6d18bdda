/* The engine thread: concurrent greedy requests give the tokens of a one-at-a-time run (also
 * when a small KV pool forces preemption and recomputation), cancellation frees KV, online work
 * is served before queued offline work and preempts running offline work, queue limits. */
#include <pthread.h>
#include <string.h>
#include <unistd.h>

#include "testutil.h"
#include "xllm/engine.h"
#include "xllm/xllm.h"

#define NREQ 10
#define NGEN 40

static xllm_model *g_model;

static int setup(void **state) {
    (void)state;
    char err[512];
    if (xllm_model_load(xllm_test_shared("models/stories260K/stories260K.gguf"), NULL, &g_model,
                        err, sizeof(err)) != XLLM_OK) {
        fprintf(stderr, "%s\n", err);
        return -1;
    }
    return 0;
}

static int teardown(void **state) {
    (void)state;
    xllm_model_free(g_model);
    return 0;
}

static int32_t make_prompt(int i, int32_t *ids) {
    static const char *texts[] = {"Once upon a time", "The cat sat", "Lily and Tom went",
                                  "One day, a little bird", "The sun was"};
    const xllm_tokenizer *tok = xllm_model_tokenizer(g_model);
    const char *t = texts[i % 5];
    int32_t n = xllm_tokenize(tok, t, strlen(t), ids, 64, true, false);
    /* vary the prompts a bit more */
    for (int k = 0; k < i / 5; k++) ids[n++] = 300 + i;
    return n;
}

/* Greedy reference: one sequence at a time through the plain context API. */
static void reference(int i, int32_t *out, int32_t n_gen) {
    int32_t ids[80];
    int32_t n = make_prompt(i, ids);
    xllm_context_params cp = xllm_context_default_params();
    cp.n_ctx = 256;
    cp.n_threads = 1;
    xllm_context *ctx;
    char err[256];
    assert_int_equal(xllm_context_new(g_model, &cp, &ctx, err, sizeof(err)), XLLM_OK);
    int32_t pos[80], seq[80] = {0};
    for (int k = 0; k < n; k++) pos[k] = k;
    xllm_batch b = {n, ids, pos, seq, NULL};
    assert_int_equal(xllm_decode(ctx, &b), XLLM_OK);
    const float *l = xllm_get_logits(ctx, n - 1);
    for (int g = 0; g < n_gen; g++) {
        int32_t t = (int32_t)xllm_test_argmax(l, xllm_model_n_vocab(g_model));
        out[g] = t;
        int32_t p = n + g, s = 0;
        xllm_batch d = {1, &t, &p, &s, NULL};
        assert_int_equal(xllm_decode(ctx, &d), XLLM_OK);
        l = xllm_get_logits(ctx, 0);
    }
    xllm_context_free(ctx);
}

static xllm_request *submit(xllm_engine *e, int i, int max_tokens, bool offline, int priority) {
    int32_t ids[80];
    xllm_request_params rp = xllm_request_default_params();
    rp.n_prompt = make_prompt(i, ids);
    rp.prompt = ids;
    rp.max_tokens = max_tokens;
    rp.sampling.temperature = 0;
    rp.ignore_eos = true;
    rp.offline = offline;
    rp.priority = priority;
    xllm_request *r = NULL;
    char err[256];
    assert_int_equal(xllm_engine_submit(e, &rp, &r, err, sizeof(err)), XLLM_OK);
    return r;
}

static int32_t drain(xllm_request *r, int32_t *out, int32_t max) {
    xllm_token_event ev;
    int32_t n = 0;
    while (xllm_request_next(r, &ev, -1) == 1)
        if (n < max) out[n++] = ev.token;
    return n;
}

static void check_concurrent(xllm_engine_params ep, bool expect_preemption) {
    static int32_t want[NREQ][NGEN];
    static bool have_ref = false;
    if (!have_ref) {
        for (int i = 0; i < NREQ; i++) reference(i, want[i], NGEN);
        have_ref = true;
    }
    xllm_engine *e;
    char err[256];
    xllm_status est = xllm_engine_new(g_model, &ep, &e, err, sizeof(err));
    if (est != XLLM_OK) fprintf(stderr, "%s\n", err);
    assert_int_equal(est, XLLM_OK);
    xllm_request *r[NREQ];
    for (int i = 0; i < NREQ; i++) r[i] = submit(e, i, NGEN, false, 0);
    for (int i = 0; i < NREQ; i++) {
        int32_t got[NGEN + 8];
        int32_t n = drain(r[i], got, NGEN + 8);
        assert_int_equal(n, NGEN);
        assert_int_equal(xllm_request_finish_reason(r[i]), XLLM_FINISH_LENGTH);
        assert_memory_equal(got, want[i], sizeof(int32_t) * NGEN);
        xllm_request_free(r[i]);
    }
    xllm_engine_stats st;
    xllm_engine_get_stats(e, &st);
    fprintf(stderr, "max_seqs %d, kv %zu bytes: steps %llu, preemptions %llu, generated %llu\n",
            ep.max_seqs, ep.kv_memory, (unsigned long long)st.steps,
            (unsigned long long)st.preemptions, (unsigned long long)st.generated_tokens);
    assert_int_equal(st.generated_tokens, NREQ * NGEN);
    if (expect_preemption) assert_true(st.preemptions > 0);
    assert_int_equal(st.kv.used_pages, 0); /* nobody holds KV any more */
    xllm_engine_free(e);
}

static void test_concurrent_greedy(void **state) {
    (void)state;
    xllm_engine_params ep = xllm_engine_default_params();
    ep.max_seqs = 4;
    ep.max_batch_tokens = 16; /* prompts are chunked */
    ep.n_ctx = 256;
    ep.n_threads = 2;
    check_concurrent(ep, false);
    ep.max_seqs = 16;
    ep.max_batch_tokens = 64;
    check_concurrent(ep, false);
    ep.kv_layout = XLLM_KV_LAYOUT_PAGED;
    check_concurrent(ep, false);
}

static void test_preemption_recompute(void **state) {
    (void)state;
    /* a pool of a few pages: requests preempt each other and are recomputed */
    xllm_engine_params ep = xllm_engine_default_params();
    ep.max_seqs = 8;
    ep.max_batch_tokens = 32;
    ep.n_ctx = 256;
    ep.n_threads = 2;
    ep.kv_block_tokens = 64;                    /* rows of 4 KV heads x 8 dims in f16: 64 bytes */
    ep.kv_memory = (size_t)4 * 64 * 64 * 2 * 5; /* 4 pages of 64 tokens x 5 layers x K,V */
    check_concurrent(ep, true);
}

static void test_cancel(void **state) {
    (void)state;
    xllm_engine_params ep = xllm_engine_default_params();
    ep.max_seqs = 4;
    ep.n_ctx = 256;
    ep.n_threads = 2;
    xllm_engine *e;
    char err[256];
    assert_int_equal(xllm_engine_new(g_model, &ep, &e, err, sizeof(err)), XLLM_OK);
    xllm_request *a = submit(e, 0, 200, false, 0), *b = submit(e, 1, 200, false, 0);
    xllm_token_event ev;
    assert_int_equal(xllm_request_next(a, &ev, -1), 1);
    xllm_request_cancel(a);
    while (xllm_request_next(a, &ev, -1) == 1) {
    }
    assert_int_equal(xllm_request_finish_reason(a), XLLM_FINISH_CANCEL);
    xllm_request_free(a);
    xllm_request_free(b); /* released while running: cancelled by the engine */
    for (int i = 0; i < 200; i++) {
        xllm_engine_stats st;
        xllm_engine_get_stats(e, &st);
        if (st.kv.used_pages == 0 && st.requests_finished == 2) break;
        usleep(5000);
    }
    xllm_engine_stats st;
    xllm_engine_get_stats(e, &st);
    assert_int_equal(st.requests_finished, 2);
    assert_int_equal(st.kv.used_pages, 0);
    xllm_engine_free(e);
}

static void test_priorities(void **state) {
    (void)state;
    xllm_engine_params ep = xllm_engine_default_params();
    ep.max_seqs = 2;
    ep.max_batch_tokens = 64;
    ep.n_ctx = 256;
    ep.n_threads = 2;
    xllm_engine *e;
    char err[256];
    assert_int_equal(xllm_engine_new(g_model, &ep, &e, err, sizeof(err)), XLLM_OK);
    /* saturate: 2 offline running, 4 offline queued */
    xllm_request *off[6];
    for (int i = 0; i < 6; i++) off[i] = submit(e, i, 150, true, 0);
    xllm_token_event ev;
    assert_int_equal(xllm_request_next(off[0], &ev, -1), 1);
    assert_int_equal(xllm_request_next(off[1], &ev, -1), 1);
    xllm_request *on = submit(e, 7, 10, false, 0);
    int32_t got[16];
    assert_int_equal(drain(on, got, 16), 10);
    xllm_request_stats ost;
    xllm_request_get_stats(on, &ost);
    /* none of the queued offline requests got a token before the online one finished */
    for (int i = 2; i < 6; i++) {
        xllm_request_stats s;
        xllm_request_get_stats(off[i], &s);
        assert_true(s.t_first_ms == 0 || s.t_first_ms > ost.t_first_ms);
    }
    xllm_engine_stats st;
    xllm_engine_get_stats(e, &st);
    assert_true(st.preemptions >= 1); /* a running offline request gave its slot */
    fprintf(stderr, "online TTFT under offline saturation: %.1f ms (preemptions %llu)\n",
            ost.t_first_ms, (unsigned long long)st.preemptions);
    /* an online request with a lower priority value goes before a higher one */
    xllm_request_free(on);
    for (int i = 0; i < 6; i++) xllm_request_free(off[i]);
    xllm_engine_free(e);
}

static void test_limits(void **state) {
    (void)state;
    xllm_engine_params ep = xllm_engine_default_params();
    ep.max_seqs = 1;
    ep.max_queue = 2;
    ep.n_ctx = 128;
    ep.n_threads = 1;
    xllm_engine *e;
    char err[256];
    assert_int_equal(xllm_engine_new(g_model, &ep, &e, err, sizeof(err)), XLLM_OK);
    int32_t ids[4] = {1, 400, 401, 402};
    xllm_request_params rp = xllm_request_default_params();
    rp.prompt = ids;
    rp.n_prompt = 4;
    rp.max_tokens = 200;
    xllm_request *r = NULL;
    assert_int_equal(xllm_engine_submit(e, &rp, &r, err, sizeof(err)), XLLM_ERR_INVALID_ARG);
    assert_non_null(strstr(err, "exceeds the context"));
    rp.max_tokens = 8;
    ids[2] = 99999;
    assert_int_equal(xllm_engine_submit(e, &rp, &r, err, sizeof(err)), XLLM_ERR_INVALID_ARG);
    assert_non_null(strstr(err, "outside the vocabulary"));
    ids[2] = 401;
    rp.n_prompt = 0;
    assert_int_equal(xllm_engine_submit(e, &rp, &r, err, sizeof(err)), XLLM_ERR_INVALID_ARG);
    rp.n_prompt = 4;
    /* queue full: submissions wait in the inbox until the engine takes them */
    xllm_request *q[8];
    int accepted = 0, busy = 0;
    for (int i = 0; i < 8; i++) {
        xllm_status st = xllm_engine_submit(e, &rp, &q[accepted], err, sizeof(err));
        if (st == XLLM_OK)
            accepted++;
        else if (st == XLLM_ERR_BUSY)
            busy++;
    }
    assert_true(busy > 0);
    assert_true(accepted >= 2);
    for (int i = 0; i < accepted; i++) xllm_request_free(q[i]);
    xllm_engine_free(e); /* with requests possibly still queued */
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_concurrent_greedy),
        cmocka_unit_test(test_preemption_recompute),
        cmocka_unit_test(test_cancel),
        cmocka_unit_test(test_priorities),
        cmocka_unit_test(test_limits),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
