/* AVX-512 kernels (F/BW/VL + VNNI, BF16 where present): 8-bit activation quantizer, direct
 * decode GEMV per weight type, packed weight-stationary GEMM (int8 VNNI, bf16 dot, fp32 FMA),
 * fused attention with online softmax, norms and activations. Compiled with AVX-512 flags;
 * only called after run-time dispatch has checked the CPU. */
#if defined(__x86_64__)
#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "compute/cpu/kernels.h"
#include "compute/dtype.h"
#include "util/common.h"

/* ---- helpers --------------------------------------------------------------------------- */

static inline float h2f(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

static inline int32_t ld32(const void *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

static inline __m512i load2x256(const void *a, const void *b) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(a)), _mm256_loadu_si256(b),
                              1);
}

static inline __mmask16 rows_mask(int nr) {
    return (__mmask16)((1u << nr) - 1u);
}

/* exp(x) for a vector: range reduction to 2^n * exp(r), |r| <= ln2/2, degree-6 polynomial. */
static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f)), _mm512_set1_ps(-103.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* Loads 16 elements of a float-like row (F32, F16 or BF16) at element i as floats. */
static inline __m512 load_f16(xllm_dtype t, const uint8_t *row, int64_t i) {
    if (t == XLLM_DTYPE_F32) return _mm512_loadu_ps((const float *)row + i);
    const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)row + i));
    if (t == XLLM_DTYPE_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* Transposes 16 vectors of 16 dwords: r[i] lane j -> r[j] lane i. */
static inline __attribute__((always_inline)) void transpose16(__m512i r[16]) {
    __m512i a[16], b[16];
    for (int i = 0; i < 8; i++) {
        a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
        b[4 * i + 0] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
        b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
        b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
        b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
    }
    for (int c = 0; c < 4; c++) {
        const __m512i e0 = _mm512_shuffle_i32x4(b[c], b[4 + c], 0x44);
        const __m512i e1 = _mm512_shuffle_i32x4(b[c], b[4 + c], 0xEE);
        const __m512i e2 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0x44);
        const __m512i e3 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0xEE);
        r[c] = _mm512_shuffle_i32x4(e0, e2, 0x88);
        r[4 + c] = _mm512_shuffle_i32x4(e0, e2, 0xDD);
        r[8 + c] = _mm512_shuffle_i32x4(e1, e3, 0x88);
        r[12 + c] = _mm512_shuffle_i32x4(e1, e3, 0xDD);
    }
}

static inline float hsum(__m512 v) {
    return _mm512_reduce_add_ps(v);
}

/* ---- activation quantizer ---------------------------------------------------------------- */

static void quant_row(const float *x, int64_t n, int B, int8_t *q, float *d, int16_t *s16) {
    for (int64_t j = 0; j < n / B; j++) {
        const float *xb = x + j * B;
        __m512 mx = _mm512_setzero_ps();
        for (int i = 0; i < B; i += 16)
            mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_loadu_ps(xb + i)));
        const float amax = _mm512_reduce_max_ps(mx);
        const __m512 id = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
        d[j] = amax / 127.0f;
        for (int i = 0; i < B; i += 16) {
            const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xb + i), id));
            _mm_storeu_si128((__m128i *)(q + j * B + i), _mm512_cvtsepi32_epi8(v));
            s16[(j * B + i) / 16] = (int16_t)_mm512_reduce_add_epi32(v);
        }
    }
}

/* ---- direct decode kernels (T <= XLLM_GEMV_MAX_T) ------------------------------------------ */

/* Runs CALL(NT) with the token count T (1..XLLM_GEMV_MAX_T) as a constant: each count gets
 * its own inlined kernel, its accumulators in registers. */
#define BY_T(T, CALL)                                                                              \
    do {                                                                                           \
        switch (T) {                                                                               \
            case 1:                                                                                \
                CALL(1);                                                                           \
                break;                                                                             \
            case 2:                                                                                \
                CALL(2);                                                                           \
                break;                                                                             \
            case 3:                                                                                \
                CALL(3);                                                                           \
                break;                                                                             \
            default:                                                                               \
                CALL(4);                                                                           \
                break;                                                                             \
        }                                                                                          \
    } while (0)

static inline void put(float *y, int64_t idx, float v, bool acc) {
    y[idx] = acc ? y[idx] + v : v;
}

static void gemv_float(const xllm_mat *w, int64_t r0, int64_t r1, const float *x, int64_t x_stride,
                       int64_t T, float *y, int64_t y_stride, bool acc) {
    const int64_t K = w->n_cols;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = (const uint8_t *)w->data + (size_t)r * w->row_bytes;
        __m512 s[XLLM_GEMV_MAX_T][2];
#pragma GCC unroll 8
        for (int t = 0; t < XLLM_GEMV_MAX_T; t++) s[t][0] = s[t][1] = _mm512_setzero_ps();
        int64_t i = 0;
        for (; i + 32 <= K; i += 32) {
            const __m512 w0 = load_f16(w->type, row, i), w1 = load_f16(w->type, row, i + 16);
#pragma GCC unroll 8
            for (int t = 0; t < T; t++) {
                s[t][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + t * x_stride + i), s[t][0]);
                s[t][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + t * x_stride + i + 16), s[t][1]);
            }
        }
        for (; i + 16 <= K; i += 16) {
            const __m512 w0 = load_f16(w->type, row, i);
#pragma GCC unroll 8
            for (int t = 0; t < T; t++)
                s[t][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + t * x_stride + i), s[t][0]);
        }
#pragma GCC unroll 8
        for (int t = 0; t < T; t++) {
            float v = hsum(_mm512_add_ps(s[t][0], s[t][1]));
            for (int64_t k = i; k < K; k++) {
                float wk = w->type == XLLM_DTYPE_F32 ? ((const float *)row)[k]
                           : w->type == XLLM_DTYPE_F16
                               ? xllm_fp16_to_fp32(((const uint16_t *)row)[k])
                               : xllm_bf16_to_fp32(((const uint16_t *)row)[k]);
                v += wk * x[t * x_stride + k];
            }
            put(y, t * y_stride + r, v, acc);
        }
    }
}

/* Q8_0 weights x 8-bit activations with 32-element blocks: weights made unsigned (+128), the
 * offset taken back with the activation block sums (a->g holds d and d * sum per block). */
/* One pair of blocks (j, j + 1) of a Q8_0 row against T tokens, into s[0..T). */
static inline __attribute__((always_inline)) void q8_pair(const uint8_t *row, int64_t j,
                                                          const xllm_q8act *a, int64_t K,
                                                          int64_t nb, const int T, __m512 *s) {
    const __m512i x80 = _mm512_set1_epi8((char)0x80);
    const __m512i ilo = _mm512_set_epi32(2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m512i ihi = _mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1);
    const uint8_t *b0 = row + 34 * j, *b1 = b0 + 34;
    const __m512i wq = _mm512_xor_si512(load2x256(b0 + 2, b1 + 2), x80);
    const __m512 dw = _mm512_insertf32x8(_mm512_set1_ps(h2f(b0)), _mm256_set1_ps(h2f(b1)), 1);
#pragma GCC unroll 8
    for (int t = 0; t < T; t++) {
        const __m512i av = _mm512_loadu_si512(a->q + t * K + 32 * j);
        const __m512i is = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wq, av);
        /* g: (d_j, ds_j, d_j+1, ds_j+1) */
        const __m512 g = _mm512_castps128_ps512(_mm_loadu_ps(a->g + (t * nb + j) * 2));
        const __m512 da = _mm512_permutexvar_ps(ilo, g);
        const __m512 ds =
            _mm512_mul_ps(_mm512_permutexvar_ps(ihi, g), _mm512_set1_ps(-128.0f / 8.0f));
        s[t] = _mm512_fmadd_ps(dw, _mm512_fmadd_ps(_mm512_cvtepi32_ps(is), da, ds), s[t]);
    }
}

/* Q8_0 weights x 8-bit activations with 32-element blocks: weights made unsigned (+128), the
 * offset taken back with the activation block sums (a->g holds d and d * sum per block).
 * Inlined per T so the accumulators stay in registers; two sets break the FMA chain. */
static inline __attribute__((always_inline)) void gemv_q8_0_t(const xllm_mat *w, int64_t r0,
                                                              int64_t r1, const xllm_q8act *a,
                                                              const int T, float *y,
                                                              int64_t y_stride, bool acc) {
    const int64_t K = w->n_cols, nb = K / 32;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = (const uint8_t *)w->data + (size_t)r * w->row_bytes;
        __m512 s[XLLM_GEMV_MAX_T], s2[XLLM_GEMV_MAX_T];
#pragma GCC unroll 8
        for (int t = 0; t < XLLM_GEMV_MAX_T; t++) s[t] = s2[t] = _mm512_setzero_ps();
        int64_t j = 0;
        for (; j + 4 <= nb; j += 4) {
            q8_pair(row, j, a, K, nb, T, s);
            q8_pair(row, j + 2, a, K, nb, T, s2);
        }
        for (; j + 2 <= nb; j += 2) q8_pair(row, j, a, K, nb, T, s);
#pragma GCC unroll 8
        for (int t = 0; t < T; t++) s[t] = _mm512_add_ps(s[t], s2[t]);
#pragma GCC unroll 8
        for (int t = 0; t < T; t++) {
            float v = hsum(s[t]);
            for (int64_t jj = j; jj < nb; jj++) { /* odd block count */
                const uint8_t *b = row + 34 * jj;
                /* int8 x int8 widened to int16 (a plain C loop here is vectorized wrongly by
                 * GCC 12 with VNNI enabled: it treats one side as unsigned) */
                const __m512i w16 =
                    _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(b + 2)));
                const __m512i a16 = _mm512_cvtepi8_epi16(
                    _mm256_loadu_si256((const __m256i *)(a->q + t * K + 32 * jj)));
                const int sum = _mm512_reduce_add_epi32(_mm512_madd_epi16(w16, a16));
                v += h2f(b) * a->d[t * nb + jj] * (float)sum;
            }
            put(y, t * y_stride + r, v, acc);
        }
    }
}

/* Q4_K x 8-bit activations with 256-element blocks (one scale per super-block). */
static inline __attribute__((always_inline)) void gemv_q4_k_t(const xllm_mat *w, int64_t r0,
                                                              int64_t r1, const xllm_q8act *a,
                                                              const int T, float *y,
                                                              int64_t y_stride, bool acc) {
    const int64_t K = w->n_cols, nsb = K / 256;
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    __m512i idx[4];
    for (int c = 0; c < 4; c++) {
        int16_t v[32];
        for (int i = 0; i < 32; i++) v[i] = (int16_t)(2 * c + (i >= 16));
        idx[c] = _mm512_loadu_si512(v);
    }
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = (const uint8_t *)w->data + (size_t)r * w->row_bytes;
        __m512 s[XLLM_GEMV_MAX_T];
        __m256 sm[XLLM_GEMV_MAX_T];
#pragma GCC unroll 8
        for (int t = 0; t < T; t++) {
            s[t] = _mm512_setzero_ps();
            sm[t] = _mm256_setzero_ps();
        }
        for (int64_t sb = 0; sb < nsb; sb++) {
            const uint8_t *b = row + 144 * sb;
            const float d = h2f(b), dmin = h2f(b + 2);
            uint64_t sc, mn;
            xllm_k4_scales(b + 4, &sc, &mn);
            const __m512i sc16 =
                _mm512_castsi128_si512(_mm_cvtepu8_epi16(_mm_cvtsi64_si128((long long)sc)));
            const __m128i m8 = _mm_cvtsi64_si128((long long)mn);
            const __m256i mdup = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(m8, m8));
            __m512i is[XLLM_GEMV_MAX_T];
#pragma GCC unroll 8
            for (int t = 0; t < T; t++) is[t] = _mm512_setzero_si512();
            for (int c = 0; c < 4; c++) {
                const __m256i qb = _mm256_loadu_si256((const __m256i *)(b + 16 + 32 * c));
                const __m256i lo = _mm256_and_si256(qb, m4);
                const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(qb, 4), m4);
                const __m512i wq = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
                const __m512i scv = _mm512_permutexvar_epi16(idx[c], sc16);
#pragma GCC unroll 8
                for (int t = 0; t < T; t++) {
                    const __m512i av = _mm512_loadu_si512(a->q + t * K + 256 * sb + 64 * c);
                    is[t] = _mm512_add_epi32(is[t],
                                             _mm512_madd_epi16(_mm512_maddubs_epi16(wq, av), scv));
                }
            }
