/* Every reference in shared/models/tiny/refs: teacher-forced logits from `xllm logits` within
 * the bounds of that folder's README (per weight type), run through the real binary. */
#include <dirent.h>
#include <jansson.h>
#include <math.h>
#include <string.h>
#include <unistd.h>

#include "testutil.h"

typedef enum kind { K_FLOAT, K_BF16, K_QUANT, K_QWENTOK } kind;

static kind kind_of(const char *name) {
    if (strstr(name, "qwentok")) return K_QWENTOK;
    if (strstr(name, "-f32.") || strstr(name, "-f16.")) return K_FLOAT;
    if (strstr(name, "-bf16.")) return K_BF16;
    return K_QUANT;
}

/* Runs xllm logits on the reference's ids; returns malloc'd rows * n_vocab floats. */
static float *run_logits(const char *model, json_t *ids, size_t n_ids, int32_t n_vocab,
                         const char *layout) {
    size_t cap = n_ids * 8 + 1;
    char *tokens = malloc(cap);
    size_t off = 0;
    tokens[0] = 0;
    for (size_t i = 0; i < n_ids; i++)
        off += (size_t)snprintf(tokens + off, cap - off, "%s%lld", i ? " " : "",
                                (long long)json_integer_value(json_array_get(ids, i)));
    char out[1024], cmd[16384];
    snprintf(out, sizeof(out), "%s/test_tiny_refs.%d.bin", xllm_test_build_dir(), (int)getpid());
    /* the paged runs load the weights into memory (--no-mmap), where the 8-bit matrices live
     * only as packed panels, and with --low-memory (sub-8-bit ones only as decode panels,
     * which the prompt's matrix products read too); the
     * xtensor runs keep the file mapping and every panel */
    snprintf(cmd, sizeof(cmd),
             "'%s/xllm' logits -m '%s' --tokens '%s' -o '%s' -t 2 --kv-layout %s%s",
             xllm_test_build_dir(), model, tokens, out, layout,
             strcmp(layout, "paged") ? "" : " --no-mmap --low-memory");
    free(tokens);
    int rc = system(cmd);
    assert_int_equal(rc, 0);
    size_t size = 0;
    float *data = xllm_test_read_file(out, &size);
    unlink(out);
    assert_non_null(data);
    assert_int_equal(size, n_ids * (size_t)n_vocab * sizeof(float));
    return data;
}

static void check_ref(const char *dir, const char *json_name, const char *layout) {
    char path[2100];
    snprintf(path, sizeof(path), "%s/%s", dir, json_name);
    json_error_t jerr;
    json_t *ref = json_load_file(path, 0, &jerr);
    assert_non_null(ref);
    const char *model_name = json_string_value(json_object_get(ref, "model"));
    assert_non_null(model_name);
    char model[2100];
    snprintf(model, sizeof(model), "%s/../%s", dir, model_name);
    const int32_t V = (int32_t)json_integer_value(json_object_get(ref, "n_vocab"));
    const size_t rows = (size_t)json_integer_value(json_object_get(ref, "logits_rows"));
    json_t *prompt = json_object_get(ref, "prompt_ids"),
           *greedy = json_object_get(ref, "greedy_ids");
    json_t *ids = json_array();
    json_array_extend(ids, prompt);
    json_array_extend(ids, greedy);
    json_array_remove(ids, json_array_size(ids) - 1);
    assert_int_equal(json_array_size(ids), rows);

    float *got = run_logits(model, ids, rows, V, layout);
    const kind k = kind_of(json_name);
    size_t n_argmax = 0, n_err_ok = 0;
    double max_err = 0;
    float *ref_rows = NULL;
    if (k != K_QWENTOK) {
        char bin[2100];
        snprintf(bin, sizeof(bin), "%s", path);
        strcpy(strstr(bin, ".json"), ".bin");
        size_t size = 0;
        ref_rows = xllm_test_read_file(bin, &size);
        assert_non_null(ref_rows);
        assert_int_equal(size, rows * (size_t)V * sizeof(float));
    }
    json_t *top10 = json_object_get(ref, "top10");
    for (size_t r = 0; r < rows; r++) {
        const float *g = got + r * (size_t)V;
        json_t *tr = json_array_get(top10, r);
        int64_t ref_top = json_integer_value(json_array_get(json_array_get(tr, 0), 0));
        if (xllm_test_argmax(g, V) == ref_top) n_argmax++;
        if (k == K_QWENTOK) {
            for (size_t j = 0; j < json_array_size(tr); j++) {
                json_t *pair = json_array_get(tr, j);
                int64_t id = json_integer_value(json_array_get(pair, 0));
                double want = json_number_value(json_array_get(pair, 1));
                double diff = fabs((double)g[id] - want);
                if (diff > max_err) max_err = diff;
            }
            continue;
        }
        double e = xllm_test_norm_err(g, ref_rows + r * (size_t)V, V);
        if (e > max_err) max_err = e;
        double bound = k == K_FLOAT ? 0.005 : k == K_BF16 ? 0.01 : 0.075;
        if (e <= bound) n_err_ok++;
    }
    fprintf(stderr, "%-7s %-32s rows %2zu  max err %.5f  argmax %zu/%zu  err-ok %zu/%zu\n", layout,
            json_name, rows, max_err, n_argmax, rows, n_err_ok, rows);
    switch (k) {
        case K_FLOAT:
            assert_int_equal(n_err_ok, rows);
            assert_int_equal(n_argmax, rows);
            break;
        case K_BF16:
            assert_int_equal(n_err_ok, rows);
            assert_true(n_argmax * 100 >= rows * 95);
            break;
        case K_QUANT:
            assert_true(n_err_ok * 100 >= rows * 90);
            assert_true(n_argmax * 100 >= rows * 85);
            break;
        case K_QWENTOK:
            assert_int_equal(n_argmax, rows);
            assert_true(max_err <= 0.02);
            break;
    }
    free(ref_rows);
    free(got);
    json_decref(ids);
    json_decref(ref);
}

static int cmp_str(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static void test_all_refs(void **state) {
    (void)state;
    char dir[1024];
    snprintf(dir, sizeof(dir), "%s", xllm_test_shared("models/tiny/refs"));
    DIR *d = opendir(dir);
    assert_non_null(d);
    char *names[256];
    size_t n = 0;
    struct dirent *e;
    while ((e = readdir(d)) && n < 256) {
        size_t len = strlen(e->d_name);
        if (len > 5 && !strcmp(e->d_name + len - 5, ".json")) names[n++] = strdup(e->d_name);
    }
    closedir(d);
    qsort(names, n, sizeof(char *), cmp_str);
    assert_true(n >= 40); /* every family and type is there */
    /* every reference on both KV layouts */
    for (size_t i = 0; i < n; i++) {
        check_ref(dir, names[i], "xtensor");
        check_ref(dir, names[i], "paged");
        free(names[i]);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_all_refs),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
