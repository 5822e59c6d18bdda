/* Unit tests of the KV transfer frames and of the receiver's protocol state machine (driven
 * without sockets): round trips of every frame type, every malformed frame rejected with a
 * message, staging budget, duplicates, aborts, cancellation and dropped connections. */
#include <math.h>
#include <string.h>

#include "transfer/transfer-impl.h"
#include "util/common.h"
#include "testutil.h"

#define NL 3  /* layers */
#define RB 16 /* row bytes */

static xllm_xfer_hello hello(uint32_t role) {
    xllm_xfer_hello h = {.model_id = 0x1234567890abcdefull,
                         .n_layer = NL,
                         .row_bytes = RB,
                         .kv_type = XLLM_DTYPE_F32,
                         .n_ctx = 64,
                         .role = role,
                         .max_frame = 1 << 16};
    snprintf(h.arch, sizeof(h.arch), "qwen3");
    return h;
}

/* ==== codec =================================================================================== */

static void test_round_trip(void **state) {
    (void)state;
    char err[256];
    xllm_xfer_buf b = {0};
    xllm_xfer_header h;

    xllm_xfer_hello hi = hello(0), ho;
    xllm_xfer_put_hello(&b, &hi);
    assert_int_equal(b.len, XLLM_XFER_HEADER + XLLM_XFER_HELLO_BYTES);
    assert_memory_equal(b.data, "XKVT", 4); /* the magic reads as text on the wire */
    assert_int_equal(xllm_xfer_get_header(b.data, 1 << 20, &h, err, sizeof(err)), XLLM_OK);
    assert_int_equal(h.type, XLLM_XFER_HELLO);
    assert_int_equal(xllm_xfer_get_hello(b.data + XLLM_XFER_HEADER, h.len, &ho, err, sizeof(err)),
                     XLLM_OK);
    assert_true(ho.model_id == hi.model_id && ho.n_layer == NL && ho.row_bytes == RB &&
                ho.kv_type == XLLM_DTYPE_F32 && ho.n_ctx == 64 && ho.role == 0 &&
                ho.max_frame == 1 << 16);
    assert_string_equal(ho.arch, "qwen3");
    b.len = 0;

    int32_t toks[5] = {1, 2, 3, 0x7fffffff, 0};
    xllm_xfer_put_seq_begin(&b, 42, toks, 5);
    assert_int_equal(xllm_xfer_get_header(b.data, 1 << 20, &h, err, sizeof(err)), XLLM_OK);
    assert_true(h.type == XLLM_XFER_SEQ_BEGIN && h.id == 42 && h.len == 8 + 20);
    uint32_t n;
    const uint8_t *tp;
    assert_int_equal(
        xllm_xfer_get_seq_begin(b.data + XLLM_XFER_HEADER, h.len, 64, &n, &tp, err, sizeof(err)),
        XLLM_OK);
    assert_int_equal(n, 5);
    for (int i = 0; i < 5; i++) assert_int_equal((int32_t)xllm_xfer_r32(tp + 4 * i), toks[i]);
    b.len = 0;

    uint8_t rows[2 * 4 * RB];
    for (size_t i = 0; i < sizeof(rows); i++) rows[i] = (uint8_t)(i * 7 + 1);
    xllm_xfer_put_layer_head(&b, 42, 2, 8, 4, RB);
    memcpy(b.data + b.len, rows, sizeof(rows));
    b.len += sizeof(rows);
    assert_int_equal(xllm_xfer_get_header(b.data, 1 << 20, &h, err, sizeof(err)), XLLM_OK);
    xllm_xfer_layer l;
    assert_int_equal(
        xllm_xfer_get_layer(b.data + XLLM_XFER_HEADER, h.len, NL, RB, 64, &l, err, sizeof(err)),
        XLLM_OK);
    assert_true(l.layer == 2 && l.pos0 == 8 && l.n == 4);
    assert_memory_equal(l.k, rows, 4 * RB);
    assert_memory_equal(l.v, rows + 4 * RB, 4 * RB);
    b.len = 0;

    xllm_xfer_put_seq_end(&b, 42, 77, -0.25f);
    assert_int_equal(xllm_xfer_get_header(b.data, 1 << 20, &h, err, sizeof(err)), XLLM_OK);
    int32_t ft;
    float lp;
    assert_int_equal(
        xllm_xfer_get_seq_end(b.data + XLLM_XFER_HEADER, h.len, &ft, &lp, err, sizeof(err)),
        XLLM_OK);
    assert_int_equal(ft, 77);
    assert_true(lp == -0.25f);
    b.len = 0;

    xllm_xfer_put_status(&b, XLLM_XFER_ABORT, 42, XLLM_XFER_CODE_CANCELLED, "client left");
    assert_int_equal(xllm_xfer_get_header(b.data, 1 << 20, &h, err, sizeof(err)), XLLM_OK);
    assert_int_equal(h.type, XLLM_XFER_ABORT);
    xllm_xfer_status s;
    assert_int_equal(xllm_xfer_get_status(b.data + XLLM_XFER_HEADER, h.len, &s, err, sizeof(err)),
                     XLLM_OK);
    assert_int_equal(s.code, XLLM_XFER_CODE_CANCELLED);
    assert_string_equal(s.msg, "client left");
    b.len = 0;

    char longmsg[600];
    memset(longmsg, 'x', sizeof(longmsg) - 1);
    longmsg[sizeof(longmsg) - 1] = 0;
    xllm_xfer_put_status(&b, XLLM_XFER_ERROR, 0, XLLM_XFER_CODE_PROTOCOL, longmsg);
    assert_int_equal(xllm_xfer_get_header(b.data, 1 << 20, &h, err, sizeof(err)), XLLM_OK);
    assert_int_equal(xllm_xfer_get_status(b.data + XLLM_XFER_HEADER, h.len, &s, err, sizeof(err)),
                     XLLM_OK);
    assert_int_equal(strlen(s.msg), XLLM_XFER_MAX_MSG); /* truncated */
    b.len = 0;

    xllm_xfer_put_ack(&b, 42, XLLM_XFER_SEQ_END);
    assert_int_equal(xllm_xfer_get_header(b.data, 1 << 20, &h, err, sizeof(err)), XLLM_OK);
    uint16_t acked;
    assert_int_equal(xllm_xfer_get_ack(b.data + XLLM_XFER_HEADER, h.len, &acked, err, sizeof(err)),
                     XLLM_OK);
    assert_int_equal(acked, XLLM_XFER_SEQ_END);
    xllm_xfer_buf_free(&b);
}

