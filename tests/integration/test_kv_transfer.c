/* PD disaggregation over loopback TCP in one process: context A (prefill) computes prompts and
 * sends their KV layer by layer to context B's receiver; B imports them and both continue
 * greedy decoding with identical logits (both KV layouts, mismatched layouts, f32 and f16 KV, a
 * quantized model, several transfers interleaved on one connection, layers split into frames or
 * sent in position ranges).
 * Failures: a sender that dies mid-transfer, a sender that closes mid-transfer, a cancellation
 * by the decode side, and model / KV type mismatches refused at HELLO. */
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "testutil.h"
#include "transfer/transfer-impl.h"
#include "transfer/transfer.h"
#include "xllm/xllm.h"

#define N_PROMPT 45 /* not a multiple of a block: the last page is partial */
#define N_GEN    8

static xllm_model *load(const char *rel) {
    xllm_model *m = NULL;
    char err[512];
    xllm_status st = xllm_model_load(xllm_test_shared(rel), NULL, &m, err, sizeof(err));
    if (st != XLLM_OK) fail_msg("%s: %s", rel, err);
    return m;
}

static xllm_context *new_ctx(const xllm_model *m, xllm_kv_layout layout, xllm_dtype kv_type) {
    xllm_context_params cp = xllm_context_default_params();
    cp.n_ctx = 256;
    cp.n_seq_max = 3;
    cp.n_batch = 64;
    cp.n_threads = 2;
    cp.kv_type = kv_type;
    cp.kv_layout = layout;
    xllm_context *ctx = NULL;
    char err[256];
    assert_int_equal(xllm_context_new(m, &cp, &ctx, err, sizeof(err)), XLLM_OK);
    return ctx;
}

static void prompt_of(const xllm_model *m, uint64_t seed, int32_t *toks, int32_t n) {
    for (int32_t i = 0; i < n; i++)
        toks[i] = (int32_t)(xllm_test_rand_u64(&seed) % (uint64_t)xllm_model_n_vocab(m));
}

/* Evaluates tokens[0..n) of seq; returns the last row's logits. */
static const float *prefill(xllm_context *ctx, int32_t seq, const int32_t *toks, int32_t n) {
    int32_t pos[N_PROMPT], sq[N_PROMPT];
    for (int32_t i = 0; i < n; i++) {
        pos[i] = i;
        sq[i] = seq;
    }
    xllm_batch b = {n, toks, pos, sq, NULL};
    assert_int_equal(xllm_decode(ctx, &b), XLLM_OK);
    return xllm_get_logits(ctx, n - 1);
}

static float logprob_of(const float *logits, int32_t V, int32_t t) {
    float mx = logits[0];
    for (int32_t i = 1; i < V; i++) mx = logits[i] > mx ? logits[i] : mx;
    double s = 0;
    for (int32_t i = 0; i < V; i++) s += exp((double)(logits[i] - mx));
    return (float)((double)(logits[t] - mx) - log(s));
}

/* Decodes one token of seq at pos; returns its logits. */
static const float *step(xllm_context *ctx, int32_t seq, int32_t tok, int32_t pos) {
    xllm_batch b = {1, &tok, &pos, &seq, NULL};
    assert_int_equal(xllm_decode(ctx, &b), XLLM_OK);
    return xllm_get_logits(ctx, 0);
}

static xllm_kv_receiver *new_receiver(xllm_context *ctx, size_t max_frame) {
    xllm_kv_receiver_params rp = xllm_kv_receiver_default_params();
    rp.port = 0; /* any free port */
    rp.max_frame_bytes = max_frame;
    xllm_kv_receiver *r = NULL;
    char err[256];
    xllm_status st = xllm_kv_receiver_new(ctx, &rp, &r, err, sizeof(err));
    if (st != XLLM_OK) fail_msg("%s", err);
    assert_true(xllm_kv_receiver_port(r) > 0);
    return r;
}

