/* Chat-template values: the arena, lists, dicts, Python-compatible str()/repr() and float
 * formatting, json.dumps as transformers' tojson filter, UTF-8 helpers. */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "template/template-impl.h"

/* ------------------------------------------------------------------------------------------ */
/* Arena                                                                                       */
/* ------------------------------------------------------------------------------------------ */

struct tp_chunk {
    tp_chunk *next;
    size_t size, used;
    _Alignas(16) unsigned char data[];
};

#define TP_CHUNK_MIN (64 * 1024)

void *xllm_template_alloc(tp_arena *a, size_t n) {
    n = (n + 15) & ~(size_t)15;
    if (n == 0) n = 16;
    tp_chunk *c = a->head;
    if (!c || c->size - c->used < n) {
        if (n > a->limit || a->used > a->limit - n)
            xllm_template_fail(a->rt, "memory limit exceeded (%zu bytes)", a->limit);
        size_t size = n > TP_CHUNK_MIN ? n : TP_CHUNK_MIN;
        c = malloc(sizeof(tp_chunk) + size);
        if (!c) xllm_template_fail(a->rt, "out of memory");
        c->size = size;
        c->used = 0;
        c->next = a->head;
        a->head = c;
    }
    void *p = c->data + c->used;
    c->used += n;
    a->used += n;
    memset(p, 0, n);
    return p;
}

void xllm_template_arena_free(tp_arena *a) {
    tp_chunk *c = a->head;
    while (c) {
        tp_chunk *next = c->next;
        free(c);
        c = next;
    }
    a->head = NULL;
    a->used = 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Containers                                                                                  */
/* ------------------------------------------------------------------------------------------ */

tv xllm_template_str_dup(tp_rt *rt, const char *p, size_t n) {
    char *s = xllm_template_alloc(rt->arena, n + 1);
    if (n) memcpy(s, p, n);
    return tv_str(s, n);
}

tv xllm_template_new_list(tp_rt *rt, size_t cap, bool tuple) {
    tv_list *l = xllm_template_alloc(rt->arena, sizeof(tv_list));
    l->cap = cap;
    l->tuple = tuple;
    l->depth = 1;
    if (cap) l->v = xllm_template_alloc(rt->arena, cap * sizeof(tv));
    tv v = {0};
    v.t = TV_LIST;
    v.u.l = l;
    return v;
}

static void note_child(tp_rt *rt, uint32_t *depth, tv v);

void xllm_template_list_push(tp_rt *rt, tv_list *l, tv v) {
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 4;
        tv *nv = xllm_template_alloc(rt->arena, cap * sizeof(tv));
        if (l->n) memcpy(nv, l->v, l->n * sizeof(tv));
        l->v = nv;
        l->cap = cap;
    }
    xllm_template_step(rt);
    note_child(rt, &l->depth, v);
    l->v[l->n++] = v;
}

tv xllm_template_new_dict(tp_rt *rt, size_t cap) {
    tv_dict *d = xllm_template_alloc(rt->arena, sizeof(tv_dict));
    d->cap = cap;
    d->depth = 1;
    if (cap) {
        d->k = xllm_template_alloc(rt->arena, cap * sizeof(tv));
        d->v = xllm_template_alloc(rt->arena, cap * sizeof(tv));
    }
    tv v = {0};
    v.t = TV_DICT;
    v.u.d = d;
    return v;
}

/* Deepest nesting of containers a value may have (JSON input, built lists). */
#define TP_MAX_NESTING 512

static uint32_t child_depth(tv v) {
    if (v.t == TV_LIST) return v.u.l->depth;
    if (v.t == TV_DICT) return v.u.d->depth;
    return 0; /* namespaces compare by identity and are never walked */
}

static void note_child(tp_rt *rt, uint32_t *depth, tv v) {
    uint32_t d = child_depth(v) + 1;
    if (d > *depth) *depth = d;
    if (*depth > TP_MAX_NESTING) xllm_template_fail(rt, "value nested too deeply");
}

