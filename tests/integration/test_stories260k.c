/* stories260K against its float64 reference: greedy ids through the API and teacher-forced
 * logits within 1e-4 normalized error per row (KV cache in f32). */
#include <jansson.h>
#include <string.h>

#include "testutil.h"
#include "xllm/xllm.h"

typedef struct fixture {
    xllm_model *model;
    json_t *ref;
} fixture;

static int setup(void **state) {
    fixture *f = calloc(1, sizeof(*f));
    char err[512];
    if (xllm_model_load(xllm_test_shared("models/stories260K/stories260K.gguf"), NULL, &f->model,
                        err, sizeof(err)) != XLLM_OK) {
        fprintf(stderr, "%s\n", err);
        return -1;
    }
    json_error_t jerr;
    f->ref = json_load_file(xllm_test_shared("models/stories260K/reference_greedy.json"), 0, &jerr);
    if (!f->ref) return -1;
    *state = f;
    return 0;
}

static int teardown(void **state) {
    fixture *f = *state;
    if (!f) return 0;
    xllm_model_free(f->model);
    json_decref(f->ref);
    free(f);
    return 0;
}

static xllm_context *new_ctx(const xllm_model *m, xllm_dtype kv_type, xllm_kv_layout layout) {
    xllm_context_params cp = xllm_context_default_params();
    cp.kv_layout = layout;
    cp.kv_type = kv_type;
    cp.n_ctx = 512;
    cp.n_threads = 2;
    xllm_context *ctx = NULL;
    char err[256];
    assert_int_equal(xllm_context_new(m, &cp, &ctx, err, sizeof(err)), XLLM_OK);
    return ctx;
}

/* Teacher-forced logits of the first positions, all in one batch. */
static void check_logits(fixture *f, xllm_kv_layout layout) {
    json_t *toks = json_object_get(f->ref, "logits_input_tokens");
    json_t *rows = json_object_get(f->ref, "logits");
    const int32_t n = (int32_t)json_array_size(toks);
    assert_true(n > 0);
    const int32_t V = xllm_model_n_vocab(f->model);
    assert_int_equal(V, 512);
    xllm_context *ctx = new_ctx(f->model, XLLM_DTYPE_F32, layout);
    int32_t tok[64], pos[64], seq[64];
    int8_t want[64];
    for (int32_t i = 0; i < n; i++) {
        tok[i] = (int32_t)json_integer_value(json_array_get(toks, i));
        pos[i] = i;
        seq[i] = 0;
        want[i] = 1;
    }
    xllm_batch b = {n, tok, pos, seq, want};
    assert_int_equal(xllm_decode(ctx, &b), XLLM_OK);
    float *ref = malloc(sizeof(float) * V);
    for (int32_t i = 0; i < n; i++) {
        json_t *row = json_array_get(rows, i);
        assert_int_equal(json_array_size(row), V);
        for (int32_t j = 0; j < V; j++) ref[j] = (float)json_number_value(json_array_get(row, j));
        const float *got = xllm_get_logits(ctx, i);
        assert_non_null(got);
        double e = xllm_test_norm_err(got, ref, V);
        if (e > 1e-4) fprintf(stderr, "row %d: normalized error %g\n", i, e);
        assert_true(e <= 1e-4);
    }
    free(ref);
    xllm_context_free(ctx);
}

/* 256 greedy steps from BOS, one token per decode, give the reference ids. */
static void check_greedy(fixture *f, xllm_kv_layout layout) {
    json_t *ids = json_object_get(f->ref, "generated_ids");
    const int32_t n = (int32_t)json_array_size(ids);
    assert_int_equal(n, 256);
    xllm_context *ctx = new_ctx(f->model, XLLM_DTYPE_F32, layout);
    xllm_sampler_params sp = xllm_sampler_default_params();
    sp.temperature = 0;
    xllm_sampler *smp = xllm_sampler_new(&sp, xllm_model_n_vocab(f->model));
    int32_t tok = xllm_token_bos(xllm_model_tokenizer(f->model));
    assert_int_equal(tok, 1);
    for (int32_t i = 0; i < n; i++) {
        int32_t pos = i, seq = 0;
        xllm_batch b = {1, &tok, &pos, &seq, NULL};
        assert_int_equal(xllm_decode(ctx, &b), XLLM_OK);
        tok = xllm_sampler_sample(smp, xllm_get_logits(ctx, 0));
        xllm_sampler_accept(smp, tok);
        assert_int_equal(tok, (int32_t)json_integer_value(json_array_get(ids, i)));
    }
    xllm_sampler_free(smp);
    xllm_context_free(ctx);
}

static void test_logits(void **state) {
    check_logits(*state, XLLM_KV_LAYOUT_XTENSOR);
    check_logits(*state, XLLM_KV_LAYOUT_PAGED);
}

static void test_greedy(void **state) {
    check_greedy(*state, XLLM_KV_LAYOUT_XTENSOR);
    check_greedy(*state, XLLM_KV_LAYOUT_PAGED);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_logits),
        cmocka_unit_test(test_greedy),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
