/* The engine thread: takes submitted requests, and every step fills a token budget with one
 * decode token per running request, then prefill chunks; admits waiting requests by class
 * (online before offline, then priority, then arrival), reusing cached prefixes; preempts the
 * lowest-class running request (its KV is freed and its tokens recomputed later) when slots or
 * KV pages run short; samples, and appends tokens to each request's stream once per step. */
#include "xllm/engine.h"

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>
#include <time.h>

#include "engine/engine-impl.h"
#include "transfer/transfer.h"
#include "util/common.h"

/* ---------------------------------------------------------------------------------------- */
/* Structures                                                                                */
/* ---------------------------------------------------------------------------------------- */

/* Seconds a received KV transfer waits for its decode request before it is dropped. */
#define XFER_UNCLAIMED_S 60.0

typedef enum req_state { REQ_WAITING, REQ_RUNNING, REQ_DONE } req_state;

struct xllm_request {
    xllm_engine *e;
    xllm_request_params p; /* p.prompt is not kept */
    atomic_int refs;       /* the caller's handle and the engine's */
    atomic_bool cancelled;

    /* engine thread only */
    int32_t *tokens; /* prompt, then generated tokens: n_tokens of cap */
    int32_t n_tokens;
    int32_t n_prompt;
    int32_t cap;       /* n_ctx */
    int32_t max_total; /* n_prompt + max_tokens, capped by the context */
    req_state state;
    int32_t slot;       /* KV sequence while running */
    int32_t n_computed; /* positions in the KV */
    int32_t n_generated;
    uint64_t arrival;
    xllm_sampler *sampler;
    bool changed; /* stream changed this step */
    bool admitted_once;
    char pd_to[128];           /* copy of p.pd_export_to */
    xllm_kv_transfer *pd_xfer; /* decode side: the received transfer, until imported */
    /* prefill side (pd_export_id): the transfer runs from the first prefill chunk to SEQ_END */
    xllm_kv_sender *pd_s; /* its connection while it is open (begun, not ended or aborted) */
    int32_t pd_sent;      /* prompt positions whose rows are queued, in every layer */
    xllm_status pd_err;   /* a send from inside the forward pass failed */
    /* counters, published in st once per prefill step */
    int32_t n_prefill_steps, pd_sends_fwd, pd_sends_between, pd_first_send_after;
    double pd_copy_s, t_prefilled;

    /* stream, shared with the consumer under mu */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    xllm_token_event *events;
    int32_t n_events, ev_cap, ev_read;
    xllm_finish_reason finish;
    xllm_request_stats st;
    double t_submit, t_admit, t_first, t_last, t_end; /* t_last: the previous token */
};

struct xllm_engine {
    const xllm_model *model;
    xllm_context *ctx;
    xllm_engine_params p;
    int32_t n_vocab;
    pthread_t thread;
    bool thread_on;

    pthread_mutex_t mu; /* inbox, queue count, stop, stats */
    pthread_cond_t cv;
    bool stop;
    xllm_request **inbox;
    int32_t n_inbox, inbox_cap;
    int32_t n_queued; /* inbox + waiting: for max_queue */
    xllm_engine_stats stats;

    /* engine thread only */
    xllm_request **waiting;
    int32_t n_waiting, waiting_cap;
    xllm_request **running; /* [max_seqs], NULL = free slot */
    int32_t n_running;
    uint64_t arrivals;
    int32_t *b_tok, *b_pos, *b_seq; /* [max_batch_tokens] */
    int8_t *b_logits;
    xllm_request **b_req; /* row -> request whose chunk ends at that row (else NULL) */
    int32_t *chunk;       /* [max_seqs] rows given to each slot this step */
    int64_t *chunk_pages; /* [max_seqs] KV pages those rows take */
    float *probs;         /* [n_vocab] */
    /* PD */
    xllm_kv_receiver *receiver; /* decode side (NULL when off) */
    xllm_kv_transfer **xfers;   /* received, not yet claimed by a request */
    double *xfer_time;          /* when each arrived (unclaimed ones expire) */
    int32_t n_xfers, xfers_cap;
    struct {
        char to[128];
        xllm_kv_sender *s;
        int32_t open; /* transfers begun on it and not yet ended or aborted */
    } senders[16];    /* prefill side: one connection per decode instance */
    int32_t n_senders;
    struct {
        xllm_kv_sender *s;
        uint64_t id;
    } sent[256]; /* ended transfers whose answer is still to be collected */
    int32_t n_sent;
    struct pd_range {
        xllm_request *r;
        int32_t pos0, m; /* prompt positions of r computed in this step and not yet sent */
        int32_t layers;  /* layers of them queued so far */
    } * pd_ranges;       /* [max_seqs] the rows the forward pass of this step sends */
    int32_t n_pd_ranges;
};

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ---------------------------------------------------------------------------------------- */
/* Parameters                                                                                */
/* ---------------------------------------------------------------------------------------- */

xllm_engine_params xllm_engine_default_params(void) {
    xllm_engine_params p = {0};
    p.kv_type = XLLM_DTYPE_F16;
    p.kv_layout = XLLM_KV_LAYOUT_XTENSOR;
    return p;
}

xllm_request_params xllm_request_default_params(void) {
    xllm_request_params p = {0};
    p.sampling = xllm_sampler_default_params();
    p.top_logprobs = -1;
    return p;
}

static void hist_init(xllm_histogram *h, double first, double factor) {
    memset(h, 0, sizeof(*h));
    double b = first;
    for (int i = 0; i < XLLM_HIST_BUCKETS; i++, b *= factor) h->bounds[i] = b;
}

static void hist_add(xllm_histogram *h, double v) {
    int i = 0;
    while (i < XLLM_HIST_BUCKETS && v > h->bounds[i]) i++;
    h->counts[i]++;
    h->sum += v;
    h->n++;
}

/* ---------------------------------------------------------------------------------------- */
/* Requests: lifecycle                                                                       */
/* ---------------------------------------------------------------------------------------- */

static void request_unref(xllm_request *r) {
    if (atomic_fetch_sub(&r->refs, 1) != 1) return;
    xllm_sampler_free(r->sampler);
    xllm_kv_transfer_free(r->pd_xfer);
    free(r->tokens);
    free(r->events);
    pthread_mutex_destroy(&r->mu);
    pthread_cond_destroy(&r->cv);
    free(r);
}

static void pd_abort(xllm_engine *e, xllm_request *r, const char *why);

/* Ends a request (engine thread): aborts its open KV transfer, frees its KV and slot, publishes
 * the end, drops the engine's reference. */