static uint64_t mix(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    return x;
}

/* Consistent with xllm_template_equal: equal values hash equal (1 == 1.0 == True). */
static uint64_t hash_tv(tv v) {
    switch (v.t) {
        case TV_STR: {
            uint64_t h = 1469598103934665603ULL;
            for (size_t i = 0; i < v.u.s.n; i++)
                h = (h ^ (unsigned char)v.u.s.p[i]) * 1099511628211ULL;
            return h;
        }
        case TV_INT:
            return mix((uint64_t)v.u.i);
        case TV_BOOL:
            return mix((uint64_t)v.u.b);
        case TV_FLOAT:
            if (v.u.f >= -9.2e18 && v.u.f <= 9.2e18 && v.u.f == (double)(int64_t)v.u.f)
                return mix((uint64_t)(int64_t)v.u.f);
            {
                uint64_t bits;
                memcpy(&bits, &v.u.f, sizeof(bits));
                return mix(bits);
            }
        case TV_LIST:
            if (v.u.l->gen) return mix((uint64_t)(uintptr_t)v.u.l);
            {
                uint64_t h = 7 + v.u.l->n;
                for (size_t i = 0; i < v.u.l->n; i++) h = mix(h * 31 + hash_tv(v.u.l->v[i]));
                return h;
            }
        case TV_DICT:
            return mix(v.u.d->n + 11);
        case TV_NS:
            return mix((uint64_t)(uintptr_t)v.u.d);
        case TV_MACRO:
            return mix((uint64_t)(uintptr_t)v.u.m);
        case TV_LOOP:
            return mix((uint64_t)(uintptr_t)v.u.loop);
        case TV_FUNC:
            return mix(v.fn * 131u + (uint64_t)(uintptr_t)v.u.self);
        default:
            return (uint64_t)v.t;
    }
}

static void idx_insert(tv_dict *d, size_t entry) {
    size_t mask = d->idx_cap - 1, i = (size_t)hash_tv(d->k[entry]) & mask;
    while (d->idx[i]) i = (i + 1) & mask;
    d->idx[i] = (uint32_t)(entry + 1);
}

static void idx_rebuild(tp_rt *rt, tv_dict *d) {
    size_t cap = 64;
    while (cap < d->n * 2 + 2) cap *= 2;
    d->idx = xllm_template_alloc(rt->arena, cap * sizeof(uint32_t));
    d->idx_cap = cap;
    for (size_t i = 0; i < d->n; i++) idx_insert(d, i);
}

tv *xllm_template_dict_get(tp_rt *rt, const tv_dict *d, tv key) {
    if (d->idx) {
        size_t mask = d->idx_cap - 1, i = (size_t)hash_tv(key) & mask;
        for (; d->idx[i]; i = (i + 1) & mask)
            if (xllm_template_equal(rt, d->k[d->idx[i] - 1], key)) return &d->v[d->idx[i] - 1];
        return NULL;
    }
    for (size_t i = 0; i < d->n; i++)
        if (xllm_template_equal(rt, d->k[i], key)) return &d->v[i];
    return NULL;
}

tv *xllm_template_dict_get_str(const tv_dict *d, const char *key, size_t n) {
    if (d->idx) {
        tv k = tv_str(key, n);
        size_t mask = d->idx_cap - 1, i = (size_t)hash_tv(k) & mask;
        for (; d->idx[i]; i = (i + 1) & mask) {
            const tv *e = &d->k[d->idx[i] - 1];
            if (e->t == TV_STR && e->u.s.n == n && !memcmp(e->u.s.p, key, n))
                return &d->v[d->idx[i] - 1];
        }
        return NULL;
    }
    for (size_t i = 0; i < d->n; i++)
        if (d->k[i].t == TV_STR && d->k[i].u.s.n == n && !memcmp(d->k[i].u.s.p, key, n))
            return &d->v[i];
    return NULL;
}

