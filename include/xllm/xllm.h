/* xllm public C API: load a model, evaluate batches of tokens from many sequences,
 * tokenize and sample. Embeddable: no globals, no exit(), every call reports a status. */
#ifndef XLLM_XLLM_H
#define XLLM_XLLM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------------------------------ */
/* Status codes                                                                                */
/* ------------------------------------------------------------------------------------------ */

typedef enum xllm_status {
    XLLM_OK = 0,
    XLLM_ERR_INVALID_ARG = -1, /* a caller passed something the function does not accept */
    XLLM_ERR_IO = -2,          /* open/read/mmap failed */
    XLLM_ERR_FORMAT = -3,      /* a file is corrupt or truncated */
    XLLM_ERR_UNSUPPORTED = -4, /* valid, but not supported (architecture, tensor type) */
    XLLM_ERR_NOMEM = -5,       /* a large allocation failed */
    XLLM_ERR_KV_FULL = -6,     /* a sequence or the KV memory has no room for the batch */
    XLLM_ERR_INTERNAL = -7,
    XLLM_ERR_BUSY = -8, /* a queue is full: try again later */
} xllm_status;

/* A static, human-readable string for a status. Never NULL. */
const char *xllm_status_str(xllm_status st);

/* ------------------------------------------------------------------------------------------ */
/* Tensor types: values are GGUF's (ggml_type), so they are a file format: append-only.       */
/* ------------------------------------------------------------------------------------------ */

typedef enum xllm_dtype {
    XLLM_DTYPE_F32 = 0,
    XLLM_DTYPE_F16 = 1,
    XLLM_DTYPE_Q4_0 = 2,
    XLLM_DTYPE_Q4_1 = 3,
    XLLM_DTYPE_Q5_0 = 6,
    XLLM_DTYPE_Q5_1 = 7,
    XLLM_DTYPE_Q8_0 = 8,
    XLLM_DTYPE_Q8_1 = 9,
    XLLM_DTYPE_Q2_K = 10,
    XLLM_DTYPE_Q3_K = 11,
    XLLM_DTYPE_Q4_K = 12,
    XLLM_DTYPE_Q5_K = 13,
    XLLM_DTYPE_Q6_K = 14,
    XLLM_DTYPE_Q8_K = 15,
    XLLM_DTYPE_BF16 = 30,
    XLLM_DTYPE_COUNT = 40, /* upper bound of the id space known to GGUF files today */
} xllm_dtype;

/* Name of a type ("f32", "q4_K", ...), or NULL for an id xllm does not know. */
const char *xllm_dtype_name(xllm_dtype t);

/* ------------------------------------------------------------------------------------------ */
/* Model: immutable weights and hyperparameters, shared by every context.                     */
/* ------------------------------------------------------------------------------------------ */

typedef struct xllm_model xllm_model;
typedef struct xllm_tokenizer xllm_tokenizer;

typedef struct xllm_model_params {
    /* Called during load with a fraction in [0,1]; NULL = silent. Called on the loading thread. */
    void (*progress)(float fraction, void *user);
    void *progress_user;
    /* Copy weights into anonymous memory instead of using the read-only file mapping. Default
     * false (weights stay mmapped; pages are shared with the page cache). */
    bool no_mmap;
    /* Do not keep panels wider than the dense rows: sub-8-bit matrices (Q4_K, Q6_K, ...) then
     * keep only their decode panels (about their dense size), which prompts read too, instead
     * of 8-bit panels as well (twice their dense size saved; prompts 0-15% slower). 8-bit
     * matrices (Q8_0) always live in the panel form, which every batch size reads. With no_mmap
     * the dense rows of both are released, so the model takes about its file size in memory.
     * Default false. */
    bool low_memory;
} xllm_model_params;

xllm_model_params xllm_model_default_params(void);

/* Loads a GGUF model. On failure returns NULL status via *out == NULL and writes one line
 * naming the problem into err (may be NULL). The model is immutable and thread-safe to share
 * once loaded. Free with xllm_model_free. */
xllm_status xllm_model_load(const char *path, const xllm_model_params *params, xllm_model **out,
                            char *err, size_t err_size);
void xllm_model_free(xllm_model *model); /* accepts NULL */

