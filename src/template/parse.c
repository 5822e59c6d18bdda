/* Chat-template lexer and parser: Jinja source -> AST, with jinja2's whitespace rules as
 * transformers configures them (trim_blocks, lstrip_blocks, no trailing newline). */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "template/template-impl.h"

/* ------------------------------------------------------------------------------------------ */
/* Errors                                                                                      */
/* ------------------------------------------------------------------------------------------ */

_Noreturn void xllm_template_fail(tp_rt *rt, const char *fmt, ...) {
    if (rt->err && rt->err_size) {
        int k = snprintf(rt->err, rt->err_size, "line %d: ", rt->line);
        if (k < 0) k = 0;
        if ((size_t)k < rt->err_size) {
            va_list ap;
            va_start(ap, fmt);
            vsnprintf(rt->err + k, rt->err_size - (size_t)k, fmt, ap);
            va_end(ap);
        }
    }
    longjmp(rt->jb, 1);
}

/* ------------------------------------------------------------------------------------------ */
/* Lexer                                                                                       */
/* ------------------------------------------------------------------------------------------ */

typedef enum tk_type {
    TK_EOF = 0,
    TK_TEXT,
    TK_VAR_BEGIN,
    TK_VAR_END,
    TK_BLOCK_BEGIN,
    TK_BLOCK_END,
    TK_NAME,
    TK_STRING,
    TK_INT,
    TK_FLOAT,
    TK_OP,
} tk_type;

typedef struct tk {
    uint8_t type;
    int line;
    const char *p; /* text, name, decoded string (NUL-terminated) or operator */
    size_t n;
    int64_t i;
    double f;
} tk;

typedef struct lexer {
    tp_rt *rt;
    const char *s;
    size_t n, pos;
    int line;
    bool line_starting;
    tk *toks;
    size_t ntok, cap;
} lexer;

static void emit(lexer *L, uint8_t type, const char *p, size_t n, int line) {
    if (L->ntok == L->cap) {
        size_t cap = L->cap ? L->cap * 2 : 256;
        tk *t = xllm_template_alloc(L->rt->arena, cap * sizeof(tk));
        if (L->ntok) memcpy(t, L->toks, L->ntok * sizeof(tk));
        L->toks = t;
        L->cap = cap;
    }
    tk *t = &L->toks[L->ntok++];
    memset(t, 0, sizeof(*t));
    t->type = type;
    t->p = p;
    t->n = n;
    t->line = line;
}

static int count_nl(const char *p, size_t n) {
    int k = 0;
    for (size_t i = 0; i < n; i++) k += p[i] == '\n';
    return k;
}

/* Python whitespace (\s in a str regex) at p: its byte length, or 0. */
static size_t ws_at(const char *p, size_t n) {
    if (n == 0) return 0;
    uint32_t cp;
    size_t k = xllm_template_utf8_decode(p, n, &cp);
    return xllm_template_is_space(cp) ? k : 0;
}

static size_t skip_ws(const char *s, size_t n, size_t pos) {
    size_t k;
    while (pos < n && (k = ws_at(s + pos, n - pos))) pos += k;
    return pos;
}

/* Length of text with trailing Python whitespace removed. */
static size_t rstrip_len(const char *p, size_t n) {
    size_t end = n;
    while (end > 0) {
        size_t st = end - 1;
        while (st > 0 && ((unsigned char)p[st] & 0xc0) == 0x80) st--;
        if (!ws_at(p + st, end - st)) break;
        end = st;
    }
    return end;
}

/* Text before a tag, with "-" / lstrip_blocks applied; emits it. */
static void emit_text(lexer *L, const char *p, size_t n, char sign, bool is_var) {
    int line = L->line;
    L->line += count_nl(p, n);
    if (sign == '-') {
        n = rstrip_len(p, n);
    } else if (sign != '+' && !is_var) {
        size_t l_pos = n;
        while (l_pos > 0 && p[l_pos - 1] != '\n') l_pos--;
        if ((l_pos > 0 || L->line_starting) && l_pos < n) {
            size_t q = l_pos;
            size_t k;
            while (q < n && (k = ws_at(p + q, n - q))) q += k;
            if (q == n) n = l_pos;
        }
    }
    if (n) emit(L, TK_TEXT, p, n, line);
}

static bool starts(const lexer *L, size_t pos, const char *lit) {
    size_t k = strlen(lit);
    return pos + k <= L->n && !memcmp(L->s + pos, lit, k);
}

/* Decodes a string literal body (Python unicode-escape rules) into the arena. */
static const char *decode_string(lexer *L, const char *p, size_t n, size_t *out_n) {
    char *o = xllm_template_alloc(L->rt->arena, n + 1);
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        char c = p[i];
        if (c != '\\' || i + 1 >= n) {
            o[k++] = c;
            continue;
        }
        char e = p[++i];
        uint32_t cp = 0;
        int hex = 0;
        switch (e) {
            case 'n':
                o[k++] = '\n';
                continue;
            case 't':
                o[k++] = '\t';
                continue;
            case 'r':
                o[k++] = '\r';
                continue;
            case '\\':
                o[k++] = '\\';
                continue;
            case '\'':
                o[k++] = '\'';
                continue;
            case '"':
                o[k++] = '"';
                continue;
            case 'a':
                o[k++] = '\a';
                continue;
            case 'b':
                o[k++] = '\b';
                continue;
            case 'f':
                o[k++] = '\f';
                continue;
            case 'v':
                o[k++] = '\v';
                continue;
            case '\n':
                continue; /* line continuation */
            case 'x':
                hex = 2;
                break;
            case 'u':
                hex = 4;
                break;
            case 'U':
                hex = 8;
                break;
            default:
                if (e >= '0' && e <= '7') {
                    int d = 0;
                    while (d < 3 && i < n && p[i] >= '0' && p[i] <= '7') {
                        cp = cp * 8 + (uint32_t)(p[i] - '0');
                        i++;
                        d++;
                    }
                    i--;
                    hex = -1;
                    break;
                }
                o[k++] = '\\';
                o[k++] = e;
                continue;
        }
        if (hex > 0) {
            for (int d = 0; d < hex; d++) {
                if (i + 1 >= n) {
                    L->rt->line = L->line;
                    xllm_template_fail(L->rt, "truncated \\%c escape in a string", e);
                }
                char h = p[++i];
                int v = h >= '0' && h <= '9'   ? h - '0'
                        : h >= 'a' && h <= 'f' ? h - 'a' + 10
                        : h >= 'A' && h <= 'F' ? h - 'A' + 10
                                               : -1;
                if (v < 0) {
                    L->rt->line = L->line;
                    xllm_template_fail(L->rt, "bad \\%c escape in a string", e);
                }
                cp = cp * 16 + (uint32_t)v;
            }
        }
        if (cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) {
            L->rt->line = L->line;
            xllm_template_fail(L->rt, "escape gives an invalid code point");
        }
        /* encode cp as UTF-8 (fits: an escape is at least as long as its encoding) */
        if (cp < 0x80) {
            o[k++] = (char)cp;
        } else if (cp < 0x800) {
            o[k++] = (char)(0xc0 | (cp >> 6));
            o[k++] = (char)(0x80 | (cp & 0x3f));
        } else if (cp < 0x10000) {
            o[k++] = (char)(0xe0 | (cp >> 12));
            o[k++] = (char)(0x80 | ((cp >> 6) & 0x3f));
            o[k++] = (char)(0x80 | (cp & 0x3f));
        } else {
            o[k++] = (char)(0xf0 | (cp >> 18));
            o[k++] = (char)(0x80 | ((cp >> 12) & 0x3f));
            o[k++] = (char)(0x80 | ((cp >> 6) & 0x3f));
            o[k++] = (char)(0x80 | (cp & 0x3f));
        }
    }
    o[k] = 0;
    *out_n = k;
    return o;
}