void xllm_template_dict_set(tp_rt *rt, tv_dict *d, tv key, tv v) {
    xllm_template_step(rt);
    note_child(rt, &d->depth, v);
    note_child(rt, &d->depth, key);
    tv *old = xllm_template_dict_get(rt, d, key);
    if (old) {
        *old = v;
        return;
    }
    if (d->n == d->cap) {
        size_t cap = d->cap ? d->cap * 2 : 4;
        tv *nk = xllm_template_alloc(rt->arena, cap * sizeof(tv));
        tv *nv = xllm_template_alloc(rt->arena, cap * sizeof(tv));
        if (d->n) {
            memcpy(nk, d->k, d->n * sizeof(tv));
            memcpy(nv, d->v, d->n * sizeof(tv));
        }
        d->k = nk;
        d->v = nv;
        d->cap = cap;
    }
    if (d->n >= UINT32_MAX - 1) xllm_template_fail(rt, "dict too large");
    d->k[d->n] = key;
    d->v[d->n] = v;
    d->n++;
    if (d->idx && d->n * 2 + 2 <= d->idx_cap)
        idx_insert(d, d->n - 1);
    else if (d->n >= 16)
        idx_rebuild(rt, d);
}

/* ------------------------------------------------------------------------------------------ */
/* Truth, equality, type names                                                                 */
/* ------------------------------------------------------------------------------------------ */

bool xllm_template_truthy(tv v) {
    switch (v.t) {
        case TV_UNDEF:
        case TV_NONE:
            return false;
        case TV_BOOL:
            return v.u.b;
        case TV_INT:
            return v.u.i != 0;
        case TV_FLOAT:
            return v.u.f != 0.0;
        case TV_STR:
            return v.u.s.n != 0;
        case TV_LIST:
            return v.u.l->gen || v.u.l->n != 0;
        case TV_DICT:
            return v.u.d->n != 0;
        default:
            return true;
    }
}

static bool is_num(tv v) {
    return v.t == TV_BOOL || v.t == TV_INT || v.t == TV_FLOAT;
}

static double num_f(tv v) {
    return v.t == TV_FLOAT ? v.u.f : v.t == TV_INT ? (double)v.u.i : (double)v.u.b;
}

bool xllm_template_equal(tp_rt *rt, tv a, tv b) {
    if (is_num(a) && is_num(b)) {
        if (a.t != TV_FLOAT && b.t != TV_FLOAT) {
            int64_t x = a.t == TV_INT ? a.u.i : a.u.b, y = b.t == TV_INT ? b.u.i : b.u.b;
            return x == y;
        }
        return num_f(a) == num_f(b);
    }
    if (a.t != b.t) return false;
    if (a.t == TV_LIST || a.t == TV_DICT) xllm_template_step(rt);
    switch (a.t) {
        case TV_UNDEF:
        case TV_NONE:
            return true;
        case TV_STR:
            return a.u.s.n == b.u.s.n && !memcmp(a.u.s.p, b.u.s.p, a.u.s.n);
        case TV_LIST:
            if (a.u.l->gen || b.u.l->gen) return a.u.l == b.u.l;
            if (a.u.l->tuple != b.u.l->tuple || a.u.l->n != b.u.l->n) return false;
            for (size_t i = 0; i < a.u.l->n; i++)
                if (!xllm_template_equal(rt, a.u.l->v[i], b.u.l->v[i])) return false;
            return true;
        case TV_DICT:
            if (a.u.d->n != b.u.d->n) return false;
            for (size_t i = 0; i < a.u.d->n; i++) {
                tv *o = xllm_template_dict_get(rt, b.u.d, a.u.d->k[i]);
                if (!o || !xllm_template_equal(rt, a.u.d->v[i], *o)) return false;
            }
            return true;
        case TV_NS:
            return a.u.d == b.u.d;
        case TV_MACRO:
            return a.u.m == b.u.m;
        case TV_LOOP:
            return a.u.loop == b.u.loop;
        case TV_FUNC:
            return a.fn == b.fn && a.u.self == b.u.self;
        default:
            return false;
    }
}

