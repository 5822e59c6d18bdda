/* KV memory of a context: per sequence and layer, K and V rows that the attention kernel sees
 * as one contiguous array indexed by position. The xTensor issue replaces the storage behind
 * this interface (virtual regions over a page pool); callers only use these functions. */
#ifndef XLLM_KV_H
#define XLLM_KV_H

#include <stddef.h>
#include <stdint.h>

#include "xllm/xllm.h"

typedef struct xllm_kv xllm_kv;

typedef struct xllm_kv_params {
    int32_t n_layer;
    int32_t n_seq;     /* sequence slots, ids 0..n_seq-1 */
    int32_t n_ctx;     /* max positions per sequence */
    int32_t row_elems; /* elements in one position's K (or V) row: n_head_kv * head_dim */
    xllm_dtype type;   /* XLLM_DTYPE_F32 or XLLM_DTYPE_F16 */
} xllm_kv_params;

xllm_status xllm_kv_new(const xllm_kv_params *p, xllm_kv **out, char *err, size_t err_size);
void xllm_kv_free(xllm_kv *kv); /* accepts NULL */

/* Positions stored for seq. */
int32_t xllm_kv_seq_len(const xllm_kv *kv, int32_t seq);
/* Makes room for positions [0, n) of seq (no effect on its length). XLLM_ERR_KV_FULL when n
 * exceeds n_ctx, XLLM_ERR_NOMEM when memory runs out. */
xllm_status xllm_kv_reserve(xllm_kv *kv, int32_t seq, int32_t n);
/* Sets the stored length (after rows [old, n) were written, or to drop positions >= n). */
void xllm_kv_seq_set_len(xllm_kv *kv, int32_t seq, int32_t n);

/* Base of the rows of layer il of seq: position p's row starts at p * row_bytes.
 * Valid until the next xllm_kv_reserve on this sequence. Engine thread only. */
void *xllm_kv_k(xllm_kv *kv, int32_t il, int32_t seq);
void *xllm_kv_v(xllm_kv *kv, int32_t il, int32_t seq);
size_t xllm_kv_row_bytes(const xllm_kv *kv);
xllm_dtype xllm_kv_type(const xllm_kv *kv);
/* Bytes of KV memory held now. */
size_t xllm_kv_bytes_used(const xllm_kv *kv);

#endif