static bool is_digit(char c) {
    return c >= '0' && c <= '9';
}
static bool is_name_start(char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
}
static bool is_name_char(char c) {
    return is_name_start(c) || is_digit(c);
}

/* Digits with single underscores between them: returns the end, or start when none. */
static size_t scan_digits(const char *s, size_t n, size_t pos) {
    size_t p = pos;
    if (p >= n || !is_digit(s[p])) return pos;
    while (p < n) {
        if (is_digit(s[p]))
            p++;
        else if (s[p] == '_' && p + 1 < n && is_digit(s[p + 1]))
            p++;
        else
            break;
    }
    return p;
}

static void lex_number(lexer *L) {
    const char *s = L->s;
    size_t n = L->n, st = L->pos;
    char buf[128];
    /* float: digits ( (.digits)? e[+-]digits | .digits ) */
    size_t p = scan_digits(s, n, st), end = 0;
    bool is_float = false;
    if (p > st) {
        size_t q = p;
        if (q < n && s[q] == '.') {
            size_t r = scan_digits(s, n, q + 1);
            if (r > q + 1) {
                q = r;
                is_float = true;
            }
        }
        if (q < n && (s[q] == 'e' || s[q] == 'E')) {
            size_t r = q + 1;
            if (r < n && (s[r] == '+' || s[r] == '-')) r++;
            size_t t = scan_digits(s, n, r);
            if (t > r) {
                q = t;
                is_float = true;
            }
        }
        if (is_float) end = q;
    }
    if (is_float) {
        size_t k = 0;
        for (size_t i = st; i < end && k + 1 < sizeof(buf); i++)
            if (s[i] != '_') buf[k++] = s[i];
        buf[k] = 0;
        emit(L, TK_FLOAT, s + st, end - st, L->line);
        L->toks[L->ntok - 1].f = strtod(buf, NULL);
        L->pos = end;
        return;
    }
    int base = 10;
    size_t q = st;
    if (s[q] == '0' && q + 1 < n &&
        (s[q + 1] == 'x' || s[q + 1] == 'X' || s[q + 1] == 'o' || s[q + 1] == 'O' ||
         s[q + 1] == 'b' || s[q + 1] == 'B')) {
        char b = (char)(s[q + 1] | 0x20);
        base = b == 'x' ? 16 : b == 'o' ? 8 : 2;
        q += 2;
    }
    uint64_t v = 0;
    bool any = false;
    while (q < n) {
        char c = s[q];
        int d = c >= '0' && c <= '9'                     ? c - '0'
                : (c | 0x20) >= 'a' && (c | 0x20) <= 'f' ? (c | 0x20) - 'a' + 10
                                                         : -1;
        if (c == '_' && any) {
            q++;
            continue;
        }
        if (d < 0 || d >= base) break;
        if (v > (UINT64_MAX - (uint64_t)d) / (uint64_t)base || v * base + (uint64_t)d > INT64_MAX) {
            L->rt->line = L->line;
            xllm_template_fail(L->rt, "integer literal too large");
        }
        v = v * (uint64_t)base + (uint64_t)d;
        any = true;
        q++;
    }
    if (!any) {
        L->rt->line = L->line;
        xllm_template_fail(L->rt, "bad number literal");
    }
    emit(L, TK_INT, s + st, q - st, L->line);
    L->toks[L->ntok - 1].i = (int64_t)v;
    L->pos = q;
}

static const char *const OPS[] = {"//", "**", "==", "!=", "<=", ">=", "+", "-", "/",
                                  "*",  "%",  "~",  "[",  "]",  "(",  ")", "{", "}",
                                  "<",  ">",  "=",  ".",  ":",  "|",  ",", ";"};

