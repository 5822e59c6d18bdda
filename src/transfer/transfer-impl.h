/* Private parts of the KV transfer module: the frame codec (frame.c) and the receiver's
 * per-connection protocol state machine, which works on bytes and no socket so that unit tests
 * and the fuzz target drive it directly (receiver.c). */
#ifndef XLLM_TRANSFER_IMPL_H
#define XLLM_TRANSFER_IMPL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "transfer/transfer.h"

/* ---- wire constants (a format: values are append-only) ---------------------------------- */

#define XLLM_XFER_MAGIC       0x54564B58u /* bytes "XKVT" read as a little-endian u32 */
#define XLLM_XFER_VERSION     1u
#define XLLM_XFER_HEADER      24u  /* bytes of a frame header */
#define XLLM_XFER_HELLO_BYTES 48u  /* HELLO payload */
#define XLLM_XFER_MAX_MSG     255u /* text in ABORT / ERROR */
#define XLLM_XFER_ARCH_BYTES  16u
#define XLLM_XFER_MAX_LAYERS  4096u
#define XLLM_XFER_MAX_ROW     (1u << 20) /* bytes of one K (or V) row */
#define XLLM_XFER_MAX_POS     (1u << 24) /* positions of one sequence */

typedef enum xllm_xfer_type {
    XLLM_XFER_HELLO = 1,
    XLLM_XFER_SEQ_BEGIN = 2,
    XLLM_XFER_LAYER = 3,
    XLLM_XFER_SEQ_END = 4,
    XLLM_XFER_ABORT = 5,
    XLLM_XFER_ACK = 6,
    XLLM_XFER_ERROR = 7,
} xllm_xfer_type;

/* Reasons carried by ABORT and ERROR (wire values, append-only). */
typedef enum xllm_xfer_code {
    XLLM_XFER_CODE_CANCELLED = 1, /* the sender or the decode side gave the request up */
    XLLM_XFER_CODE_PROTOCOL = 2,  /* malformed or unexpected frame: the connection closes */
    XLLM_XFER_CODE_MISMATCH = 3,  /* HELLO: model, KV type or shape differ */
    XLLM_XFER_CODE_BUSY = 4,      /* staging budget or transfer table full */
    XLLM_XFER_CODE_DUPLICATE = 5, /* transfer id already staged */
    XLLM_XFER_CODE_UNKNOWN = 6,   /* transfer id not known */
    XLLM_XFER_CODE_TOO_LONG = 7,  /* more positions than the receiver's context */
    XLLM_XFER_CODE_SHUTDOWN = 8,  /* the peer is stopping */
} xllm_xfer_code;

/* A decoded header. */
typedef struct xllm_xfer_header {
    uint16_t type;
    uint32_t len; /* payload bytes that follow */
    uint64_t id;  /* transfer id; 0 for HELLO and connection-level ERROR */
} xllm_xfer_header;

/* HELLO: who the instance is. The two sides must agree on model_id, kv_type, row_bytes and
 * n_layer; n_ctx is the most positions the sender of the HELLO accepts in one sequence. */
typedef struct xllm_xfer_hello {
    uint64_t model_id;
    uint32_t n_layer;
    uint32_t row_bytes; /* one position's K (or V) row of one layer */
    uint32_t kv_type;   /* xllm_dtype */
    uint32_t n_ctx;
    uint32_t role;                   /* 0 = sender, 1 = receiver */
    uint32_t max_frame;              /* largest payload this side accepts (>= one position) */
    char arch[XLLM_XFER_ARCH_BYTES]; /* NUL-padded, for messages only */
} xllm_xfer_hello;

typedef struct xllm_xfer_layer {
    uint32_t layer;
    uint32_t pos0;    /* first position of this chunk */
    uint32_t n;       /* positions in this chunk */
    const uint8_t *k; /* (n, row_bytes) */
    const uint8_t *v; /* (n, row_bytes) */
} xllm_xfer_layer;

typedef struct xllm_xfer_status {
    uint32_t code; /* xllm_xfer_code */
    uint32_t len;
    char msg[XLLM_XFER_MAX_MSG + 1]; /* NUL-terminated copy */
} xllm_xfer_status;

/* A growable byte buffer (small allocations abort on failure). */
typedef struct xllm_xfer_buf {
    uint8_t *data;
    size_t len, cap;
} xllm_xfer_buf;

void xllm_xfer_buf_reserve(xllm_xfer_buf *b, size_t extra);
void xllm_xfer_buf_free(xllm_xfer_buf *b);
/* Drops the first n bytes. */
void xllm_xfer_buf_consume(xllm_xfer_buf *b, size_t n);

/* ---- encoding: each appends one whole frame to b ---------------------------------------- */

void xllm_xfer_put_hello(xllm_xfer_buf *b, const xllm_xfer_hello *h);
void xllm_xfer_put_seq_begin(xllm_xfer_buf *b, uint64_t id, const int32_t *tokens, uint32_t n);
/* Header and (layer, pos0, n); the caller appends n K rows then n V rows (2 n row_bytes). */
void xllm_xfer_put_layer_head(xllm_xfer_buf *b, uint64_t id, uint32_t layer, uint32_t pos0,
                              uint32_t n, size_t row_bytes);
