/* CPU operators of the forward pass: matrix products over weights of any GGUF type, norms,
 * rotary embeddings, activation, attention over the KV layout. The xllm_op_* functions are the
 * portable reference; xllm_mm / xllm_cpu_ops run the SIMD kernels of a dispatched ISA level. */
#ifndef XLLM_COMPUTE_CPU_OPS_H
#define XLLM_COMPUTE_CPU_OPS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "compute/cpu/cpu.h"
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

/* Fused attention of the `group` query heads that share one KV head, for n_tok consecutive
 * tokens of one sequence (token i sees positions [0, n_pos + i)); online softmax over blocks
 * of positions, so each K/V row is read once per call. */
typedef struct xllm_attn_args {
    const float *q;     /* (n_tok, q_stride): token i's group heads at q + i*q_stride, each
                           (head_dim) contiguous */
    int64_t q_stride;   /* floats between tokens */
    const void *k, *v;  /* base of position 0's K / V row */
    xllm_dtype kv_type; /* F32 or F16 */
    size_t row_bytes;   /* bytes between positions */
    int64_t kv_off;     /* element offset of this KV head in a row */
    int head_dim;       /* <= 256 for the fused kernel */
    int group;          /* query heads per KV head; n_tok * group <= XLLM_ATTN_MAX_Q */
    int n_tok;
    int32_t n_pos; /* positions token 0 sees */
    float scale;
    float *out; /* (n_tok, out_stride): same layout as q */
    int64_t out_stride;
    int n_kv; /* consecutive KV heads from kv_off (head h's queries at q + h * group *
                 head_dim); 0 = 1. n_kv * n_tok * group <= XLLM_ATTN_MAX_Q */
} xllm_attn_args;

#define XLLM_ATTN_MAX_Q 32

/* Portable implementation of the fused attention (reference for the SIMD ones). */
void xllm_op_attention_group(const xllm_attn_args *a);

/* ---- dispatched operators ------------------------------------------------------------ */

typedef struct xllm_cpu_kernels xllm_cpu_kernels;

/* The kernel table of a level (never NULL; a level above the CPU's is lowered). */
const xllm_cpu_kernels *xllm_cpu_kernels_get(xllm_cpu_level level);

void xllm_cpu_rmsnorm(const xllm_cpu_kernels *k, float *out, const float *x, const float *w,
                      int64_t n, float eps);
void xllm_cpu_swiglu(const xllm_cpu_kernels *k, float *out, const float *g, const float *u,
                     int64_t n);
float xllm_cpu_dot_f32(const xllm_cpu_kernels *k, const float *a, const float *b, int64_t n);
void xllm_cpu_attention(const xllm_cpu_kernels *k, const xllm_attn_args *a);
/* y (n) = fp16(x (n)), round to nearest even. */
void xllm_cpu_to_f16(const xllm_cpu_kernels *k, const float *x, uint16_t *y, int64_t n);

/* A matmul engine: the kernels of one level, the pool, and workspaces sized at creation for
 * inputs of up to max_T rows of up to max_cols floats (no allocation per call). One thread
 * (the pool's owner) at a time. */
typedef struct xllm_mm xllm_mm;

xllm_mm *xllm_mm_new(xllm_threadpool *tp, xllm_cpu_level level, int64_t max_T, int64_t max_cols);
void xllm_mm_free(xllm_mm *mm); /* accepts NULL */
const xllm_cpu_kernels *xllm_mm_kernels(const xllm_mm *mm);
xllm_cpu_level xllm_mm_level(const xllm_mm *mm);

/* Declares the input of the following xllm_mm_run calls: x (T, n) floats, rows x_stride
 * apart. Its 8-bit / bf16 forms are made on first need and reused by later runs until the next
 * xllm_mm_input (so Q, K and V, or gate and up, quantize the layer input once). x must not
 * change in between. */
void xllm_mm_input(xllm_mm *mm, const float *x, int64_t x_stride, int64_t T, int64_t n);
/* y (T, n_rows) = input @ W^T (acc: y +=, which fuses a residual add). */
void xllm_mm_run(xllm_mm *mm, const xllm_mat *w, float *y, int64_t y_stride, bool acc);

/* Weights packed ahead of time into the GEMM panel form (the batched path then skips packing
 * them on every call), made once per model and shared read-only by the contexts' engines. */
typedef struct xllm_mm_packs xllm_mm_packs;

xllm_mm_packs *xllm_mm_packs_new(void);
void xllm_mm_packs_free(xllm_mm_packs *pk); /* accepts NULL */
/* Packs w with mm's kernels into pk. Returns the bytes of the panels, 0 when the level or the
 * type has no panel form, the panels would take more than max_bytes, or memory ran out. w's
 * data pointer is the key of later look-ups. */
size_t xllm_mm_pack(xllm_mm *mm, xllm_mm_packs *pk, const xllm_mat *w, size_t max_bytes);
/* The bytes xllm_mm_pack would take for w with that max_bytes, packing nothing. */
size_t xllm_mm_pack_bytes(const xllm_mm *mm, const xllm_mat *w, size_t max_bytes);
/* Whether w's panels serve every path without its dense rows, so that those can go
 * (xllm_mm_packs_drop_dense): 8-bit panels about the dense size (8-bit types), or decode panels
 * in the type's own bits (sub-8-bit types; with 8-bit panels for batches beside them, or alone,
 * when max_bytes left those out: batches then read the decode panels too). */
bool xllm_mm_packs_replace_dense(const xllm_mm_packs *pk, const xllm_mat *w);
/* Marks that w's dense rows are gone (w must be packed): from then on every path, at every
 * level, reads w from its panels; w's data pointer stays the key. Before any engine uses pk. */
void xllm_mm_packs_drop_dense(xllm_mm_packs *pk, const xllm_mat *w);
/* The engine reads packed weights from pk (NULL: none); pk must outlive mm. */
void xllm_mm_use_packs(xllm_mm *mm, const xllm_mm_packs *pk);
/* Row r of w as n_cols floats, from the panels when its dense rows are gone. Any thread. */
void xllm_mm_row(const xllm_mm *mm, const xllm_mat *w, int64_t r, float *out);
/* n (<= 4) matmuls on the same input in one parallel region (Q, K and V; gate and up): one
 * barrier instead of n. */
void xllm_mm_run_multi(xllm_mm *mm, int n, const xllm_mat *const *w, float *const *y,
                       const int64_t *y_stride, bool acc);

#endif
