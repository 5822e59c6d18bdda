/* libFuzzer target for the KV transfer frames: arbitrary bytes go through a receiver's
 * per-connection state machine (fed in pieces, optionally after a valid HELLO so the fuzzer
 * reaches the transfer frames) and through every payload decoder; staged transfers are checked,
 * polled, cancelled and freed, and the staging budget must come back to zero. */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "transfer/transfer-impl.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static volatile uint64_t sink;

/* The identity the seeds (scripts/fuzz-seeds.sh) were written for. */
static xllm_xfer_hello identity(uint32_t role) {
    xllm_xfer_hello h = {.model_id = 0x0123456789abcdefull,
                         .n_layer = 2,
                         .row_bytes = 8,
                         .kv_type = XLLM_DTYPE_F32,
                         .n_ctx = 64,
                         .role = role,
                         .max_frame = 1 << 16};
    memcpy(h.arch, "fuzz", 5);
    return h;
}

/* Every decoder on a payload that follows a header, whatever its type says. */
static void decode_all(const uint8_t *p, size_t n) {
    char err[256];
    xllm_xfer_hello h;
    uint32_t cnt;
    const uint8_t *tok;
    xllm_xfer_layer l;
    int32_t ft;
    float lp;
    xllm_xfer_status s;
    uint16_t acked;
    if (xllm_xfer_get_hello(p, n, &h, err, sizeof(err)) == XLLM_OK) sink += strlen(h.arch);
    if (xllm_xfer_get_seq_begin(p, n, 64, &cnt, &tok, err, sizeof(err)) == XLLM_OK)
        sink += tok[4 * (cnt - 1)];
    if (xllm_xfer_get_layer(p, n, 2, 8, 64, &l, err, sizeof(err)) == XLLM_OK)
        sink += l.k[0] + l.v[8 * (size_t)l.n - 1];
    if (xllm_xfer_get_seq_end(p, n, &ft, &lp, err, sizeof(err)) == XLLM_OK) sink += (uint64_t)ft;
    if (xllm_xfer_get_status(p, n, &s, err, sizeof(err)) == XLLM_OK) sink += strlen(s.msg);
    if (xllm_xfer_get_ack(p, n, &acked, err, sizeof(err)) == XLLM_OK) sink += acked;
    sink += strlen(err);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 2) return 0;
    const uint8_t mode = data[0], cut = data[1];
    data += 2;
    size -= 2;

    xllm_xfer_header hd;
    char err[256];
    if (size >= XLLM_XFER_HEADER &&
        xllm_xfer_get_header(data, 1 << 16, &hd, err, sizeof(err)) == XLLM_OK &&
        hd.len <= size - XLLM_XFER_HEADER)
        decode_all(data + XLLM_XFER_HEADER, hd.len);
    decode_all(data, size);

    xllm_xfer_hello self = identity(1);
    xllm_kv_receiver_params p = xllm_kv_receiver_default_params();
    p.max_staging_bytes = (mode & 2) ? 600 : 1 << 20; /* small: refusals */
    p.max_frame_bytes = 1 << 16;
    p.max_transfers = 4;
    xllm_kv_receiver *r = xllm_kv_receiver_new_detached(&self, &p);
    xllm_xfer_conn *c = xllm_xfer_conn_new(r);
    if (mode & 1) {
        xllm_xfer_buf b = {0};
        xllm_xfer_hello peer = identity(0);
        xllm_xfer_put_hello(&b, &peer);
        if (xllm_xfer_conn_feed(c, b.data, b.len) != XLLM_OK) __builtin_trap();
        xllm_xfer_buf_free(&b);
    }
    /* in pieces of 1 + cut bytes: frames cross read boundaries */
    size_t step = (size_t)cut + 1;
    for (size_t at = 0; at < size; at += step) {
        size_t n = size - at < step ? size - at : step;
        if (xllm_xfer_conn_feed(c, data + at, n) != XLLM_OK) break;
        if (mode & 4) xllm_xfer_conn_flush_cancelled(c);
    }
    /* the answers must themselves be well-formed frames */
    xllm_xfer_buf *out = xllm_xfer_conn_out(c);
    for (size_t at = 0; out->len - at >= XLLM_XFER_HEADER;) {
        if (xllm_xfer_get_header(out->data + at, 1024, &hd, err, sizeof(err)) != XLLM_OK)
            __builtin_trap();
        at += XLLM_XFER_HEADER + hd.len;
        if (at > out->len) __builtin_trap();
    }
    xllm_kv_transfer *t;
    int k = 0;
    while ((t = xllm_kv_receiver_poll(r, 0))) {
        if (t->status == XLLM_OK) {
            for (int32_t i = 0; i < t->n_tokens; i++) sink += (uint64_t)t->tokens[i];
            for (uint32_t il = 0; il < 2; il++)
                sink += xllm_xfer_transfer_rows(t, il, 1)[8 * (size_t)t->n_tokens - 1];
        }
        if ((mode & 8) && k++ == 0) xllm_kv_receiver_cancel(r, t->id + 1);
        xllm_kv_transfer_free(t);
    }
    xllm_xfer_conn_free(c);
    xllm_kv_receiver_stats st;
    while ((t = xllm_kv_receiver_poll(r, 0))) xllm_kv_transfer_free(t);
    xllm_kv_receiver_get_stats(r, &st);
    if (st.staged_bytes != 0 || st.in_flight != 0) __builtin_trap();
    xllm_kv_receiver_free(r);
    return 0;
}
