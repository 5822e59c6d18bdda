/* The batched forward pass shared by the llama, qwen2, qwen3 and qwen3moe families: every
 * token of the batch goes through the same matrix products; attention is per sequence. */
#include <math.h>
#include <stdatomic.h>
#include <string.h>

#include "compute/cpu/ops.h"
#include "compute/dtype.h"
#include "engine/attention.h"
#include "engine/engine-impl.h"
#include "util/common.h"

static xllm_mat mat_of(const xllm_weight *w, int64_t expert) {
    xllm_mat m = {.data =
                      (const uint8_t *)w->data + (size_t)expert * (size_t)w->ne[1] * w->row_bytes,
                  .type = w->type,
                  .n_rows = w->ne[1],
                  .n_cols = w->ne[0],
                  .row_bytes = w->row_bytes};
    return m;
}

/* Declares x (T, n) as the input of the next matmuls (quantized once for all of them). */
static void mm_input(xllm_context *ctx, const float *x, int64_t T, int64_t n) {
    xllm_mm_input(ctx->mm, x, n, T, n);
}

/* y (T, rows) (+)= input @ W^T with dense strides. */
static void matmul(xllm_context *ctx, const xllm_weight *w, int64_t expert, float *y, bool acc) {
    xllm_mat m = mat_of(w, expert);
    xllm_mm_run(ctx->mm, &m, y, m.n_rows, acc);
}

/* Two or three matmuls on the current input in one parallel region (c may be NULL). */
static void matmul3(xllm_context *ctx, const xllm_weight *a, const xllm_weight *b,
                    const xllm_weight *c, float *ya, float *yb, float *yc) {
    xllm_mat m[3] = {mat_of(a, 0), mat_of(b, 0), c ? mat_of(c, 0) : mat_of(a, 0)};
    const xllm_mat *w[3] = {&m[0], &m[1], &m[2]};
    float *y[3] = {ya, yb, yc};
    int64_t ys[3] = {m[0].n_rows, m[1].n_rows, m[2].n_rows};
    xllm_mm_run_multi(ctx->mm, c ? 3 : 2, w, y, ys, false);
}

static void add_bias(float *y, const xllm_weight *b, int64_t T, int64_t n) {
    if (!b->data) return;
    const float *bv = b->data;
    for (int64_t t = 0; t < T; t++)
        for (int64_t i = 0; i < n; i++) y[t * n + i] += bv[i];
}

/* ---------------------------------------------------------------------------------------- */
/* Attention                                                                                 */
/* ---------------------------------------------------------------------------------------- */

typedef struct attn_task {
    xllm_context *ctx;
    const xllm_batch *b;
    int il;
    atomic_int_fast64_t next; /* next work item to take (dynamic: robust to preemption) */
} attn_task;

/* Work items: runs of up to XLLM_ATTN_MAX_Q / group consecutive rows of one sequence (at
 * consecutive positions) times KV heads, taken by threads one at a time from a shared counter
 * (later positions cost more, and a preempted thread must not stall the others). */
