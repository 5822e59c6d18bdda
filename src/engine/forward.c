/* The batched forward pass shared by the llama, qwen2, qwen3 and qwen3moe families: every
 * token of the batch goes through the same matrix products; attention is per sequence. */
#include <math.h>
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

/* y (T, rows) = x (T, cols) @ W^T with dense strides. */
static void matmul(xllm_context *ctx, const xllm_weight *w, int64_t expert, const float *x,
                   float *y, int64_t T) {
    xllm_mat m = mat_of(w, expert);
    xllm_op_matmul(ctx->tp, &m, x, m.n_cols, y, m.n_rows, T, ctx->ws.scratch);
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
} attn_task;

static void attn_worker(void *arg, int ith, int nth) {
    const attn_task *a = arg;
    xllm_context *ctx = a->ctx;
    const xllm_hparams *hp = &ctx->model->hp;
    const int H = hp->n_head, D = hp->head_dim, group = hp->n_head / hp->n_head_kv;
    const float scale = 1.0f / sqrtf((float)D);
    const xllm_dtype type = xllm_kv_type(ctx->kv);
    const size_t rb = xllm_kv_row_bytes(ctx->kv);
    float *scores = ctx->ws.att_scratch + (size_t)ith * (size_t)(ctx->params.n_ctx + D);
    xllm_kv_span *spans = ctx->ws.spans + (size_t)ith * (size_t)ctx->max_spans;
    int64_t lo, hi;
    xllm_split_range((int64_t)a->b->n_tokens * H, ith, nth, &lo, &hi);
    int32_t cur_seq = -1, cur_pos = -1, n_spans = 0;
    for (int64_t idx = lo; idx < hi; idx++) {
        const int t = (int)(idx / H), h = (int)(idx % H);
        const int32_t s = a->b->seq_id[t], n_pos = a->b->pos[t] + 1;
        if (s != cur_seq || n_pos != cur_pos) {
            n_spans = xllm_kv_spans(ctx->kv, a->il, s, n_pos, spans, ctx->max_spans);
            cur_seq = s;
            cur_pos = n_pos;
        }
        xllm_attention_head(ctx->ws.q + ((size_t)t * H + h) * D, spans, n_spans, type, rb,
                            (int64_t)(h / group) * D, D, n_pos, scale, scores,
                            scores + ctx->params.n_ctx, ctx->ws.att + ((size_t)t * H + h) * D);
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
            uint16_t *kh = (uint16_t *)kd, *vh = (uint16_t *)vd;
            for (int64_t i = 0; i < n; i++) {
                kh[i] = xllm_fp32_to_fp16(ks[i]);
                vh[i] = xllm_fp32_to_fp16(vs[i]);
            }
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
        xllm_op_rmsnorm(ws->xn + t * E, ws->x + t * E, ly->attn_norm.data, E, hp->norm_eps);
    matmul(ctx, &ly->wq, 0, ws->xn, ws->q, T);
    matmul(ctx, &ly->wk, 0, ws->xn, ws->k, T);
    matmul(ctx, &ly->wv, 0, ws->xn, ws->v, T);
    add_bias(ws->q, &ly->bq, T, nq);
    add_bias(ws->k, &ly->bk, T, nk);
    add_bias(ws->v, &ly->bv, T, nk);
    for (int64_t t = 0; t < T; t++) {
        float *q = ws->q + t * nq, *k = ws->k + t * nk;
        if (ly->q_norm.data) {
            for (int h = 0; h < hp->n_head; h++)
                xllm_op_rmsnorm(q + h * D, q + h * D, ly->q_norm.data, D, hp->norm_eps);
            for (int h = 0; h < hp->n_head_kv; h++)
                xllm_op_rmsnorm(k + h * D, k + h * D, ly->k_norm.data, D, hp->norm_eps);
        }
        const int neox = hp->rope_type == XLLM_ROPE_NEOX;
        xllm_op_rope(q, hp->n_head, (int)D, hp->n_rot, ws->rope_cos + t * half,
                     ws->rope_sin + t * half, neox);
        xllm_op_rope(k, hp->n_head_kv, (int)D, hp->n_rot, ws->rope_cos + t * half,
                     ws->rope_sin + t * half, neox);
    }
    store_kv(ctx, b, il);
    attn_task a = {ctx, b, il};
    xllm_threadpool_run(ctx->tp, attn_worker, &a);
    matmul(ctx, &ly->wo, 0, ws->att, ws->out, T);
    for (int64_t i = 0; i < T * E; i++) ws->x[i] += ws->out[i];
}

/* ---------------------------------------------------------------------------------------- */
/* Feed-forward                                                                              */
/* ---------------------------------------------------------------------------------------- */

static void dense_ffn(xllm_context *ctx, const xllm_layer *ly, int64_t T) {
    xllm_workspace *ws = &ctx->ws;
    const int64_t F = ctx->model->hp.n_ff;
    matmul(ctx, &ly->ffn_gate, 0, ws->xn, ws->ffn_a, T);
    matmul(ctx, &ly->ffn_up, 0, ws->xn, ws->ffn_b, T);
    xllm_op_swiglu(ws->ffn_a, ws->ffn_a, ws->ffn_b, T * F);
    matmul(ctx, &ly->ffn_down, 0, ws->ffn_a, ws->out, T);
}

/* Mixture of experts: softmax router, top-k experts per token, weights renormalized over the
 * chosen ones; each expert runs once on all the tokens routed to it. */
static void moe_ffn(xllm_context *ctx, const xllm_layer *ly, int64_t T) {
    xllm_workspace *ws = &ctx->ws;
    const xllm_hparams *hp = &ctx->model->hp;
    const int64_t E = hp->n_embd, F = hp->n_ff_exp, NE = hp->n_expert, K = hp->n_expert_used;
    matmul(ctx, &ly->ffn_gate_inp, 0, ws->xn, ws->router, T);
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
        matmul(ctx, &ly->gate_exps, e, ws->gather, ws->ffn_a, n);
        matmul(ctx, &ly->up_exps, e, ws->gather, ws->ffn_b, n);
        xllm_op_swiglu(ws->ffn_a, ws->ffn_a, ws->ffn_b, n * F);
        matmul(ctx, &ly->down_exps, e, ws->ffn_a, ws->exp_out, n);
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

    for (int64_t t = 0; t < T; t++) {
        const uint8_t *row =
            (const uint8_t *)m->tok_embd.data + (size_t)b->token[t] * m->tok_embd.row_bytes;
        xllm_dequant_row_ref(m->tok_embd.type, row, ws->x + t * E, E);
    }
    rope_tables(ctx, b);

    for (int il = 0; il < hp->n_layer; il++) {
        const xllm_layer *ly = &m->layers[il];
        attention_block(ctx, b, il);
        for (int64_t t = 0; t < T; t++)
            xllm_op_rmsnorm(ws->xn + t * E, ws->x + t * E, ly->ffn_norm.data, E, hp->norm_eps);
        if (hp->n_expert > 0)
            moe_ffn(ctx, ly, T);
        else
            dense_ffn(ctx, ly, T);
        for (int64_t i = 0; i < T * E; i++) ws->x[i] += ws->out[i];
    }

    if (n_out == 0) return XLLM_OK;
    /* final norm of the rows that want logits, packed in output order */
    for (int64_t t = 0; t < T; t++) {
        int32_t o = ctx->out_row[t];
        if (o >= 0)
            xllm_op_rmsnorm(ws->xn + (int64_t)o * E, ws->x + t * E, m->output_norm.data, E,
                            hp->norm_eps);
    }
    matmul(ctx, &m->output, 0, ws->xn, ctx->logits, n_out);
    return XLLM_OK;
}