/* Expects a failure whose message contains want. */
#define REJECT(call, want)                                                                         \
    do {                                                                                           \
        err[0] = 0;                                                                                \
        assert_int_not_equal((call), XLLM_OK);                                                     \
        if (!strstr(err, want)) fail_msg("message \"%s\" lacks \"%s\"", err, want);                \
    } while (0)

static void test_bad_headers(void **state) {
    (void)state;
    char err[256];
    xllm_xfer_header h;
    xllm_xfer_buf b = {0};
    xllm_xfer_put_ack(&b, 9, XLLM_XFER_SEQ_END);
    uint8_t f[XLLM_XFER_HEADER];
#define RESET() memcpy(f, b.data, sizeof(f))
    RESET();
    f[0] = 'Y';
    REJECT(xllm_xfer_get_header(f, 1024, &h, err, sizeof(err)), "bad magic");
    RESET();
    xllm_xfer_w16(f + 4, 2);
    REJECT(xllm_xfer_get_header(f, 1024, &h, err, sizeof(err)), "version 2");
    RESET();
    xllm_xfer_w16(f + 6, 0);
    REJECT(xllm_xfer_get_header(f, 1024, &h, err, sizeof(err)), "unknown type 0");
    RESET();
    xllm_xfer_w16(f + 6, 99);
    REJECT(xllm_xfer_get_header(f, 1024, &h, err, sizeof(err)), "unknown type 99");
    RESET();
    xllm_xfer_w32(f + 8, 1);
    REJECT(xllm_xfer_get_header(f, 1024, &h, err, sizeof(err)), "flags");
    RESET();
    xllm_xfer_w32(f + 12, 0xffffffffu);
    REJECT(xllm_xfer_get_header(f, 1024, &h, err, sizeof(err)), "exceeds the limit");
    RESET();
    xllm_xfer_w64(f + 16, 0);
    REJECT(xllm_xfer_get_header(f, 1024, &h, err, sizeof(err)), "transfer id 0");
    RESET();
    xllm_xfer_w16(f + 6, XLLM_XFER_HELLO);
    REJECT(xllm_xfer_get_header(f, 1024, &h, err, sizeof(err)), "HELLO with a transfer id");
#undef RESET
    xllm_xfer_buf_free(&b);
}