const char *xllm_template_type_name(tv v) {
    switch (v.t) {
        case TV_UNDEF:
            return "Undefined";
        case TV_NONE:
            return "NoneType";
        case TV_BOOL:
            return "bool";
        case TV_INT:
            return "int";
        case TV_FLOAT:
            return "float";
        case TV_STR:
            return "str";
        case TV_LIST:
            return v.u.l->gen ? "generator" : v.u.l->tuple ? "tuple" : "list";
        case TV_DICT:
            return "dict";
        case TV_NS:
            return "Namespace";
        case TV_MACRO:
            return "Macro";
        case TV_LOOP:
            return "LoopContext";
        default:
            return "builtin_function_or_method";
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Buffers                                                                                     */
/* ------------------------------------------------------------------------------------------ */

void xllm_template_buf_put(tp_rt *rt, tp_buf *b, const char *p, size_t n) {
    if (n == 0) return;
    xllm_template_step(rt);
    if (n > rt->limits.max_output || rt->out_total > rt->limits.max_output - n)
        xllm_template_fail(rt, "output limit exceeded (%zu bytes)", rt->limits.max_output);
    rt->out_total += n;
    if (b->cap - b->n < n + 1) {
        size_t cap = b->cap ? b->cap : 64;
        while (cap - b->n < n + 1) cap *= 2;
        char *np = xllm_template_alloc(rt->arena, cap);
        if (b->n) memcpy(np, b->p, b->n);
        b->p = np;
        b->cap = cap;
    }
    memcpy(b->p + b->n, p, n);
    b->n += n;
    b->p[b->n] = 0;
}

void xllm_template_buf_putc(tp_rt *rt, tp_buf *b, char c) {
    xllm_template_buf_put(rt, b, &c, 1);
}

void xllm_template_buf_printf(tp_rt *rt, tp_buf *b, const char *fmt, ...) {
    char tmp[256];
    va_list ap;
    va_start(ap, fmt);
    int k = vsnprintf(tmp, sizeof(tmp), fmt, ap);
    va_end(ap);
    if (k < 0) return;
    xllm_template_buf_put(rt, b, tmp, (size_t)k < sizeof(tmp) ? (size_t)k : sizeof(tmp) - 1);
}

/* ------------------------------------------------------------------------------------------ */
/* UTF-8                                                                                       */
/* ------------------------------------------------------------------------------------------ */

size_t xllm_template_utf8_decode(const char *p, size_t n, uint32_t *cp) {
    const unsigned char *s = (const unsigned char *)p;
    unsigned c = s[0];
    size_t len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1;
    if (len > n) len = 1;
    uint32_t v = len == 1 ? c : len == 2 ? (c & 0x1f) : len == 3 ? (c & 0x0f) : (c & 0x07);
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xc0) != 0x80) {
            *cp = c;
            return 1;
        }
        v = (v << 6) | (s[i] & 0x3f);
    }
    *cp = v;
    return len;
}

size_t xllm_template_utf8_len(const char *p, size_t n) {
    size_t k = 0;
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        i += xllm_template_utf8_decode(p + i, n - i, &cp);
        k++;
    }
    return k;
}

size_t xllm_template_utf8_offset(const char *p, size_t n, int64_t idx) {
    size_t i = 0;
    for (int64_t k = 0; k < idx && i < n; k++) {
        uint32_t cp;
        i += xllm_template_utf8_decode(p + i, n - i, &cp);
    }
    return i;
}

bool xllm_template_is_space(uint32_t c) {
    return (c >= 9 && c <= 13) || (c >= 0x1c && c <= 0x20) || c == 0x85 || c == 0xa0 ||
           c == 0x1680 || (c >= 0x2000 && c <= 0x200a) || c == 0x2028 || c == 0x2029 ||
           c == 0x202f || c == 0x205f || c == 0x3000;
}