static void request_finish(xllm_engine *e, xllm_request *r, xllm_finish_reason why) {
    if (r->pd_s) pd_abort(e, r, why == XLLM_FINISH_CANCEL ? "request cancelled" : "prefill failed");
    if (r->state == REQ_RUNNING) {
        xllm_seq_truncate(e->ctx, r->slot, 0);
        e->running[r->slot] = NULL;
        e->n_running--;
    }
    r->state = REQ_DONE;
    double t = now_s();
    pthread_mutex_lock(&r->mu);
    r->finish = why;
    r->t_end = t;
    r->st.t_total_ms = (t - r->t_submit) * 1e3;
    pthread_cond_broadcast(&r->cv);
    pthread_mutex_unlock(&r->mu);
    if (r->p.notify) r->p.notify(r->p.notify_user);
    pthread_mutex_lock(&e->mu);
    e->stats.requests_finished++;
    if (why == XLLM_FINISH_STOP || why == XLLM_FINISH_LENGTH) {
        hist_add(&e->stats.e2e, t - r->t_submit);
        if (r->n_generated > 1 && r->t_first > 0)
            hist_add(&e->stats.tpot, (t - r->t_first) / (double)(r->n_generated - 1));
    }
    pthread_mutex_unlock(&e->mu);
    request_unref(r);
}

/* Appends a token event (engine thread). */
static void request_push(xllm_request *r, const xllm_token_event *ev) {
    pthread_mutex_lock(&r->mu);
    if (r->n_events == r->ev_cap) {
        r->ev_cap = r->ev_cap ? r->ev_cap * 2 : 16;
        r->events = xllm_xrealloc(r->events, (size_t)r->ev_cap * sizeof(xllm_token_event));
    }
    r->events[r->n_events++] = *ev;
    r->st.n_generated = r->n_generated;
    pthread_mutex_unlock(&r->mu);
    r->changed = true;
}

int xllm_request_next(xllm_request *r, xllm_token_event *ev, int timeout_ms) {
    pthread_mutex_lock(&r->mu);
    struct timespec dl;
    if (timeout_ms > 0) {
        clock_gettime(CLOCK_REALTIME, &dl);
        dl.tv_sec += timeout_ms / 1000;
        dl.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
        if (dl.tv_nsec >= 1000000000L) {
            dl.tv_sec++;
            dl.tv_nsec -= 1000000000L;
        }
    }
    int rc;
    for (;;) {
        if (r->ev_read < r->n_events) {
            *ev = r->events[r->ev_read++];
            rc = 1;
            break;
        }
        if (r->finish != XLLM_FINISH_NONE) {
            rc = -1;
            break;
        }
        if (timeout_ms == 0) {
            rc = 0;
            break;
        }
        if (timeout_ms < 0) {
            pthread_cond_wait(&r->cv, &r->mu);
        } else if (pthread_cond_timedwait(&r->cv, &r->mu, &dl) != 0) {
            rc = r->ev_read < r->n_events ? 1 : (r->finish != XLLM_FINISH_NONE ? -1 : 0);
            if (rc == 1) *ev = r->events[r->ev_read++];
            break;
        }
    }
    pthread_mutex_unlock(&r->mu);
    return rc;
}

xllm_finish_reason xllm_request_finish_reason(xllm_request *r) {
    pthread_mutex_lock(&r->mu);
    xllm_finish_reason f = r->finish;
    pthread_mutex_unlock(&r->mu);
    return f;
}

/* Wakes the engine for a cancellation, unless the request has ended (then the engine may be
 * gone: requests outlive it). */
static void wake_engine(xllm_request *r) {
    pthread_mutex_lock(&r->mu);
    bool done = r->finish != XLLM_FINISH_NONE;
    if (!done) {
        /* the engine cannot end this request while we hold r->mu, so e is alive */
        xllm_engine *e = r->e;
        pthread_mutex_lock(&e->mu);
        pthread_cond_signal(&e->cv);
        pthread_mutex_unlock(&e->mu);
    }
    pthread_mutex_unlock(&r->mu);
}

void xllm_request_cancel(xllm_request *r) {
    atomic_store(&r->cancelled, true);
    wake_engine(r);
}

void xllm_request_free(xllm_request *r) {
    if (!r) return;
    atomic_store(&r->cancelled, true);
    wake_engine(r);
    request_unref(r);
}

void xllm_request_get_stats(xllm_request *r, xllm_request_stats *st) {
    pthread_mutex_lock(&r->mu);
    *st = r->st;
    pthread_mutex_unlock(&r->mu);
}

xllm_status xllm_engine_submit(xllm_engine *e, const xllm_request_params *params,
                               xllm_request **out, char *err, size_t err_size) {
    *out = NULL;
    const int32_t n_ctx = xllm_context_n_ctx(e->ctx);
    if (!params || !params->prompt || params->n_prompt <= 0) {
        xllm_set_err(err, err_size, "the prompt is empty");
        return XLLM_ERR_INVALID_ARG;
    }
    if (params->max_tokens < 0) {
        xllm_set_err(err, err_size, "max_tokens must not be negative");
        return XLLM_ERR_INVALID_ARG;
    }
    if (params->top_logprobs > XLLM_MAX_TOP_LOGPROBS) {
        xllm_set_err(err, err_size, "top_logprobs must be at most %d", XLLM_MAX_TOP_LOGPROBS);
        return XLLM_ERR_INVALID_ARG;
    }
    for (int32_t i = 0; i < params->n_prompt; i++) {
        if (params->prompt[i] < 0 || params->prompt[i] >= e->n_vocab) {
            xllm_set_err(err, err_size, "prompt token %d (at %d) is outside the vocabulary",
                         params->prompt[i], i);
            return XLLM_ERR_INVALID_ARG;
        }
    }
    if ((int64_t)params->n_prompt + (params->max_tokens ? params->max_tokens : 1) > n_ctx) {
        xllm_set_err(err, err_size,
                     "the prompt (%d tokens) plus max_tokens (%d) exceeds the context of %d tokens",
                     params->n_prompt, params->max_tokens, n_ctx);
        return XLLM_ERR_INVALID_ARG;
    }
    xllm_request *r = xllm_xcalloc(1, sizeof(*r));
    r->e = e;
    r->p = *params;
    r->p.prompt = NULL;
    if (params->pd_export_id) {
        if (!params->pd_export_to || !*params->pd_export_to ||
            strlen(params->pd_export_to) >= sizeof(r->pd_to)) {
            free(r);
            xllm_set_err(err, err_size, "pd_export needs a receiver address host:port");
            return XLLM_ERR_INVALID_ARG;
        }
        snprintf(r->pd_to, sizeof(r->pd_to), "%s", params->pd_export_to);
    }
    r->p.pd_export_to = NULL;
    if (params->pd_import_id && !e->receiver) {
        free(r);
        xllm_set_err(err, err_size, "pd_import: this engine has no KV receiver");
        return XLLM_ERR_INVALID_ARG;
    }
    atomic_init(&r->refs, 2);
    atomic_init(&r->cancelled, false);
    r->cap = n_ctx;
    r->tokens = xllm_xmalloc((size_t)n_ctx * sizeof(int32_t));
    memcpy(r->tokens, params->prompt, (size_t)params->n_prompt * sizeof(int32_t));
    r->n_tokens = r->n_prompt = params->n_prompt;
    r->max_total = params->max_tokens ? params->n_prompt + params->max_tokens : n_ctx;
    if (r->max_total > n_ctx) r->max_total = n_ctx;
    r->slot = -1;
    r->pd_first_send_after = -1;
    r->st.kv_first_send_after = -1;
    r->sampler = xllm_sampler_new(&params->sampling, e->n_vocab);
    for (int32_t i = 0; i < params->n_prompt; i++) xllm_sampler_accept(r->sampler, r->tokens[i]);
    pthread_mutex_init(&r->mu, NULL);
    pthread_cond_init(&r->cv, NULL);
    r->st.n_prompt = params->n_prompt;
    r->t_submit = now_s();

    pthread_mutex_lock(&e->mu);
    if (e->stop) {
        pthread_mutex_unlock(&e->mu);
        xllm_set_err(err, err_size, "the engine is stopping");
        atomic_store(&r->refs, 1);
        request_unref(r);
        return XLLM_ERR_BUSY;
    }
    if (e->p.max_queue > 0 && e->n_queued >= e->p.max_queue) {
        pthread_mutex_unlock(&e->mu);
        xllm_set_err(err, err_size, "the waiting queue is full (%d requests)", e->p.max_queue);
        atomic_store(&r->refs, 1);
        request_unref(r);
        return XLLM_ERR_BUSY;
    }
    if (e->n_inbox == e->inbox_cap) {
        e->inbox_cap = e->inbox_cap ? e->inbox_cap * 2 : 16;
        e->inbox = xllm_xrealloc(e->inbox, (size_t)e->inbox_cap * sizeof(*e->inbox));
    }
    e->inbox[e->n_inbox++] = r;
    e->n_queued++;
    pthread_cond_signal(&e->cv);
    pthread_mutex_unlock(&e->mu);
    *out = r;
    return XLLM_OK;
}

