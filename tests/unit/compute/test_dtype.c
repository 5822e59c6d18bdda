/* Unit tests of src/compute/dtype.c and quant_ref.c: type traits, fp16/bf16 conversion, quantize /
 * dequantize / dot round trips, and block layouts checked against real llama.cpp GGUF files. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"
#include "compute/dtype.h"
#include "gguf/gguf.h"

static const xllm_dtype k_all[] = {
    XLLM_DTYPE_F32,  XLLM_DTYPE_F16,  XLLM_DTYPE_BF16, XLLM_DTYPE_Q4_0, XLLM_DTYPE_Q4_1,
    XLLM_DTYPE_Q5_0, XLLM_DTYPE_Q5_1, XLLM_DTYPE_Q8_0, XLLM_DTYPE_Q8_1, XLLM_DTYPE_Q2_K,
    XLLM_DTYPE_Q3_K, XLLM_DTYPE_Q4_K, XLLM_DTYPE_Q5_K, XLLM_DTYPE_Q6_K, XLLM_DTYPE_Q8_K,
};
#define N_ALL ((int)(sizeof(k_all) / sizeof(k_all[0])))

/* Normalized round-trip error allowed for a plain round-to-nearest quantizer on uniform random
 * data (about 1.5x what each type measures). */
static double roundtrip_tol(xllm_dtype t) {
    switch (t) {
        case XLLM_DTYPE_F32:
            return 0.0;
        case XLLM_DTYPE_F16:
            return 5e-4;
        case XLLM_DTYPE_BF16:
            return 4e-3;
        case XLLM_DTYPE_Q8_0:
        case XLLM_DTYPE_Q8_1:
            return 0.009;
        case XLLM_DTYPE_Q8_K:
            return 0.018; /* one scale per 256 elements, so outliers cost more */
        case XLLM_DTYPE_Q6_K:
            return 0.03;
        case XLLM_DTYPE_Q5_0:
        case XLLM_DTYPE_Q5_1:
        case XLLM_DTYPE_Q5_K:
            return 0.06;
        case XLLM_DTYPE_Q4_0:
        case XLLM_DTYPE_Q4_1:
        case XLLM_DTYPE_Q4_K:
            return 0.12;
        case XLLM_DTYPE_Q3_K:
            return 0.25;
        case XLLM_DTYPE_Q2_K:
            return 0.5;
        default:
            return 0.0;
    }
}

/* ---- traits ------------------------------------------------------------------------------- */

static void test_traits(void **state) {
    (void)state;
    static const struct {
        xllm_dtype t;
        const char *name;
        int32_t bs;
        size_t bytes;
    } want[] = {
        {XLLM_DTYPE_F32, "f32", 1, 4},       {XLLM_DTYPE_F16, "f16", 1, 2},
        {XLLM_DTYPE_BF16, "bf16", 1, 2},     {XLLM_DTYPE_Q4_0, "q4_0", 32, 18},
        {XLLM_DTYPE_Q4_1, "q4_1", 32, 20},   {XLLM_DTYPE_Q5_0, "q5_0", 32, 22},
        {XLLM_DTYPE_Q5_1, "q5_1", 32, 24},   {XLLM_DTYPE_Q8_0, "q8_0", 32, 34},
        {XLLM_DTYPE_Q8_1, "q8_1", 32, 36},   {XLLM_DTYPE_Q2_K, "q2_K", 256, 84},
        {XLLM_DTYPE_Q3_K, "q3_K", 256, 110}, {XLLM_DTYPE_Q4_K, "q4_K", 256, 144},
        {XLLM_DTYPE_Q5_K, "q5_K", 256, 176}, {XLLM_DTYPE_Q6_K, "q6_K", 256, 210},
        {XLLM_DTYPE_Q8_K, "q8_K", 256, 292},
    };
    for (size_t i = 0; i < sizeof(want) / sizeof(want[0]); i++) {
        const xllm_dtype_traits *tr = xllm_dtype_get_traits(want[i].t);
        assert_non_null(tr);
        assert_string_equal(tr->name, want[i].name);
        assert_string_equal(xllm_dtype_name(want[i].t), want[i].name);
        assert_int_equal(tr->block_size, want[i].bs);
        assert_int_equal(tr->block_bytes, want[i].bytes);
        assert_int_equal(tr->quantized, want[i].bs > 1);
        assert_int_equal(xllm_dtype_row_bytes(want[i].t, 0), 0);
        assert_int_equal(xllm_dtype_row_bytes(want[i].t, 4096), 4096 / want[i].bs * want[i].bytes);
        if (want[i].bs > 1) {
            assert_int_equal(xllm_dtype_row_bytes(want[i].t, want[i].bs + 1), 0);
            assert_int_equal(xllm_dtype_row_bytes(want[i].t, 16), 0);
        }
        assert_int_equal(xllm_dtype_row_bytes(want[i].t, -want[i].bs), 0);
    }
    assert_int_equal(xllm_dtype_row_bytes(XLLM_DTYPE_Q4_K, 4096), 2304);
    assert_int_equal(xllm_dtype_row_bytes(XLLM_DTYPE_Q8_0, 4096), 4352);
    assert_int_equal(xllm_dtype_row_bytes(XLLM_DTYPE_F16, 7), 14);
    /* Ids GGUF knows but xllm does not support, and ids out of range. */
    static const int bad[] = {4, 5, 16, 20, 29, 31, 39, 40, 1000, -1};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        assert_null(xllm_dtype_get_traits((xllm_dtype)bad[i]));
        assert_null(xllm_dtype_name((xllm_dtype)bad[i]));
        assert_int_equal(xllm_dtype_row_bytes((xllm_dtype)bad[i], 256), 0);
    }
}

