/* Chat-template builtins: jinja2's filters and tests, Python str/dict/list methods, globals
 * (range, namespace, dict, raise_exception, strftime_now), and the sandboxed getattr/getitem. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "template/template-impl.h"

/* ------------------------------------------------------------------------------------------ */
/* Names                                                                                       */
/* ------------------------------------------------------------------------------------------ */

enum {
    FL_ABS,
    FL_ATTR,
    FL_CAPITALIZE,
    FL_COUNT,
    FL_D,
    FL_DEFAULT,
    FL_DICTSORT,
    FL_E,
    FL_ESCAPE,
    FL_FIRST,
    FL_FLOAT,
    FL_FORMAT,
    FL_INDENT,
    FL_INT,
    FL_ITEMS,
    FL_JOIN,
    FL_LAST,
    FL_LENGTH,
    FL_LIST,
    FL_LOWER,
    FL_MAP,
    FL_MAX,
    FL_MIN,
    FL_REJECT,
    FL_REJECTATTR,
    FL_REPLACE,
    FL_REVERSE,
    FL_ROUND,
    FL_SAFE,
    FL_SELECT,
    FL_SELECTATTR,
    FL_SORT,
    FL_STRING,
    FL_SUM,
    FL_TITLE,
    FL_TOJSON,
    FL_TRIM,
    FL_UNIQUE,
    FL_UPPER,
    FL_WORDCOUNT,
    FL_COUNT_
};

static const char *const FILTERS[FL_COUNT_] = {
    "abs",    "attr",   "capitalize", "count",      "d",        "default", "dictsort",
    "e",      "escape", "first",      "float",      "format",   "indent",  "int",
    "items",  "join",   "last",       "length",     "list",     "lower",   "map",
    "max",    "min",    "reject",     "rejectattr", "replace",  "reverse", "round",
    "safe",   "select", "selectattr", "sort",       "string",   "sum",     "title",
    "tojson", "trim",   "unique",     "upper",      "wordcount"};

enum {
    TS_BOOLEAN,
    TS_CALLABLE,
    TS_DEFINED,
    TS_DIVISIBLEBY,
    TS_EQ,
    TS_EQ2,
    TS_EQUALTO,
    TS_EVEN,
    TS_FALSE,
    TS_FLOAT,
    TS_GE,
    TS_GE2,
    TS_GT,
    TS_GT2,
    TS_GREATERTHAN,
    TS_IN,
    TS_INTEGER,
    TS_ITERABLE,
    TS_LE,
    TS_LE2,
    TS_LESSTHAN,
    TS_LOWER,
    TS_LT,
    TS_LT2,
    TS_MAPPING,
    TS_NE,
    TS_NE2,
    TS_NONE,
    TS_NUMBER,
    TS_ODD,
    TS_SAMEAS,
    TS_SEQUENCE,
    TS_STRING,
    TS_TRUE,
    TS_UNDEFINED,
    TS_UPPER,
    TS_COUNT_
};

static const char *const TESTS[TS_COUNT_] = {
    "boolean", "callable", "defined",     "divisibleby", "eq",        "==",
    "equalto", "even",     "false",       "float",       "ge",        ">=",
    "gt",      ">",        "greaterthan", "in",          "integer",   "iterable",
    "le",      "<=",       "lessthan",    "lower",       "lt",        "<",
    "mapping", "ne",       "!=",          "none",        "number",    "odd",
    "sameas",  "sequence", "string",      "true",        "undefined", "upper"};

enum {
    /* globals */
    G_RANGE = 1,
    G_NAMESPACE,
    G_DICT,
    G_RAISE,
    G_STRFTIME,
    G_CYCLE, /* loop.cycle */
    /* str methods */
    M_STARTSWITH,
    M_ENDSWITH,
    M_STRIP,
    M_LSTRIP,
    M_RSTRIP,
    M_SPLIT,
    M_RSPLIT,
    M_UPPER,
    M_LOWER,
    M_TITLE,
    M_CAPITALIZE,
    M_SWAPCASE,
    M_REPLACE,
    M_FIND,
    M_RFIND,
    M_INDEX,
    M_RINDEX,
    M_SCOUNT,
    M_FORMAT,
    M_JOIN,
    M_SPLITLINES,
    M_ISDIGIT,
    M_ISALPHA,
    M_ISALNUM,
    M_ISSPACE,
    M_ISLOWER,
    M_ISUPPER,
    M_REMOVEPREFIX,
    M_REMOVESUFFIX,
    M_STR_OTHER,
    /* dict methods */
    M_GET,
    M_ITEMS,
    M_KEYS,
    M_VALUES,
    M_DCOPY,
    /* list methods */
    M_LCOUNT,
    M_LINDEX,
    M_LCOPY,
};

typedef struct named {
    const char *name;
    int id;
} named;

static const named STR_METHODS[] = {
    {"startswith", M_STARTSWITH},
    {"endswith", M_ENDSWITH},
    {"strip", M_STRIP},
    {"lstrip", M_LSTRIP},
    {"rstrip", M_RSTRIP},
    {"split", M_SPLIT},
    {"rsplit", M_RSPLIT},
    {"upper", M_UPPER},
    {"lower", M_LOWER},
    {"title", M_TITLE},
    {"capitalize", M_CAPITALIZE},
    {"swapcase", M_SWAPCASE},
    {"replace", M_REPLACE},
    {"find", M_FIND},
    {"rfind", M_RFIND},
    {"index", M_INDEX},
    {"rindex", M_RINDEX},
    {"count", M_SCOUNT},
    {"format", M_FORMAT},
    {"join", M_JOIN},
    {"splitlines", M_SPLITLINES},
    {"isdigit", M_ISDIGIT},
    {"isdecimal", M_ISDIGIT},
    {"isnumeric", M_ISDIGIT},
    {"isalpha", M_ISALPHA},
    {"isalnum", M_ISALNUM},
    {"isspace", M_ISSPACE},
    {"islower", M_ISLOWER},
    {"isupper", M_ISUPPER},
    {"removeprefix", M_REMOVEPREFIX},
    {"removesuffix", M_REMOVESUFFIX},
    /* exist in Python, so "is defined" holds, but calling them is not supported */
    {"casefold", M_STR_OTHER},
    {"center", M_STR_OTHER},
    {"encode", M_STR_OTHER},
    {"expandtabs", M_STR_OTHER},
    {"format_map", M_STR_OTHER},
    {"isascii", M_STR_OTHER},
    {"isidentifier", M_STR_OTHER},
    {"isprintable", M_STR_OTHER},
    {"istitle", M_STR_OTHER},
    {"ljust", M_STR_OTHER},
    {"maketrans", M_STR_OTHER},
    {"partition", M_STR_OTHER},
    {"rjust", M_STR_OTHER},
    {"rpartition", M_STR_OTHER},
    {"translate", M_STR_OTHER},
    {"zfill", M_STR_OTHER},
};

static const named DICT_METHODS[] = {
    {"get", M_GET},
    {"items", M_ITEMS},
    {"keys", M_KEYS},
    {"values", M_VALUES},
    {"copy", M_DCOPY},
    /* mutate: the immutable sandbox blocks them */
    {"clear", -1},
    {"pop", -1},
    {"popitem", -1},
    {"setdefault", -1},
    {"update", -1},
    {"fromkeys", -1},
};

static const named LIST_METHODS[] = {
    {"count", M_LCOUNT}, {"index", M_LINDEX}, {"copy", M_LCOPY}, {"append", -1},
    {"clear", -1},       {"extend", -1},      {"insert", -1},    {"pop", -1},
    {"remove", -1},      {"reverse", -1},     {"sort", -1},
};

static int lookup_named(const named *t, size_t n, const char *name, size_t len, bool *found) {
    for (size_t i = 0; i < n; i++)
        if (strlen(t[i].name) == len && !memcmp(t[i].name, name, len)) {
            *found = true;
            return t[i].id;
        }
    *found = false;
    return 0;
}

int xllm_template_filter_id(const char *name) {
    for (int i = 0; i < FL_COUNT_; i++)
        if (!strcmp(FILTERS[i], name)) return i;
    return -1;
}

int xllm_template_test_id(const char *name) {
    for (int i = 0; i < TS_COUNT_; i++)
        if (!strcmp(TESTS[i], name)) return i;
    return -1;
}

static tv mkfunc(tp_rt *rt, int id, const tv *self) {
    tv f = {0};
    f.t = TV_FUNC;
    f.fn = (uint16_t)id;
    if (self) {
        tv *s = xllm_template_alloc(rt->arena, sizeof(tv));
        *s = *self;
        f.u.self = s;
    }
    return f;
}

tv xllm_template_global(const char *name, size_t n) {
    static const named G[] = {{"range", G_RANGE},
                              {"namespace", G_NAMESPACE},
                              {"dict", G_DICT},
                              {"raise_exception", G_RAISE},
                              {"strftime_now", G_STRFTIME}};
    bool found;
    int id = lookup_named(G, sizeof(G) / sizeof(G[0]), name, n, &found);
    if (!found) return tv_undef(NULL);
    tv f = {0};
    f.t = TV_FUNC;
    f.fn = (uint16_t)id;
    return f;
}

/* ------------------------------------------------------------------------------------------ */
/* Arguments                                                                                   */
/* ------------------------------------------------------------------------------------------ */

/* Argument i (positional) or keyword name; NULL when absent. */
static const tv *arg(const tp_args *a, size_t i, const char *name) {
    if (i < a->npos) return &a->pos[i];
    for (size_t k = 0; k < a->nkw; k++)
        if (name && !strcmp(a->kwname[k], name)) return &a->kw[k];
    return NULL;
}