static xllm_kv_sender *new_sender(xllm_context *ctx, int port, size_t max_frame) {
    xllm_kv_sender_params sp = xllm_kv_sender_default_params();
    sp.port = port;
    sp.max_frame_bytes = max_frame;
    xllm_kv_sender *s = NULL;
    char err[256];
    xllm_status st = xllm_kv_sender_new(ctx, &sp, &s, err, sizeof(err));
    if (st != XLLM_OK) fail_msg("%s", err);
    return s;
}

/* Two prompts prefilled in A (seqs 0 and 1), sent interleaved layer by layer over one
 * connection, imported in B (seqs 2 and 0); then A and B decode both and must agree. */
static void check_pd(const char *model, xllm_dtype kv_type, xllm_kv_layout la, xllm_kv_layout lb,
                     size_t max_frame, size_t rx_frame) {
    xllm_model *m = load(model);
    const int32_t V = xllm_model_n_vocab(m), NL = xllm_model_n_layer(m);
    xllm_context *A = new_ctx(m, la, kv_type), *B = new_ctx(m, lb, kv_type);
    xllm_kv_receiver *r = new_receiver(B, rx_frame);
    xllm_kv_sender *s = new_sender(A, xllm_kv_receiver_port(r), max_frame);

    const int32_t n[2] = {N_PROMPT, 17};
    int32_t toks[2][N_PROMPT], first[2];
    float lp[2];
    const uint64_t id[2] = {1001, 1002};
    for (int q = 0; q < 2; q++) {
        prompt_of(m, 11 + (uint64_t)q, toks[q], n[q]);
        const float *lg = prefill(A, q, toks[q], n[q]);
        first[q] = (int32_t)xllm_test_argmax(lg, V);
        lp[q] = logprob_of(lg, V, first[q]);
        assert_true(lp[q] <= 0);
        assert_int_equal(xllm_kv_sender_begin(s, id[q], toks[q], n[q]), XLLM_OK);
        /* layer 0 of the first goes out before the second sequence is even computed */
        if (q == 0) assert_int_equal(xllm_kv_sender_send_layer(s, id[0], 0, 0), XLLM_OK);
    }
    assert_int_equal(xllm_kv_sender_send_layer(s, id[0], 0, 0), XLLM_ERR_INVALID_ARG); /* twice */
    assert_int_equal(xllm_kv_sender_end(s, id[0], first[0], lp[0]), XLLM_ERR_INVALID_ARG);
    assert_int_equal(xllm_kv_sender_begin(s, id[0], toks[0], n[0]), XLLM_ERR_INVALID_ARG);
    /* ranges of a layer go in order and within the sequence */
    assert_int_equal(xllm_kv_sender_send_rows(s, id[1], 1, 0, 3, 2), XLLM_ERR_INVALID_ARG);
    assert_int_equal(xllm_kv_sender_send_rows(s, id[1], 1, 0, 0, n[1] + 1), XLLM_ERR_INVALID_ARG);
    assert_int_equal(xllm_kv_sender_send_rows(s, id[1], 1, 0, 0, 0), XLLM_ERR_INVALID_ARG);
    for (int32_t il = 0; il < NL; il++) { /* interleaved on one connection */
        if (il > 0) assert_int_equal(xllm_kv_sender_send_layer(s, id[0], 0, il), XLLM_OK);
        /* the second in two ranges, as a prompt computed in chunks sends it */
        assert_int_equal(xllm_kv_sender_send_rows(s, id[1], 1, il, 0, 7), XLLM_OK);
        assert_int_equal(xllm_kv_sender_send_layer(s, id[1], 1, il), XLLM_ERR_INVALID_ARG);
        assert_int_equal(xllm_kv_sender_send_rows(s, id[1], 1, il, 0, 7), XLLM_ERR_INVALID_ARG);
        if (il == 0) /* not every position of every layer yet */
            assert_int_equal(xllm_kv_sender_end(s, id[1], first[1], lp[1]), XLLM_ERR_INVALID_ARG);
        assert_int_equal(xllm_kv_sender_send_rows(s, id[1], 1, il, 7, n[1] - 7), XLLM_OK);
    }
    assert_int_equal(xllm_kv_sender_end(s, id[1], first[1], lp[1]), XLLM_OK);
    assert_int_equal(xllm_kv_sender_end(s, id[0], first[0], lp[0]), XLLM_OK);
    char err[256];
    for (int q = 0; q < 2; q++) {
        xllm_status st = xllm_kv_sender_wait(s, id[q], 10000, err, sizeof(err));
        if (st != XLLM_OK) fail_msg("transfer %d: %s", q, err);
    }

    const int32_t dst[2] = {2, 0};
    int got = 0;
    while (got < 2) {
        xllm_kv_transfer *t = xllm_kv_receiver_poll(r, 10000);
        assert_non_null(t);
        assert_int_equal(t->status, XLLM_OK);
        int q = t->id == id[0] ? 0 : 1;
        assert_true(t->id == id[q]);
        assert_int_equal(t->n_tokens, n[q]);
        assert_memory_equal(t->tokens, toks[q], sizeof(int32_t) * (size_t)n[q]);
        assert_int_equal(t->first_token, first[q]);
        assert_true(t->first_logprob == lp[q]);
        xllm_status st = xllm_kv_transfer_import(t, B, dst[q], err, sizeof(err));
        if (st != XLLM_OK) fail_msg("import: %s", err);
        assert_int_equal(xllm_seq_len(B, dst[q]), n[q]);
        /* a second import into a busy sequence is refused, the transfer stays usable */
        assert_int_equal(xllm_kv_transfer_import(t, B, dst[q], err, sizeof(err)),
                         XLLM_ERR_INVALID_ARG);
        xllm_kv_transfer_free(t);
        got++;
    }
    xllm_kv_receiver_stats rs;
    xllm_kv_receiver_get_stats(r, &rs);
    assert_int_equal(rs.staged_bytes, 0);
    assert_int_equal(rs.completed, 2);

    /* both continue greedily, interleaved in one batch each */
    int32_t tok[2] = {first[0], first[1]};
    double worst = 0;
    for (int g = 0; g < N_GEN; g++) {
        for (int q = 0; q < 2; q++) {
            const int32_t p = n[q] + g;
            float *la_logits = malloc(sizeof(float) * (size_t)V);
            memcpy(la_logits, step(A, q, tok[q], p), sizeof(float) * (size_t)V);
            const float *lb_logits = step(B, dst[q], tok[q], p);
            double e = xllm_test_norm_err(lb_logits, la_logits, V);
            worst = e > worst ? e : worst;
            int32_t ta = (int32_t)xllm_test_argmax(la_logits, V);
            assert_int_equal((int32_t)xllm_test_argmax(lb_logits, V), ta);
            tok[q] = ta;
            free(la_logits);
        }
    }
    xllm_kv_receiver_get_stats(r, &rs);
    fprintf(stderr,
            "%s kv %s, %s -> %s, frames <= %zu/%zu B (%llu bytes read): max logits "
            "error %g\n",
            model, xllm_dtype_name(kv_type), la == XLLM_KV_LAYOUT_PAGED ? "paged" : "xtensor",
            lb == XLLM_KV_LAYOUT_PAGED ? "paged" : "xtensor", max_frame, rx_frame,
            (unsigned long long)rs.bytes_rx, worst);
    assert_true(worst <= 1e-6);
    if (la == lb) assert_true(worst == 0); /* the same bytes through the same kernels */

    xllm_kv_sender_free(s);
    xllm_kv_receiver_free(r);
    xllm_context_free(A);
    xllm_context_free(B);
    xllm_model_free(m);
}

