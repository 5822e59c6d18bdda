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

/* Greedy reference for prompt ids[0..n): one sequence, one batch, through the context API. */
static void reference_ids(const int32_t *ids, int32_t n, int32_t *out, int32_t n_gen) {
    xllm_context_params cp = xllm_context_default_params();
    cp.n_ctx = 256;
    cp.n_threads = 1;
    xllm_context *ctx;
    char err[256];
    assert_int_equal(xllm_context_new(g_model, &cp, &ctx, err, sizeof(err)), XLLM_OK);
    int32_t pos[256], seq[256] = {0};
    assert_true(n <= 256);
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

static void reference(int i, int32_t *out, int32_t n_gen) {
    int32_t ids[80];
    int32_t n = make_prompt(i, ids);
    reference_ids(ids, n, out, n_gen);
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

/* Submits the decode leg (waiting for transfer id) to de and the prefill leg to pe. */
static void pd_submit(xllm_engine *pe, xllm_engine *de, const int32_t *ids, int32_t n, uint64_t id,
                      bool offline, xllm_request **pr, xllm_request **dr) {
    char to[64], err[256];
    snprintf(to, sizeof(to), "127.0.0.1:%d", xllm_engine_kv_port(de));
    xllm_request_params rp = xllm_request_default_params();
    rp.prompt = ids;
    rp.n_prompt = n;
    rp.sampling.temperature = 0;
    rp.ignore_eos = true;
    rp.max_tokens = NGEN;
    rp.pd_import_id = id;
    assert_int_equal(xllm_engine_submit(de, &rp, dr, err, sizeof(err)), XLLM_OK);
    rp.pd_import_id = 0;
    rp.max_tokens = 1;
    rp.pd_export_id = id;
    rp.pd_export_to = to;
    rp.offline = offline;
    assert_int_equal(xllm_engine_submit(pe, &rp, pr, err, sizeof(err)), XLLM_OK);
}

/* Waits for both legs of a PD request: the prefill leg emits want[0], the decode leg want[0..NGEN).
 * Frees both; returns the prefill leg's stats. */
static xllm_request_stats pd_finish(xllm_request *pr, xllm_request *dr, const int32_t *want) {
    int32_t first[2], got[NGEN + 4];
    assert_int_equal(drain(pr, first, 2), 1);
    assert_int_equal(xllm_request_finish_reason(pr), XLLM_FINISH_LENGTH);
    assert_int_equal(first[0], want[0]);
    assert_int_equal(drain(dr, got, NGEN + 4), NGEN);
    assert_int_equal(xllm_request_finish_reason(dr), XLLM_FINISH_LENGTH);
    assert_memory_equal(got, want, sizeof(int32_t) * NGEN);
    xllm_request_stats st;
    xllm_request_get_stats(pr, &st);
    fprintf(stderr,
            "pd: %d prefill steps (%d cached, preempted %d), sends in forward %d, between steps "
            "%d, first send after %d steps, copies %.3f ms\n",
            st.n_prefill_steps, st.n_cached, st.n_preempted, st.kv_sends_forward,
            st.kv_sends_between, st.kv_first_send_after, st.kv_copy_ms);
    xllm_request_free(pr);
    xllm_request_free(dr);
    return st;
}

/* PD: a prefill engine computes the prompt and sends its KV to a decode engine, which emits the
 * transferred first token and continues: the tokens of a one-engine greedy run. */
static void test_pd_transfer(void **state) {
    (void)state;
    xllm_engine_params pp = xllm_engine_default_params(), dp = xllm_engine_default_params();
    pp.n_ctx = dp.n_ctx = 256;
    pp.n_threads = dp.n_threads = 1;
    dp.kv_receiver = true;
    dp.kv_layout = XLLM_KV_LAYOUT_PAGED; /* layouts may differ between the two sides */
    xllm_engine *pe, *de;
    char err[256];
    assert_int_equal(xllm_engine_new(g_model, &pp, &pe, err, sizeof(err)), XLLM_OK);
    assert_int_equal(xllm_engine_new(g_model, &dp, &de, err, sizeof(err)), XLLM_OK);
    assert_int_equal(xllm_engine_kv_port(pe), 0);
    int port = xllm_engine_kv_port(de);
    assert_true(port > 0);
    char to[64];
    snprintf(to, sizeof(to), "127.0.0.1:%d", port);
    for (int i = 0; i < 3; i++) {
        int32_t want[NGEN];
        reference(i, want, NGEN);
        int32_t ids[80];
        int32_t n = make_prompt(i, ids);
        xllm_request *dr = NULL, *pr = NULL;
        /* the decode side first: it waits for the KV */
        pd_submit(pe, de, ids, n, 100 + (uint64_t)i, false, &pr, &dr);
        pd_finish(pr, dr, want);
    }
    xllm_engine_stats ps, ds;
    xllm_engine_get_stats(pe, &ps);
    xllm_engine_get_stats(de, &ds);
    assert_int_equal(ps.kv_exports, 3);
    assert_int_equal(ds.kv_imports, 3);
    assert_true(ds.kv_import_tokens > 0);
    assert_int_equal(ds.kv.used_pages, 0);

    /* a transfer whose tokens are not the decode request's prompt ends that request */
    int32_t a[4] = {1, 400, 401, 402}, b[4] = {1, 400, 401, 403};
    xllm_request_params rp = xllm_request_default_params();
    rp.n_prompt = 4;
    rp.max_tokens = 4;
    rp.prompt = b;
    rp.pd_import_id = 7;
    xllm_request *dr = NULL, *pr = NULL;
    assert_int_equal(xllm_engine_submit(de, &rp, &dr, err, sizeof(err)), XLLM_OK);
    rp.prompt = a;
    rp.pd_import_id = 0;
    rp.pd_export_id = 7;
    rp.pd_export_to = to;
    rp.max_tokens = 1;
    assert_int_equal(xllm_engine_submit(pe, &rp, &pr, err, sizeof(err)), XLLM_OK);
    int32_t tmp[8];
    drain(pr, tmp, 8);
    assert_int_equal(drain(dr, tmp, 8), 0);
    assert_int_equal(xllm_request_finish_reason(dr), XLLM_FINISH_ABORT);
    xllm_request_free(pr);
    xllm_request_free(dr);
    /* an engine without a receiver refuses imports */
    rp.pd_export_id = 0;
    rp.pd_import_id = 9;
    assert_int_equal(xllm_engine_submit(pe, &rp, &dr, err, sizeof(err)), XLLM_ERR_INVALID_ARG);
    xllm_engine_free(pe);
    xllm_engine_free(de);
}

/* ---- PD with a prompt prefilled in chunks ---------------------------------------------- */

#define LONG_PROMPT 150 /* 5 chunks of at most 32: 32, 32, 32, 32, 22 */
#define CHUNK       32

static void long_prompt(int v, int32_t *ids) {
    int32_t n = make_prompt(v, ids);
    for (int32_t k = n; k < LONG_PROMPT; k++) ids[k] = 3 + (k * 37 + v * 11) % 500;
}

static xllm_engine *pd_engine_with(xllm_engine_params ep) {
    xllm_engine *e = NULL;
    char err[256];
    xllm_status st = xllm_engine_new(g_model, &ep, &e, err, sizeof(err));
    if (st != XLLM_OK) fail_msg("%s", err);
    return e;
}

static xllm_engine *pd_engine(bool receiver, xllm_kv_layout layout, bool after_prefill) {
    xllm_engine_params ep = xllm_engine_default_params();
    ep.n_ctx = 256;
    ep.n_threads = 1;
    ep.max_seqs = 4;
    ep.max_batch_tokens = CHUNK; /* the long prompt is prefilled in chunks */
    ep.kv_layout = layout;
    ep.kv_receiver = receiver;
    ep.pd_export_after_prefill = after_prefill;
    return pd_engine_with(ep);
}

/* One PD request of the long prompt (see pd_finish). */
static xllm_request_stats pd_long(xllm_engine *pe, xllm_engine *de, uint64_t id,
                                  const int32_t *want) {
    int32_t ids[LONG_PROMPT];
    long_prompt(0, ids);
    xllm_request *pr, *dr;
    pd_submit(pe, de, ids, LONG_PROMPT, id, false, &pr, &dr);
    return pd_finish(pr, dr, want);
}

/* Checks that pe exported and de imported n prompts and nothing is left in flight, frees both. */
static void pd_engines_done(xllm_engine *pe, xllm_engine *de, uint64_t n) {
    xllm_engine_stats ps, ds;
    xllm_engine_get_stats(pe, &ps);
    xllm_engine_get_stats(de, &ds);
    assert_int_equal(ps.kv_exports, n);
    assert_int_equal(ps.kv_export_aborts, 0);
    assert_int_equal(ds.kv_imports, n);
    assert_int_equal(ds.kv_rx_staged_bytes, 0);
    assert_int_equal(ds.kv.used_pages, 0);
    xllm_engine_free(pe);
    xllm_engine_free(de);
}

/* A long prompt prefilled in 5 chunks: its KV leaves layer by layer from inside the forward pass
 * of every chunk (the first chunk's rows are queued during its own step, before the second
 * chunk's step), the decode leg gives the tokens of a one-engine run; both layout directions, a
 * prefix-cache hit (sent at the start), and the after-prefill mode for contrast. */
static void test_pd_chunked(void **state) {
    (void)state;
    int32_t ids[LONG_PROMPT], want[NGEN];
    long_prompt(0, ids);
    reference_ids(ids, LONG_PROMPT, want, NGEN);
    const int32_t NL = xllm_model_n_layer(g_model), chunks = (LONG_PROMPT + CHUNK - 1) / CHUNK;
    for (int dir = 0; dir < 2; dir++) {
        xllm_kv_layout lp = dir ? XLLM_KV_LAYOUT_PAGED : XLLM_KV_LAYOUT_XTENSOR;
        xllm_kv_layout ld = dir ? XLLM_KV_LAYOUT_XTENSOR : XLLM_KV_LAYOUT_PAGED;
        xllm_engine *pe = pd_engine(false, lp, false), *de = pd_engine(true, ld, false);
        xllm_request_stats st = pd_long(pe, de, 200 + (uint64_t)dir, want);
        assert_int_equal(st.n_cached, 0);
        assert_int_equal(st.n_prefill_steps, chunks);
        assert_int_equal(st.kv_sends_forward, NL * chunks); /* each layer of each chunk */
        assert_int_equal(st.kv_sends_between, 0);
        assert_int_equal(st.kv_first_send_after, 0); /* queued during the first chunk's step */
        assert_true(st.t_prefill_ms > 0 && st.t_prefill_ms <= st.t_first_ms);

        /* again: the cached prefix blocks go out at the start, the rest during the pass */
        st = pd_long(pe, de, 210 + (uint64_t)dir, want);
        assert_true(st.n_cached > 0);
        int32_t rest = (LONG_PROMPT - st.n_cached + CHUNK - 1) / CHUNK;
        assert_int_equal(st.n_prefill_steps, rest);
        assert_int_equal(st.kv_sends_between, NL);
        assert_int_equal(st.kv_sends_forward, NL * rest);
        assert_int_equal(st.kv_first_send_after, 0);
        pd_engines_done(pe, de, 2);
    }
    /* the behaviour before: everything queued after the last chunk's step */
    xllm_engine *pe = pd_engine(false, XLLM_KV_LAYOUT_XTENSOR, true);
    xllm_engine *de = pd_engine(true, XLLM_KV_LAYOUT_PAGED, false);
    xllm_request_stats st = pd_long(pe, de, 220, want);
    assert_int_equal(st.n_prefill_steps, chunks);
    assert_int_equal(st.kv_sends_forward, 0);
    assert_int_equal(st.kv_sends_between, NL);
    assert_int_equal(st.kv_first_send_after, chunks);
    pd_engines_done(pe, de, 1);
}

/* Holds the prefill engine's thread between two steps (from the notify of a request decoding
 * in it, which runs at the end of every step) once the watched exported request has computed a
 * chunk, so that the test acts between that request's chunks. */
typedef struct gate {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    xllm_request *watch; /* NULL until submitted */
    int state;           /* 0 open, 1 engine held, 2 released */
    xllm_request *busy;  /* the decoding request */
} gate;

static void gate_notify(void *user) {
    gate *g = user;
    pthread_mutex_lock(&g->mu);
    if (g->state == 0 && g->watch) {
        xllm_request_stats st;
        xllm_request_get_stats(g->watch, &st);
        if (st.n_prefill_steps >= 1) {
            g->state = 1;
            pthread_cond_broadcast(&g->cv);
            while (g->state == 1) pthread_cond_wait(&g->cv, &g->mu);
        }
    }
    pthread_mutex_unlock(&g->mu);
}

/* Starts the decoding request of the gate in pe. */
static void gate_open(gate *g, xllm_engine *pe) {
    memset(g, 0, sizeof(*g));
    pthread_mutex_init(&g->mu, NULL);
    pthread_cond_init(&g->cv, NULL);
    int32_t ids[80];
    xllm_request_params rp = xllm_request_default_params();
    rp.n_prompt = make_prompt(1, ids);
    rp.prompt = ids;
    rp.max_tokens = 100;
    rp.ignore_eos = true;
    rp.notify = gate_notify;
    rp.notify_user = g;
    char err[256];
    assert_int_equal(xllm_engine_submit(pe, &rp, &g->busy, err, sizeof(err)), XLLM_OK);
}

/* Waits until the engine is held after a step of watch; returns watch's stats then. */
static xllm_request_stats gate_hold(gate *g, xllm_request *watch) {
    pthread_mutex_lock(&g->mu);
    g->watch = watch;
    while (g->state != 1) pthread_cond_wait(&g->cv, &g->mu);
    pthread_mutex_unlock(&g->mu);
    xllm_request_stats st;
    xllm_request_get_stats(watch, &st);
    return st;
}

static void gate_release(gate *g) {
    pthread_mutex_lock(&g->mu);
    g->state = 2;
    pthread_cond_broadcast(&g->cv);
    pthread_mutex_unlock(&g->mu);
}

/* After the engine is freed (its thread may call the notify until then). */
static void gate_close(gate *g) {
    pthread_mutex_destroy(&g->mu);
    pthread_cond_destroy(&g->cv);
}

/* An offline exported request preempted between two prefill chunks by an online one: its
 * transfer stays open while it waits, the positions it recomputes that went out already are not
 * sent again (the receiver would refuse them), and both decode legs give the tokens of a
 * one-engine run. */
static void test_pd_preempted(void **state) {
    (void)state;
    int32_t ids[2][LONG_PROMPT], want[2][NGEN];
    for (int i = 0; i < 2; i++) {
        long_prompt(1 + i, ids[i]);
        reference_ids(ids[i], LONG_PROMPT, want[i], NGEN);
    }
    xllm_engine_params ep = xllm_engine_default_params();
    ep.n_ctx = 256;
    ep.n_threads = 1;
    ep.max_seqs = 2; /* the gate's request and one more */
    ep.max_batch_tokens = CHUNK;
    xllm_engine *pe = pd_engine_with(ep);
    xllm_engine *de = pd_engine(true, XLLM_KV_LAYOUT_PAGED, false);
    gate g;
    gate_open(&g, pe);
    xllm_request *pr[2], *dr[2];
    pd_submit(pe, de, ids[0], LONG_PROMPT, 400, true, &pr[0], &dr[0]);
    xllm_request_stats st = gate_hold(&g, pr[0]);
    assert_true(st.n_prefill_steps >= 1 && st.n_prefill_steps * (CHUNK - 1) < LONG_PROMPT);
    pd_submit(pe, de, ids[1], LONG_PROMPT, 401, false, &pr[1], &dr[1]); /* takes its slot */
    gate_release(&g);
    const int32_t NL = xllm_model_n_layer(g_model);
    for (int i = 0; i < 2; i++) {
        st = pd_finish(pr[i], dr[i], want[i]);
        assert_int_equal(st.n_preempted, i == 0 ? 1 : 0);
        /* every position once, in order (the receiver refuses repeats and gaps), all from
         * inside forward passes */
        assert_int_equal(st.kv_sends_between, 0);
        assert_true(st.kv_sends_forward >= NL * ((LONG_PROMPT + CHUNK - 1) / CHUNK));
    }
    xllm_request_free(g.busy); /* cancels it */
    pd_engines_done(pe, de, 2);
    gate_close(&g);
}

/* An exported request cancelled between two prefill chunks: its transfer is aborted, the decode
 * side frees the staging and ends the decode leg; no KV is left on either side. */
static void test_pd_cancel_mid_prefill(void **state) {
    (void)state;
    xllm_engine *pe = pd_engine(false, XLLM_KV_LAYOUT_XTENSOR, false);
    xllm_engine *de = pd_engine(true, XLLM_KV_LAYOUT_PAGED, false);
    gate g;
    gate_open(&g, pe);
    int32_t ids[LONG_PROMPT];
    long_prompt(0, ids);
    xllm_request *pr, *dr;
    pd_submit(pe, de, ids, LONG_PROMPT, 300, false, &pr, &dr);
    /* the engine is held between two steps, the prompt partly computed and sent */
    xllm_request_stats st = gate_hold(&g, pr);
    fprintf(stderr, "cancelled after %d prefill steps, %d layer sends\n", st.n_prefill_steps,
            st.kv_sends_forward);
    assert_true(st.n_prefill_steps >= 1);
    assert_true(st.n_prefill_steps * (CHUNK - 1) < LONG_PROMPT); /* chunks are left */
    assert_true(st.kv_sends_forward >= xllm_model_n_layer(g_model));
    /* the decode side has begun staging it (SEQ_BEGIN charged the whole sequence) */
    xllm_engine_stats ps, ds;
    for (int i = 0; i < 2000; i++) {
        xllm_engine_get_stats(de, &ds);
        if (ds.kv_rx_staged_bytes > 0) break;
        usleep(5000);
    }
    assert_true(ds.kv_rx_staged_bytes > 0);
    xllm_request_cancel(pr);
    gate_release(&g);

    int32_t tmp[8];
    assert_int_equal(drain(pr, tmp, 8), 0);
    assert_int_equal(xllm_request_finish_reason(pr), XLLM_FINISH_CANCEL);
    assert_int_equal(drain(dr, tmp, 8), 0); /* the ABORT reached the decode side */
    assert_int_equal(xllm_request_finish_reason(dr), XLLM_FINISH_ABORT);
    xllm_engine_get_stats(de, &ds);
    assert_int_equal(ds.kv_rx_failed, 1);
    assert_int_equal(ds.kv_rx_staged_bytes, 0);
    assert_int_equal(ds.kv_imports, 0);
    assert_int_equal(ds.kv.used_pages, 0);
    xllm_request_free(g.busy); /* cancels it */
    for (int i = 0; i < 400; i++) {
        xllm_engine_get_stats(pe, &ps);
        if (ps.requests_finished == 2 && ps.kv.used_pages == 0) break;
        usleep(5000);
    }
    assert_int_equal(ps.requests_finished, 2);
    assert_int_equal(ps.kv.used_pages, 0);
    assert_int_equal(ps.kv_exports, 0);
    assert_int_equal(ps.kv_export_aborts, 1);
    xllm_request_free(pr);
    xllm_request_free(dr);
    xllm_engine_free(pe);
    xllm_engine_free(de);
    gate_close(&g);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_concurrent_greedy),
        cmocka_unit_test(test_preemption_recompute),
        cmocka_unit_test(test_cancel),
        cmocka_unit_test(test_priorities),
        cmocka_unit_test(test_limits),
        cmocka_unit_test(test_pd_transfer),
        cmocka_unit_test(test_pd_chunked),
        cmocka_unit_test(test_pd_preempted),
        cmocka_unit_test(test_pd_cancel_mid_prefill),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
