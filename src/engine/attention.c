/* Attention of one query head over a sequence's KV runs. */
#include "engine/attention.h"

#include <string.h>

#include "compute/cpu/ops.h"
#include "compute/dtype.h"

static inline const float *kv_row_f32(const uint8_t *row, xllm_dtype type, int64_t off, int n,
                                      float *tmp) {
    if (type == XLLM_DTYPE_F32) return (const float *)row + off;
    const uint16_t *h = (const uint16_t *)row + off;
    for (int i = 0; i < n; i++) tmp[i] = xllm_fp16_to_fp32(h[i]);
    return tmp;
}

/* Attention of one query head over KV runs (the paged layout gives one run per block): scores
 * of every position, softmax, weighted sum of V. scores: n_pos floats; tmp: head_dim floats. */
static void attention_spans(const float *q, const xllm_kv_span *sp, int32_t n_spans,
                            xllm_dtype type, size_t row_bytes, int64_t off, int D, int32_t n_pos,
                            float scale, float *scores, float *tmp, float *out) {
    for (int32_t r = 0; r < n_spans; r++)
        for (int32_t i = 0; i < sp[r].n; i++) {
            const uint8_t *row = (const uint8_t *)sp[r].k + (size_t)i * row_bytes;
            scores[sp[r].pos0 + i] =
                xllm_op_dot_f32(q, kv_row_f32(row, type, off, D, tmp), D) * scale;
        }
    xllm_op_softmax(scores, n_pos);
    memset(out, 0, (size_t)D * sizeof(float));
    for (int32_t r = 0; r < n_spans; r++)
        for (int32_t i = 0; i < sp[r].n; i++) {
            const uint8_t *row = (const uint8_t *)sp[r].v + (size_t)i * row_bytes;
            const float *v = kv_row_f32(row, type, off, D, tmp);
            const float w = scores[sp[r].pos0 + i];
            for (int d = 0; d < D; d++) out[d] += w * v[d];
        }
}

void xllm_attention_head(const float *q, const xllm_kv_span *spans, int32_t n_spans,
                         xllm_dtype type, size_t row_bytes, int64_t off, int head_dim,
                         int32_t n_pos, float scale, float *scores, float *tmp, float *out) {
    if (n_spans == 1)
        xllm_op_attention_head(q, spans[0].k, spans[0].v, type, row_bytes, off, head_dim, n_pos,
                               scale, scores, out);
    else
        attention_spans(q, spans, n_spans, type, row_bytes, off, head_dim, n_pos, scale, scores,
                        tmp, out);
}

void xllm_attention_head_runs(const float *q, const xllm_kv_span *spans, int32_t n_spans,
                              xllm_dtype type, size_t row_bytes, int64_t off, int head_dim,
                              int32_t n_pos, float scale, float *scores, float *tmp, float *out) {
    attention_spans(q, spans, n_spans, type, row_bytes, off, head_dim, n_pos, scale, scores, tmp,
                    out);
}