/* ---- fp16 / bf16 -------------------------------------------------------------------------- */

static float f_of(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof(f));
    return f;
}

static uint32_t u_of(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof(u));
    return u;
}

static void test_fp16(void **state) {
    (void)state;
    static const struct {
        uint32_t f; /* float32 bits */
        uint16_t h;
    } to16[] = {
        {0x00000000u, 0x0000}, /* +0 */
        {0x80000000u, 0x8000}, /* -0 */
        {0x3f800000u, 0x3c00}, /* 1 */
        {0xc0000000u, 0xc000}, /* -2 */
        {0x3dcccccdu, 0x2e66}, /* 0.1 */
        {0x3eaaaaabu, 0x3555}, /* 1/3 */
        {0x477fe000u, 0x7bff}, /* 65504, the largest half */
        {0x477fefffu, 0x7bff}, /* just below the rounding boundary */
        {0x477ff000u, 0x7c00}, /* 65520 rounds (to even) to inf */
        {0x7f7fffffu, 0x7c00}, /* FLT_MAX */
        {0x7f800000u, 0x7c00}, /* inf */
        {0xff800000u, 0xfc00}, /* -inf */
        {0x38800000u, 0x0400}, /* 2^-14, smallest normal */
        {0x387fc000u, 0x03ff}, /* largest subnormal */
        {0x387fe000u, 0x0400}, /* halfway between largest subnormal and smallest normal */
        {0x33800000u, 0x0001}, /* 2^-24, smallest subnormal */
        {0x33000000u, 0x0000}, /* 2^-25: tie, rounds to even 0 */
        {0x33000001u, 0x0001}, /* just above 2^-25 */
        {0x33c00000u, 0x0002}, /* 1.5 * 2^-24: tie, rounds to even 2 */
        {0x34200000u, 0x0002}, /* 2.5 * 2^-24: tie, rounds to even 2 */
        {0x00000001u, 0x0000}, /* float subnormal */
        {0x3f801000u, 0x3c00}, /* 1 + 2^-11: tie, even */
        {0x3f803000u, 0x3c02}, /* 1 + 3*2^-11: tie, even */
        {0x3f801001u, 0x3c01}, /* just above the tie */
        {0xb3800000u, 0x8001}, /* -2^-24 */
    };
    for (size_t i = 0; i < sizeof(to16) / sizeof(to16[0]); i++) {
        uint16_t h = xllm_fp32_to_fp16(f_of(to16[i].f));
        if (h != to16[i].h) fail_msg("fp32 %08x -> %04x, want %04x", to16[i].f, h, to16[i].h);
    }
    /* NaN stays NaN, sign kept. */
    uint16_t hn = xllm_fp32_to_fp16(f_of(0x7fc00000u));
    assert_true((hn & 0x7c00) == 0x7c00 && (hn & 0x3ff) != 0);
    hn = xllm_fp32_to_fp16(f_of(0xff800001u)); /* signalling NaN with only a low payload bit */
    assert_true((hn & 0xfc00) == 0xfc00 && (hn & 0x3ff) != 0);

    assert_true(xllm_fp16_to_fp32(0x3c00) == 1.0f);
    assert_true(xllm_fp16_to_fp32(0x3555) == 0.333251953125f);
    assert_true(xllm_fp16_to_fp32(0x7bff) == 65504.0f);
    assert_true(xllm_fp16_to_fp32(0x0001) == ldexpf(1.0f, -24));
    assert_true(xllm_fp16_to_fp32(0x03ff) == ldexpf(1023.0f, -24));
    assert_true(xllm_fp16_to_fp32(0x8001) == -ldexpf(1.0f, -24));
    assert_int_equal(u_of(xllm_fp16_to_fp32(0x8000)), 0x80000000u);
    assert_true(isinf(xllm_fp16_to_fp32(0x7c00)) && xllm_fp16_to_fp32(0x7c00) > 0);
    assert_true(isinf(xllm_fp16_to_fp32(0xfc00)) && xllm_fp16_to_fp32(0xfc00) < 0);
    assert_true(isnan(xllm_fp16_to_fp32(0x7e00)));
    assert_true(isnan(xllm_fp16_to_fp32(0x7c01)));

    /* Every half value survives a round trip through float; every value is exactly the float
     * its bits describe. */
    for (uint32_t h = 0; h < 65536; h++) {
        float f = xllm_fp16_to_fp32((uint16_t)h);
        uint32_t e = (h >> 10) & 0x1f, m = h & 0x3ff;
        if (e == 0x1f && m != 0) {
            assert_true(isnan(f));
            uint16_t back = xllm_fp32_to_fp16(f);
            assert_true((back & 0x7c00) == 0x7c00 && (back & 0x3ff) != 0);
            continue;
        }
        double want = e == 0 ? ldexp((double)m, -24) : ldexp(1024.0 + m, (int)e - 25);
        if (e == 0x1f) want = INFINITY;
        if (h & 0x8000) want = -want;
        if ((double)f != want) fail_msg("half %04x -> %g, want %g", h, (double)f, want);
        uint16_t back = xllm_fp32_to_fp16(f);
        if (back != h) fail_msg("half %04x round trip gave %04x", h, back);
    }
    /* Random floats: the chosen half is the nearest one (compare with its neighbours). */
    uint64_t rng = 12345;
    for (int i = 0; i < 200000; i++) {
        float f = xllm_test_rand_f(&rng) * ldexpf(1.0f, (int)(xllm_test_rand_u64(&rng) % 44) - 28);
        uint16_t h = xllm_fp32_to_fp16(f);
        double v = xllm_fp16_to_fp32(h);
        if (isinf(v)) {
            assert_true(fabs((double)f) >= 65520.0);
            continue;
        }
        double err = fabs(v - (double)f);
        uint16_t mag = h & 0x7fff;
        if (mag < 0x7bff) assert_true(err <= fabs(xllm_fp16_to_fp32(h + 1) - (double)f));
        if (mag > 0) assert_true(err <= fabs(xllm_fp16_to_fp32(h - 1) - (double)f));
    }
}

