/* AVX2 + FMA + F16C kernels: the packed 8-bit GEMM over the AVX-512 level's panels (16-bit
 * multiplies, no VNNI), GEMV over F32/F16/BF16 rows and over Q8_0 / Q4_K rows with 8-bit
 * activations (vpmaddubsw), fp32 packed GEMM for float weights, fused attention, SwiGLU, dot
 * products and norms. Compiled with AVX2 flags; only called after run-time dispatch has
 * checked the CPU. */
#if defined(__x86_64__)
#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "compute/cpu/kernels.h"
#include "util/common.h"
#include "compute/cpu/ops.h"
#include "compute/dtype.h"

static inline __m256 load8(xllm_dtype t, const uint8_t *row, int64_t i) {
    if (t == XLLM_DTYPE_F32) return _mm256_loadu_ps((const float *)row + i);
    const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)row + i));
    if (t == XLLM_DTYPE_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline float scalar_at(xllm_dtype t, const uint8_t *row, int64_t k) {
    return t == XLLM_DTYPE_F32   ? ((const float *)row)[k]
           : t == XLLM_DTYPE_F16 ? xllm_fp16_to_fp32(((const uint16_t *)row)[k])
                                 : xllm_bf16_to_fp32(((const uint16_t *)row)[k]);
}

static inline float hsum8(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}

static inline float half_at(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

static inline void store_dot(float *y, float v, bool acc) {
    *y = acc ? *y + v : v;
}

/* Q8_0 rows (blocks of 32: f16 d, 32 int8) x 8-bit activations (B = 32), T tokens: per block,
 * |w| (u8) times a with w's sign (s8) by vpmaddubsw (|w| <= 128, |a| <= 127: pair sums fit
 * int16), pairs to int32 by vpmaddwd, then one FMA by d_w * d_a. */
static inline __attribute__((always_inline)) void gemv_q8_0_t(const xllm_mat *w, int64_t r0,
                                                              int64_t r1, const xllm_q8act *a,
                                                              const int T, float *y,
                                                              int64_t y_stride, bool acc) {
    const int64_t K = w->n_cols, nb = K / 32;
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = (const uint8_t *)w->data + (size_t)r * w->row_bytes;
        __m256 s[XLLM_GEMV_MAX_T];
        for (int t = 0; t < T; t++) s[t] = _mm256_setzero_ps();
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *blk = row + 34 * b;
            const float dw = half_at(blk);
            const __m256i wq = _mm256_loadu_si256((const __m256i *)(blk + 2));
            const __m256i aw = _mm256_sign_epi8(wq, wq);
            for (int t = 0; t < T; t++) {
                const __m256i xq = _mm256_loadu_si256((const __m256i *)(a->q + t * K + 32 * b));
                const __m256i p =
                    _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(xq, wq)), ones);
                s[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(dw * a->d[t * nb + b]),
                                       s[t]);
            }
        }
        for (int t = 0; t < T; t++) store_dot(y + t * y_stride + r, hsum8(s[t]), acc);
    }
}

/* Q4_K rows (super-blocks of 256: f16 d, dmin, 12 bytes of 6-bit scales / mins, 128 bytes of
 * nibbles) x 8-bit activations (B = 256, sums per 16): the nibbles of a sub-block of 32 times
 * a by vpmaddubsw, times its scale by vpmaddwd, summed in int32 over the super-block; the mins
 * take the activation sums. */
static inline __attribute__((always_inline)) void gemv_q4_k_t(const xllm_mat *w, int64_t r0,
                                                              int64_t r1, const xllm_q8act *a,
                                                              const int T, float *y,
                                                              int64_t y_stride, bool acc) {
    const int64_t K = w->n_cols, nsb = K / 256;
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = (const uint8_t *)w->data + (size_t)r * w->row_bytes;
        __m256 s[XLLM_GEMV_MAX_T];
        float sm[XLLM_GEMV_MAX_T];
        for (int t = 0; t < T; t++) {
            s[t] = _mm256_setzero_ps();
            sm[t] = 0.0f;
        }
        for (int64_t sb = 0; sb < nsb; sb++) {
            const uint8_t *b = row + 144 * sb;
            const float d = half_at(b), dmin = half_at(b + 2);
            uint64_t sc, mn;
            xllm_k4_scales(b + 4, &sc, &mn);
            __m256i is[XLLM_GEMV_MAX_T];
            for (int t = 0; t < T; t++) is[t] = _mm256_setzero_si256();
            for (int c = 0; c < 4; c++) {
                const __m256i qb = _mm256_loadu_si256((const __m256i *)(b + 16 + 32 * c));
                const __m256i lo = _mm256_and_si256(qb, m4);
                const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(qb, 4), m4);
                const __m256i s0 = _mm256_set1_epi16((int16_t)((sc >> (16 * c)) & 0xff));
                const __m256i s1 = _mm256_set1_epi16((int16_t)((sc >> (16 * c + 8)) & 0xff));
                for (int t = 0; t < T; t++) {
                    const int8_t *aq = a->q + t * K + 256 * sb + 64 * c;
                    const __m256i p0 =
                        _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)aq));
                    const __m256i p1 =
                        _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(aq + 32)));
                    is[t] = _mm256_add_epi32(is[t], _mm256_madd_epi16(p0, s0));
                    is[t] = _mm256_add_epi32(is[t], _mm256_madd_epi16(p1, s1));
                }
            }
            for (int t = 0; t < T; t++) {
                const float da = a->d[t * nsb + sb];
                const int16_t *s16 = a->s16 + t * (K / 16) + 16 * sb;
                int msum = 0;
                for (int j = 0; j < 8; j++)
                    msum += (int)((mn >> (8 * j)) & 0xff) * (s16[2 * j] + s16[2 * j + 1]);
                s[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(is[t]), _mm256_set1_ps(d * da), s[t]);
                sm[t] += dmin * da * (float)msum;
            }
        }
        for (int t = 0; t < T; t++) store_dot(y + t * y_stride + r, hsum8(s[t]) - sm[t], acc);
    }
}

