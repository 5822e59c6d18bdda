/* Every dispatched kernel at every ISA level this CPU has, against the scalar reference, on
 * random inputs of awkward sizes: matmul per weight type (GEMV and packed GEMM paths, with and
 * without the fused accumulate), dot, RMSNorm, SwiGLU and the fused attention. Errors are
 * normalized per output by sum |w_i x_i| (matmul) or the reference's magnitude. */
#include <math.h>
#include <string.h>

#include "compute/cpu/cpu.h"
#include "compute/cpu/kernels.h"
#include "compute/cpu/ops.h"
#include "compute/dtype.h"
#include "testutil.h"

static const xllm_cpu_level k_levels[] = {XLLM_CPU_SCALAR, XLLM_CPU_AVX2, XLLM_CPU_AVX512};

static bool level_ok(xllm_cpu_level l) {
    return l <= xllm_cpu_detect();
}

/* Bound on |y - ref| / sum|w x| for a weight type: 8-bit activations (quantized types) lose
 * about 1/254 per element; bf16 activations 1/256; float paths only rounding. */
static double tol_of(xllm_dtype t, xllm_cpu_level l) {
    if (l == XLLM_CPU_SCALAR) return 1e-5;
    const xllm_dtype_traits *tr = xllm_dtype_get_traits(t);
    if (tr->quantized) return 1.2e-2;
    if (t == XLLM_DTYPE_BF16) return 1e-2;
    return 1e-5;
}

/* Worst error of y (T, rows) against the reference dot products of the quantized rows w
 * (plus y0 when acc), normalized by the sum of |w x| of each output. */
static double matmul_err(xllm_dtype type, const uint8_t *w, size_t rb, const float *wf,
                         const float *x, const float *y, const float *y0, int64_t rows, int64_t K,
                         int64_t T) {
    double worst = 0;
    for (int64_t t = 0; t < T; t++)
        for (int64_t r = 0; r < rows; r++) {
            double ref = xllm_vec_dot_ref(type, w + (size_t)r * rb, x + t * K, K), mag = 0;
            for (int64_t k = 0; k < K; k++) mag += fabs((double)wf[r * K + k] * x[t * K + k]);
            if (y0) ref += y0[t * rows + r];
            double e = fabs(y[t * rows + r] - ref) / (mag + 1e-30);
            if (e > worst) worst = e;
        }
    return worst;
}

