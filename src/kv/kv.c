/* KV memory, simple layout: each (sequence, layer) owns a K and a V buffer that grows by
 * doubling up to n_ctx positions. Logically contiguous per sequence, as the interface promises. */
#include "kv/kv.h"

#include <string.h>

#include "compute/dtype.h"
#include "util/common.h"

typedef struct kv_seq {
    int32_t len;
    int32_t cap;
    uint8_t **k; /* [n_layer] */
    uint8_t **v;
} kv_seq;

struct xllm_kv {
    xllm_kv_params p;
    size_t row_bytes;
    kv_seq *seqs;
};

xllm_status xllm_kv_new(const xllm_kv_params *p, xllm_kv **out, char *err, size_t err_size) {
    *out = NULL;
    if (p->n_layer <= 0 || p->n_seq <= 0 || p->n_ctx <= 0 || p->row_elems <= 0 ||
        (p->type != XLLM_DTYPE_F32 && p->type != XLLM_DTYPE_F16)) {
        xllm_set_err(err, err_size, "kv: invalid parameters (layers %d, seqs %d, ctx %d, type %d)",
                     p->n_layer, p->n_seq, p->n_ctx, (int)p->type);
        return XLLM_ERR_INVALID_ARG;
    }
    xllm_kv *kv = xllm_xcalloc(1, sizeof(*kv));
    kv->p = *p;
    kv->row_bytes = xllm_dtype_row_bytes(p->type, p->row_elems);
    kv->seqs = xllm_xcalloc((size_t)p->n_seq, sizeof(kv_seq));
    for (int s = 0; s < p->n_seq; s++) {
        kv->seqs[s].k = xllm_xcalloc((size_t)p->n_layer, sizeof(uint8_t *));
        kv->seqs[s].v = xllm_xcalloc((size_t)p->n_layer, sizeof(uint8_t *));
    }
    *out = kv;
    return XLLM_OK;
}

void xllm_kv_free(xllm_kv *kv) {
    if (!kv) return;
    for (int s = 0; s < kv->p.n_seq; s++) {
        for (int l = 0; l < kv->p.n_layer; l++) {
            free(kv->seqs[s].k[l]);
            free(kv->seqs[s].v[l]);
        }
        free(kv->seqs[s].k);
        free(kv->seqs[s].v);
    }
    free(kv->seqs);
    free(kv);
}

int32_t xllm_kv_seq_len(const xllm_kv *kv, int32_t seq) {
    XLLM_ASSERT(seq >= 0 && seq < kv->p.n_seq);
    return kv->seqs[seq].len;
}

xllm_status xllm_kv_reserve(xllm_kv *kv, int32_t seq, int32_t n) {
    XLLM_ASSERT(seq >= 0 && seq < kv->p.n_seq);
    kv_seq *s = &kv->seqs[seq];
    if (n <= s->cap) return XLLM_OK;
    if (n > kv->p.n_ctx) return XLLM_ERR_KV_FULL;
    int32_t cap = s->cap ? s->cap : 64;
    while (cap < n) cap = cap > kv->p.n_ctx / 2 ? kv->p.n_ctx : cap * 2;
    if (cap > kv->p.n_ctx) cap = kv->p.n_ctx;
    size_t bytes = (size_t)cap * kv->row_bytes;
    for (int l = 0; l < kv->p.n_layer; l++) {
        uint8_t *k = realloc(s->k[l], bytes);
        if (!k) return XLLM_ERR_NOMEM;
        s->k[l] = k;
        uint8_t *v = realloc(s->v[l], bytes);
        if (!v) return XLLM_ERR_NOMEM;
        s->v[l] = v;
    }
    s->cap = cap;
    return XLLM_OK;
}

void xllm_kv_seq_set_len(xllm_kv *kv, int32_t seq, int32_t n) {
    XLLM_ASSERT(seq >= 0 && seq < kv->p.n_seq);
    XLLM_ASSERT(n >= 0 && n <= kv->seqs[seq].cap);
    kv->seqs[seq].len = n;
}

void *xllm_kv_k(xllm_kv *kv, int32_t il, int32_t seq) {
    return kv->seqs[seq].k[il];
}

void *xllm_kv_v(xllm_kv *kv, int32_t il, int32_t seq) {
    return kv->seqs[seq].v[il];
}

size_t xllm_kv_row_bytes(const xllm_kv *kv) {
    return kv->row_bytes;
}

xllm_dtype xllm_kv_type(const xllm_kv *kv) {
    return kv->p.type;
}

size_t xllm_kv_bytes_used(const xllm_kv *kv) {
    size_t total = 0;
    for (int s = 0; s < kv->p.n_seq; s++)
        total += (size_t)kv->seqs[s].cap * kv->row_bytes * 2 * (size_t)kv->p.n_layer;
    return total;
}