void xllm_xfer_put_seq_end(xllm_xfer_buf *b, uint64_t id, int32_t first_token, float logprob);
/* ABORT or ERROR (type) with a code and a message (truncated to XLLM_XFER_MAX_MSG). */
void xllm_xfer_put_status(xllm_xfer_buf *b, uint16_t type, uint64_t id, uint32_t code,
                          const char *msg);
void xllm_xfer_put_ack(xllm_xfer_buf *b, uint64_t id, uint16_t acked_type);

/* ---- decoding: never trusts the input; errors name the problem -------------------------- */

/* Decodes a 24-byte header and checks magic, version, flags, type and that len <= max_len. */
xllm_status xllm_xfer_get_header(const uint8_t *p, size_t max_len, xllm_xfer_header *h, char *err,
                                 size_t err_size);
xllm_status xllm_xfer_get_hello(const uint8_t *p, size_t len, xllm_xfer_hello *h, char *err,
                                size_t err_size);
/* tokens points into p (unaligned: read with memcpy). n must be 1..max_pos. */
xllm_status xllm_xfer_get_seq_begin(const uint8_t *p, size_t len, uint32_t max_pos, uint32_t *n,
                                    const uint8_t **tokens, char *err, size_t err_size);
/* Checks layer < n_layer, n >= 1, pos0 + n <= max_pos and len == 12 + 2 n row_bytes. */
xllm_status xllm_xfer_get_layer(const uint8_t *p, size_t len, uint32_t n_layer, size_t row_bytes,
                                uint32_t max_pos, xllm_xfer_layer *l, char *err, size_t err_size);
xllm_status xllm_xfer_get_seq_end(const uint8_t *p, size_t len, int32_t *first_token,
                                  float *logprob, char *err, size_t err_size);
xllm_status xllm_xfer_get_status(const uint8_t *p, size_t len, xllm_xfer_status *s, char *err,
                                 size_t err_size);
xllm_status xllm_xfer_get_ack(const uint8_t *p, size_t len, uint16_t *acked_type, char *err,
                              size_t err_size);
/* Compares a peer's HELLO with ours; on a mismatch writes why. */
bool xllm_xfer_hello_compatible(const xllm_xfer_hello *self, const xllm_xfer_hello *peer, char *err,
                                size_t err_size);
/* Our HELLO from a context (role 0 sender, 1 receiver); max_frame is set to 16 MiB. */
void xllm_xfer_hello_from_ctx(const xllm_context *ctx, uint32_t role, xllm_xfer_hello *h);
/* Maps a wire code to a status. */
xllm_status xllm_xfer_code_status(uint32_t code);

/* ---- receiver protocol core (receiver.c) ------------------------------------------------ */

typedef struct xllm_xfer_conn xllm_xfer_conn;

/* A receiver without a socket or thread (unit tests, fuzzing): identity and limits only. */
xllm_kv_receiver *xllm_kv_receiver_new_detached(const xllm_xfer_hello *self,
                                                const xllm_kv_receiver_params *params);
/* A connection of r; owned by the caller of feed (the I/O thread). */
xllm_xfer_conn *xllm_xfer_conn_new(xllm_kv_receiver *r);
/* Frees the connection; its unfinished transfers fail ("connection closed"). */
void xllm_xfer_conn_free(xllm_xfer_conn *c);
/* Feeds bytes read from the peer; the frames to answer with are appended to the connection's
 * out buffer (xllm_xfer_conn_out). Returns XLLM_OK, or an error after which the connection must
 * be closed once its out buffer (holding an ERROR frame) is flushed. */
xllm_status xllm_xfer_conn_feed(xllm_xfer_conn *c, const uint8_t *data, size_t n);
xllm_xfer_buf *xllm_xfer_conn_out(xllm_xfer_conn *c);
/* Sends ERROR frames for transfers of c cancelled by xllm_kv_receiver_cancel and frees them. */
void xllm_xfer_conn_flush_cancelled(xllm_xfer_conn *c);
/* Staged K (kv 0) or V (kv 1) rows of layer il of a complete transfer: (n_tokens, row_bytes).
 * For tests. */
const uint8_t *xllm_xfer_transfer_rows(const xllm_kv_transfer *t, uint32_t il, int kv);
/* The last protocol error of the connection. */
const char *xllm_xfer_conn_error(const xllm_xfer_conn *c);

/* Little-endian helpers. */
static inline void xllm_xfer_w16(uint8_t *p, uint16_t v) {
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}
static inline void xllm_xfer_w32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static inline void xllm_xfer_w64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static inline uint16_t xllm_xfer_r16(const uint8_t *p) {
    return (uint16_t)(p[0] | (p[1] << 8));
}
static inline uint32_t xllm_xfer_r32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static inline uint64_t xllm_xfer_r64(const uint8_t *p) {
    return (uint64_t)xllm_xfer_r32(p) | (uint64_t)xllm_xfer_r32(p + 4) << 32;
}

#endif
