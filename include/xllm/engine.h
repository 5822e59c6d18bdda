/* xllm engine: a thread that serves many generation requests at once with iteration-level
 * continuous batching (decode first, then chunked prefill within a token budget), prefix
 * caching, priorities, and preemption of offline work by online work. Requests are submitted
 * from any thread and read as token streams. */
#ifndef XLLM_ENGINE_H
#define XLLM_ENGINE_H

#include <stdbool.h>
#include <stdint.h>

#include "xllm/xllm.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct xllm_engine xllm_engine;
typedef struct xllm_request xllm_request;

typedef struct xllm_engine_params {
    int32_t max_seqs;         /* requests running at once (KV sequence slots); 0 = 16 */
    int32_t max_batch_tokens; /* token budget of one step; 0 = 512 */
    int32_t max_queue;        /* waiting requests accepted; 0 = unlimited */
    int32_t n_ctx;            /* max tokens (prompt + output) per request; 0 = model's, max 4096 */
    int32_t n_threads;        /* compute threads; 0 = all cores */
    xllm_dtype kv_type;       /* default F16 */
    xllm_kv_layout kv_layout; /* default xtensor */
    size_t kv_memory;         /* KV pool bytes; 0 = max_seqs full contexts */
    int32_t kv_block_tokens;  /* 0 = automatic */
    bool no_prefix_cache;
    /* PD disaggregation, decode side: listen for KV transfers from prefill instances on
     * kv_host:kv_port (port 0 = any free port; see xllm_engine_kv_port). */
    bool kv_receiver;
    const char *kv_host; /* default 127.0.0.1 */
    int kv_port;
    /* PD, prefill side: queue an exported prompt's KV only after its last prefill step, all at
     * once, instead of layer by layer from inside the forward pass of every prefill chunk (the
     * behaviour before layer-wise export; kept for comparison). Default false. */
    bool pd_export_after_prefill;
} xllm_engine_params;

xllm_engine_params xllm_engine_default_params(void);

/* Starts the engine thread on a loaded model (which must outlive the engine). */
xllm_status xllm_engine_new(const xllm_model *model, const xllm_engine_params *params,
                            xllm_engine **out, char *err, size_t err_size);
/* Stops the engine: every unfinished request ends with XLLM_FINISH_ABORT. Requests must still be
 * released with xllm_request_free. */
void xllm_engine_free(xllm_engine *e);

#define XLLM_MAX_TOP_LOGPROBS 20

typedef struct xllm_request_params {
    const int32_t *prompt; /* token ids (copied) */
    int32_t n_prompt;
    int32_t max_tokens; /* tokens to generate; 0 = until the context is full */
    xllm_sampler_params sampling;
    bool ignore_eos;      /* do not stop on end-of-generation tokens */
    int32_t priority;     /* lower is served first (as vLLM); default 0 */
    bool offline;         /* offline work yields to online work and may be preempted */
    int32_t top_logprobs; /* alternatives reported per token, 0..20; -1 = no logprobs */
    int64_t ttft_slo_ms;  /* targets, recorded for schedulers and metrics (0 = none) */
    int64_t tpot_slo_ms;
    /* PD, prefill side: send the prompt's KV as transfer pd_export_id to the receiver at
     * pd_export_to ("host:port"): the transfer starts when the first prefill chunk is scheduled
     * (cached prefix rows go at once), each chunk's rows of a layer are sent as soon as the
     * forward pass has computed that layer; after the last chunk emit the first token and
     * finish. A failed or cancelled request aborts the transfer. */
    uint64_t pd_export_id;
    const char *pd_export_to; /* copied */
    /* PD, decode side: do not compute the prompt; wait for transfer pd_import_id (whose tokens
     * must equal the prompt), import its KV, emit its first token, and continue decoding. */
    uint64_t pd_import_id;
    /* Called from the engine thread once per step in which the stream changed (new tokens or
     * the end); may be NULL. Must not block or call back into the engine. */
    void (*notify)(void *user);
    void *notify_user;
} xllm_request_params;

xllm_request_params xllm_request_default_params(void);

/* Queues a request. XLLM_ERR_BUSY when the waiting queue is full, XLLM_ERR_INVALID_ARG when the
 * prompt is empty, holds an id outside the vocabulary, or prompt + max_tokens exceeds the
 * context (err says which). Thread-safe. */
xllm_status xllm_engine_submit(xllm_engine *e, const xllm_request_params *params,
                               xllm_request **out, char *err, size_t err_size);

typedef enum xllm_finish_reason {
    XLLM_FINISH_NONE = 0,   /* still running */
    XLLM_FINISH_STOP = 1,   /* an end-of-generation token (not part of the output) */
    XLLM_FINISH_LENGTH = 2, /* max_tokens or the context */
    XLLM_FINISH_CANCEL = 3, /* xllm_request_cancel */
    XLLM_FINISH_ABORT = 4,  /* the engine stopped */
} xllm_finish_reason;

