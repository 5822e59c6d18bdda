/* Contexts: KV memory plus workspaces; xllm_decode validates a batch (sequence ids, positions,
 * token ids, KV room) and then runs the forward pass. */
#include <stdlib.h>
#include <string.h>

#include "compute/cpu/cpu.h"
#include "engine/engine-impl.h"
#include "util/common.h"

xllm_context_params xllm_context_default_params(void) {
    xllm_context_params p = {0};
    p.kv_type = XLLM_DTYPE_F16;
    p.kv_layout = XLLM_KV_LAYOUT_XTENSOR;
    return p;
}

static float *falloc(size_t n) {
    return xllm_xcalloc(n ? n : 1, sizeof(float));
}

xllm_status xllm_context_new(const xllm_model *model, const xllm_context_params *params,
                             xllm_context **out, char *err, size_t err_size) {
    *out = NULL;
    xllm_context_params p = params ? *params : xllm_context_default_params();
    const xllm_hparams *hp = &model->hp;
    if (p.n_ctx < 0 || p.n_seq_max < 0 || p.n_batch < 0 || p.n_threads < 0) {
        xllm_set_err(err, err_size, "context: negative n_ctx, n_seq_max, n_batch or n_threads");
        return XLLM_ERR_INVALID_ARG;
    }
    if (p.kv_type != XLLM_DTYPE_F32 && p.kv_type != XLLM_DTYPE_F16) {
        xllm_set_err(err, err_size, "context: KV type must be f32 or f16");
        return XLLM_ERR_INVALID_ARG;
    }
    if (p.n_ctx == 0) p.n_ctx = XLLM_MIN(hp->n_ctx_train > 0 ? hp->n_ctx_train : 4096, 4096);
    if (p.n_seq_max == 0) p.n_seq_max = 1;
    if (p.n_batch == 0) p.n_batch = 512;
    if (p.n_threads == 0) p.n_threads = xllm_cpu_physical_cores();

    xllm_context *ctx = xllm_xcalloc(1, sizeof(*ctx));
    ctx->model = model;
    ctx->params = p;
    if (p.kv_layout != XLLM_KV_LAYOUT_XTENSOR && p.kv_layout != XLLM_KV_LAYOUT_PAGED) {
        xllm_set_err(err, err_size, "context: unknown KV layout %d", (int)p.kv_layout);
        return XLLM_ERR_INVALID_ARG;
    }
    xllm_kv_params kp = {.n_layer = hp->n_layer,
                         .n_seq = p.n_seq_max,
                         .n_ctx = p.n_ctx,
                         .row_elems = hp->n_head_kv * hp->head_dim,
                         .type = p.kv_type,
                         .layout = p.kv_layout,
                         .memory = p.kv_memory,
                         .block_tokens = p.kv_block_tokens,
                         .prefix_cache = !p.no_prefix_cache,
                         .background = true};
    xllm_status st = xllm_kv_new(&kp, &ctx->kv, err, err_size);
    if (st != XLLM_OK) {
        free(ctx);
        return st;
    }
    ctx->tp = xllm_threadpool_new(p.n_threads);
    if (!ctx->tp) {
        xllm_set_err(err, err_size, "context: cannot start %d threads", p.n_threads);
        xllm_context_free(ctx);
        return XLLM_ERR_NOMEM;
    }

    const size_t B = (size_t)p.n_batch;
    const int64_t ff = XLLM_MAX(hp->n_ff, hp->n_ff_exp);
    int64_t mc = XLLM_MAX((int64_t)hp->n_embd, (int64_t)hp->n_head * hp->head_dim);
    ctx->max_cols = XLLM_MAX(mc, ff);
    xllm_workspace *ws = &ctx->ws;
    ws->x = falloc(B * hp->n_embd);
    ws->xn = falloc(B * hp->n_embd);
    ws->q = falloc(B * hp->n_head * hp->head_dim);
    ws->k = falloc(B * hp->n_head_kv * hp->head_dim);
    ws->v = falloc(B * hp->n_head_kv * hp->head_dim);
    ws->att = falloc(B * hp->n_head * hp->head_dim);
    ws->ffn_a = falloc(B * ff);
    ws->ffn_b = falloc(B * ff);
    ws->out = falloc(B * hp->n_embd);
    ws->rope_cos = falloc(B * hp->n_rot / 2);
    ws->rope_sin = falloc(B * hp->n_rot / 2);
    ws->router = falloc(B * hp->n_expert);
    ws->exp_ids = xllm_xcalloc(B * (hp->n_expert_used + 1), sizeof(int32_t));
    ws->exp_w = falloc(B * hp->n_expert_used);
    ws->rows = xllm_xcalloc(B, sizeof(int32_t));
    ws->gather = falloc(B * hp->n_embd);
    ws->exp_out = falloc(B * hp->n_embd);
    ctx->mm = xllm_mm_new(ctx->tp, xllm_cpu_level_default(), B, ctx->max_cols);
    ctx->kern = xllm_mm_kernels(ctx->mm);
    xllm_mm_use_packs(ctx->mm, model->packs); /* panels packed once at model load */
    ws->att_scratch = falloc((size_t)p.n_threads * (p.n_ctx + hp->head_dim));
    ws->seq_next = xllm_xcalloc((size_t)p.n_seq_max, sizeof(int32_t));
    ws->seq_last = xllm_xcalloc((size_t)p.n_seq_max, sizeof(int32_t));
    ctx->max_spans = xllm_kv_max_spans(ctx->kv);
    ws->spans = xllm_xcalloc((size_t)p.n_threads * (size_t)ctx->max_spans, sizeof(xllm_kv_span));
    ctx->out_row = xllm_xcalloc(B, sizeof(int32_t));
    *out = ctx;
    return XLLM_OK;
}