static void attn_worker(void *arg, int ith, int nth) {
    attn_task *a = arg;
    xllm_context *ctx = a->ctx;
    const xllm_hparams *hp = &ctx->model->hp;
    const int H = hp->n_head, HK = hp->n_head_kv, D = hp->head_dim, group = H / HK;
    const int max_tok = group <= XLLM_ATTN_MAX_Q ? XLLM_ATTN_MAX_Q / group : 1;
    const float scale = 1.0f / sqrtf((float)D);
    const xllm_batch *b = a->b;
    float *scores = ctx->ws.att_scratch + (size_t)ith * (size_t)(ctx->params.n_ctx + D);
    xllm_kv_span *spans = ctx->ws.spans + (size_t)ith * (size_t)ctx->max_spans;
    int64_t item = 0, mine = atomic_fetch_add(&a->next, 1);
    for (int32_t t0 = 0; t0 < b->n_tokens;) {
        int32_t n = 1;
        while (t0 + n < b->n_tokens && n < max_tok && b->seq_id[t0 + n] == b->seq_id[t0] &&
               b->pos[t0 + n] == b->pos[t0] + n)
            n++;
        const int32_t s = b->seq_id[t0];
        const int32_t last_pos = b->pos[t0 + n - 1] + 1;
        /* all KV heads in one item (whole K / V rows read once) when the batch has enough
         * items for the threads anyway */
        const int nkv = b->n_tokens >= 2 * nth && n * group * HK <= XLLM_ATTN_MAX_Q ? HK : 1;
        for (int g = 0; g < HK; g += nkv, item++) {
            if (item != mine) continue;
            mine = atomic_fetch_add(&a->next, 1);
            const int32_t ns = xllm_kv_spans(ctx->kv, a->il, s, last_pos, spans, ctx->max_spans);
            if (ns != 1 || spans[0].pos0 != 0) {
                /* KV in several runs (paged layout): the per-head kernel reads run by run */
                for (int32_t t = t0; t < t0 + n; t++) {
                    const int32_t np = b->pos[t] + 1;
                    const int32_t nst = xllm_kv_spans(ctx->kv, a->il, s, np, spans, ctx->max_spans);
                    for (int h = g * group; h < (g + nkv) * group; h++)
                        xllm_attention_head(ctx->ws.q + ((size_t)t * H + h) * D, spans, nst,
                                            xllm_kv_type(ctx->kv), xllm_kv_row_bytes(ctx->kv),
                                            (int64_t)(h / group) * D, D, np, scale, scores,
                                            scores + ctx->params.n_ctx,
                                            ctx->ws.att + ((size_t)t * H + h) * D);
                }
                continue;
            }
            xllm_attn_args at = {
                .q = ctx->ws.q + ((size_t)t0 * H + (size_t)g * group) * D,
                .q_stride = (int64_t)H * D,
                .k = spans[0].k,
                .v = spans[0].v,
                .kv_type = xllm_kv_type(ctx->kv),
                .row_bytes = xllm_kv_row_bytes(ctx->kv),
                .kv_off = (int64_t)g * D,
                .head_dim = D,
                .group = group <= XLLM_ATTN_MAX_Q ? group : 1,
                .n_tok = n,
                .n_pos = b->pos[t0] + 1,
                .scale = scale,
                .out = ctx->ws.att + ((size_t)t0 * H + (size_t)g * group) * D,
                .out_stride = (int64_t)H * D,
                .n_kv = nkv,
            };
            if (group <= XLLM_ATTN_MAX_Q) {
                xllm_cpu_attention(ctx->kern, &at);
            } else {
                for (int j = 0; j < group; j++) {
                    xllm_attn_args one = at;
                    one.q += (size_t)j * D;
                    one.out += (size_t)j * D;
                    xllm_cpu_attention(ctx->kern, &one);
                }
            }
        }
        t0 += n;
    }
}

/* Stores rows t of ws.k / ws.v at their positions in the KV memory. */
static void store_kv(xllm_context *ctx, const xllm_batch *b, int il) {
    const xllm_hparams *hp = &ctx->model->hp;
    const int64_t n = (int64_t)hp->n_head_kv * hp->head_dim;
    const bool f32 = xllm_kv_type(ctx->kv) == XLLM_DTYPE_F32;
    for (int32_t t = 0; t < b->n_tokens; t++) {
        uint8_t *kd = xllm_kv_row_k(ctx->kv, il, b->seq_id[t], b->pos[t]);
        uint8_t *vd = xllm_kv_row_v(ctx->kv, il, b->seq_id[t], b->pos[t]);
        const float *ks = ctx->ws.k + t * n, *vs = ctx->ws.v + t * n;
        if (f32) {
            memcpy(kd, ks, (size_t)n * sizeof(float));
            memcpy(vd, vs, (size_t)n * sizeof(float));
        } else {
            xllm_cpu_to_f16(ctx->kern, ks, (uint16_t *)kd, n);
            xllm_cpu_to_f16(ctx->kern, vs, (uint16_t *)vd, n);
        }
    }
}

