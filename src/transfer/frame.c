/* KV transfer frames: little-endian encoding and validating decoding of every frame type, the
 * HELLO identity (model id hash) and its compatibility check. Pure functions, any thread. */
#include <math.h>
#include <string.h>
#include <xxhash.h>

#include "engine/engine-impl.h"
#include "transfer/transfer-impl.h"
#include "util/common.h"

_Static_assert(sizeof(float) == 4, "float must be IEEE binary32");

/* ==== buffers ================================================================================ */

void xllm_xfer_buf_reserve(xllm_xfer_buf *b, size_t extra) {
    if (b->cap - b->len >= extra) return;
    size_t cap = b->cap ? b->cap : 256;
    while (cap - b->len < extra) cap *= 2;
    b->data = xllm_xrealloc(b->data, cap);
    b->cap = cap;
}

void xllm_xfer_buf_free(xllm_xfer_buf *b) {
    free(b->data);
    memset(b, 0, sizeof(*b));
}

void xllm_xfer_buf_consume(xllm_xfer_buf *b, size_t n) {
    XLLM_ASSERT(n <= b->len);
    memmove(b->data, b->data + n, b->len - n);
    b->len -= n;
}

/* ==== encoding =============================================================================== */

/* Appends a header for a payload of len bytes and returns where the payload goes. */
static uint8_t *put_header(xllm_xfer_buf *b, uint16_t type, uint64_t id, size_t len) {
    XLLM_ASSERT(len <= UINT32_MAX);
    xllm_xfer_buf_reserve(b, XLLM_XFER_HEADER + len);
    uint8_t *p = b->data + b->len;
    xllm_xfer_w32(p, XLLM_XFER_MAGIC);
    xllm_xfer_w16(p + 4, XLLM_XFER_VERSION);
    xllm_xfer_w16(p + 6, type);
    xllm_xfer_w32(p + 8, 0); /* flags */
    xllm_xfer_w32(p + 12, (uint32_t)len);
    xllm_xfer_w64(p + 16, id);
    b->len += XLLM_XFER_HEADER + len;
    return p + XLLM_XFER_HEADER;
}

void xllm_xfer_put_hello(xllm_xfer_buf *b, const xllm_xfer_hello *h) {
    uint8_t *p = put_header(b, XLLM_XFER_HELLO, 0, XLLM_XFER_HELLO_BYTES);
    xllm_xfer_w64(p, h->model_id);
    xllm_xfer_w32(p + 8, h->n_layer);
    xllm_xfer_w32(p + 12, h->row_bytes);
    xllm_xfer_w32(p + 16, h->kv_type);
    xllm_xfer_w32(p + 20, h->n_ctx);
    xllm_xfer_w32(p + 24, h->role);
    xllm_xfer_w32(p + 28, h->max_frame);
    memcpy(p + 32, h->arch, XLLM_XFER_ARCH_BYTES);
}

void xllm_xfer_put_seq_begin(xllm_xfer_buf *b, uint64_t id, const int32_t *tokens, uint32_t n) {
    uint8_t *p = put_header(b, XLLM_XFER_SEQ_BEGIN, id, 8 + 4 * (size_t)n);
    xllm_xfer_w32(p, n);
    xllm_xfer_w32(p + 4, 0);
    for (uint32_t i = 0; i < n; i++) xllm_xfer_w32(p + 8 + 4 * (size_t)i, (uint32_t)tokens[i]);
}

void xllm_xfer_put_layer_head(xllm_xfer_buf *b, uint64_t id, uint32_t layer, uint32_t pos0,
                              uint32_t n, size_t row_bytes) {
    size_t rows = 2 * (size_t)n * row_bytes;
    /* only the header and the 12 bytes of fields; the caller appends the rows */
    xllm_xfer_buf_reserve(b, XLLM_XFER_HEADER + 12 + rows);
    uint8_t *p = put_header(b, XLLM_XFER_LAYER, id, 12 + rows);
    b->len -= rows;
    xllm_xfer_w32(p, layer);
    xllm_xfer_w32(p + 4, pos0);
    xllm_xfer_w32(p + 8, n);
}

