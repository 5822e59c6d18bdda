/* GGUF reader: parses header, metadata and tensor infos of a mapped file with every read
 * bounds-checked, so corrupt input yields an error naming the field and never a crash. */
#include "gguf/gguf.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "compute/dtype.h"
#include "util/common.h"

/* ---------------------------------------------------------------------------------------- */
/* Bounds-checked cursor                                                                     */
/* ---------------------------------------------------------------------------------------- */

typedef struct cursor {
    const uint8_t *p;
    size_t size;
    size_t off;
    char *err;
    size_t err_size;
    char where[160]; /* what is being read, for error messages */
} cursor;

static bool fail(cursor *c, const char *fmt, const char *field, uint64_t value) {
    char msg[256];
    snprintf(msg, sizeof(msg), fmt, field, value);
    xllm_set_err(c->err, c->err_size, "gguf: %s%s%s", c->where, c->where[0] ? ": " : "", msg);
    return false;
}

static bool need(cursor *c, uint64_t n, const char *field) {
    if (n > c->size - c->off) {
        char msg[256];
        snprintf(msg, sizeof(msg),
                 "file truncated reading %s at offset %zu (needs %" PRIu64 " bytes, %zu left)",
                 field, c->off, n, c->size - c->off);
        xllm_set_err(c->err, c->err_size, "gguf: %s%s%s", c->where, c->where[0] ? ": " : "", msg);
        return false;
    }
    return true;
}

static bool rd(cursor *c, void *dst, size_t n, const char *field) {
    if (!need(c, n, field)) return false;
    memcpy(dst, c->p + c->off, n);
    c->off += n;
    return true;
}

static bool rd_u32(cursor *c, uint32_t *v, const char *field) {
    return rd(c, v, 4, field);
}
static bool rd_u64(cursor *c, uint64_t *v, const char *field) {
    return rd(c, v, 8, field);
}

/* Reads a length-prefixed string, returns a pointer into the file. */
static bool rd_str(cursor *c, xllm_gguf_str *s, const char *field) {
    char lenfield[96];
    snprintf(lenfield, sizeof(lenfield), "%s length", field);
    uint64_t len;
    if (!rd_u64(c, &len, lenfield)) return false;
    if (len > c->size - c->off)
        return fail(c, "%s is %" PRIu64 " bytes, longer than the rest of the file", field, len);
    s->ptr = (const char *)(c->p + c->off);
    s->len = len;
    c->off += len;
    return true;
}

static char *str_dup(xllm_gguf_str s) {
    size_t n = strnlen(s.ptr, s.len);
    char *d = xllm_xmalloc(n + 1);
    memcpy(d, s.ptr, n);
    d[n] = 0;
    return d;
}

size_t xllm_gguf_type_size(xllm_gguf_type t) {
    switch (t) {
        case XLLM_GGUF_UINT8:
        case XLLM_GGUF_INT8:
        case XLLM_GGUF_BOOL:
            return 1;
        case XLLM_GGUF_UINT16:
        case XLLM_GGUF_INT16:
            return 2;
        case XLLM_GGUF_UINT32:
        case XLLM_GGUF_INT32:
        case XLLM_GGUF_FLOAT32:
            return 4;
        case XLLM_GGUF_UINT64:
        case XLLM_GGUF_INT64:
        case XLLM_GGUF_FLOAT64:
            return 8;
        default:
            return 0;
    }
}

const char *xllm_gguf_type_name(xllm_gguf_type t) {
    static const char *names[] = {"uint8",  "int8",    "uint16", "int16",  "uint32",
                                  "int32",  "float32", "bool",   "string", "array",
                                  "uint64", "int64",   "float64"};
    if ((unsigned)t < XLLM_GGUF_TYPE_COUNT) return names[t];
    return "?";
}

