/* Private structures of the chat-template interpreter: arena, values, AST, runtime state.
 * Shared by parse.c (lexer + parser), value.c (values, repr, JSON), eval.c and builtins.c. */
#ifndef XLLM_TEMPLATE_IMPL_H
#define XLLM_TEMPLATE_IMPL_H

#include <setjmp.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "template/template.h"

/* ------------------------------------------------------------------------------------------ */
/* Arena: every allocation of a parse or a render comes from one, freed at once. A failed    */
/* allocation or an exceeded limit long-jumps to the owner's error handler (tp_fail), so no  */
/* caller checks for NULL and nothing leaks on error paths.                                  */
/* ------------------------------------------------------------------------------------------ */

typedef struct tp_chunk tp_chunk;
typedef struct tp_rt tp_rt;

typedef struct tp_arena {
    tp_chunk *head;
    size_t used;  /* bytes handed out, all chunks */
    size_t limit; /* bytes; allocation beyond it fails */
    tp_rt *rt;    /* where failures go */
} tp_arena;

void *xllm_template_alloc(tp_arena *a, size_t n); /* zeroed, 16-byte aligned */
void xllm_template_arena_free(tp_arena *a);

/* ------------------------------------------------------------------------------------------ */
/* Values: 24 bytes, passed by value. Strings are UTF-8 byte ranges (not NUL-terminated).    */
/* Containers live in the arena; lists and dicts are immutable once built, except a          */
/* namespace's dict (attribute assignment), as in jinja2's immutable sandbox.                 */
/* ------------------------------------------------------------------------------------------ */

typedef enum tv_type {
    TV_UNDEF = 0, /* jinja2 Undefined; s holds the name for messages */
    TV_NONE,
    TV_BOOL,
    TV_INT,
    TV_FLOAT,
    TV_STR,
    TV_LIST, /* list or tuple (l->tuple) */
    TV_DICT,
    TV_NS,    /* namespace(): a dict whose attributes may be assigned */
    TV_MACRO, /* a macro or a call block's caller */
    TV_FUNC,  /* builtin function, or a method bound to self */
    TV_LOOP,  /* the loop variable of a for statement */
} tv_type;

typedef struct tv_list tv_list;
typedef struct tv_dict tv_dict;
typedef struct tp_macro tp_macro;
typedef struct tp_loop tp_loop;

typedef struct tv {
    uint8_t t;    /* tv_type */
    uint8_t flag; /* TV_UNDEF: 1 = access blocked by the sandbox; TV_STR: 1 = Markup (|safe) */
    uint16_t fn;  /* TV_FUNC: builtin id */
    union {
        bool b;
        int64_t i;
        double f;
        struct {
            const char *p;
            size_t n;
        } s;
        tv_list *l;
        tv_dict *d;
        tp_macro *m;
        tp_loop *loop;
        struct tv *self; /* TV_FUNC: bound object, or NULL */
    } u;
} tv;

struct tv_list {
    size_t n, cap;
    tv *v;
    uint32_t depth; /* 1 + the deepest child container: bounds every recursive walk */
    bool tuple;
    /* a Python iterator (what jinja2's map/select/items/unique/reverse return): iterable, but
     * always true, without len(), not subscriptable, not JSON serializable */
    bool gen;
};

struct tv_dict {
    size_t n, cap;
    tv *k, *v; /* insertion order */
    uint32_t depth;
    uint32_t *idx; /* hash index (slot = entry + 1, 0 = empty) once the dict is not small */
    size_t idx_cap;
};

/* ------------------------------------------------------------------------------------------ */
/* AST                                                                                         */
/* ------------------------------------------------------------------------------------------ */