/* Not printable per Python's str.isprintable (approximation for the common ranges). */
static bool py_unprintable(uint32_t c) {
    return c < 0x20 || (c >= 0x7f && c <= 0xa0) || c == 0xad || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200f) || (c >= 0x2028 && c <= 0x202f) ||
           (c >= 0x205f && c <= 0x206f) || c == 0x3000 || c == 0xfeff ||
           (c >= 0xfff9 && c <= 0xfffb) || (c >= 0xd800 && c <= 0xdfff) ||
           (c >= 0xe000 && c <= 0xf8ff);
}

/* ------------------------------------------------------------------------------------------ */
/* str() / repr()                                                                              */
/* ------------------------------------------------------------------------------------------ */

void xllm_template_float_repr(double f, char *buf, size_t size) {
    if (isnan(f)) {
        snprintf(buf, size, "nan");
        return;
    }
    if (isinf(f)) {
        snprintf(buf, size, f < 0 ? "-inf" : "inf");
        return;
    }
    if (f == 0) {
        snprintf(buf, size, signbit(f) ? "-0.0" : "0.0");
        return;
    }
    char tmp[64];
    int prec = 1;
    for (; prec <= 17; prec++) {
        snprintf(tmp, sizeof(tmp), "%.*e", prec - 1, f);
        if (strtod(tmp, NULL) == f) break;
    }
    /* tmp: [-]d[.ddd]e[+-]XX -> digits and decimal exponent */
    char digits[32];
    int nd = 0;
    const char *p = tmp;
    bool neg = false;
    if (*p == '-') {
        neg = true;
        p++;
    }
    for (; *p && *p != 'e'; p++)
        if (*p >= '0' && *p <= '9') digits[nd++] = *p;
    int exp10 = atoi(p + 1);
    while (nd > 1 && digits[nd - 1] == '0') nd--;
    digits[nd] = 0;
    char out[64];
    size_t o = 0;
    if (neg) out[o++] = '-';
    if (exp10 >= -5 + 1 && exp10 < 16) { /* Python repr: fixed when -4 <= exp < 16 */
        if (exp10 < 0) {
            out[o++] = '0';
            out[o++] = '.';
            for (int i = 0; i < -exp10 - 1; i++) out[o++] = '0';
            for (int i = 0; i < nd; i++) out[o++] = digits[i];
        } else {
            for (int i = 0; i <= exp10; i++) out[o++] = i < nd ? digits[i] : '0';
            out[o++] = '.';
            if (nd > exp10 + 1)
                for (int i = exp10 + 1; i < nd; i++) out[o++] = digits[i];
            else
                out[o++] = '0';
        }
        out[o] = 0;
    } else {
        out[o++] = digits[0];
        if (nd > 1) {
            out[o++] = '.';
            for (int i = 1; i < nd; i++) out[o++] = digits[i];
        }
        snprintf(out + o, sizeof(out) - o, "e%c%02d", exp10 < 0 ? '-' : '+',
                 exp10 < 0 ? -exp10 : exp10);
    }
    snprintf(buf, size, "%s", out);
}

static void repr_str(tp_rt *rt, tp_buf *b, const char *p, size_t n) {
    bool has_sq = memchr(p, '\'', n) != NULL, has_dq = memchr(p, '"', n) != NULL;
    char q = (has_sq && !has_dq) ? '"' : '\'';
    xllm_template_buf_putc(rt, b, q);
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        size_t k = xllm_template_utf8_decode(p + i, n - i, &cp);
        char esc[16];
        if (cp == (uint32_t)q || cp == '\\') {
            esc[0] = '\\';
            esc[1] = (char)cp;
            xllm_template_buf_put(rt, b, esc, 2);
        } else if (cp == '\n') {
            xllm_template_buf_put(rt, b, "\\n", 2);
        } else if (cp == '\r') {
            xllm_template_buf_put(rt, b, "\\r", 2);
        } else if (cp == '\t') {
            xllm_template_buf_put(rt, b, "\\t", 2);
        } else if (py_unprintable(cp)) {
            if (cp < 0x100)
                snprintf(esc, sizeof(esc), "\\x%02x", cp);
            else if (cp < 0x10000)
                snprintf(esc, sizeof(esc), "\\u%04x", cp);
            else
                snprintf(esc, sizeof(esc), "\\U%08x", cp);
            xllm_template_buf_put(rt, b, esc, strlen(esc));
        } else {
            xllm_template_buf_put(rt, b, p + i, k);
        }
        i += k;
    }
    xllm_template_buf_putc(rt, b, q);
}