void xllm_xfer_put_seq_end(xllm_xfer_buf *b, uint64_t id, int32_t first_token, float logprob) {
    uint8_t *p = put_header(b, XLLM_XFER_SEQ_END, id, 8);
    uint32_t bits;
    memcpy(&bits, &logprob, 4);
    xllm_xfer_w32(p, (uint32_t)first_token);
    xllm_xfer_w32(p + 4, bits);
}

void xllm_xfer_put_status(xllm_xfer_buf *b, uint16_t type, uint64_t id, uint32_t code,
                          const char *msg) {
    size_t n = msg ? strlen(msg) : 0;
    if (n > XLLM_XFER_MAX_MSG) n = XLLM_XFER_MAX_MSG;
    uint8_t *p = put_header(b, type, id, 8 + n);
    xllm_xfer_w32(p, code);
    xllm_xfer_w32(p + 4, (uint32_t)n);
    if (n) memcpy(p + 8, msg, n);
}

void xllm_xfer_put_ack(xllm_xfer_buf *b, uint64_t id, uint16_t acked_type) {
    uint8_t *p = put_header(b, XLLM_XFER_ACK, id, 8);
    xllm_xfer_w32(p, acked_type);
    xllm_xfer_w32(p + 4, 0);
}

/* ==== decoding =============================================================================== */

static const char *type_name(uint32_t t) {
    switch (t) {
        case XLLM_XFER_HELLO:
            return "HELLO";
        case XLLM_XFER_SEQ_BEGIN:
            return "SEQ_BEGIN";
        case XLLM_XFER_LAYER:
            return "LAYER";
        case XLLM_XFER_SEQ_END:
            return "SEQ_END";
        case XLLM_XFER_ABORT:
            return "ABORT";
        case XLLM_XFER_ACK:
            return "ACK";
        case XLLM_XFER_ERROR:
            return "ERROR";
        default:
            return "?";
    }
}

xllm_status xllm_xfer_get_header(const uint8_t *p, size_t max_len, xllm_xfer_header *h, char *err,
                                 size_t err_size) {
    uint32_t magic = xllm_xfer_r32(p);
    if (magic != XLLM_XFER_MAGIC) {
        xllm_set_err(err, err_size, "kv frame: bad magic 0x%08x (want 0x%08x)", magic,
                     XLLM_XFER_MAGIC);
        return XLLM_ERR_FORMAT;
    }
    uint16_t version = xllm_xfer_r16(p + 4);
    if (version != XLLM_XFER_VERSION) {
        xllm_set_err(err, err_size, "kv frame: version %u not supported (this side speaks %u)",
                     version, XLLM_XFER_VERSION);
        return XLLM_ERR_UNSUPPORTED;
    }
    h->type = xllm_xfer_r16(p + 6);
    uint32_t flags = xllm_xfer_r32(p + 8);
    h->len = xllm_xfer_r32(p + 12);
    h->id = xllm_xfer_r64(p + 16);
    if (h->type < XLLM_XFER_HELLO || h->type > XLLM_XFER_ERROR) {
        xllm_set_err(err, err_size, "kv frame: unknown type %u", h->type);
        return XLLM_ERR_FORMAT;
    }
    if (flags != 0) {
        xllm_set_err(err, err_size, "kv frame: %s with unknown flags 0x%x", type_name(h->type),
                     flags);
        return XLLM_ERR_FORMAT;
    }
    if (h->len > max_len) {
        xllm_set_err(err, err_size, "kv frame: %s payload of %u bytes exceeds the limit of %zu",
                     type_name(h->type), h->len, max_len);
        return XLLM_ERR_FORMAT;
    }
    bool needs_id = h->type == XLLM_XFER_SEQ_BEGIN || h->type == XLLM_XFER_LAYER ||
                    h->type == XLLM_XFER_SEQ_END || h->type == XLLM_XFER_ABORT ||
                    h->type == XLLM_XFER_ACK;
    if (needs_id && h->id == 0) {
        xllm_set_err(err, err_size, "kv frame: %s with transfer id 0", type_name(h->type));
        return XLLM_ERR_FORMAT;
    }
    if (h->type == XLLM_XFER_HELLO && h->id != 0) {
        xllm_set_err(err, err_size, "kv frame: HELLO with a transfer id");
        return XLLM_ERR_FORMAT;
    }
    return XLLM_OK;
}