/* Decodes one scalar from raw little-endian bytes into the kv's union. */
static void decode_scalar(xllm_gguf_type t, const uint8_t *src, xllm_gguf_kv *kv) {
    switch (t) {
        case XLLM_GGUF_UINT8:
            kv->v.u = src[0];
            break;
        case XLLM_GGUF_BOOL:
            kv->v.u = src[0] != 0;
            break;
        case XLLM_GGUF_INT8:
            kv->v.i = (int8_t)src[0];
            break;
        case XLLM_GGUF_UINT16: {
            uint16_t x;
            memcpy(&x, src, 2);
            kv->v.u = x;
        } break;
        case XLLM_GGUF_INT16: {
            int16_t x;
            memcpy(&x, src, 2);
            kv->v.i = x;
        } break;
        case XLLM_GGUF_UINT32: {
            uint32_t x;
            memcpy(&x, src, 4);
            kv->v.u = x;
        } break;
        case XLLM_GGUF_INT32: {
            int32_t x;
            memcpy(&x, src, 4);
            kv->v.i = x;
        } break;
        case XLLM_GGUF_FLOAT32: {
            float x;
            memcpy(&x, src, 4);
            kv->v.f = x;
        } break;
        case XLLM_GGUF_UINT64:
            memcpy(&kv->v.u, src, 8);
            break;
        case XLLM_GGUF_INT64:
            memcpy(&kv->v.i, src, 8);
            break;
        case XLLM_GGUF_FLOAT64:
            memcpy(&kv->v.f, src, 8);
            break;
        default:
            break;
    }
}

/* ---------------------------------------------------------------------------------------- */
/* Parsing                                                                                   */
/* ---------------------------------------------------------------------------------------- */

static bool parse_kv(cursor *c, xllm_gguf_kv *kv) {
    xllm_gguf_str key;
    if (!rd_str(c, &key, "key")) return false;
    kv->key = str_dup(key);
    snprintf(c->where, sizeof(c->where), "metadata '%.100s'", kv->key);

    uint32_t t;
    if (!rd_u32(c, &t, "value type")) return false;
    if (t >= XLLM_GGUF_TYPE_COUNT)
        return fail(c, "%s %" PRIu64 " is not a GGUF type", "value type", t);
    kv->type = (xllm_gguf_type)t;

    if (kv->type == XLLM_GGUF_STRING) {
        xllm_gguf_str s;
        if (!rd_str(c, &s, "string value")) return false;
        kv->str = str_dup(s);
        return true;
    }
    if (kv->type != XLLM_GGUF_ARRAY) {
        size_t n = xllm_gguf_type_size(kv->type);
        if (!need(c, n, "value")) return false;
        decode_scalar(kv->type, c->p + c->off, kv);
        c->off += n;
        return true;
    }

    uint32_t et;
    if (!rd_u32(c, &et, "array element type")) return false;
    if (et >= XLLM_GGUF_TYPE_COUNT || et == XLLM_GGUF_ARRAY)
        return fail(c, "%s %" PRIu64 " is not a valid array element type", "array element type",
                    et);
    kv->arr_type = (xllm_gguf_type)et;
    if (!rd_u64(c, &kv->arr_n, "array count")) return false;
    kv->arr_data = c->p + c->off;
    if (kv->arr_type == XLLM_GGUF_STRING) {
        /* every string needs at least its 8-byte length */
        if (kv->arr_n > (c->size - c->off) / 8)
            return fail(c, "%s %" PRIu64 " is larger than the rest of the file allows",
                        "array count", kv->arr_n);
        kv->arr_strs = malloc(kv->arr_n ? kv->arr_n * sizeof(xllm_gguf_str) : 1);
        if (!kv->arr_strs)
            return fail(c, "%s %" PRIu64 ": out of memory", "array count", kv->arr_n);
        for (uint64_t i = 0; i < kv->arr_n; i++) {
            if (!rd_str(c, &kv->arr_strs[i], "array string")) return false;
        }
        return true;
    }
    size_t es = xllm_gguf_type_size(kv->arr_type);
    if (kv->arr_n > (c->size - c->off) / es)
        return fail(c, "%s %" PRIu64 " is larger than the rest of the file allows", "array count",
                    kv->arr_n);
    c->off += kv->arr_n * es;
    return true;
}

