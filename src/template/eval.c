/* Chat-template evaluator: walks the AST with jinja2's semantics (scopes, loops, macros,
 * call/filter/set blocks, Python operators), writing into an arena buffer; bounded in steps,
 * depth, memory and output. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "template/template-impl.h"

/* ------------------------------------------------------------------------------------------ */
/* Scopes                                                                                      */
/* ------------------------------------------------------------------------------------------ */

static tp_scope *scope_new(tp_rt *rt, tp_scope *parent) {
    tp_scope *s = xllm_template_alloc(rt->arena, sizeof(tp_scope));
    s->parent = parent;
    return s;
}

static tv *scope_find_local(tp_scope *s, const char *name) {
    for (size_t i = 0; i < s->n; i++)
        if (!strcmp(s->names[i], name)) return &s->vals[i];
    return NULL;
}

static void scope_set(tp_rt *rt, tp_scope *s, const char *name, tv v) {
    tv *old = scope_find_local(s, name);
    if (old) {
        *old = v;
        return;
    }
    if (s->n == s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 8;
        const char **nn = xllm_template_alloc(rt->arena, cap * sizeof(*nn));
        tv *nv = xllm_template_alloc(rt->arena, cap * sizeof(tv));
        if (s->n) {
            memcpy(nn, s->names, s->n * sizeof(*nn));
            memcpy(nv, s->vals, s->n * sizeof(tv));
        }
        s->names = nn;
        s->vals = nv;
        s->cap = cap;
    }
    s->names[s->n] = name;
    s->vals[s->n] = v;
    s->n++;
}

static tv scope_get(tp_scope *s, const char *name, size_t len) {
    for (; s; s = s->parent) {
        tv *v = scope_find_local(s, name);
        if (v) return *v;
    }
    tv g = xllm_template_global(name, len);
    if (g.t != TV_UNDEF) return g;
    return tv_undef(name);
}

/* ------------------------------------------------------------------------------------------ */
/* Helpers                                                                                     */
/* ------------------------------------------------------------------------------------------ */

void xllm_template_step(tp_rt *rt) {
    if (++rt->steps > rt->limits.max_steps)
        xllm_template_fail(rt, "step limit exceeded (%llu)",
                           (unsigned long long)rt->limits.max_steps);
}

static void enter(tp_rt *rt, const tp_node *nd) {
    rt->line = nd->line;
    xllm_template_step(rt);
    if (++rt->depth > rt->limits.max_depth * 2)
        xllm_template_fail(rt, "recursion too deep (limit %d)", rt->limits.max_depth * 2);
}

static _Noreturn void fail_undefined(tp_rt *rt, tv v) {
    if (v.flag)
        xllm_template_fail(rt, "access to attribute '%s' is unsafe", v.u.s.p ? v.u.s.p : "");
    if (v.u.s.p) xllm_template_fail(rt, "'%.*s' is undefined", (int)v.u.s.n, v.u.s.p);
    xllm_template_fail(rt, "undefined value");
}

static bool is_intlike(tv v) {
    return v.t == TV_INT || v.t == TV_BOOL;
}
static int64_t as_int(tv v) {
    return v.t == TV_INT ? v.u.i : (int64_t)v.u.b;
}
static bool is_num(tv v) {
    return v.t == TV_INT || v.t == TV_BOOL || v.t == TV_FLOAT;
}
static double as_f(tv v) {
    return v.t == TV_FLOAT ? v.u.f : (double)as_int(v);
}

static tv eval(tp_rt *rt, tp_scope *sc, const tp_node *nd);
static void exec(tp_rt *rt, tp_scope *sc, const tp_node *nd);

/* ------------------------------------------------------------------------------------------ */
/* Operators                                                                                   */
/* ------------------------------------------------------------------------------------------ */

static _Noreturn void bad_operands(tp_rt *rt, const char *op, tv a, tv b) {
    if (a.t == TV_UNDEF) fail_undefined(rt, a);
    if (b.t == TV_UNDEF) fail_undefined(rt, b);
    xllm_template_fail(rt, "unsupported operand type(s) for %s: '%s' and '%s'", op,
                       xllm_template_type_name(a), xllm_template_type_name(b));
}

static tv repeat(tp_rt *rt, tv seq, int64_t k) {
    if (k < 0) k = 0;
    if (seq.t == TV_LIST && seq.u.l->gen)
        xllm_template_fail(rt, "unsupported operand type(s) for *: 'generator' and 'int'");
    if (seq.t == TV_STR) {
        size_t n = seq.u.s.n;
        if (n && (uint64_t)k > rt->limits.max_memory / n)
            xllm_template_fail(rt, "memory limit exceeded");
        char *p = xllm_template_alloc(rt->arena, n * (size_t)k + 1);
        for (int64_t i = 0; i < k; i++) memcpy(p + (size_t)i * n, seq.u.s.p, n);
        tv r = tv_str(p, n * (size_t)k);
        r.flag = seq.flag;
        return r;
    }
    size_t n = seq.u.l->n;
    if (n && (uint64_t)k > rt->limits.max_memory / (n * sizeof(tv)))
        xllm_template_fail(rt, "memory limit exceeded");
    tv out = xllm_template_new_list(rt, n * (size_t)k, seq.u.l->tuple);
    for (int64_t i = 0; i < k; i++)
        for (size_t j = 0; j < n; j++) xllm_template_list_push(rt, out.u.l, seq.u.l->v[j]);
    return out;
}