typedef enum tp_kind {
    /* expressions */
    N_LIT = 1, /* lit */
    N_NAME,    /* name */
    N_LIST,    /* kids */
    N_TUPLE,   /* kids */
    N_DICT,    /* kids: key, value, key, value, ... */
    N_ATTR,    /* a . name */
    N_INDEX,   /* a [ b ] */
    N_SLICE,   /* a [ b : c : d ] (each may be NULL) */
    N_CALL,    /* a ( kids ), names[i] non-NULL for keyword args */
    N_FILTER,  /* a | name ( kids ); a NULL inside a filter block */
    N_TEST,    /* a is [not] name ( kids ); flag = negated */
    N_NEG,     /* - a */
    N_POS,     /* + a */
    N_NOT,     /* not a */
    N_BIN,     /* a op b (op: tp_binop) */
    N_AND,     /* a and b */
    N_OR,      /* a or b */
    N_CMP,     /* a, then kids[i] compared with ops[i] (chained) */
    N_COND,    /* b if a else c (c may be NULL) */
    N_CONCAT,  /* kids joined with ~ */
    /* statements */
    N_BODY,      /* kids */
    N_TEXT,      /* name: literal text */
    N_OUT,       /* {{ a }} */
    N_IF,        /* if a: b else c (c: N_BODY or N_IF or NULL) */
    N_FOR,       /* for targets(kids of d) in a [if c]: b else e */
    N_SET,       /* set d(target) = a */
    N_SETBLOCK,  /* set d(target) [| a filters]: b */
    N_MACRO,     /* macro name(names/kids defaults): b */
    N_CALLBLOCK, /* call(names/kids) a: b */
    N_FILTERBLK, /* filter a (chain of N_FILTER with innermost a NULL): b */
    N_WITH,      /* with names = kids: b */
    N_BREAK,
    N_CONTINUE,
} tp_kind;

typedef enum tp_binop {
    OP_ADD = 1,
    OP_SUB,
    OP_MUL,
    OP_DIV,
    OP_FLOORDIV,
    OP_MOD,
    OP_POW,
    OP_EQ,
    OP_NE,
    OP_LT,
    OP_LE,
    OP_GT,
    OP_GE,
    OP_IN,
    OP_NOTIN,
} tp_binop;

typedef struct tp_node tp_node;
struct tp_node {
    uint8_t kind; /* tp_kind */
    uint8_t op;   /* tp_binop */
    uint8_t flag;
    int line;
    tp_node *a, *b, *c, *d, *e;
    tp_node **kids;
    const char **names; /* per kid: keyword / parameter name (NUL-terminated) or NULL */
    uint8_t *ops;       /* N_CMP: one per kid */
    uint32_t nkids;
    const char *name; /* NUL-terminated */
    size_t name_len;
    int id; /* N_FILTER / N_TEST: builtin id */
    tv lit;
};

struct xllm_template {
    tp_arena arena;
    tp_node *root;
    xllm_template_limits limits;
};

/* ------------------------------------------------------------------------------------------ */
/* Runtime                                                                                     */
/* ------------------------------------------------------------------------------------------ */

typedef struct tp_scope tp_scope;
struct tp_scope {
    tp_scope *parent;
    size_t n, cap;
    const char **names;
    tv *vals;
};

struct tp_macro {
    const tp_node *def; /* N_MACRO or N_CALLBLOCK */
    tp_scope *closure;
    tv caller; /* for a macro called by a call block: the caller, else undefined */
};

struct tp_loop {
    const tv_list *items;
    int64_t index0;
    int depth0;
};

typedef struct tp_buf {
    char *p;
    size_t n, cap;
} tp_buf;

struct tp_rt {
    jmp_buf jb;
    tp_arena *arena;
    char *err;
    size_t err_size;
    int line;  /* line of the node being evaluated */
    int depth; /* recursion depth (expressions, statements, calls) */
    uint64_t steps;
    size_t out_total; /* bytes written to every output buffer */
    xllm_template_limits limits;
    int64_t now;  /* strftime_now: unix seconds (UTC), or 0 for the current local time */
    int loop_ctl; /* 1 = break, 2 = continue pending */
    bool raised;  /* error came from raise_exception */
    tp_buf *out;  /* current output */
};