static void test_bf16(void **state) {
    (void)state;
    static const struct {
        uint32_t f;
        uint16_t h;
    } tob[] = {
        {0x00000000u, 0x0000}, {0x80000000u, 0x8000}, {0x3f800000u, 0x3f80}, /* 1 */
        {0x3f808000u, 0x3f80},                                               /* tie, even */
        {0x3f818000u, 0x3f82},                                               /* tie, even */
        {0x3f808001u, 0x3f81},                                               /* above tie */
        {0x3dcccccdu, 0x3dcd},                                               /* 0.1 */
        {0x7f7fffffu, 0x7f80}, /* FLT_MAX rounds to inf */
        {0x7f800000u, 0x7f80}, {0xff800000u, 0xff80}, {0x00000001u, 0x0000},
        {0x00008000u, 0x0000}, /* tie to even */
        {0x00018000u, 0x0002}, /* tie to even */
        {0x00400000u, 0x0040}, /* float subnormal kept */
    };
    for (size_t i = 0; i < sizeof(tob) / sizeof(tob[0]); i++) {
        uint16_t h = xllm_fp32_to_bf16(f_of(tob[i].f));
        if (h != tob[i].h) fail_msg("fp32 %08x -> bf16 %04x, want %04x", tob[i].f, h, tob[i].h);
    }
    uint16_t hn = xllm_fp32_to_bf16(f_of(0x7f800001u)); /* NaN whose payload is in low bits */
    assert_true((hn & 0x7f80) == 0x7f80 && (hn & 0x7f) != 0);
    hn = xllm_fp32_to_bf16(f_of(0xffffffffu));
    assert_true((hn & 0xff80) == 0xff80 && (hn & 0x7f) != 0);
    assert_true(xllm_bf16_to_fp32(0x3f80) == 1.0f);
    assert_true(xllm_bf16_to_fp32(0xc040) == -3.0f);
    for (uint32_t h = 0; h < 65536; h++) {
        float f = xllm_bf16_to_fp32((uint16_t)h);
        assert_int_equal(u_of(f), h << 16);
        uint16_t back = xllm_fp32_to_bf16(f);
        if (isnan(f))
            assert_true(isnan(xllm_bf16_to_fp32(back)));
        else if (back != h)
            fail_msg("bf16 %04x round trip gave %04x", h, back);
    }
}