static tv concat_seq(tp_rt *rt, tv a, tv b) {
    if (a.t == TV_STR) {
        char *p = xllm_template_alloc(rt->arena, a.u.s.n + b.u.s.n + 1);
        memcpy(p, a.u.s.p, a.u.s.n);
        memcpy(p + a.u.s.n, b.u.s.p, b.u.s.n);
        return tv_str(p, a.u.s.n + b.u.s.n);
    }
    tv out = xllm_template_new_list(rt, a.u.l->n + b.u.l->n, a.u.l->tuple);
    for (size_t i = 0; i < a.u.l->n; i++) xllm_template_list_push(rt, out.u.l, a.u.l->v[i]);
    for (size_t i = 0; i < b.u.l->n; i++) xllm_template_list_push(rt, out.u.l, b.u.l->v[i]);
    return out;
}

/* printf-style "fmt % args" for %s, %r, %d, %i, %f, %% (what templates use). */
tv xllm_template_percent(tp_rt *rt, tv fmt, tv args) {
    const tv *av = &args;
    size_t an = 1, ai = 0;
    if (args.t == TV_LIST && args.u.l->tuple) {
        av = args.u.l->v;
        an = args.u.l->n;
    }
    tp_buf b = {0};
    size_t saved = rt->out_total;
    const char *p = fmt.u.s.p;
    size_t n = fmt.u.s.n;
    for (size_t i = 0; i < n; i++) {
        if (p[i] != '%') {
            xllm_template_buf_putc(rt, &b, p[i]);
            continue;
        }
        if (++i >= n) xllm_template_fail(rt, "incomplete format");
        char c = p[i];
        if (c == '%') {
            xllm_template_buf_putc(rt, &b, '%');
            continue;
        }
        if (ai >= an) xllm_template_fail(rt, "not enough arguments for format string");
        tv a = av[ai++];
        if (c == 's')
            xllm_template_str_of(rt, &b, a);
        else if (c == 'r')
            xllm_template_repr_of(rt, &b, a);
        else if ((c == 'd' || c == 'i') && is_num(a))
            xllm_template_buf_printf(rt, &b, "%lld",
                                     (long long)(a.t == TV_FLOAT ? (int64_t)a.u.f : as_int(a)));
        else if (c == 'f' && is_num(a))
            xllm_template_buf_printf(rt, &b, "%f", as_f(a));
        else
            xllm_template_fail(rt, "unsupported format character '%c'", c);
    }
    if (ai < an && args.t == TV_LIST && args.u.l->tuple)
        xllm_template_fail(rt, "not all arguments converted during string formatting");
    rt->out_total = saved;
    return tv_str(b.p ? b.p : "", b.n);
}