static void max_args(tp_rt *rt, const tp_args *a, size_t n, const char *what) {
    if (a->npos > n) xllm_template_fail(rt, "%s takes at most %zu argument(s)", what, n);
}

static bool arg_bool(const tp_args *a, size_t i, const char *name, bool dflt) {
    const tv *v = arg(a, i, name);
    return v ? xllm_template_truthy(*v) : dflt;
}

static tv need_str(tp_rt *rt, const tv *v, const char *what) {
    if (!v || v->t != TV_STR) {
        if (v && v->t == TV_UNDEF && v->u.s.p)
            xllm_template_fail(rt, "'%s' is undefined", v->u.s.p);
        xllm_template_fail(rt, "%s must be a string", what);
    }
    return *v;
}

static int64_t need_int(tp_rt *rt, const tv *v, const char *what) {
    if (!v || (v->t != TV_INT && v->t != TV_BOOL))
        xllm_template_fail(rt, "%s must be an integer", what);
    return v->t == TV_INT ? v->u.i : v->u.b;
}

/* ------------------------------------------------------------------------------------------ */
/* Case mapping (ASCII, Latin-1, Greek, Cyrillic)                                              */
/* ------------------------------------------------------------------------------------------ */

static uint32_t cp_lower(uint32_t c) {
    if (c >= 'A' && c <= 'Z') return c + 32;
    if (c >= 0xc0 && c <= 0xde && c != 0xd7) return c + 32;
    if (c >= 0x391 && c <= 0x3a9 && c != 0x3a2) return c + 32;
    if (c >= 0x410 && c <= 0x42f) return c + 32;
    if (c >= 0x400 && c <= 0x40f) return c + 80;
    return c;
}

static uint32_t cp_upper(uint32_t c) {
    if (c >= 'a' && c <= 'z') return c - 32;
    if (c >= 0xe0 && c <= 0xfe && c != 0xf7) return c - 32;
    if (c >= 0x3b1 && c <= 0x3c9 && c != 0x3c2) return c - 32;
    if (c >= 0x430 && c <= 0x44f) return c - 32;
    if (c >= 0x450 && c <= 0x45f) return c - 80;
    return c;
}

static bool cp_is_upper(uint32_t c) {
    return cp_lower(c) != c;
}
static bool cp_is_lower(uint32_t c) {
    return cp_upper(c) != c || c == 0xdf;
}
static bool cp_cased(uint32_t c) {
    return cp_is_upper(c) || cp_is_lower(c);
}

static void put_cp(tp_rt *rt, tp_buf *b, uint32_t c) {
    char o[4];
    size_t k;
    if (c < 0x80) {
        o[0] = (char)c;
        k = 1;
    } else if (c < 0x800) {
        o[0] = (char)(0xc0 | (c >> 6));
        o[1] = (char)(0x80 | (c & 0x3f));
        k = 2;
    } else if (c < 0x10000) {
        o[0] = (char)(0xe0 | (c >> 12));
        o[1] = (char)(0x80 | ((c >> 6) & 0x3f));
        o[2] = (char)(0x80 | (c & 0x3f));
        k = 3;
    } else {
        o[0] = (char)(0xf0 | (c >> 18));
        o[1] = (char)(0x80 | ((c >> 12) & 0x3f));
        o[2] = (char)(0x80 | ((c >> 6) & 0x3f));
        o[3] = (char)(0x80 | (c & 0x3f));
        k = 4;
    }
    xllm_template_buf_put(rt, b, o, k);
}

/* A scratch buffer whose bytes do not count as output. */
typedef struct scratch {
    tp_buf b;
    size_t saved;
} scratch;

static void sc_begin(tp_rt *rt, scratch *s) {
    memset(&s->b, 0, sizeof(s->b));
    s->saved = rt->out_total;
}

static tv sc_end(tp_rt *rt, scratch *s) {
    rt->out_total = s->saved;
    return tv_str(s->b.p ? s->b.p : "", s->b.n);
}

enum { CASE_LOWER, CASE_UPPER, CASE_TITLE, CASE_CAPITALIZE, CASE_SWAP, CASE_JTITLE };

static bool jtitle_sep(uint32_t c) {
    return c == '-' || c == '(' || c == '{' || c == '[' || c == '<' || xllm_template_is_space(c);
}

static tv case_map(tp_rt *rt, tv s, int mode) {
    scratch sc;
    sc_begin(rt, &sc);
    bool prev_cased = false, first = true, at_word = true;
    for (size_t i = 0; i < s.u.s.n;) {
        uint32_t c;
        i += xllm_template_utf8_decode(s.u.s.p + i, s.u.s.n - i, &c);
        uint32_t o = c;
        switch (mode) {
            case CASE_LOWER:
                o = cp_lower(c);
                break;
            case CASE_UPPER:
                o = cp_upper(c);
                break;
            case CASE_SWAP:
                o = cp_is_upper(c) ? cp_lower(c) : cp_upper(c);
                break;
            case CASE_CAPITALIZE:
                o = first ? cp_upper(c) : cp_lower(c);
                break;
            case CASE_TITLE:
                o = prev_cased ? cp_lower(c) : cp_upper(c);
                prev_cased = cp_cased(c);
                break;
            case CASE_JTITLE: /* jinja2's title: words split at whitespace and -({[< */
                if (jtitle_sep(c)) {
                    at_word = true;
                } else {
                    o = at_word ? cp_upper(c) : cp_lower(c);
                    at_word = false;
                }
                break;
        }
        first = false;
        put_cp(rt, &sc.b, o);
    }
    tv r = sc_end(rt, &sc);
    r.flag = s.flag;
    return r;
}

/* ------------------------------------------------------------------------------------------ */
/* String helpers                                                                              */
/* ------------------------------------------------------------------------------------------ */

static bool in_chars(uint32_t c, const tv *chars) {
    if (!chars) return xllm_template_is_space(c);
    for (size_t i = 0; i < chars->u.s.n;) {
        uint32_t d;
        i += xllm_template_utf8_decode(chars->u.s.p + i, chars->u.s.n - i, &d);
        if (d == c) return true;
    }
    return false;
}

static tv strip(tp_rt *rt, tv s, const tv *chars, bool left, bool right) {
    if (chars && chars->t == TV_NONE) chars = NULL;
    if (chars) need_str(rt, chars, "strip argument");
    const char *p = s.u.s.p;
    size_t a = 0, b = s.u.s.n;
    if (left)
        while (a < b) {
            uint32_t c;
            size_t k = xllm_template_utf8_decode(p + a, b - a, &c);
            if (!in_chars(c, chars)) break;
            a += k;
        }
    if (right)
        while (b > a) {
            size_t st = b - 1;
            while (st > a && ((unsigned char)p[st] & 0xc0) == 0x80) st--;
            uint32_t c;
            xllm_template_utf8_decode(p + st, b - st, &c);
            if (!in_chars(c, chars)) break;
            b = st;
        }
    tv r = tv_str(p + a, b - a);
    r.flag = s.flag;
    return r;
}

static const char *find_bytes(const char *h, size_t hn, const char *n, size_t nn) {
    if (nn == 0) return h;
    if (nn > hn) return NULL;
    return memmem(h, hn, n, nn);
}

static const char *rfind_bytes(const char *h, size_t hn, const char *n, size_t nn) {
    if (nn > hn) return NULL;
    for (size_t i = hn - nn + 1; i-- > 0;)
        if (!memcmp(h + i, n, nn)) return h + i;
    return NULL;
}

static tv split(tp_rt *rt, tv s, const tv *sepv, const tv *maxv, bool from_right) {
    int64_t maxsplit = -1;
    if (maxv && maxv->t != TV_NONE) maxsplit = need_int(rt, maxv, "maxsplit");
    tv out = xllm_template_new_list(rt, 0, false);
    const char *p = s.u.s.p;
    size_t n = s.u.s.n;
    if (!sepv || sepv->t == TV_NONE) {
        /* runs of whitespace; leading/trailing ignored */
        size_t *starts = xllm_template_alloc(rt->arena, (n + 1) * sizeof(size_t) * 2);
        size_t nw = 0;
        for (size_t i = 0; i < n;) {
            uint32_t c;
            size_t k = xllm_template_utf8_decode(p + i, n - i, &c);
            if (xllm_template_is_space(c)) {
                i += k;
                continue;
            }
            size_t st = i;
            while (i < n) {
                k = xllm_template_utf8_decode(p + i, n - i, &c);
                if (xllm_template_is_space(c)) break;
                i += k;
            }
            starts[2 * nw] = st;
            starts[2 * nw + 1] = i;
            nw++;
        }
        if (maxsplit < 0 || (size_t)maxsplit >= nw) {
            for (size_t w = 0; w < nw; w++)
                xllm_template_list_push(
                    rt, out.u.l, tv_str(p + starts[2 * w], starts[2 * w + 1] - starts[2 * w]));
            return out;
        }
        if (!from_right) {
            for (int64_t w = 0; w < maxsplit; w++)
                xllm_template_list_push(
                    rt, out.u.l, tv_str(p + starts[2 * w], starts[2 * w + 1] - starts[2 * w]));
            tv rest = strip(rt, tv_str(p + starts[2 * maxsplit], n - starts[2 * maxsplit]), NULL,
                            false, true);
            xllm_template_list_push(rt, out.u.l, rest);
        } else {
            size_t first = nw - (size_t)maxsplit;
            tv rest = strip(rt, tv_str(p, starts[2 * first - 1]), NULL, true, false);
            xllm_template_list_push(rt, out.u.l, rest);
            for (size_t w = first; w < nw; w++)
                xllm_template_list_push(
                    rt, out.u.l, tv_str(p + starts[2 * w], starts[2 * w + 1] - starts[2 * w]));
        }
        return out;
    }
    tv sep = need_str(rt, sepv, "separator");
    if (sep.u.s.n == 0) xllm_template_fail(rt, "empty separator");
    if (!from_right) {
        size_t i = 0;
        int64_t k = 0;
        for (;;) {
            const char *f = (maxsplit >= 0 && k >= maxsplit)
                                ? NULL
                                : find_bytes(p + i, n - i, sep.u.s.p, sep.u.s.n);
            if (!f) break;
            xllm_template_list_push(rt, out.u.l, tv_str(p + i, (size_t)(f - (p + i))));
            i = (size_t)(f - p) + sep.u.s.n;
            k++;
        }
        xllm_template_list_push(rt, out.u.l, tv_str(p + i, n - i));
        return out;
    }
    /* rsplit: collect from the right, then reverse */
    tv rev = xllm_template_new_list(rt, 0, false);
    size_t end = n;
    int64_t k = 0;
    for (;;) {
        const char *f =
            (maxsplit >= 0 && k >= maxsplit) ? NULL : rfind_bytes(p, end, sep.u.s.p, sep.u.s.n);
        if (!f) break;
        size_t at = (size_t)(f - p);
        xllm_template_list_push(rt, rev.u.l, tv_str(p + at + sep.u.s.n, end - at - sep.u.s.n));
        end = at;
        k++;
    }
    xllm_template_list_push(rt, rev.u.l, tv_str(p, end));
    for (size_t i = rev.u.l->n; i-- > 0;) xllm_template_list_push(rt, out.u.l, rev.u.l->v[i]);
    return out;
}