/* ---- quantize / dequantize / dot on random data ------------------------------------------- */

/* Uniform random values in +-scale, never exactly zero. */
static void fill_random(float *x, int64_t n, uint64_t *rng, float scale) {
    for (int64_t i = 0; i < n; i++) {
        float v = xllm_test_rand_f(rng);
        if (v == 0.0f) v = 0.5f;
        x[i] = v * scale;
    }
}

static void test_quant_roundtrip(void **state) {
    (void)state;
    enum { N = 4096 };
    float *x = malloc(N * sizeof(float));
    float *y = malloc(N * sizeof(float));
    float *y2 = malloc(N * sizeof(float));
    uint8_t *q = malloc(N * 4);
    uint8_t *q2 = malloc(N * 4);
    uint64_t rng = 777;
    static const float scales[] = {1.0f, 0.02f, 30.0f};
    for (int s = 0; s < 3; s++) {
        for (int ti = 0; ti < N_ALL; ti++) {
            xllm_dtype t = k_all[ti];
            size_t rb = xllm_dtype_row_bytes(t, N);
            assert_true(rb > 0 && rb <= N * 4);
            fill_random(x, N, &rng, scales[s]);
            /* Sprinkle outliers into some blocks, as real weights have. */
            for (int i = 0; i < N; i += 97) x[i] *= 4.0f;
            memset(q, 0xa5, N * 4);
            xllm_quant_row_ref(t, x, q, N);
            for (size_t i = rb; i < (size_t)N * 4; i++)
                assert_int_equal(q[i], 0xa5); /* no overrun */
            xllm_dequant_row_ref(t, q, y, N);
            double err = xllm_test_norm_err(y, x, N);
            print_message("  %-5s scale %-5g roundtrip err %.5f\n", xllm_dtype_name(t),
                          (double)scales[s], err);
            if (err > roundtrip_tol(t))
                fail_msg("%s: roundtrip error %g > %g", xllm_dtype_name(t), err, roundtrip_tol(t));
            /* Deterministic, and re-quantizing the dequantized values stays close to them. */
            xllm_quant_row_ref(t, x, q2, N);
            assert_memory_equal(q, q2, rb);
            xllm_quant_row_ref(t, y, q2, N);
            xllm_dequant_row_ref(t, q2, y2, N);
            assert_true(xllm_test_norm_err(y2, y, N) <= roundtrip_tol(t));
        }
    }
    free(x);
    free(y);
    free(y2);
    free(q);
    free(q2);
}

/* Each quant level of the 32-element types is reachable and dequantizes to d*q (+m): checks the
 * nibble / high-bit packing position by position. */