/* ---------------------------------------------------------------------------------------- */
/* Scheduling                                                                                */
/* ---------------------------------------------------------------------------------------- */

/* Class order: online before offline, then lower priority value, then earlier arrival.
 * Negative when a is served before b. */
static int class_cmp(const xllm_request *a, const xllm_request *b) {
    if (a->p.offline != b->p.offline) return a->p.offline ? 1 : -1;
    if (a->p.priority != b->p.priority) return a->p.priority < b->p.priority ? -1 : 1;
    return a->arrival < b->arrival ? -1 : (a->arrival > b->arrival);
}

static void waiting_push(xllm_engine *e, xllm_request *r) {
    if (e->n_waiting == e->waiting_cap) {
        e->waiting_cap = e->waiting_cap ? e->waiting_cap * 2 : 16;
        e->waiting = xllm_xrealloc(e->waiting, (size_t)e->waiting_cap * sizeof(*e->waiting));
    }
    /* insertion keeps the list in class order */
    int32_t i = e->n_waiting++;
    while (i > 0 && class_cmp(r, e->waiting[i - 1]) < 0) {
        e->waiting[i] = e->waiting[i - 1];
        i--;
    }
    e->waiting[i] = r;
    r->state = REQ_WAITING;
}

static int32_t waiting_index(const xllm_engine *e, const xllm_request *r) {
    for (int32_t i = 0; i < e->n_waiting; i++)
        if (e->waiting[i] == r) return i;
    return 0;
}

static void waiting_remove(xllm_engine *e, int32_t i) {
    memmove(e->waiting + i, e->waiting + i + 1,
            (size_t)(e->n_waiting - i - 1) * sizeof(*e->waiting));
    e->n_waiting--;
}

/* The running request served last (the preemption victim), or NULL. */
static xllm_request *lowest_running(xllm_engine *e) {
    xllm_request *worst = NULL;
    for (int32_t s = 0; s < e->p.max_seqs; s++) {
        xllm_request *r = e->running[s];
        if (r && (!worst || class_cmp(r, worst) > 0)) worst = r;
    }
    return worst;
}

/* Frees a running request's KV and puts it back in the queue; its tokens so far (prompt and
 * generated) are recomputed when it is admitted again. */
static void preempt(xllm_engine *e, xllm_request *r) {
    xllm_seq_truncate(e->ctx, r->slot, 0);
    e->running[r->slot] = NULL;
    e->n_running--;
    r->slot = -1;
    r->n_computed = 0;
    pthread_mutex_lock(&r->mu);
    r->st.n_preempted++;
    pthread_mutex_unlock(&r->mu);
    waiting_push(e, r);
    pthread_mutex_lock(&e->mu);
    e->n_queued++;
    e->stats.preemptions++;
    pthread_mutex_unlock(&e->mu);
}

static void log_softmax_top(const float *logits, int32_t n_vocab, float *work, int32_t token,
                            int32_t n_top, xllm_token_event *ev);

/* Publishes a generated token (engine thread): history, stream, TTFT, counters. Returns false
 * when the request ended with it (end of generation or length). */
static bool emit_token(xllm_engine *e, xllm_request *r, int32_t tok, const float *logits,
                       float logprob) {
    double t = now_s();
    if (r->t_first == 0) {
        r->t_first = t;
        pthread_mutex_lock(&r->mu);
        r->st.t_first_ms = (t - r->t_submit) * 1e3;
        pthread_mutex_unlock(&r->mu);
        pthread_mutex_lock(&e->mu);
        hist_add(&e->stats.ttft, t - r->t_submit);
        pthread_mutex_unlock(&e->mu);
    } else {
        pthread_mutex_lock(&e->mu);
        hist_add(&e->stats.itl, t - r->t_last);
        pthread_mutex_unlock(&e->mu);
    }
    r->t_last = t;
    if (!r->p.ignore_eos && xllm_token_is_eog(xllm_model_tokenizer(e->model), tok)) {
        request_finish(e, r, XLLM_FINISH_STOP);
        return false;
    }
    xllm_sampler_accept(r->sampler, tok);
    r->tokens[r->n_tokens++] = tok;
    r->n_generated++;
    pthread_mutex_lock(&e->mu);
    e->stats.generated_tokens++;
    pthread_mutex_unlock(&e->mu);
    xllm_token_event ev = {.token = tok, .logprob = logprob};
    if (r->p.top_logprobs >= 0 && logits)
        log_softmax_top(logits, e->n_vocab, e->probs, tok, r->p.top_logprobs, &ev);
    request_push(r, &ev);
    if (r->n_tokens >= r->max_total) {
        request_finish(e, r, XLLM_FINISH_LENGTH);
        return false;
    }
    return true;
}

/* Gives waiting request wi the slot. A request that received its prompt's KV (PD) imports it
 * and emits the transferred first token; returns false (request left waiting) when the KV
 * memory cannot take it yet. */
