/* Corruption tests of the GGUF reader on the shared test models: truncated, field-corrupted and
 * byte-flipped in-memory copies are rejected with an error naming the field, and never crash. */
#include <glob.h>
#include <inttypes.h>
#include <stdbool.h>
#include <string.h>

#include "compute/dtype.h"
#include "gguf/gguf.h"
#include "testutil.h"

#define MAX_MODELS 64

/* Layout of one metadata entry / tensor info, found by walking the file independently. */
typedef struct kv_rec {
    size_t key_len_off; /* offset of the key's length */
    uint64_t key_len;
    size_t type_off; /* value type */
    uint32_t type;
    size_t val_off; /* the value; for an array its element type, for a string its length */
    uint32_t arr_type;
    size_t arr_n_off;
    uint64_t arr_n;
    char key[128];
} kv_rec;

typedef struct tensor_rec {
    size_t name_len_off;
    uint64_t name_len;
    size_t n_dims_off;
    uint32_t n_dims;
    uint64_t ne0;
    size_t type_off;
    uint32_t type;
    size_t offset_off;
    uint64_t offset;
    uint64_t n_bytes;
    char name[128];
} tensor_rec;

typedef struct model {
    char path[512];
    uint8_t *data; /* a private, writable copy of the file */
    size_t size;
    uint64_t n_kv, n_tensors;
    kv_rec *kv;
    tensor_rec *t;
    size_t infos_off; /* first tensor info */
    size_t infos_end;
    uint64_t alignment;
    size_t data_off;
} model;

static model g_models[MAX_MODELS];
static int g_n_models;

/* ---------------------------------------------------------------------------------------- */
/* An independent walker of the GGUF layout. With lim < size it predicts the reader's error on */
/* the file cut to lim bytes: the context prefix and two substrings naming the field.         */
/* ---------------------------------------------------------------------------------------- */

typedef struct walker {
    const uint8_t *d;
    size_t lim; /* bytes available */
    size_t off;
    model *rec; /* records the layout when non-NULL */
    uint64_t alignment;
    char ctx[192];
    char prefix[256]; /* "gguf: <ctx>: " the message must start with */
    char sub1[256];   /* ... and contain these */
    char sub2[128];
} walker;

static uint64_t rd64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}
static uint32_t rd32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}
static void wr64(uint8_t *p, uint64_t v) {
    memcpy(p, &v, 8);
}
static void wr32(uint8_t *p, uint32_t v) {
    memcpy(p, &v, 4);
}

static size_t scalar_bytes(uint32_t t) {
    static const size_t sz[] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};
    return t < 13 ? sz[t] : 0;
}