/* The quantized GEMV of one type for T (1..4, inlined per count: accumulators stay in
 * registers). */
#define GEMV_Q_T(fn, w, r0, r1, a, T, y, y_stride, acc)                                            \
    switch (T) {                                                                                   \
        case 1:                                                                                    \
            fn(w, r0, r1, a, 1, y, y_stride, acc);                                                 \
            break;                                                                                 \
        case 2:                                                                                    \
            fn(w, r0, r1, a, 2, y, y_stride, acc);                                                 \
            break;                                                                                 \
        case 3:                                                                                    \
            fn(w, r0, r1, a, 3, y, y_stride, acc);                                                 \
            break;                                                                                 \
        default:                                                                                   \
            fn(w, r0, r1, a, 4, y, y_stride, acc);                                                 \
    }

/* Float rows (F32 / F16 / BF16, converted in registers) x T float tokens, two chains a token;
 * T constant per instance so the sums stay in registers. */
static inline __attribute__((always_inline)) void gemv_f_t(const xllm_mat *w, int64_t r0,
                                                           int64_t r1, const float *x,
                                                           int64_t x_stride, const int T, float *y,
                                                           int64_t y_stride, bool acc) {
    const int64_t K = w->n_cols;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = (const uint8_t *)w->data + (size_t)r * w->row_bytes;
        __m256 s[XLLM_GEMV_MAX_T][2];
#pragma GCC unroll 4
        for (int t = 0; t < T; t++) s[t][0] = s[t][1] = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 16 <= K; i += 16) {
            const __m256 w0 = load8(w->type, row, i), w1 = load8(w->type, row, i + 8);
#pragma GCC unroll 4
            for (int t = 0; t < T; t++) {
                s[t][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + t * x_stride + i), s[t][0]);
                s[t][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + t * x_stride + i + 8), s[t][1]);
            }
        }
#pragma GCC unroll 4
        for (int t = 0; t < T; t++) {
            float v = hsum8(_mm256_add_ps(s[t][0], s[t][1]));
            for (int64_t k = i; k < K; k++) v += scalar_at(w->type, row, k) * x[t * x_stride + k];
            y[t * y_stride + r] = acc ? y[t * y_stride + r] + v : v;
        }
    }
}

#define GEMV_F_T(w, r0, r1, x, x_stride, T, y, y_stride, acc)                                      \
    switch (T) {                                                                                   \
        case 1:                                                                                    \
            gemv_f_t(w, r0, r1, x, x_stride, 1, y, y_stride, acc);                                 \
            break;                                                                                 \
        case 2:                                                                                    \
            gemv_f_t(w, r0, r1, x, x_stride, 2, y, y_stride, acc);                                 \
            break;                                                                                 \
        case 3:                                                                                    \
            gemv_f_t(w, r0, r1, x, x_stride, 3, y, y_stride, acc);                                 \
            break;                                                                                 \
        default:                                                                                   \
            gemv_f_t(w, r0, r1, x, x_stride, 4, y, y_stride, acc);                                 \
    }

static bool gemv(const xllm_mat *w, int64_t r0, int64_t r1, const float *x, int64_t x_stride,
                 const xllm_q8act *a, int64_t T, float *y, int64_t y_stride, bool acc) {
    if (w->type == XLLM_DTYPE_Q8_0) {
        if (r1 > r0) GEMV_Q_T(gemv_q8_0_t, w, r0, r1, a, (int)T, y, y_stride, acc);
        return true;
    }
    if (w->type == XLLM_DTYPE_Q4_K) {
        if (r1 > r0) GEMV_Q_T(gemv_q4_k_t, w, r0, r1, a, (int)T, y, y_stride, acc);
        return true;
    }
    if (w->type != XLLM_DTYPE_F32 && w->type != XLLM_DTYPE_F16 && w->type != XLLM_DTYPE_BF16)
        return false;
    if (r1 > r0) GEMV_F_T(w, r0, r1, x, x_stride, (int)T, y, y_stride, acc);
    return true;
}

