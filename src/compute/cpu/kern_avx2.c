/* AVX2 + FMA + F16C kernels: float GEMV over F32/F16/BF16 rows, fp32 packed GEMM (quantized
 * weights reach it through the driver's dequantizing pack), dot products and norms. Compiled
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

static bool gemv(const xllm_mat *w, int64_t r0, int64_t r1, const float *x, int64_t x_stride,
                 const xllm_q8act *a, int64_t T, float *y, int64_t y_stride, bool acc) {
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