/* Fails the current parse or render: formats "line N: message" into rt->err and long-jumps. */
_Noreturn void xllm_template_fail(tp_rt *rt, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* Values */
static inline tv tv_undef(const char *name) {
    tv v = {0};
    v.t = TV_UNDEF;
    v.u.s.p = name;
    v.u.s.n = name ? __builtin_strlen(name) : 0;
    return v;
}
static inline tv tv_none(void) {
    tv v = {0};
    v.t = TV_NONE;
    return v;
}
static inline tv tv_bool(bool b) {
    tv v = {0};
    v.t = TV_BOOL;
    v.u.b = b;
    return v;
}
static inline tv tv_int(int64_t i) {
    tv v = {0};
    v.t = TV_INT;
    v.u.i = i;
    return v;
}
static inline tv tv_float(double f) {
    tv v = {0};
    v.t = TV_FLOAT;
    v.u.f = f;
    return v;
}
static inline tv tv_str(const char *p, size_t n) {
    tv v = {0};
    v.t = TV_STR;
    v.u.s.p = p;
    v.u.s.n = n;
    return v;
}

tv xllm_template_str_dup(tp_rt *rt, const char *p, size_t n);
tv xllm_template_new_list(tp_rt *rt, size_t cap, bool tuple);
void xllm_template_list_push(tp_rt *rt, tv_list *l, tv v);
tv xllm_template_new_dict(tp_rt *rt, size_t cap);
/* Sets key to v: replaces in place when the key exists, else appends. */
void xllm_template_dict_set(tp_rt *rt, tv_dict *d, tv key, tv v);
/* Value of key, or NULL. */
tv *xllm_template_dict_get(tp_rt *rt, const tv_dict *d, tv key);
tv *xllm_template_dict_get_str(const tv_dict *d, const char *key, size_t n);

bool xllm_template_truthy(tv v);
bool xllm_template_equal(tp_rt *rt, tv a, tv b); /* Python ==; counts steps */
const char *xllm_template_type_name(tv v);       /* Python's name: "str", "list", "NoneType", ... */

/* Output buffers in the arena. */
void xllm_template_buf_put(tp_rt *rt, tp_buf *b, const char *p, size_t n);
void xllm_template_buf_putc(tp_rt *rt, tp_buf *b, char c);
void xllm_template_buf_printf(tp_rt *rt, tp_buf *b, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Python str() and repr() of a value, appended to b. */
void xllm_template_str_of(tp_rt *rt, tp_buf *b, tv v);
void xllm_template_repr_of(tp_rt *rt, tp_buf *b, tv v);
/* str() as a value (no copy for strings). */
tv xllm_template_to_str(tp_rt *rt, tv v);
/* Python float repr (shortest round-trip). */
void xllm_template_float_repr(double f, char *buf, size_t size);

/* json.dumps options as transformers' tojson filter passes them. */
typedef struct tp_json_opts {
    bool ensure_ascii;
    bool has_indent;
    const char *indent; /* when has_indent */
    size_t indent_n;
    const char *item_sep, *key_sep; /* NULL = Python's defaults */
    size_t item_sep_n, key_sep_n;
    bool sort_keys;
} tp_json_opts;

void xllm_template_json(tp_rt *rt, tp_buf *b, tv v, const tp_json_opts *o, int depth);

/* Python ordering of two values (-1, 0, 1); fails for types Python cannot order. */
int xllm_template_order(tp_rt *rt, tv a, tv b);
/* HTML-escapes str(v) into a Markup string (unchanged when v is Markup already). */
tv xllm_template_escape(tp_rt *rt, tv v);
/* "fmt % args" (printf-style, %s %r %d %i %f %%). */
tv xllm_template_percent(tp_rt *rt, tv fmt, tv args);

/* UTF-8 helpers */
size_t xllm_template_utf8_len(const char *p, size_t n); /* code points */
/* Byte offset of code point i (clamped to n). */
size_t xllm_template_utf8_offset(const char *p, size_t n, int64_t i);
/* Decodes one code point at p (n bytes available); returns its byte length (>= 1). */
size_t xllm_template_utf8_decode(const char *p, size_t n, uint32_t *cp);
bool xllm_template_is_space(uint32_t cp); /* Python str.isspace */

/* Builtins (builtins.c) */
typedef struct tp_args {
    const tv *pos;
    size_t npos;
    const char *const *kwname;
    const tv *kw;
    size_t nkw;
} tp_args;

int xllm_template_filter_id(const char *name); /* -1 when unknown */
int xllm_template_test_id(const char *name);   /* -1 when unknown */
tv xllm_template_filter(tp_rt *rt, int id, tv v, const tp_args *a);
bool xllm_template_test(tp_rt *rt, int id, tv v, const tp_args *a);
/* Global function by name (range, namespace, dict, raise_exception, strftime_now) or undefined */
tv xllm_template_global(const char *name, size_t n);
/* obj.name per jinja2's sandboxed getattr (methods, dict keys, namespace, loop). */
tv xllm_template_getattr(tp_rt *rt, tv obj, const char *name, size_t n);
/* obj[key] per jinja2's getitem (out of range / missing gives undefined). */
tv xllm_template_getitem(tp_rt *rt, tv obj, tv key);
/* Calls a TV_FUNC. */
tv xllm_template_call_builtin(tp_rt *rt, tv fn, const tp_args *a);
/* Calls a macro (eval.c). */
tv xllm_template_call_macro(tp_rt *rt, tv m, const tp_args *a);
/* Items of an iterable as a list: list/tuple itself, string chars, dict keys, undefined empty;
 * fails for anything else. */
const tv_list *xllm_template_iter(tp_rt *rt, tv v);
/* Counts a step; fails past the limit. */
void xllm_template_step(tp_rt *rt);

#endif
