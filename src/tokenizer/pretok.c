/* Byte-level BPE pre-tokenizer: lists of PCRE2 regexes (UTF, UCP, JIT) applied in turn, and the
 * regex lists of the GGUF tokenizer.ggml.pre variants (as llama.cpp and Hugging Face define them).
 */
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <string.h>

#include "tokenizer/tokenizer-impl.h"
#include "util/common.h"

#define MAX_REGEX 8

struct xllm_pretok {
    int n;
    pcre2_code *code[MAX_REGEX];
    bool jit[MAX_REGEX];
};

void xllm_span_push(span_vec *a, size_t off, size_t len) {
    if (a->n == a->cap) {
        a->cap = a->cap ? a->cap * 2 : 256;
        a->v = xllm_xrealloc(a->v, a->cap * sizeof(tok_span));
    }
    a->v[a->n].off = off;
    a->v[a->n].len = len;
    a->n++;
}

/* ---------------------------------------------------------------------------------------- */
/* Regex lists of the named variants                                                         */
/* ---------------------------------------------------------------------------------------- */

#define RE_GPT2 XLLM_RE_GPT2
/* Llama 3: digits in groups of up to three. */
#define RE_LLAMA3                                                                                  \
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| "                     \
    "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
/* Qwen2: digits one by one. */
#define RE_QWEN2                                                                                   \
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| "                          \
    "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
/* CJK ideographs and Hangul blocks the DeepSeek splits isolate. */
#define RE_CJK_DS "[\\x{4E00}-\\x{9FA5}\\x{800}-\\x{4E00}\\x{AC00}-\\x{D7FF}]+"
/* DeepSeek LLM's Latin/Greek/Cyrillic/... letter ranges. */
#define RE_DS_LETTERS                                                                              \
    "\\s?[A-Za-z\\x{B5}\\x{C0}-\\x{D6}\\x{D8}-\\x{F6}\\x{F8}-\\x{1BA}\\x{1BC}-\\x{1BF}\\x{1C4}-"   \
    "\\x{293}\\x{295}-\\x{2AF}\\x{370}-\\x{373}\\x{376}\\x{377}\\x{37B}-\\x{37D}\\x{37F}\\x{386}"  \
    "\\x{388}-\\x{38A}\\x{38C}\\x{38E}-\\x{3A1}\\x{3A3}-\\x{3F5}\\x{3F7}-\\x{481}\\x{48A}-\\x{"    \
    "52F}"                                                                                         \
    "\\x{531}-\\x{556}\\x{10A0}-\\x{10C5}\\x{13A0}-\\x{13F5}\\x{13F8}-\\x{13FD}\\x{1C90}-"         \
    "\\x{1CBA}\\x{1CBD}-\\x{1CBF}\\x{1D00}-\\x{1D2B}\\x{1D6B}-\\x{1D77}\\x{1D79}-\\x{1D9A}"        \
    "\\x{1E00}-\\x{1F15}\\x{1F18}-\\x{1F1D}\\x{1F20}-\\x{1F45}\\x{1F48}-\\x{1F4D}\\x{1F50}-"       \
    "\\x{1F57}\\x{1F59}\\x{1F5B}\\x{1F5D}\\x{1F5F}-\\x{1F7D}\\x{1F80}-\\x{1FB4}\\x{1FB6}-"         \
    "\\x{1FBC}\\x{1FBE}\\x{1FC2}-\\x{1FC4}\\x{1FC6}-\\x{1FCC}\\x{1FD0}-\\x{1FD3}\\x{1FD6}-"        \
    "\\x{1FDB}\\x{1FE0}-\\x{1FEC}\\x{1FF2}-\\x{1FF4}\\x{1FF6}-\\x{1FFC}\\x{2102}\\x{2107}"         \
    "\\x{210A}-\\x{2113}\\x{2115}\\x{2119}-\\x{211D}\\x{2124}\\x{2126}\\x{2128}\\x{212A}-"         \
    "\\x{212D}\\x{212F}-\\x{2134}\\x{2139}\\x{213C}-\\x{213F}\\x{2145}-\\x{2149}\\x{214E}"         \
    "\\x{2183}\\x{2184}\\x{2C00}-\\x{2C7B}\\x{2C7E}-\\x{2CE4}\\x{2CEB}-\\x{2CEE}\\x{2CF2}"         \
    "\\x{2CF3}\\x{A640}-\\x{A66D}\\x{A680}-\\x{A69B}\\x{A722}-\\x{A76F}\\x{A771}-\\x{A787}"        \
    "\\x{A78B}-\\x{A78E}\\x{AB70}-\\x{ABBF}\\x{FB00}-\\x{FB06}\\x{FB13}-\\x{FB17}\\x{FF21}-"       \
    "\\x{FF3A}\\x{FF41}-\\x{FF5A}\\x{10400}-\\x{1044F}\\x{104B0}-\\x{104D3}\\x{104D8}-"            \
    "\\x{104FB}\\x{10C80}-\\x{10CB2}\\x{10CC0}-\\x{10CF2}\\x{118A0}-\\x{118DF}\\x{1E900}-"         \
    "\\x{1E943}]+"

