/* Private layout of xllm_context: the KV memory and the workspaces of the forward pass, all
 * sized at creation so that a step does not allocate (logits grow to their high-water mark). */
#ifndef XLLM_ENGINE_IMPL_H
#define XLLM_ENGINE_IMPL_H

#include "compute/cpu/ops.h"
#include "compute/threadpool.h"
#include "kv/kv.h"
#include "model/model-impl.h"
#include "xllm/xllm.h"

typedef struct xllm_workspace {
    float *x;        /* (n_batch, n_embd) residual stream */
    float *xn;       /* (n_batch, n_embd) normed input of a block */
    float *q;        /* (n_batch, n_head * head_dim) */
    float *k;        /* (n_batch, n_head_kv * head_dim) */
    float *v;        /* (n_batch, n_head_kv * head_dim) */
    float *att;      /* (n_batch, n_head * head_dim) attention output */
    float *ffn_a;    /* (n_batch, n_ff_max) gate / hidden */
    float *ffn_b;    /* (n_batch, n_ff_max) up */
    float *out;      /* (n_batch, n_embd) block output before the residual add */
    float *rope_cos; /* (n_batch, n_rot / 2) */
    float *rope_sin;
    float *router;       /* (n_batch, n_expert) router probabilities */
    int32_t *exp_ids;    /* (n_batch, n_expert_used) chosen experts */
    float *exp_w;        /* (n_batch, n_expert_used) their weights */
    int32_t *rows;       /* (n_batch) token rows routed to one expert */
    float *gather;       /* (n_batch, n_embd) the rows routed to one expert */
    float *exp_out;      /* (n_batch, n_embd) one expert's output for those rows */
    float *att_scratch;  /* (n_threads, n_ctx) attention scores */
    int32_t *seq_next;   /* (n_seq) next position per sequence while validating a batch */
    int32_t *seq_last;   /* (n_seq) last row of each sequence in the batch */
    xllm_kv_span *spans; /* (n_threads, max_spans) KV runs of one attention row */
} xllm_workspace;

/* Told by the forward pass that layer il has stored the K and V rows of every row of batch b
 * (rows t at positions b->pos[t] of sequences b->seq_id[t]); those rows do not change again in
 * this step. Runs on the engine thread inside xllm_decode, between two parallel regions (the
 * compute threads are idle): it may read the rows (xllm_kv_spans) but must not change the KV
 * memory, the batch or the context. */
typedef void (*xllm_layer_hook)(void *user, const xllm_batch *b, int32_t il);

struct xllm_context {
    const xllm_model *model;
    xllm_context_params params;
    xllm_threadpool *tp;
    xllm_mm *mm;                  /* matmul engine: dispatched kernels + their workspaces */
    const xllm_cpu_kernels *kern; /* kernels of the level chosen at creation (XLLM_CPU) */
    xllm_kv *kv;
    xllm_workspace ws;
    int64_t max_cols;
    /* outputs of the last batch */
    float *logits;              /* (n_out, n_vocab) */
    int64_t logits_cap;         /* rows allocated */
    int32_t *out_row;           /* (n_batch) row -> output index, -1 when none */
    int32_t n_rows;             /* rows of the last batch */
    int32_t max_spans;          /* KV runs per sequence and layer (1 for xtensor) */
    uint64_t n_evaluated;       /* rows evaluated since creation */
    xllm_layer_hook layer_hook; /* NULL = none (the forward pass then only tests the pointer) */
    void *layer_hook_user;
};

/* Sets (fn != NULL) or clears the per-layer hook of the next forward passes. Engine thread. */
void xllm_context_set_layer_hook(xllm_context *ctx, xllm_layer_hook fn, void *user);

/* Runs the forward pass of a validated batch (forward.c). The KV memory has room for it. */
xllm_status xllm_forward(xllm_context *ctx, const xllm_batch *b, int32_t n_out);

#endif