#pragma GCC unroll 8
            for (int t = 0; t < T; t++) {
                const float da = a->d[t * nsb + sb];
                s[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(is[t]), _mm512_set1_ps(d * da), s[t]);
                const __m256i ms = _mm256_madd_epi16(
                    _mm256_loadu_si256((const __m256i *)(a->s16 + t * (K / 16) + 16 * sb)), mdup);
                sm[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ms), _mm256_set1_ps(dmin * da), sm[t]);
            }
        }
#pragma GCC unroll 8
        for (int t = 0; t < T; t++) {
            __m128 h = _mm_add_ps(_mm256_castps256_ps128(sm[t]), _mm256_extractf128_ps(sm[t], 1));
            h = _mm_add_ps(h, _mm_movehl_ps(h, h));
            h = _mm_add_ss(h, _mm_movehdup_ps(h));
            put(y, t * y_stride + r, hsum(s[t]) - _mm_cvtss_f32(h), acc);
        }
    }
}

/* Q6_K x 8-bit activations with 256-element blocks. */
static inline __attribute__((always_inline)) void gemv_q6_k_t(const xllm_mat *w, int64_t r0,
                                                              int64_t r1, const xllm_q8act *a,
                                                              const int T, float *y,
                                                              int64_t y_stride, bool acc) {
    const int64_t K = w->n_cols, nsb = K / 256;
    const __m256i m4 = _mm256_set1_epi8(0x0f), m3 = _mm256_set1_epi8(0x03);
    __m512i idx[4]; /* chunk c (64 elements of 4 groups of 16): words 8i..8i+7 -> group 4c+i */
    for (int c = 0; c < 4; c++) {
        int16_t v[32];
        for (int i = 0; i < 32; i++) v[i] = (int16_t)(4 * c + i / 8);
        idx[c] = _mm512_loadu_si512(v);
    }
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = (const uint8_t *)w->data + (size_t)r * w->row_bytes;
        __m512 s[XLLM_GEMV_MAX_T];
#pragma GCC unroll 8
        for (int t = 0; t < T; t++) s[t] = _mm512_setzero_ps();
        for (int64_t sb = 0; sb < nsb; sb++) {
            const uint8_t *b = row + 210 * sb;
            const float d = h2f(b + 208);
            const __m256i sc16y = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(b + 192)));
            const __m512i sc16 = _mm512_castsi256_si512(sc16y);
            const __m256i sc32 = _mm256_slli_epi16(sc16y, 5); /* 32 * scale, fits int16 */
            __m512i is[XLLM_GEMV_MAX_T];
#pragma GCC unroll 8
            for (int t = 0; t < T; t++) {
                const __m256i cs = _mm256_madd_epi16(
                    _mm256_loadu_si256((const __m256i *)(a->s16 + t * (K / 16) + 16 * sb)), sc32);
                is[t] = _mm512_castsi256_si512(_mm256_sub_epi32(_mm256_setzero_si256(), cs));
                is[t] = _mm512_inserti64x4(is[t], _mm256_setzero_si256(), 1);
            }
            for (int h = 0; h < 2; h++) {
                const __m256i l0 = _mm256_loadu_si256((const __m256i *)(b + 64 * h));
                const __m256i l1 = _mm256_loadu_si256((const __m256i *)(b + 64 * h + 32));
                const __m256i hb = _mm256_loadu_si256((const __m256i *)(b + 128 + 32 * h));
                const __m256i v0 = _mm256_or_si256(_mm256_and_si256(l0, m4),
                                                   _mm256_slli_epi16(_mm256_and_si256(hb, m3), 4));
                const __m256i v1 = _mm256_or_si256(
                    _mm256_and_si256(l1, m4),
                    _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2), m3), 4));
                const __m256i v2 = _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(l0, 4), m4),
                    _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 4), m3), 4));
                const __m256i v3 = _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                    _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 6), m3), 4));
                const __m512i z0 = _mm512_inserti64x4(_mm512_castsi256_si512(v0), v1, 1);
                const __m512i z1 = _mm512_inserti64x4(_mm512_castsi256_si512(v2), v3, 1);
                const __m512i s0 = _mm512_permutexvar_epi16(idx[2 * h], sc16);
                const __m512i s1 = _mm512_permutexvar_epi16(idx[2 * h + 1], sc16);
#pragma GCC unroll 8
                for (int t = 0; t < T; t++) {
                    const int8_t *aq = a->q + t * K + 256 * sb + 128 * h;
                    const __m512i p0 =
                        _mm512_madd_epi16(_mm512_maddubs_epi16(z0, _mm512_loadu_si512(aq)), s0);
                    const __m512i p1 = _mm512_madd_epi16(
                        _mm512_maddubs_epi16(z1, _mm512_loadu_si512(aq + 64)), s1);
                    is[t] = _mm512_add_epi32(is[t], _mm512_add_epi32(p0, p1));
                }
            }
#pragma GCC unroll 8
            for (int t = 0; t < T; t++)
                s[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(is[t]),
                                       _mm512_set1_ps(d * a->d[t * nsb + sb]), s[t]);
        }
#pragma GCC unroll 8
        for (int t = 0; t < T; t++) put(y, t * y_stride + r, hsum(s[t]), acc);
    }
}

static void gemv_q8_0(const xllm_mat *w, int64_t r0, int64_t r1, const xllm_q8act *a, int64_t T,
                      float *y, int64_t y_stride, bool acc) {
#define CALL(NT) gemv_q8_0_t(w, r0, r1, a, NT, y, y_stride, acc)
    BY_T(T, CALL);
#undef CALL
}

static void gemv_q4_k(const xllm_mat *w, int64_t r0, int64_t r1, const xllm_q8act *a, int64_t T,
                      float *y, int64_t y_stride, bool acc) {
#define CALL(NT) gemv_q4_k_t(w, r0, r1, a, NT, y, y_stride, acc)
    BY_T(T, CALL);
#undef CALL
}

static void gemv_q6_k(const xllm_mat *w, int64_t r0, int64_t r1, const xllm_q8act *a, int64_t T,
                      float *y, int64_t y_stride, bool acc) {
#define CALL(NT) gemv_q6_k_t(w, r0, r1, a, NT, y, y_stride, acc)
    BY_T(T, CALL);
#undef CALL
}

static void gemv_f(const xllm_mat *w, int64_t r0, int64_t r1, const float *x, int64_t x_stride,
                   int64_t T, float *y, int64_t y_stride, bool acc) {
#define CALL(NT) gemv_float(w, r0, r1, x, x_stride, NT, y, y_stride, acc)
    BY_T(T, CALL);
#undef CALL
}

static bool gemv(const xllm_mat *w, int64_t r0, int64_t r1, const float *x, int64_t x_stride,
                 const xllm_q8act *a, int64_t T, float *y, int64_t y_stride, bool acc) {
    switch (w->type) {
        case XLLM_DTYPE_F32:
        case XLLM_DTYPE_F16:
        case XLLM_DTYPE_BF16:
            gemv_f(w, r0, r1, x, x_stride, T, y, y_stride, acc);
            return true;
        case XLLM_DTYPE_Q8_0:
            gemv_q8_0(w, r0, r1, a, T, y, y_stride, acc);
            return true;
        case XLLM_DTYPE_Q4_K:
            gemv_q4_k(w, r0, r1, a, T, y, y_stride, acc);
            return true;
        case XLLM_DTYPE_Q6_K:
            gemv_q6_k(w, r0, r1, a, T, y, y_stride, acc);
            return true;
        default:
            return false;
    }
}

/* ---- packing ----------------------------------------------------------------------------- */

/* Transposes 16 row vectors and stores them as chunk kc of the panel (16 x 64 bytes). */
static inline __attribute__((always_inline)) void put_chunk(__m512i v[16], uint8_t *q, int64_t kc) {
    transpose16(v);
    for (int i = 0; i < 16; i++) _mm512_storeu_si512(q + (16 * kc + i) * 64, v[i]);
}

/* v[r] holds row r's values of n_g consecutive groups (lanes 0..n_g-1); stores them in the
 * panel's (group, row) layout at dst + g0 * 16, and mul * them at dst2 (when non-NULL). */
static inline __attribute__((always_inline)) void put_groups(__m512i v[16], float *dst, float *dst2,
                                                             float mul, int64_t g0, int n_g) {
    transpose16(v);
    for (int i = 0; i < n_g; i++) {
        const __m512 x = _mm512_castsi512_ps(v[i]);
        _mm512_storeu_ps(dst + (g0 + i) * 16, x);
        if (dst2) _mm512_storeu_ps(dst2 + (g0 + i) * 16, _mm512_mul_ps(x, _mm512_set1_ps(mul)));
    }
}

static inline uint16_t ld16(const uint8_t *p) {
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

/* Direct packers of the common types: no staging copy, one transpose per 64 elements. */
static void pack_q8_0(const xllm_mat *w, int64_t r0, int nr, xllm_qpanel *p) {
    const int64_t K = w->n_cols, nb = K / 32;
    const uint8_t *base = (const uint8_t *)w->data + (size_t)r0 * w->row_bytes;
    const __m512i x80 = _mm512_set1_epi8((char)0x80);
    for (int64_t kc = 0; kc < (K + 63) / 64; kc++) {
        __m512i v[16];
        for (int r = 0; r < 16; r++) {
            if (r >= nr) {
                v[r] = _mm512_setzero_si512();
                continue;
            }
            const uint8_t *b = base + (size_t)r * w->row_bytes + 68 * kc;
            _mm_prefetch((const char *)b + 68 * 16, _MM_HINT_T0);
            v[r] = 2 * kc + 1 < nb
                       ? load2x256(b + 2, b + 36)
                       : _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(b + 2)));
            v[r] = _mm512_xor_si512(v[r], x80);
        }
        put_chunk(v, p->q, kc);
    }
    for (int64_t j0 = 0; j0 < nb; j0 += 16) {
        const int ng = nb - j0 < 16 ? (int)(nb - j0) : 16;
        __m512i v[16];
        for (int r = 0; r < 16; r++) {
            uint16_t h[16] = {0};
            if (r < nr) {
                const uint8_t *b = base + (size_t)r * w->row_bytes + 34 * j0;
                for (int i = 0; i < ng; i++) h[i] = ld16(b + 34 * i);
            }
            v[r] = _mm512_castps_si512(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)h)));
        }
        put_groups(v, p->s, p->m, -128.0f, j0, ng);
    }
}

static void pack_q4_k(const xllm_mat *w, int64_t r0, int nr, xllm_qpanel *p) {
    const int64_t K = w->n_cols, nsb = K / 256;
    const uint8_t *base = (const uint8_t *)w->data + (size_t)r0 * w->row_bytes;
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    for (int64_t sb = 0; sb < nsb; sb++) {
        for (int c = 0; c < 4; c++) {
            __m512i v[16];
            for (int r = 0; r < 16; r++) {
                if (r >= nr) {
                    v[r] = _mm512_setzero_si512();
                    continue;
                }
                const __m256i qb = _mm256_loadu_si256(
                    (const __m256i *)(base + (size_t)r * w->row_bytes + 144 * sb + 16 + 32 * c));
                v[r] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(qb, m4)),
                                          _mm256_and_si256(_mm256_srli_epi16(qb, 4), m4), 1);
            }
            put_chunk(v, p->q, sb * 4 + c);
        }
        for (int r = 0; r < 16; r++) {
            if (r >= nr) {
                for (int j = 0; j < 8; j++)
                    p->s[(sb * 8 + j) * 16 + r] = p->m[(sb * 8 + j) * 16 + r] = 0.0f;
                continue;
            }
            const uint8_t *b = base + (size_t)r * w->row_bytes + 144 * sb;
            const float d = h2f(b), dmin = h2f(b + 2);
            const uint32_t u0 = (uint32_t)ld32(b + 4), u1 = (uint32_t)ld32(b + 8),
                           u2 = (uint32_t)ld32(b + 12);
            const uint32_t sc[2] = {u0 & 0x3f3f3f3fu,
                                    (u2 & 0x0f0f0f0fu) | (((u0 >> 6) & 0x03030303u) << 4)};
            const uint32_t mn[2] = {u1 & 0x3f3f3f3fu,
                                    ((u2 >> 4) & 0x0f0f0f0fu) | (((u1 >> 6) & 0x03030303u) << 4)};
            for (int j = 0; j < 8; j++) {
                p->s[(sb * 8 + j) * 16 + r] = d * (float)((sc[j >> 2] >> (8 * (j & 3))) & 0xff);
                p->m[(sb * 8 + j) * 16 + r] =
                    -(dmin * (float)((mn[j >> 2] >> (8 * (j & 3))) & 0xff));
            }
        }
    }
}