static xllm_status bad_len(const char *what, size_t len, size_t want, char *err, size_t err_size) {
    xllm_set_err(err, err_size, "kv frame: %s payload is %zu bytes, expected %zu", what, len, want);
    return XLLM_ERR_FORMAT;
}

xllm_status xllm_xfer_get_hello(const uint8_t *p, size_t len, xllm_xfer_hello *h, char *err,
                                size_t err_size) {
    if (len != XLLM_XFER_HELLO_BYTES)
        return bad_len("HELLO", len, XLLM_XFER_HELLO_BYTES, err, err_size);
    h->model_id = xllm_xfer_r64(p);
    h->n_layer = xllm_xfer_r32(p + 8);
    h->row_bytes = xllm_xfer_r32(p + 12);
    h->kv_type = xllm_xfer_r32(p + 16);
    h->n_ctx = xllm_xfer_r32(p + 20);
    h->role = xllm_xfer_r32(p + 24);
    h->max_frame = xllm_xfer_r32(p + 28);
    memcpy(h->arch, p + 32, XLLM_XFER_ARCH_BYTES);
    h->arch[XLLM_XFER_ARCH_BYTES - 1] = '\0';
    for (size_t i = 0; h->arch[i]; i++)
        if (h->arch[i] < 0x20 || h->arch[i] > 0x7e) h->arch[i] = '?';
    if (h->n_layer == 0 || h->n_layer > XLLM_XFER_MAX_LAYERS) {
        xllm_set_err(err, err_size, "kv frame: HELLO with %u layers", h->n_layer);
        return XLLM_ERR_FORMAT;
    }
    if (h->row_bytes == 0 || h->row_bytes > XLLM_XFER_MAX_ROW) {
        xllm_set_err(err, err_size, "kv frame: HELLO with %u-byte rows", h->row_bytes);
        return XLLM_ERR_FORMAT;
    }
    if (h->n_ctx == 0 || h->n_ctx > XLLM_XFER_MAX_POS) {
        xllm_set_err(err, err_size, "kv frame: HELLO with a context of %u positions", h->n_ctx);
        return XLLM_ERR_FORMAT;
    }
    if (h->max_frame < 12 + 2 * (uint64_t)h->row_bytes) {
        xllm_set_err(err, err_size,
                     "kv frame: HELLO with a frame limit of %u bytes, below one "
                     "position (%u)",
                     h->max_frame, 12 + 2 * h->row_bytes);
        return XLLM_ERR_FORMAT;
    }
    if (h->role > 1) {
        xllm_set_err(err, err_size, "kv frame: HELLO with unknown role %u", h->role);
        return XLLM_ERR_FORMAT;
    }
    return XLLM_OK;
}

xllm_status xllm_xfer_get_seq_begin(const uint8_t *p, size_t len, uint32_t max_pos, uint32_t *n,
                                    const uint8_t **tokens, char *err, size_t err_size) {
    if (len < 8) return bad_len("SEQ_BEGIN", len, 8, err, err_size);
    *n = xllm_xfer_r32(p);
    if (*n == 0 || *n > max_pos) {
        xllm_set_err(err, err_size, "kv frame: SEQ_BEGIN of %u positions (allowed 1..%u)", *n,
                     max_pos);
        return XLLM_ERR_FORMAT;
    }
    if (xllm_xfer_r32(p + 4) != 0) {
        xllm_set_err(err, err_size, "kv frame: SEQ_BEGIN reserved field not zero");
        return XLLM_ERR_FORMAT;
    }
    if (len != 8 + 4 * (size_t)*n)
        return bad_len("SEQ_BEGIN", len, 8 + 4 * (size_t)*n, err, err_size);
    for (uint32_t i = 0; i < *n; i++) {
        if ((int32_t)xllm_xfer_r32(p + 8 + 4 * (size_t)i) < 0) {
            xllm_set_err(err, err_size, "kv frame: SEQ_BEGIN token %u is negative", i);
            return XLLM_ERR_FORMAT;
        }
    }
    *tokens = p + 8;
    return XLLM_OK;
}