static bool admit(xllm_engine *e, int32_t wi, int32_t slot) {
    xllm_request *r = e->waiting[wi];
    int32_t imported = 0;
    if (r->pd_xfer) {
        char err[160];
        if (xllm_kv_transfer_import(r->pd_xfer, e->ctx, slot, err, sizeof(err)) != XLLM_OK)
            return false;
        imported = r->pd_xfer->n_tokens;
    }
    waiting_remove(e, wi);
    pthread_mutex_lock(&e->mu);
    e->n_queued--;
    pthread_mutex_unlock(&e->mu);
    r->state = REQ_RUNNING;
    r->slot = slot;
    e->running[slot] = r;
    e->n_running++;
    /* the prefix cache may hold the start of the tokens (for a preempted request, often all) */
    r->n_computed =
        imported ? imported : xllm_seq_reuse_prefix(e->ctx, slot, r->tokens, r->n_tokens);
    if (!r->admitted_once) {
        r->admitted_once = true;
        r->t_admit = now_s();
        pthread_mutex_lock(&r->mu);
        r->st.n_cached = r->n_computed;
        r->st.t_queue_ms = (r->t_admit - r->t_submit) * 1e3;
        pthread_mutex_unlock(&r->mu);
        pthread_mutex_lock(&e->mu);
        e->stats.prompt_tokens += (uint64_t)r->n_prompt;
        e->stats.cached_tokens += (uint64_t)(imported ? 0 : r->n_computed);
        if (imported) {
            e->stats.kv_imports++;
            e->stats.kv_import_tokens += (uint64_t)imported;
        }
        pthread_mutex_unlock(&e->mu);
    }
    if (imported) {
        int32_t first = r->pd_xfer->first_token;
        float lp = r->pd_xfer->first_logprob;
        xllm_kv_transfer_free(r->pd_xfer);
        r->pd_xfer = NULL;
        if (emit_token(e, r, first, NULL, lp)) r->changed = true;
    }
    return true;
}

/* ---------------------------------------------------------------------------------------- */
/* PD: KV transfers                                                                          */
/* ---------------------------------------------------------------------------------------- */

/* Takes finished transfers from the receiver and hands each to the waiting request that asked
 * for it; a failed transfer or one whose tokens differ from the prompt ends its request. */
static void claim_transfers(xllm_engine *e, int timeout_ms) {
    if (!e->receiver) return;
    xllm_kv_transfer *t;
    while ((t = xllm_kv_receiver_poll(e->receiver, timeout_ms))) {
        timeout_ms = 0;
        if (e->n_xfers == e->xfers_cap) {
            e->xfers_cap = e->xfers_cap ? e->xfers_cap * 2 : 8;
            e->xfers = xllm_xrealloc(e->xfers, (size_t)e->xfers_cap * sizeof(*e->xfers));
            e->xfer_time =
                xllm_xrealloc(e->xfer_time, (size_t)e->xfers_cap * sizeof(*e->xfer_time));
        }
        e->xfer_time[e->n_xfers] = now_s();
        e->xfers[e->n_xfers++] = t;
    }
    /* a transfer no request claims (its decode leg was cancelled or never came) gives its
     * staging memory back after a while */
    const double now = now_s();
    for (int32_t j = 0; j < e->n_xfers;) {
        if (now - e->xfer_time[j] > XFER_UNCLAIMED_S) {
            xllm_kv_transfer_free(e->xfers[j]);
            e->xfers[j] = e->xfers[--e->n_xfers];
            e->xfer_time[j] = e->xfer_time[e->n_xfers];
        } else {
            j++;
        }
    }
    for (int32_t i = 0; i < e->n_waiting;) {
        xllm_request *r = e->waiting[i];
        int32_t k = -1;
        if (r->p.pd_import_id && !r->pd_xfer && !r->admitted_once)
            for (int32_t j = 0; j < e->n_xfers && k < 0; j++)
                if (e->xfers[j]->id == r->p.pd_import_id) k = j;
        if (k < 0) {
            i++;
            continue;
        }
        t = e->xfers[k];
        e->xfers[k] = e->xfers[--e->n_xfers];
        e->xfer_time[k] = e->xfer_time[e->n_xfers];
        bool match = t->status == XLLM_OK && t->n_tokens == r->n_prompt &&
                     !memcmp(t->tokens, r->tokens, (size_t)r->n_prompt * sizeof(int32_t));
        if (match) {
            r->pd_xfer = t;
            i++;
        } else {
            xllm_kv_transfer_free(t);
            waiting_remove(e, i);
            pthread_mutex_lock(&e->mu);
            e->n_queued--;
            pthread_mutex_unlock(&e->mu);
            request_finish(e, r, XLLM_FINISH_ABORT);
        }
    }
}

/* True when a waiting request is only waiting for its KV to arrive. */
static bool waiting_for_kv(const xllm_engine *e) {
    for (int32_t i = 0; i < e->n_waiting; i++) {
        const xllm_request *r = e->waiting[i];
        if (r->p.pd_import_id && !r->pd_xfer && !r->admitted_once) return true;
    }
    return false;
}

static void drop_sent(xllm_engine *e, const xllm_kv_sender *s);

static int32_t sender_index(const xllm_engine *e, const xllm_kv_sender *s) {
    for (int32_t i = 0; i < e->n_senders; i++)
        if (e->senders[i].s == s) return i;
    return -1;
}

/* Closes connection i (no transfer may be open on it). */
static void close_sender(xllm_engine *e, int32_t i) {
    drop_sent(e, e->senders[i].s);
    xllm_kv_sender_free(e->senders[i].s);
    e->senders[i] = e->senders[--e->n_senders];
}

/* A live connection to `to` ("host:port"), opened if needed. A dead one is closed once no open
 * transfer refers to it (their next send fails and aborts them). */
static xllm_kv_sender *sender_for(xllm_engine *e, const char *to, char *err, size_t err_size) {
    for (int32_t i = 0; i < e->n_senders;) {
        if (strcmp(e->senders[i].to, to)) {
            i++;
        } else if (xllm_kv_sender_connected(e->senders[i].s)) {
            return e->senders[i].s;
        } else if (e->senders[i].open == 0) {
            close_sender(e, i); /* reconnect */
        } else {
            i++;
        }
    }
    if (e->n_senders == (int32_t)(sizeof(e->senders) / sizeof(e->senders[0]))) {
        int32_t idle = -1;
        for (int32_t i = 0; i < e->n_senders && idle < 0; i++)
            if (e->senders[i].open == 0) idle = i;
        if (idle < 0) {
            xllm_set_err(err, err_size, "pd_export: every KV connection has transfers open");
            return NULL;
        }
        close_sender(e, idle);
    }
    char host[128];
    snprintf(host, sizeof(host), "%s", to);
    char *colon = strrchr(host, ':');
    if (!colon) {
        xllm_set_err(err, err_size, "pd_export: '%s' is not host:port", to);
        return NULL;
    }
    *colon = 0;
    char *h = host;
    if (*h == '[' && colon > h && colon[-1] == ']') { /* [ipv6]:port */
        h++;
        colon[-1] = 0;
    }
    xllm_kv_sender_params sp = xllm_kv_sender_default_params();
    sp.host = h;
    sp.port = atoi(colon + 1);
    xllm_kv_sender *s = NULL;
    if (xllm_kv_sender_new(e->ctx, &sp, &s, err, err_size) != XLLM_OK) return NULL;
    snprintf(e->senders[e->n_senders].to, sizeof(e->senders[0].to), "%s", to);
    e->senders[e->n_senders].s = s;
    e->senders[e->n_senders++].open = 0;
    return s;
}