static tv replace(tp_rt *rt, tv s, tv old, tv new_, int64_t count) {
    scratch sc;
    sc_begin(rt, &sc);
    const char *p = s.u.s.p;
    size_t n = s.u.s.n, i = 0;
    int64_t k = 0;
    if (old.u.s.n == 0) { /* insert between code points */
        for (;;) {
            if (count >= 0 && k >= count) break;
            xllm_template_buf_put(rt, &sc.b, new_.u.s.p, new_.u.s.n);
            k++;
            if (i >= n) break;
            uint32_t c;
            size_t len = xllm_template_utf8_decode(p + i, n - i, &c);
            xllm_template_buf_put(rt, &sc.b, p + i, len);
            i += len;
        }
        xllm_template_buf_put(rt, &sc.b, p + i, n - i);
        return sc_end(rt, &sc);
    }
    for (;;) {
        const char *f =
            (count >= 0 && k >= count) ? NULL : find_bytes(p + i, n - i, old.u.s.p, old.u.s.n);
        if (!f) break;
        xllm_template_buf_put(rt, &sc.b, p + i, (size_t)(f - (p + i)));
        xllm_template_buf_put(rt, &sc.b, new_.u.s.p, new_.u.s.n);
        i = (size_t)(f - p) + old.u.s.n;
        k++;
    }
    xllm_template_buf_put(rt, &sc.b, p + i, n - i);
    return sc_end(rt, &sc);
}

static bool affix(tp_rt *rt, tv s, const tv *a, bool end) {
    if (!a) xllm_template_fail(rt, "startswith/endswith need an argument");
    if (a->t == TV_LIST && a->u.l->tuple) {
        for (size_t i = 0; i < a->u.l->n; i++)
            if (affix(rt, s, &a->u.l->v[i], end)) return true;
        return false;
    }
    tv x = need_str(rt, a, "startswith/endswith argument");
    if (x.u.s.n > s.u.s.n) return false;
    return !memcmp(end ? s.u.s.p + s.u.s.n - x.u.s.n : s.u.s.p, x.u.s.p, x.u.s.n);
}

static tv join_strs(tp_rt *rt, const tv_list *items, tv sep, bool strict) {
    scratch sc;
    sc_begin(rt, &sc);
    for (size_t i = 0; i < items->n; i++) {
        if (i) xllm_template_buf_put(rt, &sc.b, sep.u.s.p, sep.u.s.n);
        if (strict && items->v[i].t != TV_STR)
            xllm_template_fail(rt, "sequence item %zu: expected str instance, %s found", i,
                               xllm_template_type_name(items->v[i]));
        xllm_template_str_of(rt, &sc.b, items->v[i]);
    }
    return sc_end(rt, &sc);
}

/* str.format with {} / {0} / {name} fields (no format specs). */
static tv str_format(tp_rt *rt, tv fmt, const tp_args *a) {
    scratch sc;
    sc_begin(rt, &sc);
    const char *p = fmt.u.s.p;
    size_t n = fmt.u.s.n, auto_i = 0;
    for (size_t i = 0; i < n; i++) {
        char c = p[i];
        if (c == '{' && i + 1 < n && p[i + 1] == '{') {
            xllm_template_buf_putc(rt, &sc.b, '{');
            i++;
        } else if (c == '}' && i + 1 < n && p[i + 1] == '}') {
            xllm_template_buf_putc(rt, &sc.b, '}');
            i++;
        } else if (c == '{') {
            size_t e = i + 1;
            while (e < n && p[e] != '}') e++;
            if (e >= n) xllm_template_fail(rt, "single '{' encountered in format string");
            const char *f = p + i + 1;
            size_t fn = e - i - 1;
            if (memchr(f, ':', fn) || memchr(f, '!', fn) || memchr(f, '.', fn) ||
                memchr(f, '[', fn))
                xllm_template_fail(rt, "format specs are not supported in str.format");
            const tv *v = NULL;
            if (fn == 0) {
                v = auto_i < a->npos ? &a->pos[auto_i] : NULL;
                auto_i++;
            } else if (f[0] >= '0' && f[0] <= '9') {
                size_t idx = (size_t)strtoul(f, NULL, 10);
                v = idx < a->npos ? &a->pos[idx] : NULL;
            } else {
                for (size_t k = 0; k < a->nkw; k++)
                    if (strlen(a->kwname[k]) == fn && !memcmp(a->kwname[k], f, fn)) v = &a->kw[k];
            }
            if (!v)
                xllm_template_fail(rt, "str.format: missing argument for field '%.*s'", (int)fn, f);
            xllm_template_str_of(rt, &sc.b, *v);
            i = e;
        } else if (c == '}') {
            xllm_template_fail(rt, "single '}' encountered in format string");
        } else {
            xllm_template_buf_putc(rt, &sc.b, c);
        }
    }
    return sc_end(rt, &sc);
}

static int64_t cp_index(const char *p, const char *at) {
    return (int64_t)xllm_template_utf8_len(p, (size_t)(at - p));
}

/* ------------------------------------------------------------------------------------------ */
/* Iteration, attributes, items                                                                */
/* ------------------------------------------------------------------------------------------ */

const tv_list *xllm_template_iter(tp_rt *rt, tv v) {
    switch (v.t) {
        case TV_LIST:
            return v.u.l;
        case TV_UNDEF:
            return xllm_template_new_list(rt, 0, false).u.l;
        case TV_DICT: {
            tv l = xllm_template_new_list(rt, v.u.d->n, false);
            for (size_t i = 0; i < v.u.d->n; i++) xllm_template_list_push(rt, l.u.l, v.u.d->k[i]);
            return l.u.l;
        }
        case TV_STR: {
            tv l = xllm_template_new_list(rt, v.u.s.n, false);
            for (size_t i = 0; i < v.u.s.n;) {
                uint32_t c;
                size_t k = xllm_template_utf8_decode(v.u.s.p + i, v.u.s.n - i, &c);
                xllm_template_list_push(rt, l.u.l, tv_str(v.u.s.p + i, k));
                i += k;
            }
            return l.u.l;
        }
        default:
            xllm_template_fail(rt, "'%s' object is not iterable", xllm_template_type_name(v));
    }
}

static tv gen_of(tv l) {
    l.u.l->gen = true;
    return l;
}

static tv dict_items(tp_rt *rt, const tv_dict *d) {
    tv l = xllm_template_new_list(rt, d->n, false);
    for (size_t i = 0; i < d->n; i++) {
        tv pair = xllm_template_new_list(rt, 2, true);
        xllm_template_list_push(rt, pair.u.l, d->k[i]);
        xllm_template_list_push(rt, pair.u.l, d->v[i]);
        xllm_template_list_push(rt, l.u.l, pair);
    }
    return l;
}

static tv unsafe(const char *name, size_t n, tp_rt *rt) {
    tv u = tv_undef(NULL);
    char *s = xllm_template_alloc(rt->arena, n + 1);
    memcpy(s, name, n);
    u.u.s.p = s;
    u.u.s.n = n;
    u.flag = 1;
    return u;
}

static tv undef_named(tp_rt *rt, const char *name, size_t n) {
    tv u = tv_undef(NULL);
    char *s = xllm_template_alloc(rt->arena, n + 1);
    memcpy(s, name, n);
    u.u.s.p = s;
    u.u.s.n = n;
    return u;
}