static void repr_depth(tp_rt *rt, tp_buf *b, tv v, int depth);

static void str_depth(tp_rt *rt, tp_buf *b, tv v, int depth) {
    char tmp[64];
    switch (v.t) {
        case TV_UNDEF:
            return;
        case TV_NONE:
            xllm_template_buf_put(rt, b, "None", 4);
            return;
        case TV_BOOL:
            if (v.u.b)
                xllm_template_buf_put(rt, b, "True", 4);
            else
                xllm_template_buf_put(rt, b, "False", 5);
            return;
        case TV_INT:
            xllm_template_buf_printf(rt, b, "%lld", (long long)v.u.i);
            return;
        case TV_FLOAT:
            xllm_template_float_repr(v.u.f, tmp, sizeof(tmp));
            xllm_template_buf_put(rt, b, tmp, strlen(tmp));
            return;
        case TV_STR:
            xllm_template_buf_put(rt, b, v.u.s.p, v.u.s.n);
            return;
        default:
            repr_depth(rt, b, v, depth);
            return;
    }
}

static void repr_depth(tp_rt *rt, tp_buf *b, tv v, int depth) {
    if (depth > rt->limits.max_depth) xllm_template_fail(rt, "value nested too deeply");
    xllm_template_step(rt);
    switch (v.t) {
        case TV_STR:
            repr_str(rt, b, v.u.s.p, v.u.s.n);
            return;
        case TV_LIST: {
            const tv_list *l = v.u.l;
            if (l->gen) {
                xllm_template_buf_put(rt, b, "<generator object>", 18);
                return;
            }
            xllm_template_buf_putc(rt, b, l->tuple ? '(' : '[');
            for (size_t i = 0; i < l->n; i++) {
                if (i) xllm_template_buf_put(rt, b, ", ", 2);
                repr_depth(rt, b, l->v[i], depth + 1);
            }
            if (l->tuple && l->n == 1) xllm_template_buf_putc(rt, b, ',');
            xllm_template_buf_putc(rt, b, l->tuple ? ')' : ']');
            return;
        }
        case TV_DICT: {
            const tv_dict *d = v.u.d;
            xllm_template_buf_putc(rt, b, '{');
            for (size_t i = 0; i < d->n; i++) {
                if (i) xllm_template_buf_put(rt, b, ", ", 2);
                repr_depth(rt, b, d->k[i], depth + 1);
                xllm_template_buf_put(rt, b, ": ", 2);
                repr_depth(rt, b, d->v[i], depth + 1);
            }
            xllm_template_buf_putc(rt, b, '}');
            return;
        }
        case TV_UNDEF:
            return; /* Undefined's repr is "Undefined"; str "" suffices here */
        case TV_NS:
            xllm_template_buf_put(rt, b, "<Namespace>", 11);
            return;
        case TV_MACRO:
            xllm_template_buf_put(rt, b, "<Macro>", 7);
            return;
        case TV_LOOP:
            xllm_template_buf_put(rt, b, "<LoopContext>", 13);
            return;
        case TV_FUNC:
            xllm_template_buf_put(rt, b, "<built-in function>", 19);
            return;
        default:
            str_depth(rt, b, v, depth);
            return;
    }
}

void xllm_template_str_of(tp_rt *rt, tp_buf *b, tv v) {
    str_depth(rt, b, v, 0);
}

void xllm_template_repr_of(tp_rt *rt, tp_buf *b, tv v) {
    repr_depth(rt, b, v, 0);
}