static void attention_block(xllm_context *ctx, const xllm_batch *b, int il) {
    const xllm_model *m = ctx->model;
    const xllm_hparams *hp = &m->hp;
    const xllm_layer *ly = &m->layers[il];
    xllm_workspace *ws = &ctx->ws;
    const int64_t T = b->n_tokens, E = hp->n_embd, D = hp->head_dim;
    const int64_t nq = (int64_t)hp->n_head * D, nk = (int64_t)hp->n_head_kv * D;
    const int half = hp->n_rot / 2;

    for (int64_t t = 0; t < T; t++)
        xllm_cpu_rmsnorm(ctx->kern, ws->xn + t * E, ws->x + t * E, ly->attn_norm.data, E,
                         hp->norm_eps);
    mm_input(ctx, ws->xn, T, E);
    matmul3(ctx, &ly->wq, &ly->wk, &ly->wv, ws->q, ws->k, ws->v);
    add_bias(ws->q, &ly->bq, T, nq);
    add_bias(ws->k, &ly->bk, T, nk);
    add_bias(ws->v, &ly->bv, T, nk);
    for (int64_t t = 0; t < T; t++) {
        float *q = ws->q + t * nq, *k = ws->k + t * nk;
        if (ly->q_norm.data) {
            for (int h = 0; h < hp->n_head; h++)
                xllm_cpu_rmsnorm(ctx->kern, q + h * D, q + h * D, ly->q_norm.data, D, hp->norm_eps);
            for (int h = 0; h < hp->n_head_kv; h++)
                xllm_cpu_rmsnorm(ctx->kern, k + h * D, k + h * D, ly->k_norm.data, D, hp->norm_eps);
        }
        const int neox = hp->rope_type == XLLM_ROPE_NEOX;
        xllm_op_rope(q, hp->n_head, (int)D, hp->n_rot, ws->rope_cos + t * half,
                     ws->rope_sin + t * half, neox);
        xllm_op_rope(k, hp->n_head_kv, (int)D, hp->n_rot, ws->rope_cos + t * half,
                     ws->rope_sin + t * half, neox);
    }
    store_kv(ctx, b, il);
    /* the layer's rows are final for this step: a transfer may copy them out now, and send them
     * while the rest of the pass computes */
    if (ctx->layer_hook) ctx->layer_hook(ctx->layer_hook_user, b, il);
    attn_task a = {.ctx = ctx, .b = b, .il = il};
    atomic_init(&a.next, 0);
    xllm_threadpool_run_shared(ctx->tp, attn_worker, &a);
    /* x += att @ Wo^T: the residual add is fused into the matmul's store */
    mm_input(ctx, ws->att, T, nq);
    matmul(ctx, &ly->wo, 0, ws->x, true);
}

/* ---------------------------------------------------------------------------------------- */
/* Feed-forward                                                                              */
/* ---------------------------------------------------------------------------------------- */

static void dense_ffn(xllm_context *ctx, const xllm_layer *ly, int64_t T) {
    xllm_workspace *ws = &ctx->ws;
    const int64_t F = ctx->model->hp.n_ff, E = ctx->model->hp.n_embd;
    mm_input(ctx, ws->xn, T, E);
    matmul3(ctx, &ly->ffn_gate, &ly->ffn_up, NULL, ws->ffn_a, ws->ffn_b, NULL);
    xllm_cpu_swiglu(ctx->kern, ws->ffn_a, ws->ffn_a, ws->ffn_b, T * F);
    /* x += ffn_a @ Wdown^T (residual fused) */
    mm_input(ctx, ws->ffn_a, T, F);
    matmul(ctx, &ly->ffn_down, 0, ws->x, true);
}

/* Mixture of experts: softmax router, top-k experts per token, weights renormalized over the
 * chosen ones; each expert runs once on all the tokens routed to it. */
