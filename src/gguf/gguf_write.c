/* GGUF v3 writer (see gguf_write.h): metadata and tensor infos are serialized into a memory
 * buffer, tensor data is streamed after it, each tensor aligned to 32 bytes. */
#include "gguf/gguf_write.h"

#include <stdio.h>
#include <string.h>

#include "compute/dtype.h"
#include "util/common.h"

typedef struct wtensor {
    char *name;
    xllm_dtype type;
    int n_dims;
    int64_t ne[4];
    uint64_t n_bytes;
    uint64_t offset;
} wtensor;

struct xllm_gguf_writer {
    uint8_t *kv; /* serialized key/values */
    size_t kv_len, kv_cap;
    uint64_t n_kv;
    wtensor *t;
    int64_t n_t, cap_t;
};

xllm_gguf_writer *xllm_gguf_writer_new(void) {
    return xllm_xcalloc(1, sizeof(xllm_gguf_writer));
}

void xllm_gguf_writer_free(xllm_gguf_writer *w) {
    if (!w) return;
    for (int64_t i = 0; i < w->n_t; i++) free(w->t[i].name);
    free(w->t);
    free(w->kv);
    free(w);
}

static void put(xllm_gguf_writer *w, const void *p, size_t n) {
    if (w->kv_len + n > w->kv_cap) {
        w->kv_cap = (w->kv_len + n) * 2 + 1024;
        w->kv = xllm_xrealloc(w->kv, w->kv_cap);
    }
    memcpy(w->kv + w->kv_len, p, n);
    w->kv_len += n;
}

static void put_u32(xllm_gguf_writer *w, uint32_t v) {
    put(w, &v, 4);
}

static void put_u64(xllm_gguf_writer *w, uint64_t v) {
    put(w, &v, 8);
}

static void put_str(xllm_gguf_writer *w, const char *s, uint64_t len) {
    put_u64(w, len);
    put(w, s, (size_t)len);
}

static void key(xllm_gguf_writer *w, const char *k, xllm_gguf_type t) {
    put_str(w, k, strlen(k));
    put_u32(w, (uint32_t)t);
    w->n_kv++;
}

void xllm_gguf_writer_u32(xllm_gguf_writer *w, const char *k, uint32_t v) {
    key(w, k, XLLM_GGUF_UINT32);
    put_u32(w, v);
}

void xllm_gguf_writer_f32(xllm_gguf_writer *w, const char *k, float v) {
    key(w, k, XLLM_GGUF_FLOAT32);
    put(w, &v, 4);
}

void xllm_gguf_writer_bool(xllm_gguf_writer *w, const char *k, bool v) {
    key(w, k, XLLM_GGUF_BOOL);
    uint8_t b = v;
    put(w, &b, 1);
}

void xllm_gguf_writer_str(xllm_gguf_writer *w, const char *k, const char *v) {
    key(w, k, XLLM_GGUF_STRING);
    put_str(w, v, strlen(v));
}

void xllm_gguf_writer_arr_str(xllm_gguf_writer *w, const char *k, const char *const *s,
                              const size_t *len, uint64_t n) {
    key(w, k, XLLM_GGUF_ARRAY);
    put_u32(w, (uint32_t)XLLM_GGUF_STRING);
    put_u64(w, n);
    for (uint64_t i = 0; i < n; i++) put_str(w, s[i], len[i]);
}

void xllm_gguf_writer_arr_i32(xllm_gguf_writer *w, const char *k, const int32_t *v, uint64_t n) {
    key(w, k, XLLM_GGUF_ARRAY);
    put_u32(w, (uint32_t)XLLM_GGUF_INT32);
    put_u64(w, n);
    put(w, v, (size_t)n * sizeof(int32_t));
}

void xllm_gguf_writer_arr_f32(xllm_gguf_writer *w, const char *k, const float *v, uint64_t n) {
    key(w, k, XLLM_GGUF_ARRAY);
    put_u32(w, (uint32_t)XLLM_GGUF_FLOAT32);
    put_u64(w, n);
    put(w, v, (size_t)n * sizeof(float));
}