/* Tokens inside {{ }} or {% %} up to and including the end tag. */
static void lex_tag(lexer *L, bool block) {
    char stack[256];
    int depth = 0;
    int start_line = L->line;
    for (;;) {
        if (L->pos >= L->n) {
            L->rt->line = start_line;
            xllm_template_fail(L->rt, "unexpected end of template: missing '%s'",
                               block ? "%}" : "}}");
        }
        const char *s = L->s;
        size_t pos = L->pos;
        if (depth == 0) {
            if (block) {
                if (starts(L, pos, "+%}")) {
                    emit(L, TK_BLOCK_END, NULL, 0, L->line);
                    L->pos = pos + 3;
                    L->line_starting = false;
                    return;
                }
                if (starts(L, pos, "-%}")) {
                    emit(L, TK_BLOCK_END, NULL, 0, L->line);
                    size_t e = skip_ws(s, L->n, pos + 3);
                    L->line += count_nl(s + pos, e - pos);
                    L->line_starting = e > pos + 3 && s[e - 1] == '\n';
                    L->pos = e;
                    return;
                }
                if (starts(L, pos, "%}")) {
                    emit(L, TK_BLOCK_END, NULL, 0, L->line);
                    L->pos = pos + 2;
                    L->line_starting = false;
                    if (L->pos < L->n && s[L->pos] == '\n') { /* trim_blocks */
                        L->pos++;
                        L->line++;
                        L->line_starting = true;
                    }
                    return;
                }
            } else {
                if (starts(L, pos, "-}}")) {
                    emit(L, TK_VAR_END, NULL, 0, L->line);
                    size_t e = skip_ws(s, L->n, pos + 3);
                    L->line += count_nl(s + pos, e - pos);
                    L->line_starting = e > pos + 3 && s[e - 1] == '\n';
                    L->pos = e;
                    return;
                }
                if (starts(L, pos, "}}")) {
                    emit(L, TK_VAR_END, NULL, 0, L->line);
                    L->pos = pos + 2;
                    L->line_starting = false;
                    return;
                }
            }
        }
        size_t w = skip_ws(s, L->n, pos);
        if (w > pos) {
            L->line += count_nl(s + pos, w - pos);
            L->pos = w;
            continue;
        }
        char c = s[pos];
        if (is_digit(c)) {
            lex_number(L);
            continue;
        }
        if (is_name_start(c)) {
            size_t e = pos + 1;
            while (e < L->n && is_name_char(s[e])) e++;
            emit(L, TK_NAME, s + pos, e - pos, L->line);
            L->pos = e;
            continue;
        }
        if (c == '\'' || c == '"') {
            size_t e = pos + 1;
            while (e < L->n && s[e] != c) {
                if (s[e] == '\\') e++;
                e++;
            }
            if (e >= L->n) {
                L->rt->line = L->line;
                xllm_template_fail(L->rt, "unterminated string");
            }
            size_t dn;
            const char *d = decode_string(L, s + pos + 1, e - pos - 1, &dn);
            emit(L, TK_STRING, d, dn, L->line);
            L->line += count_nl(s + pos, e - pos);
            L->pos = e + 1;
            continue;
        }
        bool found = false;
        for (size_t i = 0; i < sizeof(OPS) / sizeof(OPS[0]); i++) {
            if (starts(L, pos, OPS[i])) {
                const char *op = OPS[i];
                if (op[0] == '(' || op[0] == '[' || op[0] == '{') {
                    if (depth == (int)sizeof(stack)) {
                        L->rt->line = L->line;
                        xllm_template_fail(L->rt, "brackets nested too deeply");
                    }
                    stack[depth++] = op[0] == '(' ? ')' : op[0] == '[' ? ']' : '}';
                } else if (op[1] == 0 && (op[0] == ')' || op[0] == ']' || op[0] == '}')) {
                    if (depth == 0 || stack[depth - 1] != op[0]) {
                        L->rt->line = L->line;
                        xllm_template_fail(L->rt, "unexpected '%c'", op[0]);
                    }
                    depth--;
                }
                emit(L, TK_OP, op, strlen(op), L->line);
                L->pos = pos + strlen(op);
                found = true;
                break;
            }
        }
        if (!found) {
            L->rt->line = L->line;
            xllm_template_fail(L->rt, "unexpected character '%c'", c);
        }
    }
}

static void lex(lexer *L) {
    const char *s = L->s;
    size_t n = L->n;
    L->line = 1;
    L->line_starting = true;
    while (L->pos < n) {
        /* next tag start */
        size_t t = L->pos;
        int kind = 0; /* 1 var, 2 block, 3 comment */
        for (; t + 1 < n; t++) {
            if (s[t] != '{') continue;
            char c = s[t + 1];
            if (c == '{') kind = 1;
            if (c == '%') kind = 2;
            if (c == '#') kind = 3;
            if (kind) break;
        }
        if (!kind) {
            emit(L, TK_TEXT, s + L->pos, n - L->pos, L->line);
            L->line += count_nl(s + L->pos, n - L->pos);
            L->pos = n;
            break;
        }
        size_t after = t + 2;
        char sign = (after < n && (s[after] == '-' || s[after] == '+')) ? s[after] : 0;
        if (sign) after++;
        /* raw block? */
        bool raw = false;
        size_t raw_end = 0;
        if (kind == 2) {
            size_t q = skip_ws(s, n, after);
            if (q + 3 <= n && !memcmp(s + q, "raw", 3)) {
                q = skip_ws(s, n, q + 3);
                if (starts(L, q, "-%}")) {
                    raw = true;
                    raw_end = skip_ws(s, n, q + 3);
                } else if (starts(L, q, "%}")) {
                    raw = true;
                    raw_end = q + 2;
                }
            }
        }
        emit_text(L, s + L->pos, t - L->pos, sign, kind == 1);
        if (raw) {
            L->line += count_nl(s + t, raw_end - t);
            L->line_starting = raw_end > 0 && s[raw_end - 1] == '\n';
            /* find {%[-+]? ws endraw ws (+%} | -%} ws | %} \n?) */
            size_t q = raw_end;
            bool ok = false;
            for (; q + 1 < n; q++) {
                if (s[q] != '{' || s[q + 1] != '%') continue;
                size_t r = q + 2;
                char esign = (r < n && (s[r] == '-' || s[r] == '+')) ? s[r] : 0;
                if (esign) r++;
                r = skip_ws(s, n, r);
                if (r + 6 > n || memcmp(s + r, "endraw", 6)) continue;
                r = skip_ws(s, n, r + 6);
                size_t end;
                if (starts(L, r, "+%}"))
                    end = r + 3;
                else if (starts(L, r, "-%}"))
                    end = skip_ws(s, n, r + 3);
                else if (starts(L, r, "%}"))
                    end = r + 2 + ((r + 2 < n && s[r + 2] == '\n') ? 1 : 0);
                else
                    continue;
                emit_text(L, s + raw_end, q - raw_end, esign, false);
                L->line += count_nl(s + q, end - q);
                L->line_starting = s[end - 1] == '\n';
                L->pos = end;
                ok = true;
                break;
            }
            if (!ok) {
                L->rt->line = L->line;
                xllm_template_fail(L->rt, "missing end of raw directive");
            }
            continue;
        }
        if (kind == 3) {
            size_t q = after;
            for (; q + 1 < n; q++)
                if (s[q] == '#' && s[q + 1] == '}') break;
            if (q + 1 >= n) {
                L->rt->line = L->line;
                xllm_template_fail(L->rt, "missing end of comment tag");
            }
            size_t end = q + 2;
            char esign = q > after && (s[q - 1] == '-' || s[q - 1] == '+') ? s[q - 1] : 0;
            if (esign == '-')
                end = skip_ws(s, n, end);
            else if (esign != '+' && end < n && s[end] == '\n')
                end++;
            L->line += count_nl(s + t, end - t);
            L->line_starting = s[end - 1] == '\n';
            L->pos = end;
            continue;
        }
        emit(L, kind == 1 ? TK_VAR_BEGIN : TK_BLOCK_BEGIN, NULL, 0, L->line);
        L->pos = after;
        lex_tag(L, kind == 2);
    }
    emit(L, TK_EOF, NULL, 0, L->line);
}