static tv binop(tp_rt *rt, int op, tv a, tv b) {
    switch (op) {
        case OP_ADD:
            if (is_intlike(a) && is_intlike(b)) {
                int64_t r;
                if (__builtin_add_overflow(as_int(a), as_int(b), &r))
                    xllm_template_fail(rt, "integer overflow");
                return tv_int(r);
            }
            if (is_num(a) && is_num(b)) return tv_float(as_f(a) + as_f(b));
            if (a.t == TV_STR && b.t == TV_STR) {
                if (!a.flag && !b.flag) return concat_seq(rt, a, b);
                /* Markup + str escapes the plain operand (markupsafe) */
                tv r = concat_seq(rt, xllm_template_escape(rt, a), xllm_template_escape(rt, b));
                r.flag = 1;
                return r;
            }
            if (a.t == TV_LIST && b.t == TV_LIST && a.u.l->tuple == b.u.l->tuple && !a.u.l->gen &&
                !b.u.l->gen)
                return concat_seq(rt, a, b);
            if (a.t == TV_STR && b.t != TV_UNDEF)
                xllm_template_fail(rt, "can only concatenate str (not \"%s\") to str",
                                   xllm_template_type_name(b));
            bad_operands(rt, "+", a, b);
        case OP_SUB:
            if (is_intlike(a) && is_intlike(b)) {
                int64_t r;
                if (__builtin_sub_overflow(as_int(a), as_int(b), &r))
                    xllm_template_fail(rt, "integer overflow");
                return tv_int(r);
            }
            if (is_num(a) && is_num(b)) return tv_float(as_f(a) - as_f(b));
            bad_operands(rt, "-", a, b);
        case OP_MUL:
            if (is_intlike(a) && is_intlike(b)) {
                int64_t r;
                if (__builtin_mul_overflow(as_int(a), as_int(b), &r))
                    xllm_template_fail(rt, "integer overflow");
                return tv_int(r);
            }
            if (is_num(a) && is_num(b)) return tv_float(as_f(a) * as_f(b));
            if ((a.t == TV_STR || a.t == TV_LIST) && is_intlike(b)) return repeat(rt, a, as_int(b));
            if ((b.t == TV_STR || b.t == TV_LIST) && is_intlike(a)) return repeat(rt, b, as_int(a));
            bad_operands(rt, "*", a, b);
        case OP_DIV:
            if (is_num(a) && is_num(b)) {
                if (as_f(b) == 0) xllm_template_fail(rt, "division by zero");
                return tv_float(as_f(a) / as_f(b));
            }
            bad_operands(rt, "/", a, b);
        case OP_FLOORDIV:
        case OP_MOD:
            if (op == OP_MOD && a.t == TV_STR && b.t != TV_UNDEF)
                return xllm_template_percent(rt, a, b);
            if (is_intlike(a) && is_intlike(b)) {
                int64_t x = as_int(a), y = as_int(b);
                if (y == 0) xllm_template_fail(rt, "integer division or modulo by zero");
                if (x == INT64_MIN && y == -1) xllm_template_fail(rt, "integer overflow");
                int64_t q = x / y, r = x % y;
                if (r != 0 && ((r < 0) != (y < 0))) {
                    q--;
                    r += y;
                }
                return tv_int(op == OP_MOD ? r : q);
            }
            if (is_num(a) && is_num(b)) {
                double x = as_f(a), y = as_f(b);
                if (y == 0) xllm_template_fail(rt, "float division by zero");
                if (op == OP_FLOORDIV) return tv_float(floor(x / y));
                double r = fmod(x, y);
                if (r != 0 && ((r < 0) != (y < 0))) r += y;
                return tv_float(r);
            }
            bad_operands(rt, op == OP_MOD ? "%" : "//", a, b);
        case OP_POW:
            if (is_intlike(a) && is_intlike(b) && as_int(b) >= 0) {
                int64_t base = as_int(a), e = as_int(b), r = 1;
                while (e > 0) {
                    if (e & 1)
                        if (__builtin_mul_overflow(r, base, &r))
                            xllm_template_fail(rt, "integer overflow");
                    e >>= 1;
                    if (e && __builtin_mul_overflow(base, base, &base))
                        xllm_template_fail(rt, "integer overflow");
                }
                return tv_int(r);
            }
            if (is_num(a) && is_num(b)) {
                if (as_f(a) == 0 && as_f(b) < 0)
                    xllm_template_fail(rt, "0.0 cannot be raised to a negative power");
                return tv_float(pow(as_f(a), as_f(b)));
            }
            bad_operands(rt, "**", a, b);
        default:
            xllm_template_fail(rt, "bad operator");
    }
}

/* a < b as Python orders values: -1, 0, 1; fails for unordered types. */
static int order(tp_rt *rt, tv a, tv b, const char *op);

int xllm_template_order(tp_rt *rt, tv a, tv b) {
    return order(rt, a, b, "<");
}

static int order(tp_rt *rt, tv a, tv b, const char *op) {
    if (is_num(a) && is_num(b)) {
        if (is_intlike(a) && is_intlike(b))
            return as_int(a) < as_int(b) ? -1 : as_int(a) > as_int(b);
        double x = as_f(a), y = as_f(b);
        return x < y ? -1 : x > y ? 1 : 0;
    }
    if (a.t == TV_STR && b.t == TV_STR) {
        size_t n = a.u.s.n < b.u.s.n ? a.u.s.n : b.u.s.n;
        int c = memcmp(a.u.s.p, b.u.s.p, n);
        if (c) return c < 0 ? -1 : 1;
        return a.u.s.n < b.u.s.n ? -1 : a.u.s.n > b.u.s.n;
    }
    if (a.t == TV_LIST && b.t == TV_LIST && a.u.l->tuple == b.u.l->tuple && !a.u.l->gen &&
        !b.u.l->gen) {
        size_t n = a.u.l->n < b.u.l->n ? a.u.l->n : b.u.l->n;
        for (size_t i = 0; i < n; i++) {
            if (xllm_template_equal(rt, a.u.l->v[i], b.u.l->v[i])) continue;
            return order(rt, a.u.l->v[i], b.u.l->v[i], op);
        }
        return a.u.l->n < b.u.l->n ? -1 : a.u.l->n > b.u.l->n;
    }
    if (a.t == TV_UNDEF) fail_undefined(rt, a);
    if (b.t == TV_UNDEF) fail_undefined(rt, b);
    xllm_template_fail(rt, "'%s' not supported between instances of '%s' and '%s'", op,
                       xllm_template_type_name(a), xllm_template_type_name(b));
}