/* Publishes r's prefill and export counters in its stats. */
static void pd_publish(xllm_request *r) {
    pthread_mutex_lock(&r->mu);
    r->st.n_prefill_steps = r->n_prefill_steps;
    r->st.t_prefill_ms = r->t_prefilled > 0 ? (r->t_prefilled - r->t_submit) * 1e3 : 0;
    r->st.kv_sends_forward = r->pd_sends_fwd;
    r->st.kv_sends_between = r->pd_sends_between;
    r->st.kv_first_send_after = r->pd_first_send_after;
    r->st.kv_copy_ms = r->pd_copy_s * 1e3;
    pthread_mutex_unlock(&r->mu);
}

/* r's transfer is no longer open: its connection may be closed once none is. */
static void pd_release(xllm_engine *e, xllm_request *r) {
    int32_t i = sender_index(e, r->pd_s);
    if (i >= 0) e->senders[i].open--;
    r->pd_s = NULL;
}

/* Aborts r's open transfer: frames not yet on the wire are dropped, ABORT tells the receiver to
 * free its staging. */
static void pd_abort(xllm_engine *e, xllm_request *r, const char *why) {
    xllm_kv_sender_abort(r->pd_s, r->p.pd_export_id, why);
    pd_release(e, r);
    pthread_mutex_lock(&e->mu);
    e->stats.kv_export_aborts++;
    pthread_mutex_unlock(&e->mu);
}

/* Queues rows [pd_sent, upto) of every layer of r's sequence, which holds them committed, from
 * between two steps. */
static bool pd_send_between(xllm_engine *e, xllm_request *r, int32_t upto) {
    const double t0 = now_s();
    const int32_t n_layer = xllm_model_n_layer(e->model);
    for (int32_t il = 0; il < n_layer; il++)
        if (xllm_kv_sender_send_rows(r->pd_s, r->p.pd_export_id, r->slot, il, r->pd_sent,
                                     upto - r->pd_sent) != XLLM_OK)
            return false;
    r->pd_copy_s += now_s() - t0;
    if (r->pd_first_send_after < 0) r->pd_first_send_after = r->n_prefill_steps;
    r->pd_sends_between += n_layer;
    r->pd_sent = upto;
    return true;
}

/* Opens r's transfer if it is not yet (SEQ_BEGIN with the prompt) and queues the rows r holds
 * beyond those sent without computing them in this step: a cached prefix. */
static bool pd_start(xllm_engine *e, xllm_request *r) {
    if (!r->pd_s) {
        char err[256];
        xllm_kv_sender *s = sender_for(e, r->pd_to, err, sizeof(err));
        if (!s || xllm_kv_sender_begin(s, r->p.pd_export_id, r->tokens, r->n_prompt) != XLLM_OK)
            return false;
        r->pd_s = s;
        e->senders[sender_index(e, s)].open++;
    }
    return r->n_computed <= r->pd_sent || pd_send_between(e, r, r->n_computed);
}

/* The forward pass stored layer il of this step's rows: queue each exported chunk's part (the
 * sender copies it now, its I/O thread writes it while the next layers compute). */
static void pd_layer_hook(void *user, const xllm_batch *b, int32_t il) {
    xllm_engine *e = user;
    (void)b; /* the chunks were listed when the batch was built */
    for (int32_t i = 0; i < e->n_pd_ranges; i++) {
        struct pd_range *g = &e->pd_ranges[i];
        xllm_request *r = g->r;
        if (r->pd_err != XLLM_OK) continue;
        const double t0 = now_s();
        r->pd_err =
            xllm_kv_sender_send_rows(r->pd_s, r->p.pd_export_id, r->slot, il, g->pos0, g->m);
        r->pd_copy_s += now_s() - t0;
        if (r->pd_err != XLLM_OK) continue;
        if (r->pd_first_send_after < 0) r->pd_first_send_after = r->n_prefill_steps;
        r->pd_sends_fwd++;
        g->layers++;
    }
}

/* Before a step: opens the transfers of exported prompts that get a chunk in it and lists the
 * positions of each chunk that the forward pass sends. A request whose transfer cannot open is
 * ended and loses its chunk. Returns the number of requests ended. */
static int32_t pd_prepare(xllm_engine *e) {
    int32_t ended = 0;
    e->n_pd_ranges = 0;
    if (e->p.pd_export_after_prefill) return 0;
    for (int32_t s = 0; s < e->p.max_seqs; s++) {
        xllm_request *r = e->running[s];
        if (!r || e->chunk[s] == 0 || !r->p.pd_export_id || r->n_computed >= r->n_prompt) continue;
        if (!pd_start(e, r)) {
            e->chunk[s] = 0;
            request_finish(e, r, XLLM_FINISH_ABORT);
            ended++;
            continue;
        }
        /* after a preemption, positions recomputed below pd_sent went out already */
        int32_t p0 = XLLM_MAX(r->n_computed, r->pd_sent), end = r->n_computed + e->chunk[s];
        if (end > p0)
            e->pd_ranges[e->n_pd_ranges++] = (struct pd_range){.r = r, .pos0 = p0, .m = end - p0};
    }
    xllm_context_set_layer_hook(e->ctx, e->n_pd_ranges ? pd_layer_hook : NULL, e);
    return ended;
}

/* After a step (ran: the forward pass ran): a chunk whose every layer went out advances its
 * transfer; one that went out in part (a send failed) ends its request, whose rows among the
 * batch's n rows are dropped from sampling. */
static void pd_after_step(xllm_engine *e, int32_t n, bool ran) {
    const int32_t n_layer = xllm_model_n_layer(e->model);
    for (int32_t i = 0; i < e->n_pd_ranges; i++) {
        struct pd_range *g = &e->pd_ranges[i];
        xllm_request *r = g->r;
        if (ran && r->pd_err == XLLM_OK && g->layers == n_layer) {
            r->pd_sent = g->pos0 + g->m;
            continue;
        }
        if (r->pd_err == XLLM_OK && g->layers == 0) continue; /* the pass did not run */
        for (int32_t row = 0; row < n; row++)
            if (e->b_req[row] == r) e->b_req[row] = NULL;
        pd_publish(r);
        request_finish(e, r, XLLM_FINISH_ABORT);
    }
    e->n_pd_ranges = 0;
    xllm_context_set_layer_hook(e->ctx, NULL, NULL);
}