static bool parse_tensor_info(cursor *c, uint64_t idx, xllm_gguf_tensor *t) {
    snprintf(c->where, sizeof(c->where), "tensor %" PRIu64, idx);
    xllm_gguf_str name;
    if (!rd_str(c, &name, "name")) return false;
    t->name = str_dup(name);
    snprintf(c->where, sizeof(c->where), "tensor %" PRIu64 " '%.100s'", idx, t->name);
    if (!rd_u32(c, &t->n_dims, "n_dims")) return false;
    if (t->n_dims < 1 || t->n_dims > XLLM_GGUF_MAX_DIMS)
        return fail(c, "%s %" PRIu64 " is out of range 1..4", "n_dims", t->n_dims);
    for (int d = 0; d < XLLM_GGUF_MAX_DIMS; d++) t->ne[d] = 1;
    for (uint32_t d = 0; d < t->n_dims; d++) {
        uint64_t ne;
        if (!rd_u64(c, &ne, "dimension")) return false;
        if (ne == 0 || ne > (UINT64_C(1) << 40))
            return fail(c, "%s %" PRIu64 " is out of range", "dimension", ne);
        t->ne[d] = (int64_t)ne;
    }
    uint32_t type;
    if (!rd_u32(c, &type, "type")) return false;
    /* range-check before converting to the enum: a raw id may be any uint32 */
    const xllm_dtype_traits *tr =
        type < XLLM_DTYPE_COUNT ? xllm_dtype_get_traits((xllm_dtype)type) : NULL;
    if (!tr) return fail(c, "%s %" PRIu64 " is not a supported tensor type", "type", type);
    t->type = (xllm_dtype)type;
    if (t->ne[0] % tr->block_size != 0)
        return fail(c, "%s %" PRIu64 " is not a multiple of the type's block size",
                    "row length ne[0]", (uint64_t)t->ne[0]);
    /* element count, overflow-checked (each ne <= 2^40, but the product may not be) */
    uint64_t rows = 1;
    for (int d = 1; d < XLLM_GGUF_MAX_DIMS; d++) {
        if (rows > UINT64_MAX / (uint64_t)t->ne[d])
            return fail(c, "%s overflow (%" PRIu64 ")", "element count", rows);
        rows *= (uint64_t)t->ne[d];
    }
    uint64_t row_bytes = xllm_dtype_row_bytes(t->type, t->ne[0]);
    if (row_bytes == 0 || rows > UINT64_MAX / row_bytes)
        return fail(c, "%s overflow (%" PRIu64 " rows)", "data size", rows);
    t->n_bytes = rows * row_bytes;
    if (!rd_u64(c, &t->offset, "data offset")) return false;
    return true;
}

/* Orders tensor indices by name, then by index. */
static int cmp_tensor_name(const void *a, const void *b, void *arg) {
    const xllm_gguf_tensor *t = arg;
    uint64_t ia = *(const uint64_t *)a, ib = *(const uint64_t *)b;
    int c = strcmp(t[ia].name, t[ib].name);
    if (c) return c;
    return ia < ib ? -1 : ia > ib;
}

static void gguf_free_contents(xllm_gguf *g) {
    if (g->kv) {
        for (uint64_t i = 0; i < g->n_kv; i++) {
            free(g->kv[i].key);
            free(g->kv[i].str);
            free(g->kv[i].arr_strs);
        }
        free(g->kv);
    }
    if (g->tensors) {
        for (uint64_t i = 0; i < g->n_tensors; i++) free(g->tensors[i].name);
        free(g->tensors);
    }
}