void xllm_context_free(xllm_context *ctx) {
    if (!ctx) return;
    xllm_mm_free(ctx->mm);
    xllm_threadpool_free(ctx->tp);
    xllm_kv_free(ctx->kv);
    xllm_workspace *ws = &ctx->ws;
    void *bufs[] = {ws->x,        ws->xn,      ws->q,           ws->k,        ws->v,
                    ws->att,      ws->ffn_a,   ws->ffn_b,       ws->out,      ws->rope_cos,
                    ws->rope_sin, ws->router,  ws->exp_ids,     ws->exp_w,    ws->rows,
                    ws->gather,   ws->exp_out, ws->att_scratch, ws->seq_next, ws->seq_last,
                    ws->spans};
    for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++) free(bufs[i]);
    free(ctx->logits);
    free(ctx->out_row);
    free(ctx);
}

int32_t xllm_context_n_ctx(const xllm_context *ctx) {
    return ctx->params.n_ctx;
}

int32_t xllm_context_n_seq_max(const xllm_context *ctx) {
    return ctx->params.n_seq_max;
}

int32_t xllm_seq_len(const xllm_context *ctx, int32_t seq_id) {
    if (seq_id < 0 || seq_id >= ctx->params.n_seq_max) return -1;
    return xllm_kv_seq_len(ctx->kv, seq_id);
}

xllm_status xllm_seq_truncate(xllm_context *ctx, int32_t seq_id, int32_t p0) {
    if (seq_id < 0 || seq_id >= ctx->params.n_seq_max || p0 < 0) return XLLM_ERR_INVALID_ARG;
    if (p0 == 0)
        xllm_kv_seq_free(ctx->kv, seq_id);
    else if (p0 < xllm_kv_seq_len(ctx->kv, seq_id))
        xllm_kv_seq_set_len(ctx->kv, seq_id, p0);
    return XLLM_OK;
}

int32_t xllm_seq_reuse_prefix(xllm_context *ctx, int32_t seq_id, const int32_t *tokens, int32_t n) {
    if (seq_id < 0 || seq_id >= ctx->params.n_seq_max || !tokens || n <= 0) return 0;
    if (n > ctx->params.n_ctx) n = ctx->params.n_ctx;
    return xllm_kv_seq_reuse_prefix(ctx->kv, seq_id, tokens, n);
}