/* Transposes 8 vectors in place: v[i] lane j becomes v[j] lane i. */
static inline void transpose8(__m256 v[8]) {
    __m256 t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(v[i], v[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(v[i], v[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int i = 0; i < 4; i++) {
        v[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
        v[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
    }
}

/* 16 rows as a (K, 16) float panel: 8 x 8 blocks converted in registers and transposed. */
static void pack_f(const xllm_mat *w, int64_t r0, int nr, float *panel) {
    const int64_t K = w->n_cols;
    const uint8_t *base = (const uint8_t *)w->data + (size_t)r0 * w->row_bytes;
    int64_t k = 0;
    for (; k + 8 <= K; k += 8)
        for (int h = 0; h < 2; h++) {
            __m256 v[8];
            for (int i = 0; i < 8; i++)
                v[i] = 8 * h + i < nr ? load8(w->type, base + (size_t)(8 * h + i) * w->row_bytes, k)
                                      : _mm256_setzero_ps();
            transpose8(v);
            for (int j = 0; j < 8; j++) _mm256_storeu_ps(panel + (k + j) * 16 + 8 * h, v[j]);
        }
    for (; k < K; k++)
        for (int r = 0; r < 16; r++)
            panel[k * 16 + r] =
                r < nr ? scalar_at(w->type, base + (size_t)r * w->row_bytes, k) : 0.0f;
}

static inline __attribute__((always_inline)) void
gemm_f_tile(const float *panel, int64_t K, const float *x, int64_t x_stride, int64_t t0,
            const int NT, int nr, float *y, int64_t y_stride, bool acc) {
    __m256 s[4][2];
#pragma GCC unroll 8
    for (int c = 0; c < NT; c++) s[c][0] = s[c][1] = _mm256_setzero_ps();
    const float *xr = x + t0 * x_stride;
    for (int64_t k = 0; k < K; k++) {
        const __m256 w0 = _mm256_loadu_ps(panel + k * 16), w1 = _mm256_loadu_ps(panel + k * 16 + 8);
#pragma GCC unroll 8
        for (int c = 0; c < NT; c++) {
            const __m256 xv = _mm256_broadcast_ss(xr + c * x_stride + k);
            s[c][0] = _mm256_fmadd_ps(w0, xv, s[c][0]);
            s[c][1] = _mm256_fmadd_ps(w1, xv, s[c][1]);
        }
    }
#pragma GCC unroll 8
    for (int c = 0; c < NT; c++) {
        float v[16];
        _mm256_storeu_ps(v, s[c][0]);
        _mm256_storeu_ps(v + 8, s[c][1]);
        float *yr = y + (t0 + c) * y_stride;
        for (int r = 0; r < nr; r++) yr[r] = acc ? yr[r] + v[r] : v[r];
    }
}

static void gemm_f(const float *panel, int64_t K, const float *x, int64_t x_stride, int64_t T,
                   int nr, float *y, int64_t y_stride, bool acc) {
    int64_t t = 0;
    for (; t + 4 <= T; t += 4) gemm_f_tile(panel, K, x, x_stride, t, 4, nr, y, y_stride, acc);
    switch (T - t) {
        case 3:
            gemm_f_tile(panel, K, x, x_stride, t, 3, nr, y, y_stride, acc);
            break;
        case 2:
            gemm_f_tile(panel, K, x, x_stride, t, 2, nr, y, y_stride, acc);
            break;
        case 1:
            gemm_f_tile(panel, K, x, x_stride, t, 1, nr, y, y_stride, acc);
            break;
        default:
            break;
    }
}

static float dot_f32(const float *a, const float *b, int64_t n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    float s = hsum8(_mm256_add_ps(s0, s1));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

static void rmsnorm(float *out, const float *x, const float *w, int64_t n, float eps) {
    const float sc = (float)(1.0 / sqrt((double)dot_f32(x, x, n) / (double)n + eps));
    for (int64_t i = 0; i < n; i++) out[i] = x[i] * sc * w[i];
}

/* ---- packed 8-bit GEMM (the AVX-512 level's panels and arithmetic, without VNNI) ---------- */

static inline int32_t ld32(const void *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* The 16 scales of group g of a panel, rows 0-7 and 8-15. */
static inline void qp_scales(const xllm_qpanel *p, int64_t g, int64_t qgs, int64_t sgs,
                             __m256 sv[2]) {
    if (p->h16) {
        const uint16_t *h = xllm_qpanel_sh(p, g, qgs);
        sv[0] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)h));
        sv[1] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + 8)));
    } else {
        sv[0] = _mm256_loadu_ps(p->s + g * sgs);
        sv[1] = _mm256_loadu_ps(p->s + g * sgs + 8);
    }
}

/* One panel (16 rows) x NT <= 4 tokens from t0. Per 4 elements, the panel's 64 bytes are two
 * registers of 8 rows x 4 u8 values, each token's 4 activations one broadcast dword; vpmaddubsw
 * + vpmaddwd make each row's 4-element sum in one int32 lane, as vpdpbusd does. Without
 * saturation: every form but Q8_0's stays within 0..127, and 2 x 127 x 127 < 32768; Q8_0's
 * values (q + 128) are made signed again and multiplied as |q| and a with q's sign (|q| <= 128),
 * which is the exact q . a that the AVX-512 kernels get as (q + 128) . a - 128 sum(a). Then the
 * group's fp32 scaling in the AVX-512 order: the same results. */
static inline __attribute__((always_inline)) void
gemm_q_tile(const xllm_qpanel *p, const int G, const int SYM, int64_t K, const xllm_q8act *a,
            int64_t t0, const int NT, int nr, float *y, int64_t y_stride, bool acc) {
    const int64_t ng = K / G, qgs = xllm_qpanel_qgs(p), sgs = xllm_qpanel_sgs(p);
    const __m256i ones = _mm256_set1_epi16(1), x80 = _mm256_set1_epi8((char)0x80);
    __m256 f[4][2];
    const int8_t *aq[4];
    const float *ag[4];
#pragma GCC unroll 4
    for (int c = 0; c < NT; c++) {
        aq[c] = a->q + (t0 + c) * K;
        ag[c] = a->g + (t0 + c) * ng * 2;
        f[c][0] = f[c][1] = _mm256_setzero_ps();
    }
    const int pfl = xllm_qpanel_group_lines(p, qgs);
    for (int64_t g = 0; g < ng; g++) {
        const uint8_t *wq = xllm_qpanel_q(p, g, qgs);
        xllm_pf_lines(wq, pfl);
        __m256i is[4][2];
#pragma GCC unroll 4
        for (int c = 0; c < NT; c++) is[c][0] = is[c][1] = _mm256_setzero_si256();
#pragma GCC unroll 8
        for (int kk = 0; kk < G / 4; kk++) {
            __m256i w[2], q[2];
#pragma GCC unroll 2
            for (int h = 0; h < 2; h++) {
                w[h] = _mm256_loadu_si256((const __m256i *)(wq + 64 * kk + 32 * h));
                if (SYM == 128) {
                    q[h] = _mm256_xor_si256(w[h], x80); /* q, signed */
                    w[h] = _mm256_abs_epi8(q[h]);       /* |q| as u8 (128 stays 128) */
                }
            }
#pragma GCC unroll 4
            for (int c = 0; c < NT; c++) {
                const __m256i av = _mm256_set1_epi32(ld32(aq[c] + g * G + 4 * kk));
#pragma GCC unroll 2
                for (int h = 0; h < 2; h++) {
                    const __m256i ah = SYM == 128 ? _mm256_sign_epi8(av, q[h]) : av;
                    is[c][h] = _mm256_add_epi32(
                        is[c][h], _mm256_madd_epi16(_mm256_maddubs_epi16(w[h], ah), ones));
                }
            }
        }
        __m256 sv[2];
        qp_scales(p, g, qgs, sgs, sv);
#pragma GCC unroll 4
        for (int c = 0; c < NT; c++) {
            if (SYM && SYM != 128) {
                /* the other symmetric types: the offset taken in int32, as -sym * sum(a) */
                const int16_t *s16 = a->s16 + (t0 + c) * (K / 16) + g * (G / 16);
                const __m256i corr = _mm256_set1_epi32(-SYM * (G == 32 ? s16[0] + s16[1] : s16[0]));
                is[c][0] = _mm256_add_epi32(is[c][0], corr);
                is[c][1] = _mm256_add_epi32(is[c][1], corr);
            }
            const __m256 d = _mm256_set1_ps(ag[c][2 * g]);
#pragma GCC unroll 2
            for (int h = 0; h < 2; h++) {
                f[c][h] =
                    _mm256_fmadd_ps(_mm256_cvtepi32_ps(is[c][h]), _mm256_mul_ps(sv[h], d), f[c][h]);
                if (!SYM)
                    f[c][h] = _mm256_fmadd_ps(_mm256_loadu_ps(p->m + g * sgs + 8 * h),
                                              _mm256_set1_ps(ag[c][2 * g + 1]), f[c][h]);
            }
        }
    }
#pragma GCC unroll 4
    for (int c = 0; c < NT; c++) {
        float *yc = y + (t0 + c) * y_stride;
        float v[16];
        _mm256_storeu_ps(v, f[c][0]);
        _mm256_storeu_ps(v + 8, f[c][1]);
        for (int r = 0; r < nr; r++) yc[r] = acc ? yc[r] + v[r] : v[r];
    }
}

static inline __attribute__((always_inline)) void gemm_q_g(const xllm_qpanel *p, int np,
                                                           const int G, const int SYM, int64_t K,
                                                           const xllm_q8act *a, int64_t T, int nr,
                                                           float *y, int64_t y_stride, bool acc) {
    for (int i = 0; i < np; i++) {
        const int nri = nr - 16 * i > 16 ? 16 : nr - 16 * i;
        float *yi = y + 16 * i;
        int64_t t = 0;
        for (; t + 4 <= T; t += 4) gemm_q_tile(&p[i], G, SYM, K, a, t, 4, nri, yi, y_stride, acc);
        switch (T - t) {
            case 3:
                gemm_q_tile(&p[i], G, SYM, K, a, t, 3, nri, yi, y_stride, acc);
                break;
            case 2:
                gemm_q_tile(&p[i], G, SYM, K, a, t, 2, nri, yi, y_stride, acc);
                break;
            case 1:
                gemm_q_tile(&p[i], G, SYM, K, a, t, 1, nri, yi, y_stride, acc);
                break;
            default:
                break;
        }
    }
}

static void gemm_q(const xllm_qpanel *p, int np, int64_t K, const xllm_q8act *a, int64_t T, int nr,
                   float *y, int64_t y_stride, bool acc) {
    XLLM_GEMM_Q_BY_FORM(gemm_q_g, p, np, K, a, T, nr, y, y_stride, acc);
}

/* ---- decode panels (xllm_pack_dpanel) ----------------------------------------------------- */

/* Each 64-byte vector of a decode panel is two registers here: rows 0-7 (h = 0) and 8-15. A
 * row's 4-element sums come from vpmaddubsw + vpmaddwd as in the GEMM; two vectors' vpmaddubsw
 * pairs are added in int16 first (values <= 63, |a| <= 128: 2 x 2 x 63 x 128 < 32768). */
static inline __m256i dp_dot2(__m256i v0, const int8_t *a0, __m256i v1, const int8_t *a1) {
    const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(v0, _mm256_set1_epi32(ld32(a0))),
                                       _mm256_maddubs_epi16(v1, _mm256_set1_epi32(ld32(a1))));
    return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
}