/* Hyperparameters. */
const char *xllm_model_arch(const xllm_model *model); /* "llama", "qwen2", "qwen3", "qwen3moe" */
const char *xllm_model_name(const xllm_model *model); /* general.name or "" */
int32_t xllm_model_n_vocab(const xllm_model *model);
int32_t xllm_model_n_ctx_train(const xllm_model *model);
int32_t xllm_model_n_embd(const xllm_model *model);
int32_t xllm_model_n_layer(const xllm_model *model);
int32_t xllm_model_n_head(const xllm_model *model);
int32_t xllm_model_n_head_kv(const xllm_model *model);
int32_t xllm_model_head_dim(const xllm_model *model);
int32_t xllm_model_n_ff(const xllm_model *model);
int32_t xllm_model_n_expert(const xllm_model *model);      /* 0 for dense models */
int32_t xllm_model_n_expert_used(const xllm_model *model); /* 0 for dense models */
float xllm_model_rope_freq_base(const xllm_model *model);
float xllm_model_norm_eps(const xllm_model *model);
uint64_t xllm_model_n_params(const xllm_model *model);
uint64_t xllm_model_size_bytes(const xllm_model *model); /* bytes of tensor data */

/* How the weights are laid out for the kernels. PANELS (the default): matrices in panels made
 * at load (8-bit types in place of their rows; sub-8-bit types in 8-bit panels for prompts and
 * decode panels in their own bits: ~2.9x their file size); LOW_MEMORY (params.low_memory):
 * sub-8-bit matrices in decode panels only (~1x); DENSE: the file's rows alone (XLLM_PREPACK=0,
 * or a level without panels). The loader lowers the layout asked for when its panels would
 * leave less than an eighth of the available memory free (MemAvailable at load, or
 * XLLM_MEM_AVAILABLE=BYTES from the environment): a model loads wherever its file fits. */
typedef enum xllm_weight_layout {
    XLLM_LAYOUT_PANELS,
    XLLM_LAYOUT_LOW_MEMORY,
    XLLM_LAYOUT_DENSE
} xllm_weight_layout;

typedef struct xllm_model_layout_info {
    xllm_weight_layout layout, asked; /* layout != asked: lowered for lack of memory */
    uint64_t panel_bytes;             /* bytes of the panels made */
    uint64_t wanted_bytes;            /* bytes the asked layout's panels would have taken */
    uint64_t available_bytes;         /* memory available at load (0: unknown) */
} xllm_model_layout_info;
void xllm_model_layout(const xllm_model *model, xllm_model_layout_info *out);

/* Tensors, in file order. The name pointer lives as long as the model. */
typedef struct xllm_tensor_info {
    const char *name;
    xllm_dtype type;
    int32_t n_dims;
    int64_t ne[4]; /* ne[0] is the contiguous (row) dimension, as in GGUF */
    uint64_t n_bytes;
} xllm_tensor_info;
int64_t xllm_model_n_tensors(const xllm_model *model);
xllm_status xllm_model_tensor(const xllm_model *model, int64_t i, xllm_tensor_info *info);

/* Metadata, in file order. xllm_model_meta_value renders the value as text into buf (arrays
 * are shown as "[n items: a, b, ...]", truncated); returns the length it needed, or -1. */
int64_t xllm_model_meta_count(const xllm_model *model);
const char *xllm_model_meta_key(const xllm_model *model, int64_t i);
int xllm_model_meta_value(const xllm_model *model, int64_t i, char *buf, size_t buf_size);
/* Value of a string key, or NULL when absent / not a string. Valid as long as the model. */
const char *xllm_model_meta_str(const xllm_model *model, const char *key);

/* The model's chat template (tokenizer.chat_template) or NULL. */
const char *xllm_model_chat_template(const xllm_model *model);

/* ------------------------------------------------------------------------------------------ */
/* Tokenizer: owned by the model (valid as long as it), or loaded standalone.                 */
/* ------------------------------------------------------------------------------------------ */

const xllm_tokenizer *xllm_model_tokenizer(const xllm_model *model);

/* Loads a standalone tokenizer from a GGUF file (its tokenizer.ggml.* keys) or from a Hugging
 * Face model directory (tokenizer.json, or vocab.json + merges.txt; tokenizer_config.json for
 * BOS/EOS; a path to a .json file in such a directory means the directory). On failure *out is
 * NULL and err holds one line naming the problem. The caller owns the tokenizer: free it with
 * xllm_tokenizer_free. Immutable once loaded: every function below may be called from several
 * threads at once. */