static bool contains(tp_rt *rt, tv hay, tv needle) {
    switch (hay.t) {
        case TV_STR:
            if (needle.t != TV_STR) {
                if (needle.t == TV_UNDEF) fail_undefined(rt, needle);
                xllm_template_fail(rt, "'in <string>' requires string as left operand, not %s",
                                   xllm_template_type_name(needle));
            }
            if (needle.u.s.n == 0) return true;
            if (needle.u.s.n > hay.u.s.n) return false;
            return memmem(hay.u.s.p, hay.u.s.n, needle.u.s.p, needle.u.s.n) != NULL;
        case TV_LIST:
            for (size_t i = 0; i < hay.u.l->n; i++)
                if (xllm_template_equal(rt, hay.u.l->v[i], needle)) return true;
            return false;
        case TV_DICT:
            return xllm_template_dict_get(rt, hay.u.d, needle) != NULL;
        case TV_UNDEF:
            return false;
        default:
            xllm_template_fail(rt, "argument of type '%s' is not iterable",
                               xllm_template_type_name(hay));
    }
}

static bool compare(tp_rt *rt, int op, tv a, tv b) {
    switch (op) {
        case OP_EQ:
            return xllm_template_equal(rt, a, b);
        case OP_NE:
            return !xllm_template_equal(rt, a, b);
        case OP_LT:
            return order(rt, a, b, "<") < 0;
        case OP_LE:
            return order(rt, a, b, "<=") <= 0;
        case OP_GT:
            return order(rt, a, b, ">") > 0;
        case OP_GE:
            return order(rt, a, b, ">=") >= 0;
        case OP_IN:
            return contains(rt, b, a);
        case OP_NOTIN:
            return !contains(rt, b, a);
        default:
            return false;
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Slices                                                                                      */
/* ------------------------------------------------------------------------------------------ */

static bool slice_bound(tp_rt *rt, tv v, int64_t *out) {
    if (v.t == TV_NONE || v.t == TV_UNDEF) return false;
    if (!is_intlike(v)) xllm_template_fail(rt, "slice indices must be integers or None");
    *out = as_int(v);
    return true;
}

static tv do_slice(tp_rt *rt, tv obj, tv vs, tv ve, tv vstep) {
    int64_t step = 1, start, stop;
    if (slice_bound(rt, vstep, &step) && step == 0)
        xllm_template_fail(rt, "slice step cannot be zero");
    bool is_str = obj.t == TV_STR;
    if (!is_str && (obj.t != TV_LIST || obj.u.l->gen)) return tv_undef(NULL);
    int64_t len =
        is_str ? (int64_t)xllm_template_utf8_len(obj.u.s.p, obj.u.s.n) : (int64_t)obj.u.l->n;
    bool has_s = slice_bound(rt, vs, &start), has_e = slice_bound(rt, ve, &stop);
    if (step > 0) {
        if (!has_s) start = 0;
        if (!has_e) stop = len;
        if (start < 0) start = start + len < 0 ? 0 : start + len;
        if (stop < 0) stop = stop + len < 0 ? 0 : stop + len;
        if (start > len) start = len;
        if (stop > len) stop = len;
    } else {
        if (!has_s) start = len - 1;
        if (!has_e)
            stop = -1;
        else if (stop < 0)
            stop = stop + len < -1 ? -1 : stop + len;
        if (has_s && start < 0) start = start + len < -1 ? -1 : start + len;
        if (start >= len) start = len - 1;
        if (stop >= len) stop = len - 1;
    }
    if (is_str) {
        /* code point offsets */
        const char *p = obj.u.s.p;
        size_t n = obj.u.s.n;
        if (step == 1) {
            if (stop <= start) return tv_str("", 0);
            size_t a = xllm_template_utf8_offset(p, n, start);
            size_t b = a + xllm_template_utf8_offset(p + a, n - a, stop - start);
            return tv_str(p + a, b - a);
        }
        size_t *offs = xllm_template_alloc(rt->arena, ((size_t)len + 1) * sizeof(size_t));
        size_t o = 0;
        for (int64_t i = 0; i < len; i++) {
            offs[i] = o;
            uint32_t cp;
            o += xllm_template_utf8_decode(p + o, n - o, &cp);
        }
        offs[len] = n;
        tp_buf b = {0};
        size_t saved = rt->out_total;
        for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step)
            xllm_template_buf_put(rt, &b, p + offs[i], offs[i + 1] - offs[i]);
        rt->out_total = saved;
        return tv_str(b.p ? b.p : "", b.n);
    }
    tv out = xllm_template_new_list(rt, 0, obj.u.l->tuple);
    for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step)
        xllm_template_list_push(rt, out.u.l, obj.u.l->v[i]);
    return out;
}

/* ------------------------------------------------------------------------------------------ */
/* Calls                                                                                       */
/* ------------------------------------------------------------------------------------------ */

