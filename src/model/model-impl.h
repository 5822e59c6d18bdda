/* Private layout of xllm_model: hyperparameters and weight views into the mapped GGUF. */
#ifndef XLLM_MODEL_IMPL_H
#define XLLM_MODEL_IMPL_H

#include <stdbool.h>
#include <stdint.h>

#include "gguf/gguf.h"
#include "xllm/xllm.h"

typedef enum xllm_arch {
    XLLM_ARCH_LLAMA = 0,
    XLLM_ARCH_QWEN2 = 1,
    XLLM_ARCH_QWEN3 = 2,
    XLLM_ARCH_QWEN3MOE = 3,
} xllm_arch;

typedef enum xllm_rope_type {
    XLLM_ROPE_NORM = 0, /* rotate adjacent pairs (x[2i], x[2i+1]) */
    XLLM_ROPE_NEOX = 1, /* rotate halves (x[i], x[i + n_rot/2]) */
} xllm_rope_type;

/* A weight matrix (or stack of expert matrices): rows of ne[0] elements, ne[1] rows per
 * matrix, ne[2] matrices. Data is immutable and lives in the mapping (or the model's copy). */
typedef struct xllm_weight {
    const void *data; /* NULL when the tensor is absent */
    xllm_dtype type;
    int64_t ne[4];
    size_t row_bytes; /* bytes of one row of ne[0] elements */
    const char *name;
} xllm_weight;

typedef struct xllm_layer {
    xllm_weight attn_norm;          /* (n_embd) */
    xllm_weight wq, wk, wv, wo;     /* wq: (n_head*head_dim rows, n_embd cols) ... */
    xllm_weight bq, bk, bv;         /* qwen2 biases (optional) */
    xllm_weight q_norm, k_norm;     /* qwen3 per-head RMS norms (head_dim) */
    xllm_weight ffn_norm;           /* (n_embd) */
    xllm_weight ffn_gate, ffn_up;   /* dense: (n_ff rows, n_embd cols) */
    xllm_weight ffn_down;           /* dense: (n_embd rows, n_ff cols) */
    xllm_weight ffn_gate_inp;       /* moe router: (n_expert rows, n_embd cols) */
    xllm_weight gate_exps, up_exps; /* moe: (n_ff_exp rows, n_embd cols) x n_expert */
    xllm_weight down_exps;          /* moe: (n_embd rows, n_ff_exp cols) x n_expert */
} xllm_layer;

typedef struct xllm_hparams {
    int32_t n_vocab;
    int32_t n_ctx_train;
    int32_t n_embd;
    int32_t n_layer;
    int32_t n_head;
    int32_t n_head_kv;
    int32_t head_dim;   /* key/query head size */
    int32_t head_dim_v; /* value head size */
    int32_t n_ff;       /* dense FFN size */
    int32_t n_expert;
    int32_t n_expert_used;
    int32_t n_ff_exp; /* expert FFN size */
    int32_t n_rot;    /* rotated dims per head */
    float rope_freq_base;
    float rope_freq_scale; /* 1 / linear scaling factor */
    float norm_eps;
    xllm_rope_type rope_type;
    bool norm_topk_prob; /* moe: renormalize the chosen experts' weights */
} xllm_hparams;

struct xllm_model {
    xllm_gguf *gguf;
    void *data_copy; /* no_mmap: anonymous copy of the tensor data */
    xllm_arch arch;
    char *arch_name;
    char *name;
    xllm_hparams hp;
    xllm_weight tok_embd;    /* (n_vocab rows, n_embd cols) */
    xllm_weight output_norm; /* (n_embd) */
    xllm_weight output;      /* (n_vocab rows, n_embd cols); tok_embd when tied */
    xllm_weight rope_freqs;  /* optional (n_rot/2) frequency divisors (Llama 3.1 scaling) */
    xllm_layer *layers;
    xllm_tokenizer *tokenizer;
    uint64_t n_params;
    uint64_t n_bytes;
    /* the dense quantized matrices in the GEMM panel form (NULL: XLLM_PREPACK=0, or the CPU
     * level has none); the panels replace the dense rows of the 8-bit types when the weights
     * are an anonymous copy (xllm_mm_row reads a row wherever it lives) */
    struct xllm_mm_packs *packs;
    /* the layout asked for and the one made (lowered when memory was short), the panels'
     * bytes, what the asked layout's panels would take, the memory available at load */
    xllm_weight_layout layout_asked, layout;
    uint64_t layout_bytes, layout_wanted, layout_available;
};

#endif