static void test_pd_f32(void **state) {
    (void)state;
    const char *m = "models/tiny/qwen3-tiny-f32.gguf";
    check_pd(m, XLLM_DTYPE_F32, XLLM_KV_LAYOUT_XTENSOR, XLLM_KV_LAYOUT_XTENSOR, 0, 0);
    check_pd(m, XLLM_DTYPE_F32, XLLM_KV_LAYOUT_PAGED, XLLM_KV_LAYOUT_PAGED, 0, 0);
    check_pd(m, XLLM_DTYPE_F32, XLLM_KV_LAYOUT_XTENSOR, XLLM_KV_LAYOUT_PAGED, 0, 0);
    /* frames of 3 rows: every layer split, chunks crossing the paged layout's blocks */
    check_pd(m, XLLM_DTYPE_F32, XLLM_KV_LAYOUT_PAGED, XLLM_KV_LAYOUT_XTENSOR, 3 * 2 * 512, 0);
    /* the receiver's limit (told in its HELLO) wins over the sender's: 5 rows per frame */
    check_pd(m, XLLM_DTYPE_F32, XLLM_KV_LAYOUT_XTENSOR, XLLM_KV_LAYOUT_PAGED, 0, 12 + 5 * 2 * 512);
}

static void test_pd_quant_f16(void **state) {
    (void)state;
    check_pd("models/tiny/qwen3-tiny-q8_0.gguf", XLLM_DTYPE_F16, XLLM_KV_LAYOUT_XTENSOR,
             XLLM_KV_LAYOUT_PAGED, 0, 0);
    check_pd("models/tiny/llama-tiny-q4_k_m.gguf", XLLM_DTYPE_F16, XLLM_KV_LAYOUT_PAGED,
             XLLM_KV_LAYOUT_XTENSOR, 1000, 0);
}