static void pack_q6_k(const xllm_mat *w, int64_t r0, int nr, xllm_qpanel *p) {
    const int64_t K = w->n_cols, nsb = K / 256;
    const uint8_t *base = (const uint8_t *)w->data + (size_t)r0 * w->row_bytes;
    const __m256i m4 = _mm256_set1_epi8(0x0f), m3 = _mm256_set1_epi8(0x03);
    for (int64_t sb = 0; sb < nsb; sb++) {
        for (int h = 0; h < 2; h++) {
            __m512i v0[16], v1[16];
            for (int r = 0; r < 16; r++) {
                if (r >= nr) {
                    v0[r] = v1[r] = _mm512_setzero_si512();
                    continue;
                }
                const uint8_t *b = base + (size_t)r * w->row_bytes + 210 * sb;
                const __m256i l0 = _mm256_loadu_si256((const __m256i *)(b + 64 * h));
                const __m256i l1 = _mm256_loadu_si256((const __m256i *)(b + 64 * h + 32));
                const __m256i hb = _mm256_loadu_si256((const __m256i *)(b + 128 + 32 * h));
                const __m256i a0 = _mm256_or_si256(_mm256_and_si256(l0, m4),
                                                   _mm256_slli_epi16(_mm256_and_si256(hb, m3), 4));
                const __m256i a1 = _mm256_or_si256(
                    _mm256_and_si256(l1, m4),
                    _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2), m3), 4));
                const __m256i a2 = _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(l0, 4), m4),
                    _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 4), m3), 4));
                const __m256i a3 = _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                    _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 6), m3), 4));
                v0[r] = _mm512_inserti64x4(_mm512_castsi256_si512(a0), a1, 1);
                v1[r] = _mm512_inserti64x4(_mm512_castsi256_si512(a2), a3, 1);
            }
            put_chunk(v0, p->q, sb * 4 + 2 * h);
            put_chunk(v1, p->q, sb * 4 + 2 * h + 1);
        }
        __m512i v[16];
        for (int r = 0; r < 16; r++) {
            const uint8_t *b = base + (size_t)r * w->row_bytes + 210 * sb;
            v[r] = r < nr ? _mm512_castps_si512(
                                _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                                  _mm_loadu_si128((const __m128i *)(b + 192)))),
                                              _mm512_set1_ps(h2f(b + 208))))
                          : _mm512_setzero_si512();
        }
        put_groups(v, p->s, p->m, -32.0f, sb * 16, 16);
    }
}

/* stage: 16 rows of K bytes (K rounded up to 64, zero tail). */
static bool pack_q(const xllm_mat *w, int64_t r0, int nr, uint8_t *stage, xllm_qpanel *p) {
    if (!xllm_act_block(w->type)) return false;
    p->G = xllm_panel_group(w->type);
    p->sym = xllm_panel_sym(w->type);
    switch (w->type) {
        case XLLM_DTYPE_Q8_0:
            pack_q8_0(w, r0, nr, p);
            return true;
        case XLLM_DTYPE_Q4_K:
            pack_q4_k(w, r0, nr, p);
            return true;
        case XLLM_DTYPE_Q6_K:
            pack_q6_k(w, r0, nr, p);
            return true;
        default:
            break;
    }
    /* the other types: unpacked rows, interleaved by one transpose per 64 elements */
    xllm_unpack_panel(w, r0, nr, stage, p);
    const int64_t Kp = (w->n_cols + 63) / 64 * 64;
    for (int64_t kc = 0; kc < Kp / 64; kc++) {
        __m512i v[16];
        for (int r = 0; r < 16; r++) v[r] = _mm512_loadu_si512(stage + (size_t)r * Kp + 64 * kc);
        transpose16(v);
        for (int i = 0; i < 16; i++) _mm512_storeu_si512(p->q + (16 * kc + i) * 64, v[i]);
    }
    return true;
}

static void pack_f(const xllm_mat *w, int64_t r0, int nr, float *panel) {
    const int64_t K = w->n_cols;
    const uint8_t *base = (const uint8_t *)w->data + (size_t)r0 * w->row_bytes;
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        __m512i v[16];
        for (int r = 0; r < 16; r++)
            v[r] = r < nr
                       ? _mm512_castps_si512(load_f16(w->type, base + (size_t)r * w->row_bytes, k))
                       : _mm512_setzero_si512();
        transpose16(v);
        for (int i = 0; i < 16; i++) _mm512_storeu_si512(panel + (k + i) * 16, v[i]);
    }
    for (; k < K; k++)
        for (int r = 0; r < 16; r++) {
            float v = 0.0f;
            if (r < nr) {
                const uint8_t *row = base + (size_t)r * w->row_bytes;
                v = w->type == XLLM_DTYPE_F32   ? ((const float *)row)[k]
                    : w->type == XLLM_DTYPE_F16 ? xllm_fp16_to_fp32(((const uint16_t *)row)[k])
                                                : xllm_bf16_to_fp32(((const uint16_t *)row)[k]);
            }
            panel[k * 16 + r] = v;
        }
}

/* BF16 rows as dword pairs: panel (K/2, 16, 2); K even (the driver checks K % 32 == 0). */
static void pack_bf16(const xllm_mat *w, int64_t r0, int nr, uint16_t *panel) {
    const int64_t K = w->n_cols;
    const uint8_t *base = (const uint8_t *)w->data + (size_t)r0 * w->row_bytes;
    for (int64_t k = 0; k < K; k += 32) {
        __m512i v[16];
        for (int r = 0; r < 16; r++)
            v[r] = r < nr ? _mm512_loadu_si512(base + (size_t)r * w->row_bytes + 2 * k)
                          : _mm512_setzero_si512();
        transpose16(v);
        for (int i = 0; i < 16; i++) _mm512_storeu_si512(panel + (k / 2 + i) * 32, v[i]);
    }
}

/* ---- GEMM microkernels: 16 rows x NT tokens ------------------------------------------------ */

static inline void store_rows(float *y, __m512 v, int nr, bool acc) {
    const __mmask16 mk = rows_mask(nr);
    if (acc) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mk, y));
    _mm512_mask_storeu_ps(y, mk, v);
}

/* The 16 scales of group g of a panel. */
static inline __m512 qp_scales(const xllm_qpanel *p, int64_t g, int64_t qgs, int64_t sgs) {
    if (p->h16)
        return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)xllm_qpanel_sh(p, g, qgs)));
    return _mm512_loadu_ps(p->s + g * sgs);
}

/* NP panels (16 rows each) x NT tokens, groups of G elements: per group, int32 dot products
 * by VNNI, then y += s * d_a * dot + m * d_a * sum_a in fp32; per group, pf_step bytes from
 * pf + g * pf_step are prefetched. */
static inline __attribute__((always_inline)) void
gemm_q_tile(const xllm_qpanel *p, const int NP, const int G, const int SYM, int64_t K,
            const xllm_q8act *a, int64_t t0, const int NT, int nr, float *y, int64_t y_stride,
            bool acc, const uint8_t *pf, int64_t pf_step) {
    const int64_t ng = K / G;
    __m512 s[2][8];
    const int8_t *aq[8];
    const float *ag[8];
#pragma GCC unroll 8
    for (int c = 0; c < NT; c++) {
        aq[c] = a->q + (t0 + c) * K;
        ag[c] = a->g + (t0 + c) * ng * 2;
#pragma GCC unroll 2
        for (int i = 0; i < NP; i++) s[i][c] = _mm512_setzero_ps();
    }
    const int64_t qgs = xllm_qpanel_qgs(&p[0]), sgs = xllm_qpanel_sgs(&p[0]);
    for (int64_t g = 0; g < ng; g++) {
        const uint8_t *wg0 = xllm_qpanel_q(&p[0], g, qgs);
        const uint8_t *wg1 = NP > 1 ? xllm_qpanel_q(&p[1], g, qgs) : wg0;
        for (int64_t j = 0; j < pf_step; j += 64) _mm_prefetch(pf + g * pf_step + j, _MM_HINT_T1);
        __m512i is[2][8];
#pragma GCC unroll 8
        for (int c = 0; c < NT; c++) {
            /* symmetric types start from -sym * sum(a): the offset costs no float op */
            __m512i init = _mm512_setzero_si512();
            if (SYM) {
                const int16_t *s16 = a->s16 + (t0 + c) * (K / 16) + g * (G / 16);
                const int sum = G == 32 ? s16[0] + s16[1] : s16[0];
                init = _mm512_set1_epi32(-SYM * sum);
            }
#pragma GCC unroll 2
            for (int i = 0; i < NP; i++) is[i][c] = init;
        }
#pragma GCC unroll 8
        for (int kk = 0; kk < G / 4; kk++) {
            const __m512i w0 = _mm512_loadu_si512(wg0 + kk * 64);
            const __m512i w1 = NP > 1 ? _mm512_loadu_si512(wg1 + kk * 64) : w0;
            const int64_t off = g * G + 4 * kk;
#pragma GCC unroll 8
            for (int c = 0; c < NT; c++) {
                const __m512i av = _mm512_set1_epi32(ld32(aq[c] + off));
                is[0][c] = _mm512_dpbusd_epi32(is[0][c], w0, av);
                if (NP > 1) is[1][c] = _mm512_dpbusd_epi32(is[1][c], w1, av);
            }
        }
#pragma GCC unroll 2
        for (int i = 0; i < NP; i++) {
            const __m512 sv = qp_scales(&p[i], g, qgs, sgs);
#pragma GCC unroll 8
            for (int c = 0; c < NT; c++) {
                s[i][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(is[i][c]),
                                          _mm512_mul_ps(sv, _mm512_set1_ps(ag[c][2 * g])), s[i][c]);
                if (!SYM)
                    s[i][c] = _mm512_fmadd_ps(_mm512_loadu_ps(p[i].m + g * sgs),
                                              _mm512_set1_ps(ag[c][2 * g + 1]), s[i][c]);
            }
        }
    }
#pragma GCC unroll 8
    for (int c = 0; c < NT; c++)
#pragma GCC unroll 2
        for (int i = 0; i < NP; i++)
            if (nr > 16 * i)
                store_rows(y + (t0 + c) * y_stride + 16 * i, s[i][c],
                           nr - 16 * i > 16 ? 16 : nr - 16 * i, acc);
}

/* One panel x NT <= XLLM_GEMV_MAX_T tokens (decode): the panel read once, front to back
 * (with the interleaved form, one stream), two int32 chains per token. */
