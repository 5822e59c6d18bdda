/* libFuzzer target for the GGUF reader: parses the input in memory and, when it is accepted,
 * exercises every lookup, typed getter and renderer and touches every tensor's data. */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "gguf/gguf.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static volatile uint64_t sink; /* keeps the reads below from being optimised away */

static void exercise_kv(const xllm_gguf *g, const xllm_gguf_kv *kv) {
    if (!kv->key) __builtin_trap();
    if (xllm_gguf_find(g, kv->key) == NULL) __builtin_trap(); /* first kv with this key */
    uint32_t u32;
    int64_t i64;
    float f32;
    bool b;
    sink += xllm_gguf_get_u32(g, kv->key, &u32) ? u32 : 0;
    sink += xllm_gguf_get_i64(g, kv->key, &i64) ? (uint64_t)i64 : 0;
    sink += xllm_gguf_get_f32(g, kv->key, &f32) ? (uint64_t)(f32 == f32) : 0;
    sink += xllm_gguf_get_bool(g, kv->key, &b) ? b : 0;
    const char *s = xllm_gguf_get_str(g, kv->key);
    if (s) sink += strlen(s);
    for (int t = 0; t < XLLM_GGUF_TYPE_COUNT; t++) {
        const xllm_gguf_kv *a = xllm_gguf_get_arr(g, kv->key, (xllm_gguf_type)t);
        if (a && a->arr_type == XLLM_GGUF_STRING) {
            for (uint64_t i = 0; i < a->arr_n; i++) {
                xllm_gguf_str str = a->arr_strs[i];
                if (str.len) sink += (uint8_t)str.ptr[0] + (uint8_t)str.ptr[str.len - 1];
            }
        } else if (a && a->arr_n) {
            const uint8_t *p = a->arr_data;
            sink += p[0];
        }
    }
    sink += (uint64_t)xllm_gguf_type_name(kv->type)[0];

    /* Render into a NULL buffer, a tiny one, one exactly too small, and a large one: the
     * returned length must not depend on the buffer, and the text must be NUL-terminated. */
    int need = xllm_gguf_kv_to_string(kv, NULL, 0);
    if (need < 0) __builtin_trap();
    char small[4];
    if (xllm_gguf_kv_to_string(kv, small, sizeof(small)) != need) __builtin_trap();
    if (memchr(small, 0, sizeof(small)) == NULL) __builtin_trap();
    char *exact = malloc((size_t)need + 1);
    if (xllm_gguf_kv_to_string(kv, exact, (size_t)need) != need) __builtin_trap();
    if (need > 0 && exact[need - 1] != 0) __builtin_trap();
    if (xllm_gguf_kv_to_string(kv, exact, (size_t)need + 1) != need) __builtin_trap();
    if (strlen(exact) > (size_t)need) __builtin_trap();
    free(exact);
    char large[4096];
    if (xllm_gguf_kv_to_string(kv, large, sizeof(large)) != need) __builtin_trap();
    sink += strlen(large);
}

static void exercise_tensor(const xllm_gguf *g, const xllm_gguf_tensor *t) {
    if (!t->name || t->n_dims < 1 || t->n_dims > XLLM_GGUF_MAX_DIMS) __builtin_trap();
    if (xllm_gguf_find_tensor(g, t->name) != t) __builtin_trap(); /* names are unique */
    if (t->n_bytes == 0 || t->offset % g->alignment != 0) __builtin_trap();
    const uint8_t *d = t->data;
    if (d < g->base + g->data_offset || t->n_bytes > g->size || d + t->n_bytes > g->base + g->size)
        __builtin_trap();
    sink += d[0] + d[t->n_bytes - 1];
    for (int i = 0; i < XLLM_GGUF_MAX_DIMS; i++)
        if (t->ne[i] < 1) __builtin_trap();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    /* Parse a private copy so that ASan catches reads one byte past the input. */
    uint8_t *copy = malloc(size ? size : 1);
    if (size) memcpy(copy, data, size);
    char err[256];
    err[0] = 0;
    xllm_gguf *g = (xllm_gguf *)1;
    xllm_status st = xllm_gguf_parse(copy, size, &g, err, sizeof(err));
    if (st != XLLM_OK) {
        /* Every rejection is a format error with a message, and leaves no result. */
        if (st != XLLM_ERR_FORMAT || g != NULL || strncmp(err, "gguf: ", 6) != 0) __builtin_trap();
        free(copy);
        return 0;
    }
    if (!g || g->base != copy || g->size != size) __builtin_trap();
    if (g->alignment == 0 || (g->alignment & (g->alignment - 1)) != 0) __builtin_trap();
    for (uint64_t i = 0; i < g->n_kv; i++) exercise_kv(g, &g->kv[i]);
    for (uint64_t i = 0; i < g->n_tensors; i++) exercise_tensor(g, &g->tensors[i]);
    sink += xllm_gguf_find(g, "general.architecture") != NULL;
    sink += xllm_gguf_find_tensor(g, "token_embd.weight") != NULL;
    xllm_gguf_free(g);
    free(copy);
    return 0;
}