/* r's whole prompt is computed and tok sampled from it: its rows are all queued (with
 * pd_export_after_prefill, all of them now), SEQ_END hands tok over. The receiver's answer is
 * collected later (reap_sent): the decode side reports failures itself. */
static bool pd_finish(xllm_engine *e, xllm_request *r, int32_t tok, float logprob) {
    if (e->p.pd_export_after_prefill && !pd_start(e, r)) return false;
    pd_publish(r);
    xllm_kv_sender *s = r->pd_s;
    uint64_t id = r->p.pd_export_id;
    if (!s || r->pd_sent != r->n_prompt || xllm_kv_sender_end(s, id, tok, logprob) != XLLM_OK)
        return false;
    pd_release(e, r);
    if (e->n_sent == (int32_t)(sizeof(e->sent) / sizeof(e->sent[0]))) {
        /* collect the oldest answer (it has long been sent) to make room */
        char err[160];
        xllm_kv_sender_wait(e->sent[0].s, e->sent[0].id, 1000, err, sizeof(err));
        e->sent[0] = e->sent[--e->n_sent];
    }
    e->sent[e->n_sent].s = s;
    e->sent[e->n_sent++].id = id;
    pthread_mutex_lock(&e->mu);
    e->stats.kv_exports++;
    pthread_mutex_unlock(&e->mu);
    return true;
}

/* Collects the receivers' answers to ended transfers (the sender keeps each until asked). */
static void reap_sent(xllm_engine *e) {
    char err[160];
    for (int32_t i = 0; i < e->n_sent;) {
        if (xllm_kv_sender_wait(e->sent[i].s, e->sent[i].id, 0, err, sizeof(err)) != XLLM_ERR_BUSY)
            e->sent[i] = e->sent[--e->n_sent];
        else
            i++;
    }
}

/* Forgets the pending answers of a sender about to be freed. */
static void drop_sent(xllm_engine *e, const xllm_kv_sender *s) {
    for (int32_t i = 0; i < e->n_sent;)
        if (e->sent[i].s == s)
            e->sent[i] = e->sent[--e->n_sent];
        else
            i++;
}

static int32_t free_slot(const xllm_engine *e) {
    for (int32_t s = 0; s < e->p.max_seqs; s++)
        if (!e->running[s]) return s;
    return -1;
}

/* Takes submissions, ends cancelled requests, admits waiting ones. Returns false to stop. */
static bool intake(xllm_engine *e) {
    pthread_mutex_lock(&e->mu);
    while (!e->stop && e->n_inbox == 0 && e->n_running == 0 && e->n_waiting == 0)
        pthread_cond_wait(&e->cv, &e->mu);
    if (e->stop) {
        pthread_mutex_unlock(&e->mu);
        return false;
    }
    int32_t n = e->n_inbox;
    xllm_request *batch[64];
    if (n > 64) n = 64;
    memcpy(batch, e->inbox, (size_t)n * sizeof(*batch));
    memmove(e->inbox, e->inbox + n, (size_t)(e->n_inbox - n) * sizeof(*e->inbox));
    e->n_inbox -= n;
    pthread_mutex_unlock(&e->mu);
    for (int32_t i = 0; i < n; i++) {
        batch[i]->arrival = e->arrivals++;
        waiting_push(e, batch[i]);
    }

    for (int32_t s = 0; s < e->p.max_seqs; s++) {
        xllm_request *r = e->running[s];
        if (r && atomic_load(&r->cancelled)) request_finish(e, r, XLLM_FINISH_CANCEL);
    }
    for (int32_t i = 0; i < e->n_waiting;) {
        xllm_request *r = e->waiting[i];
        if (atomic_load(&r->cancelled)) {
            /* its KV may still be on the way: the receiver drops it (and tells the sender) */
            if (r->p.pd_import_id && !r->pd_xfer && e->receiver)
                xllm_kv_receiver_cancel(e->receiver, r->p.pd_import_id);
            waiting_remove(e, i);
            pthread_mutex_lock(&e->mu);
            e->n_queued--;
            pthread_mutex_unlock(&e->mu);
            request_finish(e, r, XLLM_FINISH_CANCEL);
        } else {
            i++;
        }
    }

    /* PD: hand received KV to the requests waiting for it */
    claim_transfers(e, 0);

    /* admission in class order; an online request may take the slot of running offline work;
     * a request still waiting for its transferred KV is passed over */
    int32_t wi = 0;
    while (wi < e->n_waiting) {
        xllm_request *head = e->waiting[wi];
        if (head->p.pd_import_id && !head->pd_xfer && !head->admitted_once) {
            wi++;
            continue;
        }
        int32_t slot = free_slot(e);
        if (slot < 0) {
            xllm_request *victim = lowest_running(e);
            if (!victim || head->p.offline || !victim->p.offline) break;
            slot = victim->slot;
            preempt(e, victim); /* the victim is now in the queue behind the head */
            wi = waiting_index(e, head);
        }
        /* pages for at least the first chunk, else wait (or preempt offline work) */
        int32_t first = head->pd_xfer ? head->pd_xfer->n_tokens + 1
                                      : XLLM_MIN(head->n_tokens, e->p.max_batch_tokens);
        if (xllm_kv_pages_needed(e->ctx->kv, slot, first) > xllm_kv_pages_available(e->ctx->kv)) {
            xllm_request *victim = lowest_running(e);
            if (victim && victim->p.offline && !head->p.offline) {
                preempt(e, victim);
                wi = waiting_index(e, head);
                continue;
            }
            if (e->n_running > 0) break;
        }
        if (!admit(e, wi, slot)) break;
    }
    pthread_mutex_lock(&e->mu);
    e->stats.running = e->n_running;
    pthread_mutex_unlock(&e->mu);
    return true;
}

/* ---------------------------------------------------------------------------------------- */
/* One step                                                                                  */
/* ---------------------------------------------------------------------------------------- */

static void log_softmax_top(const float *logits, int32_t n_vocab, float *work, int32_t token,
                            int32_t n_top, xllm_token_event *ev) {
    float mx = -INFINITY;
    for (int32_t i = 0; i < n_vocab; i++) mx = logits[i] > mx ? logits[i] : mx;
    double sum = 0;
    for (int32_t i = 0; i < n_vocab; i++) sum += exp((double)(logits[i] - mx));
    const float lse = mx + (float)log(sum);
    ev->logprob = logits[token] - lse;
    ev->n_top = 0;
    if (n_top <= 0) return;
    /* partial selection of the n_top largest */
    memcpy(work, logits, (size_t)n_vocab * sizeof(float));
    for (int32_t k = 0; k < n_top; k++) {
        int32_t best = -1;
        for (int32_t i = 0; i < n_vocab; i++)
            if (work[i] != -INFINITY && (best < 0 || work[i] > work[best])) best = i;
        if (best < 0) break;
        ev->top_ids[k] = best;
        ev->top_logprobs[k] = logits[best] - lse;
        work[best] = -INFINITY;
        ev->n_top = k + 1;
    }
}