static inline __attribute__((always_inline)) void
gemv_qp_tile(const xllm_qpanel *p, const int G, const int SYM, int64_t K, const xllm_q8act *a,
             const int NT, int nr, float *y, int64_t y_stride, bool acc) {
    const int64_t ng = K / G, qgs = xllm_qpanel_qgs(p), sgs = xllm_qpanel_sgs(p);
    __m512 f[XLLM_GEMV_MAX_T];
    const int8_t *aq[XLLM_GEMV_MAX_T];
    const float *ag[XLLM_GEMV_MAX_T];
#pragma GCC unroll 4
    for (int c = 0; c < NT; c++) {
        aq[c] = a->q + c * K;
        ag[c] = a->g + c * ng * 2;
        f[c] = _mm512_setzero_ps();
    }
    const int pfl = xllm_qpanel_group_lines(p, qgs);
    for (int64_t g = 0; g < ng; g++) {
        const uint8_t *wq = xllm_qpanel_q(p, g, qgs);
        xllm_pf_lines(wq, pfl);
        __m512i i0[XLLM_GEMV_MAX_T], i1[XLLM_GEMV_MAX_T];
#pragma GCC unroll 4
        for (int c = 0; c < NT; c++) {
            i0[c] = i1[c] = _mm512_setzero_si512();
            if (SYM) {
                const int16_t *s16 = a->s16 + c * (K / 16) + g * (G / 16);
                i0[c] = _mm512_set1_epi32(-SYM * (G == 32 ? s16[0] + s16[1] : s16[0]));
            }
        }
#pragma GCC unroll 8
        for (int kk = 0; kk < G / 4; kk += 2) {
            const __m512i w0 = _mm512_loadu_si512(wq + kk * 64);
            const __m512i w1 = _mm512_loadu_si512(wq + kk * 64 + 64);
#pragma GCC unroll 4
            for (int c = 0; c < NT; c++) {
                const int8_t *ap = aq[c] + g * G + 4 * kk;
                i0[c] = _mm512_dpbusd_epi32(i0[c], w0, _mm512_set1_epi32(ld32(ap)));
                i1[c] = _mm512_dpbusd_epi32(i1[c], w1, _mm512_set1_epi32(ld32(ap + 4)));
            }
        }
        const __m512 sv = qp_scales(p, g, qgs, sgs);
#pragma GCC unroll 4
        for (int c = 0; c < NT; c++) {
            f[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(i0[c], i1[c])),
                                   _mm512_mul_ps(sv, _mm512_set1_ps(ag[c][2 * g])), f[c]);
            if (!SYM)
                f[c] = _mm512_fmadd_ps(_mm512_loadu_ps(p->m + g * sgs),
                                       _mm512_set1_ps(ag[c][2 * g + 1]), f[c]);
        }
    }
#pragma GCC unroll 4
    for (int c = 0; c < NT; c++) store_rows(y + c * y_stride, f[c], nr, acc);
}

/* The fifth bits of step st of a group (h: the group's fifth-bit vector) at bit 4 of each byte:
 * for the low (HI = 0) or the high nibbles' elements. */
static inline __attribute__((always_inline)) __m512i dp_fifth(__m512i h, const int st,
                                                              const int HI) {
    const int s = 4 - 2 * st - HI; /* bit 2 st + HI to bit 4 */
    const __m512i m10 = _mm512_set1_epi8(0x10);
    return _mm512_and_si512(s >= 0 ? _mm512_slli_epi16(h, s & 7) : _mm512_srli_epi16(h, -s & 7),
                            m10);
}

/* One group of 32 elements against NT tokens: og holds its 4 steps (and for FIVE its fifth
 * bits after them), ap the group's activations of token 0 (token c at ap + c * K). Returns
 * per row and token the int32 dot product of the values with the activations plus init[c]
 * (init NULL: 0). */
static inline __attribute__((always_inline)) void dp_group32(const int FIVE, const int NT,
                                                             const uint8_t *og, const int8_t *ap,
                                                             int64_t K, const __m512i *init,
                                                             __m512i *out) {
    const __m512i m0f = _mm512_set1_epi8(0x0f), mf0 = _mm512_set1_epi8((char)0xf0);
    __m512i lo[XLLM_GEMV_MAX_T], hi[XLLM_GEMV_MAX_T];
#pragma GCC unroll 4
    for (int c = 0; c < NT; c++) {
        lo[c] = init ? init[c] : _mm512_setzero_si512();
        hi[c] = _mm512_setzero_si512();
    }
    const __m512i h = FIVE ? _mm512_loadu_si512(og + 256) : _mm512_setzero_si512();
#pragma GCC unroll 4
    for (int st = 0; st < 4; st++) {
        const __m512i v = _mm512_loadu_si512(og + 64 * st);
        __m512i vl = _mm512_and_si512(v, m0f), vh;
        if (FIVE) {
            vl = _mm512_or_si512(vl, dp_fifth(h, st, 0));
            vh =
                _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(v, 4), m0f), dp_fifth(h, st, 1));
        } else {
            vh = _mm512_and_si512(v, mf0); /* 16x the values, taken back by a shift */
        }
#pragma GCC unroll 4
        for (int c = 0; c < NT; c++) {
            const int8_t *a = ap + c * K + 8 * st;
            lo[c] = _mm512_dpbusd_epi32(lo[c], vl, _mm512_set1_epi32(ld32(a)));
            hi[c] = _mm512_dpbusd_epi32(hi[c], vh, _mm512_set1_epi32(ld32(a + 4)));
        }
    }
#pragma GCC unroll 4
    for (int c = 0; c < NT; c++)
        out[c] = _mm512_add_epi32(lo[c], FIVE ? hi[c] : _mm512_srai_epi32(hi[c], 4));
}

/* The end of a K-quant super-block sb: f += isc * d * d_a (- imn * dmin * d_a when MIN), d
 * and dmin the 16 rows' f16 at o + 256 and o + 288. */
static inline __attribute__((always_inline)) void
dp_sb_end(const int MIN, const int NT, const uint8_t *o, const xllm_q8act *a, int64_t nsb,
          int64_t sb, const __m512i *isc, const __m512i *imn, __m512 *f) {
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(o + 256)));
    const __m512 dm =
        MIN ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(o + 288))) : _mm512_setzero_ps();
#pragma GCC unroll 4
    for (int c = 0; c < NT; c++) {
        const __m512 da = _mm512_set1_ps(a->d[c * nsb + sb]);
        f[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isc[c]), _mm512_mul_ps(d, da), f[c]);
        if (MIN) f[c] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(imn[c]), _mm512_mul_ps(dm, da), f[c]);
    }
}

/* Q4_K / Q5_K decode panel x NT tokens: per sub-block of 32, int32 dot products of the low and
 * the high nibbles (Q4_K: the high ones unshifted, 16x, taken back exactly by a shift; Q5_K:
 * shifted, the fifth bits or-ed in), times the 6-bit scales and mins in int32; per super-block,
 * times d and dmin in fp32. */
static inline __attribute__((always_inline)) void
gemv_dp_q4k_t(const int FIVE, const uint8_t *panel, int64_t K, const xllm_q8act *a, const int NT,
              int nr, float *y, int64_t y_stride, bool acc) {
    const int64_t nsb = K / XLLM_QK_K;
    const int64_t sbb = FIVE ? XLLM_DP_Q5K_SB : XLLM_DP_Q4K_SB;
    __m512 f[XLLM_GEMV_MAX_T];
#pragma GCC unroll 4
    for (int c = 0; c < NT; c++) f[c] = _mm512_setzero_ps();
    for (int64_t sb = 0; sb < nsb; sb++) {
        const uint8_t *o = panel + sb * sbb;
        __m512i isc[XLLM_GEMV_MAX_T], imn[XLLM_GEMV_MAX_T];
#pragma GCC unroll 4
        for (int c = 0; c < NT; c++) isc[c] = imn[c] = _mm512_setzero_si512();
        xllm_pf_lines(o, 5);
        for (int g = 0; g < 8; g++) {
            xllm_pf_lines(o + 320 + (FIVE ? 320 : 256) * g, FIVE ? 5 : 4);
            /* (Q5_K: each group's 4 steps and then its fifth bits) */
            __m512i is[XLLM_GEMV_MAX_T];
            dp_group32(FIVE, NT, o + 320 + (FIVE ? 320 : 256) * g, a->q + sb * XLLM_QK_K + 32 * g,
                       K, NULL, is);
            const __m512i sc = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(o + 16 * g)));
            const __m512i mn =
                _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(o + 128 + 16 * g)));
#pragma GCC unroll 4
            for (int c = 0; c < NT; c++) {
                isc[c] = _mm512_add_epi32(isc[c], _mm512_mullo_epi32(is[c], sc));
                const int16_t *s16 = a->s16 + c * (K / 16) + sb * 16 + 2 * g;
                imn[c] = _mm512_add_epi32(
                    imn[c], _mm512_mullo_epi32(mn, _mm512_set1_epi32(s16[0] + s16[1])));
            }
        }
        dp_sb_end(1, NT, o, a, nsb, sb, isc, imn, f);
    }
#pragma GCC unroll 4
    for (int c = 0; c < NT; c++) store_rows(y + c * y_stride, f[c], nr, acc);
}

/* Q4_0 / Q4_1 / Q5_0 / Q5_1 decode panel x NT tokens: per block of 32, int32 dot products of
 * the low and high nibbles (fifth bits or-ed in), symmetric types starting from -8 (-16) times
 * the activations' sum; then times d and the activation scale in fp32, plus m times the
 * activations' sum for the types with an offset. */
static inline __attribute__((always_inline)) void
gemv_dp_leg_t(const int FIVE, const int ONE, const uint8_t *panel, int64_t K, const xllm_q8act *a,
              const int NT, int nr, float *y, int64_t y_stride, bool acc) {
    const int64_t nb = K / 32;
    const int bb = xllm_dp_leg_size(FIVE, ONE), doff = xllm_dp_leg_doff(FIVE), sym = FIVE ? 16 : 8;
    __m512 f[XLLM_GEMV_MAX_T];
#pragma GCC unroll 4
    for (int c = 0; c < NT; c++) f[c] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *o = panel + b * bb;
        __m512i init[XLLM_GEMV_MAX_T], is[XLLM_GEMV_MAX_T];
        xllm_pf_lines(o, (bb + 63) / 64);
#pragma GCC unroll 4
        for (int c = 0; c < NT; c++) {
            const int16_t *s16 = a->s16 + c * (K / 16) + 2 * b;
            init[c] = ONE ? _mm512_setzero_si512() : _mm512_set1_epi32(-sym * (s16[0] + s16[1]));
        }
        dp_group32(FIVE, NT, o, a->q + 32 * b, K, init, is);
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(o + doff)));
        const __m512 m = ONE ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(o + doff + 32)))
                             : _mm512_setzero_ps();
#pragma GCC unroll 4
        for (int c = 0; c < NT; c++) {
            const float *g = a->g + (c * nb + b) * 2; /* (d, d * sum q) of the activations */
            f[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(is[c]),
                                   _mm512_mul_ps(d, _mm512_set1_ps(g[0])), f[c]);
            if (ONE) f[c] = _mm512_fmadd_ps(m, _mm512_set1_ps(g[1]), f[c]);
        }
    }
#pragma GCC unroll 4
    for (int c = 0; c < NT; c++) store_rows(y + c * y_stride, f[c], nr, acc);
}

/* Q2_K (THREE = 0) / Q3_K decode panel x NT tokens: per sub-block of 16, the 2-bit values
 * taken out by shifts and masks (Q3_K: the third bit or-ed in from a 64-bit mask), int32 dot
 * products (Q3_K from -4 times the activations' sum), times the scale in int32 (Q2_K: minus the
 * min times the activations' sum); per super-block, times d (and dmin) in fp32. */