/* Bit 2 st + HI of each byte of the fifth bits h moved to bit 4. */
static inline __attribute__((always_inline)) __m256i dp_fifth(__m256i h, const int st,
                                                              const int HI) {
    const int s = 4 - 2 * st - HI;
    return _mm256_and_si256(s >= 0 ? _mm256_slli_epi16(h, s & 7) : _mm256_srli_epi16(h, -s & 7),
                            _mm256_set1_epi8(0x10));
}

/* One group of 32 elements against NT tokens (as the AVX-512 level's dp_group32): is[c][h] +=
 * the int32 dot products of rows 8 h.. 8 h + 7 with token c's activations (ap + c * K). */
static inline __attribute__((always_inline)) void dp_group32(const int FIVE, const int NT,
                                                             const uint8_t *og, const int8_t *ap,
                                                             int64_t K, __m256i (*is)[2]) {
    const __m256i m0f = _mm256_set1_epi8(0x0f);
#pragma GCC unroll 2
    for (int h = 0; h < 2; h++) {
        const __m256i hb = FIVE ? _mm256_loadu_si256((const __m256i *)(og + 256 + 32 * h))
                                : _mm256_setzero_si256();
#pragma GCC unroll 4
        for (int st = 0; st < 4; st++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(og + 64 * st + 32 * h));
            __m256i vl = _mm256_and_si256(v, m0f),
                    vh = _mm256_and_si256(_mm256_srli_epi16(v, 4), m0f);
            if (FIVE) {
                vl = _mm256_or_si256(vl, dp_fifth(hb, st, 0));
                vh = _mm256_or_si256(vh, dp_fifth(hb, st, 1));
            }
#pragma GCC unroll 4
            for (int c = 0; c < NT; c++) {
                const int8_t *a = ap + c * K + 8 * st;
                is[c][h] = _mm256_add_epi32(is[c][h], dp_dot2(vl, a, vh, a + 4));
            }
        }
    }
}