typedef struct pre_variant {
    const char *names; /* '|'-separated tokenizer.ggml.pre values */
    const char *re[MAX_REGEX];
    bool ignore_merges, nfc;
} pre_variant;

static const pre_variant k_variants[] = {
    {"llama-bpe|llama3|llama-v3|falcon3|falcon-h1|pixtral|midm-2.0|lfm2", {RE_LLAMA3}, true, false},
    {"dbrx|smaug-bpe|glm4|chatglm-bpe", {RE_LLAMA3}, false, false},
    {"qwen2|deepseek-r1-qwen|megrez", {RE_QWEN2}, false, true},
    {"stablelm2|hunyuan|kormo", {RE_QWEN2}, false, false},
    {"deepseek-llm",
     {"[\\r\\n]", RE_DS_LETTERS,
      "\\s?[!-/:-~\\x{FF01}-\\x{FF0F}\\x{FF1A}-\\x{FF5E}\\x{2018}-\\x{201F}\\x{3000}-\\x{3002}]+",
      "\\s+$", RE_CJK_DS, "\\p{N}+"},
     false,
     false},
    {"deepseek-coder",
     {"[\\r\\n]", "\\s?\\p{L}+", "\\s?\\p{P}+", RE_CJK_DS, "\\p{N}"},
     false,
     false},
    {"deepseek-v3",
     {"\\p{N}{1,3}", "[\\x{4E00}-\\x{9FA5}\\x{3040}-\\x{309F}\\x{30A0}-\\x{30FF}]+",
      "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\\r\\n\\p{L}\\p{P}\\p{S}]?[\\p{L}"
      "\\p{M}]+| ?[\\p{P}\\p{S}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
     false,
     false},
    {"falcon", {"[\\p{P}\\$\\+<=>\\^~\\|`]+", RE_GPT2, "[0-9][0-9][0-9]"}, false, false},
    {"starcoder|refact|command-r|smollm|codeshell|exaone|minerva-7b",
     {"\\p{N}", RE_GPT2},
     false,
     false},
    {"gpt-2|phi-2|mpt|olmo|jais|jina-es|jina-de|jina-v1-en|jina-v2-es|jina-v2-de|jina-v2-code|"
     "roberta-bpe|gigachat|exaone4|trillion",
     {RE_GPT2},
     false,
     false},
    {"poro-chat|bloom|gpt3-finnish",
     {" ?[^(\\s|.,!?\\x{2026}\\x{3002}\\x{FF0C}\\x{3001}\\x{964}\\x{6D4}\\x{60C})]+"},
     false,
     false},
    {"viking",
     {" ?[^(\\s|.,!?\\x{2026}\\x{3002}\\x{FF0C}\\x{3001}\\x{964}\\x{6D4}\\x{60C})]+", "\\p{N}"},
     false,
     false},
    {"seed-coder",
     {"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1}| "
      "?[^\\s\\p{L}\\p{N}\\r\\n]+|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
     false,
     false},
    {"gpt-4o|llama4",
     {"[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+"
      "(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+["
      "\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\\p{N}{1,3}| "
      "?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
     false,
     false},
    /* What llama.cpp uses when the name is "default" or absent. */
    {"default|",
     {"[\\p{P}\\$\\+<=>\\^~\\|]+", RE_GPT2, "\\p{N}+", "[0-9][0-9][0-9]"},
     false,
     false},
};

static bool name_in(const char *names, const char *name) {
    size_t n = strlen(name);
    for (const char *p = names;;) {
        const char *bar = strchr(p, '|');
        size_t l = bar ? (size_t)(bar - p) : strlen(p);
        if (l == n && memcmp(p, name, n) == 0) return true;
        if (!bar) return false;
        p = bar + 1;
    }
}

/* ---------------------------------------------------------------------------------------- */
/* Compile                                                                                   */
/* ---------------------------------------------------------------------------------------- */

/* Unicode White_Space: what Hugging Face's regex engines mean by \s (PCRE2's \s leaves out
 * U+0085). */
#define WS_SET "\\t-\\r\\x{85}\\p{Z}"

/* Rewrites \s and \S to White_Space classes. Returns malloc'd text. */
static char *rewrite_ws(const char *re) {
    size_t n = strlen(re);
    char *out = xllm_xmalloc(n * 16 + 1);
    size_t o = 0;
    bool in_class = false;
    for (size_t i = 0; i < n; i++) {
        char c = re[i];
        if (c == '\\' && i + 1 < n) {
            char d = re[i + 1];
            const char *rep = NULL;
            if (d == 's') rep = in_class ? WS_SET : "[" WS_SET "]";
            if (d == 'S' && !in_class) rep = "[^" WS_SET "]";
            if (rep) {
                memcpy(out + o, rep, strlen(rep));
                o += strlen(rep);
            } else {
                out[o++] = c;
                out[o++] = d;
            }
            i++;
            continue;
        }
        if (!in_class && c == '[') {
            in_class = true;
            out[o++] = c;
            /* a ']' right after '[' or '[^' is a literal */
            if (i + 1 < n && re[i + 1] == '^') out[o++] = re[++i];
            if (i + 1 < n && re[i + 1] == ']') out[o++] = re[++i];
            continue;
        }
        if (in_class && c == ']') in_class = false;
        out[o++] = c;
    }
    out[o] = 0;
    return out;
}

void xllm_pretok_free(xllm_pretok *p) {
    if (!p) return;
    for (int i = 0; i < p->n; i++) pcre2_code_free(p->code[i]);
    free(p);
}

xllm_status xllm_pretok_new(const char *const *regexes, int n, xllm_pretok **out, char *err,
                            size_t err_size) {
    *out = NULL;
    if (n < 0 || n > MAX_REGEX) {
        xllm_set_err(err, err_size, "pre-tokenizer: %d regexes (at most %d supported)", n,
                     MAX_REGEX);
        return XLLM_ERR_UNSUPPORTED;
    }
    xllm_pretok *p = xllm_xcalloc(1, sizeof(*p));
    for (int i = 0; i < n; i++) {
        char *re = rewrite_ws(regexes[i]);
        int ec;
        PCRE2_SIZE eo;
        p->code[i] = pcre2_compile((PCRE2_SPTR)re, PCRE2_ZERO_TERMINATED,
                                   PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF, &ec, &eo, NULL);
        free(re);
        if (!p->code[i]) {
            PCRE2_UCHAR msg[160];
            pcre2_get_error_message(ec, msg, sizeof(msg));
            xllm_set_err(err, err_size, "pre-tokenizer regex %d ('%.80s'): %s at offset %zu", i,
                         regexes[i], (const char *)msg, (size_t)eo);
            xllm_pretok_free(p);
            return XLLM_ERR_FORMAT;
        }
        p->n = i + 1;
        p->jit[i] = pcre2_jit_compile(p->code[i], PCRE2_JIT_COMPLETE) == 0;
    }
    *out = p;
    return XLLM_OK;
}

bool xllm_pretok_variant(const char *name, const char *const **re, int *n, bool *ignore_merges,
                         bool *nfc) {
    if (!name) name = "";
    for (size_t v = 0; v < sizeof(k_variants) / sizeof(k_variants[0]); v++) {
        const pre_variant *pv = &k_variants[v];
        if (!name_in(pv->names, name)) continue;
        int k = 0;
        while (k < MAX_REGEX && pv->re[k]) k++;
        *re = pv->re;
        *n = k;
        *ignore_merges = pv->ignore_merges;
        *nfc = pv->nfc;
        return true;
    }
    return false;
}

bool xllm_pretok_name_of(const char *const *re, int n, bool ignore_merges, bool nfc, char *name,
                         size_t size) {
    for (size_t v = 0; v < sizeof(k_variants) / sizeof(k_variants[0]); v++) {
        const pre_variant *pv = &k_variants[v];
        int k = 0;
        while (k < MAX_REGEX && pv->re[k]) k++;
        if (k != n || pv->ignore_merges != ignore_merges || pv->nfc != nfc) continue;
        bool same = true;
        for (int i = 0; i < n && same; i++) same = !strcmp(pv->re[i], re[i]);
        if (!same) continue;
        const char *bar = strchr(pv->names, '|');
        const size_t l = bar ? (size_t)(bar - pv->names) : strlen(pv->names);
        if (l == 0 || l >= size) return false; /* ("default": no name a file can carry) */
        memcpy(name, pv->names, l);
        name[l] = 0;
        return true;
    }
    return false;
}

xllm_status xllm_pretok_from_name(const char *name, xllm_pretok **out, bool *ignore_merges,
                                  bool *nfc, char *err, size_t err_size) {
    const char *const *re;
    int n;
    if (xllm_pretok_variant(name, &re, &n, ignore_merges, nfc))
        return xllm_pretok_new(re, n, out, err, err_size);
    *out = NULL;
    xllm_set_err(err, err_size, "tokenizer.ggml.pre: pre-tokenizer '%s' is not supported",
                 name ? name : "");
    return XLLM_ERR_UNSUPPORTED;
}

/* ---------------------------------------------------------------------------------------- */
/* Split                                                                                     */
/* ---------------------------------------------------------------------------------------- */

static int run_match(const xllm_pretok *p, int i, const char *s, size_t n, size_t start,
                     pcre2_match_data *md) {
    int rc;
    if (p->jit[i]) {
        rc = pcre2_jit_match(p->code[i], (PCRE2_SPTR)s, n, start, 0, md, NULL);
        if (rc != PCRE2_ERROR_JIT_STACKLIMIT) return rc;
    }
    return pcre2_match(p->code[i], (PCRE2_SPTR)s, n, start, 0, md, NULL);
}

/* Splits the fragment text[off..off+len) with regex i into out. */
static void split_one(const xllm_pretok *p, int i, const char *text, size_t off, size_t len,
                      pcre2_match_data *md, span_vec *out) {
    const char *s = text + off;
    size_t last = 0, pos = 0;
    while (pos < len) {
        int rc = run_match(p, i, s, len, pos, md);
        if (rc < 0) break; /* no match (or a matcher limit): the rest is one piece */
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
        size_t ms = ov[0], me = ov[1];
        if (me <= ms) { /* empty match: not a piece; step over one character */
            size_t step = 1;
            while (ms + step < len && ((uint8_t)s[ms + step] & 0xC0) == 0x80) step++;
            pos = ms + step;
            continue;
        }
        if (ms > last) xllm_span_push(out, off + last, ms - last);
        xllm_span_push(out, off + ms, me - ms);
        last = pos = me;
    }
    if (last < len) xllm_span_push(out, off + last, len - last);
}

void xllm_pretok_split(const xllm_pretok *p, const char *text, size_t len, span_vec *out) {
    if (len == 0) return;
    if (!p || p->n == 0) {
        xllm_span_push(out, 0, len);
        return;
    }
    pcre2_match_data *md = pcre2_match_data_create(1, NULL);
    XLLM_ASSERT(md);
    if (p->n == 1) {
        split_one(p, 0, text, 0, len, md, out);
    } else {
        /* cur holds the fragments so far; the last regex writes straight into out. */
        span_vec cur = {0}, next = {0};
        xllm_span_push(&cur, 0, len);
        for (int i = 0; i < p->n; i++) {
            span_vec *dst = i == p->n - 1 ? out : &next;
            next.n = 0;
            for (size_t k = 0; k < cur.n; k++)
                split_one(p, i, text, cur.v[k].off, cur.v[k].len, md, dst);
            if (dst == &next) {
                span_vec sw = cur;
                cur = next;
                next = sw;
            }
        }
        free(cur.v);
        free(next.v);
    }
    pcre2_match_data_free(md);
}