static void test_bad_payloads(void **state) {
    (void)state;
    char err[256];
    uint8_t p[256] = {0};
    xllm_xfer_hello h;
    xllm_xfer_buf b = {0};
    xllm_xfer_hello hi = hello(0);
    xllm_xfer_put_hello(&b, &hi);
    uint8_t *hp = b.data + XLLM_XFER_HEADER;
    REJECT(xllm_xfer_get_hello(hp, 47, &h, err, sizeof(err)), "expected 48");
    memcpy(p, hp, 48);
    xllm_xfer_w32(p + 8, 0);
    REJECT(xllm_xfer_get_hello(p, 48, &h, err, sizeof(err)), "0 layers");
    memcpy(p, hp, 48);
    xllm_xfer_w32(p + 12, 0);
    REJECT(xllm_xfer_get_hello(p, 48, &h, err, sizeof(err)), "0-byte rows");
    memcpy(p, hp, 48);
    xllm_xfer_w32(p + 20, 0);
    REJECT(xllm_xfer_get_hello(p, 48, &h, err, sizeof(err)), "context of 0");
    memcpy(p, hp, 48);
    xllm_xfer_w32(p + 28, 12 + 2 * RB - 1);
    REJECT(xllm_xfer_get_hello(p, 48, &h, err, sizeof(err)), "below one position");
    memcpy(p, hp, 48);
    xllm_xfer_w32(p + 24, 5);
    REJECT(xllm_xfer_get_hello(p, 48, &h, err, sizeof(err)), "unknown role");
    memcpy(p, hp, 48);
    memset(p + 32, 0xff, 16); /* an unterminated, non-ASCII name is cleaned, not trusted */
    assert_int_equal(xllm_xfer_get_hello(p, 48, &h, err, sizeof(err)), XLLM_OK);
    assert_int_equal(strlen(h.arch), 15);
    xllm_xfer_buf_free(&b);

    uint32_t n;
    const uint8_t *tp;
    memset(p, 0, sizeof(p));
    REJECT(xllm_xfer_get_seq_begin(p, 4, 64, &n, &tp, err, sizeof(err)), "SEQ_BEGIN payload");
    REJECT(xllm_xfer_get_seq_begin(p, 8, 64, &n, &tp, err, sizeof(err)), "SEQ_BEGIN of 0");
    xllm_xfer_w32(p, 65);
    REJECT(xllm_xfer_get_seq_begin(p, 8 + 4 * 65, 64, &n, &tp, err, sizeof(err)), "of 65");
    xllm_xfer_w32(p, 2);
    REJECT(xllm_xfer_get_seq_begin(p, 8 + 4 * 3, 64, &n, &tp, err, sizeof(err)), "expected 16");
    xllm_xfer_w32(p + 4, 1);
    REJECT(xllm_xfer_get_seq_begin(p, 16, 64, &n, &tp, err, sizeof(err)), "reserved");
    xllm_xfer_w32(p + 4, 0);
    xllm_xfer_w32(p + 12, 0x80000000u);
    REJECT(xllm_xfer_get_seq_begin(p, 16, 64, &n, &tp, err, sizeof(err)), "token 1 is negative");

    xllm_xfer_layer l;
    memset(p, 0, sizeof(p));
    REJECT(xllm_xfer_get_layer(p, 11, NL, RB, 64, &l, err, sizeof(err)), "LAYER payload");
    xllm_xfer_w32(p, NL);
    xllm_xfer_w32(p + 8, 1);
    REJECT(xllm_xfer_get_layer(p, 12 + 2 * RB, NL, RB, 64, &l, err, sizeof(err)), "out of range");
    xllm_xfer_w32(p, 0);
    xllm_xfer_w32(p + 8, 0);
    REJECT(xllm_xfer_get_layer(p, 12, NL, RB, 64, &l, err, sizeof(err)), "positions");
    xllm_xfer_w32(p + 4, 0xfffffff0u);
    xllm_xfer_w32(p + 8, 0x20);
    REJECT(xllm_xfer_get_layer(p, 12, NL, RB, 64, &l, err, sizeof(err)), "positions");
    xllm_xfer_w32(p + 4, 60);
    xllm_xfer_w32(p + 8, 5);
    REJECT(xllm_xfer_get_layer(p, 12 + 10 * RB, NL, RB, 64, &l, err, sizeof(err)), "positions");
    xllm_xfer_w32(p + 4, 0);
    xllm_xfer_w32(p + 8, 2);
    REJECT(xllm_xfer_get_layer(p, 12 + 3 * RB, NL, RB, 64, &l, err, sizeof(err)), "expected 76");

    int32_t ft;
    float lp;
    memset(p, 0, sizeof(p));
    REJECT(xllm_xfer_get_seq_end(p, 12, &ft, &lp, err, sizeof(err)), "SEQ_END payload");
    xllm_xfer_w32(p, 0xffffffffu);
    REJECT(xllm_xfer_get_seq_end(p, 8, &ft, &lp, err, sizeof(err)), "negative first token");
    xllm_xfer_w32(p, 1);
    xllm_xfer_w32(p + 4, 0x7fc00000u); /* NaN */
    REJECT(xllm_xfer_get_seq_end(p, 8, &ft, &lp, err, sizeof(err)), "logprob");
    xllm_xfer_w32(p + 4, 0x3f800000u); /* 1.0 */
    REJECT(xllm_xfer_get_seq_end(p, 8, &ft, &lp, err, sizeof(err)), "logprob");

    xllm_xfer_status s;
    memset(p, 0, sizeof(p));
    REJECT(xllm_xfer_get_status(p, 7, &s, err, sizeof(err)), "ABORT/ERROR payload");
    xllm_xfer_w32(p + 4, 300);
    REJECT(xllm_xfer_get_status(p, 8 + 300, &s, err, sizeof(err)), "300 bytes");
    xllm_xfer_w32(p + 4, 3);
    REJECT(xllm_xfer_get_status(p, 8 + 4, &s, err, sizeof(err)), "expected 11");
    p[8] = 0x01; /* control characters are replaced */
    p[9] = 'o';
    p[10] = 'k';
    assert_int_equal(xllm_xfer_get_status(p, 11, &s, err, sizeof(err)), XLLM_OK);
    assert_string_equal(s.msg, "?ok");

    uint16_t acked;
    memset(p, 0, sizeof(p));
    REJECT(xllm_xfer_get_ack(p, 4, &acked, err, sizeof(err)), "ACK payload");
    xllm_xfer_w32(p, XLLM_XFER_LAYER);
    REJECT(xllm_xfer_get_ack(p, 8, &acked, err, sizeof(err)), "only SEQ_END");
}