xllm_status xllm_tokenizer_load(const char *path, xllm_tokenizer **out, char *err, size_t err_size);
/* Frees a tokenizer from xllm_tokenizer_load (accepts NULL). Never pass a model's tokenizer. */
void xllm_tokenizer_free(xllm_tokenizer *tok);

int32_t xllm_tokenizer_n_vocab(const xllm_tokenizer *tok);
int32_t xllm_token_bos(const xllm_tokenizer *tok); /* -1 when the vocab has none */
int32_t xllm_token_eos(const xllm_tokenizer *tok);
bool xllm_token_is_eog(const xllm_tokenizer *tok, int32_t id); /* end of generation */
bool xllm_tokenizer_add_bos(const xllm_tokenizer *tok);        /* does the vocab want BOS? */
const char *xllm_tokenizer_type(const xllm_tokenizer *tok);    /* "llama" (SPM), "gpt2" */
/* The pre-tokenizer: GGUF's tokenizer.ggml.pre ("qwen2", "llama-bpe", ...), "hf" for one read
 * from tokenizer.json, "spm" for SentencePiece. */
const char *xllm_tokenizer_pre(const xllm_tokenizer *tok);
/* SentencePiece: tokenizing prepends a space (U+2581), so a detokenized text that starts at
 * the beginning of a sequence drops the first piece's leading space. */
bool xllm_tokenizer_add_space_prefix(const xllm_tokenizer *tok);

/* Tokenizes text (len bytes, need not be NUL-terminated). add_special: add BOS (and EOS) as the
 * vocab asks; parse_special: recognise special-token text such as "<s>". Writes at most max ids
 * (ids may be NULL with max 0 to ask for the size); returns the number of ids, minus the number
 * needed when max is too small, or INT32_MIN on invalid arguments. Thread-safe. */
int32_t xllm_tokenize(const xllm_tokenizer *tok, const char *text, size_t len, int32_t *ids,
                      int32_t max, bool add_special, bool parse_special);

/* The bytes of one token as they appear in text (SPM's U+2581 becomes a space, byte tokens
 * <0xNN> become the byte). Control tokens give "" unless special is true. Returns the number of
 * bytes written, minus the size needed when buf is too small, or INT32_MIN for an id out of
 * range. A piece may end inside a UTF-8 character: a streaming caller holds back incomplete
 * characters. */
int32_t xllm_token_to_piece(const xllm_tokenizer *tok, int32_t id, char *buf, int32_t buf_size,
                            bool special);

/* ------------------------------------------------------------------------------------------ */
/* Context: per-sequence KV state and workspaces for evaluating batches.                      */
/* Owned and used by one thread at a time (the engine thread).                                */
/* ------------------------------------------------------------------------------------------ */

typedef struct xllm_context xllm_context;

/* How a context lays out its KV memory. */
typedef enum xllm_kv_layout {
    XLLM_KV_LAYOUT_XTENSOR = 0, /* per-sequence contiguous virtual regions over a page pool */
    XLLM_KV_LAYOUT_PAGED = 1,   /* classic block table (baseline); attention reads per block */
} xllm_kv_layout;

typedef struct xllm_context_params {
    int32_t n_ctx;      /* max tokens per sequence; 0 = the model's training context (max 4096) */
    int32_t n_seq_max;  /* number of sequence slots (ids 0..n_seq_max-1); 0 = 1 */
    int32_t n_batch;    /* max tokens in one xllm_decode call; 0 = 512 */
    int32_t n_threads;  /* compute threads; 0 = number of CPU cores */
    xllm_dtype kv_type; /* XLLM_DTYPE_F32 or XLLM_DTYPE_F16 (default F16) */
    xllm_kv_layout kv_layout; /* default XLLM_KV_LAYOUT_XTENSOR */
    size_t kv_memory;         /* KV page pool bytes; 0 = room for n_seq_max full contexts */
    int32_t kv_block_tokens;  /* tokens per KV page / prefix-cache block; 0 = automatic */
    bool no_prefix_cache;     /* do not keep full blocks for reuse (default false: keep them) */
} xllm_context_params;

