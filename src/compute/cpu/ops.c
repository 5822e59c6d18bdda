/* Portable CPU operators of the forward pass (see ops.h). */
#include "compute/cpu/ops.h"

#include <math.h>
#include <string.h>

#include "compute/dtype.h"
#include "util/common.h"

float xllm_op_dot_f32(const float *a, const float *b, int64_t n) {
    float acc[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) acc[j] += a[i + j] * b[i + j];
    float s = 0;
    for (; i < n; i++) s += a[i] * b[i];
    return s + ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

typedef struct matmul_task {
    const xllm_mat *w;
    const float *x;
    int64_t x_stride;
    float *y;
    int64_t y_stride;
    int64_t T;
    float *scratch;
} matmul_task;

static void matmul_worker(void *arg, int ith, int nth) {
    const matmul_task *t = arg;
    const xllm_mat *w = t->w;
    int64_t lo, hi;
    xllm_split_range(w->n_rows, ith, nth, &lo, &hi);
    float *row = t->scratch + (size_t)ith * (size_t)w->n_cols;
    for (int64_t r = lo; r < hi; r++) {
        const uint8_t *src = (const uint8_t *)w->data + (size_t)r * w->row_bytes;
        const float *wr;
        if (w->type == XLLM_DTYPE_F32) {
            wr = (const float *)src;
        } else {
            xllm_dequant_row_ref(w->type, src, row, w->n_cols);
            wr = row;
        }
        for (int64_t i = 0; i < t->T; i++)
            t->y[i * t->y_stride + r] = xllm_op_dot_f32(wr, t->x + i * t->x_stride, w->n_cols);
    }
}

void xllm_op_matmul(xllm_threadpool *tp, const xllm_mat *w, const float *x, int64_t x_stride,
                    float *y, int64_t y_stride, int64_t T, float *scratch) {
    matmul_task t = {w, x, x_stride, y, y_stride, T, scratch};
    xllm_threadpool_run(tp, matmul_worker, &t);
}

void xllm_op_rmsnorm(float *out, const float *x, const float *w, int64_t n, float eps) {
    double ss = 0;
    for (int64_t i = 0; i < n; i++) ss += (double)x[i] * x[i];
    float scale = (float)(1.0 / sqrt(ss / (double)n + eps));
    for (int64_t i = 0; i < n; i++) out[i] = x[i] * scale * w[i];
}

void xllm_op_rope(float *x, int n_heads, int head_dim, int n_rot, const float *cos_t,
                  const float *sin_t, int neox) {
    const int half = n_rot / 2;
    for (int h = 0; h < n_heads; h++) {
        float *v = x + (size_t)h * head_dim;
        for (int i = 0; i < half; i++) {
            int i0 = neox ? i : 2 * i;
            int i1 = neox ? i + half : 2 * i + 1;
            float a = v[i0], b = v[i1];
            v[i0] = a * cos_t[i] - b * sin_t[i];
            v[i1] = a * sin_t[i] + b * cos_t[i];
        }
    }
}

void xllm_op_swiglu(float *out, const float *g, const float *u, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

void xllm_op_softmax(float *x, int64_t n) {
    float mx = -INFINITY;
    for (int64_t i = 0; i < n; i++) mx = x[i] > mx ? x[i] : mx;
    double sum = 0;
    for (int64_t i = 0; i < n; i++) {
        x[i] = expf(x[i] - mx);
        sum += x[i];
    }
    float inv = (float)(1.0 / sum);
    for (int64_t i = 0; i < n; i++) x[i] *= inv;
}

static inline void load_row(float *dst, const void *src, xllm_dtype type, int n) {
    if (type == XLLM_DTYPE_F32) {
        memcpy(dst, src, (size_t)n * sizeof(float));
    } else {
        const uint16_t *h = src;
        for (int i = 0; i < n; i++) dst[i] = xllm_fp16_to_fp32(h[i]);
    }
}

void xllm_op_attention_head(const float *q, const void *k, const void *v, xllm_dtype kv_type,
                            size_t row_bytes, int64_t kv_off, int head_dim, int32_t n_pos,
                            float scale, float *scores, float *out) {
    const size_t es = kv_type == XLLM_DTYPE_F32 ? 4 : 2;
    float tmp[1024];
    XLLM_ASSERT(head_dim <= 1024);
    for (int32_t p = 0; p < n_pos; p++) {
        const uint8_t *kr = (const uint8_t *)k + (size_t)p * row_bytes + (size_t)kv_off * es;
        if (kv_type == XLLM_DTYPE_F32) {
            scores[p] = xllm_op_dot_f32(q, (const float *)kr, head_dim) * scale;
        } else {
            load_row(tmp, kr, kv_type, head_dim);
            scores[p] = xllm_op_dot_f32(q, tmp, head_dim) * scale;
        }
    }
    xllm_op_softmax(scores, n_pos);
    memset(out, 0, (size_t)head_dim * sizeof(float));
    for (int32_t p = 0; p < n_pos; p++) {
        const uint8_t *vr = (const uint8_t *)v + (size_t)p * row_bytes + (size_t)kv_off * es;
        const float *vf;
        if (kv_type == XLLM_DTYPE_F32) {
            vf = (const float *)vr;
        } else {
            load_row(tmp, vr, kv_type, head_dim);
            vf = tmp;
        }
        const float s = scores[p];
        for (int d = 0; d < head_dim; d++) out[d] += s * vf[d];
    }
}

/* Reference for the fused kernels: per query head, two passes over the visible positions (max,
 * then exp-sum and the weighted V sum), in the same float arithmetic as the head kernel. */
void xllm_op_attention_group(const xllm_attn_args *a) {
    if (a->n_kv > 1) { /* one KV head at a time */
        for (int h = 0; h < a->n_kv; h++) {
            xllm_attn_args one = *a;
            one.n_kv = 1;
            one.kv_off = a->kv_off + (int64_t)h * a->head_dim;
            one.q = a->q + (size_t)h * a->group * a->head_dim;
            one.out = a->out + (size_t)h * a->group * a->head_dim;
            xllm_op_attention_group(&one);
        }
        return;
    }
    const size_t es = a->kv_type == XLLM_DTYPE_F32 ? 4 : 2;
    const int D = a->head_dim;
    float kr[1024], acc[1024];
    XLLM_ASSERT(D <= 1024);
    for (int i = 0; i < a->n_tok; i++) {
        const int32_t np = a->n_pos + i;
        for (int j = 0; j < a->group; j++) {
            const float *q = a->q + (size_t)i * a->q_stride + (size_t)j * D;
            float *out = a->out + (size_t)i * a->out_stride + (size_t)j * D;
            float mx = -INFINITY;
            for (int32_t p = 0; p < np; p++) {
                const uint8_t *k =
                    (const uint8_t *)a->k + (size_t)p * a->row_bytes + a->kv_off * es;
                load_row(kr, k, a->kv_type, D);
                float sc = xllm_op_dot_f32(q, kr, D) * a->scale;
                mx = sc > mx ? sc : mx;
            }
            double sum = 0;
            memset(acc, 0, (size_t)D * sizeof(float));
            for (int32_t p = 0; p < np; p++) {
                const uint8_t *k =
                    (const uint8_t *)a->k + (size_t)p * a->row_bytes + a->kv_off * es;
                const uint8_t *v =
                    (const uint8_t *)a->v + (size_t)p * a->row_bytes + a->kv_off * es;
                load_row(kr, k, a->kv_type, D);
                const float e = expf(xllm_op_dot_f32(q, kr, D) * a->scale - mx);
                sum += e;
                load_row(kr, v, a->kv_type, D);
                for (int d = 0; d < D; d++) acc[d] += e * kr[d];
            }
            const float inv = (float)(1.0 / sum);
            for (int d = 0; d < D; d++) out[d] = acc[d] * inv;
        }
    }
}