/* Builds and runs one batch. Returns false when nothing could be scheduled. */
static bool step(xllm_engine *e) {
    xllm_kv *kv = e->ctx->kv;
    int32_t budget = e->p.max_batch_tokens;
    int64_t promised = 0; /* pages the chunks given so far will take */
    int64_t pages = xllm_kv_pages_available(kv);
    memset(e->chunk, 0, (size_t)e->p.max_seqs * sizeof(int32_t));
    memset(e->chunk_pages, 0, (size_t)e->p.max_seqs * sizeof(int64_t));

    /* order running requests by class: decodes first, then prefills, each in class order */
    xllm_request *order[1024];
    int32_t n_order = 0;
    for (int32_t s = 0; s < e->p.max_seqs; s++)
        if (e->running[s]) order[n_order++] = e->running[s];
    for (int32_t i = 1; i < n_order; i++) {
        xllm_request *r = order[i];
        int32_t j = i;
        while (j > 0 && class_cmp(r, order[j - 1]) < 0) {
            order[j] = order[j - 1];
            j--;
        }
        order[j] = r;
    }
    for (int pass = 0; pass < 2; pass++) {
        for (int32_t i = 0; i < n_order && budget > 0; i++) {
            xllm_request *r = order[i];
            if (!r || r->state != REQ_RUNNING) continue;
            int32_t pending = r->n_tokens - r->n_computed;
            bool decode = pending == 1;
            if ((pass == 0) != decode) continue;
            int32_t k = XLLM_MIN(pending, budget);
            int64_t need = xllm_kv_pages_needed(kv, r->slot, r->n_computed + k);
            while (need > pages) {
                /* shrink a prefill chunk to the pages there are */
                if (!decode && k > 1) {
                    int32_t bt = xllm_kv_block_tokens(kv);
                    int32_t fit =
                        (int32_t)((pages + xllm_kv_seq_pages(kv, r->slot)) * bt) - r->n_computed;
                    if (fit > 0 && fit < k) {
                        k = fit;
                        need = xllm_kv_pages_needed(kv, r->slot, r->n_computed + k);
                        continue;
                    }
                }
                /* preempt the request served last (possibly this one) */
                xllm_request *victim = lowest_running(e);
                if (!victim) break;
                for (int32_t q = 0; q < n_order; q++)
                    if (order[q] == victim) order[q] = NULL;
                budget += e->chunk[victim->slot];
                promised -= e->chunk_pages[victim->slot];
                e->chunk[victim->slot] = 0;
                e->chunk_pages[victim->slot] = 0;
                preempt(e, victim);
                pages = xllm_kv_pages_available(kv) - promised;
                if (victim == r) break;
            }
            if (r->state != REQ_RUNNING || need > pages) continue;
            e->chunk[r->slot] = k;
            e->chunk_pages[r->slot] = need;
            budget -= k;
            pages -= need;
            promised += need;
        }
    }

    const int32_t pd_ended = pd_prepare(e);

    /* the batch: each running request's rows, in slot order */
    int32_t n = 0;
    for (int32_t s = 0; s < e->p.max_seqs; s++) {
        xllm_request *r = e->running[s];
        if (!r || e->chunk[s] == 0) continue;
        for (int32_t i = 0; i < e->chunk[s]; i++) {
            int32_t pos = r->n_computed + i;
            e->b_tok[n] = r->tokens[pos];
            e->b_pos[n] = pos;
            e->b_seq[n] = s;
            bool last = pos == r->n_tokens - 1;
            e->b_logits[n] = last;
            e->b_req[n] = last ? r : NULL;
            n++;
        }
    }
    if (n == 0) {
        pd_after_step(e, 0, false);
        return pd_ended > 0; /* ending a request is progress: the queue is not stuck */
    }
    xllm_batch b = {n, e->b_tok, e->b_pos, e->b_seq, e->b_logits};
    xllm_status st = xllm_decode(e->ctx, &b);
    if (st != XLLM_OK) {
        /* should not happen after the page accounting; recover by preempting */
        pd_after_step(e, n, false);
        xllm_request *victim = lowest_running(e);
        if (victim) preempt(e, victim);
        return true;
    }
    const double t_pass = now_s();
    for (int32_t s = 0; s < e->p.max_seqs; s++) {
        xllm_request *r = e->running[s];
        if (!r || e->chunk[s] == 0) continue;
        bool prefill = r->n_computed < r->n_prompt;
        r->n_computed += e->chunk[s];
        if (!prefill) continue;
        r->n_prefill_steps++;
        if (r->n_computed >= r->n_prompt && r->t_prefilled == 0) r->t_prefilled = t_pass;
        pd_publish(r);
    }
    pd_after_step(e, n, true);

    /* sample and publish */
    for (int32_t row = 0; row < n; row++) {
        xllm_request *r = e->b_req[row];
        if (!r) continue;
        const float *logits = xllm_get_logits(e->ctx, row);
        int32_t tok = xllm_sampler_sample(r->sampler, logits);
        if (r->p.pd_export_id && r->n_generated == 0) {
            /* PD prefill: end the transfer with the first token, finish */
            xllm_token_event lp = {0};
            log_softmax_top(logits, e->n_vocab, e->probs, tok, 0, &lp);
            if (!pd_finish(e, r, tok, lp.logprob)) {
                request_finish(e, r, XLLM_FINISH_ABORT);
                continue;
            }
            if (emit_token(e, r, tok, logits, lp.logprob)) request_finish(e, r, XLLM_FINISH_LENGTH);
            continue;
        }
        emit_token(e, r, tok, logits, 0.0f);
    }
    /* one wake per request per step */
    for (int32_t s = 0; s < e->p.max_seqs; s++) {
        xllm_request *r = e->running[s];
        if (!r || !r->changed) continue;
        r->changed = false;
        pthread_mutex_lock(&r->mu);
        pthread_cond_broadcast(&r->cv);
        pthread_mutex_unlock(&r->mu);
        if (r->p.notify) r->p.notify(r->p.notify_user);
    }
    pthread_mutex_lock(&e->mu);
    e->stats.steps++;
    e->stats.running = e->n_running;
    pthread_mutex_unlock(&e->mu);
    return true;
}

static void *engine_main(void *arg) {
    xllm_engine *e = arg;
    while (intake(e)) {
        if (e->n_sent) reap_sent(e);
        if (!step(e) && e->n_running == 0 && e->n_waiting > 0) {
            if (waiting_for_kv(e)) {
                claim_transfers(e, 20); /* idle until a transfer arrives */
                continue;
            }
            /* nothing fits even alone: the head request can never run */
            xllm_request *r = e->waiting[0];
            waiting_remove(e, 0);
            pthread_mutex_lock(&e->mu);
            e->n_queued--;
            pthread_mutex_unlock(&e->mu);
            request_finish(e, r, XLLM_FINISH_ABORT);
        }
    }
    /* stopping: end everything */
    for (int32_t s = 0; s < e->p.max_seqs; s++)
        if (e->running[s]) request_finish(e, e->running[s], XLLM_FINISH_ABORT);
    while (e->n_waiting > 0) {
        xllm_request *r = e->waiting[0];
        waiting_remove(e, 0);
        request_finish(e, r, XLLM_FINISH_ABORT);
    }
    pthread_mutex_lock(&e->mu);
    for (int32_t i = 0; i < e->n_inbox; i++) {
        xllm_request *r = e->inbox[i];
        pthread_mutex_unlock(&e->mu);
        r->state = REQ_DONE;
        request_finish(e, r, XLLM_FINISH_ABORT);
        pthread_mutex_lock(&e->mu);
    }
    e->n_inbox = 0;
    pthread_mutex_unlock(&e->mu);
    return NULL;
}