static void test_hello_compat(void **state) {
    (void)state;
    char err[256];
    xllm_xfer_hello a = hello(0), b = hello(1);
    assert_true(xllm_xfer_hello_compatible(&b, &a, err, sizeof(err)));
    b.model_id++;
    REJECT(!xllm_xfer_hello_compatible(&b, &a, err, sizeof(err)) ? XLLM_ERR_UNSUPPORTED : XLLM_OK,
           "model mismatch");
    b = hello(1);
    b.kv_type = XLLM_DTYPE_F16;
    REJECT(!xllm_xfer_hello_compatible(&b, &a, err, sizeof(err)) ? XLLM_ERR_UNSUPPORTED : XLLM_OK,
           "KV type mismatch: f16 here, f32");
    b = hello(1);
    b.row_bytes = 32;
    REJECT(!xllm_xfer_hello_compatible(&b, &a, err, sizeof(err)) ? XLLM_ERR_UNSUPPORTED : XLLM_OK,
           "KV shape mismatch");
    b = hello(0);
    REJECT(!xllm_xfer_hello_compatible(&b, &a, err, sizeof(err)) ? XLLM_ERR_UNSUPPORTED : XLLM_OK,
           "both ends are senders");
}

/* ==== receiver state machine ================================================================== */

/* Rows of transfer with a known pattern: byte = f(layer, kind, pos, i). */
static uint8_t row_byte(uint32_t il, int kv, uint32_t pos, uint32_t i) {
    return (uint8_t)(il * 61 + kv * 29 + pos * 7 + i * 3 + 1);
}