static void moe_ffn(xllm_context *ctx, const xllm_layer *ly, int64_t T) {
    xllm_workspace *ws = &ctx->ws;
    const xllm_hparams *hp = &ctx->model->hp;
    const int64_t E = hp->n_embd, F = hp->n_ff_exp, NE = hp->n_expert, K = hp->n_expert_used;
    mm_input(ctx, ws->xn, T, E);
    matmul(ctx, &ly->ffn_gate_inp, 0, ws->router, false);
    for (int64_t t = 0; t < T; t++) {
        float *p = ws->router + t * NE;
        xllm_op_softmax(p, NE);
        int32_t *ids = ws->exp_ids + t * K;
        float *w = ws->exp_w + t * K;
        float sum = 0;
        for (int64_t j = 0; j < K; j++) {
            int32_t best = -1;
            for (int32_t e = 0; e < NE; e++) {
                bool taken = false;
                for (int64_t q = 0; q < j; q++) taken |= ids[q] == e;
                if (!taken && (best < 0 || p[e] > p[best])) best = e;
            }
            ids[j] = best;
            w[j] = p[best];
            sum += p[best];
        }
        if (hp->norm_topk_prob && sum > 0)
            for (int64_t j = 0; j < K; j++) w[j] /= sum;
    }
    memset(ws->out, 0, (size_t)(T * E) * sizeof(float));
    for (int32_t e = 0; e < NE; e++) {
        int64_t n = 0;
        for (int64_t t = 0; t < T; t++)
            for (int64_t j = 0; j < K; j++)
                if (ws->exp_ids[t * K + j] == e) {
                    ws->rows[n] = (int32_t)(t * K + j);
                    memcpy(ws->gather + n * E, ws->xn + t * E, (size_t)E * sizeof(float));
                    n++;
                }
        if (n == 0) continue;
        mm_input(ctx, ws->gather, n, E);
        matmul(ctx, &ly->gate_exps, e, ws->ffn_a, false);
        matmul(ctx, &ly->up_exps, e, ws->ffn_b, false);
        xllm_cpu_swiglu(ctx->kern, ws->ffn_a, ws->ffn_a, ws->ffn_b, n * F);
        mm_input(ctx, ws->ffn_a, n, F);
        matmul(ctx, &ly->down_exps, e, ws->exp_out, false);
        for (int64_t r = 0; r < n; r++) {
            const int64_t t = ws->rows[r] / K;
            const float w = ws->exp_w[ws->rows[r]];
            for (int64_t i = 0; i < E; i++) ws->out[t * E + i] += w * ws->exp_out[r * E + i];
        }
    }
}

/* ---------------------------------------------------------------------------------------- */
/* Whole pass                                                                                */
/* ---------------------------------------------------------------------------------------- */

static void rope_tables(xllm_context *ctx, const xllm_batch *b) {
    const xllm_model *m = ctx->model;
    const xllm_hparams *hp = &m->hp;
    const int half = hp->n_rot / 2;
    const float *ff = m->rope_freqs.data;
    for (int32_t t = 0; t < b->n_tokens; t++) {
        for (int i = 0; i < half; i++) {
            double freq = pow((double)hp->rope_freq_base, -2.0 * i / hp->n_rot);
            freq *= hp->rope_freq_scale;
            if (ff) freq /= ff[i];
            double theta = (double)b->pos[t] * freq;
            ctx->ws.rope_cos[t * half + i] = (float)cos(theta);
            ctx->ws.rope_sin[t * half + i] = (float)sin(theta);
        }
    }
}

xllm_status xllm_forward(xllm_context *ctx, const xllm_batch *b, int32_t n_out) {
    const xllm_model *m = ctx->model;
    const xllm_hparams *hp = &m->hp;
    xllm_workspace *ws = &ctx->ws;
    const int64_t T = b->n_tokens, E = hp->n_embd;

    /* (from the output's panels when the embeddings are tied and their dense rows released) */
    const xllm_mat embd = mat_of(&m->tok_embd, 0);
    for (int64_t t = 0; t < T; t++) xllm_mm_row(ctx->mm, &embd, b->token[t], ws->x + t * E);
    rope_tables(ctx, b);

    for (int il = 0; il < hp->n_layer; il++) {
        const xllm_layer *ly = &m->layers[il];
        attention_block(ctx, b, il);
        for (int64_t t = 0; t < T; t++)
            xllm_cpu_rmsnorm(ctx->kern, ws->xn + t * E, ws->x + t * E, ly->ffn_norm.data, E,
                             hp->norm_eps);
        if (hp->n_expert > 0) {
            moe_ffn(ctx, ly, T);
            for (int64_t i = 0; i < T * E; i++) ws->x[i] += ws->out[i];
        } else {
            dense_ffn(ctx, ly, T);
        }
    }

    if (n_out == 0) return XLLM_OK;
    /* final norm of the rows that want logits, packed in output order */
    for (int64_t t = 0; t < T; t++) {
        int32_t o = ctx->out_row[t];
        if (o >= 0)
            xllm_cpu_rmsnorm(ctx->kern, ws->xn + (int64_t)o * E, ws->x + t * E, m->output_norm.data,
                             E, hp->norm_eps);
    }
    mm_input(ctx, ws->xn, n_out, E);
    matmul(ctx, &m->output, 0, ctx->logits, false);
    return XLLM_OK;
}