/* The end of a K-quant super-block sb, per half: f += isc * d * d_a (- imn * dmin * d_a). */
static inline __attribute__((always_inline)) void
dp_sb_end(const int MIN, const int NT, const uint8_t *o, const xllm_q8act *a, int64_t nsb,
          int64_t sb, __m256i (*isc)[2], __m256i (*imn)[2], __m256 (*f)[2]) {
#pragma GCC unroll 2
    for (int h = 0; h < 2; h++) {
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(o + 256 + 16 * h)));
        const __m256 dm =
            MIN ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(o + 288 + 16 * h)))
                : _mm256_setzero_ps();
#pragma GCC unroll 4
        for (int c = 0; c < NT; c++) {
            const __m256 da = _mm256_set1_ps(a->d[c * nsb + sb]);
            f[c][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isc[c][h]), _mm256_mul_ps(d, da), f[c][h]);
            if (MIN)
                f[c][h] =
                    _mm256_fnmadd_ps(_mm256_cvtepi32_ps(imn[c][h]), _mm256_mul_ps(dm, da), f[c][h]);
        }
    }
}

static inline void dp_store(const int NT, __m256 (*f)[2], int nr, float *y, int64_t y_stride,
                            bool acc) {
    for (int c = 0; c < NT; c++) {
        float v[16], *yc = y + c * y_stride;
        _mm256_storeu_ps(v, f[c][0]);
        _mm256_storeu_ps(v + 8, f[c][1]);
        for (int r = 0; r < nr; r++) yc[r] = acc ? yc[r] + v[r] : v[r];
    }
}

/* 8 bytes of a panel's per-row scales (rows 8 h..) widened to int32. */
static inline __m256i dp_u8x8(const uint8_t *p) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
}

/* Q4_0 / Q4_1 / Q5_0 / Q5_1 panel x NT tokens. */
static inline __attribute__((always_inline)) void
gemv_dp_leg_t(const int FIVE, const int ONE, const uint8_t *panel, int64_t K, const xllm_q8act *a,
              const int NT, int nr, float *y, int64_t y_stride, bool acc) {
    const int64_t nb = K / 32;
    const int bb = xllm_dp_leg_size(FIVE, ONE), doff = xllm_dp_leg_doff(FIVE), sym = FIVE ? 16 : 8;
    __m256 f[XLLM_GEMV_MAX_T][2];
    for (int c = 0; c < NT; c++) f[c][0] = f[c][1] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *o = panel + b * bb;
        __m256i is[XLLM_GEMV_MAX_T][2];
        xllm_pf_lines(o, (bb + 63) / 64);
#pragma GCC unroll 4
        for (int c = 0; c < NT; c++) {
            const int16_t *s16 = a->s16 + c * (K / 16) + 2 * b;
            is[c][0] = is[c][1] =
                ONE ? _mm256_setzero_si256() : _mm256_set1_epi32(-sym * (s16[0] + s16[1]));
        }
        dp_group32(FIVE, NT, o, a->q + 32 * b, K, is);
#pragma GCC unroll 2
        for (int h = 0; h < 2; h++) {
            const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(o + doff + 16 * h)));
            const __m256 m =
                ONE ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(o + doff + 32 + 16 * h)))
                    : _mm256_setzero_ps();
#pragma GCC unroll 4
            for (int c = 0; c < NT; c++) {
                const float *g = a->g + (c * nb + b) * 2;
                f[c][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(is[c][h]),
                                          _mm256_mul_ps(d, _mm256_set1_ps(g[0])), f[c][h]);
                if (ONE) f[c][h] = _mm256_fmadd_ps(m, _mm256_set1_ps(g[1]), f[c][h]);
            }
        }
    }
    dp_store(NT, f, nr, y, y_stride, acc);
}