static bool parse(xllm_gguf *g, char *err, size_t err_size) {
    cursor c = {.p = g->base, .size = g->size, .err = err, .err_size = err_size};
    uint32_t magic;
    if (!rd_u32(&c, &magic, "magic")) return false;
    if (magic != XLLM_GGUF_MAGIC) return fail(&c, "%s 0x%08" PRIx64 " is not GGUF", "magic", magic);
    if (!rd_u32(&c, &g->version, "version")) return false;
    if (g->version < 2 || g->version > 3)
        return fail(&c, "%s %" PRIu64 " is not supported (only 2 and 3)", "version", g->version);
    uint64_t n_tensors, n_kv;
    if (!rd_u64(&c, &n_tensors, "tensor count")) return false;
    if (!rd_u64(&c, &n_kv, "metadata count")) return false;
    /* each kv needs >= 8 (key len) + 4 (type) + 1 bytes; each tensor info >= 8+4+8+4+8 */
    if (n_kv > (c.size - c.off) / 13)
        return fail(&c, "%s %" PRIu64 " is larger than the file allows", "metadata count", n_kv);
    if (n_tensors > (c.size - c.off) / 32)
        return fail(&c, "%s %" PRIu64 " is larger than the file allows", "tensor count", n_tensors);

    g->kv = calloc(n_kv ? n_kv : 1, sizeof(*g->kv));
    g->tensors = calloc(n_tensors ? n_tensors : 1, sizeof(*g->tensors));
    if (!g->kv || !g->tensors) return fail(&c, "%s %" PRIu64 ": out of memory", "count", n_kv);
    for (uint64_t i = 0; i < n_kv; i++) {
        g->n_kv = i + 1; /* so that a failure frees what was parsed */
        snprintf(c.where, sizeof(c.where), "metadata %" PRIu64, i);
        if (!parse_kv(&c, &g->kv[i])) return false;
    }
    c.where[0] = 0;

    g->alignment = XLLM_GGUF_DEFAULT_ALIGNMENT;
    const xllm_gguf_kv *al = xllm_gguf_find(g, "general.alignment");
    if (al) {
        if (al->type != XLLM_GGUF_UINT32 || al->v.u == 0 || (al->v.u & (al->v.u - 1)) != 0)
            return fail(&c, "%s %" PRIu64 " must be a uint32 power of two", "general.alignment",
                        al->type == XLLM_GGUF_UINT32 ? al->v.u : 0);
        g->alignment = al->v.u;
    }

    for (uint64_t i = 0; i < n_tensors; i++) {
        g->n_tensors = i + 1;
        if (!parse_tensor_info(&c, i, &g->tensors[i])) return false;
    }
    c.where[0] = 0;

    uint64_t data_off = (c.off + g->alignment - 1) / g->alignment * g->alignment;
    if (n_tensors > 0 && data_off > c.size)
        return fail(&c, "%s %" PRIu64 " is past the end of the file", "data section offset",
                    data_off);
    g->data_offset = data_off;
    /* duplicate names, found by sorting (n log n): the earliest tensor that repeats a name */
    uint64_t dup_first = 0, dup_second = UINT64_MAX;
    if (n_tensors > 1) {
        uint64_t *order = malloc(n_tensors * sizeof(uint64_t));
        if (!order) return fail(&c, "%s %" PRIu64 ": out of memory", "tensor count", n_tensors);
        for (uint64_t i = 0; i < n_tensors; i++) order[i] = i;
        qsort_r(order, n_tensors, sizeof(uint64_t), cmp_tensor_name, g->tensors);
        for (uint64_t k = 1; k < n_tensors; k++) {
            /* within a run of equal names, order[] is by index: the run's first two */
            if (!strcmp(g->tensors[order[k]].name, g->tensors[order[k - 1]].name) &&
                (k < 2 || strcmp(g->tensors[order[k - 1]].name, g->tensors[order[k - 2]].name)) &&
                order[k] < dup_second) {
                dup_second = order[k];
                dup_first = order[k - 1];
            }
        }
        free(order);
    }
    uint64_t data_size = c.size > data_off ? c.size - data_off : 0;
    for (uint64_t i = 0; i < n_tensors; i++) {
        xllm_gguf_tensor *t = &g->tensors[i];
        snprintf(c.where, sizeof(c.where), "tensor %" PRIu64 " '%.100s'", i, t->name);
        if (t->offset % g->alignment != 0)
            return fail(&c, "%s %" PRIu64 " is not aligned", "data offset", t->offset);
        if (t->offset > data_size || t->n_bytes > data_size - t->offset)
            return fail(&c, "%s %" PRIu64 " plus the tensor's size runs past the end of the file",
                        "data offset", t->offset);
        t->data = g->base + data_off + t->offset;
        if (i == dup_second)
            return fail(&c, "%s appears twice (first at index %" PRIu64 ")", "name", dup_first);
    }
    return true;
}