static bool w_fail(walker *w, const char *sub2, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static bool w_fail(walker *w, const char *sub2, const char *fmt, ...) {
    snprintf(w->prefix, sizeof(w->prefix), "gguf: %s%s", w->ctx, w->ctx[0] ? ": " : "");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(w->sub1, sizeof(w->sub1), fmt, ap);
    va_end(ap);
    snprintf(w->sub2, sizeof(w->sub2), "%s", sub2);
    return false;
}

static bool w_need(walker *w, size_t n, const char *field) {
    if (n > w->lim - w->off)
        return w_fail(w, "left)", "file truncated reading %s at offset %zu (needs %zu bytes", field,
                      w->off, n);
    return true;
}

static bool w_str(walker *w, const char *field, uint64_t *len_out, char *copy, size_t copy_size) {
    char lf[96];
    snprintf(lf, sizeof(lf), "%s length", field);
    if (!w_need(w, 8, lf)) return false;
    uint64_t len = rd64(w->d + w->off);
    w->off += 8;
    if (len > w->lim - w->off)
        return w_fail(w, "longer than the rest of the file", "%s is %" PRIu64 " bytes", field, len);
    if (copy) {
        size_t n = len < copy_size - 1 ? (size_t)len : copy_size - 1;
        memcpy(copy, w->d + w->off, n);
        copy[n] = 0;
    }
    if (len_out) *len_out = len;
    w->off += len;
    return true;
}

/* Returns true when a file cut to w->lim bytes should parse; otherwise fills the expectation. */
static bool walk(walker *w) {
    const uint8_t *d = w->d;
    model *m = w->rec;
    w->off = 0;
    w->ctx[0] = 0;
    w->alignment = XLLM_GGUF_DEFAULT_ALIGNMENT;
    if (!w_need(w, 4, "magic")) return false;
    w->off += 4;
    if (!w_need(w, 4, "version")) return false;
    w->off += 4;
    if (!w_need(w, 8, "tensor count")) return false;
    uint64_t n_tensors = rd64(d + w->off);
    w->off += 8;
    if (!w_need(w, 8, "metadata count")) return false;
    uint64_t n_kv = rd64(d + w->off);
    w->off += 8;
    if (n_kv > (w->lim - w->off) / 13)
        return w_fail(w, "is larger than the file allows", "metadata count %" PRIu64 " ", n_kv);
    if (n_tensors > (w->lim - w->off) / 32)
        return w_fail(w, "is larger than the file allows", "tensor count %" PRIu64 " ", n_tensors);
    if (m) {
        m->n_kv = n_kv;
        m->n_tensors = n_tensors;
        m->kv = calloc(n_kv ? n_kv : 1, sizeof(*m->kv));
        m->t = calloc(n_tensors ? n_tensors : 1, sizeof(*m->t));
    }

    for (uint64_t i = 0; i < n_kv; i++) {
        kv_rec r = {0};
        snprintf(w->ctx, sizeof(w->ctx), "metadata %" PRIu64, i);
        r.key_len_off = w->off;
        if (!w_str(w, "key", &r.key_len, r.key, sizeof(r.key))) return false;
        snprintf(w->ctx, sizeof(w->ctx), "metadata '%.100s'", r.key);
        r.type_off = w->off;
        if (!w_need(w, 4, "value type")) return false;
        r.type = rd32(d + w->off);
        w->off += 4;
        r.val_off = w->off;
        if (r.type == XLLM_GGUF_STRING) {
            if (!w_str(w, "string value", NULL, NULL, 0)) return false;
        } else if (r.type == XLLM_GGUF_ARRAY) {
            if (!w_need(w, 4, "array element type")) return false;
            r.arr_type = rd32(d + w->off);
            w->off += 4;
            r.arr_n_off = w->off;
            if (!w_need(w, 8, "array count")) return false;
            r.arr_n = rd64(d + w->off);
            w->off += 8;
            size_t es = r.arr_type == XLLM_GGUF_STRING ? 8 : scalar_bytes(r.arr_type);
            if (r.arr_n > (w->lim - w->off) / es)
                return w_fail(w, "is larger than the rest of the file allows",
                              "array count %" PRIu64 " ", r.arr_n);
            if (r.arr_type == XLLM_GGUF_STRING) {
                for (uint64_t j = 0; j < r.arr_n; j++)
                    if (!w_str(w, "array string", NULL, NULL, 0)) return false;
            } else {
                w->off += r.arr_n * es;
            }
        } else {
            if (!w_need(w, scalar_bytes(r.type), "value")) return false;
            if (!strcmp(r.key, "general.alignment") && r.type == XLLM_GGUF_UINT32)
                w->alignment = rd32(d + w->off);
            w->off += scalar_bytes(r.type);
        }
        if (m) m->kv[i] = r;
    }
    w->ctx[0] = 0;
    if (m) m->infos_off = w->off;

    for (uint64_t i = 0; i < n_tensors; i++) {
        tensor_rec r = {0};
        snprintf(w->ctx, sizeof(w->ctx), "tensor %" PRIu64, i);
        r.name_len_off = w->off;
        if (!w_str(w, "name", &r.name_len, r.name, sizeof(r.name))) return false;
        snprintf(w->ctx, sizeof(w->ctx), "tensor %" PRIu64 " '%.100s'", i, r.name);
        r.n_dims_off = w->off;
        if (!w_need(w, 4, "n_dims")) return false;
        r.n_dims = rd32(d + w->off);
        w->off += 4;
        uint64_t rows = 1;
        for (uint32_t k = 0; k < r.n_dims; k++) {
            if (!w_need(w, 8, "dimension")) return false;
            uint64_t ne = rd64(d + w->off);
            if (k == 0)
                r.ne0 = ne;
            else
                rows *= ne;
            w->off += 8;
        }
        r.type_off = w->off;
        if (!w_need(w, 4, "type")) return false;
        r.type = rd32(d + w->off);
        w->off += 4;
        r.offset_off = w->off;
        if (!w_need(w, 8, "data offset")) return false;
        r.offset = rd64(d + w->off);
        w->off += 8;
        r.n_bytes = rows * xllm_dtype_row_bytes((xllm_dtype)r.type, (int64_t)r.ne0);
        if (m) m->t[i] = r;
    }
    w->ctx[0] = 0;
    size_t data_off = (w->off + w->alignment - 1) / w->alignment * w->alignment;
    if (m) {
        m->infos_end = w->off;
        m->alignment = w->alignment;
        m->data_off = data_off;
    }
    if (n_tensors > 0 && data_off > w->lim)
        return w_fail(w, "is past the end of the file", "data section offset %zu ", data_off);
    return true;
}

/* The tensor-data part of the oracle, using the recorded layout of the full file. */
static bool walk_data(const model *m, walker *w) {
    for (uint64_t i = 0; i < m->n_tensors; i++) {
        const tensor_rec *t = &m->t[i];
        snprintf(w->ctx, sizeof(w->ctx), "tensor %" PRIu64 " '%.100s'", i, t->name);
        uint64_t avail = w->lim > m->data_off ? w->lim - m->data_off : 0;
        if (t->offset > avail || t->n_bytes > avail - t->offset)
            return w_fail(w, "plus the tensor's size runs past the end of the file",
                          "data offset %" PRIu64 " ", t->offset);
    }
    w->ctx[0] = 0;
    return true;
}

/* ---------------------------------------------------------------------------------------- */
/* Helpers                                                                                   */
/* ---------------------------------------------------------------------------------------- */

static int load_models(void **state) {
    (void)state;
    const char *pats[] = {"models/tiny/*.gguf", "models/stories260K/stories260K.gguf"};
    for (size_t p = 0; p < sizeof(pats) / sizeof(pats[0]); p++) {
        glob_t gl;
        if (glob(xllm_test_shared(pats[p]), 0, NULL, &gl) != 0) continue;
        for (size_t i = 0; i < gl.gl_pathc && g_n_models < MAX_MODELS; i++) {
            model *m = &g_models[g_n_models];
            snprintf(m->path, sizeof(m->path), "%s", gl.gl_pathv[i]);
            m->data = xllm_test_read_file(m->path, &m->size);
            if (!m->data) continue;
            walker w = {.d = m->data, .lim = m->size, .rec = m};
            if (!walk(&w)) {
                fprintf(stderr, "%s: the test's walker rejects it: %s%s\n", m->path, w.prefix,
                        w.sub1);
                return -1;
            }
            g_n_models++;
        }
        globfree(&gl);
    }
    return 0;
}

static int free_models(void **state) {
    (void)state;
    for (int i = 0; i < g_n_models; i++) {
        free(g_models[i].data);
        free(g_models[i].kv);
        free(g_models[i].t);
    }
    return 0;
}

static const char *base_name(const char *path) {
    const char *s = strrchr(path, '/');
    return s ? s + 1 : path;
}

/* Parses img and asserts a format error whose message contains every non-NULL substring. */
static void expect_error(const model *m, const char *what, const uint8_t *img, size_t size,
                         const char *s1, const char *s2, const char *s3) {
    char err[512] = {0};
    xllm_gguf *g = (xllm_gguf *)&err;
    xllm_status st = xllm_gguf_parse(img, size, &g, err, sizeof(err));
    const char *subs[] = {s1, s2, s3};
    bool ok = st == XLLM_ERR_FORMAT && g == NULL;
    for (int i = 0; i < 3; i++)
        if (subs[i] && !strstr(err, subs[i])) ok = false;
    if (!ok) {
        print_error("%s: %s: status %d, message \"%s\"; expected \"%s\" \"%s\" \"%s\"\n",
                    base_name(m->path), what, st, err, s1 ? s1 : "", s2 ? s2 : "", s3 ? s3 : "");
        if (st == XLLM_OK && g != (xllm_gguf *)&err) xllm_gguf_free(g);
        fail();
    }
}

/* Writes n bytes at off, expects the error, and restores the file. */
static void patch_expect(model *m, const char *what, size_t off, const void *bytes, size_t n,
                         const char *s1, const char *s2, const char *s3) {
    uint8_t save[64];
    assert_true(n <= sizeof(save) && off + n <= m->size);
    memcpy(save, m->data + off, n);
    memcpy(m->data + off, bytes, n);
    expect_error(m, what, m->data, m->size, s1, s2, s3);
    memcpy(m->data + off, save, n);
}

static void patch64(model *m, const char *what, size_t off, uint64_t v, const char *s1,
                    const char *s2, const char *s3) {
    uint8_t b[8];
    wr64(b, v);
    patch_expect(m, what, off, b, 8, s1, s2, s3);
}

static void patch32(model *m, const char *what, size_t off, uint32_t v, const char *s1,
                    const char *s2, const char *s3) {
    uint8_t b[4];
    wr32(b, v);
    patch_expect(m, what, off, b, 4, s1, s2, s3);
}

/* ---------------------------------------------------------------------------------------- */
/* (a) truncation                                                                             */
/* ---------------------------------------------------------------------------------------- */

/* Truncation points, chosen to keep the test fast under ASan (each cut re-parses the header):
 * - every byte of the header (up to the data section) for stories260K and each *-f32 model (one
 *   per architecture), and for every model the first 4 KiB and the first 64 bytes of the tensor
 *   infos (of a header up to 64 KiB);
 * - elsewhere in the header: stride 61 through the metadata and 5 through the tensor infos for
 *   the quantised variants (they share the f32 model's layout); a header over 64 KiB (a full
 *   tokenizer, ~100 ms a parse under ASan) gets 8 points through each section;
 * - then 48 points (8 past a big header) through the tensor data, plus the last byte of each
 *   tensor. */
static bool dense_model(const model *m) {
    const char *b = base_name(m->path);
    size_t n = strlen(b);
    if (m->data_off > 65536) return false;
    return strstr(b, "stories260K") || (n > 9 && !strcmp(b + n - 9, "-f32.gguf"));
}

static size_t next_cut(const model *m, size_t n) {
    size_t h = m->data_off;
    bool big = h > 65536;
    if (n < h) {
        if (dense_model(m) || n < 4096 ||
            (!big && ((n >= m->infos_off && n < m->infos_off + 64) || n + 8 >= h)))
            return n + 1;
        size_t stride;
        if (n < m->infos_off)
            stride = big ? ((m->infos_off - 4096) / 8) | 1 : 61;
        else
            stride = big ? ((m->infos_end - m->infos_off) / 8) | 1 : 5;
        size_t next = n + stride;
        if (n < m->infos_off && next > m->infos_off) next = m->infos_off;
        if (next >= h) next = h - 1;
        return next > n ? next : n + 1;
    }
    size_t stride = ((m->size - h) / (big ? 8 : 48)) | 1;
    return n + stride < m->size ? n + stride : (n < m->size ? m->size : m->size + 1);
}

static void check_cut(const model *m, size_t n) {
    walker w = {.d = m->data, .lim = n};
    bool ok = walk(&w) && (n < m->data_off || walk_data(m, &w));
    char err[512] = {0};
    xllm_gguf *g = NULL;
    xllm_status st = xllm_gguf_parse(m->data, n, &g, err, sizeof(err));
    if (ok) {
        if (st != XLLM_OK) {
            print_error("%s cut to %zu: expected success, got \"%s\"\n", base_name(m->path), n,
                        err);
            fail();
        }
        assert_int_equal(g->n_tensors, m->n_tensors);
        xllm_gguf_free(g);
        return;
    }
    if (st != XLLM_ERR_FORMAT || g != NULL || strncmp(err, w.prefix, strlen(w.prefix)) != 0 ||
        !strstr(err, w.sub1) || !strstr(err, w.sub2)) {
        print_error("%s cut to %zu: status %d, message \"%s\"\n  expected \"%s\" ... \"%s\" ... "
                    "\"%s\"\n",
                    base_name(m->path), n, st, err, w.prefix, w.sub1, w.sub2);
        if (g) xllm_gguf_free(g);
        fail();
    }
}

static void test_truncations(void **state) {
    (void)state;
    assert_true(g_n_models >= 2);
    for (int i = 0; i < g_n_models; i++) {
        const model *m = &g_models[i];
        size_t cuts = 0;
        for (size_t n = 0; n <= m->size; n = next_cut(m, n), cuts++) check_cut(m, n);
        /* the last byte of every tensor (of the first and last only, past a big header) */
        for (uint64_t j = 0; j < m->n_tensors; j++)
            if (m->data_off <= 65536 || j == 0 || j + 1 == m->n_tensors)
                check_cut(m, m->data_off + m->t[j].offset + m->t[j].n_bytes - 1);
        assert_true(cuts > 100);
    }
}

/* ---------------------------------------------------------------------------------------- */
/* (b) targeted corruptions                                                                   */
/* ---------------------------------------------------------------------------------------- */

static const kv_rec *find_kv(const model *m, uint32_t type, uint32_t arr_type) {
    for (uint64_t i = 0; i < m->n_kv; i++)
        if (m->kv[i].type == type && (type != XLLM_GGUF_ARRAY || m->kv[i].arr_type == arr_type))
            return &m->kv[i];
    return NULL;
}

static void corrupt_header(model *m) {
    char s[256];
    patch_expect(m, "magic", 0, "GGUX", 4, "gguf: magic 0x", "is not GGUF", NULL);
    patch32(m, "version 1", 4, 1, "gguf: version 1 is not supported", NULL, NULL);
    patch32(m, "version 4", 4, 4, "gguf: version 4 is not supported", NULL, NULL);
    patch64(m, "huge tensor count", 8, UINT64_C(1) << 62, "gguf: tensor count 4611686018427387904",
            "larger than the file allows", NULL);
    uint64_t just_over = (m->size - 24) / 32 + 1;
    snprintf(s, sizeof(s), "gguf: tensor count %" PRIu64 " ", just_over);
    patch64(m, "tensor count just too big", 8, just_over, s, "larger than the file allows", NULL);
    patch64(m, "huge metadata count", 16, UINT64_MAX, "gguf: metadata count 18446744073709551615",
            "larger than the file allows", NULL);
}

static void corrupt_metadata(model *m) {
    char s[256], ctx[256];
    /* string lengths past the end, exactly one byte past and at the maximum */
    const kv_rec *k0 = &m->kv[0];
    uint64_t past = m->size - (k0->key_len_off + 8) + 1;
    snprintf(s, sizeof(s), "key is %" PRIu64 " bytes, longer than the rest of the file", past);
    patch64(m, "key length", k0->key_len_off, past, "gguf: metadata 0: ", s, NULL);
    patch64(m, "key length max", k0->key_len_off, UINT64_MAX,
            "gguf: metadata 0: ", "key is 18446744073709551615 bytes", "longer than the rest");

    const kv_rec *ks = find_kv(m, XLLM_GGUF_STRING, 0);
    assert_non_null(ks);
    snprintf(ctx, sizeof(ctx), "gguf: metadata '%s': ", ks->key);
    patch64(m, "string value length", ks->val_off, m->size - (ks->val_off + 8) + 1, ctx,
            "string value is", "longer than the rest of the file");
    patch64(m, "string value length max", ks->val_off, UINT64_MAX, ctx, "string value is",
            "longer than the rest of the file");

    const kv_rec *kas = find_kv(m, XLLM_GGUF_ARRAY, XLLM_GGUF_STRING);
    assert_non_null(kas);
    assert_true(kas->arr_n > 0);
    snprintf(ctx, sizeof(ctx), "gguf: metadata '%s': ", kas->key);
    size_t s0 = kas->arr_n_off + 8; /* the first string's length */
    patch64(m, "array string length", s0, m->size - (s0 + 8) + 1, ctx, "array string is",
            "longer than the rest of the file");
    patch64(m, "string array count", kas->arr_n_off, UINT64_MAX / 2, ctx, "array count ",
            "larger than the rest of the file allows");

    /* value types */
    const kv_rec *k1 = &m->kv[m->n_kv - 1];
    snprintf(ctx, sizeof(ctx), "gguf: metadata '%s': ", k1->key);
    patch32(m, "value type 13", k1->type_off, 13, ctx, "value type 13 is not a GGUF type", NULL);
    patch32(m, "value type max", k1->type_off, UINT32_MAX, ctx,
            "value type 4294967295 is not a GGUF type", NULL);

    /* array element types, and a scalar array count past the end */
    snprintf(ctx, sizeof(ctx), "gguf: metadata '%s': ", kas->key);
    patch32(m, "array of arrays", kas->val_off, XLLM_GGUF_ARRAY, ctx,
            "array element type 9 is not a valid array element type", NULL);
    patch32(m, "array element type 13", kas->val_off, 13, ctx,
            "array element type 13 is not a valid array element type", NULL);
    const kv_rec *kaf = NULL;
    for (uint64_t i = 0; i < m->n_kv && !kaf; i++)
        if (m->kv[i].type == XLLM_GGUF_ARRAY && m->kv[i].arr_type != XLLM_GGUF_STRING)
            kaf = &m->kv[i];
    if (kaf) {
        snprintf(ctx, sizeof(ctx), "gguf: metadata '%s': ", kaf->key);
        patch64(m, "scalar array count", kaf->arr_n_off, UINT64_MAX / 2, ctx, "array count ",
                "larger than the rest of the file allows");
    }
}

static void corrupt_tensor_infos(model *m) {
    char s[256], ctx[256];
    if (m->n_tensors == 0) return;
    const tensor_rec *t0 = &m->t[0];
    const tensor_rec *tl = &m->t[m->n_tensors - 1];
    snprintf(ctx, sizeof(ctx), "gguf: tensor %" PRIu64 ": ", m->n_tensors - 1);
    patch64(m, "tensor name length", tl->name_len_off, m->size - (tl->name_len_off + 8) + 1, ctx,
            "name is", "longer than the rest of the file");

    snprintf(ctx, sizeof(ctx), "gguf: tensor 0 '%s': ", t0->name);
    patch32(m, "n_dims 0", t0->n_dims_off, 0, ctx, "n_dims 0 is out of range", NULL);
    patch32(m, "n_dims 5", t0->n_dims_off, 5, ctx, "n_dims 5 is out of range", NULL);
    patch64(m, "dimension 0", t0->n_dims_off + 4, 0, ctx, "dimension 0 is out of range", NULL);
    patch64(m, "dimension 2^41", t0->n_dims_off + 4, UINT64_C(1) << 41, ctx,
            "dimension 2199023255552 is out of range", NULL);
    /* ids 4 and 5 were removed from ggml; 40 and up are past every known type */
    const uint32_t bad_types[] = {4, 5, 40, 1000, UINT32_MAX};
    for (size_t i = 0; i < sizeof(bad_types) / sizeof(bad_types[0]); i++) {
        snprintf(s, sizeof(s), "type %" PRIu32 " is not a supported tensor type", bad_types[i]);
        patch32(m, "tensor type", t0->type_off, bad_types[i], ctx, s, NULL);
    }
    /* a row length that is not a whole number of q4_K blocks */
    for (uint64_t i = 0; i < m->n_tensors; i++) {
        const tensor_rec *t = &m->t[i];
        if (t->ne0 % 256 == 0) continue;
        char c2[256];
        snprintf(c2, sizeof(c2), "gguf: tensor %" PRIu64 " '%s': ", i, t->name);
        patch32(m, "block size", t->type_off, XLLM_DTYPE_Q4_K, c2, "row length ne[0]",
                "not a multiple of the type's block size");
        break;
    }

    /* data offsets: misaligned, past the end, and huge */
    snprintf(ctx, sizeof(ctx), "gguf: tensor %" PRIu64 " '%s': ", m->n_tensors - 1, tl->name);
    snprintf(s, sizeof(s), "data offset %" PRIu64 " is not aligned", tl->offset + 1);
    patch64(m, "misaligned offset", tl->offset_off, tl->offset + 1, ctx, s, NULL);
    uint64_t end = (m->size - m->data_off + m->alignment - 1) / m->alignment * m->alignment;
    snprintf(s, sizeof(s), "data offset %" PRIu64 " plus the tensor's size runs past the end", end);
    patch64(m, "offset past the end", tl->offset_off, end, ctx, s, NULL);
    uint64_t huge = UINT64_MAX / m->alignment * m->alignment;
    patch64(m, "huge offset", tl->offset_off, huge, ctx, "data offset 18446744073709551",
            "runs past");
    /* just one alignment step too far for the last tensor's size */
    uint64_t last_ok = (m->size - m->data_off - tl->n_bytes) / m->alignment * m->alignment;
    patch64(m, "offset one step too far", tl->offset_off, last_ok + m->alignment, ctx,
            "data offset", "runs past the end of the file");

    /* a duplicate name: copy an earlier name of the same length over a later one */
    bool done = false;
    for (uint64_t j = 1; j < m->n_tensors && !done; j++) {
        for (uint64_t i = 0; i < j && !done; i++) {
            if (m->t[i].name_len != m->t[j].name_len || m->t[i].name_len >= 64) continue;
            snprintf(ctx, sizeof(ctx), "gguf: tensor %" PRIu64 " '%s': ", j, m->t[i].name);
            snprintf(s, sizeof(s), "name appears twice (first at index %" PRIu64 ")", i);
            patch_expect(m, "duplicate name", m->t[j].name_len_off + 8,
                         m->data + m->t[i].name_len_off + 8, m->t[i].name_len, ctx, s, NULL);
            done = true;
        }
    }
    assert_true(done || m->n_tensors < 2);
}

/* general.alignment: inserts it (and a padding kv, 64 bytes in all, so that the tensor data stays
 * aligned) after the header, then checks a valid value and invalid ones. */
static void corrupt_alignment(model *m) {
    if (64 % m->alignment != 0) return;
    uint8_t kvs[64];
    size_t o = 0;
    wr64(kvs + o, 17), o += 8;
    memcpy(kvs + o, "general.alignment", 17), o += 17;
    wr32(kvs + o, XLLM_GGUF_UINT32), o += 4;
    size_t val_off = 24 + o;
    wr32(kvs + o, 32), o += 4;
    wr64(kvs + o, 18), o += 8;
    memcpy(kvs + o, "xllm.test.padding.", 18), o += 18;
    wr32(kvs + o, XLLM_GGUF_UINT8), o += 4;
    kvs[o++] = 7;
    assert_int_equal(o, 64);

    model c = *m;
    c.size = m->size + 64;
    c.data = malloc(c.size);
    memcpy(c.data, m->data, 24);
    wr64(c.data + 16, m->n_kv + 2);
    memcpy(c.data + 24, kvs, 64);
    memcpy(c.data + 88, m->data + 24, m->size - 24);

    char err[512];
    xllm_gguf *g = NULL;
    if (xllm_gguf_parse(c.data, c.size, &g, err, sizeof(err)) != XLLM_OK) {
        print_error("%s with general.alignment 32: %s\n", base_name(m->path), err);
        fail();
    }
    assert_int_equal(g->alignment, 32);
    assert_int_equal(g->data_offset, m->data_off + 64);
    assert_int_equal(g->n_tensors, m->n_tensors);
    if (g->n_tensors) {
        assert_int_equal(g->tensors[0].offset, m->t[0].offset);
        assert_memory_equal(g->tensors[0].data, m->data + m->data_off + m->t[0].offset,
                            m->t[0].n_bytes < 256 ? m->t[0].n_bytes : 256);
    }
    xllm_gguf_free(g);

    patch32(&c, "alignment 0", val_off, 0,
            "gguf: general.alignment 0 must be a uint32 power of two", NULL, NULL);
    patch32(&c, "alignment 48", val_off, 48,
            "gguf: general.alignment 48 must be a uint32 power of two", NULL, NULL);
    patch32(&c, "alignment 2^31+1", val_off, 0x80000001u, "gguf: general.alignment 2147483649",
            "power of two", NULL);
    patch32(&c, "alignment as int32", val_off - 4, XLLM_GGUF_INT32, "gguf: general.alignment",
            "must be a uint32", NULL);
    free(c.data);
}

static void test_corruptions(void **state) {
    (void)state;
    assert_true(g_n_models >= 2);
    for (int i = 0; i < g_n_models; i++) {
        model *m = &g_models[i];
        corrupt_header(m);
        corrupt_metadata(m);
        corrupt_tensor_infos(m);
        corrupt_alignment(m);
        /* every patch was undone: the file parses again */
        xllm_gguf *g = NULL;
        char err[512];
        assert_int_equal(xllm_gguf_parse(m->data, m->size, &g, err, sizeof(err)), XLLM_OK);
        xllm_gguf_free(g);
    }
}

/* ---------------------------------------------------------------------------------------- */
/* (c) random byte flips                                                                      */
/* ---------------------------------------------------------------------------------------- */

static void test_random_flips(void **state) {
    (void)state;
    assert_true(g_n_models >= 2);
    uint64_t rng = 0x5eed0f0f1234abcdull;
    int n_ok = 0, n_err = 0;
    for (int i = 0; i < g_n_models; i++) {
        model *m = &g_models[i];
        /* a few thousand flips in all; fewer on a big header, where each parse is slow */
        int iters = m->data_off > (1u << 20) ? 10 : 200;
        for (int it = 0; it < iters; it++) {
            size_t pos[4];
            uint8_t old[4];
            int k = 1 + (int)(xllm_test_rand_u64(&rng) % 4);
            for (int j = 0; j < k; j++) {
                uint64_t r = xllm_test_rand_u64(&rng);
                size_t span = (r & 15) == 0 ? m->size : m->data_off;
                pos[j] = (size_t)((r >> 8) % span);
                old[j] = m->data[pos[j]];
                switch ((r >> 4) & 3) {
                    case 0:
                        m->data[pos[j]] ^= (uint8_t)(1u << ((r >> 6) & 7));
                        break;
                    case 1:
                        m->data[pos[j]] = 0xFF;
                        break;
                    case 2:
                        m->data[pos[j]] = 0;
                        break;
                    default:
                        m->data[pos[j]] = (uint8_t)(r >> 56);
                        break;
                }
            }
            char err[512] = {0};
            xllm_gguf *g = NULL;
            xllm_status st = xllm_gguf_parse(m->data, m->size, &g, err, sizeof(err));
            if (st == XLLM_OK) {
                n_ok++;
                char buf[64];
                for (uint64_t j = 0; j < g->n_kv; j++)
                    assert_true(xllm_gguf_kv_to_string(&g->kv[j], buf, sizeof(buf)) >= 0);
                for (uint64_t j = 0; j < g->n_tensors; j++) {
                    const xllm_gguf_tensor *t = &g->tensors[j];
                    const uint8_t *p = t->data;
                    assert_true(p >= m->data && p + t->n_bytes <= m->data + m->size);
                }
                xllm_gguf_free(g);
            } else {
                n_err++;
                if (st != XLLM_ERR_FORMAT || g != NULL || strncmp(err, "gguf: ", 6) != 0 ||
                    strlen(err) < 12) {
                    print_error("%s flip %d: status %d, message \"%s\"\n", base_name(m->path), it,
                                st, err);
                    fail();
                }
            }
            for (int j = k - 1; j >= 0; j--) m->data[pos[j]] = old[j];
        }
    }
    /* both outcomes occur: flips in string bodies are accepted, flips in sizes are not */
    assert_true(n_ok > 0);
    assert_true(n_err > 0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_truncations),
        cmocka_unit_test(test_corruptions),
        cmocka_unit_test(test_random_flips),
    };
    const char *filter = getenv("XLLM_TEST_FILTER"); /* e.g. "test_trunc*" */
    if (filter && *filter) cmocka_set_test_filter(filter);
    if (filter && *filter) cmocka_set_test_filter(filter);
    return cmocka_run_group_tests(tests, load_models, free_models);
}
