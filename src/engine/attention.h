/* Attention of one query head over a sequence's KV runs (the forward pass and bench-kv). */
#ifndef XLLM_ENGINE_ATTENTION_H
#define XLLM_ENGINE_ATTENTION_H

#include <stddef.h>
#include <stdint.h>

#include "kv/kv.h"

/* q (head_dim) against positions [0, n_pos) given as runs of rows row_bytes apart, this head's
 * K/V at element offset off in each row; out (head_dim). One run (xtensor) goes to the
 * contiguous kernel; several (paged) are read run by run. scores: n_pos floats, tmp: head_dim
 * floats of scratch. */
void xllm_attention_head(const float *q, const xllm_kv_span *spans, int32_t n_spans,
                         xllm_dtype type, size_t row_bytes, int64_t off, int head_dim,
                         int32_t n_pos, float scale, float *scores, float *tmp, float *out);

/* The same computation always read run by run (whatever the layout): lets a benchmark compare
 * layouts with one kernel. */
void xllm_attention_head_runs(const float *q, const xllm_kv_span *spans, int32_t n_spans,
                              xllm_dtype type, size_t row_bytes, int64_t off, int head_dim,
                              int32_t n_pos, float scale, float *scores, float *tmp, float *out);

#endif
