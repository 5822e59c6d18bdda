/* CPU operators of the forward pass: matrix products over weights of any GGUF type, norms,
 * rotary embeddings, activation, attention over the KV layout. Scalar and portable for now;
 * SIMD kernels with run-time dispatch come in behind these same entry points. */
#ifndef XLLM_COMPUTE_CPU_OPS_H
#define XLLM_COMPUTE_CPU_OPS_H

#include <stddef.h>
#include <stdint.h>

#include "compute/threadpool.h"
#include "xllm/xllm.h"

/* A weight matrix view: n_rows rows of n_cols elements of type `type`, row_bytes apart. */
typedef struct xllm_mat {
    const void *data;
    xllm_dtype type;
    int64_t n_rows;
    int64_t n_cols;
    size_t row_bytes;
} xllm_mat;

/* y (T, n_rows) = x (T, n_cols) @ W^T, rows of x and y are x_stride / y_stride floats apart.
 * scratch: n_threads * n_cols floats. Runs on the pool. */
void xllm_op_matmul(xllm_threadpool *tp, const xllm_mat *w, const float *x, int64_t x_stride,
                    float *y, int64_t y_stride, int64_t T, float *scratch);

/* out (n) = x (n) / rms(x) * w (n); out may alias x. */
void xllm_op_rmsnorm(float *out, const float *x, const float *w, int64_t n, float eps);

/* float dot product, 8 partial sums */
float xllm_op_dot_f32(const float *a, const float *b, int64_t n);

/* Rotates n_heads heads of head_dim floats (x: (n_heads, head_dim)) by precomputed cos/sin
 * (n_rot/2 each); neox chooses the half-split pairing, otherwise adjacent pairs. */
void xllm_op_rope(float *x, int n_heads, int head_dim, int n_rot, const float *cos_t,
                  const float *sin_t, int neox);

/* out[i] = silu(g[i]) * u[i] */
void xllm_op_swiglu(float *out, const float *g, const float *u, int64_t n);

/* In-place softmax of n floats. */
void xllm_op_softmax(float *x, int64_t n);

/* Causal attention for one query head over positions [0, n_pos) of one sequence:
 * q (head_dim), K/V rows of row_bytes bytes, this head's kv slice at elem offset kv_off;
 * out (head_dim). scores: n_pos floats of scratch. */
void xllm_op_attention_head(const float *q, const void *k, const void *v, xllm_dtype kv_type,
                            size_t row_bytes, int64_t kv_off, int head_dim, int32_t n_pos,
                            float scale, float *scores, float *out);

#endif