static void check_matmul(xllm_threadpool *tp, xllm_cpu_level level, xllm_dtype type, int64_t rows,
                         int64_t K, int64_t T, uint64_t *rs) {
    const size_t rb = xllm_dtype_row_bytes(type, K);
    uint8_t *w = malloc(rb * (size_t)rows);
    float *row = malloc((size_t)K * sizeof(float));
    float *wf = malloc((size_t)(rows * K) * sizeof(float));
    float *x = malloc((size_t)(T * K) * sizeof(float));
    float *y = malloc((size_t)(T * rows) * sizeof(float));
    float *y0 = malloc((size_t)(T * rows) * sizeof(float));
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t k = 0; k < K; k++) row[k] = xllm_test_rand_f(rs);
        xllm_quant_row_ref(type, row, w + (size_t)r * rb, K);
        xllm_dequant_row_ref(type, w + (size_t)r * rb, wf + r * K, K);
    }
    for (int64_t i = 0; i < T * K; i++) x[i] = xllm_test_rand_f(rs) * (1.0f + (float)(i % 7));
    for (int64_t i = 0; i < T * rows; i++) y0[i] = xllm_test_rand_f(rs);
    xllm_mat m = {w, type, rows, K, rb};
    xllm_mm *mm = xllm_mm_new(tp, level, T, K);
    for (int acc = 0; acc < 2; acc++) {
        memcpy(y, y0, (size_t)(T * rows) * sizeof(float));
        xllm_mm_input(mm, x, K, T, K);
        xllm_mm_run(mm, &m, y, rows, acc);
        const double worst = matmul_err(type, w, rb, wf, x, y, acc ? y0 : NULL, rows, K, T);
        if (worst > tol_of(type, level)) {
            fprintf(stderr, "matmul %s level %s rows %lld K %lld T %lld acc %d: err %.3g\n",
                    xllm_dtype_name(type), xllm_cpu_level_name(level), (long long)rows,
                    (long long)K, (long long)T, acc, worst);
            fail();
        }
    }
    /* weights packed ahead of time give the same results as packing per call */
    xllm_mm *pm = xllm_mm_new(tp, level, T, K);
    /* packed by the best level (a model's panels are made once, whatever level reads them) */
    xllm_mm *packer = xllm_mm_new(tp, XLLM_CPU_AVX512, T, K);
    xllm_mm_packs *pk = xllm_mm_packs_new();
    xllm_mm_use_packs(pm, pk);
    if (xllm_mm_pack(packer, pk, &m, SIZE_MAX)) {
        float *y2 = malloc((size_t)(T * rows) * sizeof(float));
        xllm_mm_input(pm, x, K, T, K);
        xllm_mm_run(pm, &m, y2, rows, false);
        xllm_mm_input(mm, x, K, T, K);
        xllm_mm_run(mm, &m, y, rows, false);
        /* (up to 4 tokens read the panels rather than the direct kernels: other rounding) */
        if (T > XLLM_GEMV_MAX_T)
            for (int64_t i = 0; i < T * rows; i++)
                assert_true(fabsf(y[i] - y2[i]) <= 1e-6f * (1.0f + fabsf(y[i])));
        else
            assert_true(matmul_err(type, w, rb, wf, x, y2, NULL, rows, K, T) <=
                        tol_of(type, level));
        /* the panels replace the dense rows: those are scribbled over, every path (the
         * direct decode one included) and the row read must go through the panels */
        xllm_mm_packs_drop_dense(pk, &m);
        uint8_t *saved = malloc((size_t)rows * rb);
        memcpy(saved, w, (size_t)rows * rb);
        memset(w, 0x5a, (size_t)rows * rb);
        xllm_mm_input(pm, x, K, T, K);
        xllm_mm_run(pm, &m, y2, rows, false);
        memcpy(w, saved, (size_t)rows * rb);
        free(saved);
        if (matmul_err(type, w, rb, wf, x, y2, NULL, rows, K, T) > tol_of(type, level)) {
            fprintf(stderr, "packed %s rows %lld K %lld T %lld, dense rows gone\n",
                    xllm_dtype_name(type), (long long)rows, (long long)K, (long long)T);
            fail();
        }
        for (int64_t r = 0; r < rows; r++) {
            xllm_mm_row(pm, &m, r, row);
            for (int64_t k = 0; k < K; k++)
                assert_true(fabsf(row[k] - wf[r * K + k]) <= 1e-6f * (1.0f + fabsf(wf[r * K + k])));
        }
        free(y2);
    }
    xllm_mm_free(pm);
    xllm_mm_packs_free(pk);
    /* low memory: no panels over 9/8 of the dense size, so sub-8-bit types get their decode
     * panels alone; with the dense rows kept (mapped weights) and then gone, every path (the
     * batched one over the decode panels too) and the row read give the reference results */
    xllm_mm *lm = xllm_mm_new(tp, level, T, K);
    xllm_mm_packs *lp = xllm_mm_packs_new();
    xllm_mm_use_packs(lm, lp);
    if (xllm_mm_pack(packer, lp, &m, (size_t)rows * rb * 9 / 8)) {
        float *y2 = malloc((size_t)(T * rows) * sizeof(float));
        uint8_t *saved = malloc((size_t)rows * rb);
        memcpy(saved, w, (size_t)rows * rb);
        for (int gone = 0; gone < 2; gone++) {
            if (gone) {
                assert_true(xllm_mm_packs_replace_dense(lp, &m));
                xllm_mm_packs_drop_dense(lp, &m);
                memset(w, 0x5a, (size_t)rows * rb);
            }
            xllm_mm_input(lm, x, K, T, K);
            xllm_mm_run(lm, &m, y2, rows, false);
            if (matmul_err(type, saved, rb, wf, x, y2, NULL, rows, K, T) > tol_of(type, level)) {
                fprintf(stderr, "low-memory %s level %s rows %lld K %lld T %lld, dense gone %d\n",
                        xllm_dtype_name(type), xllm_cpu_level_name(level), (long long)rows,
                        (long long)K, (long long)T, gone);
                fail();
            }
        }
        for (int64_t r = 0; r < rows; r++) {
            xllm_mm_row(lm, &m, r, row);
            for (int64_t k = 0; k < K; k++)
                assert_true(fabsf(row[k] - wf[r * K + k]) <= 1e-6f * (1.0f + fabsf(wf[r * K + k])));
        }
        memcpy(w, saved, (size_t)rows * rb);
        free(saved);
        free(y2);
    }
    xllm_mm_free(lm);
    xllm_mm_packs_free(lp);
    xllm_mm_free(packer);
    xllm_mm_free(mm);
    free(w);
    free(row);
    free(wf);
    free(x);
    free(y);
    free(y0);
}