static void put_layer(xllm_xfer_buf *b, uint64_t id, uint32_t il, uint32_t pos0, uint32_t n) {
    xllm_xfer_put_layer_head(b, id, il, pos0, n, RB);
    uint8_t *p = b->data + b->len;
    for (int kv = 0; kv < 2; kv++)
        for (uint32_t j = 0; j < n; j++)
            for (uint32_t i = 0; i < RB; i++)
                p[((size_t)kv * n + j) * RB + i] = row_byte(il, kv, pos0 + j, i);
    b->len += 2 * (size_t)n * RB;
}

/* A complete transfer of n positions: begin, each layer in chunks of `chunk`, end. */
static void put_transfer(xllm_xfer_buf *b, uint64_t id, uint32_t n, uint32_t chunk, bool end) {
    int32_t toks[64];
    for (uint32_t i = 0; i < n; i++) toks[i] = (int32_t)(i + 100);
    xllm_xfer_put_seq_begin(b, id, toks, n);
    for (uint32_t il = 0; il < NL; il++)
        for (uint32_t p0 = 0; p0 < n; p0 += chunk)
            put_layer(b, id, il, p0, XLLM_MIN(chunk, n - p0));
    if (end) xllm_xfer_put_seq_end(b, id, 5, -1.5f);
}

/* Parses the answers in a connection's out buffer; returns the count of each type in counts
 * and the last ERROR's code. */
static void answers(xllm_xfer_conn *c, int counts[8], uint32_t *last_code) {
    xllm_xfer_buf *o = xllm_xfer_conn_out(c);
    memset(counts, 0, 8 * sizeof(int));
    size_t at = 0;
    char err[256];
    while (o->len - at >= XLLM_XFER_HEADER) {
        xllm_xfer_header h;
        assert_int_equal(xllm_xfer_get_header(o->data + at, 1024, &h, err, sizeof(err)), XLLM_OK);
        counts[h.type]++;
        if (h.type == XLLM_XFER_ERROR) {
            xllm_xfer_status s;
            assert_int_equal(
                xllm_xfer_get_status(o->data + at + XLLM_XFER_HEADER, h.len, &s, err, sizeof(err)),
                XLLM_OK);
            *last_code = s.code;
        }
        at += XLLM_XFER_HEADER + h.len;
    }
    assert_int_equal(at, o->len);
    o->len = 0;
}

static void check_rows(const xllm_kv_transfer *t, uint32_t n) {
    assert_int_equal(t->status, XLLM_OK);
    for (uint32_t il = 0; il < NL; il++) {
        for (int kv = 0; kv < 2; kv++) {
            const uint8_t *rows = xllm_xfer_transfer_rows(t, il, kv);
            for (uint32_t pos = 0; pos < n; pos++)
                for (uint32_t i = 0; i < RB; i++)
                    assert_int_equal(rows[pos * RB + i], row_byte(il, kv, pos, i));
        }
    }
    assert_int_equal(t->n_tokens, (int32_t)n);
    for (uint32_t i = 0; i < n; i++) assert_int_equal(t->tokens[i], (int32_t)(i + 100));
    assert_int_equal(t->first_token, 5);
    assert_true(t->first_logprob == -1.5f);
}

static xllm_kv_receiver *detached(size_t budget) {
    xllm_xfer_hello self = hello(1);
    xllm_kv_receiver_params p = xllm_kv_receiver_default_params();
    p.max_staging_bytes = budget;
    p.max_transfers = 4;
    return xllm_kv_receiver_new_detached(&self, &p);
}

static void say_hello(xllm_xfer_conn *c) {
    xllm_xfer_buf b = {0};
    xllm_xfer_hello h = hello(0);
    xllm_xfer_put_hello(&b, &h);
    assert_int_equal(xllm_xfer_conn_feed(c, b.data, b.len), XLLM_OK);
    int counts[8];
    uint32_t code = 0;
    answers(c, counts, &code);
    assert_int_equal(counts[XLLM_XFER_HELLO], 1);
    xllm_xfer_buf_free(&b);
}

