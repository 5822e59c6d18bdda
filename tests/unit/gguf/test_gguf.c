/* Unit tests of the GGUF reader on the shared test models. */
#include <string.h>

#include "gguf/gguf.h"
#include "testutil.h"

static void test_stories260k(void **state) {
    (void)state;
    char err[512];
    xllm_gguf *g = NULL;
    assert_int_equal(xllm_gguf_open(xllm_test_shared("models/stories260K/stories260K.gguf"), &g,
                                    err, sizeof(err)),
                     XLLM_OK);
    assert_int_equal(g->version, 3);
    assert_int_equal(g->n_kv, 19);
    assert_int_equal(g->n_tensors, 48);
    assert_int_equal(g->alignment, 32);
    assert_int_equal(g->data_offset, 14176);
    assert_string_equal(xllm_gguf_get_str(g, "general.architecture"), "llama");
    uint32_t v;
    assert_true(xllm_gguf_get_u32(g, "llama.embedding_length", &v));
    assert_int_equal(v, 64);
    assert_true(xllm_gguf_get_u32(g, "llama.feed_forward_length", &v));
    assert_int_equal(v, 172);
    float eps;
    assert_true(xllm_gguf_get_f32(g, "llama.attention.layer_norm_rms_epsilon", &eps));
    assert_true(eps > 0.9e-5f && eps < 1.1e-5f);
    const xllm_gguf_kv *toks = xllm_gguf_get_arr(g, "tokenizer.ggml.tokens", XLLM_GGUF_STRING);
    assert_non_null(toks);
    assert_int_equal(toks->arr_n, 512);
    assert_int_equal(toks->arr_strs[1].len, 3);
    assert_memory_equal(toks->arr_strs[1].ptr, "<s>", 3);
    const xllm_gguf_tensor *t = xllm_gguf_find_tensor(g, "token_embd.weight");
    assert_non_null(t);
    assert_int_equal(t->type, XLLM_DTYPE_F32);
    assert_int_equal(t->ne[0], 64);
    assert_int_equal(t->ne[1], 512);
    assert_int_equal(t->n_bytes, 64 * 512 * 4);
    char buf[256];
    const xllm_gguf_kv *kv = xllm_gguf_find(g, "tokenizer.ggml.tokens");
    int n = xllm_gguf_kv_to_string(kv, buf, sizeof(buf));
    assert_true(n > 0);
    assert_non_null(strstr(buf, "[512 string: '<unk>', '<s>'"));
    assert_null(xllm_gguf_find(g, "no.such.key"));
    xllm_gguf_free(g);
}

/* Every prefix of a valid header must be rejected with an error, never a crash. */
static void test_truncated_prefixes(void **state) {
    (void)state;
    size_t size;
    unsigned char *data =
        xllm_test_read_file(xllm_test_shared("models/stories260K/stories260K.gguf"), &size);
    assert_non_null(data);
    char err[512];
    for (size_t n = 0; n < 14176 + 64; n += (n < 512 ? 1 : 97)) {
        xllm_gguf *g = NULL;
        xllm_status st = xllm_gguf_parse(data, n, &g, err, sizeof(err));
        assert_int_equal(st, XLLM_ERR_FORMAT);
        assert_null(g);
        assert_non_null(strstr(err, "gguf:"));
    }
    free(data);
}

static void test_missing_file(void **state) {
    (void)state;
    char err[512];
    xllm_gguf *g = NULL;
    assert_int_equal(xllm_gguf_open("/nonexistent/model.gguf", &g, err, sizeof(err)), XLLM_ERR_IO);
    assert_null(g);
    assert_non_null(strstr(err, "No such file"));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_stories260k),
        cmocka_unit_test(test_truncated_prefixes),
        cmocka_unit_test(test_missing_file),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