xllm_status xllm_gguf_parse(const void *data, size_t size, xllm_gguf **out, char *err,
                            size_t err_size) {
    *out = NULL;
    xllm_gguf *g = xllm_xcalloc(1, sizeof(*g));
    g->base = data;
    g->size = size;
    if (!parse(g, err, err_size)) {
        gguf_free_contents(g);
        free(g);
        return XLLM_ERR_FORMAT;
    }
    *out = g;
    return XLLM_OK;
}

xllm_status xllm_gguf_open(const char *path, xllm_gguf **out, char *err, size_t err_size) {
    *out = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        xllm_set_err(err, err_size, "%s: %s", path, strerror(errno));
        return XLLM_ERR_IO;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        xllm_set_err(err, err_size, "%s: not a regular file", path);
        close(fd);
        return XLLM_ERR_IO;
    }
    size_t size = (size_t)st.st_size;
    if (size == 0) {
        xllm_set_err(err, err_size, "%s: gguf: file truncated reading magic (empty file)", path);
        close(fd);
        return XLLM_ERR_FORMAT;
    }
    void *map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (map == MAP_FAILED) {
        xllm_set_err(err, err_size, "%s: mmap: %s", path, strerror(errno));
        return XLLM_ERR_IO;
    }
    char msg[512] = {0};
    xllm_status st2 = xllm_gguf_parse(map, size, out, msg, sizeof(msg));
    if (st2 != XLLM_OK) {
        xllm_set_err(err, err_size, "%s: %s", path, msg);
        munmap(map, size);
        return st2;
    }
    (*out)->mapped = true;
    return XLLM_OK;
}

void xllm_gguf_free(xllm_gguf *g) {
    if (!g) return;
    gguf_free_contents(g);
    if (g->mapped) munmap((void *)g->base, g->size);
    free(g);
}

/* ---------------------------------------------------------------------------------------- */
/* Lookups                                                                                   */
/* ---------------------------------------------------------------------------------------- */

const xllm_gguf_kv *xllm_gguf_find(const xllm_gguf *g, const char *key) {
    for (uint64_t i = 0; i < g->n_kv; i++)
        if (g->kv[i].key && !strcmp(g->kv[i].key, key)) return &g->kv[i];
    return NULL;
}

const xllm_gguf_tensor *xllm_gguf_find_tensor(const xllm_gguf *g, const char *name) {
    for (uint64_t i = 0; i < g->n_tensors; i++)
        if (!strcmp(g->tensors[i].name, name)) return &g->tensors[i];
    return NULL;
}

static bool is_unsigned(xllm_gguf_type t) {
    return t == XLLM_GGUF_UINT8 || t == XLLM_GGUF_UINT16 || t == XLLM_GGUF_UINT32 ||
           t == XLLM_GGUF_UINT64 || t == XLLM_GGUF_BOOL;
}
static bool is_signed(xllm_gguf_type t) {
    return t == XLLM_GGUF_INT8 || t == XLLM_GGUF_INT16 || t == XLLM_GGUF_INT32 ||
           t == XLLM_GGUF_INT64;
}

bool xllm_gguf_get_i64(const xllm_gguf *g, const char *key, int64_t *out) {
    const xllm_gguf_kv *kv = xllm_gguf_find(g, key);
    if (!kv) return false;
    if (is_unsigned(kv->type)) {
        if (kv->v.u > (uint64_t)INT64_MAX) return false;
        *out = (int64_t)kv->v.u;
        return true;
    }
    if (is_signed(kv->type)) {
        *out = kv->v.i;
        return true;
    }
    return false;
}