static inline __attribute__((always_inline)) void
gemv_dp_q23k_t(const int THREE, const uint8_t *panel, int64_t K, const xllm_q8act *a, const int NT,
               int nr, float *y, int64_t y_stride, bool acc) {
    const int64_t nsb = K / XLLM_QK_K;
    const int64_t sbb = THREE ? XLLM_DP_Q3K_SB : XLLM_DP_Q2K_SB;
    const __m512i m03 = _mm512_set1_epi8(3), m04 = _mm512_set1_epi8(4);
    const __m512i m0f = _mm512_set1_epi32(15);
    __m512 f[XLLM_GEMV_MAX_T];
#pragma GCC unroll 4
    for (int c = 0; c < NT; c++) f[c] = _mm512_setzero_ps();
    for (int64_t sb = 0; sb < nsb; sb++) {
        const uint8_t *o = panel + sb * sbb;
        __m512i isc[XLLM_GEMV_MAX_T], imn[XLLM_GEMV_MAX_T];
#pragma GCC unroll 4
        for (int c = 0; c < NT; c++) isc[c] = imn[c] = _mm512_setzero_si512();
        xllm_pf_lines(o, 5);
        for (int u = 0; u < 16; u++) {
            const uint8_t *ou = THREE ? o + 288 + 96 * u : o + 320 + 64 * u;
            xllm_pf_lines(ou, THREE ? 2 : 1);
            const __m512i v = _mm512_loadu_si512(ou);
            __m512i i0[XLLM_GEMV_MAX_T], i1[XLLM_GEMV_MAX_T];
#pragma GCC unroll 4
            for (int c = 0; c < NT; c++) {
                i0[c] = THREE ? _mm512_set1_epi32(-4 * a->s16[c * (K / 16) + sb * 16 + u])
                              : _mm512_setzero_si512();
                i1[c] = _mm512_setzero_si512();
            }
#pragma GCC unroll 4
            for (int i = 0; i < 4; i++) {
                __m512i vi = _mm512_and_si512(i ? _mm512_srli_epi16(v, 2 * i) : v, m03);
                if (THREE) {
                    uint64_t hm;
                    memcpy(&hm, ou + 64 + 8 * i, 8);
                    vi = _mm512_mask_add_epi8(vi, _cvtu64_mask64(hm), vi, m04);
                }
#pragma GCC unroll 4
                for (int c = 0; c < NT; c++) {
                    const int8_t *ap = a->q + c * K + sb * XLLM_QK_K + 16 * u + 4 * i;
                    if (i & 1)
                        i1[c] = _mm512_dpbusd_epi32(i1[c], vi, _mm512_set1_epi32(ld32(ap)));
                    else
                        i0[c] = _mm512_dpbusd_epi32(i0[c], vi, _mm512_set1_epi32(ld32(ap)));
                }
            }
            __m512i sc;
            if (THREE) {
                sc = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(o + 16 * u)));
            } else {
                const __m512i sm =
                    _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(o + 16 * u)));
                sc = _mm512_and_si512(sm, m0f);
                const __m512i mn = _mm512_srli_epi32(sm, 4);
#pragma GCC unroll 4
                for (int c = 0; c < NT; c++)
                    imn[c] = _mm512_add_epi32(
                        imn[c], _mm512_mullo_epi32(
                                    mn, _mm512_set1_epi32(a->s16[c * (K / 16) + sb * 16 + u])));
            }
#pragma GCC unroll 4
            for (int c = 0; c < NT; c++)
                isc[c] = _mm512_add_epi32(isc[c],
                                          _mm512_mullo_epi32(_mm512_add_epi32(i0[c], i1[c]), sc));
        }
        dp_sb_end(!THREE, NT, o, a, nsb, sb, isc, imn, f);
    }
#pragma GCC unroll 4
    for (int c = 0; c < NT; c++) store_rows(y + c * y_stride, f[c], nr, acc);
}

/* Q6_K decode panel x NT tokens: per sub-block of 16, the 6-bit values rebuilt from the low
 * nibbles and the high bit pairs, int32 dot products from -32 * sum(a), times the int8 scale;
 * per super-block, times d in fp32. */
static inline __attribute__((always_inline)) void gemv_dp_q6k_t(const uint8_t *panel, int64_t K,
                                                                const xllm_q8act *a, const int NT,
                                                                int nr, float *y, int64_t y_stride,
                                                                bool acc) {
    const int64_t nsb = K / XLLM_QK_K;
    const __m512i m0f = _mm512_set1_epi8(0x0f), m30 = _mm512_set1_epi8(0x30);
    __m512 f[XLLM_GEMV_MAX_T];
#pragma GCC unroll 4
    for (int c = 0; c < NT; c++) f[c] = _mm512_setzero_ps();
    for (int64_t sb = 0; sb < nsb; sb++) {
        const uint8_t *o = panel + sb * XLLM_DP_Q6K_SB;
        xllm_pf_lines(o, 5);
        __m512i isc[XLLM_GEMV_MAX_T];
#pragma GCC unroll 4
        for (int c = 0; c < NT; c++) isc[c] = _mm512_setzero_si512();
        for (int u = 0; u < 16; u++) {
            const uint8_t *ou = o + 320 + 192 * u;
            xllm_pf_lines(ou, 3);
            const __m512i n0 = _mm512_loadu_si512(ou);
            const __m512i n1 = _mm512_loadu_si512(ou + 64);
            const __m512i h = _mm512_loadu_si512(ou + 128);
            const __m512i v0 = _mm512_or_si512(_mm512_and_si512(n0, m0f),
                                               _mm512_and_si512(_mm512_slli_epi16(h, 4), m30));
            const __m512i v1 = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(n0, 4), m0f),
                                               _mm512_and_si512(_mm512_slli_epi16(h, 2), m30));
            const __m512i v2 = _mm512_or_si512(_mm512_and_si512(n1, m0f), _mm512_and_si512(h, m30));
            const __m512i v3 = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(n1, 4), m0f),
                                               _mm512_and_si512(_mm512_srli_epi16(h, 2), m30));
            const __m512i sc = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(o + 16 * u)));
#pragma GCC unroll 4
            for (int c = 0; c < NT; c++) {
                const int8_t *ap = a->q + c * K + sb * XLLM_QK_K + 16 * u;
                __m512i i0 = _mm512_set1_epi32(-32 * a->s16[c * (K / 16) + sb * 16 + u]);
                __m512i i1 = _mm512_setzero_si512();
                i0 = _mm512_dpbusd_epi32(i0, v0, _mm512_set1_epi32(ld32(ap)));
                i1 = _mm512_dpbusd_epi32(i1, v1, _mm512_set1_epi32(ld32(ap + 4)));
                i0 = _mm512_dpbusd_epi32(i0, v2, _mm512_set1_epi32(ld32(ap + 8)));
                i1 = _mm512_dpbusd_epi32(i1, v3, _mm512_set1_epi32(ld32(ap + 12)));
                isc[c] = _mm512_add_epi32(isc[c], _mm512_mullo_epi32(_mm512_add_epi32(i0, i1), sc));
            }
        }
        dp_sb_end(0, NT, o, a, nsb, sb, isc, isc, f);
    }
#pragma GCC unroll 4
    for (int c = 0; c < NT; c++) store_rows(y + c * y_stride, f[c], nr, acc);
}

/* One decode panel of type TY (a constant once inlined) against NT tokens. */
XLLM_DEFINE_GEMV_DP

/* All T tokens against np (1 or 2) panels, in tiles of NT tokens. */
static inline __attribute__((always_inline)) void gemm_q_g(const xllm_qpanel *p, int np,
                                                           const int G, const int SYM, int64_t K,
                                                           const xllm_q8act *a, int64_t T, int nr,
                                                           float *y, int64_t y_stride, bool acc) {
    if (T <= XLLM_GEMV_MAX_T) {
        for (int i = 0; i < np; i++) {
            const int nri = nr - 16 * i > 16 ? 16 : nr - 16 * i;
            float *yi = y + 16 * i;
#define CALL(NT) gemv_qp_tile(&p[i], G, SYM, K, a, NT, nri, yi, y_stride, acc)
            BY_T(T, CALL);
#undef CALL
        }
        return;
    }
    /* the next panels' bytes, spread over the groups of the token tiles (at least a line a
     * group: with many tiles, over the first ones) */
    const int64_t ng = K / G, tiles = np == 2 ? (T + 3) / 4 : (T + 7) / 8;
    const uint8_t *pf = p[0].pf, *pf_end = pf + p[0].pf_bytes;
    int64_t pf_step = pf ? (p[0].pf_bytes / (tiles * ng) + 63) / 64 * 64 : 0;
#define PF_NEXT() ((pf += pf_step * ng) >= pf_end ? (void)(pf_step = 0) : (void)0)
    int64_t t = 0;
    if (np == 2) {
#define CALL(NT) gemm_q_tile(p, 2, G, SYM, K, a, t, NT, nr, y, y_stride, acc, pf, pf_step)
        for (; t + 4 <= T; t += 4, PF_NEXT()) CALL(4);
        if (t < T) BY_T(T - t, CALL);
#undef CALL
        return;
    }
#define CALL(NT) gemm_q_tile(p, 1, G, SYM, K, a, t, NT, nr, y, y_stride, acc, pf, pf_step)
    for (; t + 8 <= T; t += 8, PF_NEXT()) CALL(8);
    if (t + 4 <= T) {
        CALL(4);
        t += 4;
        PF_NEXT();
    }
    if (t < T) BY_T(T - t, CALL);
#undef CALL
#undef PF_NEXT
}

static void gemm_q(const xllm_qpanel *p, int np, int64_t K, const xllm_q8act *a, int64_t T, int nr,
                   float *y, int64_t y_stride, bool acc) {
    XLLM_GEMM_Q_BY_FORM(gemm_q_g, p, np, K, a, T, nr, y, y_stride, acc);
}

static inline __attribute__((always_inline)) void
gemm_f_tile(const float *panel, int64_t K, const float *x, int64_t x_stride, int64_t t0,
            const int NT, int nr, float *y, int64_t y_stride, bool acc) {
    __m512 s[8];
#pragma GCC unroll 8
    for (int c = 0; c < NT; c++) s[c] = _mm512_setzero_ps();
    const float *xr = x + t0 * x_stride;
    for (int64_t k = 0; k < K; k++) {
        const __m512 wv = _mm512_loadu_ps(panel + k * 16);
#pragma GCC unroll 8
        for (int c = 0; c < NT; c++)
            s[c] = _mm512_fmadd_ps(wv, _mm512_set1_ps(xr[c * x_stride + k]), s[c]);
    }
#pragma GCC unroll 8
    for (int c = 0; c < NT; c++) store_rows(y + (t0 + c) * y_stride, s[c], nr, acc);
}