static tp_args eval_args(tp_rt *rt, tp_scope *sc, const tp_node *nd) {
    tp_args a = {0};
    size_t n = nd->nkids;
    if (!n) return a;
    tv *pos = xllm_template_alloc(rt->arena, n * sizeof(tv));
    tv *kw = xllm_template_alloc(rt->arena, n * sizeof(tv));
    const char **kwn = xllm_template_alloc(rt->arena, n * sizeof(char *));
    for (size_t i = 0; i < n; i++) {
        tv v = eval(rt, sc, nd->kids[i]);
        if (nd->names[i]) {
            kwn[a.nkw] = nd->names[i];
            kw[a.nkw++] = v;
        } else {
            pos[a.npos++] = v;
        }
    }
    a.pos = pos;
    a.kw = kw;
    a.kwname = kwn;
    return a;
}

static tv capture(tp_rt *rt, tp_scope *sc, const tp_node *body) {
    tp_buf *saved = rt->out;
    tp_buf b = {0};
    rt->out = &b;
    exec(rt, sc, body);
    rt->out = saved;
    /* captured text is counted again when it is written out */
    rt->out_total -= b.n;
    return tv_str(b.p ? b.p : "", b.n);
}

tv xllm_template_call_macro(tp_rt *rt, tv mv, const tp_args *a) {
    const tp_macro *m = mv.u.m;
    const tp_node *def = m->def;
    if (a->npos > def->nkids)
        xllm_template_fail(rt, "macro '%s' takes not more than %u argument(s)",
                           def->name ? def->name : "caller", def->nkids);
    tp_scope *sc = scope_new(rt, m->closure);
    bool *set = xllm_template_alloc(rt->arena, def->nkids + 1);
    for (size_t i = 0; i < a->npos; i++) {
        scope_set(rt, sc, def->names[i], a->pos[i]);
        set[i] = true;
    }
    for (size_t k = 0; k < a->nkw; k++) {
        size_t i = 0;
        for (; i < def->nkids; i++)
            if (!strcmp(def->names[i], a->kwname[k])) break;
        if (i == def->nkids) {
            if (!strcmp(a->kwname[k], "caller") && def->kind == N_MACRO) {
                scope_set(rt, sc, "caller", a->kw[k]);
                continue;
            }
            xllm_template_fail(rt, "macro '%s' has no argument '%s'",
                               def->name ? def->name : "caller", a->kwname[k]);
        }
        if (set[i])
            xllm_template_fail(rt, "macro '%s' got multiple values for argument '%s'",
                               def->name ? def->name : "caller", a->kwname[k]);
        scope_set(rt, sc, def->names[i], a->kw[k]);
        set[i] = true;
    }
    for (size_t i = 0; i < def->nkids; i++) {
        if (set[i]) continue;
        tv v = def->kids[i] ? eval(rt, sc, def->kids[i]) : tv_undef(def->names[i]);
        scope_set(rt, sc, def->names[i], v);
    }
    if (m->caller.t == TV_MACRO) scope_set(rt, sc, "caller", m->caller);
    int saved_ctl = rt->loop_ctl;
    tv out = capture(rt, sc, def->b);
    rt->loop_ctl = saved_ctl;
    return out;
}