xllm_context_params xllm_context_default_params(void);

xllm_status xllm_context_new(const xllm_model *model, const xllm_context_params *params,
                             xllm_context **out, char *err, size_t err_size);
void xllm_context_free(xllm_context *ctx); /* accepts NULL */
int32_t xllm_context_n_ctx(const xllm_context *ctx);
int32_t xllm_context_n_seq_max(const xllm_context *ctx);

/* One batch of tokens from one or more sequences. Row i appends token[i] at position pos[i]
 * of sequence seq_id[i]. Within a sequence, positions must continue exactly where its KV state
 * ends (xllm_seq_len) and increase by one per row, in row order; rows of different sequences may
 * interleave. logits[i] != 0 asks for the logits of row i; logits == NULL asks for the last
 * row of each sequence in the batch. */
typedef struct xllm_batch {
    int32_t n_tokens;
    const int32_t *token;
    const int32_t *pos;
    const int32_t *seq_id;
    const int8_t *logits;
} xllm_batch;

/* Evaluates the batch: appends every row to its sequence's KV state and computes the requested
 * logits. On error nothing is appended; XLLM_ERR_KV_FULL when a sequence reaches n_ctx or the
 * KV memory has no page left (xllm_context_last_error says which). */
xllm_status xllm_decode(xllm_context *ctx, const xllm_batch *batch);
/* Details of the last KV failure of xllm_decode ("" when none). */
const char *xllm_context_last_error(const xllm_context *ctx);

/* Logits (n_vocab floats) of row i of the last batch, or NULL when row i did not ask for them.
 * Valid until the next xllm_decode on this context. */
const float *xllm_get_logits(const xllm_context *ctx, int32_t i);

/* KV memory accounting of a context. */
typedef struct xllm_kv_stats {
    int64_t n_pages;      /* pages in the pool */
    int64_t free_pages;   /* never used or released */
    int64_t used_pages;   /* mapped by at least one sequence */
    int64_t cached_pages; /* idle pages holding a cached block (evictable) */
    size_t page_bytes;    /* one page: block_tokens rows of K and V for every layer */
    int32_t block_tokens;
    int64_t mappings;             /* memory mappings held now (xtensor) */
    int64_t max_mappings;         /* the budget for them (below vm.max_map_count) */
    uint64_t prefix_hit_tokens;   /* positions served from the prefix cache */
    uint64_t prefix_query_tokens; /* positions looked up */
    uint64_t evictions;
    uint64_t sync_maps; /* pages the engine thread had to map itself (pre-mapper behind) */
    uint64_t bg_maps;   /* pages mapped ahead by the background thread */
} xllm_kv_stats;
void xllm_context_kv_stats(xllm_context *ctx, xllm_kv_stats *st);
/* Rows evaluated by xllm_decode on this context since it was created. */
uint64_t xllm_context_tokens_evaluated(const xllm_context *ctx);

/* Prefix-cache events. The prefix cache keys each full block of B tokens (B =
 * xllm_context_kv_block_tokens) by a chained hash, scheme "xxh3-chain-v1":
 *   h_b = XXH3_64bits_withSeed(token ids of block b as int32 in host order (little-endian on
 *         every supported host), B * 4 bytes, seed h_{b-1}),   h_{-1} = XLLM_KV_HASH_ROOT,
 * so a block's hash names the whole prefix up to its end. Every block that enters the cache
 * (STORED) or leaves it (EVICTED: its page was taken for new work, or a truncation rewrites it)
 * is appended to a bounded ring (65536 events) under consecutive sequence numbers; readers follow
 * it with a cursor. */
#define XLLM_KV_HASH_ROOT 0x786c6c6d6b763031ull /* "xllmkv01" */

typedef enum xllm_kv_event_kind {
    XLLM_KV_EVENT_STORED = 0,
    XLLM_KV_EVENT_EVICTED = 1,
} xllm_kv_event_kind;

typedef struct xllm_kv_event {
    uint64_t seq;  /* the event's number (a cursor); consecutive within a ring */
    uint64_t hash; /* the block's chained hash */
    xllm_kv_event_kind kind;
} xllm_kv_event;