typedef struct xllm_token_event {
    int32_t token;
    float logprob; /* of the chosen token under the model's distribution (when asked) */
    int32_t n_top;
    int32_t top_ids[XLLM_MAX_TOP_LOGPROBS];
    float top_logprobs[XLLM_MAX_TOP_LOGPROBS];
} xllm_token_event;

/* Reads the next generated token. Returns 1 with *ev filled, 0 when none arrived within
 * timeout_ms (-1 waits without limit), -1 when the stream has ended (see
 * xllm_request_finish_reason). One consumer thread per request. */
int xllm_request_next(xllm_request *r, xllm_token_event *ev, int timeout_ms);
xllm_finish_reason xllm_request_finish_reason(xllm_request *r);

/* Asks the engine to stop the request; its KV is freed at the next step. Any thread. */
void xllm_request_cancel(xllm_request *r);
/* Releases the caller's handle (cancels the request if it is still running). */
void xllm_request_free(xllm_request *r);

typedef struct xllm_request_stats {
    int32_t n_prompt;
    int32_t n_cached; /* prompt tokens served from the prefix cache (first admission) */
    int32_t n_generated;
    int32_t n_preempted;     /* times this request was preempted and recomputed */
    double t_queue_ms;       /* submit -> first admitted */
    double t_first_ms;       /* submit -> first token (TTFT) */
    double t_total_ms;       /* submit -> finished (0 while running) */
    int32_t n_prefill_steps; /* steps that computed a chunk of the prompt */
    double t_prefill_ms;     /* submit -> end of the forward pass of the prompt's last chunk
                                (first time; 0 while running or when it was not computed here) */
    /* PD export (prefill side) */
    int32_t kv_sends_forward; /* (layer, position range) copies queued from inside a forward pass */
    int32_t kv_sends_between; /* copies queued between steps: cached prefix rows, or all of them
                                 with pd_export_after_prefill */
    int32_t kv_first_send_after; /* prefill steps already finished when the first rows were
                                    queued (0: during or before the first); -1 before any */
    double kv_copy_ms;           /* engine-thread time spent copying rows into frames */
} xllm_request_stats;
void xllm_request_get_stats(xllm_request *r, xllm_request_stats *st);

#define XLLM_HIST_BUCKETS 16
typedef struct xllm_histogram {
    double bounds[XLLM_HIST_BUCKETS];       /* upper bounds (seconds), increasing */
    uint64_t counts[XLLM_HIST_BUCKETS + 1]; /* per bucket; the last is +Inf */
    double sum;
    uint64_t n;
} xllm_histogram;

typedef struct xllm_engine_stats {
    int32_t running;
    int32_t waiting;
    uint64_t requests_finished;
    uint64_t prompt_tokens; /* prompt tokens of admitted requests */
    uint64_t cached_tokens; /* of which served from the prefix cache */
    uint64_t generated_tokens;
    uint64_t preemptions;
    uint64_t steps;
    uint64_t kv_exports;       /* PD: prompts whose KV was sent to a decode instance */
    uint64_t kv_imports;       /* PD: requests started from a received KV transfer */
    uint64_t kv_import_tokens; /* prompt positions received instead of computed */
    uint64_t kv_export_aborts; /* PD: transfers started and then aborted (failure, cancel) */
    size_t kv_rx_staged_bytes; /* PD decode side: receiver staging in use (0 without receiver) */
    uint64_t kv_rx_failed;     /* PD decode side: incoming transfers aborted, dropped or
                                  cancelled */
    xllm_histogram ttft, tpot, e2e;
    xllm_histogram itl; /* inter-token latency: each token after a request's first, as it is
                           emitted (TPOT is per finished request) */
    xllm_kv_stats kv;
    double kv_usage; /* used pages / pages */
} xllm_engine_stats;
void xllm_engine_get_stats(xllm_engine *e, xllm_engine_stats *st);

/* The port of the KV receiver (0 when kv_receiver is off). */
int xllm_engine_kv_port(const xllm_engine *e);

/* The context length per request. */
int32_t xllm_engine_n_ctx(const xllm_engine *e);

/* The prefix-cache events of the engine's KV after cursor `since` (see xllm_context_kv_events:
 * at most max events, or a reset with the whole set of cached blocks). Any thread, while the
 * engine runs; the engine thread only appends to the ring. Release out with
 * xllm_kv_events_free. */
xllm_status xllm_engine_kv_events(xllm_engine *e, uint64_t since, int32_t max, xllm_kv_events *out);
/* Tokens per KV block: the granularity of the prefix cache and of its event hashes. */
int32_t xllm_engine_kv_block_tokens(const xllm_engine *e);

#ifdef __cplusplus
}
#endif

#endif