/* Q4_K / Q5_K panel x NT tokens. */
static inline __attribute__((always_inline)) void
gemv_dp_q4k_t(const int FIVE, const uint8_t *panel, int64_t K, const xllm_q8act *a, const int NT,
              int nr, float *y, int64_t y_stride, bool acc) {
    const int64_t nsb = K / XLLM_QK_K, sbb = FIVE ? XLLM_DP_Q5K_SB : XLLM_DP_Q4K_SB;
    __m256 f[XLLM_GEMV_MAX_T][2];
    for (int c = 0; c < NT; c++) f[c][0] = f[c][1] = _mm256_setzero_ps();
    for (int64_t sb = 0; sb < nsb; sb++) {
        const uint8_t *o = panel + sb * sbb;
        __m256i isc[XLLM_GEMV_MAX_T][2], imn[XLLM_GEMV_MAX_T][2];
        for (int c = 0; c < NT; c++)
            isc[c][0] = isc[c][1] = imn[c][0] = imn[c][1] = _mm256_setzero_si256();
        xllm_pf_lines(o, 5);
        for (int g = 0; g < 8; g++) {
            xllm_pf_lines(o + 320 + (FIVE ? 320 : 256) * g, FIVE ? 5 : 4);
            __m256i is[XLLM_GEMV_MAX_T][2];
            for (int c = 0; c < NT; c++) is[c][0] = is[c][1] = _mm256_setzero_si256();
            dp_group32(FIVE, NT, o + 320 + (FIVE ? 320 : 256) * g, a->q + sb * XLLM_QK_K + 32 * g,
                       K, is);
#pragma GCC unroll 2
            for (int h = 0; h < 2; h++) {
                const __m256i sc = dp_u8x8(o + 16 * g + 8 * h),
                              mn = dp_u8x8(o + 128 + 16 * g + 8 * h);
#pragma GCC unroll 4
                for (int c = 0; c < NT; c++) {
                    const int16_t *s16 = a->s16 + c * (K / 16) + sb * 16 + 2 * g;
                    isc[c][h] = _mm256_add_epi32(isc[c][h], _mm256_mullo_epi32(is[c][h], sc));
                    imn[c][h] = _mm256_add_epi32(
                        imn[c][h], _mm256_mullo_epi32(mn, _mm256_set1_epi32(s16[0] + s16[1])));
                }
            }
        }
        dp_sb_end(1, NT, o, a, nsb, sb, isc, imn, f);
    }
    dp_store(NT, f, nr, y, y_stride, acc);
}

/* Q6_K panel x NT tokens: the 6-bit values rebuilt from the low nibbles and the high bit
 * pairs, per sub-block of 16 from -32 times the activations' sum, times the int8 scale. */
static inline __attribute__((always_inline)) void gemv_dp_q6k_t(const uint8_t *panel, int64_t K,
                                                                const xllm_q8act *a, const int NT,
                                                                int nr, float *y, int64_t y_stride,
                                                                bool acc) {
    const int64_t nsb = K / XLLM_QK_K;
    const __m256i m0f = _mm256_set1_epi8(0x0f), m30 = _mm256_set1_epi8(0x30);
    __m256 f[XLLM_GEMV_MAX_T][2];
    for (int c = 0; c < NT; c++) f[c][0] = f[c][1] = _mm256_setzero_ps();
    for (int64_t sb = 0; sb < nsb; sb++) {
        const uint8_t *o = panel + sb * XLLM_DP_Q6K_SB;
        __m256i isc[XLLM_GEMV_MAX_T][2];
        for (int c = 0; c < NT; c++) isc[c][0] = isc[c][1] = _mm256_setzero_si256();
        xllm_pf_lines(o, 5);
        for (int u = 0; u < 16; u++) {
            xllm_pf_lines(o + 320 + 192 * u, 3);
#pragma GCC unroll 2
            for (int hh = 0; hh < 2; hh++) {
                const uint8_t *ou = o + 320 + 192 * u + 32 * hh;
                const __m256i n0 = _mm256_loadu_si256((const __m256i *)ou);
                const __m256i n1 = _mm256_loadu_si256((const __m256i *)(ou + 64));
                const __m256i h = _mm256_loadu_si256((const __m256i *)(ou + 128));
                const __m256i v0 = _mm256_or_si256(_mm256_and_si256(n0, m0f),
                                                   _mm256_and_si256(_mm256_slli_epi16(h, 4), m30));
                const __m256i v1 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(n0, 4), m0f),
                                                   _mm256_and_si256(_mm256_slli_epi16(h, 2), m30));
                const __m256i v2 =
                    _mm256_or_si256(_mm256_and_si256(n1, m0f), _mm256_and_si256(h, m30));
                const __m256i v3 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(n1, 4), m0f),
                                                   _mm256_and_si256(_mm256_srli_epi16(h, 2), m30));
                const __m256i sc =
                    _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(o + 16 * u + 8 * hh)));
#pragma GCC unroll 4
                for (int c = 0; c < NT; c++) {
                    const int8_t *ap = a->q + c * K + sb * XLLM_QK_K + 16 * u;
                    const __m256i i = _mm256_add_epi32(
                        _mm256_add_epi32(dp_dot2(v0, ap, v1, ap + 4),
                                         dp_dot2(v2, ap + 8, v3, ap + 12)),
                        _mm256_set1_epi32(-32 * a->s16[c * (K / 16) + sb * 16 + u]));
                    isc[c][hh] = _mm256_add_epi32(isc[c][hh], _mm256_mullo_epi32(i, sc));
                }
            }
        }
        dp_sb_end(0, NT, o, a, nsb, sb, isc, isc, f);
    }
    dp_store(NT, f, nr, y, y_stride, acc);
}

/* Q2_K (THREE = 0) / Q3_K panel x NT tokens: the 2-bit values by shifts and masks (Q3_K: the
 * third bits from 32 of a mask's bits, spread to bytes by a shuffle and a compare). */