tv xllm_template_to_str(tp_rt *rt, tv v) {
    if (v.t == TV_STR) return v;
    if (v.t == TV_UNDEF) return tv_str("", 0);
    tp_buf b = {0};
    size_t saved = rt->out_total;
    xllm_template_str_of(rt, &b, v);
    rt->out_total = saved; /* scratch text does not count as output */
    return tv_str(b.p ? b.p : "", b.n);
}

/* ------------------------------------------------------------------------------------------ */
/* JSON (Python json.dumps with ensure_ascii=False)                                            */
/* ------------------------------------------------------------------------------------------ */

static void json_str(tp_rt *rt, tp_buf *b, const char *p, size_t n, bool ascii) {
    xllm_template_buf_putc(rt, b, '"');
    size_t run = 0;
    for (size_t i = 0; i < n;) {
        unsigned char c = (unsigned char)p[i];
        const char *esc = NULL;
        char tmp[16];
        size_t k = 1;
        if (c == '"')
            esc = "\\\"";
        else if (c == '\\')
            esc = "\\\\";
        else if (c == '\n')
            esc = "\\n";
        else if (c == '\r')
            esc = "\\r";
        else if (c == '\t')
            esc = "\\t";
        else if (c == '\b')
            esc = "\\b";
        else if (c == '\f')
            esc = "\\f";
        else if (c < 0x20 || (ascii && c == 0x7f)) {
            snprintf(tmp, sizeof(tmp), "\\u%04x", c);
            esc = tmp;
        } else if (ascii && c >= 0x80) {
            uint32_t cp;
            k = xllm_template_utf8_decode(p + i, n - i, &cp);
            if (cp >= 0x10000) {
                uint32_t v = cp - 0x10000;
                snprintf(tmp, sizeof(tmp), "\\u%04x\\u%04x", 0xd800 + (v >> 10),
                         0xdc00 + (v & 0x3ff));
            } else {
                snprintf(tmp, sizeof(tmp), "\\u%04x", cp);
            }
            esc = tmp;
        }
        if (esc) {
            xllm_template_buf_put(rt, b, p + run, i - run);
            xllm_template_buf_put(rt, b, esc, strlen(esc));
            run = i + k;
        }
        i += k;
    }
    xllm_template_buf_put(rt, b, p + run, n - run);
    xllm_template_buf_putc(rt, b, '"');
}

static void json_newline(tp_rt *rt, tp_buf *b, const char *indent, size_t indent_n, int level) {
    xllm_template_buf_putc(rt, b, '\n');
    for (int i = 0; i < level; i++) xllm_template_buf_put(rt, b, indent, indent_n);
}

static void json_scalar(tp_rt *rt, tp_buf *b, tv v, bool key, bool ascii) {
    char tmp[64];
    switch (v.t) {
        case TV_NONE:
            xllm_template_buf_put(rt, b, key ? "\"null\"" : "null", key ? 6 : 4);
            return;
        case TV_BOOL:
            if (key) xllm_template_buf_putc(rt, b, '"');
            if (v.u.b)
                xllm_template_buf_put(rt, b, "true", 4);
            else
                xllm_template_buf_put(rt, b, "false", 5);
            if (key) xllm_template_buf_putc(rt, b, '"');
            return;
        case TV_INT:
            xllm_template_buf_printf(rt, b, key ? "\"%lld\"" : "%lld", (long long)v.u.i);
            return;
        case TV_FLOAT:
            if (isnan(v.u.f))
                snprintf(tmp, sizeof(tmp), "NaN");
            else if (isinf(v.u.f))
                snprintf(tmp, sizeof(tmp), v.u.f < 0 ? "-Infinity" : "Infinity");
            else
                xllm_template_float_repr(v.u.f, tmp, sizeof(tmp));
            if (key) xllm_template_buf_putc(rt, b, '"');
            xllm_template_buf_put(rt, b, tmp, strlen(tmp));
            if (key) xllm_template_buf_putc(rt, b, '"');
            return;
        case TV_STR:
            json_str(rt, b, v.u.s.p, v.u.s.n, ascii);
            return;
        default:
            if (key)
                xllm_template_fail(rt, "keys must be str, int, float, bool or None, not %s",
                                   xllm_template_type_name(v));
            xllm_template_fail(rt, "Object of type %s is not JSON serializable",
                               xllm_template_type_name(v));
    }
}