/* ------------------------------------------------------------------------------------------ */
/* Parser                                                                                      */
/* ------------------------------------------------------------------------------------------ */

typedef struct parser {
    tp_rt *rt;
    const tk *t;
    size_t i, n;
    int depth;
} parser;

static const tk *cur(parser *P) {
    return &P->t[P->i];
}

static _Noreturn void perr(parser *P, const char *fmt, const char *arg) {
    P->rt->line = cur(P)->line;
    xllm_template_fail(P->rt, fmt, arg);
}

static bool is_op(parser *P, const char *op) {
    const tk *t = cur(P);
    return t->type == TK_OP && t->n == strlen(op) && !memcmp(t->p, op, t->n);
}

static bool is_name(parser *P, const char *name) {
    const tk *t = cur(P);
    return t->type == TK_NAME && t->n == strlen(name) && !memcmp(t->p, name, t->n);
}

static bool is_name_at(parser *P, size_t off, const char *name) {
    if (P->i + off >= P->n) return false;
    const tk *t = &P->t[P->i + off];
    return t->type == TK_NAME && t->n == strlen(name) && !memcmp(t->p, name, t->n);
}

static void expect_op(parser *P, const char *op) {
    if (!is_op(P, op)) perr(P, "expected '%s'", op);
    P->i++;
}

static tp_node *mk(parser *P, tp_kind kind) {
    tp_node *nd = xllm_template_alloc(P->rt->arena, sizeof(tp_node));
    nd->kind = (uint8_t)kind;
    nd->line = cur(P)->line;
    return nd;
}

static const char *name_dup(parser *P, const char *p, size_t n) {
    char *s = xllm_template_alloc(P->rt->arena, n + 1);
    memcpy(s, p, n);
    return s;
}

static const char *expect_name(parser *P, size_t *len) {
    const tk *t = cur(P);
    if (t->type != TK_NAME) perr(P, "expected a name%s", "");
    P->i++;
    if (len) *len = t->n;
    return name_dup(P, t->p, t->n);
}

/* Growable kid arrays while parsing. */
typedef struct kids {
    tp_node **v;
    const char **names;
    uint8_t *ops;
    uint32_t n, cap;
} kids;

static void kid_add(parser *P, kids *k, tp_node *nd, const char *name, uint8_t op) {
    if (k->n == k->cap) {
        uint32_t cap = k->cap ? k->cap * 2 : 4;
        tp_node **v = xllm_template_alloc(P->rt->arena, cap * sizeof(*v));
        const char **nm = xllm_template_alloc(P->rt->arena, cap * sizeof(*nm));
        uint8_t *ops = xllm_template_alloc(P->rt->arena, cap);
        if (k->n) {
            memcpy(v, k->v, k->n * sizeof(*v));
            memcpy(nm, k->names, k->n * sizeof(*nm));
            memcpy(ops, k->ops, k->n);
        }
        k->v = v;
        k->names = nm;
        k->ops = ops;
        k->cap = cap;
    }
    k->v[k->n] = nd;
    k->names[k->n] = name;
    k->ops[k->n] = op;
    k->n++;
}

static void kids_set(tp_node *nd, const kids *k) {
    nd->kids = k->v;
    nd->names = k->names;
    nd->ops = k->ops;
    nd->nkids = k->n;
}

static tp_node *parse_expr(parser *P);
static tp_node *parse_or(parser *P);
static tp_node *parse_unary(parser *P, bool with_filter);
static tp_node *parse_primary(parser *P);
static tp_node *parse_postfix(parser *P, tp_node *nd);

static void enter(parser *P) {
    if (++P->depth > P->rt->limits.max_depth) perr(P, "template nested too deeply%s", "");
}

/* ( args ) after the '(' was seen: positional and keyword arguments. */
static void parse_call_args(parser *P, tp_node *nd) {
    expect_op(P, "(");
    kids k = {0};
    bool kw_seen = false;
    while (!is_op(P, ")")) {
        if (k.n) expect_op(P, ",");
        if (is_op(P, ")")) break;
        if (is_op(P, "*") || is_op(P, "**")) perr(P, "*args and **kwargs are not supported%s", "");
        if (cur(P)->type == TK_NAME && P->i + 1 < P->n && P->t[P->i + 1].type == TK_OP &&
            P->t[P->i + 1].n == 1 && P->t[P->i + 1].p[0] == '=') {
            const char *name = expect_name(P, NULL);
            P->i++;
            kid_add(P, &k, parse_expr(P), name, 0);
            kw_seen = true;
        } else {
            if (kw_seen) perr(P, "positional argument after a keyword argument%s", "");
            kid_add(P, &k, parse_expr(P), NULL, 0);
        }
    }
    expect_op(P, ")");
    kids_set(nd, &k);
}

static tp_node *parse_filter(parser *P, tp_node *subject) {
    tp_node *nd = mk(P, N_FILTER);
    size_t len;
    nd->name = expect_name(P, &len);
    while (is_op(P, ".")) { /* dotted filter names: keep the last part */
        P->i++;
        nd->name = expect_name(P, &len);
    }
    nd->name_len = len;
    nd->id = xllm_template_filter_id(nd->name);
    if (nd->id < 0) {
        P->i--;
        perr(P, "no filter named '%s'", nd->name);
    }
    nd->a = subject;
    if (is_op(P, "(")) parse_call_args(P, nd);
    return nd;
}