static void test_session_ok(void **state) {
    (void)state;
    /* whole stream at once, and the same stream byte by byte */
    for (int bytewise = 0; bytewise < 2; bytewise++) {
        xllm_kv_receiver *r = detached(0);
        xllm_xfer_conn *c = xllm_xfer_conn_new(r);
        say_hello(c);
        xllm_xfer_buf b = {0};
        put_transfer(&b, 7, 10, 3, true);
        put_transfer(&b, 8, 1, 1, true);
        if (bytewise) {
            for (size_t i = 0; i < b.len; i++)
                assert_int_equal(xllm_xfer_conn_feed(c, b.data + i, 1), XLLM_OK);
        } else {
            assert_int_equal(xllm_xfer_conn_feed(c, b.data, b.len), XLLM_OK);
        }
        int counts[8];
        uint32_t code = 0;
        answers(c, counts, &code);
        assert_int_equal(counts[XLLM_XFER_ACK], 2);
        assert_int_equal(counts[XLLM_XFER_ERROR], 0);
        xllm_kv_transfer *t = xllm_kv_receiver_poll(r, 0);
        assert_non_null(t);
        assert_true(t->id == 7);
        check_rows(t, 10);
        xllm_kv_transfer *t2 = xllm_kv_receiver_poll(r, 0);
        assert_true(t2 && t2->id == 8);
        check_rows(t2, 1);
        assert_null(xllm_kv_receiver_poll(r, 0));
        xllm_kv_receiver_stats st;
        xllm_kv_receiver_get_stats(r, &st);
        assert_int_equal(st.completed, 2);
        assert_true(st.staged_bytes >= (size_t)NL * 2 * 11 * RB);
        xllm_xfer_conn_free(c);
        xllm_kv_receiver_free(r); /* polled transfers outlive the receiver */
        xllm_kv_transfer_free(t);
        xllm_kv_transfer_free(t2);
        xllm_xfer_buf_free(&b);
    }
}

/* Feeds one bad stream after HELLO; expects the connection to fail with msg in its error. */
static void expect_conn_error(const xllm_xfer_buf *b, const char *msg, bool hello_first) {
    xllm_kv_receiver *r = detached(0);
    xllm_xfer_conn *c = xllm_xfer_conn_new(r);
    if (hello_first) say_hello(c);
    assert_int_not_equal(xllm_xfer_conn_feed(c, b->data, b->len), XLLM_OK);
    if (!strstr(xllm_xfer_conn_error(c), msg))
        fail_msg("error \"%s\" lacks \"%s\"", xllm_xfer_conn_error(c), msg);
    int counts[8];
    uint32_t code = 0;
    answers(c, counts, &code);
    assert_int_equal(counts[XLLM_XFER_ERROR], 1); /* the peer is told why */
    /* further bytes are refused */
    assert_int_not_equal(xllm_xfer_conn_feed(c, b->data, 1), XLLM_OK);
    xllm_xfer_conn_free(c);
    /* the in-flight transfer was dropped with the connection: nothing staged remains */
    xllm_kv_receiver_stats st;
    xllm_kv_receiver_get_stats(r, &st);
    assert_int_equal(st.staged_bytes, 0);
    assert_int_equal(st.in_flight, 0);
    xllm_kv_transfer *t;
    while ((t = xllm_kv_receiver_poll(r, 0))) {
        assert_int_not_equal(t->status, XLLM_OK);
        xllm_kv_transfer_free(t);
    }
    xllm_kv_receiver_free(r);
}