static void gemm_f(const float *panel, int64_t K, const float *x, int64_t x_stride, int64_t T,
                   int nr, float *y, int64_t y_stride, bool acc) {
    int64_t t = 0;
    for (; t + 8 <= T; t += 8) gemm_f_tile(panel, K, x, x_stride, t, 8, nr, y, y_stride, acc);
    switch (T - t) {
        case 7:
            gemm_f_tile(panel, K, x, x_stride, t, 7, nr, y, y_stride, acc);
            break;
        case 6:
            gemm_f_tile(panel, K, x, x_stride, t, 6, nr, y, y_stride, acc);
            break;
        case 5:
            gemm_f_tile(panel, K, x, x_stride, t, 5, nr, y, y_stride, acc);
            break;
        case 4:
            gemm_f_tile(panel, K, x, x_stride, t, 4, nr, y, y_stride, acc);
            break;
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

/* NP bf16 panels (consecutive, K * 16 values apart) x NT tokens with vdpbf16ps. */
__attribute__((target("avx512bf16"))) static inline __attribute__((always_inline)) void
gemm_bf16_tile(const uint16_t *panel, const int NP, int64_t K, const uint16_t *xb, int64_t t0,
               const int NT, int nr, float *y, int64_t y_stride, bool acc) {
    __m512 s[2][12];
#pragma GCC unroll 12
    for (int c = 0; c < NT; c++)
#pragma GCC unroll 2
        for (int i = 0; i < NP; i++) s[i][c] = _mm512_setzero_ps();
    const uint16_t *xr = xb + t0 * K, *p1 = panel + K * 16;
    for (int64_t k2 = 0; k2 < K / 2; k2++) {
        const __m512bh w0 = (__m512bh)_mm512_loadu_si512(panel + k2 * 32);
        const __m512bh w1 = NP > 1 ? (__m512bh)_mm512_loadu_si512(p1 + k2 * 32) : w0;
#pragma GCC unroll 12
        for (int c = 0; c < NT; c++) {
            const __m512bh xv = (__m512bh)_mm512_set1_epi32(ld32(xr + c * K + 2 * k2));
            s[0][c] = _mm512_dpbf16_ps(s[0][c], w0, xv);
            if (NP > 1) s[1][c] = _mm512_dpbf16_ps(s[1][c], w1, xv);
        }
    }
#pragma GCC unroll 12
    for (int c = 0; c < NT; c++)
#pragma GCC unroll 2
        for (int i = 0; i < NP; i++)
            if (nr > 16 * i)
                store_rows(y + (t0 + c) * y_stride + 16 * i, s[i][c],
                           nr - 16 * i > 16 ? 16 : nr - 16 * i, acc);
}

/* BF16 rows [r0, r1) x NT <= XLLM_GEMV_MAX_T tokens in bf16 (decode): one row at a time,
 * front to back, two bf16-pair dot chains per token. K % 32 == 0. */
__attribute__((target("avx512bf16"))) static inline __attribute__((always_inline)) void
gemv_bf16_t(const xllm_mat *w, int64_t r0, int64_t r1, const uint16_t *xb, const int NT, float *y,
            int64_t y_stride, bool acc) {
    const int64_t K = w->n_cols;
    for (int64_t r = r0; r < r1; r++) {
        const uint16_t *row =
            (const uint16_t *)((const uint8_t *)w->data + (size_t)r * w->row_bytes);
        __m512 s0[XLLM_GEMV_MAX_T], s1[XLLM_GEMV_MAX_T];
#pragma GCC unroll 4
        for (int c = 0; c < NT; c++) s0[c] = s1[c] = _mm512_setzero_ps();
        int64_t k = 0;
        for (; k + 64 <= K; k += 64) {
            const __m512bh w0 = (__m512bh)_mm512_loadu_si512(row + k);
            const __m512bh w1 = (__m512bh)_mm512_loadu_si512(row + k + 32);
#pragma GCC unroll 4
            for (int c = 0; c < NT; c++) {
                s0[c] = _mm512_dpbf16_ps(s0[c], w0, (__m512bh)_mm512_loadu_si512(xb + c * K + k));
                s1[c] =
                    _mm512_dpbf16_ps(s1[c], w1, (__m512bh)_mm512_loadu_si512(xb + c * K + k + 32));
            }
        }
        if (k < K) {
            const __m512bh w0 = (__m512bh)_mm512_loadu_si512(row + k);
#pragma GCC unroll 4
            for (int c = 0; c < NT; c++)
                s0[c] = _mm512_dpbf16_ps(s0[c], w0, (__m512bh)_mm512_loadu_si512(xb + c * K + k));
        }
#pragma GCC unroll 4
        for (int c = 0; c < NT; c++)
            put(y, c * y_stride + r, hsum(_mm512_add_ps(s0[c], s1[c])), acc);
    }
}

__attribute__((target("avx512bf16"))) static void gemv_bf16(const xllm_mat *w, int64_t r0,
                                                            int64_t r1, const uint16_t *xb,
                                                            int64_t T, float *y, int64_t y_stride,
                                                            bool acc) {
#define CALL(NT) gemv_bf16_t(w, r0, r1, xb, NT, y, y_stride, acc)
    BY_T(T, CALL);
#undef CALL
}

/* One BF16 panel (K / 2, 16, 2) x NT <= XLLM_GEMV_MAX_T tokens (decode): the panel front to
 * back, one stream, each 64-byte vector (16 rows x a pair of elements) into one vdpbf16ps per
 * token, which leaves the 16 rows' sums in lanes (no horizontal sums as the row kernel has);
 * four chains a token. K % 32 == 0. */
__attribute__((target("avx512bf16"))) static inline __attribute__((always_inline)) void
gemv_bf16p_t(const uint16_t *panel, int64_t K, const uint16_t *xb, const int NT, int nr, float *y,
             int64_t y_stride, bool acc) {
    __m512 s[XLLM_GEMV_MAX_T][4];
#pragma GCC unroll 4
    for (int c = 0; c < NT; c++)
#pragma GCC unroll 4
        for (int u = 0; u < 4; u++) s[c][u] = _mm512_setzero_ps();
    for (int64_t k2 = 0; k2 < K / 2; k2 += 4) {
        __m512bh w[4];
#pragma GCC unroll 4
        for (int u = 0; u < 4; u++) w[u] = (__m512bh)_mm512_loadu_si512(panel + (k2 + u) * 32);
#pragma GCC unroll 4
        for (int c = 0; c < NT; c++)
#pragma GCC unroll 4
            for (int u = 0; u < 4; u++)
                s[c][u] = _mm512_dpbf16_ps(
                    s[c][u], w[u], (__m512bh)_mm512_set1_epi32(ld32(xb + c * K + 2 * (k2 + u))));
    }
#pragma GCC unroll 4
    for (int c = 0; c < NT; c++)
        store_rows(y + c * y_stride,
                   _mm512_add_ps(_mm512_add_ps(s[c][0], s[c][1]), _mm512_add_ps(s[c][2], s[c][3])),
                   nr, acc);
}

__attribute__((target("avx512bf16"))) static void gemv_bf16p(const uint16_t *panel, int64_t K,
                                                             const uint16_t *xb, int64_t T, int nr,
                                                             float *y, int64_t y_stride, bool acc) {
#define CALL(NT) gemv_bf16p_t(panel, K, xb, NT, nr, y, y_stride, acc)
    BY_T(T, CALL);
#undef CALL
}

#define BF16_TILES(NP_)                                                                            \
    do {                                                                                           \
        for (; t + 8 <= T; t += 8) gemm_bf16_tile(panel, NP_, K, xb, t, 8, nr, y, y_stride, acc);  \
        switch (T - t) {                                                                           \
            case 7:                                                                                \
                gemm_bf16_tile(panel, NP_, K, xb, t, 7, nr, y, y_stride, acc);                     \
                break;                                                                             \
            case 6:                                                                                \
                gemm_bf16_tile(panel, NP_, K, xb, t, 6, nr, y, y_stride, acc);                     \
                break;                                                                             \
            case 5:                                                                                \
                gemm_bf16_tile(panel, NP_, K, xb, t, 5, nr, y, y_stride, acc);                     \
                break;                                                                             \
            case 4:                                                                                \
                gemm_bf16_tile(panel, NP_, K, xb, t, 4, nr, y, y_stride, acc);                     \
                break;                                                                             \
            case 3:                                                                                \
                gemm_bf16_tile(panel, NP_, K, xb, t, 3, nr, y, y_stride, acc);                     \
                break;                                                                             \
            case 2:                                                                                \
                gemm_bf16_tile(panel, NP_, K, xb, t, 2, nr, y, y_stride, acc);                     \
                break;                                                                             \
            case 1:                                                                                \
                gemm_bf16_tile(panel, NP_, K, xb, t, 1, nr, y, y_stride, acc);                     \
                break;                                                                             \
            default:                                                                               \
                break;                                                                             \
        }                                                                                          \
    } while (0)

__attribute__((target("avx512bf16"))) static void gemm_bf16(const uint16_t *panel, int np,
                                                            int64_t K, const uint16_t *xb,
                                                            int64_t T, int nr, float *y,
                                                            int64_t y_stride, bool acc) {
    int64_t t = 0;
    if (np == 2)
        for (; t + 12 <= T; t += 12) gemm_bf16_tile(panel, 2, K, xb, t, 12, nr, y, y_stride, acc);
    if (np == 2)
        BF16_TILES(2);
    else
        BF16_TILES(1);
}

__attribute__((target("avx512bf16"))) static void to_bf16(const float *x, uint16_t *y, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256((__m256i *)(y + i),
                            (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + i)));
    for (; i < n; i++) y[i] = xllm_fp32_to_bf16(x[i]);
}

static void to_f16(const float *x, uint16_t *y, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256((__m256i *)(y + i),
                            _mm512_cvtps_ph(_mm512_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++) y[i] = xllm_fp32_to_fp16(x[i]);
}

/* ---- elementwise ------------------------------------------------------------------------- */

static float dot_f32(const float *a, const float *b, int64_t n) {
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);
    }
    if (i + 16 <= n) {
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
        i += 16;
    }
    if (i < n) {
        const __mmask16 mk = (__mmask16)((1u << (n - i)) - 1u);
        s1 =
            _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, a + i), _mm512_maskz_loadu_ps(mk, b + i), s1);
    }
    return hsum(_mm512_add_ps(s0, s1));
}

static void rmsnorm(float *out, const float *x, const float *w, int64_t n, float eps) {
    const float ss = dot_f32(x, x, n);
    const __m512 sc = _mm512_set1_ps((float)(1.0 / sqrt((double)ss / (double)n + eps)));
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(x + i), sc),
                                                _mm512_loadu_ps(w + i)));
    if (i < n) {
        const __mmask16 mk = (__mmask16)((1u << (n - i)) - 1u);
        _mm512_mask_storeu_ps(out + i, mk,
                              _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(mk, x + i), sc),
                                            _mm512_maskz_loadu_ps(mk, w + i)));
    }
}

static inline __m512 silu_mul(__m512 g, __m512 u) {
    const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), g));
    return _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e)), u);
}

static void swiglu(float *out, const float *g, const float *u, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(out + i, silu_mul(_mm512_loadu_ps(g + i), _mm512_loadu_ps(u + i)));
    if (i < n) {
        const __mmask16 mk = (__mmask16)((1u << (n - i)) - 1u);
        _mm512_mask_storeu_ps(
            out + i, mk,
            silu_mul(_mm512_maskz_loadu_ps(mk, g + i), _mm512_maskz_loadu_ps(mk, u + i)));
    }
}

/* ---- fused attention --------------------------------------------------------------------- */

/* Positions per block: a block's 16 scores of a query come out as one vector (few queries: by
 * one transpose of the partial sums; many: positions by queries, the queries in lanes); K / V
 * rows of the block are converted once and reused by every query of the call. */
#define ATT_BLK 16
/* Blocks ahead whose K / V lines are touched (several tokens) or prefetched (decode). */
#define ATT_TOUCH 1

/* Converts 16 elements of a K/V row (F32 or F16) to floats. */
static inline __m512 kv16(const uint8_t *row, xllm_dtype t, int d) {
    return t == XLLM_DTYPE_F32
               ? _mm512_loadu_ps((const float *)row + d)
               : _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)row + d)));
}

/* Online-softmax step of one query over a block: s (16 scores, -inf where invalid), running
 * max m and sum l; writes the block's weights to pv and returns the factor the query's output
 * so far is scaled by. */
static inline float att_softmax(__m512 s, __mmask16 valid, float *m, float *l, float *pv) {
    const float bm = _mm512_reduce_max_ps(s);
    const float mnew = bm > *m ? bm : *m;
    /* 0 on the first block (m = -inf); 1 once the running max settles; by the vector exp, not
     * a call to expf (which took 6% of a prompt's attention time) */
    const float alpha = mnew == *m ? 1.0f : _mm512_cvtss_f32(exp512(_mm512_set1_ps(*m - mnew)));
    const __m512 p = _mm512_maskz_mov_ps(valid, exp512(_mm512_sub_ps(s, _mm512_set1_ps(mnew))));
    *l = *l * alpha + _mm512_reduce_add_ps(p);
    *m = mnew;
    _mm512_store_ps(pv, p);
    return alpha;
}

/* One query against one block: scores, online-softmax update, o += p V. DV = D / 16 when the
 * caller knows it (registers hold o), 0 for the general loop. The scores are dot products
 * against the block's K rows kr (few queries; many go to att_prefill_head). */
static inline __attribute__((always_inline)) void att_query(const int DV, int D, const float *q,
                                                            const float (*vb)[256], int cnt,
                                                            float *m, float *l, float *o,
                                                            const float (*kr)[256]) {
    const __mmask16 valid = (__mmask16)(cnt >= 16 ? 0xffffu : (1u << cnt) - 1u);
    /* dot products against K rows, then one transpose adds the 16 partial vectors into a
     * vector of 16 scores */
    __m512i acc[16];
    for (int pp = 0; pp < 16; pp++) {
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        if (pp < cnt) {
            int d = 0;
            for (; d + 32 <= D; d += 32) {
                a0 = _mm512_fmadd_ps(_mm512_load_ps(q + d), _mm512_load_ps(kr[pp] + d), a0);
                a1 = _mm512_fmadd_ps(_mm512_load_ps(q + d + 16), _mm512_load_ps(kr[pp] + d + 16),
                                     a1);
            }
            if (d < D) a0 = _mm512_fmadd_ps(_mm512_load_ps(q + d), _mm512_load_ps(kr[pp] + d), a0);
        }
        acc[pp] = _mm512_castps_si512(_mm512_add_ps(a0, a1));
    }
    transpose16(acc);
    __m512 t0 = _mm512_setzero_ps(), t1 = _mm512_setzero_ps();
    for (int j = 0; j < 16; j += 2) {
        t0 = _mm512_add_ps(t0, _mm512_castsi512_ps(acc[j]));
        t1 = _mm512_add_ps(t1, _mm512_castsi512_ps(acc[j + 1]));
    }
    const __m512 s = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), valid, _mm512_add_ps(t0, t1));
    float pv[16] __attribute__((aligned(64)));
    const __m512 av = _mm512_set1_ps(att_softmax(s, valid, m, l, pv));
    if (DV > 0) {
        __m512 ov[16];
#pragma GCC unroll 16
        for (int j = 0; j < DV; j++) ov[j] = _mm512_mul_ps(_mm512_load_ps(o + 16 * j), av);
        for (int pp = 0; pp < cnt; pp++) {
            const __m512 w = _mm512_set1_ps(pv[pp]);
#pragma GCC unroll 16
            for (int j = 0; j < DV; j++)
                ov[j] = _mm512_fmadd_ps(w, _mm512_load_ps(vb[pp] + 16 * j), ov[j]);
        }
#pragma GCC unroll 16
        for (int j = 0; j < DV; j++) _mm512_store_ps(o + 16 * j, ov[j]);
    } else {
        for (int j = 0; j < D; j += 16) {
            __m512 ov = _mm512_mul_ps(_mm512_load_ps(o + j), av);
            for (int pp = 0; pp < cnt; pp++)
                ov = _mm512_fmadd_ps(_mm512_set1_ps(pv[pp]), _mm512_load_ps(vb[pp] + j), ov);
            _mm512_store_ps(o + j, ov);
        }
    }
}