static tp_node *parse_test(parser *P, tp_node *subject) {
    tp_node *nd = mk(P, N_TEST);
    if (is_name(P, "not")) {
        P->i++;
        nd->flag = 1;
    }
    size_t len;
    if (cur(P)->type == TK_NAME) {
        nd->name = expect_name(P, &len);
    } else if (cur(P)->type == TK_OP && (is_op(P, "==") || is_op(P, "!=") || is_op(P, "<") ||
                                         is_op(P, ">") || is_op(P, "<=") || is_op(P, ">="))) {
        len = cur(P)->n;
        nd->name = name_dup(P, cur(P)->p, len);
        P->i++;
    } else {
        perr(P, "expected a test name%s", "");
    }
    nd->name_len = len;
    nd->id = xllm_template_test_id(nd->name);
    if (nd->id < 0) {
        P->i--;
        perr(P, "no test named '%s'", nd->name);
    }
    nd->a = subject;
    if (is_op(P, "(")) {
        parse_call_args(P, nd);
    } else {
        const tk *t = cur(P);
        bool arg = (t->type == TK_NAME || t->type == TK_STRING || t->type == TK_INT ||
                    t->type == TK_FLOAT || is_op(P, "[") || is_op(P, "{")) &&
                   !is_name(P, "else") && !is_name(P, "or") && !is_name(P, "and");
        if (arg) {
            if (is_name(P, "is")) perr(P, "cannot chain multiple tests with is%s", "");
            kids k = {0};
            tp_node *a = parse_postfix(P, parse_primary(P));
            kid_add(P, &k, a, NULL, 0);
            kids_set(nd, &k);
        }
    }
    return nd;
}

static tp_node *parse_filter_expr(parser *P, tp_node *nd) {
    for (;;) {
        if (is_op(P, "|")) {
            P->i++;
            nd = parse_filter(P, nd);
        } else if (is_name(P, "is")) {
            P->i++;
            nd = parse_test(P, nd);
        } else if (is_op(P, "(")) {
            tp_node *c = mk(P, N_CALL);
            c->a = nd;
            parse_call_args(P, c);
            nd = c;
        } else {
            return nd;
        }
    }
}

static tp_node *parse_subscript(parser *P, tp_node *obj) {
    if (is_op(P, ".")) {
        P->i++;
        const tk *t = cur(P);
        if (t->type == TK_NAME) {
            tp_node *nd = mk(P, N_ATTR);
            nd->a = obj;
            nd->name = expect_name(P, &nd->name_len);
            return nd;
        }
        if (t->type == TK_INT) {
            tp_node *nd = mk(P, N_INDEX);
            nd->a = obj;
            tp_node *lit = mk(P, N_LIT);
            lit->lit = tv_int(t->i);
            nd->b = lit;
            P->i++;
            return nd;
        }
        perr(P, "expected a name or number after '.'%s", "");
    }
    expect_op(P, "[");
    tp_node *parts[3] = {NULL, NULL, NULL};
    int np = 0;
    bool slice = false;
    for (;;) {
        if (is_op(P, ":")) {
            slice = true;
            if (np == 2) perr(P, "too many ':' in a slice%s", "");
            np++;
            P->i++;
            continue;
        }
        if (is_op(P, "]")) break;
        if (parts[np]) perr(P, "expected ']'%s", "");
        parts[np] = parse_expr(P);
        if (is_op(P, ",")) perr(P, "tuple subscripts are not supported%s", "");
    }
    expect_op(P, "]");
    tp_node *nd = mk(P, slice ? N_SLICE : N_INDEX);
    nd->a = obj;
    nd->b = parts[0];
    nd->c = parts[1];
    nd->d = parts[2];
    if (!slice && !nd->b) perr(P, "empty subscript%s", "");
    return nd;
}

static tp_node *parse_postfix(parser *P, tp_node *nd) {
    for (;;) {
        if (is_op(P, ".") || is_op(P, "[")) {
            nd = parse_subscript(P, nd);
        } else if (is_op(P, "(")) {
            tp_node *c = mk(P, N_CALL);
            c->a = nd;
            parse_call_args(P, c);
            nd = c;
        } else {
            return nd;
        }
    }
}

static tp_node *parse_primary(parser *P) {
    enter(P);
    const tk *t = cur(P);
    tp_node *nd;
    if (t->type == TK_NAME) {
        nd = mk(P, N_LIT);
        if (is_name(P, "true") || is_name(P, "True"))
            nd->lit = tv_bool(true);
        else if (is_name(P, "false") || is_name(P, "False"))
            nd->lit = tv_bool(false);
        else if (is_name(P, "none") || is_name(P, "None"))
            nd->lit = tv_none();
        else {
            nd->kind = N_NAME;
            nd->name = name_dup(P, t->p, t->n);
            nd->name_len = t->n;
        }
        P->i++;
    } else if (t->type == TK_STRING) {
        nd = mk(P, N_LIT);
        /* adjacent string literals concatenate */
        size_t total = 0, j = P->i;
        while (j < P->n && P->t[j].type == TK_STRING) total += P->t[j++].n;
        char *s = xllm_template_alloc(P->rt->arena, total + 1);
        size_t o = 0;
        while (P->i < j) {
            memcpy(s + o, P->t[P->i].p, P->t[P->i].n);
            o += P->t[P->i].n;
            P->i++;
        }
        nd->lit = tv_str(s, total);
    } else if (t->type == TK_INT) {
        nd = mk(P, N_LIT);
        nd->lit = tv_int(t->i);
        P->i++;
    } else if (t->type == TK_FLOAT) {
        nd = mk(P, N_LIT);
        nd->lit = tv_float(t->f);
        P->i++;
    } else if (is_op(P, "(")) {
        P->i++;
        if (is_op(P, ")")) {
            P->i++;
            nd = mk(P, N_TUPLE);
        } else {
            tp_node *first = parse_expr(P);
            if (is_op(P, ",")) {
                kids k = {0};
                kid_add(P, &k, first, NULL, 0);
                while (is_op(P, ",")) {
                    P->i++;
                    if (is_op(P, ")")) break;
                    kid_add(P, &k, parse_expr(P), NULL, 0);
                }
                nd = mk(P, N_TUPLE);
                kids_set(nd, &k);
            } else {
                nd = first;
            }
            expect_op(P, ")");
        }
    } else if (is_op(P, "[")) {
        P->i++;
        nd = mk(P, N_LIST);
        kids k = {0};
        while (!is_op(P, "]")) {
            if (k.n) expect_op(P, ",");
            if (is_op(P, "]")) break;
            kid_add(P, &k, parse_expr(P), NULL, 0);
        }
        expect_op(P, "]");
        kids_set(nd, &k);
    } else if (is_op(P, "{")) {
        P->i++;
        nd = mk(P, N_DICT);
        kids k = {0};
        while (!is_op(P, "}")) {
            if (k.n) expect_op(P, ",");
            if (is_op(P, "}")) break;
            kid_add(P, &k, parse_expr(P), NULL, 0);
            expect_op(P, ":");
            kid_add(P, &k, parse_expr(P), NULL, 0);
        }
        expect_op(P, "}");
        kids_set(nd, &k);
    } else {
        if (t->type == TK_EOF || t->type == TK_VAR_END || t->type == TK_BLOCK_END)
            perr(P, "unexpected end of expression%s", "");
        char what[32];
        snprintf(what, sizeof(what), "%.*s", (int)(t->n < 20 ? t->n : 20), t->p ? t->p : "");
        perr(P, "unexpected '%s'", what);
    }
    P->depth--;
    return nd;
}