static inline __attribute__((always_inline)) void
gemv_dp_q23k_t(const int THREE, const uint8_t *panel, int64_t K, const xllm_q8act *a, const int NT,
               int nr, float *y, int64_t y_stride, bool acc) {
    const int64_t nsb = K / XLLM_QK_K, sbb = THREE ? XLLM_DP_Q3K_SB : XLLM_DP_Q2K_SB;
    const __m256i m03 = _mm256_set1_epi8(3), m04 = _mm256_set1_epi8(4);
    const __m256i bsel = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2,
                                          2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bbit = _mm256_set1_epi64x((long long)0x8040201008040201ull);
    __m256 f[XLLM_GEMV_MAX_T][2];
    for (int c = 0; c < NT; c++) f[c][0] = f[c][1] = _mm256_setzero_ps();
    for (int64_t sb = 0; sb < nsb; sb++) {
        const uint8_t *o = panel + sb * sbb;
        __m256i isc[XLLM_GEMV_MAX_T][2], imn[XLLM_GEMV_MAX_T][2];
        for (int c = 0; c < NT; c++)
            isc[c][0] = isc[c][1] = imn[c][0] = imn[c][1] = _mm256_setzero_si256();
        xllm_pf_lines(o, 5);
        for (int u = 0; u < 16; u++) {
            const uint8_t *ou = THREE ? o + 288 + 96 * u : o + 320 + 64 * u;
            xllm_pf_lines(ou, THREE ? 2 : 1);
#pragma GCC unroll 2
            for (int h = 0; h < 2; h++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(ou + 32 * h));
                __m256i vi[4];
#pragma GCC unroll 4
                for (int i = 0; i < 4; i++) {
                    vi[i] = _mm256_and_si256(i ? _mm256_srli_epi16(v, 2 * i) : v, m03);
                    if (THREE) {
                        uint32_t hm;
                        memcpy(&hm, ou + 64 + 8 * i + 4 * h, 4);
                        const __m256i bits = _mm256_and_si256(
                            _mm256_shuffle_epi8(_mm256_set1_epi32((int)hm), bsel), bbit);
                        vi[i] = _mm256_add_epi8(
                            vi[i], _mm256_and_si256(_mm256_cmpeq_epi8(bits, bbit), m04));
                    }
                }
                __m256i sc, mn = _mm256_setzero_si256();
                if (THREE) {
                    sc = _mm256_cvtepi8_epi32(
                        _mm_loadl_epi64((const __m128i *)(o + 16 * u + 8 * h)));
                } else {
                    const __m256i sm = dp_u8x8(o + 16 * u + 8 * h);
                    sc = _mm256_and_si256(sm, _mm256_set1_epi32(15));
                    mn = _mm256_srli_epi32(sm, 4);
                }
#pragma GCC unroll 4
                for (int c = 0; c < NT; c++) {
                    const int8_t *ap = a->q + c * K + sb * XLLM_QK_K + 16 * u;
                    const int s = a->s16[c * (K / 16) + sb * 16 + u];
                    __m256i i = _mm256_add_epi32(dp_dot2(vi[0], ap, vi[1], ap + 4),
                                                 dp_dot2(vi[2], ap + 8, vi[3], ap + 12));
                    if (THREE) i = _mm256_add_epi32(i, _mm256_set1_epi32(-4 * s));
                    isc[c][h] = _mm256_add_epi32(isc[c][h], _mm256_mullo_epi32(i, sc));
                    if (!THREE)
                        imn[c][h] = _mm256_add_epi32(imn[c][h],
                                                     _mm256_mullo_epi32(mn, _mm256_set1_epi32(s)));
                }
            }
        }
        dp_sb_end(!THREE, NT, o, a, nsb, sb, isc, imn, f);
    }
    dp_store(NT, f, nr, y, y_stride, acc);
}

XLLM_DEFINE_GEMV_DP

/* ---- elementwise ------------------------------------------------------------------------- */

/* e^x for x <= 88.38; below -87.3 the result is 2^-126 scaled down to about e^-87 (no
 * subnormals): callers mask out what must be exactly 0. Cody-Waite reduction, degree-6
 * polynomial, as the AVX-512 level's exp512. */
static inline __m256 exp256(__m256 x) {
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-87.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    /* 2^n with n in [-126, 128): the biased exponent put in place (n = 128 only at the clamp,
     * where p * 2^127 * 2 is taken in two steps) */
    const __m256i e = _mm256_cvtps_epi32(n);
    const __m256i e1 = _mm256_srai_epi32(e, 1), e2 = _mm256_sub_epi32(e, e1);
    const __m256 s1 =
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e1, _mm256_set1_epi32(127)), 23));
    const __m256 s2 =
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e2, _mm256_set1_epi32(127)), 23));
    return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
}

static void swiglu(float *out, const float *g, const float *u, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 gv = _mm256_loadu_ps(g + i);
        const __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), gv));
        _mm256_storeu_ps(out + i,
                         _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.0f), e)),
                                       _mm256_loadu_ps(u + i)));
    }
    for (; i < n; i++) out[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

/* ---- fused attention --------------------------------------------------------------------- */

/* 8 floats of a K / V row (F32 or F16) at element d. */
static inline __m256 kv8(const uint8_t *row, xllm_dtype t, int d) {
    return t == XLLM_DTYPE_F32
               ? _mm256_loadu_ps((const float *)row + d)
               : _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)row + d)));
}

/* Sums each of 8 vectors' lanes: lane j of the result is the sum of v[j]. */
static inline __m256 hsum8x8(const __m256 v[8]) {
    const __m256 a = _mm256_hadd_ps(v[0], v[1]), b = _mm256_hadd_ps(v[2], v[3]);
    const __m256 c = _mm256_hadd_ps(v[4], v[5]), d = _mm256_hadd_ps(v[6], v[7]);
    const __m256 ab = _mm256_hadd_ps(a, b), cd = _mm256_hadd_ps(c, d);
    /* ab: [0 1 2 3 | 0 1 2 3] halves of v0..v3; cd likewise for v4..v7 */
    return _mm256_add_ps(_mm256_permute2f128_ps(ab, cd, 0x20),
                         _mm256_permute2f128_ps(ab, cd, 0x31));
}

/* Online-softmax attention over blocks of 8 positions, each block's K / V rows converted once
 * and shared by every query of the call (the query heads of a group, several tokens); the same
 * contract as xllm_op_attention_group. */