static tv call_value(tp_rt *rt, tv fn, const tp_args *a) {
    switch (fn.t) {
        case TV_FUNC:
            return xllm_template_call_builtin(rt, fn, a);
        case TV_MACRO:
            return xllm_template_call_macro(rt, fn, a);
        case TV_UNDEF:
            fail_undefined(rt, fn);
        default:
            xllm_template_fail(rt, "'%s' object is not callable", xllm_template_type_name(fn));
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Expressions                                                                                 */
/* ------------------------------------------------------------------------------------------ */

static tv eval_filter(tp_rt *rt, tp_scope *sc, const tp_node *nd, tv subject) {
    tp_args a = eval_args(rt, sc, nd);
    rt->line = nd->line;
    return xllm_template_filter(rt, nd->id, subject, &a);
}

/* A filter chain whose innermost subject is NULL (filter blocks, set blocks). */
static tv apply_chain(tp_rt *rt, tp_scope *sc, const tp_node *nd, tv subject) {
    if (!nd) return subject;
    tv v = apply_chain(rt, sc, nd->a, subject);
    return eval_filter(rt, sc, nd, v);
}

static tv eval(tp_rt *rt, tp_scope *sc, const tp_node *nd) {
    enter(rt, nd);
    tv r;
    switch (nd->kind) {
        case N_LIT:
            r = nd->lit;
            break;
        case N_NAME:
            r = scope_get(sc, nd->name, nd->name_len);
            break;
        case N_LIST:
        case N_TUPLE:
            r = xllm_template_new_list(rt, nd->nkids, nd->kind == N_TUPLE);
            for (uint32_t i = 0; i < nd->nkids; i++)
                xllm_template_list_push(rt, r.u.l, eval(rt, sc, nd->kids[i]));
            break;
        case N_DICT:
            r = xllm_template_new_dict(rt, nd->nkids / 2);
            for (uint32_t i = 0; i + 1 < nd->nkids; i += 2) {
                tv k = eval(rt, sc, nd->kids[i]);
                if (k.t == TV_LIST && !k.u.l->tuple)
                    xllm_template_fail(rt, "unhashable type: 'list'");
                if (k.t == TV_DICT) xllm_template_fail(rt, "unhashable type: 'dict'");
                tv v = eval(rt, sc, nd->kids[i + 1]);
                xllm_template_dict_set(rt, r.u.d, k, v);
            }
            break;
        case N_ATTR: {
            tv obj = eval(rt, sc, nd->a);
            rt->line = nd->line;
            if (obj.t == TV_UNDEF) fail_undefined(rt, obj);
            r = xllm_template_getattr(rt, obj, nd->name, nd->name_len);
            break;
        }
        case N_INDEX: {
            tv obj = eval(rt, sc, nd->a);
            tv key = eval(rt, sc, nd->b);
            rt->line = nd->line;
            if (obj.t == TV_UNDEF) fail_undefined(rt, obj);
            r = xllm_template_getitem(rt, obj, key);
            break;
        }
        case N_SLICE: {
            tv obj = eval(rt, sc, nd->a);
            tv s = nd->b ? eval(rt, sc, nd->b) : tv_none();
            tv e = nd->c ? eval(rt, sc, nd->c) : tv_none();
            tv st = nd->d ? eval(rt, sc, nd->d) : tv_none();
            rt->line = nd->line;
            if (obj.t == TV_UNDEF) fail_undefined(rt, obj);
            r = do_slice(rt, obj, s, e, st);
            break;
        }
        case N_CALL: {
            tv fn = eval(rt, sc, nd->a);
            tp_args a = eval_args(rt, sc, nd);
            rt->line = nd->line;
            r = call_value(rt, fn, &a);
            break;
        }
        case N_FILTER:
            r = eval_filter(rt, sc, nd, eval(rt, sc, nd->a));
            break;
        case N_TEST: {
            tv v = eval(rt, sc, nd->a);
            tp_args a = eval_args(rt, sc, nd);
            rt->line = nd->line;
            bool b = xllm_template_test(rt, nd->id, v, &a);
            r = tv_bool(nd->flag ? !b : b);
            break;
        }
        case N_NEG:
        case N_POS: {
            tv v = eval(rt, sc, nd->a);
            rt->line = nd->line;
            if (v.t == TV_UNDEF) fail_undefined(rt, v);
            if (!is_num(v))
                xllm_template_fail(rt, "bad operand type for unary %c: '%s'",
                                   nd->kind == N_NEG ? '-' : '+', xllm_template_type_name(v));
            if (nd->kind == N_POS)
                r = v.t == TV_BOOL ? tv_int(v.u.b) : v;
            else if (v.t == TV_FLOAT)
                r = tv_float(-v.u.f);
            else {
                if (as_int(v) == INT64_MIN) xllm_template_fail(rt, "integer overflow");
                r = tv_int(-as_int(v));
            }
            break;
        }
        case N_NOT:
            r = tv_bool(!xllm_template_truthy(eval(rt, sc, nd->a)));
            break;
        case N_AND: {
            tv a = eval(rt, sc, nd->a);
            r = xllm_template_truthy(a) ? eval(rt, sc, nd->b) : a;
            break;
        }
        case N_OR: {
            tv a = eval(rt, sc, nd->a);
            r = xllm_template_truthy(a) ? a : eval(rt, sc, nd->b);
            break;
        }
        case N_BIN: {
            tv a = eval(rt, sc, nd->a);
            tv b = eval(rt, sc, nd->b);
            rt->line = nd->line;
            r = binop(rt, nd->op, a, b);
            break;
        }
        case N_CMP: {
            tv left = eval(rt, sc, nd->a);
            r = tv_bool(true);
            for (uint32_t i = 0; i < nd->nkids; i++) {
                tv right = eval(rt, sc, nd->kids[i]);
                rt->line = nd->line;
                if (!compare(rt, nd->ops[i], left, right)) {
                    r = tv_bool(false);
                    break;
                }
                left = right;
            }
            break;
        }
        case N_COND:
            if (xllm_template_truthy(eval(rt, sc, nd->a)))
                r = eval(rt, sc, nd->b);
            else
                r = nd->c ? eval(rt, sc, nd->c) : tv_undef(NULL);
            break;
        case N_CONCAT: {
            tp_buf b = {0};
            size_t saved = rt->out_total;
            for (uint32_t i = 0; i < nd->nkids; i++)
                xllm_template_str_of(rt, &b, eval(rt, sc, nd->kids[i]));
            rt->out_total = saved;
            r = tv_str(b.p ? b.p : "", b.n);
            break;
        }
        default:
            xllm_template_fail(rt, "not an expression");
    }
    rt->depth--;
    return r;
}

/* ------------------------------------------------------------------------------------------ */
/* Statements                                                                                  */
/* ------------------------------------------------------------------------------------------ */

static void assign(tp_rt *rt, tp_scope *sc, const tp_node *target, tv v) {
    if (target->kind == N_NAME) {
        scope_set(rt, sc, target->name, v);
    } else if (target->kind == N_ATTR) {
        tv ns = scope_get(sc, target->a->name, target->a->name_len);
        if (ns.t != TV_NS)
            xllm_template_fail(rt, "cannot assign attribute on non-namespace object");
        xllm_template_dict_set(rt, ns.u.d, tv_str(target->name, target->name_len), v);
    } else { /* tuple unpacking */
        const tv_list *items = xllm_template_iter(rt, v);
        if (items->n != target->nkids)
            xllm_template_fail(rt, "cannot unpack %zu values into %u names", items->n,
                               target->nkids);
        for (uint32_t i = 0; i < target->nkids; i++) assign(rt, sc, target->kids[i], items->v[i]);
    }
}

static void exec_for(tp_rt *rt, tp_scope *sc, const tp_node *nd) {
    tv seq = eval(rt, sc, nd->a);
    rt->line = nd->line;
    const tv_list *items = xllm_template_iter(rt, seq);
    if (nd->c) { /* loop filter: sees only the target */
        tv kept = xllm_template_new_list(rt, items->n, false);
        for (size_t i = 0; i < items->n; i++) {
            tp_scope *fs = scope_new(rt, sc);
            assign(rt, fs, nd->d, items->v[i]);
            if (xllm_template_truthy(eval(rt, fs, nd->c)))
                xllm_template_list_push(rt, kept.u.l, items->v[i]);
        }
        items = kept.u.l;
    }
    if (items->n == 0) {
        if (nd->e) exec(rt, scope_new(rt, sc), nd->e);
        return;
    }
    tp_loop *loop = xllm_template_alloc(rt->arena, sizeof(tp_loop));
    loop->items = items;
    tv outer = scope_get(sc, "loop", 4);
    loop->depth0 = outer.t == TV_LOOP ? outer.u.loop->depth0 + 1 : 0;
    tv lv = {0};
    lv.t = TV_LOOP;
    lv.u.loop = loop;
    for (size_t i = 0; i < items->n; i++) {
        loop->index0 = (int64_t)i;
        tp_scope *ls = scope_new(rt, sc);
        assign(rt, ls, nd->d, items->v[i]);
        scope_set(rt, ls, "loop", lv);
        exec(rt, ls, nd->b);
        if (rt->loop_ctl) {
            int ctl = rt->loop_ctl;
            rt->loop_ctl = 0;
            if (ctl == 1) break;
        }
    }
}

static void exec(tp_rt *rt, tp_scope *sc, const tp_node *nd) {
    enter(rt, nd);
    switch (nd->kind) {
        case N_BODY:
            for (uint32_t i = 0; i < nd->nkids && !rt->loop_ctl; i++) exec(rt, sc, nd->kids[i]);
            break;
        case N_TEXT:
            xllm_template_buf_put(rt, rt->out, nd->name, nd->name_len);
            break;
        case N_OUT: {
            tv v = eval(rt, sc, nd->a);
            xllm_template_str_of(rt, rt->out, v);
            break;
        }
        case N_IF:
            if (xllm_template_truthy(eval(rt, sc, nd->a)))
                exec(rt, sc, nd->b);
            else if (nd->c)
                exec(rt, sc, nd->c);
            break;
        case N_FOR:
            exec_for(rt, sc, nd);
            break;
        case N_SET: {
            tv v = eval(rt, sc, nd->a);
            rt->line = nd->line;
            assign(rt, sc, nd->d, v);
            break;
        }
        case N_SETBLOCK: {
            tv v = capture(rt, sc, nd->b);
            v = apply_chain(rt, sc, nd->a, v);
            assign(rt, sc, nd->d, v);
            break;
        }
        case N_MACRO: {
            tp_macro *m = xllm_template_alloc(rt->arena, sizeof(tp_macro));
            m->def = nd;
            m->closure = sc;
            m->caller = tv_undef(NULL);
            tv mv = {0};
            mv.t = TV_MACRO;
            mv.u.m = m;
            scope_set(rt, sc, nd->name, mv);
            break;
        }
        case N_CALLBLOCK: {
            tp_macro *caller = xllm_template_alloc(rt->arena, sizeof(tp_macro));
            caller->def = nd;
            caller->closure = sc;
            caller->caller = tv_undef(NULL);
            tv cv = {0};
            cv.t = TV_MACRO;
            cv.u.m = caller;
            tv fn = eval(rt, sc, nd->a->a);
            tp_args a = eval_args(rt, sc, nd->a);
            rt->line = nd->line;
            tv r;
            if (fn.t == TV_MACRO) {
                tp_macro *m = xllm_template_alloc(rt->arena, sizeof(tp_macro));
                *m = *fn.u.m;
                m->caller = cv;
                tv mv = fn;
                mv.u.m = m;
                r = xllm_template_call_macro(rt, mv, &a);
            } else {
                r = call_value(rt, fn, &a);
            }
            xllm_template_str_of(rt, rt->out, r);
            break;
        }
        case N_FILTERBLK: {
            tv v = capture(rt, sc, nd->b);
            v = apply_chain(rt, sc, nd->a, v);
            xllm_template_str_of(rt, rt->out, v);
            break;
        }
        case N_WITH: {
            tp_scope *ws = scope_new(rt, sc);
            for (uint32_t i = 0; i < nd->nkids; i++)
                scope_set(rt, ws, nd->names[i], eval(rt, sc, nd->kids[i]));
            exec(rt, ws, nd->b);
            break;
        }
        case N_BREAK:
            rt->loop_ctl = 1;
            break;
        case N_CONTINUE:
            rt->loop_ctl = 2;
            break;
        default:
            xllm_template_fail(rt, "not a statement");
    }
    rt->depth--;
}

/* ------------------------------------------------------------------------------------------ */
/* Entry                                                                                       */
/* ------------------------------------------------------------------------------------------ */

static tv from_json(tp_rt *rt, const json_t *j, int depth) {
    if (depth > rt->limits.max_depth) xllm_template_fail(rt, "JSON nested too deeply");
    switch (json_typeof(j)) {
        case JSON_NULL:
            return tv_none();
        case JSON_TRUE:
            return tv_bool(true);
        case JSON_FALSE:
            return tv_bool(false);
        case JSON_INTEGER:
            return tv_int((int64_t)json_integer_value(j));
        case JSON_REAL:
            return tv_float(json_real_value(j));
        case JSON_STRING:
            return xllm_template_str_dup(rt, json_string_value(j), json_string_length(j));
        case JSON_ARRAY: {
            size_t n = json_array_size(j);
            tv l = xllm_template_new_list(rt, n, false);
            for (size_t i = 0; i < n; i++)
                xllm_template_list_push(rt, l.u.l, from_json(rt, json_array_get(j, i), depth + 1));
            return l;
        }
        case JSON_OBJECT: {
            tv d = xllm_template_new_dict(rt, json_object_size(j));
            const char *key;
            json_t *val;
            json_object_foreach((json_t *)j, key, val) {
                tv k = xllm_template_str_dup(rt, key, strlen(key));
                xllm_template_dict_set(rt, d.u.d, k, from_json(rt, val, depth + 1));
            }
            return d;
        }
        default:
            return tv_none();
    }
}

static void render_into(tp_rt *rt, const xllm_template *t, const json_t *vars, tp_buf *out) {
    tp_scope *globals = scope_new(rt, NULL);
    const char *key;
    json_t *val;
    json_object_foreach((json_t *)vars, key, val) {
        size_t kn = strlen(key);
        char *name = xllm_template_alloc(rt->arena, kn + 1);
        memcpy(name, key, kn);
        scope_set(rt, globals, name, from_json(rt, val, 0));
    }
    tp_scope *root = scope_new(rt, globals);
    rt->out = out;
    exec(rt, root, t->root);
}

xllm_status xllm_template_render(const xllm_template *t, const json_t *vars, int64_t now,
                                 char **out, size_t *out_len, char *err, size_t err_size) {
    *out = NULL;
    if (out_len) *out_len = 0;
    if (!t || !vars || !json_is_object(vars)) {
        if (err && err_size) snprintf(err, err_size, "render needs a template and a JSON object");
        return XLLM_ERR_INVALID_ARG;
    }
    tp_rt *rt = calloc(1, sizeof(*rt));
    tp_arena *arena = calloc(1, sizeof(*arena));
    tp_buf *buf = calloc(1, sizeof(*buf));
    if (!rt || !arena || !buf) {
        free(rt);
        free(arena);
        free(buf);
        return XLLM_ERR_NOMEM;
    }
    arena->limit = t->limits.max_memory;
    arena->rt = rt;
    rt->arena = arena;
    rt->limits = t->limits;
    rt->err = err;
    rt->err_size = err_size;
    rt->now = now;
    rt->line = 1;
    if (err && err_size) err[0] = 0;
    if (setjmp(rt->jb)) {
        xllm_template_arena_free(arena);
        free(arena);
        free(rt);
        free(buf);
        return XLLM_ERR_FORMAT;
    }
    render_into(rt, t, vars, buf);
    char *s = malloc(buf->n + 1);
    xllm_status st = XLLM_OK;
    if (s) {
        if (buf->n) memcpy(s, buf->p, buf->n);
        s[buf->n] = 0;
        *out = s;
        if (out_len) *out_len = buf->n;
    } else {
        st = XLLM_ERR_NOMEM;
        if (err && err_size) snprintf(err, err_size, "out of memory for the rendered text");
    }
    xllm_template_arena_free(arena);
    free(arena);
    free(rt);
    free(buf);
    return st;
}