tv xllm_template_getattr(tp_rt *rt, tv obj, const char *name, size_t n) {
    bool found;
    int id;
    if (n >= 2 && name[0] == '_' && name[1] == '_') return unsafe(name, n, rt);
    switch (obj.t) {
        case TV_DICT: {
            id = lookup_named(DICT_METHODS, sizeof(DICT_METHODS) / sizeof(DICT_METHODS[0]), name, n,
                              &found);
            if (found) return id < 0 ? unsafe(name, n, rt) : mkfunc(rt, id, &obj);
            tv *v = xllm_template_dict_get_str(obj.u.d, name, n);
            return v ? *v : undef_named(rt, name, n);
        }
        case TV_NS: {
            tv *v = xllm_template_dict_get_str(obj.u.d, name, n);
            return v ? *v : undef_named(rt, name, n);
        }
        case TV_STR:
            id = lookup_named(STR_METHODS, sizeof(STR_METHODS) / sizeof(STR_METHODS[0]), name, n,
                              &found);
            return found ? mkfunc(rt, id, &obj) : undef_named(rt, name, n);
        case TV_LIST:
            if (obj.u.l->gen) return undef_named(rt, name, n);
            id = lookup_named(LIST_METHODS, sizeof(LIST_METHODS) / sizeof(LIST_METHODS[0]), name, n,
                              &found);
            if (found) return id < 0 ? unsafe(name, n, rt) : mkfunc(rt, id, &obj);
            return undef_named(rt, name, n);
        case TV_LOOP: {
            const tp_loop *lp = obj.u.loop;
            int64_t i = lp->index0, len = (int64_t)lp->items->n;
#define IS(s) (n == strlen(s) && !memcmp(name, s, n))
            if (IS("index")) return tv_int(i + 1);
            if (IS("index0")) return tv_int(i);
            if (IS("revindex")) return tv_int(len - i);
            if (IS("revindex0")) return tv_int(len - i - 1);
            if (IS("first")) return tv_bool(i == 0);
            if (IS("last")) return tv_bool(i == len - 1);
            if (IS("length")) return tv_int(len);
            if (IS("depth")) return tv_int(lp->depth0 + 1);
            if (IS("depth0")) return tv_int(lp->depth0);
            if (IS("previtem")) return i > 0 ? lp->items->v[i - 1] : undef_named(rt, name, n);
            if (IS("nextitem")) return i + 1 < len ? lp->items->v[i + 1] : undef_named(rt, name, n);
            if (IS("cycle")) return mkfunc(rt, G_CYCLE, &obj);
#undef IS
            return undef_named(rt, name, n);
        }
        default:
            return undef_named(rt, name, n);
    }
}

tv xllm_template_getitem(tp_rt *rt, tv obj, tv key) {
    switch (obj.t) {
        case TV_DICT: {
            tv *v = xllm_template_dict_get(rt, obj.u.d, key);
            if (v) return *v;
            break;
        }
        case TV_LIST:
            if (obj.u.l->gen) return tv_undef(NULL);
            if (key.t == TV_INT || key.t == TV_BOOL) {
                int64_t i = key.t == TV_INT ? key.u.i : key.u.b, n = (int64_t)obj.u.l->n;
                if (i < 0) i += n;
                if (i >= 0 && i < n) return obj.u.l->v[i];
                return tv_undef(NULL);
            }
            break;
        case TV_STR:
            if (key.t == TV_INT || key.t == TV_BOOL) {
                int64_t i = key.t == TV_INT ? key.u.i : key.u.b;
                int64_t n = (int64_t)xllm_template_utf8_len(obj.u.s.p, obj.u.s.n);
                if (i < 0) i += n;
                if (i < 0 || i >= n) return tv_undef(NULL);
                size_t a = xllm_template_utf8_offset(obj.u.s.p, obj.u.s.n, i);
                uint32_t c;
                size_t k = xllm_template_utf8_decode(obj.u.s.p + a, obj.u.s.n - a, &c);
                return tv_str(obj.u.s.p + a, k);
            }
            break;
        default:
            break;
    }
    if (key.t == TV_STR) return xllm_template_getattr(rt, obj, key.u.s.p, key.u.s.n);
    return tv_undef(NULL);
}