static tp_node *parse_unary(parser *P, bool with_filter) {
    enter(P);
    tp_node *nd;
    if (is_op(P, "-") || is_op(P, "+")) {
        tp_node *u = mk(P, is_op(P, "-") ? N_NEG : N_POS);
        P->i++;
        u->a = parse_unary(P, false);
        nd = u;
    } else {
        nd = parse_postfix(P, parse_primary(P));
    }
    if (with_filter) nd = parse_filter_expr(P, nd);
    P->depth--;
    return nd;
}

static tp_node *bin(parser *P, tp_kind kind, uint8_t op, tp_node *a, tp_node *b, int line) {
    tp_node *nd = mk(P, kind);
    nd->op = op;
    nd->a = a;
    nd->b = b;
    nd->line = line;
    return nd;
}

static tp_node *parse_pow(parser *P) {
    tp_node *l = parse_unary(P, true);
    while (is_op(P, "**")) {
        int line = cur(P)->line;
        P->i++;
        l = bin(P, N_BIN, OP_POW, l, parse_unary(P, true), line);
    }
    return l;
}

static tp_node *parse_math2(parser *P) {
    tp_node *l = parse_pow(P);
    for (;;) {
        uint8_t op = is_op(P, "*")    ? OP_MUL
                     : is_op(P, "/")  ? OP_DIV
                     : is_op(P, "//") ? OP_FLOORDIV
                     : is_op(P, "%")  ? OP_MOD
                                      : 0;
        if (!op) return l;
        int line = cur(P)->line;
        P->i++;
        l = bin(P, N_BIN, op, l, parse_pow(P), line);
    }
}

static tp_node *parse_concat(parser *P) {
    tp_node *first = parse_math2(P);
    if (!is_op(P, "~")) return first;
    tp_node *nd = mk(P, N_CONCAT);
    kids k = {0};
    kid_add(P, &k, first, NULL, 0);
    while (is_op(P, "~")) {
        P->i++;
        kid_add(P, &k, parse_math2(P), NULL, 0);
    }
    kids_set(nd, &k);
    return nd;
}

static tp_node *parse_math1(parser *P) {
    tp_node *l = parse_concat(P);
    for (;;) {
        uint8_t op = is_op(P, "+") ? OP_ADD : is_op(P, "-") ? OP_SUB : 0;
        if (!op) return l;
        int line = cur(P)->line;
        P->i++;
        l = bin(P, N_BIN, op, l, parse_concat(P), line);
    }
}

static tp_node *parse_compare(parser *P) {
    tp_node *first = parse_math1(P);
    kids k = {0};
    for (;;) {
        uint8_t op = is_op(P, "==")   ? OP_EQ
                     : is_op(P, "!=") ? OP_NE
                     : is_op(P, "<")  ? OP_LT
                     : is_op(P, "<=") ? OP_LE
                     : is_op(P, ">")  ? OP_GT
                     : is_op(P, ">=") ? OP_GE
                                      : 0;
        if (op) {
            P->i++;
        } else if (is_name(P, "in")) {
            op = OP_IN;
            P->i++;
        } else if (is_name(P, "not") && is_name_at(P, 1, "in")) {
            op = OP_NOTIN;
            P->i += 2;
        } else {
            break;
        }
        kid_add(P, &k, parse_math1(P), NULL, op);
    }
    if (!k.n) return first;
    tp_node *nd = mk(P, N_CMP);
    nd->line = first->line;
    nd->a = first;
    kids_set(nd, &k);
    return nd;
}

static tp_node *parse_not(parser *P) {
    if (is_name(P, "not")) {
        enter(P);
        tp_node *nd = mk(P, N_NOT);
        P->i++;
        nd->a = parse_not(P);
        P->depth--;
        return nd;
    }
    return parse_compare(P);
}

static tp_node *parse_and(parser *P) {
    tp_node *l = parse_not(P);
    while (is_name(P, "and")) {
        int line = cur(P)->line;
        P->i++;
        l = bin(P, N_AND, 0, l, parse_not(P), line);
    }
    return l;
}

static tp_node *parse_or(parser *P) {
    tp_node *l = parse_and(P);
    while (is_name(P, "or")) {
        int line = cur(P)->line;
        P->i++;
        l = bin(P, N_OR, 0, l, parse_and(P), line);
    }
    return l;
}

static tp_node *parse_expr(parser *P) {
    enter(P);
    tp_node *e1 = parse_or(P);
    while (is_name(P, "if")) {
        tp_node *nd = mk(P, N_COND);
        P->i++;
        nd->a = parse_or(P);
        nd->b = e1;
        if (is_name(P, "else")) {
            P->i++;
            nd->c = parse_expr(P);
        }
        e1 = nd;
    }
    P->depth--;
    return e1;
}