static void attention(const xllm_attn_args *a) {
    const int D = a->head_dim, H = a->n_kv > 0 ? a->n_kv : 1, nqh = a->n_tok * a->group;
    if (D % 8 != 0 || D > 256) {
        xllm_op_attention_group(a);
        return;
    }
    const size_t es = a->kv_type == XLLM_DTYPE_F32 ? 4 : 2;
    float qf[XLLM_ATTN_MAX_Q][256] __attribute__((aligned(32)));
    float o[XLLM_ATTN_MAX_Q][256] __attribute__((aligned(32)));
    float kb[8][256] __attribute__((aligned(32))), vb[8][256] __attribute__((aligned(32)));
    float mx[XLLM_ATTN_MAX_Q], l[XLLM_ATTN_MAX_Q];
    int32_t lim[XLLM_ATTN_MAX_Q];
    const int32_t n_max = a->n_pos + a->n_tok - 1;
    for (int hh = 0; hh < H; hh++) {
        for (int i = 0; i < nqh; i++) {
            const int tok = i / a->group, h = hh * a->group + i % a->group;
            const float *q = a->q + (size_t)tok * a->q_stride + (size_t)h * D;
            for (int d = 0; d < D; d += 8)
                _mm256_store_ps(qf[i] + d,
                                _mm256_mul_ps(_mm256_loadu_ps(q + d), _mm256_set1_ps(a->scale)));
            memset(o[i], 0, (size_t)D * sizeof(float));
            mx[i] = -INFINITY;
            l[i] = 0.0f;
            lim[i] = a->n_pos + tok;
        }
        const uint8_t *kbase = (const uint8_t *)a->k + (size_t)(a->kv_off + (int64_t)hh * D) * es;
        const uint8_t *vbase = (const uint8_t *)a->v + (size_t)(a->kv_off + (int64_t)hh * D) * es;
        for (int32_t p0 = 0; p0 < n_max; p0 += 8) {
            const int pb = n_max - p0 < 8 ? n_max - p0 : 8;
            for (int p = 0; p < pb; p++) {
                const uint8_t *kr = kbase + (size_t)(p0 + p) * a->row_bytes;
                const uint8_t *vr = vbase + (size_t)(p0 + p) * a->row_bytes;
                for (int d = 0; d < D; d += 8) {
                    _mm256_store_ps(kb[p] + d, kv8(kr, a->kv_type, d));
                    _mm256_store_ps(vb[p] + d, kv8(vr, a->kv_type, d));
                }
            }
            for (int i = 0; i < nqh; i++) {
                const int cnt = lim[i] - p0 < pb ? lim[i] - p0 : pb;
                if (cnt <= 0) continue;
                __m256 dv[8];
                for (int p = 0; p < 8; p++) {
                    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
                    if (p < cnt) {
                        int d = 0;
                        for (; d + 16 <= D; d += 16) {
                            s0 = _mm256_fmadd_ps(_mm256_load_ps(qf[i] + d),
                                                 _mm256_load_ps(kb[p] + d), s0);
                            s1 = _mm256_fmadd_ps(_mm256_load_ps(qf[i] + d + 8),
                                                 _mm256_load_ps(kb[p] + d + 8), s1);
                        }
                        if (d < D)
                            s0 = _mm256_fmadd_ps(_mm256_load_ps(qf[i] + d),
                                                 _mm256_load_ps(kb[p] + d), s0);
                    }
                    dv[p] = _mm256_add_ps(s0, s1);
                }
                const __m256 sc = hsum8x8(dv);
                float sv[8] __attribute__((aligned(32)));
                _mm256_store_ps(sv, sc);
                float bm = sv[0];
                for (int p = 1; p < cnt; p++) bm = sv[p] > bm ? sv[p] : bm;
                const float mnew = bm > mx[i] ? bm : mx[i];
                /* 0 on the first block (m = -inf), 1 while the max stays */
                const float alpha = mnew == mx[i] ? 1.0f : expf(mx[i] - mnew);
                __m256 pv = exp256(_mm256_sub_ps(sc, _mm256_set1_ps(mnew)));
                const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
                pv = _mm256_and_ps(
                    pv, _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(cnt), lane)));
                _mm256_store_ps(sv, pv);
                float psum = 0.0f;
                for (int p = 0; p < cnt; p++) psum += sv[p];
                l[i] = l[i] * alpha + psum;
                mx[i] = mnew;
                const __m256 av = _mm256_set1_ps(alpha);
                for (int d = 0; d < D; d += 8) {
                    __m256 ov = _mm256_mul_ps(_mm256_load_ps(o[i] + d), av);
                    for (int p = 0; p < cnt; p++)
                        ov = _mm256_fmadd_ps(_mm256_set1_ps(sv[p]), _mm256_load_ps(vb[p] + d), ov);
                    _mm256_store_ps(o[i] + d, ov);
                }
            }
        }
        for (int i = 0; i < nqh; i++) {
            const int tok = i / a->group, h = hh * a->group + i % a->group;
            float *out = a->out + (size_t)tok * a->out_stride + (size_t)h * D;
            const __m256 inv = _mm256_set1_ps(1.0f / l[i]);
            for (int d = 0; d < D; d += 8)
                _mm256_storeu_ps(out + d, _mm256_mul_ps(_mm256_load_ps(o[i] + d), inv));
        }
    }
}

static const xllm_cpu_kernels k_avx2 = {
    .level = XLLM_CPU_AVX2,
    .quant_row = xllm_quant_row_q8_scalar,
    .gemv = gemv,
    .pack_q = xllm_pack_q_portable,
    .gemm_q = gemm_q,
    .gemv_dp = gemv_dp,
    .pack_f = pack_f,
    .gemm_f = gemm_f,
    .dot_f32 = dot_f32,
    .rmsnorm = rmsnorm,
    .swiglu = swiglu,
    .attention = attention,
};

const xllm_cpu_kernels *xllm_cpu_kernels_avx2(void) {
    return &k_avx2;
}
#endif