static void test_matmul(void **state) {
    (void)state;
    static const xllm_dtype types[] = {
        XLLM_DTYPE_F32,  XLLM_DTYPE_F16,  XLLM_DTYPE_BF16, XLLM_DTYPE_Q8_0, XLLM_DTYPE_Q4_0,
        XLLM_DTYPE_Q4_1, XLLM_DTYPE_Q5_0, XLLM_DTYPE_Q5_1, XLLM_DTYPE_Q2_K, XLLM_DTYPE_Q3_K,
        XLLM_DTYPE_Q4_K, XLLM_DTYPE_Q5_K, XLLM_DTYPE_Q6_K};
    static const int64_t rows_list[] = {1, 17, 50};
    static const int64_t T_list[] = {1, 2, 3, 4, 9, 13};
    uint64_t rs = 12345;
    xllm_threadpool *tp = xllm_threadpool_new(2);
    for (size_t li = 0; li < 3; li++) {
        if (!level_ok(k_levels[li])) continue;
        for (size_t ti = 0; ti < sizeof(types) / sizeof(types[0]); ti++) {
            const xllm_dtype t = types[ti];
            const int bs = xllm_dtype_get_traits(t)->block_size;
            const int64_t Ks[] = {bs == 256 ? 256 : 32, bs == 256 ? 768 : 96,
                                  bs == 256 ? 1280 : 1056, bs == 1 ? 37 : (bs == 256 ? 512 : 160)};
            for (size_t ki = 0; ki < 4; ki++)
                for (size_t ri = 0; ri < 3; ri++)
                    for (size_t Ti = 0; Ti < sizeof(T_list) / sizeof(T_list[0]); Ti++)
                        check_matmul(tp, k_levels[li], t, rows_list[ri], Ks[ki], T_list[Ti], &rs);
        }
    }
    xllm_threadpool_free(tp);
}

static void test_elementwise(void **state) {
    (void)state;
    uint64_t rs = 777;
    enum { N = 1000 };
    float a[N], b[N], w[N], o1[N], o2[N];
    for (int i = 0; i < N; i++) {
        a[i] = xllm_test_rand_f(&rs) * 4.0f;
        b[i] = xllm_test_rand_f(&rs);
        w[i] = 1.0f + xllm_test_rand_f(&rs) * 0.5f;
    }
    a[3] = -30.0f; /* silu far from zero */
    a[4] = 30.0f;
    for (size_t li = 0; li < 3; li++) {
        if (!level_ok(k_levels[li])) continue;
        const xllm_cpu_kernels *k = xllm_cpu_kernels_get(k_levels[li]);
        static const int ns[] = {1, 15, 16, 17, 63, 1000};
        for (size_t ni = 0; ni < sizeof(ns) / sizeof(ns[0]); ni++) {
            const int n = ns[ni];
            double ref = 0, mag = 0;
            for (int i = 0; i < n; i++) {
                ref += (double)a[i] * b[i];
                mag += fabs((double)a[i] * b[i]);
            }
            assert_true(fabs(xllm_cpu_dot_f32(k, a, b, n) - ref) <= 1e-6 * mag + 1e-30);
            xllm_op_rmsnorm(o1, a, w, n, 1e-6f);
            xllm_cpu_rmsnorm(k, o2, a, w, n, 1e-6f);
            for (int i = 0; i < n; i++)
                assert_true(fabsf(o1[i] - o2[i]) <= 1e-5f * (fabsf(o1[i]) + 1e-3f));
            xllm_op_swiglu(o1, a, b, n);
            xllm_cpu_swiglu(k, o2, a, b, n);
            for (int i = 0; i < n; i++)
                assert_true(fabsf(o1[i] - o2[i]) <= 1e-5f * (fabsf(o1[i]) + 1e-6f));
        }
    }
}