static int key_cmp(const void *a, const void *b) {
    const tv *x = *(const tv *const *)a, *y = *(const tv *const *)b;
    size_t n = x->u.s.n < y->u.s.n ? x->u.s.n : y->u.s.n;
    int c = memcmp(x->u.s.p, y->u.s.p, n);
    if (c) return c;
    return x->u.s.n < y->u.s.n ? -1 : x->u.s.n > y->u.s.n;
}

void xllm_template_json(tp_rt *rt, tp_buf *b, tv v, const tp_json_opts *o, int depth) {
    if (depth > rt->limits.max_depth) xllm_template_fail(rt, "value nested too deeply for tojson");
    xllm_template_step(rt);
    const char *item_sep = o->item_sep ? o->item_sep : o->has_indent ? "," : ", ";
    size_t item_sep_n = o->item_sep ? o->item_sep_n : strlen(item_sep);
    const char *key_sep = o->key_sep ? o->key_sep : ": ";
    size_t key_sep_n = o->key_sep ? o->key_sep_n : 2;
    if (v.t == TV_LIST && !v.u.l->gen) {
        const tv_list *l = v.u.l;
        if (l->n == 0) {
            xllm_template_buf_put(rt, b, "[]", 2);
            return;
        }
        xllm_template_buf_putc(rt, b, '[');
        for (size_t i = 0; i < l->n; i++) {
            if (i) xllm_template_buf_put(rt, b, item_sep, item_sep_n);
            if (o->has_indent) json_newline(rt, b, o->indent, o->indent_n, depth + 1);
            xllm_template_json(rt, b, l->v[i], o, depth + 1);
        }
        if (o->has_indent) json_newline(rt, b, o->indent, o->indent_n, depth);
        xllm_template_buf_putc(rt, b, ']');
    } else if (v.t == TV_DICT) {
        const tv_dict *d = v.u.d;
        if (d->n == 0) {
            xllm_template_buf_put(rt, b, "{}", 2);
            return;
        }
        size_t *order = xllm_template_alloc(rt->arena, d->n * sizeof(size_t));
        for (size_t i = 0; i < d->n; i++) order[i] = i;
        if (o->sort_keys) {
            const tv **keys = xllm_template_alloc(rt->arena, d->n * sizeof(tv *));
            for (size_t i = 0; i < d->n; i++) {
                if (d->k[i].t != TV_STR)
                    xllm_template_fail(rt, "tojson(sort_keys=true) needs string keys");
                keys[i] = &d->k[i];
            }
            qsort(keys, d->n, sizeof(tv *), key_cmp);
            for (size_t i = 0; i < d->n; i++) order[i] = (size_t)(keys[i] - d->k);
        }
        xllm_template_buf_putc(rt, b, '{');
        for (size_t j = 0; j < d->n; j++) {
            size_t i = order[j];
            if (j) xllm_template_buf_put(rt, b, item_sep, item_sep_n);
            if (o->has_indent) json_newline(rt, b, o->indent, o->indent_n, depth + 1);
            json_scalar(rt, b, d->k[i], true, o->ensure_ascii);
            xllm_template_buf_put(rt, b, key_sep, key_sep_n);
            xllm_template_json(rt, b, d->v[i], o, depth + 1);
        }
        if (o->has_indent) json_newline(rt, b, o->indent, o->indent_n, depth);
        xllm_template_buf_putc(rt, b, '}');
    } else {
        json_scalar(rt, b, v, false, o->ensure_ascii);
    }
}