static void test_quant_positions(void **state) {
    (void)state;
    static const xllm_dtype types[] = {XLLM_DTYPE_Q4_0, XLLM_DTYPE_Q5_0, XLLM_DTYPE_Q8_0,
                                       XLLM_DTYPE_Q2_K, XLLM_DTYPE_Q3_K, XLLM_DTYPE_Q4_K,
                                       XLLM_DTYPE_Q5_K, XLLM_DTYPE_Q6_K, XLLM_DTYPE_Q8_K};
    float x[256], y[256];
    uint8_t q[512];
    for (size_t ti = 0; ti < sizeof(types) / sizeof(types[0]); ti++) {
        xllm_dtype t = types[ti];
        /* A one-hot row: every element small except one; the big one must come back at its own
         * position and nowhere else, for every position. */
        for (int pos = 0; pos < 256; pos++) {
            for (int i = 0; i < 256; i++) x[i] = (i % 2 ? 1e-3f : -1e-3f);
            x[pos] = 1.0f;
            xllm_quant_row_ref(t, x, q, 256);
            xllm_dequant_row_ref(t, q, y, 256);
            if (fabsf(y[pos] - 1.0f) > 0.02f)
                fail_msg("%s: element %d came back as %g", xllm_dtype_name(t), pos, (double)y[pos]);
            for (int i = 0; i < 256; i++)
                if (i != pos && fabsf(y[i]) > 0.05f)
                    fail_msg("%s: one-hot at %d leaked %g into %d", xllm_dtype_name(t), pos,
                             (double)y[i], i);
        }
    }
}

static void test_vec_dot(void **state) {
    (void)state;
    enum { N = 2048 };
    float *w = malloc(N * sizeof(float));
    float *x = malloc(N * sizeof(float));
    float *deq = malloc(N * sizeof(float));
    uint8_t *q = malloc(N * 4);
    uint64_t rng = 4242;
    for (int ti = 0; ti < N_ALL; ti++) {
        xllm_dtype t = k_all[ti];
        const xllm_dtype_traits *tr = xllm_dtype_get_traits(t);
        /* Full rows, and (for per-element types) a length that is not a multiple of 256. */
        int64_t lens[2] = {N, tr->block_size == 1 ? 300 : 3 * tr->block_size};
        for (int li = 0; li < 2; li++) {
            int64_t n = lens[li];
            fill_random(w, n, &rng, 1.0f);
            fill_random(x, n, &rng, 2.0f);
            xllm_quant_row_ref(t, w, q, n);
            xllm_dequant_row_ref(t, q, deq, n);
            double ref = 0, mag = 0;
            for (int64_t i = 0; i < n; i++) {
                ref += (double)deq[i] * x[i];
                mag += fabs((double)deq[i] * x[i]);
            }
            double got = xllm_vec_dot_ref(t, q, x, n);
            if (fabs(got - ref) > 1e-6 * mag + 1e-30)
                fail_msg("%s n=%lld: dot %g, want %g", tr->name, (long long)n, got, ref);
            /* And against the unquantized weights, within the quantization error. */
            double exact = 0;
            for (int64_t i = 0; i < n; i++) exact += (double)w[i] * x[i];
            assert_true(fabs(got - exact) <= 4.0 * roundtrip_tol(t) * mag + 1e-6 * mag);
        }
    }
    free(w);
    free(x);
    free(deq);
    free(q);
}

/* ---- real GGUF files ---------------------------------------------------------------------- */

static xllm_gguf *gg_open(const char *name) {
    char rel[256], err[256];
    snprintf(rel, sizeof(rel), "models/tiny/%s", name);
    xllm_gguf *g = NULL;
    xllm_status st = xllm_gguf_open(xllm_test_shared(rel), &g, err, sizeof(err));
    if (st != XLLM_OK) fail_msg("cannot open %s: %s", rel, err);
    return g;
}

static int64_t gg_nelem(const xllm_gguf_tensor *t) {
    return t->ne[0] * t->ne[1] * t->ne[2] * t->ne[3];
}

/* The f32 weights of a tensor as an aligned copy. */
static float *gg_f32_copy(const xllm_gguf_tensor *t) {
    assert_int_equal(t->type, XLLM_DTYPE_F32);
    float *w = malloc(t->n_bytes);
    assert_non_null(w);
    memcpy(w, t->data, t->n_bytes);
    return w;
}

/* Largest normalized error a correct dequantizer shows on these files (the files measure about
 * two thirds of this; a wrong layout gives about 1 or more). */