/* Expression or implicit tuple "a, b" (top of {{ }} and set values). */
static tp_node *parse_tuple_expr(parser *P) {
    tp_node *first = parse_expr(P);
    if (!is_op(P, ",")) return first;
    tp_node *nd = mk(P, N_TUPLE);
    kids k = {0};
    kid_add(P, &k, first, NULL, 0);
    while (is_op(P, ",")) {
        P->i++;
        if (cur(P)->type == TK_VAR_END || cur(P)->type == TK_BLOCK_END) break;
        kid_add(P, &k, parse_expr(P), NULL, 0);
    }
    kids_set(nd, &k);
    return nd;
}

/* Assignment target: name, name.attr, or tuple of names. */
static tp_node *parse_target(parser *P, bool allow_attr) {
    kids k = {0};
    bool paren = false;
    if (is_op(P, "(")) {
        paren = true;
        P->i++;
    }
    for (;;) {
        tp_node *nd = mk(P, N_NAME);
        nd->name = expect_name(P, &nd->name_len);
        if (allow_attr && is_op(P, ".")) {
            P->i++;
            tp_node *at = mk(P, N_ATTR);
            at->a = nd;
            at->name = expect_name(P, &at->name_len);
            nd = at;
        }
        kid_add(P, &k, nd, NULL, 0);
        if (!is_op(P, ",")) break;
        P->i++;
        if (cur(P)->type != TK_NAME) break;
    }
    if (paren) expect_op(P, ")");
    if (k.n == 1 && !paren) return k.v[0];
    tp_node *t = mk(P, N_TUPLE);
    kids_set(t, &k);
    for (uint32_t i = 0; i < k.n; i++)
        if (k.v[i]->kind != N_NAME) perr(P, "can only unpack into names%s", "");
    return t;
}

static void expect_block_end(parser *P) {
    if (cur(P)->type != TK_BLOCK_END) perr(P, "expected end of block tag '%%}'%s", "");
    P->i++;
}

static tp_node *parse_body(parser *P, const char *const *ends, size_t nends);

static const char *const END_IF[] = {"elif", "else", "endif"};
static const char *const END_FOR[] = {"else", "endfor"};

static tp_node *parse_if(parser *P) {
    tp_node *nd = mk(P, N_IF);
    nd->a = parse_tuple_expr(P);
    expect_block_end(P);
    nd->b = parse_body(P, END_IF, 3);
    if (is_name(P, "elif")) {
        P->i++;
        nd->c = parse_if(P);
        return nd;
    }
    if (is_name(P, "else")) {
        P->i++;
        expect_block_end(P);
        static const char *const END[] = {"endif"};
        nd->c = parse_body(P, END, 1);
    }
    if (!is_name(P, "endif")) perr(P, "expected 'endif'%s", "");
    P->i++;
    expect_block_end(P);
    return nd;
}

static tp_node *parse_statement(parser *P) {
    const tk *t = cur(P);
    if (t->type != TK_NAME) perr(P, "expected a statement name%s", "");
    int line = t->line;
    enter(P);
    tp_node *nd = NULL;
    if (is_name(P, "if")) {
        P->i++;
        nd = parse_if(P);
    } else if (is_name(P, "for")) {
        P->i++;
        nd = mk(P, N_FOR);
        nd->d = parse_target(P, false);
        if (!is_name(P, "in")) perr(P, "expected 'in'%s", "");
        P->i++;
        /* iterable: an expression without a condexpr (the "if" filters the loop) */
        nd->a = parse_or(P);
        if (is_op(P, ",")) {
            tp_node *tu = mk(P, N_TUPLE);
            kids k = {0};
            kid_add(P, &k, nd->a, NULL, 0);
            while (is_op(P, ",")) {
                P->i++;
                if (is_name(P, "if") || cur(P)->type == TK_BLOCK_END) break;
                kid_add(P, &k, parse_or(P), NULL, 0);
            }
            kids_set(tu, &k);
            nd->a = tu;
        }
        if (is_name(P, "if")) {
            P->i++;
            nd->c = parse_expr(P);
        }
        if (is_name(P, "recursive")) perr(P, "recursive loops are not supported%s", "");
        expect_block_end(P);
        nd->b = parse_body(P, END_FOR, 2);
        if (is_name(P, "else")) {
            P->i++;
            expect_block_end(P);
            static const char *const END[] = {"endfor"};
            nd->e = parse_body(P, END, 1);
        }
        P->i++; /* endfor */
        expect_block_end(P);
    } else if (is_name(P, "set")) {
        P->i++;
        tp_node *target = parse_target(P, true);
        if (is_op(P, "=")) {
            P->i++;
            nd = mk(P, N_SET);
            nd->d = target;
            nd->a = parse_tuple_expr(P);
            expect_block_end(P);
        } else {
            nd = mk(P, N_SETBLOCK);
            nd->d = target;
            if (target->kind != N_NAME) perr(P, "a block set needs a plain name%s", "");
            tp_node *chain = NULL;
            while (is_op(P, "|")) {
                P->i++;
                chain = parse_filter(P, chain);
            }
            nd->a = chain;
            expect_block_end(P);
            static const char *const END[] = {"endset"};
            nd->b = parse_body(P, END, 1);
            P->i++;
            expect_block_end(P);
        }
    } else if (is_name(P, "macro") || is_name(P, "call")) {
        bool is_call = is_name(P, "call");
        P->i++;
        nd = mk(P, is_call ? N_CALLBLOCK : N_MACRO);
        if (!is_call) nd->name = expect_name(P, &nd->name_len);
        kids k = {0};
        if (!is_call || is_op(P, "(")) {
            expect_op(P, "(");
            while (!is_op(P, ")")) {
                if (k.n) expect_op(P, ",");
                if (is_op(P, ")")) break;
                const char *pn = expect_name(P, NULL);
                tp_node *def = NULL;
                if (is_op(P, "=")) {
                    P->i++;
                    def = parse_expr(P);
                }
                kid_add(P, &k, def, pn, 0);
            }
            expect_op(P, ")");
        }
        kids_set(nd, &k);
        if (is_call) {
            nd->a = parse_expr(P);
            if (nd->a->kind != N_CALL) perr(P, "expected a call after 'call'%s", "");
        }
        expect_block_end(P);
        static const char *const ENDM[] = {"endmacro"};
        static const char *const ENDC[] = {"endcall"};
        nd->b = parse_body(P, is_call ? ENDC : ENDM, 1);
        P->i++;
        if (!is_call && cur(P)->type == TK_NAME) P->i++; /* endmacro name */
        expect_block_end(P);
    } else if (is_name(P, "filter")) {
        P->i++;
        nd = mk(P, N_FILTERBLK);
        tp_node *chain = parse_filter(P, NULL);
        while (is_op(P, "|")) {
            P->i++;
            chain = parse_filter(P, chain);
        }
        nd->a = chain;
        expect_block_end(P);
        static const char *const END[] = {"endfilter"};
        nd->b = parse_body(P, END, 1);
        P->i++;
        expect_block_end(P);
    } else if (is_name(P, "with")) {
        P->i++;
        nd = mk(P, N_WITH);
        kids k = {0};
        while (cur(P)->type != TK_BLOCK_END) {
            if (k.n) expect_op(P, ",");
            const char *vn = expect_name(P, NULL);
            expect_op(P, "=");
            kid_add(P, &k, parse_expr(P), vn, 0);
        }
        kids_set(nd, &k);
        expect_block_end(P);
        static const char *const END[] = {"endwith"};
        nd->b = parse_body(P, END, 1);
        P->i++;
        expect_block_end(P);
    } else if (is_name(P, "generation")) {
        /* transformers' {% generation %} marks assistant text; it renders its body as is */
        P->i++;
        expect_block_end(P);
        static const char *const END[] = {"endgeneration"};
        nd = parse_body(P, END, 1);
        P->i++;
        expect_block_end(P);
    } else if (is_name(P, "break") || is_name(P, "continue")) {
        nd = mk(P, is_name(P, "break") ? N_BREAK : N_CONTINUE);
        P->i++;
        expect_block_end(P);
    } else {
        char what[40];
        snprintf(what, sizeof(what), "%.*s", (int)(t->n < 32 ? t->n : 32), t->p);
        perr(P, "unknown tag '%s'", what);
    }
    nd->line = line;
    P->depth--;
    return nd;
}