xllm_status xllm_xfer_get_layer(const uint8_t *p, size_t len, uint32_t n_layer, size_t row_bytes,
                                uint32_t max_pos, xllm_xfer_layer *l, char *err, size_t err_size) {
    if (len < 12) return bad_len("LAYER", len, 12, err, err_size);
    l->layer = xllm_xfer_r32(p);
    l->pos0 = xllm_xfer_r32(p + 4);
    l->n = xllm_xfer_r32(p + 8);
    if (l->layer >= n_layer) {
        xllm_set_err(err, err_size, "kv frame: LAYER index %u out of range (%u layers)", l->layer,
                     n_layer);
        return XLLM_ERR_FORMAT;
    }
    if (l->n == 0 || l->pos0 > max_pos || l->n > max_pos - l->pos0) {
        xllm_set_err(err, err_size, "kv frame: LAYER positions [%u, %u + %u) outside 0..%u",
                     l->pos0, l->pos0, l->n, max_pos);
        return XLLM_ERR_FORMAT;
    }
    size_t want = 12 + 2 * (size_t)l->n * row_bytes; /* n, row_bytes bounded: no overflow */
    if (len != want) return bad_len("LAYER", len, want, err, err_size);
    l->k = p + 12;
    l->v = p + 12 + (size_t)l->n * row_bytes;
    return XLLM_OK;
}

xllm_status xllm_xfer_get_seq_end(const uint8_t *p, size_t len, int32_t *first_token,
                                  float *logprob, char *err, size_t err_size) {
    if (len != 8) return bad_len("SEQ_END", len, 8, err, err_size);
    *first_token = (int32_t)xllm_xfer_r32(p);
    uint32_t bits = xllm_xfer_r32(p + 4);
    memcpy(logprob, &bits, 4);
    if (*first_token < 0) {
        xllm_set_err(err, err_size, "kv frame: SEQ_END with negative first token %d", *first_token);
        return XLLM_ERR_FORMAT;
    }
    if (isnan(*logprob) || *logprob > 0) {
        xllm_set_err(err, err_size, "kv frame: SEQ_END with logprob %g (want <= 0)",
                     (double)*logprob);
        return XLLM_ERR_FORMAT;
    }
    return XLLM_OK;
}

xllm_status xllm_xfer_get_status(const uint8_t *p, size_t len, xllm_xfer_status *s, char *err,
                                 size_t err_size) {
    if (len < 8) return bad_len("ABORT/ERROR", len, 8, err, err_size);
    s->code = xllm_xfer_r32(p);
    s->len = xllm_xfer_r32(p + 4);
    if (s->len > XLLM_XFER_MAX_MSG) {
        xllm_set_err(err, err_size, "kv frame: ABORT/ERROR message of %u bytes (max %u)", s->len,
                     XLLM_XFER_MAX_MSG);
        return XLLM_ERR_FORMAT;
    }
    if (len != 8 + (size_t)s->len)
        return bad_len("ABORT/ERROR", len, 8 + (size_t)s->len, err, err_size);
    /* keep printable ASCII only: the text ends up in logs and error messages */
    for (uint32_t i = 0; i < s->len; i++) {
        char c = (char)p[8 + i];
        s->msg[i] = c >= 0x20 && c <= 0x7e ? c : '?';
    }
    s->msg[s->len] = '\0';
    return XLLM_OK;
}

xllm_status xllm_xfer_get_ack(const uint8_t *p, size_t len, uint16_t *acked_type, char *err,
                              size_t err_size) {
    if (len != 8) return bad_len("ACK", len, 8, err, err_size);
    uint32_t t = xllm_xfer_r32(p);
    if (t != XLLM_XFER_SEQ_END || xllm_xfer_r32(p + 4) != 0) {
        xllm_set_err(err, err_size, "kv frame: ACK of frame type %u (only SEQ_END is acked)", t);
        return XLLM_ERR_FORMAT;
    }
    *acked_type = (uint16_t)t;
    return XLLM_OK;
}

/* ==== identity =============================================================================== */

