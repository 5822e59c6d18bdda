/* The loader's weight layouts (xllm_model_layout): the layout asked for when memory suffices;
 * lowered to low memory, then to the dense rows, when the memory available (here
 * XLLM_MEM_AVAILABLE) would not hold the panels with an eighth to spare; a lowered layout
 * computes what that layout computes when asked for, and the dense one what the panels do, within
 * the quantized paths' error. */
#include <stdlib.h>
#include <string.h>

#include "testutil.h"
#include "xllm/xllm.h"

#define NTOK 12

/* Loads the model (mmap, so that no dense rows are released: the panels are all the process
 * adds), checks it, and returns its layout and the logits of a fixed prompt (NTOK rows). */
static float *load_run(const char *path, bool low_memory, xllm_model_layout_info *li,
                       int32_t *n_vocab) {
    xllm_model_params mp = xllm_model_default_params();
    mp.low_memory = low_memory;
    xllm_model *m = NULL;
    char err[512];
    assert_int_equal(xllm_model_load(path, &mp, &m, err, sizeof(err)), XLLM_OK);
    xllm_model_layout(m, li);
    xllm_context_params cp = xllm_context_default_params();
    cp.n_ctx = 64;
    cp.n_threads = 1;
    xllm_context *ctx = NULL;
    assert_int_equal(xllm_context_new(m, &cp, &ctx, err, sizeof(err)), XLLM_OK);
    const int32_t V = xllm_model_n_vocab(m);
    int32_t ids[NTOK], pos[NTOK], seq[NTOK] = {0};
    int8_t out[NTOK];
    for (int i = 0; i < NTOK; i++) {
        ids[i] = (int32_t)((i * 37 + 11) % V);
        pos[i] = i;
        out[i] = 1;
    }
    xllm_batch b = {NTOK, ids, pos, seq, out};
    assert_int_equal(xllm_decode(ctx, &b), XLLM_OK);
    float *logits = malloc((size_t)NTOK * (size_t)V * sizeof(float));
    assert_non_null(logits);
    for (int i = 0; i < NTOK; i++)
        memcpy(logits + (size_t)i * (size_t)V, xllm_get_logits(ctx, i), (size_t)V * sizeof(float));
    xllm_context_free(ctx);
    xllm_model_free(m);
    *n_vocab = V;
    return logits;
}

static void test_lowered_layouts(void **state) {
    (void)state;
    const char *path = xllm_test_shared("models/tiny/qwen3-tiny-q4_k_m.gguf");
    unsetenv("XLLM_MEM_AVAILABLE");
    xllm_model_layout_info full, low, li;
    int32_t V;
    float *l_full = load_run(path, false, &full, &V);
    float *l_low = load_run(path, true, &low, &V);
    /* memory to spare: the layouts asked for */
    assert_int_equal(full.layout, XLLM_LAYOUT_PANELS);
    assert_int_equal(full.asked, XLLM_LAYOUT_PANELS);
    assert_true(full.panel_bytes > 0);
    assert_int_equal(full.panel_bytes, full.wanted_bytes);
    assert_int_equal(low.layout, XLLM_LAYOUT_LOW_MEMORY);
    assert_int_equal(low.asked, XLLM_LAYOUT_LOW_MEMORY);
    /* a Q4_K mix: 8-bit and decode panels against decode panels alone */
    assert_true(low.panel_bytes > 0 && low.panel_bytes * 2 < full.panel_bytes);

    /* room for the decode panels, not for the 8-bit ones: low memory, the same logits */
    char cap[32];
    const uint64_t c = low.panel_bytes * 8 / 7 + 64;
    assert_true(full.panel_bytes > c - c / 8);
    snprintf(cap, sizeof(cap), "%llu", (unsigned long long)c);
    setenv("XLLM_MEM_AVAILABLE", cap, 1);
    float *l = load_run(path, false, &li, &V);
    assert_int_equal(li.asked, XLLM_LAYOUT_PANELS);
    assert_int_equal(li.layout, XLLM_LAYOUT_LOW_MEMORY);
    assert_int_equal(li.wanted_bytes, full.panel_bytes);
    assert_int_equal(li.panel_bytes, low.panel_bytes);
    assert_int_equal(li.available_bytes, c);
    assert_memory_equal(l, l_low, (size_t)NTOK * (size_t)V * sizeof(float));
    free(l);

    /* no room for either (low memory asked too; the decode panels alone would leave less than
     * an eighth free): the dense rows, within the error of the quantized paths from the panels'
     * logits */
    for (int lm = 0; lm < 4; lm++) {
        snprintf(cap, sizeof(cap), "%llu",
                 lm < 2 ? 1ull : (unsigned long long)low.panel_bytes + 64);
        setenv("XLLM_MEM_AVAILABLE", cap, 1);
        l = load_run(path, lm & 1, &li, &V);
        assert_int_equal(li.asked, lm & 1 ? XLLM_LAYOUT_LOW_MEMORY : XLLM_LAYOUT_PANELS);
        assert_int_equal(li.layout, XLLM_LAYOUT_DENSE);
        assert_int_equal(li.panel_bytes, 0);
        int agree = 0;
        for (int i = 0; i < NTOK; i++) {
            const float *a = l + (size_t)i * (size_t)V, *b = l_full + (size_t)i * (size_t)V;
            assert_true(xllm_test_norm_err(a, b, V) < 0.05);
            agree += xllm_test_argmax(a, V) == xllm_test_argmax(b, V);
        }
        assert_true(agree * 10 >= NTOK * 8);
        free(l);
    }
    unsetenv("XLLM_MEM_AVAILABLE");
    free(l_full);
    free(l_low);
}

/* XLLM_PREPACK=0 asks for the dense rows: not a lowering. */
static void test_prepack_off(void **state) {
    (void)state;
    setenv("XLLM_PREPACK", "0", 1);
    xllm_model_layout_info li;
    int32_t V;
    float *l = load_run(xllm_test_shared("models/tiny/qwen3-tiny-q4_k_m.gguf"), false, &li, &V);
    unsetenv("XLLM_PREPACK");
    assert_int_equal(li.layout, XLLM_LAYOUT_DENSE);
    assert_int_equal(li.asked, XLLM_LAYOUT_DENSE);
    assert_int_equal(li.panel_bytes, 0);
    free(l);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_lowered_layouts),
        cmocka_unit_test(test_prepack_off),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