/* Statements until one of ends (the name is left as the current token), or EOF when ends is
 * NULL. */
static tp_node *parse_body(parser *P, const char *const *ends, size_t nends) {
    tp_node *body = mk(P, N_BODY);
    kids k = {0};
    for (;;) {
        const tk *t = cur(P);
        if (t->type == TK_EOF) {
            if (ends) perr(P, "unexpected end of template, expected '%s'", ends[nends - 1]);
            break;
        }
        if (t->type == TK_TEXT) {
            tp_node *nd = mk(P, N_TEXT);
            nd->name = t->p;
            nd->name_len = t->n;
            kid_add(P, &k, nd, NULL, 0);
            P->i++;
        } else if (t->type == TK_VAR_BEGIN) {
            P->i++;
            tp_node *nd = mk(P, N_OUT);
            nd->a = parse_tuple_expr(P);
            if (cur(P)->type != TK_VAR_END) perr(P, "expected end of print statement '}}'%s", "");
            P->i++;
            kid_add(P, &k, nd, NULL, 0);
        } else if (t->type == TK_BLOCK_BEGIN) {
            P->i++;
            for (size_t j = 0; j < nends; j++)
                if (is_name(P, ends[j])) {
                    kids_set(body, &k);
                    return body;
                }
            kid_add(P, &k, parse_statement(P), NULL, 0);
        } else {
            perr(P, "unexpected token%s", "");
        }
    }
    kids_set(body, &k);
    return body;
}

/* ------------------------------------------------------------------------------------------ */
/* Entry                                                                                       */
/* ------------------------------------------------------------------------------------------ */

xllm_template_limits xllm_template_limits_from(const xllm_chat_params *p) {
    xllm_template_limits l;
    l.max_output = p && p->max_output ? p->max_output : (size_t)16 << 20;
    l.max_memory = p && p->max_memory ? p->max_memory : (size_t)256 << 20;
    l.max_steps = p && p->max_steps ? p->max_steps : 50000000u;
    l.max_depth = p && p->max_depth > 0 ? p->max_depth : 200;
    return l;
}

/* Parses into t (its arena); on failure the arena is freed by the caller. */
static void parse_into(tp_rt *rt, xllm_template *t, const char *src, size_t n) {
    /* newlines: \r\n and \r become \n; one trailing newline is dropped */
    char *s = xllm_template_alloc(&t->arena, n + 1);
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        if (src[i] == '\r') {
            s[k++] = '\n';
            if (i + 1 < n && src[i + 1] == '\n') i++;
        } else {
            s[k++] = src[i];
        }
    }
    if (k && s[k - 1] == '\n') k--;
    s[k] = 0;
    lexer L = {.rt = rt, .s = s, .n = k};
    lex(&L);
    parser P = {.rt = rt, .t = L.toks, .n = L.ntok};
    t->root = parse_body(&P, NULL, 0);
}

xllm_status xllm_template_parse(const char *src, size_t n, const xllm_template_limits *lim,
                                xllm_template **out, char *err, size_t err_size) {
    *out = NULL;
    if (!src && n) {
        if (err && err_size) snprintf(err, err_size, "no template source");
        return XLLM_ERR_INVALID_ARG;
    }
    xllm_template *t = calloc(1, sizeof(*t));
    tp_rt *rt = calloc(1, sizeof(*rt));
    if (!t || !rt) {
        free(t);
        free(rt);
        return XLLM_ERR_NOMEM;
    }
    t->limits = *lim;
    t->arena.limit = lim->max_memory;
    t->arena.rt = rt;
    rt->arena = &t->arena;
    rt->limits = *lim;
    rt->err = err;
    rt->err_size = err_size;
    rt->line = 1;
    if (setjmp(rt->jb)) {
        xllm_template_arena_free(&t->arena);
        free(t);
        free(rt);
        return XLLM_ERR_FORMAT;
    }
    parse_into(rt, t, src ? src : "", n);
    t->arena.rt = NULL;
    free(rt);
    *out = t;
    return XLLM_OK;
}

void xllm_template_free(xllm_template *t) {
    if (!t) return;
    xllm_template_arena_free(&t->arena);
    free(t);
}