uint64_t xllm_transfer_model_id(const xllm_model *m) {
    XXH3_state_t *st = XXH3_createState();
    XLLM_ASSERT(st);
    XXH3_64bits_reset(st);
    const char *arch = xllm_model_arch(m);
    XXH3_64bits_update(st, arch, strlen(arch) + 1);
    int32_t hp[] = {xllm_model_n_vocab(m), xllm_model_n_embd(m),    xllm_model_n_layer(m),
                    xllm_model_n_head(m),  xllm_model_n_head_kv(m), xllm_model_head_dim(m),
                    xllm_model_n_ff(m),    xllm_model_n_expert(m),  xllm_model_n_expert_used(m)};
    XXH3_64bits_update(st, hp, sizeof(hp));
    float fp[] = {xllm_model_rope_freq_base(m), xllm_model_norm_eps(m)};
    XXH3_64bits_update(st, fp, sizeof(fp));
    int64_t nt = xllm_model_n_tensors(m);
    for (int64_t i = 0; i < nt; i++) {
        xllm_tensor_info ti;
        if (xllm_model_tensor(m, i, &ti) != XLLM_OK) continue;
        XXH3_64bits_update(st, ti.name, strlen(ti.name) + 1);
        int64_t shape[6] = {ti.type, ti.n_dims, ti.ne[0], ti.ne[1], ti.ne[2], ti.ne[3]};
        XXH3_64bits_update(st, shape, sizeof(shape));
    }
    uint64_t h = XXH3_64bits_digest(st);
    XXH3_freeState(st);
    return h;
}

void xllm_xfer_hello_from_ctx(const xllm_context *ctx, uint32_t role, xllm_xfer_hello *h) {
    memset(h, 0, sizeof(*h));
    h->model_id = xllm_transfer_model_id(ctx->model);
    h->n_layer = (uint32_t)xllm_model_n_layer(ctx->model);
    h->row_bytes = (uint32_t)xllm_kv_row_bytes(ctx->kv);
    h->kv_type = (uint32_t)xllm_kv_type(ctx->kv);
    h->n_ctx = (uint32_t)xllm_context_n_ctx(ctx);
    h->role = role;
    h->max_frame = 16u << 20;
    snprintf(h->arch, sizeof(h->arch), "%s", xllm_model_arch(ctx->model));
}

bool xllm_xfer_hello_compatible(const xllm_xfer_hello *self, const xllm_xfer_hello *peer, char *err,
                                size_t err_size) {
    if (self->model_id != peer->model_id) {
        xllm_set_err(err, err_size,
                     "model mismatch: this instance runs %s (id %016llx), the peer %s (id %016llx)",
                     self->arch, (unsigned long long)self->model_id, peer->arch,
                     (unsigned long long)peer->model_id);
        return false;
    }
    if (self->kv_type != peer->kv_type) {
        const char *a = xllm_dtype_name((xllm_dtype)self->kv_type);
        const char *b = xllm_dtype_name((xllm_dtype)peer->kv_type);
        xllm_set_err(err, err_size, "KV type mismatch: %s here, %s at the peer", a ? a : "?",
                     b ? b : "?");
        return false;
    }
    if (self->row_bytes != peer->row_bytes || self->n_layer != peer->n_layer) {
        xllm_set_err(err, err_size,
                     "KV shape mismatch: %u layers of %u-byte rows here, %u of %u "
                     "at the peer",
                     self->n_layer, self->row_bytes, peer->n_layer, peer->row_bytes);
        return false;
    }
    if (self->role == peer->role) {
        xllm_set_err(err, err_size, "both ends are %s", self->role ? "receivers" : "senders");
        return false;
    }
    return true;
}

xllm_status xllm_xfer_code_status(uint32_t code) {
    switch (code) {
        case XLLM_XFER_CODE_BUSY:
            return XLLM_ERR_BUSY;
        case XLLM_XFER_CODE_MISMATCH:
            return XLLM_ERR_UNSUPPORTED;
        case XLLM_XFER_CODE_TOO_LONG:
            return XLLM_ERR_KV_FULL;
        case XLLM_XFER_CODE_PROTOCOL:
            return XLLM_ERR_FORMAT;
        case XLLM_XFER_CODE_DUPLICATE:
        case XLLM_XFER_CODE_UNKNOWN:
            return XLLM_ERR_INVALID_ARG;
        default:
            return XLLM_ERR_IO; /* cancelled, shutdown, or a code from a newer peer */
    }
}