static void test_session_errors(void **state) {
    (void)state;
    xllm_xfer_buf b = {0};
    int32_t tok[2] = {1, 2};

    xllm_xfer_put_seq_begin(&b, 1, tok, 2); /* before HELLO */
    expect_conn_error(&b, "before HELLO", false);
    b.len = 0;
    xllm_xfer_hello h = hello(0);
    h.model_id ^= 1;
    xllm_xfer_put_hello(&b, &h);
    expect_conn_error(&b, "model mismatch", false);
    b.len = 0;
    h = hello(0);
    xllm_xfer_put_hello(&b, &h); /* a second HELLO */
    expect_conn_error(&b, "unexpected type 1", true);
    b.len = 0;
    put_transfer(&b, 3, 4, 4, false);
    put_layer(&b, 3, 0, 0, 1); /* layer 0 again */
    expect_conn_error(&b, "expected them from 4 of 4", true);
    b.len = 0;
    xllm_xfer_put_seq_begin(&b, 3, tok, 2);
    put_layer(&b, 3, 1, 1, 1); /* skips position 0 */
    expect_conn_error(&b, "positions [1, 2)", true);
    b.len = 0;
    xllm_xfer_put_seq_begin(&b, 3, tok, 2);
    put_layer(&b, 3, 0, 0, 2);
    xllm_xfer_put_seq_end(&b, 3, 1, 0.0f); /* layers 1, 2 missing */
    expect_conn_error(&b, "before layer 1 is complete", true);
    b.len = 0;
    xllm_xfer_put_ack(&b, 3, XLLM_XFER_SEQ_END); /* senders do not ACK */
    expect_conn_error(&b, "unexpected type 6", true);
    b.len = 0;
    put_transfer(&b, 3, 4, 4, false);
    b.data[10]++; /* corrupt the flags of the first frame */
    expect_conn_error(&b, "flags", true);
    b.len = 0;
    xllm_xfer_put_seq_begin(&b, 3, tok, 2);
    xllm_xfer_put_layer_head(&b, 3, 0, 0, 2, RB + 1); /* length of another row size */
    memset(b.data + b.len, 0, 2 * 2 * (RB + 1));
    b.len += 2 * 2 * (RB + 1);
    expect_conn_error(&b, "LAYER payload", true);
    b.len = 0;
    put_transfer(&b, 3, 4, 4, false);
    xllm_xfer_w32(b.data + 72, 9); /* SEQ_BEGIN is 24 + 24 bytes */ /* layer 9 */
    expect_conn_error(&b, "index 9 out of range", true);
    xllm_xfer_buf_free(&b);
}