/* ---------------------------------------------------------------------------------------- */
/* Engine lifecycle                                                                          */
/* ---------------------------------------------------------------------------------------- */

xllm_status xllm_engine_new(const xllm_model *model, const xllm_engine_params *params,
                            xllm_engine **out, char *err, size_t err_size) {
    *out = NULL;
    xllm_engine_params p = params ? *params : xllm_engine_default_params();
    if (p.max_seqs < 0 || p.max_batch_tokens < 0 || p.max_queue < 0 || p.max_seqs > 1024) {
        xllm_set_err(err, err_size, "engine: max_seqs must be 0..1024, others not negative");
        return XLLM_ERR_INVALID_ARG;
    }
    if (p.max_seqs == 0) p.max_seqs = 16;
    if (p.max_batch_tokens == 0) p.max_batch_tokens = 512;
    xllm_context_params cp = xllm_context_default_params();
    cp.n_ctx = p.n_ctx;
    cp.n_seq_max = p.max_seqs;
    cp.n_batch = p.max_batch_tokens;
    cp.n_threads = p.n_threads;
    cp.kv_type = p.kv_type;
    cp.kv_layout = p.kv_layout;
    cp.kv_memory = p.kv_memory;
    cp.kv_block_tokens = p.kv_block_tokens;
    cp.no_prefix_cache = p.no_prefix_cache;
    xllm_engine *e = xllm_xcalloc(1, sizeof(*e));
    xllm_status st = xllm_context_new(model, &cp, &e->ctx, err, err_size);
    if (st != XLLM_OK) {
        free(e);
        return st;
    }
    e->model = model;
    e->p = p;
    e->n_vocab = xllm_model_n_vocab(model);
    pthread_mutex_init(&e->mu, NULL);
    pthread_cond_init(&e->cv, NULL);
    e->running = xllm_xcalloc((size_t)p.max_seqs, sizeof(*e->running));
    e->chunk = xllm_xcalloc((size_t)p.max_seqs, sizeof(int32_t));
    e->chunk_pages = xllm_xcalloc((size_t)p.max_seqs, sizeof(int64_t));
    const size_t B = (size_t)p.max_batch_tokens;
    e->b_tok = xllm_xcalloc(B, sizeof(int32_t));
    e->b_pos = xllm_xcalloc(B, sizeof(int32_t));
    e->b_seq = xllm_xcalloc(B, sizeof(int32_t));
    e->b_logits = xllm_xcalloc(B, 1);
    e->b_req = xllm_xcalloc(B, sizeof(*e->b_req));
    e->probs = xllm_xcalloc((size_t)e->n_vocab, sizeof(float));
    e->pd_ranges = xllm_xcalloc((size_t)p.max_seqs, sizeof(*e->pd_ranges));
    if (p.kv_receiver) {
        xllm_kv_receiver_params rp = xllm_kv_receiver_default_params();
        if (p.kv_host) rp.host = p.kv_host;
        rp.port = p.kv_port;
        st = xllm_kv_receiver_new(e->ctx, &rp, &e->receiver, err, err_size);
        if (st != XLLM_OK) {
            xllm_engine_free(e);
            return st;
        }
    }
    hist_init(&e->stats.ttft, 0.005, 2.0);
    hist_init(&e->stats.tpot, 0.001, 2.0);
    hist_init(&e->stats.itl, 0.001, 2.0);
    hist_init(&e->stats.e2e, 0.05, 2.0);
    if (pthread_create(&e->thread, NULL, engine_main, e) != 0) {
        xllm_set_err(err, err_size, "engine: cannot start its thread");
        xllm_engine_free(e);
        return XLLM_ERR_INTERNAL;
    }
    e->thread_on = true;
    *out = e;
    return XLLM_OK;
}

void xllm_engine_free(xllm_engine *e) {
    if (!e) return;
    pthread_mutex_lock(&e->mu);
    e->stop = true;
    pthread_cond_broadcast(&e->cv);
    pthread_mutex_unlock(&e->mu);
    if (e->thread_on) pthread_join(e->thread, NULL);
    for (int32_t i = 0; i < e->n_senders; i++) xllm_kv_sender_free(e->senders[i].s);
    xllm_kv_receiver_free(e->receiver);
    for (int32_t i = 0; i < e->n_xfers; i++) xllm_kv_transfer_free(e->xfers[i]);
    free(e->xfers);
    free(e->xfer_time);
    xllm_context_free(e->ctx);
    free(e->inbox);
    free(e->waiting);
    free(e->running);
    free(e->chunk);
    free(e->chunk_pages);
    free(e->b_tok);
    free(e->b_pos);
    free(e->b_seq);
    free(e->b_logits);
    free(e->b_req);
    free(e->probs);
    free(e->pd_ranges);
    pthread_mutex_destroy(&e->mu);
    pthread_cond_destroy(&e->cv);
    free(e);
}

void xllm_engine_get_stats(xllm_engine *e, xllm_engine_stats *st) {
    pthread_mutex_lock(&e->mu);
    *st = e->stats;
    st->waiting = e->n_queued;
    pthread_mutex_unlock(&e->mu);
    xllm_context_kv_stats(e->ctx, &st->kv);
    if (e->receiver) {
        xllm_kv_receiver_stats rs;
        xllm_kv_receiver_get_stats(e->receiver, &rs);
        st->kv_rx_staged_bytes = rs.staged_bytes;
        st->kv_rx_failed = rs.failed;
    }
    st->kv_usage = st->kv.n_pages ? (double)st->kv.used_pages / (double)st->kv.n_pages : 0;
}

int xllm_engine_kv_port(const xllm_engine *e) {
    return e->receiver ? xllm_kv_receiver_port(e->receiver) : 0;
}

int32_t xllm_engine_n_ctx(const xllm_engine *e) {
    return xllm_context_n_ctx(e->ctx);
}

xllm_status xllm_engine_kv_events(xllm_engine *e, uint64_t since, int32_t max,
                                  xllm_kv_events *out) {
    return xllm_context_kv_events(e->ctx, since, max, out);
}

int32_t xllm_engine_kv_block_tokens(const xllm_engine *e) {
    return xllm_context_kv_block_tokens(e->ctx);
}