typedef struct xllm_kv_events {
    uint64_t next;     /* cursor for the next read: the last event returned, or the snapshot's */
    bool reset;        /* the cursor asked for is not in the ring (0, overwritten, ahead, or another
                          ring's): ev is the whole set of cached blocks at `next`, one STORED entry
                          each (seq = next, no order), and replaces whatever the reader held */
    bool more;         /* events after `next` exist already (the read stopped at max) */
    int32_t n;         /* entries in ev */
    xllm_kv_event *ev; /* malloc'd by the read; release with xllm_kv_events_free */
} xllm_kv_events;

/* Reads the prefix-cache events after cursor `since` (at most max > 0; a reset returns the
 * whole set however large: at most one entry per KV page). Unlike the rest of the context, may
 * be called from any thread while the owner thread works. Cursors are numbers below 2^53;
 * 0 always gets a reset. */
xllm_status xllm_context_kv_events(xllm_context *ctx, uint64_t since, int32_t max,
                                   xllm_kv_events *out);
void xllm_kv_events_free(xllm_kv_events *ev); /* frees ev->ev; accepts NULL */
/* Reduces a read to its net change: only the last event of each block stays (in order; next and
 * the seq of what stays are unchanged). Applied in any order (evicted, then stored, say), the
 * result takes a reader's set to the same state as the events one by one: a block stored and
 * evicted within the read is evicted (the reader may not have it), one evicted and stored again
 * is stored (the reader may have it already). No effect on a reset. */
void xllm_kv_events_net(xllm_kv_events *ev);
/* One link of the chain: the hash of block_tokens ids given the previous block's hash (or
 * XLLM_KV_HASH_ROOT for the first). */
uint64_t xllm_kv_block_hash(const int32_t *tokens, int32_t block_tokens, uint64_t parent);
/* Tokens per KV page / prefix-cache block. */
int32_t xllm_context_kv_block_tokens(const xllm_context *ctx);

/* Prefix caching: maps the cached KV blocks that match the start of tokens[0..n) into the empty
 * sequence seq_id and returns how many positions they cover (always < n; 0 when none). The
 * caller then decodes tokens from that position on. */
int32_t xllm_seq_reuse_prefix(xllm_context *ctx, int32_t seq_id, const int32_t *tokens, int32_t n);

/* Number of positions stored for a sequence. */
int32_t xllm_seq_len(const xllm_context *ctx, int32_t seq_id);
/* Drops positions >= p0 of a sequence (p0 = 0 clears it and returns all its KV pages). */
xllm_status xllm_seq_truncate(xllm_context *ctx, int32_t seq_id, int32_t p0);

/* ------------------------------------------------------------------------------------------ */
/* Sampling                                                                                    */
/* ------------------------------------------------------------------------------------------ */

typedef struct xllm_sampler xllm_sampler;

typedef struct xllm_sampler_params {
    float temperature;       /* 0 = greedy (argmax); default 0.8 */
    int32_t top_k;           /* 0 = off; default 40 */
    float top_p;             /* 1 = off; default 0.95 */
    float min_p;             /* 0 = off; default 0.05 */
    float repeat_penalty;    /* 1 = off; default 1 */
    int32_t penalty_last_n;  /* how many recent tokens the penalties see; 0 = none, -1 = all;
                                default 64 */
    float frequency_penalty; /* 0 = off (OpenAI semantics); default 0 */
    float presence_penalty;  /* 0 = off; default 0 */
    uint64_t seed;           /* same seed, same logits => same tokens; default 0xFFFFFFFF */
} xllm_sampler_params;

xllm_sampler_params xllm_sampler_default_params(void);

/* A sampler keeps its RNG state and the history the penalties see. One thread at a time. */
xllm_sampler *xllm_sampler_new(const xllm_sampler_params *params, int32_t n_vocab);
void xllm_sampler_free(xllm_sampler *s); /* accepts NULL */
/* Picks a token from n_vocab logits (not modified). Does not add it to the history. */
int32_t xllm_sampler_sample(xllm_sampler *s, const float *logits);
/* Adds a token (prompt or generated) to the history the penalties see. */
void xllm_sampler_accept(xllm_sampler *s, int32_t token);
void xllm_sampler_reset(xllm_sampler *s);

/* Library version string. */
const char *xllm_version(void);

#ifdef __cplusplus
}
#endif

#endif /* XLLM_XLLM_H */