bool xllm_gguf_get_u32(const xllm_gguf *g, const char *key, uint32_t *out) {
    int64_t v;
    if (!xllm_gguf_get_i64(g, key, &v) || v < 0 || v > (int64_t)UINT32_MAX) return false;
    *out = (uint32_t)v;
    return true;
}

bool xllm_gguf_get_f32(const xllm_gguf *g, const char *key, float *out) {
    const xllm_gguf_kv *kv = xllm_gguf_find(g, key);
    if (!kv || (kv->type != XLLM_GGUF_FLOAT32 && kv->type != XLLM_GGUF_FLOAT64)) return false;
    *out = (float)kv->v.f;
    return true;
}

bool xllm_gguf_get_bool(const xllm_gguf *g, const char *key, bool *out) {
    const xllm_gguf_kv *kv = xllm_gguf_find(g, key);
    if (!kv || kv->type != XLLM_GGUF_BOOL) return false;
    *out = kv->v.u != 0;
    return true;
}

const char *xllm_gguf_get_str(const xllm_gguf *g, const char *key) {
    const xllm_gguf_kv *kv = xllm_gguf_find(g, key);
    if (!kv || kv->type != XLLM_GGUF_STRING) return NULL;
    return kv->str;
}

const xllm_gguf_kv *xllm_gguf_get_arr(const xllm_gguf *g, const char *key,
                                      xllm_gguf_type elem_type) {
    const xllm_gguf_kv *kv = xllm_gguf_find(g, key);
    if (!kv || kv->type != XLLM_GGUF_ARRAY || kv->arr_type != elem_type) return NULL;
    return kv;
}

/* ---------------------------------------------------------------------------------------- */
/* Rendering                                                                                 */
/* ---------------------------------------------------------------------------------------- */

typedef struct sbuf {
    char *buf;
    size_t size;
    size_t len; /* length needed so far */
} sbuf;

static void sb_printf(sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sb_printf(sbuf *b, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    size_t room = b->len < b->size ? b->size - b->len : 0;
    int n = vsnprintf(room ? b->buf + b->len : NULL, room, fmt, ap);
    va_end(ap);
    if (n > 0) b->len += (size_t)n;
}

static void sb_scalar(sbuf *b, const xllm_gguf_kv *kv) {
    if (kv->type == XLLM_GGUF_BOOL)
        sb_printf(b, "%s", kv->v.u ? "true" : "false");
    else if (is_unsigned(kv->type))
        sb_printf(b, "%" PRIu64, kv->v.u);
    else if (is_signed(kv->type))
        sb_printf(b, "%" PRId64, kv->v.i);
    else
        sb_printf(b, "%g", kv->v.f);
}

int xllm_gguf_kv_to_string(const xllm_gguf_kv *kv, char *buf, size_t buf_size) {
    sbuf b = {buf, buf_size, 0};
    if (buf_size) buf[0] = 0;
    if (kv->type == XLLM_GGUF_STRING) {
        sb_printf(&b, "%s", kv->str);
    } else if (kv->type != XLLM_GGUF_ARRAY) {
        sb_scalar(&b, kv);
    } else {
        sb_printf(&b, "[%" PRIu64 " %s", kv->arr_n, xllm_gguf_type_name(kv->arr_type));
        uint64_t show = kv->arr_n < 8 ? kv->arr_n : 8;
        size_t es = xllm_gguf_type_size(kv->arr_type);
        for (uint64_t i = 0; i < show; i++) {
            sb_printf(&b, "%s", i ? ", " : ": ");
            if (kv->arr_type == XLLM_GGUF_STRING) {
                xllm_gguf_str s = kv->arr_strs[i];
                int n = s.len > 40 ? 40 : (int)s.len;
                sb_printf(&b, "'%.*s'", n, s.ptr);
            } else {
                xllm_gguf_kv e = {.type = kv->arr_type};
                decode_scalar(kv->arr_type, (const uint8_t *)kv->arr_data + i * es, &e);
                sb_scalar(&b, &e);
            }
        }
        sb_printf(&b, "%s]", kv->arr_n > show ? ", ..." : "");
    }
    return (int)b.len;
}