static double real_tol(xllm_dtype t) {
    switch (t) {
        case XLLM_DTYPE_F16:
            return 4e-4;
        case XLLM_DTYPE_BF16:
            return 3e-3;
        case XLLM_DTYPE_Q8_0:
            return 0.01;
        case XLLM_DTYPE_Q6_K:
            return 0.03;
        case XLLM_DTYPE_Q5_0:
        case XLLM_DTYPE_Q5_1:
        case XLLM_DTYPE_Q5_K:
            return 0.06;
        case XLLM_DTYPE_Q4_0:
        case XLLM_DTYPE_Q4_1:
        case XLLM_DTYPE_Q4_K:
            return 0.12;
        case XLLM_DTYPE_Q3_K:
            return 0.25;
        case XLLM_DTYPE_Q2_K:
            return 0.45;
        default:
            return 0.0;
    }
}

static void test_real_gguf(void **state) {
    (void)state;
    static const char *files[] = {
        "qwen3-tiny-f16.gguf",    "qwen3-tiny-bf16.gguf",   "qwen3-tiny-q8_0.gguf",
        "qwen3-tiny-q4_0.gguf",   "qwen3-tiny-q4_1.gguf",   "qwen3-tiny-q5_0.gguf",
        "qwen3-tiny-q5_1.gguf",   "qwen3-tiny-q2_k.gguf",   "qwen3-tiny-q3_k_m.gguf",
        "qwen3-tiny-q4_k_m.gguf", "qwen3-tiny-q5_k_m.gguf", "qwen3-tiny-q6_k.gguf",
    };
    static const xllm_dtype must_see[] = {
        XLLM_DTYPE_F16,  XLLM_DTYPE_BF16, XLLM_DTYPE_Q8_0, XLLM_DTYPE_Q4_0,
        XLLM_DTYPE_Q4_1, XLLM_DTYPE_Q5_0, XLLM_DTYPE_Q5_1, XLLM_DTYPE_Q2_K,
        XLLM_DTYPE_Q3_K, XLLM_DTYPE_Q4_K, XLLM_DTYPE_Q5_K, XLLM_DTYPE_Q6_K,
    };
    double worst[XLLM_DTYPE_COUNT] = {0};
    int seen[XLLM_DTYPE_COUNT] = {0};

    xllm_gguf *ref = gg_open("qwen3-tiny-f32.gguf");
    for (size_t fi = 0; fi < sizeof(files) / sizeof(files[0]); fi++) {
        xllm_gguf *g = gg_open(files[fi]);
        assert_int_equal(g->n_tensors, ref->n_tensors);
        for (uint64_t i = 0; i < g->n_tensors; i++) {
            const xllm_gguf_tensor *t = &g->tensors[i];
            if (t->type == XLLM_DTYPE_F32) continue;
            const xllm_gguf_tensor *rt = xllm_gguf_find_tensor(ref, t->name);
            assert_non_null(rt);
            for (int d = 0; d < 4; d++) assert_int_equal(rt->ne[d], t->ne[d]);
            int64_t n = gg_nelem(t), cols = t->ne[0];
            size_t qbytes = t->n_bytes;
            const uint8_t *qd = t->data;
            float *want = gg_f32_copy(rt);
            float *got = malloc((size_t)n * sizeof(float));
            size_t row = xllm_dtype_row_bytes(t->type, cols);
            for (int64_t r = 0; r < n / cols; r++)
                xllm_dequant_row_ref(t->type, qd + (size_t)r * row, got + r * cols, cols);
            double err = xllm_test_norm_err(got, want, n);
            /* Our plain quantizer on the same data: llama.cpp's is at least about as good. */
            uint8_t *mine = malloc(qbytes);
            float *mine_deq = malloc((size_t)n * sizeof(float));
            xllm_quant_row_ref(t->type, want, mine, n);
            xllm_dequant_row_ref(t->type, mine, mine_deq, n);
            double err_mine = xllm_test_norm_err(mine_deq, want, n);
            /* The dot product over a row agrees with the dequantized row. */
            double dot_ref = 0, mag = 0;
            for (int64_t j = 0; j < cols; j++) {
                dot_ref += (double)got[j] * want[j];
                mag += fabs((double)got[j] * want[j]);
            }
            double dot = xllm_vec_dot_ref(t->type, qd, want, cols);
            assert_true(fabs(dot - dot_ref) <= 1e-6 * mag);

            xllm_dtype ty = t->type;
            if (err > worst[ty]) worst[ty] = err;
            seen[ty]++;
            if (err > real_tol(ty) || err > 1.3 * err_mine + 1e-4)
                fail_msg("%s %s (%s): error vs f32 %g (tolerance %g, our quantizer %g)", files[fi],
                         t->name, xllm_dtype_name(ty), err, real_tol(ty), err_mine);
            free(want);
            free(got);
            free(mine);
            free(mine_deq);
        }
        xllm_gguf_free(g);
    }
    xllm_gguf_free(ref);
    for (size_t i = 0; i < sizeof(must_see) / sizeof(must_see[0]); i++) {
        xllm_dtype t = must_see[i];
        print_message("  %-5s %3d tensors, worst error vs f32 %.5f\n", xllm_dtype_name(t), seen[t],
                      worst[t]);
        assert_true(seen[t] > 0);
    }
}