/* Polls the failure record of id and checks that nothing is staged or held in B. */
static void expect_failed(xllm_kv_receiver *r, xllm_context *B, uint64_t id, const char *why) {
    xllm_kv_transfer *t = xllm_kv_receiver_poll(r, 10000);
    if (!t) {
        xllm_kv_receiver_stats rs;
        xllm_kv_receiver_get_stats(r, &rs);
        fail_msg("no failure record for %llu: conns %d in flight %d ready %d bad %llu rx %llu",
                 (unsigned long long)id, rs.conns, rs.in_flight, rs.ready,
                 (unsigned long long)rs.bad_conns, (unsigned long long)rs.bytes_rx);
    }
    assert_true(t->id == id);
    assert_int_not_equal(t->status, XLLM_OK);
    assert_null(t->tokens);
    if (!strstr(t->error, why)) fail_msg("failure \"%s\" lacks \"%s\"", t->error, why);
    char err[256];
    assert_int_equal(xllm_kv_transfer_import(t, B, 0, err, sizeof(err)), XLLM_ERR_INVALID_ARG);
    xllm_kv_transfer_free(t);
    xllm_kv_receiver_stats rs;
    xllm_kv_receiver_get_stats(r, &rs);
    assert_int_equal(rs.staged_bytes, 0);
    assert_int_equal(rs.in_flight, 0);
    xllm_kv_stats ks;
    xllm_context_kv_stats(B, &ks);
    assert_int_equal(ks.used_pages, 0);
}