/* Decode (one token): NQ (1 or 2) query heads sharing one KV head against a block of cnt
 * positions, K / V read straight from the cache rows (F16 converted in registers, no staged
 * copy), each converted vector used by the NQ queries. D = 16 * DV. q: scaled queries; o:
 * their outputs so far. Position pp's step also prefetches this head's K / V row pp of the
 * next block (pk / pn: its first row; nl lines a row, na rows) into L2: requests to L2 are
 * not held by the few L1 miss buffers, so memory streams while the block computes (one
 * sequence x 8 KV heads x 256 positions, 2 threads from memory: 24-27 GB/s against 17-20
 * touching the next block with loads ahead of it, which the core waits for; one KV head a
 * call: 23-24 against 14-15). */
static inline __attribute__((always_inline)) void
att_decode_block(const int NQ, const int DV, const float (*q)[256], const uint8_t *kh,
                 const uint8_t *vh, size_t rb, xllm_dtype t, int cnt, float *m, float *l,
                 float (*o)[256], const uint8_t *pk, const uint8_t *pn, int nl, int na) {
    const __mmask16 valid = (__mmask16)(cnt >= 16 ? 0xffffu : (1u << cnt) - 1u);
    /* the queries in registers (a 512-bit load is the scarce resource here: about one a
     * cycle); the 16 positions' scores by a reduction tree built as positions come: level 1
     * folds two positions' dot-product vectors into one (8 partial sums each), level 2 two of
     * those (4 each), level 3 (2 each), level 4 (1 each); lane 4 i + j then holds position
     * i + 4 j, put back in order by one permute */
    __m512 qr[2][16];
    for (int i = 0; i < NQ; i++)
#pragma GCC unroll 16
        for (int j = 0; j < DV; j++) qr[i][j] = _mm512_load_ps(q[i] + 16 * j);
    __m512 l3[2][2];
#pragma GCC unroll 2
    for (int h8 = 0; h8 < 2; h8++) {
        __m512 l2[2][2];
#pragma GCC unroll 2
        for (int h4 = 0; h4 < 2; h4++) {
            __m512 l1[2][2];
#pragma GCC unroll 2
            for (int h2 = 0; h2 < 2; h2++) {
                __m512 v[2][2];
#pragma GCC unroll 2
                for (int u = 0; u < 2; u++) {
                    const int pp = 8 * h8 + 4 * h4 + 2 * h2 + u;
                    __m512 a[2][2] = {{_mm512_setzero_ps(), _mm512_setzero_ps()},
                                      {_mm512_setzero_ps(), _mm512_setzero_ps()}};
                    for (int j = 0; pp < na && j < nl; j++)
                        _mm_prefetch(pk + (size_t)pp * rb + 64 * j, _MM_HINT_T1);
                    if (pp < cnt) {
                        const uint8_t *kr = kh + (size_t)pp * rb;
#pragma GCC unroll 16
                        for (int j = 0; j < DV; j++) {
                            const __m512 kv = kv16(kr, t, 16 * j);
                            for (int i = 0; i < NQ; i++)
                                a[i][j & 1] = _mm512_fmadd_ps(qr[i][j], kv, a[i][j & 1]);
                        }
                    }
                    for (int i = 0; i < NQ; i++) v[i][u] = _mm512_add_ps(a[i][0], a[i][1]);
                }
                for (int i = 0; i < NQ; i++)
                    l1[i][h2] = _mm512_add_ps(_mm512_shuffle_f32x4(v[i][0], v[i][1], 0x44),
                                              _mm512_shuffle_f32x4(v[i][0], v[i][1], 0xEE));
            }
            for (int i = 0; i < NQ; i++)
                l2[i][h4] = _mm512_add_ps(_mm512_shuffle_f32x4(l1[i][0], l1[i][1], 0x88),
                                          _mm512_shuffle_f32x4(l1[i][0], l1[i][1], 0xDD));
        }
        for (int i = 0; i < NQ; i++)
            l3[i][h8] =
                _mm512_add_ps(_mm512_shuffle_ps(l2[i][0], l2[i][1], _MM_SHUFFLE(1, 0, 1, 0)),
                              _mm512_shuffle_ps(l2[i][0], l2[i][1], _MM_SHUFFLE(3, 2, 3, 2)));
    }
    const __m512i order = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
    float pv[2][16] __attribute__((aligned(64)));
    __m512 av[2];
    for (int i = 0; i < NQ; i++) {
        const __m512 tree =
            _mm512_add_ps(_mm512_shuffle_ps(l3[i][0], l3[i][1], _MM_SHUFFLE(2, 0, 2, 0)),
                          _mm512_shuffle_ps(l3[i][0], l3[i][1], _MM_SHUFFLE(3, 1, 3, 1)));
        const __m512 sc = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), valid,
                                             _mm512_permutexvar_ps(order, tree));
        av[i] = _mm512_set1_ps(att_softmax(sc, valid, &m[i], &l[i], pv[i]));
    }
    __m512 ov[2][16];
    for (int i = 0; i < NQ; i++)
#pragma GCC unroll 16
        for (int j = 0; j < DV; j++) ov[i][j] = _mm512_mul_ps(_mm512_load_ps(o[i] + 16 * j), av[i]);
    for (int pp = 0; pp < cnt; pp++) {
        const uint8_t *vr = vh + (size_t)pp * rb;
        for (int j = 0; pp < na && j < nl; j++)
            _mm_prefetch(pn + (size_t)pp * rb + 64 * j, _MM_HINT_T1);
        __m512 w[2];
        for (int i = 0; i < NQ; i++) w[i] = _mm512_set1_ps(pv[i][pp]);
#pragma GCC unroll 16
        for (int j = 0; j < DV; j++) {
            const __m512 vv = kv16(vr, t, 16 * j);
            for (int i = 0; i < NQ; i++) ov[i][j] = _mm512_fmadd_ps(w[i], vv, ov[i][j]);
        }
    }
    for (int i = 0; i < NQ; i++)
#pragma GCC unroll 16
        for (int j = 0; j < DV; j++) _mm512_store_ps(o[i] + 16 * j, ov[i][j]);
}

/* acc[j] += x[j * xs] * (w0, w1) for 8 rows j: an 8 x 32 outer-product step. */
static inline __attribute__((always_inline)) void fma8x2(__m512 acc[8][2], const float *x,
                                                         size_t xs, __m512 w0, __m512 w1) {
#pragma GCC unroll 8
    for (int j = 0; j < 8; j++) {
        const __m512 v = _mm512_set1_ps(x[(size_t)j * xs]);
        acc[j][0] = _mm512_fmadd_ps(v, w0, acc[j][0]);
        acc[j][1] = _mm512_fmadd_ps(v, w1, acc[j][1]);
    }
}

/* Rows j of dst (32 floats each) = acc[j]. */
static inline __attribute__((always_inline)) void store8x2(float (*dst)[32], __m512 acc[8][2]) {
#pragma GCC unroll 8
    for (int j = 0; j < 8; j++) {
        _mm512_store_ps(dst[j], acc[j][0]);
        _mm512_store_ps(dst[j] + 16, acc[j][1]);
    }
}

/* Prompt attention of one KV head, many queries (9..32: a run of a sequence's tokens times the
 * query heads of the group), with the queries in the lanes of two vectors: the scores of a
 * block come out as 16 positions x 32 queries from broadcast K elements against the transposed
 * queries (8 positions x 2 vectors a pass: 10 loads feed 16 FMAs, where per-query scores took a
 * broadcast load an FMA), the online softmax is lane-wise (no horizontal max or sum a query),
 * and o += p V keeps 8 of the head's dimensions x 32 queries in registers over the block's
 * positions (the outputs transposed, (D, 32)). Lanes past nq hold zero queries that see every
 * position (finite scores, discarded). q: the scaled queries; lim: positions each sees. */