void xllm_context_kv_stats(xllm_context *ctx, xllm_kv_stats *st) {
    xllm_kv_get_stats(ctx->kv, st);
}

xllm_status xllm_context_kv_events(xllm_context *ctx, uint64_t since, int32_t max,
                                   xllm_kv_events *out) {
    return xllm_kv_events_read(ctx->kv, since, max, out);
}

int32_t xllm_context_kv_block_tokens(const xllm_context *ctx) {
    return xllm_kv_block_tokens(ctx->kv);
}

const char *xllm_context_last_error(const xllm_context *ctx) {
    return xllm_kv_last_error(ctx->kv);
}

uint64_t xllm_context_tokens_evaluated(const xllm_context *ctx) {
    return ctx->n_evaluated;
}

void xllm_context_set_layer_hook(xllm_context *ctx, xllm_layer_hook fn, void *user) {
    ctx->layer_hook = fn;
    ctx->layer_hook_user = fn ? user : NULL;
}

const float *xllm_get_logits(const xllm_context *ctx, int32_t i) {
    if (i < 0 || i >= ctx->n_rows || ctx->out_row[i] < 0) return NULL;
    return ctx->logits + (size_t)ctx->out_row[i] * (size_t)ctx->model->hp.n_vocab;
}

xllm_status xllm_decode(xllm_context *ctx, const xllm_batch *b) {
    const int32_t n_seq = ctx->params.n_seq_max;
    const int32_t n_vocab = ctx->model->hp.n_vocab;
    xllm_workspace *ws = &ctx->ws;
    ctx->n_rows = 0;
    if (!b || b->n_tokens <= 0 || b->n_tokens > ctx->params.n_batch || !b->token || !b->pos ||
        !b->seq_id)
        return XLLM_ERR_INVALID_ARG;
    for (int32_t s = 0; s < n_seq; s++) {
        ws->seq_next[s] = xllm_kv_seq_len(ctx->kv, s);
        ws->seq_last[s] = -1;
    }
    for (int32_t i = 0; i < b->n_tokens; i++) {
        int32_t s = b->seq_id[i];
        if (s < 0 || s >= n_seq) return XLLM_ERR_INVALID_ARG;
        if (b->token[i] < 0 || b->token[i] >= n_vocab) return XLLM_ERR_INVALID_ARG;
        if (b->pos[i] != ws->seq_next[s]) return XLLM_ERR_INVALID_ARG;
        ws->seq_next[s]++;
        ws->seq_last[s] = i;
    }
    for (int32_t s = 0; s < n_seq; s++) {
        if (ws->seq_last[s] < 0) continue;
        xllm_status st = xllm_kv_reserve(ctx->kv, s, ws->seq_next[s]);
        if (st != XLLM_OK) return st;
    }
    for (int32_t i = 0; i < b->n_tokens; i++)
        xllm_kv_seq_set_tokens(ctx->kv, b->seq_id[i], b->pos[i], &b->token[i], 1);
    int32_t n_out = 0;
    for (int32_t i = 0; i < b->n_tokens; i++) {
        bool want = b->logits ? b->logits[i] != 0 : ws->seq_last[b->seq_id[i]] == i;
        ctx->out_row[i] = want ? n_out++ : -1;
    }
    if (n_out > ctx->logits_cap) {
        float *l = realloc(ctx->logits, (size_t)n_out * (size_t)n_vocab * sizeof(float));
        if (!l) return XLLM_ERR_NOMEM;
        ctx->logits = l;
        ctx->logits_cap = n_out;
    }
    xllm_status st = xllm_forward(ctx, b, n_out);
    if (st != XLLM_OK) return st;
    for (int32_t s = 0; s < n_seq; s++)
        if (ws->seq_last[s] >= 0) xllm_kv_seq_set_len(ctx->kv, s, ws->seq_next[s]);
    ctx->n_rows = b->n_tokens;
    ctx->n_evaluated += (uint64_t)b->n_tokens;
    return XLLM_OK;
}