/* For the types whose llama.cpp quantizer is plain round-to-nearest (and f16/bf16), our quantizer
 * reproduces the file's bytes from the f32 weights. */
static void test_real_bytes(void **state) {
    (void)state;
    static const struct {
        const char *file;
        xllm_dtype t;
    } cases[] = {
        {"qwen3-tiny-f16.gguf", XLLM_DTYPE_F16},   {"qwen3-tiny-bf16.gguf", XLLM_DTYPE_BF16},
        {"qwen3-tiny-q8_0.gguf", XLLM_DTYPE_Q8_0}, {"qwen3-tiny-q4_0.gguf", XLLM_DTYPE_Q4_0},
        {"qwen3-tiny-q4_1.gguf", XLLM_DTYPE_Q4_1}, {"qwen3-tiny-q5_0.gguf", XLLM_DTYPE_Q5_0},
        {"qwen3-tiny-q5_1.gguf", XLLM_DTYPE_Q5_1},
    };
    xllm_gguf *ref = gg_open("qwen3-tiny-f32.gguf");
    for (size_t ci = 0; ci < sizeof(cases) / sizeof(cases[0]); ci++) {
        xllm_gguf *g = gg_open(cases[ci].file);
        const xllm_dtype_traits *tr = xllm_dtype_get_traits(cases[ci].t);
        int64_t blocks = 0, diff_blocks = 0;
        int n_tensors = 0;
        for (uint64_t i = 0; i < g->n_tensors; i++) {
            const xllm_gguf_tensor *t = &g->tensors[i];
            if (t->type != cases[ci].t) continue;
            const xllm_gguf_tensor *rt = xllm_gguf_find_tensor(ref, t->name);
            assert_non_null(rt);
            size_t qbytes = t->n_bytes;
            const uint8_t *qd = t->data;
            int64_t n = gg_nelem(t);
            float *w = gg_f32_copy(rt);
            uint8_t *mine = malloc(qbytes);
            xllm_quant_row_ref(cases[ci].t, w, mine, n);
            int64_t nb = (int64_t)(qbytes / tr->block_bytes);
            for (int64_t b = 0; b < nb; b++)
                if (memcmp(mine + b * tr->block_bytes, qd + b * tr->block_bytes, tr->block_bytes))
                    diff_blocks++;
            blocks += nb;
            n_tensors++;
            free(w);
            free(mine);
        }
        print_message("  %-5s %d tensors, %lld of %lld blocks differ from llama.cpp's bytes\n",
                      tr->name, n_tensors, (long long)diff_blocks, (long long)blocks);
        assert_true(n_tensors > 0);
        /* llama.cpp may be built with fused multiply-add, which moves an exact .5 tie now and then;
         * allow a handful of blocks in a million. */
        assert_true(diff_blocks * 100000 <= blocks);
        xllm_gguf_free(g);
    }
    xllm_gguf_free(ref);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_traits),
        cmocka_unit_test(test_fp16),
        cmocka_unit_test(test_bf16),
        cmocka_unit_test(test_quant_roundtrip),
        cmocka_unit_test(test_quant_positions),
        cmocka_unit_test(test_vec_dot),
        cmocka_unit_test(test_real_gguf),
        cmocka_unit_test(test_real_bytes),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