static void att_prefill_head(const xllm_attn_args *a, int hh, const float (*q)[256],
                             const int32_t *lim, int nq, int32_t n_max) {
    const int D = a->head_dim;
    const size_t es = a->kv_type == XLLM_DTYPE_F32 ? 4 : 2;
    float qt[256][32] __attribute__((aligned(64)));
    float ot[256][32] __attribute__((aligned(64)));
    float kf[ATT_BLK][256] __attribute__((aligned(64)));
    float vb[ATT_BLK][256] __attribute__((aligned(64)));
    float st[ATT_BLK][32] __attribute__((aligned(64)));
    int32_t lv[32] __attribute__((aligned(64)));
    /* the queries transposed by 16 x 16 tiles */
    for (int i0 = 0; i0 < 32; i0 += 16)
        for (int d0 = 0; d0 < D; d0 += 16) {
            __m512i r[16];
            for (int i = 0; i < 16; i++)
                r[i] = i0 + i < nq ? _mm512_castps_si512(_mm512_load_ps(q[i0 + i] + d0))
                                   : _mm512_setzero_si512();
            transpose16(r);
            for (int d = 0; d < 16; d++) _mm512_store_si512(qt[d0 + d] + i0, r[d]);
        }
    for (int i = 0; i < 32; i++) lv[i] = i < nq ? lim[i] : n_max;
    memset(ot, 0, sizeof(float) * 32 * (size_t)D);
    const __m512i lim0 = _mm512_load_si512(lv), lim1 = _mm512_load_si512(lv + 16);
    __m512 m0 = _mm512_set1_ps(-INFINITY), m1 = m0, l0 = _mm512_setzero_ps(), l1 = l0;
    const uint8_t *kbh = (const uint8_t *)a->k + (a->kv_off + (int64_t)hh * D) * (int64_t)es;
    const uint8_t *vbh = (const uint8_t *)a->v + (a->kv_off + (int64_t)hh * D) * (int64_t)es;
    const size_t rb = a->row_bytes;
    for (int32_t p0 = 0; p0 < n_max; p0 += ATT_BLK) {
        const int pb = n_max - p0 < ATT_BLK ? n_max - p0 : ATT_BLK;
        /* the next block's K / V lines into L2 while this one computes */
        for (int p = 0; p < ATT_BLK && p0 + ATT_BLK + p < n_max; p++)
            for (size_t off = 0; off < (size_t)D * es; off += 64) {
                _mm_prefetch(kbh + (size_t)(p0 + ATT_BLK + p) * rb + off, _MM_HINT_T1);
                _mm_prefetch(vbh + (size_t)(p0 + ATT_BLK + p) * rb + off, _MM_HINT_T1);
            }
        for (int p = 0; p < ATT_BLK; p++)
            for (int d = 0; d < D; d += 16) {
                _mm512_store_ps(kf[p] + d, p < pb ? kv16(kbh + (size_t)(p0 + p) * rb, a->kv_type, d)
                                                  : _mm512_setzero_ps());
                _mm512_store_ps(vb[p] + d, p < pb ? kv16(vbh + (size_t)(p0 + p) * rb, a->kv_type, d)
                                                  : _mm512_setzero_ps());
            }
        /* scores: 8 positions x 32 queries a pass */
        for (int h8 = 0; h8 < ATT_BLK; h8 += 8) {
            __m512 acc[8][2];
#pragma GCC unroll 8
            for (int j = 0; j < 8; j++) acc[j][0] = acc[j][1] = _mm512_setzero_ps();
            for (int d = 0; d < D; d++)
                fma8x2(acc, &kf[h8][d], 256, _mm512_load_ps(qt[d]), _mm512_load_ps(qt[d] + 16));
            store8x2(st + h8, acc);
        }
        /* lane-wise online softmax */
        __mmask16 k0[ATT_BLK], k1[ATT_BLK];
        __m512 b0 = _mm512_set1_ps(-INFINITY), b1 = b0;
        for (int p = 0; p < ATT_BLK; p++) {
            const __m512i pv = _mm512_set1_epi32(p0 + p);
            k0[p] = p < pb ? _mm512_cmpgt_epi32_mask(lim0, pv) : 0;
            k1[p] = p < pb ? _mm512_cmpgt_epi32_mask(lim1, pv) : 0;
            b0 = _mm512_mask_max_ps(b0, k0[p], b0, _mm512_load_ps(st[p]));
            b1 = _mm512_mask_max_ps(b1, k1[p], b1, _mm512_load_ps(st[p] + 16));
        }
        const __m512 n0 = _mm512_max_ps(m0, b0), n1 = _mm512_max_ps(m1, b1);
        /* (first block: m = -inf, the factor ~0 against o = l = 0) */
        const __m512 a0 = exp512(_mm512_sub_ps(m0, n0)), a1 = exp512(_mm512_sub_ps(m1, n1));
        m0 = n0;
        m1 = n1;
        l0 = _mm512_mul_ps(l0, a0);
        l1 = _mm512_mul_ps(l1, a1);
        for (int p = 0; p < ATT_BLK; p++) {
            const __m512 e0 =
                _mm512_maskz_mov_ps(k0[p], exp512(_mm512_sub_ps(_mm512_load_ps(st[p]), n0)));
            const __m512 e1 =
                _mm512_maskz_mov_ps(k1[p], exp512(_mm512_sub_ps(_mm512_load_ps(st[p] + 16), n1)));
            _mm512_store_ps(st[p], e0);
            _mm512_store_ps(st[p] + 16, e1);
            l0 = _mm512_add_ps(l0, e0);
            l1 = _mm512_add_ps(l1, e1);
        }
        /* o = o * factor + p V, 8 dimensions x 32 queries in registers */
        for (int d0 = 0; d0 < D; d0 += 8) {
            __m512 acc[8][2];
#pragma GCC unroll 8
            for (int j = 0; j < 8; j++) {
                acc[j][0] = _mm512_mul_ps(_mm512_load_ps(ot[d0 + j]), a0);
                acc[j][1] = _mm512_mul_ps(_mm512_load_ps(ot[d0 + j] + 16), a1);
            }
            for (int p = 0; p < pb; p++)
                fma8x2(acc, &vb[p][d0], 1, _mm512_load_ps(st[p]), _mm512_load_ps(st[p] + 16));
            store8x2(ot + d0, acc);
        }
    }
    /* each query's outputs over its softmax sum: lanes scaled, then transposed back by 16 x 16
     * tiles */
    const __m512 il[2] = {_mm512_div_ps(_mm512_set1_ps(1.0f), l0),
                          _mm512_div_ps(_mm512_set1_ps(1.0f), l1)};
    for (int i0 = 0; i0 < nq; i0 += 16)
        for (int d0 = 0; d0 < D; d0 += 16) {
            __m512i r[16];
            for (int d = 0; d < 16; d++)
                r[d] = _mm512_castps_si512(
                    _mm512_mul_ps(_mm512_load_ps(ot[d0 + d] + i0), il[i0 / 16]));
            transpose16(r);
            for (int i = i0; i < nq && i < i0 + 16; i++) {
                const int tok = i / a->group, h = hh * a->group + i % a->group;
                _mm512_storeu_ps(a->out + (size_t)tok * a->out_stride + (size_t)h * D + d0,
                                 _mm512_castsi512_ps(r[i - i0]));
            }
        }
}

static void attention(const xllm_attn_args *a) {
    /* H consecutive KV heads per call (all of a token's, for decode): the block loop then reads
     * whole K / V rows, which the heads share in cache */
    const int D = a->head_dim, H = a->n_kv > 0 ? a->n_kv : 1, nqh = a->n_tok * a->group,
              nq = H * nqh;
    if (D % 16 != 0) {
        xllm_op_attention_group(a);
        return;
    }
    const size_t es = a->kv_type == XLLM_DTYPE_F32 ? 4 : 2;
    const int nl = D * (int)es / 64; /* lines of one head's K / V row (decode prefetches) */
    float qf[XLLM_ATTN_MAX_Q][256] __attribute__((aligned(64)));
    float o[XLLM_ATTN_MAX_Q][256] __attribute__((aligned(64)));
    float vb[ATT_BLK][256] __attribute__((aligned(64))); /* V block: (16 positions, D) */
    float kf[ATT_BLK][256] __attribute__((aligned(64))); /* K block rows (few-query path) */
    float mx[XLLM_ATTN_MAX_Q], l[XLLM_ATTN_MAX_Q];
    int32_t lim[XLLM_ATTN_MAX_Q];
    for (int i = 0; i < nq; i++) {
        const int hh = i / nqh, tok = (i % nqh) / a->group,
                  h = hh * a->group + (i % nqh) % a->group;
        const float *q = a->q + (size_t)tok * a->q_stride + (size_t)h * D;
        for (int d = 0; d < D; d += 16)
            _mm512_store_ps(qf[i] + d,
                            _mm512_mul_ps(_mm512_loadu_ps(q + d), _mm512_set1_ps(a->scale)));
        memset(o[i], 0, (size_t)D * sizeof(float));
        mx[i] = -INFINITY;
        l[i] = 0.0f;
        lim[i] = a->n_pos + tok;
    }
    const int32_t n_max = a->n_pos + a->n_tok - 1;
    if (nqh > 8 && nqh <= 32) {
        for (int hh = 0; hh < H; hh++)
            att_prefill_head(a, hh, (const float(*)[256])(qf + hh * nqh), lim + hh * nqh, nqh,
                             n_max);
        return;
    }
    const uint8_t *kb = (const uint8_t *)a->k + a->kv_off * es;
    const uint8_t *vbase = (const uint8_t *)a->v + a->kv_off * es;
    for (int32_t p0 = 0; p0 < n_max; p0 += ATT_BLK) {
        const int pb = n_max - p0 < ATT_BLK ? n_max - p0 : ATT_BLK;
        const int32_t pa = p0 + ATT_TOUCH * ATT_BLK;
        const int na = pa >= n_max ? 0 : (n_max - pa < ATT_BLK ? n_max - pa : ATT_BLK);
        const bool dec = a->n_tok == 1 && nqh <= 2 && (D == 128 || D == 64);
        if (!dec) {
            /* the next block: its K / V rows are read below head by head, a strided pattern
             * the hardware prefetchers follow poorly from memory; touching their lines here
             * in address order, with loads, K rows then V rows, lets them stream (one
             * sequence x 8 KV heads x 256 positions, one thread from memory: 11.0-11.6 GB/s
             * against 8.2-9.3 with software prefetches of the block after next, ~7 with
             * neither) */
            const size_t hb = (size_t)H * D * es;
            const uint8_t *ka = kb + (size_t)pa * a->row_bytes,
                          *va = vbase + (size_t)pa * a->row_bytes;
            uint32_t touched = 0;
            for (int p = 0; p < na; p++)
                for (size_t off = 0; off < hb; off += 64)
                    touched += *(const volatile uint8_t *)(ka + (size_t)p * a->row_bytes + off);
            for (int p = 0; p < na; p++)
                for (size_t off = 0; off < hb; off += 64)
                    touched += *(const volatile uint8_t *)(va + (size_t)p * a->row_bytes + off);
            (void)touched;
        }
        for (int hh = 0; hh < H; hh++) {
            const uint8_t *kbh = kb + (size_t)hh * D * es, *vbh = vbase + (size_t)hh * D * es;
            if (dec) {
                const uint8_t *kr = kbh + (size_t)p0 * a->row_bytes;
                const uint8_t *vr = vbh + (size_t)p0 * a->row_bytes;
                const uint8_t *pk = kbh + (size_t)pa * a->row_bytes;
                const uint8_t *pn = vbh + (size_t)pa * a->row_bytes;
                float(*qh)[256] = qf + hh * nqh, (*oh)[256] = o + hh * nqh;
#define CALL(NQ, DV)                                                                               \
    att_decode_block(NQ, DV, (const float(*)[256])qh, kr, vr, a->row_bytes, a->kv_type, pb,        \
                     mx + hh * nqh, l + hh * nqh, oh, pk, pn, nl, na)
                if (nqh == 2 && D == 128)
                    CALL(2, 8);
                else if (nqh == 2)
                    CALL(2, 4);
                else if (D == 128)
                    CALL(1, 8);
                else
                    CALL(1, 4);
#undef CALL
                continue;
            }
            /* few queries (the queries-in-lanes kernel takes 9 to 32): scores as dot products
             * against the block's K rows */
            for (int p = 0; p < pb; p++)
                for (int d = 0; d < D; d += 16)
                    _mm512_store_ps(kf[p] + d,
                                    kv16(kbh + (size_t)(p0 + p) * a->row_bytes, a->kv_type, d));
            for (int p = 0; p < pb; p++) {
                const uint8_t *vr = vbh + (size_t)(p0 + p) * a->row_bytes;
                for (int d = 0; d < D; d += 16) _mm512_store_ps(vb[p] + d, kv16(vr, a->kv_type, d));
            }
            for (int i = hh * nqh; i < (hh + 1) * nqh; i++) {
                const int cnt = lim[i] - p0 < pb ? lim[i] - p0 : pb;
                if (cnt <= 0) continue;
#define CALL(DV)                                                                                   \
    att_query(DV, D, qf[i], (const float(*)[256])vb, cnt, &mx[i], &l[i], o[i],                     \
              (const float(*)[256])kf)
                if (D == 128)
                    CALL(8);
                else if (D == 64)
                    CALL(4);
                else
                    CALL(0);
#undef CALL
            }
        }
    }
    for (int i = 0; i < nq; i++) {
        const int hh = i / nqh, tok = (i % nqh) / a->group,
                  h = hh * a->group + (i % nqh) % a->group;
        float *out = a->out + (size_t)tok * a->out_stride + (size_t)h * D;
        const __m512 inv = _mm512_set1_ps(1.0f / l[i]);
        for (int d = 0; d < D; d += 16)
            _mm512_storeu_ps(out + d, _mm512_mul_ps(_mm512_load_ps(o[i] + d), inv));
    }
}

/* ---- tables ------------------------------------------------------------------------------ */

static const xllm_cpu_kernels k_avx512 = {
    .level = XLLM_CPU_AVX512,
    .bf16_dot = false,
    .quant_row = quant_row,
    .gemv = gemv,
    .pack_q = pack_q,
    .gemm_q = gemm_q,
    .gemv_dp = gemv_dp,
    .pack_f = pack_f,
    .gemm_f = gemm_f,
    .dot_f32 = dot_f32,
    .rmsnorm = rmsnorm,
    .swiglu = swiglu,
    .attention = attention,
    .to_f16 = to_f16,
};

static const xllm_cpu_kernels k_avx512_bf16 = {
    .level = XLLM_CPU_AVX512,
    .bf16_dot = true,
    .quant_row = quant_row,
    .gemv = gemv,
    .pack_q = pack_q,
    .gemm_q = gemm_q,
    .gemv_dp = gemv_dp,
    .pack_f = pack_f,
    .gemm_f = gemm_f,
    .pack_bf16 = pack_bf16,
    .gemm_bf16 = gemm_bf16,
    .gemv_bf16 = gemv_bf16,
    .gemv_bf16p = gemv_bf16p,
    .to_bf16 = to_bf16,
    .dot_f32 = dot_f32,
    .rmsnorm = rmsnorm,
    .swiglu = swiglu,
    .attention = attention,
    .to_f16 = to_f16,
};

const xllm_cpu_kernels *xllm_cpu_kernels_avx512(void) {
    return xllm_cpu_has_bf16() ? &k_avx512_bf16 : &k_avx512;
}
#endif