static void test_attention(void **state) {
    (void)state;
    uint64_t rs = 4242;
    static const int dims[] = {64, 128, 80, 256};
    static const int groups[] = {1, 2, 4};
    /* (8 to 16 tokens: prompt runs of up to XLLM_ATTN_MAX_Q queries, the queries-in-lanes path) */
    static const int ntoks[] = {1, 3, 5, 8, 11, 16};
    static const int npos[] = {1, 2, 63, 64, 65, 200};
    const int n_kv_heads = 2, max_pos = 216; /* the last np + the most tokens - 1 */
    for (size_t li = 1; li < 3; li++) {
        if (!level_ok(k_levels[li])) continue;
        const xllm_cpu_kernels *k = xllm_cpu_kernels_get(k_levels[li]);
        for (int kt = 0; kt < 2; kt++) {
            const xllm_dtype kvt = kt ? XLLM_DTYPE_F16 : XLLM_DTYPE_F32;
            for (size_t di = 0; di < 4; di++) {
                const int D = dims[di];
                const size_t es = kvt == XLLM_DTYPE_F32 ? 4 : 2, rb = (size_t)n_kv_heads * D * es;
                uint8_t *K = malloc(rb * max_pos), *V = malloc(rb * max_pos);
                float tmp[256 * 2];
                for (int p = 0; p < max_pos; p++) {
                    for (int i = 0; i < n_kv_heads * D; i++) tmp[i] = xllm_test_rand_f(&rs) * 2.0f;
                    xllm_quant_row_ref(kvt, tmp, K + p * rb, n_kv_heads * D);
                    for (int i = 0; i < n_kv_heads * D; i++) tmp[i] = xllm_test_rand_f(&rs);
                    xllm_quant_row_ref(kvt, tmp, V + p * rb, n_kv_heads * D);
                }
                for (size_t gi = 0; gi < 3; gi++)
                    for (size_t ti = 0; ti < 6; ti++)
                        for (size_t pi = 0; pi < 6; pi++) {
                            const int g = groups[gi], nt = ntoks[ti], np = npos[pi];
                            if (nt * g > XLLM_ATTN_MAX_Q) continue;
                            float *q = malloc(sizeof(float) * (size_t)(nt * g * D));
                            float *o1 = malloc(sizeof(float) * (size_t)(nt * g * D));
                            float *o2 = malloc(sizeof(float) * (size_t)(nt * g * D));
                            for (int i = 0; i < nt * g * D; i++) q[i] = xllm_test_rand_f(&rs);
                            xllm_attn_args a = {.q = q,
                                                .q_stride = (int64_t)g * D,
                                                .k = K,
                                                .v = V,
                                                .kv_type = kvt,
                                                .row_bytes = rb,
                                                .kv_off = D,
                                                .head_dim = D,
                                                .group = g,
                                                .n_tok = nt,
                                                .n_pos = np,
                                                .scale = 1.0f / sqrtf((float)D),
                                                .out = o1,
                                                .out_stride = (int64_t)g * D};
                            xllm_op_attention_group(&a);
                            a.out = o2;
                            xllm_cpu_attention(k, &a);
                            for (int i = 0; i < nt * g * D; i++)
                                if (fabsf(o1[i] - o2[i]) > 2e-5f * (1.0f + fabsf(o1[i]))) {
                                    fprintf(stderr, "attention D %d g %d nt %d np %d: %g vs %g\n",
                                            D, g, nt, np, o2[i], o1[i]);
                                    fail();
                                }
                            free(q);
                            free(o1);
                            free(o2);
                        }
                /* both KV heads in one call (q / out hold 2 * g heads per token) */
                for (size_t gi = 0; gi < 3; gi++)
                    for (int nt = 1; nt <= 3; nt += 2)
                        for (size_t pi = 0; pi < 6; pi++) {
                            const int g = groups[gi], np = npos[pi], nqa = 2 * nt * g;
                            float *q = malloc(sizeof(float) * (size_t)(nqa * D));
                            float *o1 = malloc(sizeof(float) * (size_t)(nqa * D));
                            float *o2 = malloc(sizeof(float) * (size_t)(nqa * D));
                            for (int i = 0; i < nqa * D; i++) q[i] = xllm_test_rand_f(&rs);
                            xllm_attn_args a = {.q = q,
                                                .q_stride = (int64_t)2 * g * D,
                                                .k = K,
                                                .v = V,
                                                .kv_type = kvt,
                                                .row_bytes = rb,
                                                .kv_off = 0,
                                                .head_dim = D,
                                                .group = g,
                                                .n_tok = nt,
                                                .n_pos = np,
                                                .scale = 1.0f / sqrtf((float)D),
                                                .out = o1,
                                                .out_stride = (int64_t)2 * g * D,
                                                .n_kv = 2};
                            xllm_op_attention_group(&a);
                            a.out = o2;
                            xllm_cpu_attention(k, &a);
                            for (int i = 0; i < nqa * D; i++)
                                if (fabsf(o1[i] - o2[i]) > 2e-5f * (1.0f + fabsf(o1[i]))) {
                                    fprintf(stderr, "attention 2 heads D %d g %d nt %d np %d\n", D,
                                            g, nt, np);
                                    fail();
                                }
                            free(q);
                            free(o1);
                            free(o2);
                        }
                free(K);
                free(V);
            }
        }
    }
}

static void test_levels(void **state) {
    (void)state;
    xllm_cpu_level l;
    assert_true(xllm_cpu_level_parse("scalar", &l) && l == XLLM_CPU_SCALAR);
    assert_true(xllm_cpu_level_parse("avx512", &l) && l == XLLM_CPU_AVX512);
    assert_false(xllm_cpu_level_parse("sse9", &l));
    /* asking for more than the CPU has gives what it has */
    assert_int_equal(xllm_cpu_kernels_get(XLLM_CPU_AVX512)->level, xllm_cpu_detect());
    assert_true(xllm_cpu_physical_cores() >= 1);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_levels),
        cmocka_unit_test(test_elementwise),
        cmocka_unit_test(test_attention),
        cmocka_unit_test(test_matmul),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