/* jinja2's attribute getter for filters: "a.b.0" walks getitem per part. */
static tv attr_path(tp_rt *rt, tv v, tv path) {
    if (path.t == TV_INT) return xllm_template_getitem(rt, v, path);
    path = need_str(rt, &path, "attribute");
    const char *p = path.u.s.p;
    size_t n = path.u.s.n, i = 0;
    for (;;) {
        size_t e = i;
        while (e < n && p[e] != '.') e++;
        tv part = tv_str(p + i, e - i);
        bool digits = e > i;
        for (size_t k = i; k < e; k++)
            if (p[k] < '0' || p[k] > '9') digits = false;
        if (digits) part = tv_int(strtoll(p + i, NULL, 10));
        if (v.t == TV_UNDEF) xllm_template_fail(rt, "attribute of an undefined value");
        v = xllm_template_getitem(rt, v, part);
        if (e >= n) return v;
        i = e + 1;
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Sorting                                                                                     */
/* ------------------------------------------------------------------------------------------ */

static tv sort_key(tp_rt *rt, tv v, bool case_sensitive) {
    if (!case_sensitive && v.t == TV_STR) return case_map(rt, v, CASE_LOWER);
    return v;
}

/* Stable merge sort of items by keys. */
static void msort(tp_rt *rt, tv *items, tv *keys, size_t n, tv *ti, tv *tk, bool reverse) {
    if (n < 2) return;
    size_t h = n / 2;
    msort(rt, items, keys, h, ti, tk, reverse);
    msort(rt, items + h, keys + h, n - h, ti, tk, reverse);
    size_t i = 0, j = h, o = 0;
    while (i < h && j < n) {
        xllm_template_step(rt);
        int c = xllm_template_order(rt, keys[j], keys[i]);
        bool take_right = reverse ? c > 0 : c < 0;
        if (take_right) {
            ti[o] = items[j];
            tk[o++] = keys[j++];
        } else {
            ti[o] = items[i];
            tk[o++] = keys[i++];
        }
    }
    while (i < h) {
        ti[o] = items[i];
        tk[o++] = keys[i++];
    }
    while (j < n) {
        ti[o] = items[j];
        tk[o++] = keys[j++];
    }
    memcpy(items, ti, n * sizeof(tv));
    memcpy(keys, tk, n * sizeof(tv));
}

static tv sorted(tp_rt *rt, const tv_list *src, const tv *keys_in, bool reverse) {
    size_t n = src->n;
    tv out = xllm_template_new_list(rt, n, false);
    for (size_t i = 0; i < n; i++) xllm_template_list_push(rt, out.u.l, src->v[i]);
    tv *keys = xllm_template_alloc(rt->arena, (n + 1) * sizeof(tv));
    memcpy(keys, keys_in, n * sizeof(tv));
    tv *ti = xllm_template_alloc(rt->arena, (n + 1) * sizeof(tv));
    tv *tk = xllm_template_alloc(rt->arena, (n + 1) * sizeof(tv));
    msort(rt, out.u.l->v, keys, n, ti, tk, reverse);
    return out;
}

/* ------------------------------------------------------------------------------------------ */
/* Filters                                                                                     */
/* ------------------------------------------------------------------------------------------ */

static int64_t length_of(tp_rt *rt, tv v) {
    switch (v.t) {
        case TV_STR:
            return (int64_t)xllm_template_utf8_len(v.u.s.p, v.u.s.n);
        case TV_LIST:
            if (v.u.l->gen) xllm_template_fail(rt, "object of type 'generator' has no len()");
            return (int64_t)v.u.l->n;
        case TV_DICT:
            return (int64_t)v.u.d->n;
        case TV_UNDEF:
            return 0;
        default:
            xllm_template_fail(rt, "object of type '%s' has no len()", xllm_template_type_name(v));
    }
}

/* Splits into lines as Python's str.splitlines (no ends). */
static tv splitlines(tp_rt *rt, tv s) {
    tv out = xllm_template_new_list(rt, 0, false);
    const char *p = s.u.s.p;
    size_t n = s.u.s.n, st = 0;
    for (size_t i = 0; i < n;) {
        uint32_t c;
        size_t k = xllm_template_utf8_decode(p + i, n - i, &c);
        bool brk = c == '\n' || c == '\r' || c == 0x0b || c == 0x0c || c == 0x1c || c == 0x1d ||
                   c == 0x1e || c == 0x85 || c == 0x2028 || c == 0x2029;
        if (!brk) {
            i += k;
            continue;
        }
        xllm_template_list_push(rt, out.u.l, tv_str(p + st, i - st));
        if (c == '\r' && i + 1 < n && p[i + 1] == '\n') k = 2;
        i += k;
        st = i;
    }
    if (st < n) xllm_template_list_push(rt, out.u.l, tv_str(p + st, n - st));
    return out;
}

static tv do_indent(tp_rt *rt, tv s, const tp_args *a) {
    const tv *w = arg(a, 0, "width");
    tv ind;
    if (!w) {
        ind = tv_str("    ", 4);
    } else if (w->t == TV_STR) {
        ind = *w;
    } else {
        int64_t k = need_int(rt, w, "indent width");
        ind = xllm_template_str_dup(rt, "", 0);
        if (k > 0) {
            if (k > 4096) xllm_template_fail(rt, "indent width too large");
            char *p = xllm_template_alloc(rt->arena, (size_t)k + 1);
            memset(p, ' ', (size_t)k);
            ind = tv_str(p, (size_t)k);
        }
    }
    bool first = arg_bool(a, 1, "first", false), blank = arg_bool(a, 2, "blank", false);
    /* s += "\n"; then split into lines */
    tv t = xllm_template_new_list(rt, 0, false);
    {
        char *p = xllm_template_alloc(rt->arena, s.u.s.n + 2);
        memcpy(p, s.u.s.p, s.u.s.n);
        p[s.u.s.n] = '\n';
        t = splitlines(rt, tv_str(p, s.u.s.n + 1));
    }
    const tv_list *lines = t.u.l;
    scratch sc;
    sc_begin(rt, &sc);
    if (first) xllm_template_buf_put(rt, &sc.b, ind.u.s.p, ind.u.s.n);
    for (size_t i = 0; i < lines->n; i++) {
        tv line = lines->v[i];
        if (i) {
            xllm_template_buf_putc(rt, &sc.b, '\n');
            if (blank || line.u.s.n) xllm_template_buf_put(rt, &sc.b, ind.u.s.p, ind.u.s.n);
        }
        xllm_template_buf_put(rt, &sc.b, line.u.s.p, line.u.s.n);
    }
    return sc_end(rt, &sc);
}

static tv do_tojson(tp_rt *rt, tv v, const tp_args *a) {
    tp_json_opts o = {0};
    o.ensure_ascii = arg_bool(a, 0, "ensure_ascii", false);
    const tv *ind = arg(a, 1, "indent");
    if (ind && ind->t != TV_NONE) {
        o.has_indent = true;
        if (ind->t == TV_STR) {
            o.indent = ind->u.s.p;
            o.indent_n = ind->u.s.n;
        } else {
            int64_t k = need_int(rt, ind, "tojson indent");
            if (k > 4096) xllm_template_fail(rt, "tojson indent too large");
            if (k < 0) k = 0;
            char *p = xllm_template_alloc(rt->arena, (size_t)k + 1);
            memset(p, ' ', (size_t)k);
            o.indent = p;
            o.indent_n = (size_t)k;
        }
    }
    const tv *sep = arg(a, 2, "separators");
    if (sep && sep->t != TV_NONE) {
        if (sep->t != TV_LIST || sep->u.l->n != 2 || sep->u.l->v[0].t != TV_STR ||
            sep->u.l->v[1].t != TV_STR)
            xllm_template_fail(rt, "tojson separators must be two strings");
        o.item_sep = sep->u.l->v[0].u.s.p;
        o.item_sep_n = sep->u.l->v[0].u.s.n;
        o.key_sep = sep->u.l->v[1].u.s.p;
        o.key_sep_n = sep->u.l->v[1].u.s.n;
    }
    o.sort_keys = arg_bool(a, 3, "sort_keys", false);
    scratch sc;
    sc_begin(rt, &sc);
    xllm_template_json(rt, &sc.b, v, &o, 0);
    return sc_end(rt, &sc);
}

/* select/reject(attr) with an optional test name and its arguments. */
static tv select_items(tp_rt *rt, tv v, const tp_args *a, bool by_attr, bool keep) {
    const tv_list *items = xllm_template_iter(rt, v);
    size_t off = 0;
    tv attr = {0};
    if (by_attr) {
        const tv *at = arg(a, 0, NULL);
        if (!at) xllm_template_fail(rt, "selectattr/rejectattr need an attribute");
        attr = *at;
        off = 1;
    }
    int test = -1;
    tp_args ta = {0};
    if (a->npos > off) {
        tv tn = need_str(rt, &a->pos[off], "test name");
        char name[32];
        snprintf(name, sizeof(name), "%.*s", (int)(tn.u.s.n < 31 ? tn.u.s.n : 31), tn.u.s.p);
        test = xllm_template_test_id(name);
        if (test < 0) xllm_template_fail(rt, "no test named '%s'", name);
        ta.pos = a->pos + off + 1;
        ta.npos = a->npos - off - 1;
        ta.kw = a->kw;
        ta.kwname = a->kwname;
        ta.nkw = a->nkw;
    }
    tv out = xllm_template_new_list(rt, 0, false);
    for (size_t i = 0; i < items->n; i++) {
        tv x = items->v[i];
        tv subj = by_attr ? attr_path(rt, x, attr) : x;
        bool r = test >= 0 ? xllm_template_test(rt, test, subj, &ta) : xllm_template_truthy(subj);
        if (r == keep) xllm_template_list_push(rt, out.u.l, x);
    }
    return out;
}

static tv do_map(tp_rt *rt, tv v, const tp_args *a) {
    const tv_list *items = xllm_template_iter(rt, v);
    tv out = xllm_template_new_list(rt, items->n, false);
    if (a->npos == 0) {
        const tv *at = arg(a, 99, "attribute");
        if (!at) xllm_template_fail(rt, "map needs a filter name or attribute=");
        const tv *dflt = arg(a, 99, "default");
        for (size_t i = 0; i < items->n; i++) {
            tv r = attr_path(rt, items->v[i], *at);
            if (r.t == TV_UNDEF && dflt) r = *dflt;
            xllm_template_list_push(rt, out.u.l, r);
        }
        return out;
    }
    tv fname = need_str(rt, &a->pos[0], "filter name");
    char name[32];
    snprintf(name, sizeof(name), "%.*s", (int)(fname.u.s.n < 31 ? fname.u.s.n : 31), fname.u.s.p);
    int id = xllm_template_filter_id(name);
    if (id < 0) xllm_template_fail(rt, "no filter named '%s'", name);
    tp_args fa = *a;
    fa.pos = a->pos + 1;
    fa.npos = a->npos - 1;
    for (size_t i = 0; i < items->n; i++)
        xllm_template_list_push(rt, out.u.l, xllm_template_filter(rt, id, items->v[i], &fa));
    return out;
}

static tv minmax(tp_rt *rt, tv v, const tp_args *a, bool want_max) {
    const tv_list *items = xllm_template_iter(rt, v);
    bool cs = arg_bool(a, 0, "case_sensitive", false);
    const tv *at = arg(a, 1, "attribute");
    if (items->n == 0) return tv_undef(NULL);
    size_t best = 0;
    tv bk = {0};
    for (size_t i = 0; i < items->n; i++) {
        tv k = sort_key(rt, at ? attr_path(rt, items->v[i], *at) : items->v[i], cs);
        if (i == 0) {
            bk = k;
            continue;
        }
        int c = xllm_template_order(rt, k, bk);
        if (want_max ? c > 0 : c < 0) {
            best = i;
            bk = k;
        }
    }
    return items->v[best];
}

static tv to_int(tp_rt *rt, tv v, const tp_args *a) {
    const tv *dflt = arg(a, 0, "default");
    tv d = dflt ? *dflt : tv_int(0);
    switch (v.t) {
        case TV_INT:
            return v;
        case TV_BOOL:
            return tv_int(v.u.b);
        case TV_FLOAT:
            if (isnan(v.u.f)) return d;
            if (isinf(v.u.f) || fabs(v.u.f) >= 9.2e18)
                xllm_template_fail(rt, "cannot convert float to integer");
            return tv_int((int64_t)v.u.f);
        case TV_STR: {
            tv s = strip(rt, v, NULL, true, true);
            char buf[64];
            if (s.u.s.n == 0 || s.u.s.n >= sizeof(buf)) return d;
            size_t k = 0;
            for (size_t i = 0; i < s.u.s.n; i++)
                if (s.u.s.p[i] != '_') buf[k++] = s.u.s.p[i];
            buf[k] = 0;
            char *end;
            long long x = strtoll(buf, &end, 10);
            if (*end == 0 && (buf[0] != '_')) return tv_int(x);
            double f = strtod(buf, &end);
            if (*end == 0 && !isnan(f) && !isinf(f) && fabs(f) < 9.2e18) return tv_int((int64_t)f);
            return d;
        }
        case TV_UNDEF:
            xllm_template_fail(rt, "'%s' is undefined", v.u.s.p ? v.u.s.p : "value");
        default:
            return d;
    }
}

static tv to_float(tp_rt *rt, tv v, const tp_args *a) {
    const tv *dflt = arg(a, 0, "default");
    tv d = dflt ? *dflt : tv_float(0.0);
    switch (v.t) {
        case TV_INT:
            return tv_float((double)v.u.i);
        case TV_BOOL:
            return tv_float(v.u.b);
        case TV_FLOAT:
            return v;
        case TV_STR: {
            tv s = strip(rt, v, NULL, true, true);
            char buf[128];
            if (s.u.s.n == 0 || s.u.s.n >= sizeof(buf)) return d;
            memcpy(buf, s.u.s.p, s.u.s.n);
            buf[s.u.s.n] = 0;
            char *end;
            double f = strtod(buf, &end);
            if (*end == 0 && !strchr(buf, 'x') && !strchr(buf, 'X')) return tv_float(f);
            return d;
        }
        case TV_UNDEF:
            xllm_template_fail(rt, "'%s' is undefined", v.u.s.p ? v.u.s.p : "value");
        default:
            return d;
    }
}

tv xllm_template_escape(tp_rt *rt, tv v) {
    if (v.t == TV_STR && v.flag) return v;
    tv s = xllm_template_to_str(rt, v);
    scratch sc;
    sc_begin(rt, &sc);
    for (size_t i = 0; i < s.u.s.n; i++) {
        char c = s.u.s.p[i];
        const char *r = c == '&'    ? "&amp;"
                        : c == '<'  ? "&lt;"
                        : c == '>'  ? "&gt;"
                        : c == '"'  ? "&#34;"
                        : c == '\'' ? "&#39;"
                                    : NULL;
        if (r)
            xllm_template_buf_put(rt, &sc.b, r, strlen(r));
        else
            xllm_template_buf_putc(rt, &sc.b, c);
    }
    tv r = sc_end(rt, &sc);
    r.flag = 1;
    return r;
}

tv xllm_template_filter(tp_rt *rt, int id, tv v, const tp_args *a) {
    xllm_template_step(rt);
    switch (id) {
        case FL_ABS:
            if (v.t == TV_INT) {
                if (v.u.i == INT64_MIN) xllm_template_fail(rt, "integer overflow");
                return tv_int(v.u.i < 0 ? -v.u.i : v.u.i);
            }
            if (v.t == TV_BOOL) return tv_int(v.u.b);
            if (v.t == TV_FLOAT) return tv_float(fabs(v.u.f));
            xllm_template_fail(rt, "bad operand type for abs(): '%s'", xllm_template_type_name(v));
        case FL_ATTR: {
            tv n = need_str(rt, arg(a, 0, "name"), "attribute name");
            if (v.t == TV_UNDEF) xllm_template_fail(rt, "attribute of an undefined value");
            return xllm_template_getattr(rt, v, n.u.s.p, n.u.s.n);
        }
        case FL_CAPITALIZE:
            return case_map(rt, xllm_template_to_str(rt, v), CASE_CAPITALIZE);
        case FL_COUNT:
        case FL_LENGTH:
            return tv_int(length_of(rt, v));
        case FL_D:
        case FL_DEFAULT: {
            const tv *d = arg(a, 0, "default_value");
            bool boolean = arg_bool(a, 1, "boolean", false);
            if (v.t == TV_UNDEF || (boolean && !xllm_template_truthy(v)))
                return d ? *d : tv_str("", 0);
            return v;
        }
        case FL_DICTSORT: {
            if (v.t != TV_DICT) xllm_template_fail(rt, "dictsort needs a mapping");
            bool cs = arg_bool(a, 0, "case_sensitive", false);
            const tv *by = arg(a, 1, "by");
            bool by_value = false;
            if (by) {
                tv b = need_str(rt, by, "dictsort by");
                if (b.u.s.n == 5 && !memcmp(b.u.s.p, "value", 5))
                    by_value = true;
                else if (!(b.u.s.n == 3 && !memcmp(b.u.s.p, "key", 3)))
                    xllm_template_fail(rt, "You can only sort by either \"key\" or \"value\"");
            }
            bool rev = arg_bool(a, 2, "reverse", false);
            tv items = dict_items(rt, v.u.d);
            tv *keys = xllm_template_alloc(rt->arena, (items.u.l->n + 1) * sizeof(tv));
            for (size_t i = 0; i < items.u.l->n; i++)
                keys[i] = sort_key(rt, items.u.l->v[i].u.l->v[by_value ? 1 : 0], cs);
            return sorted(rt, items.u.l, keys, rev);
        }
        case FL_E:
        case FL_ESCAPE:
            return xllm_template_escape(rt, v);
        case FL_FIRST: {
            const tv_list *l = xllm_template_iter(rt, v);
            return l->n ? l->v[0] : tv_undef(NULL);
        }
        case FL_LAST: {
            if ((v.t != TV_LIST && v.t != TV_STR && v.t != TV_DICT && v.t != TV_UNDEF) ||
                (v.t == TV_LIST && v.u.l->gen))
                xllm_template_fail(rt, "'%s' object is not reversible", xllm_template_type_name(v));
            const tv_list *l = xllm_template_iter(rt, v);
            return l->n ? l->v[l->n - 1] : tv_undef(NULL);
        }
        case FL_FLOAT:
            return to_float(rt, v, a);
        case FL_INT:
            return to_int(rt, v, a);
        case FL_FORMAT: {
            tv fmt = need_str(rt, &v, "format string");
            tv args = xllm_template_new_list(rt, a->npos, true);
            for (size_t i = 0; i < a->npos; i++) xllm_template_list_push(rt, args.u.l, a->pos[i]);
            return xllm_template_percent(rt, fmt, args);
        }
        case FL_INDENT:
            return do_indent(rt, xllm_template_to_str(rt, v), a);
        case FL_ITEMS: {
            if (v.t == TV_UNDEF) return gen_of(xllm_template_new_list(rt, 0, false));
            if (v.t != TV_DICT) xllm_template_fail(rt, "Can only get item pairs from a mapping.");
            return gen_of(dict_items(rt, v.u.d));
        }
        case FL_JOIN: {
            const tv *d = arg(a, 0, "d");
            const tv *at = arg(a, 1, "attribute");
            const tv_list *items = xllm_template_iter(rt, v);
            if (at) {
                tv m = xllm_template_new_list(rt, items->n, false);
                for (size_t i = 0; i < items->n; i++)
                    xllm_template_list_push(rt, m.u.l, attr_path(rt, items->v[i], *at));
                items = m.u.l;
            }
            return join_strs(rt, items, d ? xllm_template_to_str(rt, *d) : tv_str("", 0), false);
        }
        case FL_LIST: {
            const tv_list *l = xllm_template_iter(rt, v);
            tv out = xllm_template_new_list(rt, l->n, false);
            for (size_t i = 0; i < l->n; i++) xllm_template_list_push(rt, out.u.l, l->v[i]);
            return out;
        }
        case FL_LOWER:
            return case_map(rt, xllm_template_to_str(rt, v), CASE_LOWER);
        case FL_UPPER:
            return case_map(rt, xllm_template_to_str(rt, v), CASE_UPPER);
        case FL_TITLE:
            return case_map(rt, xllm_template_to_str(rt, v), CASE_JTITLE);
        case FL_MAP: /* generators; a false value gives an empty one without iterating */
            return gen_of(xllm_template_truthy(v) ? do_map(rt, v, a)
                                                  : xllm_template_new_list(rt, 0, false));
        case FL_MAX:
            return minmax(rt, v, a, true);
        case FL_MIN:
            return minmax(rt, v, a, false);
        case FL_SELECT:
        case FL_REJECT:
        case FL_SELECTATTR:
        case FL_REJECTATTR:
            if (!xllm_template_truthy(v)) return gen_of(xllm_template_new_list(rt, 0, false));
            return gen_of(select_items(rt, v, a, id == FL_SELECTATTR || id == FL_REJECTATTR,
                                       id == FL_SELECT || id == FL_SELECTATTR));
        case FL_REPLACE: {
            tv s = xllm_template_to_str(rt, v);
            const tv *o = arg(a, 0, "old"), *n = arg(a, 1, "new"), *c = arg(a, 2, "count");
            if (!o || !n) xllm_template_fail(rt, "replace needs old and new");
            int64_t count = (c && c->t != TV_NONE) ? need_int(rt, c, "count") : -1;
            return replace(rt, s, xllm_template_to_str(rt, *o), xllm_template_to_str(rt, *n),
                           count);
        }
        case FL_REVERSE: {
            if (v.t == TV_STR) {
                const tv_list *l = xllm_template_iter(rt, v);
                scratch sc;
                sc_begin(rt, &sc);
                for (size_t i = l->n; i-- > 0;)
                    xllm_template_buf_put(rt, &sc.b, l->v[i].u.s.p, l->v[i].u.s.n);
                return sc_end(rt, &sc);
            }
            const tv_list *l = xllm_template_iter(rt, v);
            tv out = xllm_template_new_list(rt, l->n, false);
            for (size_t i = l->n; i-- > 0;) xllm_template_list_push(rt, out.u.l, l->v[i]);
            /* reversed(list) is an iterator; a generator is copied into a list */
            if ((v.t == TV_LIST && !v.u.l->gen) || v.t == TV_DICT) out.u.l->gen = true;
            return out;
        }
        case FL_ROUND: {
            const tv *pr = arg(a, 0, "precision");
            const tv *me = arg(a, 1, "method");
            int64_t p = pr ? need_int(rt, pr, "precision") : 0;
            const char *method = "common";
            if (me) {
                tv m = need_str(rt, me, "method");
                method = m.u.s.n == 4 && !memcmp(m.u.s.p, "ceil", 4)     ? "ceil"
                         : m.u.s.n == 5 && !memcmp(m.u.s.p, "floor", 5)  ? "floor"
                         : m.u.s.n == 6 && !memcmp(m.u.s.p, "common", 6) ? "common"
                                                                         : NULL;
                if (!method) xllm_template_fail(rt, "method must be common, ceil or floor");
            }
            if (!(v.t == TV_INT || v.t == TV_BOOL || v.t == TV_FLOAT))
                xllm_template_fail(rt, "round needs a number");
            if (method[0] == 'c' && method[1] == 'o' && v.t != TV_FLOAT)
                return tv_int(v.t == TV_INT ? v.u.i : v.u.b);
            double x = v.t == TV_FLOAT ? v.u.f : (double)(v.t == TV_INT ? v.u.i : v.u.b);
            double scale = pow(10.0, (double)p);
            double y = x * scale;
            double r = method[0] == 'f' ? floor(y) : method[1] == 'e' ? ceil(y) : nearbyint(y);
            return tv_float(r / scale);
        }
        case FL_SAFE: {
            tv s = xllm_template_to_str(rt, v);
            s.flag = 1;
            return s;
        }
        case FL_SORT: {
            bool rev = arg_bool(a, 0, "reverse", false),
                 cs = arg_bool(a, 1, "case_sensitive", false);
            const tv *at = arg(a, 2, "attribute");
            const tv_list *l = xllm_template_iter(rt, v);
            tv *keys = xllm_template_alloc(rt->arena, (l->n + 1) * sizeof(tv));
            for (size_t i = 0; i < l->n; i++)
                keys[i] = sort_key(rt, at ? attr_path(rt, l->v[i], *at) : l->v[i], cs);
            return sorted(rt, l, keys, rev);
        }
        case FL_STRING:
            return xllm_template_to_str(rt, v);
        case FL_SUM: {
            const tv *at = arg(a, 0, "attribute");
            const tv *start = arg(a, 1, "start");
            tv acc = start ? *start : tv_int(0);
            const tv_list *l = xllm_template_iter(rt, v);
            for (size_t i = 0; i < l->n; i++) {
                tv x = at ? attr_path(rt, l->v[i], *at) : l->v[i];
                if (!((x.t == TV_INT || x.t == TV_BOOL || x.t == TV_FLOAT) &&
                      (acc.t == TV_INT || acc.t == TV_BOOL || acc.t == TV_FLOAT)))
                    xllm_template_fail(rt, "sum needs numbers");
                if (acc.t != TV_FLOAT && x.t != TV_FLOAT) {
                    int64_t r;
                    if (__builtin_add_overflow(acc.t == TV_INT ? acc.u.i : acc.u.b,
                                               x.t == TV_INT ? x.u.i : x.u.b, &r))
                        xllm_template_fail(rt, "integer overflow");
                    acc = tv_int(r);
                } else {
                    double p =
                        acc.t == TV_FLOAT ? acc.u.f : (double)(acc.t == TV_INT ? acc.u.i : acc.u.b);
                    double q = x.t == TV_FLOAT ? x.u.f : (double)(x.t == TV_INT ? x.u.i : x.u.b);
                    acc = tv_float(p + q);
                }
            }
            return acc;
        }
        case FL_TOJSON:
            return do_tojson(rt, v, a);
        case FL_TRIM: {
            const tv *chars = arg(a, 0, "chars");
            return strip(rt, xllm_template_to_str(rt, v), chars, true, true);
        }
        case FL_UNIQUE: {
            bool cs = arg_bool(a, 0, "case_sensitive", false);
            const tv *at = arg(a, 1, "attribute");
            const tv_list *l = xllm_template_iter(rt, v);
            tv out = xllm_template_new_list(rt, 0, false);
            tv seen = xllm_template_new_list(rt, 0, false);
            for (size_t i = 0; i < l->n; i++) {
                tv k = sort_key(rt, at ? attr_path(rt, l->v[i], *at) : l->v[i], cs);
                bool dup = false;
                for (size_t j = 0; j < seen.u.l->n && !dup; j++) {
                    xllm_template_step(rt);
                    dup = xllm_template_equal(rt, seen.u.l->v[j], k);
                }
                if (dup) continue;
                xllm_template_list_push(rt, seen.u.l, k);
                xllm_template_list_push(rt, out.u.l, l->v[i]);
            }
            return gen_of(out);
        }
        case FL_WORDCOUNT: {
            tv parts = split(rt, xllm_template_to_str(rt, v), NULL, NULL, false);
            return tv_int((int64_t)parts.u.l->n);
        }
        default:
            xllm_template_fail(rt, "unknown filter");
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Tests                                                                                       */
/* ------------------------------------------------------------------------------------------ */

bool xllm_template_test(tp_rt *rt, int id, tv v, const tp_args *a) {
    xllm_template_step(rt);
    const tv *x = arg(a, 0, NULL);
    switch (id) {
        case TS_BOOLEAN:
            return v.t == TV_BOOL;
        case TS_CALLABLE:
            return v.t == TV_FUNC || v.t == TV_MACRO;
        case TS_DEFINED:
            return v.t != TV_UNDEF;
        case TS_UNDEFINED:
            return v.t == TV_UNDEF;
        case TS_DIVISIBLEBY: {
            tv r = tv_int(0);
            if (!x) xllm_template_fail(rt, "divisibleby needs an argument");
            if ((v.t == TV_INT || v.t == TV_BOOL) && (x->t == TV_INT || x->t == TV_BOOL)) {
                int64_t p = v.t == TV_INT ? v.u.i : v.u.b, q = x->t == TV_INT ? x->u.i : x->u.b;
                if (q == 0) xllm_template_fail(rt, "integer division or modulo by zero");
                if (q == -1) return true;
                return p % q == 0;
            }
            if ((v.t == TV_FLOAT || v.t == TV_INT) && (x->t == TV_FLOAT || x->t == TV_INT)) {
                double p = v.t == TV_FLOAT ? v.u.f : (double)v.u.i;
                double q = x->t == TV_FLOAT ? x->u.f : (double)x->u.i;
                if (q == 0) xllm_template_fail(rt, "float modulo by zero");
                return fmod(p, q) == 0;
            }
            (void)r;
            xllm_template_fail(rt, "divisibleby needs numbers");
        }
        case TS_EQ:
        case TS_EQ2:
        case TS_EQUALTO:
            if (!x) xllm_template_fail(rt, "test needs an argument");
            return xllm_template_equal(rt, v, *x);
        case TS_NE:
        case TS_NE2:
            if (!x) xllm_template_fail(rt, "test needs an argument");
            return !xllm_template_equal(rt, v, *x);
        case TS_GE:
        case TS_GE2:
            if (!x) xllm_template_fail(rt, "test needs an argument");
            return xllm_template_order(rt, v, *x) >= 0;
        case TS_GT:
        case TS_GT2:
        case TS_GREATERTHAN:
            if (!x) xllm_template_fail(rt, "test needs an argument");
            return xllm_template_order(rt, v, *x) > 0;
        case TS_LE:
        case TS_LE2:
            if (!x) xllm_template_fail(rt, "test needs an argument");
            return xllm_template_order(rt, v, *x) <= 0;
        case TS_LT:
        case TS_LT2:
        case TS_LESSTHAN:
            if (!x) xllm_template_fail(rt, "test needs an argument");
            return xllm_template_order(rt, v, *x) < 0;
        case TS_EVEN:
        case TS_ODD: {
            if (v.t != TV_INT && v.t != TV_BOOL) {
                if (v.t == TV_FLOAT) return (fmod(v.u.f, 2.0) != 0) == (id == TS_ODD);
                xllm_template_fail(rt, "odd/even need a number");
            }
            int64_t p = v.t == TV_INT ? v.u.i : v.u.b;
            return ((p % 2) != 0) == (id == TS_ODD);
        }
        case TS_FALSE:
            return v.t == TV_BOOL && !v.u.b;
        case TS_TRUE:
            return v.t == TV_BOOL && v.u.b;
        case TS_FLOAT:
            return v.t == TV_FLOAT;
        case TS_INTEGER:
            return v.t == TV_INT;
        case TS_NUMBER:
            return v.t == TV_INT || v.t == TV_FLOAT || v.t == TV_BOOL;
        case TS_STRING:
            return v.t == TV_STR;
        case TS_MAPPING:
            return v.t == TV_DICT;
        case TS_NONE:
            return v.t == TV_NONE;
        case TS_ITERABLE:
            return v.t == TV_STR || v.t == TV_LIST || v.t == TV_DICT || v.t == TV_UNDEF;
        case TS_SEQUENCE:
            return v.t == TV_STR || (v.t == TV_LIST && !v.u.l->gen) || v.t == TV_DICT ||
                   v.t == TV_UNDEF;
        case TS_IN: {
            if (!x) xllm_template_fail(rt, "in needs an argument");
            tp_args none = {0};
            (void)none;
            switch (x->t) {
                case TV_STR:
                    if (v.t != TV_STR) xllm_template_fail(rt, "'in <string>' requires string");
                    return find_bytes(x->u.s.p, x->u.s.n, v.u.s.p, v.u.s.n) != NULL;
                case TV_LIST:
                    for (size_t i = 0; i < x->u.l->n; i++)
                        if (xllm_template_equal(rt, x->u.l->v[i], v)) return true;
                    return false;
                case TV_DICT:
                    return xllm_template_dict_get(rt, x->u.d, v) != NULL;
                case TV_UNDEF:
                    return false;
                default:
                    xllm_template_fail(rt, "argument of type '%s' is not iterable",
                                       xllm_template_type_name(*x));
            }
        }
        case TS_LOWER:
        case TS_UPPER: {
            tv s = xllm_template_to_str(rt, v);
            bool any = false;
            for (size_t i = 0; i < s.u.s.n;) {
                uint32_t c;
                i += xllm_template_utf8_decode(s.u.s.p + i, s.u.s.n - i, &c);
                if (id == TS_LOWER ? cp_is_upper(c) : cp_is_lower(c)) return false;
                if (cp_cased(c)) any = true;
            }
            return any;
        }
        case TS_SAMEAS:
            if (!x) xllm_template_fail(rt, "sameas needs an argument");
            if (v.t != x->t) return false;
            if (v.t == TV_NONE || v.t == TV_UNDEF) return true;
            if (v.t == TV_BOOL) return v.u.b == x->u.b;
            if (v.t == TV_LIST) return v.u.l == x->u.l;
            if (v.t == TV_DICT || v.t == TV_NS) return v.u.d == x->u.d;
            return xllm_template_equal(rt, v, *x);
        default:
            xllm_template_fail(rt, "unknown test");
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Calls of builtin functions and methods                                                      */
/* ------------------------------------------------------------------------------------------ */

static tv do_strftime(tp_rt *rt, const tp_args *a) {
    tv fmt = need_str(rt, arg(a, 0, "format"), "strftime_now format");
    if (fmt.u.s.n > 1024) xllm_template_fail(rt, "strftime_now format too long");
    char f[1100];
    memcpy(f, fmt.u.s.p, fmt.u.s.n);
    f[fmt.u.s.n] = 0;
    struct tm tm;
    if (rt->now) {
        time_t t = (time_t)rt->now;
        gmtime_r(&t, &tm);
    } else {
        time_t t = time(NULL);
        localtime_r(&t, &tm);
    }
    char out[4096];
    size_t k = f[0] ? strftime(out, sizeof(out), f, &tm) : 0;
    if (f[0] && k == 0) out[0] = 0;
    return xllm_template_str_dup(rt, out, k);
}

tv xllm_template_call_builtin(tp_rt *rt, tv fn, const tp_args *a) {
    xllm_template_step(rt);
    const tv *self = fn.u.self;
    switch (fn.fn) {
        case G_RANGE: {
            int64_t start = 0, stop, step = 1;
            if (a->npos == 1) {
                stop = need_int(rt, &a->pos[0], "range argument");
            } else if (a->npos == 2 || a->npos == 3) {
                start = need_int(rt, &a->pos[0], "range argument");
                stop = need_int(rt, &a->pos[1], "range argument");
                if (a->npos == 3) step = need_int(rt, &a->pos[2], "range argument");
            } else {
                xllm_template_fail(rt, "range expects 1 to 3 arguments");
            }
            if (step == 0) xllm_template_fail(rt, "range() arg 3 must not be zero");
            double cnt = step > 0 ? ceil(((double)stop - (double)start) / (double)step)
                                  : ceil(((double)start - (double)stop) / (double)-step);
            if (cnt < 0) cnt = 0;
            if (cnt > 100000)
                xllm_template_fail(rt, "Range too big. The sandbox blocks ranges larger than "
                                       "MAX_RANGE (100000).");
            tv l = xllm_template_new_list(rt, (size_t)cnt, false);
            for (int64_t i = 0; i < (int64_t)cnt; i++)
                xllm_template_list_push(rt, l.u.l, tv_int(start + i * step));
            return l;
        }
        case G_NAMESPACE:
        case G_DICT: {
            tv d = xllm_template_new_dict(rt, a->nkw);
            if (a->npos > 1) xllm_template_fail(rt, "expected at most 1 positional argument");
            if (a->npos == 1) {
                tv src = a->pos[0];
                if (src.t == TV_DICT || src.t == TV_NS) {
                    for (size_t i = 0; i < src.u.d->n; i++)
                        xllm_template_dict_set(rt, d.u.d, src.u.d->k[i], src.u.d->v[i]);
                } else {
                    const tv_list *l = xllm_template_iter(rt, src);
                    for (size_t i = 0; i < l->n; i++) {
                        const tv_list *pair = xllm_template_iter(rt, l->v[i]);
                        if (pair->n != 2)
                            xllm_template_fail(
                                rt, "dictionary update sequence element has wrong length");
                        xllm_template_dict_set(rt, d.u.d, pair->v[0], pair->v[1]);
                    }
                }
            }
            for (size_t i = 0; i < a->nkw; i++)
                xllm_template_dict_set(rt, d.u.d, tv_str(a->kwname[i], strlen(a->kwname[i])),
                                       a->kw[i]);
            if (fn.fn == G_NAMESPACE) d.t = TV_NS;
            return d;
        }
        case G_RAISE: {
            tv m = a->npos ? xllm_template_to_str(rt, a->pos[0]) : tv_str("", 0);
            rt->raised = true;
            xllm_template_fail(rt, "%.*s", (int)(m.u.s.n > 4000 ? 4000 : m.u.s.n), m.u.s.p);
        }
        case G_STRFTIME:
            return do_strftime(rt, a);
        case G_CYCLE: {
            if (a->npos == 0) xllm_template_fail(rt, "no items for cycling given");
            return a->pos[self->u.loop->index0 % (int64_t)a->npos];
        }
        default:
            break;
    }
    if (!self) xllm_template_fail(rt, "bad builtin");
    tv s = *self;
    const tv *x = arg(a, 0, NULL);
    switch (fn.fn) {
        case M_STARTSWITH:
            return tv_bool(affix(rt, s, x, false));
        case M_ENDSWITH:
            return tv_bool(affix(rt, s, x, true));
        case M_STRIP:
            max_args(rt, a, 1, "strip");
            return strip(rt, s, x, true, true);
        case M_LSTRIP:
            max_args(rt, a, 1, "lstrip");
            return strip(rt, s, x, true, false);
        case M_RSTRIP:
            max_args(rt, a, 1, "rstrip");
            return strip(rt, s, x, false, true);
        case M_SPLIT:
            return split(rt, s, arg(a, 0, "sep"), arg(a, 1, "maxsplit"), false);
        case M_RSPLIT:
            return split(rt, s, arg(a, 0, "sep"), arg(a, 1, "maxsplit"), true);
        case M_UPPER:
            return case_map(rt, s, CASE_UPPER);
        case M_LOWER:
            return case_map(rt, s, CASE_LOWER);
        case M_TITLE:
            return case_map(rt, s, CASE_TITLE);
        case M_CAPITALIZE:
            return case_map(rt, s, CASE_CAPITALIZE);
        case M_SWAPCASE:
            return case_map(rt, s, CASE_SWAP);
        case M_REPLACE: {
            tv o = need_str(rt, arg(a, 0, NULL), "replace old");
            tv n = need_str(rt, arg(a, 1, NULL), "replace new");
            const tv *c = arg(a, 2, "count");
            return replace(rt, s, o, n, c ? need_int(rt, c, "count") : -1);
        }
        case M_FIND:
        case M_INDEX:
        case M_RFIND:
        case M_RINDEX: {
            tv sub = need_str(rt, x, "substring");
            bool right = fn.fn == M_RFIND || fn.fn == M_RINDEX;
            const char *f = right ? rfind_bytes(s.u.s.p, s.u.s.n, sub.u.s.p, sub.u.s.n)
                                  : find_bytes(s.u.s.p, s.u.s.n, sub.u.s.p, sub.u.s.n);
            if (!f) {
                if (fn.fn == M_INDEX || fn.fn == M_RINDEX)
                    xllm_template_fail(rt, "substring not found");
                return tv_int(-1);
            }
            return tv_int(cp_index(s.u.s.p, f));
        }
        case M_SCOUNT: {
            tv sub = need_str(rt, x, "substring");
            if (sub.u.s.n == 0)
                return tv_int((int64_t)xllm_template_utf8_len(s.u.s.p, s.u.s.n) + 1);
            int64_t k = 0;
            size_t i = 0;
            const char *f;
            while ((f = find_bytes(s.u.s.p + i, s.u.s.n - i, sub.u.s.p, sub.u.s.n))) {
                k++;
                i = (size_t)(f - s.u.s.p) + sub.u.s.n;
            }
            return tv_int(k);
        }
        case M_FORMAT:
            return str_format(rt, s, a);
        case M_JOIN: {
            if (!x) xllm_template_fail(rt, "join needs an argument");
            return join_strs(rt, xllm_template_iter(rt, *x), s, true);
        }
        case M_SPLITLINES:
            return splitlines(rt, s);
        case M_ISDIGIT:
        case M_ISALPHA:
        case M_ISALNUM:
        case M_ISSPACE: {
            if (s.u.s.n == 0) return tv_bool(false);
            for (size_t i = 0; i < s.u.s.n;) {
                uint32_t c;
                i += xllm_template_utf8_decode(s.u.s.p + i, s.u.s.n - i, &c);
                bool digit = c >= '0' && c <= '9';
                bool alpha = cp_cased(c) || (c >= 0x80 && !xllm_template_is_space(c) && c > 0x2fff);
                bool ok = fn.fn == M_ISDIGIT   ? digit
                          : fn.fn == M_ISALPHA ? alpha
                          : fn.fn == M_ISALNUM ? (digit || alpha)
                                               : xllm_template_is_space(c);
                if (!ok) return tv_bool(false);
            }
            return tv_bool(true);
        }
        case M_ISLOWER:
        case M_ISUPPER: {
            tp_args none = {0};
            return tv_bool(
                xllm_template_test(rt, fn.fn == M_ISLOWER ? TS_LOWER : TS_UPPER, s, &none));
        }
        case M_REMOVEPREFIX:
        case M_REMOVESUFFIX: {
            tv p = need_str(rt, x, "affix");
            if (p.u.s.n > s.u.s.n) return s;
            if (fn.fn == M_REMOVEPREFIX)
                return memcmp(s.u.s.p, p.u.s.p, p.u.s.n)
                           ? s
                           : tv_str(s.u.s.p + p.u.s.n, s.u.s.n - p.u.s.n);
            return memcmp(s.u.s.p + s.u.s.n - p.u.s.n, p.u.s.p, p.u.s.n)
                       ? s
                       : tv_str(s.u.s.p, s.u.s.n - p.u.s.n);
        }
        case M_STR_OTHER:
            xllm_template_fail(rt, "this string method is not supported");
        case M_GET: {
            if (!x) xllm_template_fail(rt, "get expected at least 1 argument");
            tv *v = xllm_template_dict_get(rt, s.u.d, *x);
            if (v) return *v;
            const tv *d = arg(a, 1, "default");
            return d ? *d : tv_none();
        }
        case M_ITEMS:
            return dict_items(rt, s.u.d);
        case M_KEYS:
        case M_VALUES: {
            tv l = xllm_template_new_list(rt, s.u.d->n, false);
            for (size_t i = 0; i < s.u.d->n; i++)
                xllm_template_list_push(rt, l.u.l, fn.fn == M_KEYS ? s.u.d->k[i] : s.u.d->v[i]);
            return l;
        }
        case M_DCOPY: {
            tv d = xllm_template_new_dict(rt, s.u.d->n);
            for (size_t i = 0; i < s.u.d->n; i++)
                xllm_template_dict_set(rt, d.u.d, s.u.d->k[i], s.u.d->v[i]);
            return d;
        }
        case M_LCOUNT: {
            if (!x) xllm_template_fail(rt, "count needs an argument");
            int64_t k = 0;
            for (size_t i = 0; i < s.u.l->n; i++) k += xllm_template_equal(rt, s.u.l->v[i], *x);
            return tv_int(k);
        }
        case M_LINDEX: {
            if (!x) xllm_template_fail(rt, "index needs an argument");
            for (size_t i = 0; i < s.u.l->n; i++)
                if (xllm_template_equal(rt, s.u.l->v[i], *x)) return tv_int((int64_t)i);
            xllm_template_fail(rt, "value is not in list");
        }
        case M_LCOPY: {
            tv l = xllm_template_new_list(rt, s.u.l->n, s.u.l->tuple);
            for (size_t i = 0; i < s.u.l->n; i++) xllm_template_list_push(rt, l.u.l, s.u.l->v[i]);
            return l;
        }
        default:
            xllm_template_fail(rt, "bad builtin");
    }
}