static void test_session_refusals(void **state) {
    (void)state;
    const size_t one = (size_t)NL * 2 * 8 * RB + 8 * 4 + NL * 4; /* staging of 8 positions */
    xllm_kv_receiver *r = detached(one + one / 2);
    xllm_xfer_conn *c = xllm_xfer_conn_new(r);
    say_hello(c);
    xllm_xfer_buf b = {0};
    int counts[8];
    uint32_t code = 0;

    put_transfer(&b, 1, 8, 8, false); /* in flight, holds the budget */
    put_transfer(&b, 2, 8, 8, true);  /* refused: over budget; its frames are dropped */
    assert_int_equal(xllm_xfer_conn_feed(c, b.data, b.len), XLLM_OK);
    answers(c, counts, &code);
    assert_int_equal(counts[XLLM_XFER_ERROR], 2); /* BUSY, then UNKNOWN for its SEQ_END */
    assert_int_equal(code, XLLM_XFER_CODE_UNKNOWN);
    xllm_kv_transfer *t = xllm_kv_receiver_poll(r, 0); /* the refusal is reported */
    assert_true(t && t->id == 2 && t->status == XLLM_ERR_BUSY);
    assert_non_null(strstr(t->error, "staging full"));
    xllm_kv_transfer_free(t);
    b.len = 0;

    int32_t tok[70] = {0};
    xllm_xfer_put_seq_begin(&b, 4, tok, 65); /* longer than the context of 64 */
    xllm_xfer_put_seq_begin(&b, 1, tok, 1);  /* duplicate of the in-flight id */
    assert_int_equal(xllm_xfer_conn_feed(c, b.data, b.len), XLLM_OK);
    answers(c, counts, &code);
    assert_int_equal(counts[XLLM_XFER_ERROR], 2);
    assert_int_equal(code, XLLM_XFER_CODE_DUPLICATE);
    t = xllm_kv_receiver_poll(r, 0);
    assert_true(t && t->id == 4 && t->status == XLLM_ERR_KV_FULL);
    xllm_kv_transfer_free(t);
    assert_null(xllm_kv_receiver_poll(r, 0));
    b.len = 0;

    /* ABORT of the in-flight transfer frees its staging and is reported */
    xllm_xfer_put_status(&b, XLLM_XFER_ABORT, 1, XLLM_XFER_CODE_CANCELLED, "client gone");
    assert_int_equal(xllm_xfer_conn_feed(c, b.data, b.len), XLLM_OK);
    xllm_kv_receiver_stats st;
    xllm_kv_receiver_get_stats(r, &st);
    assert_int_equal(st.staged_bytes, 0);
    t = xllm_kv_receiver_poll(r, 0);
    assert_true(t && t->id == 1 && t->status != XLLM_OK);
    assert_non_null(strstr(t->error, "client gone"));
    xllm_kv_transfer_free(t);
    b.len = 0;

    /* cancel from the decode side: the sender gets an ERROR, the staging is freed */
    put_transfer(&b, 5, 8, 8, false);
    assert_int_equal(xllm_xfer_conn_feed(c, b.data, b.len), XLLM_OK);
    assert_true(xllm_kv_receiver_cancel(r, 5));
    assert_false(xllm_kv_receiver_cancel(r, 99));
    xllm_xfer_conn_flush_cancelled(c);
    answers(c, counts, &code);
    assert_int_equal(counts[XLLM_XFER_ERROR], 1);
    assert_int_equal(code, XLLM_XFER_CODE_CANCELLED);
    xllm_kv_receiver_get_stats(r, &st);
    assert_int_equal(st.staged_bytes, 0);
    b.len = 0;

    /* a complete but unpolled transfer can be cancelled too */
    put_transfer(&b, 6, 8, 8, true);
    assert_int_equal(xllm_xfer_conn_feed(c, b.data, b.len), XLLM_OK);
    assert_true(xllm_kv_receiver_cancel(r, 6));
    assert_null(xllm_kv_receiver_poll(r, 0));
    b.len = 0;

    answers(c, counts, &code);
    assert_int_equal(counts[XLLM_XFER_ACK], 1); /* 6 was acknowledged before the cancel */

    /* cancelled while its SEQ_END is already on the way: never completed, never acked */
    put_transfer(&b, 9, 8, 8, false);
    assert_int_equal(xllm_xfer_conn_feed(c, b.data, b.len), XLLM_OK);
    assert_true(xllm_kv_receiver_cancel(r, 9));
    b.len = 0;
    xllm_xfer_put_seq_end(&b, 9, 1, 0.0f);
    assert_int_equal(xllm_xfer_conn_feed(c, b.data, b.len), XLLM_OK);
    answers(c, counts, &code);
    assert_int_equal(counts[XLLM_XFER_ACK], 0);
    assert_int_equal(counts[XLLM_XFER_ERROR], 1);
    assert_int_equal(code, XLLM_XFER_CODE_CANCELLED);
    assert_null(xllm_kv_receiver_poll(r, 0));
    xllm_kv_receiver_get_stats(r, &st);
    assert_int_equal(st.staged_bytes, 0);
    b.len = 0;

    /* a dropped connection fails its in-flight transfers */
    put_transfer(&b, 7, 8, 4, false);
    assert_int_equal(xllm_xfer_conn_feed(c, b.data, b.len - 10), XLLM_OK);
    xllm_xfer_conn_free(c);
    t = xllm_kv_receiver_poll(r, 0);
    assert_true(t && t->id == 7 && t->status == XLLM_ERR_IO);
    assert_non_null(strstr(t->error, "connection"));
    xllm_kv_transfer_free(t);
    xllm_kv_receiver_get_stats(r, &st);
    assert_int_equal(st.staged_bytes, 0);
    assert_int_equal(st.in_flight, 0);
    xllm_kv_receiver_free(r);
    xllm_xfer_buf_free(&b);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_round_trip),       cmocka_unit_test(test_bad_headers),
        cmocka_unit_test(test_bad_payloads),     cmocka_unit_test(test_hello_compat),
        cmocka_unit_test(test_session_ok),       cmocka_unit_test(test_session_errors),
        cmocka_unit_test(test_session_refusals),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
