/* AVX2 + FMA + F16C kernels: GEMV over F32/F16/BF16 rows and over Q8_0 / Q4_K rows with 8-bit
 * activations (vpmaddubsw), fp32 packed GEMM (other quantized weights, and batches, reach it
 * through the driver's dequantizing pack), dot products and norms. Compiled
 * with AVX2 flags; only called after run-time dispatch has checked the CPU. */
#if defined(__x86_64__)
#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "compute/cpu/kernels.h"
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
    const int64_t K = w->n_cols;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = (const uint8_t *)w->data + (size_t)r * w->row_bytes;
        __m256 s[XLLM_GEMV_MAX_T][2];
        for (int t = 0; t < T; t++) s[t][0] = s[t][1] = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 16 <= K; i += 16) {
            const __m256 w0 = load8(w->type, row, i), w1 = load8(w->type, row, i + 8);
            for (int t = 0; t < T; t++) {
                s[t][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + t * x_stride + i), s[t][0]);
                s[t][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + t * x_stride + i + 8), s[t][1]);
            }
        }
        for (int t = 0; t < T; t++) {
            float v = hsum8(_mm256_add_ps(s[t][0], s[t][1]));
            for (int64_t k = i; k < K; k++) v += scalar_at(w->type, row, k) * x[t * x_stride + k];
            y[t * y_stride + r] = acc ? y[t * y_stride + r] + v : v;
        }
    }
    return true;
}

static void pack_f(const xllm_mat *w, int64_t r0, int nr, float *panel) {
    const int64_t K = w->n_cols;
    for (int r = 0; r < 16; r++) {
        const uint8_t *row = (const uint8_t *)w->data + (size_t)(r0 + r) * w->row_bytes;
        for (int64_t k = 0; k < K; k++)
            panel[k * 16 + r] = r < nr ? scalar_at(w->type, row, k) : 0.0f;
    }
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

static const xllm_cpu_kernels k_avx2 = {
    .level = XLLM_CPU_AVX2,
    .quant_row = xllm_quant_row_q8_scalar,
    .gemv = gemv,
    .pack_f = pack_f,
    .gemm_f = gemm_f,
    .dot_f32 = dot_f32,
    .rmsnorm = rmsnorm,
    .swiglu = xllm_op_swiglu,
    .attention = xllm_op_attention_group,
};

const xllm_cpu_kernels *xllm_cpu_kernels_avx2(void) {
    return &k_avx2;
}
#endif