/* A raw client: HELLO as A would, SEQ_BEGIN, a layer, then the socket closes (a crash). */
static void die_mid_transfer(xllm_context *A, int port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(connect(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    xllm_xfer_buf b = {0};
    xllm_xfer_hello h;
    xllm_xfer_hello_from_ctx(A, 0, &h);
    xllm_xfer_put_hello(&b, &h);
    int32_t toks[20] = {0};
    xllm_xfer_put_seq_begin(&b, 77, toks, 20);
    xllm_xfer_put_layer_head(&b, 77, 0, 0, 20, h.row_bytes);
    xllm_xfer_buf_reserve(&b, 40 * (size_t)h.row_bytes);
    memset(b.data + b.len, 0x3c, 40 * (size_t)h.row_bytes);
    b.len += 40 * (size_t)h.row_bytes;
    xllm_xfer_put_layer_head(&b, 77, 1, 0, 20, h.row_bytes); /* cut inside this frame */
    assert_int_equal(send(fd, b.data, b.len, MSG_NOSIGNAL), (ssize_t)b.len);
    uint8_t hello_back[XLLM_XFER_HEADER + XLLM_XFER_HELLO_BYTES];
    assert_int_equal(recv(fd, hello_back, sizeof(hello_back), MSG_WAITALL),
                     (ssize_t)sizeof(hello_back));
    close(fd);
    xllm_xfer_buf_free(&b);
}

static void test_failures(void **state) {
    (void)state;
    xllm_model *m = load("models/tiny/qwen3-tiny-f32.gguf");
    const int32_t V = xllm_model_n_vocab(m);
    xllm_context *A = new_ctx(m, XLLM_KV_LAYOUT_XTENSOR, XLLM_DTYPE_F32);
    xllm_context *B = new_ctx(m, XLLM_KV_LAYOUT_PAGED, XLLM_DTYPE_F32);
    xllm_kv_receiver *r = new_receiver(B, 0);
    const int port = xllm_kv_receiver_port(r);
    int32_t toks[N_PROMPT];
    prompt_of(m, 5, toks, N_PROMPT);
    const float *lg = prefill(A, 0, toks, N_PROMPT);
    int32_t first = (int32_t)xllm_test_argmax(lg, V);
    char err[256];

    /* 1. the sender process dies after a layer and a half */
    die_mid_transfer(A, port);
    expect_failed(r, B, 77, "connection to the sender closed");

    /* 2. the sender is closed mid-transfer: ABORT frees the staging */
    xllm_kv_sender *s = new_sender(A, port, 0);
    assert_int_equal(xllm_kv_sender_begin(s, 5, toks, N_PROMPT), XLLM_OK);
    assert_int_equal(xllm_kv_sender_send_layer(s, 5, 0, 0), XLLM_OK);
    xllm_kv_sender_free(s);
    expect_failed(r, B, 5, "closing");

    /* 3. the prefill side cancels: abort, then the id may be reused */
    s = new_sender(A, port, 0);
    assert_int_equal(xllm_kv_sender_begin(s, 6, toks, N_PROMPT), XLLM_OK);
    assert_int_equal(xllm_kv_sender_send_layer(s, 6, 0, 0), XLLM_OK);
    /* rows of positions that sequence 1 has not reserved are refused */
    assert_int_equal(xllm_kv_sender_send_rows(s, 6, 1, 1, 0, 1), XLLM_ERR_INVALID_ARG);
    assert_int_equal(xllm_kv_sender_abort(s, 6, "client disconnected"), XLLM_OK);
    assert_int_equal(xllm_kv_sender_abort(s, 6, NULL), XLLM_ERR_INVALID_ARG);
    expect_failed(r, B, 6, "client disconnected");

    /* 4. the decode side cancels: the sender learns it and frees its sequence */
    assert_int_equal(xllm_kv_sender_begin(s, 7, toks, N_PROMPT), XLLM_OK);
    assert_int_equal(xllm_kv_sender_send_layer(s, 7, 0, 0), XLLM_OK);
    xllm_kv_receiver_stats rs;
    for (int i = 0; i < 1000; i++) { /* until the receiver has staged it */
        xllm_kv_receiver_get_stats(r, &rs);
        if (rs.in_flight == 1) break;
        usleep(1000);
    }
    assert_true(xllm_kv_receiver_cancel(r, 7));
    xllm_status st = XLLM_OK;
    for (int i = 0; i < 1000 && st == XLLM_OK; i++) {
        st = xllm_kv_sender_send_layer(s, 7, 0, 1); /* fails once the ERROR arrived */
        if (st == XLLM_OK) {
            /* layer 1 went out before the news: end, the answer is the refusal */
            st = xllm_kv_sender_end(s, 7, first, 0.0f); /* or the news came just now */
            if (st == XLLM_OK) st = xllm_kv_sender_wait(s, 7, 10000, err, sizeof(err));
            break;
        }
    }
    assert_int_not_equal(st, XLLM_OK);
    xllm_kv_sender_abort(s, 7, NULL); /* forget it in either case */
    assert_int_equal(xllm_seq_truncate(A, 0, 0), XLLM_OK);
    xllm_kv_stats ks;
    xllm_context_kv_stats(A, &ks);
    assert_int_equal(ks.used_pages, 0);
    xllm_kv_receiver_get_stats(r, &rs);
    assert_int_equal(rs.staged_bytes, 0);
    assert_null(xllm_kv_receiver_poll(r, 0)); /* a cancel is not reported back to its caller */

    /* 5. the receiver goes away: the sender's transfers fail, nothing hangs */
    prefill(A, 0, toks, N_PROMPT);
    assert_int_equal(xllm_kv_sender_begin(s, 8, toks, N_PROMPT), XLLM_OK);
    xllm_kv_receiver_free(r);
    st = XLLM_OK;
    for (int i = 0; i < 2000 && st == XLLM_OK; i++) {
        st = xllm_kv_sender_send_layer(s, 8, 0, i % 2 ? 1 : 0);
        if (st == XLLM_ERR_INVALID_ARG) st = XLLM_OK; /* layer already sent: keep polling */
        usleep(1000);
    }
    assert_int_equal(st, XLLM_ERR_IO);
    assert_false(xllm_kv_sender_connected(s));
    assert_int_equal(xllm_kv_sender_begin(s, 9, toks, N_PROMPT), XLLM_ERR_IO);
    xllm_kv_sender_free(s);
    xllm_context_free(A);
    xllm_context_free(B);
    xllm_model_free(m);
}

/* Mismatched instances refuse each other at HELLO, with the reason. */
static void test_mismatch(void **state) {
    (void)state;
    xllm_model *m = load("models/tiny/qwen3-tiny-f32.gguf");
    xllm_model *q = load("models/tiny/qwen3-tiny-q8_0.gguf");
    xllm_model *l = load("models/tiny/llama-tiny-f32.gguf");
    assert_true(xllm_transfer_model_id(m) != xllm_transfer_model_id(q));
    assert_true(xllm_transfer_model_id(m) != xllm_transfer_model_id(l));
    xllm_context *A = new_ctx(m, XLLM_KV_LAYOUT_XTENSOR, XLLM_DTYPE_F32);
    struct {
        xllm_model *model;
        xllm_dtype kv;
        const char *why;
    } cases[] = {{q, XLLM_DTYPE_F32, "model mismatch"},
                 {l, XLLM_DTYPE_F32, "model mismatch: this instance runs llama"},
                 {m, XLLM_DTYPE_F16, "KV type mismatch"}};
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        xllm_context *B = new_ctx(cases[i].model, XLLM_KV_LAYOUT_XTENSOR, cases[i].kv);
        xllm_kv_receiver *r = new_receiver(B, 0);
        xllm_kv_sender_params sp = xllm_kv_sender_default_params();
        sp.port = xllm_kv_receiver_port(r);
        xllm_kv_sender *s = NULL;
        char err[256] = "";
        xllm_status st = xllm_kv_sender_new(A, &sp, &s, err, sizeof(err));
        fprintf(stderr, "refused: %s\n", err);
        assert_int_equal(st, XLLM_ERR_UNSUPPORTED);
        assert_null(s);
        assert_non_null(strstr(err, "refused"));
        assert_non_null(strstr(err, cases[i].why));
        xllm_kv_receiver_stats rs;
        for (int k = 0; k < 1000; k++) {
            xllm_kv_receiver_get_stats(r, &rs);
            if (rs.bad_conns == 1 && rs.conns == 0) break;
            usleep(1000);
        }
        assert_int_equal(rs.bad_conns, 1);
        assert_int_equal(rs.conns, 0);
        xllm_kv_receiver_free(r);
        xllm_context_free(B);
    }
    /* nobody listening */
    xllm_kv_sender_params sp = xllm_kv_sender_default_params();
    sp.port = 1;
    xllm_kv_sender *s = NULL;
    char err[256];
    assert_int_equal(xllm_kv_sender_new(A, &sp, &s, err, sizeof(err)), XLLM_ERR_IO);
    assert_non_null(strstr(err, "cannot connect"));
    xllm_context_free(A);
    xllm_model_free(m);
    xllm_model_free(q);
    xllm_model_free(l);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pd_f32),
        cmocka_unit_test(test_pd_quant_f16),
        cmocka_unit_test(test_failures),
        cmocka_unit_test(test_mismatch),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