void xllm_gguf_writer_copy(xllm_gguf_writer *w, const xllm_gguf_kv *kv) {
    key(w, kv->key, kv->type);
    if (kv->type == XLLM_GGUF_STRING) {
        put_str(w, kv->str, strlen(kv->str));
    } else if (kv->type == XLLM_GGUF_ARRAY) {
        put_u32(w, (uint32_t)kv->arr_type);
        put_u64(w, kv->arr_n);
        if (kv->arr_type == XLLM_GGUF_STRING) {
            for (uint64_t i = 0; i < kv->arr_n; i++)
                put_str(w, kv->arr_strs[i].ptr, kv->arr_strs[i].len);
        } else {
            put(w, kv->arr_data, (size_t)(kv->arr_n * xllm_gguf_type_size(kv->arr_type)));
        }
    } else if (kv->type == XLLM_GGUF_FLOAT32) {
        float f = (float)kv->v.f;
        put(w, &f, 4);
    } else if (kv->type == XLLM_GGUF_FLOAT64) {
        put(w, &kv->v.f, 8);
    } else {
        put(w, &kv->v.u, xllm_gguf_type_size(kv->type)); /* little-endian low bytes */
    }
}

int64_t xllm_gguf_writer_tensor(xllm_gguf_writer *w, const char *name, xllm_dtype type, int n_dims,
                                const int64_t *ne) {
    if (w->n_t == w->cap_t) {
        w->cap_t = w->cap_t * 2 + 64;
        w->t = xllm_xrealloc(w->t, (size_t)w->cap_t * sizeof(wtensor));
    }
    wtensor *t = &w->t[w->n_t];
    memset(t, 0, sizeof(*t));
    t->name = xllm_xstrdup(name);
    t->type = type;
    t->n_dims = n_dims;
    int64_t rows = 1;
    for (int d = 0; d < 4; d++) {
        t->ne[d] = d < n_dims ? ne[d] : 1;
        if (d > 0) rows *= t->ne[d];
    }
    t->n_bytes = (uint64_t)xllm_dtype_row_bytes(type, t->ne[0]) * (uint64_t)rows;
    return w->n_t++;
}

xllm_status xllm_gguf_writer_write(xllm_gguf_writer *w, const char *path, xllm_gguf_fill_fn fill,
                                   void *user, char *err, size_t err_size) {
    const uint64_t align = XLLM_GGUF_DEFAULT_ALIGNMENT;
    FILE *f = fopen(path, "wb");
    if (!f) {
        xllm_set_err(err, err_size, "gguf: cannot create %s", path);
        return XLLM_ERR_IO;
    }
    /* header + kv + tensor infos into one buffer */
    xllm_gguf_writer hdr = {0};
    put_u32(&hdr, XLLM_GGUF_MAGIC);
    put_u32(&hdr, 3);
    put_u64(&hdr, (uint64_t)w->n_t);
    put_u64(&hdr, w->n_kv);
    put(&hdr, w->kv, w->kv_len);
    uint64_t off = 0, max_bytes = 0;
    for (int64_t i = 0; i < w->n_t; i++) {
        wtensor *t = &w->t[i];
        put_str(&hdr, t->name, strlen(t->name));
        put_u32(&hdr, (uint32_t)t->n_dims);
        for (int d = 0; d < t->n_dims; d++) put_u64(&hdr, (uint64_t)t->ne[d]);
        put_u32(&hdr, (uint32_t)t->type);
        t->offset = off;
        put_u64(&hdr, off);
        off = (off + t->n_bytes + align - 1) / align * align;
        if (t->n_bytes > max_bytes) max_bytes = t->n_bytes;
    }
    static const uint8_t zeros[32] = {0};
    size_t pad = (size_t)((align - hdr.kv_len % align) % align);
    bool ok = fwrite(hdr.kv, 1, hdr.kv_len, f) == hdr.kv_len && fwrite(zeros, 1, pad, f) == pad;
    free(hdr.kv);
    void *buf = ok ? malloc(max_bytes ? max_bytes : 1) : NULL;
    if (ok && !buf) {
        fclose(f);
        xllm_set_err(err, err_size, "gguf: out of memory for a %llu-byte tensor",
                     (unsigned long long)max_bytes);
        return XLLM_ERR_NOMEM;
    }
    for (int64_t i = 0; ok && i < w->n_t; i++) {
        const wtensor *t = &w->t[i];
        if (!fill(i, buf, t->n_bytes, user)) {
            ok = false;
            break;
        }
        size_t tpad = (size_t)((align - t->n_bytes % align) % align);
        ok = fwrite(buf, 1, (size_t)t->n_bytes, f) == t->n_bytes &&
             fwrite(zeros, 1, tpad, f) == tpad;
    }
    free(buf);
    if (fclose(f) != 0) ok = false;
    if (!ok) {
        xllm_set_err(err, err_size, "gguf: writing %s failed", path);
        return XLLM_ERR_IO;
    }
    return XLLM_OK;
}
