/* Tokenizer: SentencePiece-style ("llama") vocabularies with score-ordered pair merges and byte
 * fallback, and byte-level BPE ("gpt2") vocabularies with rank-ordered merges, read from GGUF. */
#include "tokenizer/tokenizer.h"

#include <limits.h>
#include <stdint.h>
#include <string.h>

#include "util/common.h"

/* ---------------------------------------------------------------------------------------- */
/* Data                                                                                      */
/* ---------------------------------------------------------------------------------------- */

typedef enum tok_kind { TOK_SPM = 0, TOK_BPE = 1 } tok_kind;

typedef struct tok_entry {
    size_t off; /* into text */
    uint32_t len;
    float score;
    int8_t type; /* xllm_token_type */
} tok_entry;

/* Open-addressing string -> int32 map whose keys live in some arena. */
typedef struct str_map {
    int32_t *slot; /* value, -1 = empty */
    size_t mask;
} str_map;

struct xllm_tokenizer {
    tok_kind kind;
    char model[16];
    int32_t n_vocab;
    char *text; /* all token texts, back to back */
    tok_entry *tok;
    str_map tok_map; /* text -> id (the last id wins for duplicates, as llama.cpp) */

    /* BPE merges "left right" -> rank */
    char *merge_text;
    size_t *merge_off;
    uint32_t *merge_len;
    int32_t n_merges;
    str_map merge_map;
    bool digits3; /* pre-tokenizer groups up to 3 digits (llama3) instead of 1 (qwen2) */

    int32_t bos, eos, unk, pad, eot, eom;
    bool add_bos, add_eos, add_space_prefix;

    int32_t *special; /* control, user-defined and unknown tokens, longest text first */
    int32_t n_special;
    uint8_t *eog; /* n_vocab flags */

    int32_t byte_tok[256]; /* SPM: the <0xNN> token of each byte (-1 if none) */
    /* BPE: GPT-2 byte <-> code point map. */
    uint16_t byte_cp[256];
    int16_t cp_byte[512]; /* -1 when the code point is not a byte's */
};

/* ---------------------------------------------------------------------------------------- */
/* Small helpers                                                                             */
/* ---------------------------------------------------------------------------------------- */

typedef struct ivec {
    int32_t *v;
    size_t n, cap;
} ivec;

static void ivec_push(ivec *a, int32_t x) {
    if (a->n == a->cap) {
        a->cap = a->cap ? a->cap * 2 : 64;
        a->v = xllm_xrealloc(a->v, a->cap * sizeof(int32_t));
    }
    a->v[a->n++] = x;
}

typedef struct bbuf {
    char *p;
    size_t n, cap;
} bbuf;

static void bbuf_put(bbuf *b, const void *src, size_t n) {
    if (b->n + n > b->cap) {
        size_t c = b->cap ? b->cap : 256;
        while (c < b->n + n) c *= 2;
        b->p = xllm_xrealloc(b->p, c);
        b->cap = c;
    }
    memcpy(b->p + b->n, src, n);
    b->n += n;
}

static uint64_t hash_bytes(const char *s, size_t n) {
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) {
        h ^= (uint8_t)s[i];
        h *= 1099511628211ull;
    }
    return h ^ (h >> 29);
}

static void map_init(str_map *m, size_t n) {
    size_t cap = 16;
    while (cap < n * 2) cap *= 2;
    m->slot = xllm_xmalloc(cap * sizeof(int32_t));
    for (size_t i = 0; i < cap; i++) m->slot[i] = -1;
    m->mask = cap - 1;
}

/* key_of(ctx, value) gives the key of a stored value. */
typedef const char *(*key_fn)(const xllm_tokenizer *t, int32_t v, size_t *len);

static int32_t map_find(const str_map *m, const xllm_tokenizer *t, key_fn key, const char *s,
                        size_t n) {
    if (!m->slot) return -1;
    size_t i = (size_t)hash_bytes(s, n) & m->mask;
    for (;;) {
        int32_t v = m->slot[i];
        if (v < 0) return -1;
        size_t kn;
        const char *k = key(t, v, &kn);
        if (kn == n && memcmp(k, s, n) == 0) return v;
        i = (i + 1) & m->mask;
    }
}

/* Inserts v; an existing equal key is replaced. */
static void map_put(str_map *m, const xllm_tokenizer *t, key_fn key, int32_t v) {
    size_t n;
    const char *s = key(t, v, &n);
    size_t i = (size_t)hash_bytes(s, n) & m->mask;
    for (;;) {
        int32_t cur = m->slot[i];
        if (cur < 0) {
            m->slot[i] = v;
            return;
        }
        size_t kn;
        const char *k = key(t, cur, &kn);
        if (kn == n && memcmp(k, s, n) == 0) {
            m->slot[i] = v;
            return;
        }
        i = (i + 1) & m->mask;
    }
}

static const char *tok_key(const xllm_tokenizer *t, int32_t v, size_t *len) {
    *len = t->tok[v].len;
    return t->text + t->tok[v].off;
}

static const char *merge_key(const xllm_tokenizer *t, int32_t v, size_t *len) {
    *len = t->merge_len[v];
    return t->merge_text + t->merge_off[v];
}

static int32_t text_to_token(const xllm_tokenizer *t, const char *s, size_t n) {
    return map_find(&t->tok_map, t, tok_key, s, n);
}

static int utf8_len(uint8_t c) {
    static const int8_t lut[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4};
    return lut[c >> 4];
}

/* Decodes one code point at s[0..n); invalid sequences give 0xFFFD over one byte. */
static uint32_t utf8_decode(const uint8_t *s, size_t n, int *len) {
    uint8_t c = s[0];
    int l = utf8_len(c);
    if (l == 1 || (size_t)l > n) {
        *len = 1;
        return c < 0x80 ? c : 0xFFFD;
    }
    uint32_t cp = c & (0x7F >> l);
    for (int i = 1; i < l; i++) {
        if ((s[i] & 0xC0) != 0x80) {
            *len = 1;
            return 0xFFFD;
        }
        cp = (cp << 6) | (s[i] & 0x3F);
    }
    *len = l;
    return cp;
}

static int utf8_encode(uint32_t cp, char *out) {
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (char)(0xC0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (char)(0xE0 | (cp >> 12));
        out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (char)(0xF0 | (cp >> 18));
    out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    out[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* ---------------------------------------------------------------------------------------- */
/* Loading                                                                                   */
/* ---------------------------------------------------------------------------------------- */

void xllm_tokenizer_free(xllm_tokenizer *t) {
    if (!t) return;
    free(t->text);
    free(t->tok);
    free(t->tok_map.slot);
    free(t->merge_text);
    free(t->merge_off);
    free(t->merge_len);
    free(t->merge_map.slot);
    free(t->special);
    free(t->eog);
    free(t);
}

/* Reads an optional token id key: absent keeps *id; present must be a valid id. */
static xllm_status read_id(const xllm_gguf *g, const char *key, int32_t n_vocab, int32_t *id,
                           char *err, size_t err_size) {
    const xllm_gguf_kv *kv = xllm_gguf_find(g, key);
    if (!kv) return XLLM_OK;
    int64_t v;
    if (!xllm_gguf_get_i64(g, key, &v)) {
        xllm_set_err(err, err_size, "%s: expected an integer, got %s", key,
                     xllm_gguf_type_name(kv->type));
        return XLLM_ERR_FORMAT;
    }
    if (v == -1 || v == (int64_t)UINT32_MAX) { /* converters write -1 (as int or uint32): none */
        *id = -1;
        return XLLM_OK;
    }
    if (v < 0 || v >= n_vocab) {
        /* as llama.cpp does: a bad special id is ignored and the default kept */
        return XLLM_OK;
    }
    *id = (int32_t)v;
    return XLLM_OK;
}

static xllm_status read_bool(const xllm_gguf *g, const char *key, bool *out, char *err,
                             size_t err_size) {
    const xllm_gguf_kv *kv = xllm_gguf_find(g, key);
    if (!kv) return XLLM_OK;
    if (!xllm_gguf_get_bool(g, key, out)) {
        xllm_set_err(err, err_size, "%s: expected a bool, got %s", key,
                     xllm_gguf_type_name(kv->type));
        return XLLM_ERR_FORMAT;
    }
    return XLLM_OK;
}

/* An optional array key: NULL when absent; error when present with another type or length. */
static xllm_status read_arr(const xllm_gguf *g, const char *key, xllm_gguf_type elem,
                            uint64_t want_n, const xllm_gguf_kv **out, char *err, size_t err_size) {
    *out = NULL;
    const xllm_gguf_kv *kv = xllm_gguf_find(g, key);
    if (!kv) return XLLM_OK;
    if (kv->type != XLLM_GGUF_ARRAY || kv->arr_type != elem) {
        xllm_set_err(err, err_size, "%s: expected an array of %s", key, xllm_gguf_type_name(elem));
        return XLLM_ERR_FORMAT;
    }
    if (want_n && kv->arr_n != want_n) {
        xllm_set_err(err, err_size, "%s: %llu entries, but tokenizer.ggml.tokens has %llu", key,
                     (unsigned long long)kv->arr_n, (unsigned long long)want_n);
        return XLLM_ERR_FORMAT;
    }
    *out = kv;
    return XLLM_OK;
}

static int cmp_special(const void *a, const void *b, const xllm_tokenizer *t) {
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    if (t->tok[x].len != t->tok[y].len) return t->tok[x].len > t->tok[y].len ? -1 : 1;
    return (x > y) - (x < y);
}

/* Insertion sort: the special-token list is small, and qsort has no context argument in C11. */
static void sort_special(xllm_tokenizer *t) {
    for (int32_t i = 1; i < t->n_special; i++) {
        int32_t v = t->special[i];
        int32_t j = i - 1;
        while (j >= 0 && cmp_special(&t->special[j], &v, t) > 0) {
            t->special[j + 1] = t->special[j];
            j--;
        }
        t->special[j + 1] = v;
    }
}

static void build_gpt2_byte_map(xllm_tokenizer *t) {
    for (int i = 0; i < 512; i++) t->cp_byte[i] = -1;
    int n = 0;
    for (int b = 0; b < 256; b++) {
        bool direct = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
        uint16_t cp = direct ? (uint16_t)b : (uint16_t)(256 + n++);
        t->byte_cp[b] = cp;
        t->cp_byte[cp] = (int16_t)b;
    }
}

static bool is_eog_text(const char *s, size_t n) {
    static const char *const names[] = {"<|im_end|>", "<|endoftext|>", "<|eot_id|>",
                                        "<|eom_id|>", "<end_of_turn>", "<|end|>",
                                        "<EOT>"};
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        if (strlen(names[i]) == n && memcmp(names[i], s, n) == 0) return true;
    }
    return false;
}

xllm_status xllm_tokenizer_from_gguf(const xllm_gguf *g, xllm_tokenizer **out, char *err,
                                     size_t err_size) {
    if (!out) return XLLM_ERR_INVALID_ARG;
    *out = NULL;
    if (!g) return XLLM_ERR_INVALID_ARG;
    xllm_status st;

    const char *model = xllm_gguf_get_str(g, "tokenizer.ggml.model");
    if (!model) {
        xllm_set_err(err, err_size, "tokenizer.ggml.model: missing (or not a string)");
        return XLLM_ERR_FORMAT;
    }
    tok_kind kind;
    if (strcmp(model, "llama") == 0)
        kind = TOK_SPM;
    else if (strcmp(model, "gpt2") == 0)
        kind = TOK_BPE;
    else {
        xllm_set_err(err, err_size, "tokenizer.ggml.model: '%s' is not supported (llama, gpt2)",
                     model);
        return XLLM_ERR_UNSUPPORTED;
    }

    const xllm_gguf_kv *toks = xllm_gguf_get_arr(g, "tokenizer.ggml.tokens", XLLM_GGUF_STRING);
    if (!toks) {
        xllm_set_err(err, err_size, "tokenizer.ggml.tokens: missing (or not a string array)");
        return XLLM_ERR_FORMAT;
    }
    if (toks->arr_n == 0 || toks->arr_n > INT32_MAX / 2) {
        xllm_set_err(err, err_size, "tokenizer.ggml.tokens: bad token count %llu",
                     (unsigned long long)toks->arr_n);
        return XLLM_ERR_FORMAT;
    }
    int32_t n = (int32_t)toks->arr_n;
    const xllm_gguf_kv *scores, *types, *merges;
    if ((st = read_arr(g, "tokenizer.ggml.scores", XLLM_GGUF_FLOAT32, toks->arr_n, &scores, err,
                       err_size)) != XLLM_OK)
        return st;
    if ((st = read_arr(g, "tokenizer.ggml.token_type", XLLM_GGUF_INT32, toks->arr_n, &types, err,
                       err_size)) != XLLM_OK)
        return st;
    if ((st = read_arr(g, "tokenizer.ggml.merges", XLLM_GGUF_STRING, 0, &merges, err, err_size)) !=
        XLLM_OK)
        return st;
    if (kind == TOK_BPE && !merges) {
        xllm_set_err(err, err_size, "tokenizer.ggml.merges: missing for a gpt2 vocabulary");
        return XLLM_ERR_FORMAT;
    }
    if (merges && merges->arr_n > INT32_MAX / 2) {
        xllm_set_err(err, err_size, "tokenizer.ggml.merges: too many entries");
        return XLLM_ERR_FORMAT;
    }

    xllm_tokenizer *t = xllm_xcalloc(1, sizeof(*t));
    t->kind = kind;
    snprintf(t->model, sizeof(t->model), "%s", model);
    t->n_vocab = n;

    /* Token texts, scores, types. */
    size_t total = 0;
    for (int32_t i = 0; i < n; i++) total += toks->arr_strs[i].len;
    t->text = xllm_xmalloc(total + 1);
    t->tok = xllm_xcalloc((size_t)n, sizeof(tok_entry));
    size_t off = 0;
    for (int32_t i = 0; i < n; i++) {
        const xllm_gguf_str *s = &toks->arr_strs[i];
        if (s->len > UINT32_MAX) {
            xllm_set_err(err, err_size, "tokenizer.ggml.tokens[%d]: too long", i);
            xllm_tokenizer_free(t);
            return XLLM_ERR_FORMAT;
        }
        memcpy(t->text + off, s->ptr, (size_t)s->len);
        t->tok[i].off = off;
        t->tok[i].len = (uint32_t)s->len;
        off += (size_t)s->len;
        if (scores) memcpy(&t->tok[i].score, (const char *)scores->arr_data + 4 * (size_t)i, 4);
        int32_t ty = XLLM_TOKEN_TYPE_NORMAL;
        if (types) memcpy(&ty, (const char *)types->arr_data + 4 * (size_t)i, 4);
        if (ty < XLLM_TOKEN_TYPE_NORMAL || ty > XLLM_TOKEN_TYPE_BYTE)
            ty = XLLM_TOKEN_TYPE_UNDEFINED;
        t->tok[i].type = (int8_t)ty;
    }
    map_init(&t->tok_map, (size_t)n);
    for (int32_t i = 0; i < n; i++) {
        if (t->tok[i].len) map_put(&t->tok_map, t, tok_key, i);
    }

    /* Merges. */
    if (merges) {
        t->n_merges = (int32_t)merges->arr_n;
        size_t mt = 0;
        for (int32_t i = 0; i < t->n_merges; i++) mt += merges->arr_strs[i].len;
        t->merge_text = xllm_xmalloc(mt + 1);
        t->merge_off = xllm_xmalloc(((size_t)t->n_merges + 1) * sizeof(size_t));
        t->merge_len = xllm_xmalloc(((size_t)t->n_merges + 1) * sizeof(uint32_t));
        size_t mo = 0;
        for (int32_t i = 0; i < t->n_merges; i++) {
            const xllm_gguf_str *s = &merges->arr_strs[i];
            if (s->len > UINT32_MAX) {
                xllm_set_err(err, err_size, "tokenizer.ggml.merges[%d]: too long", i);
                xllm_tokenizer_free(t);
                return XLLM_ERR_FORMAT;
            }
            memcpy(t->merge_text + mo, s->ptr, (size_t)s->len);
            t->merge_off[i] = mo;
            t->merge_len[i] = (uint32_t)s->len;
            mo += (size_t)s->len;
        }
        map_init(&t->merge_map, (size_t)t->n_merges);
        /* The first (lowest) rank wins for duplicate merges. */
        for (int32_t i = t->n_merges - 1; i >= 0; i--) map_put(&t->merge_map, t, merge_key, i);
    }
    const char *pre = xllm_gguf_get_str(g, "tokenizer.ggml.pre");
    t->digits3 = pre && (strcmp(pre, "llama-bpe") == 0 || strcmp(pre, "llama3") == 0 ||
                         strcmp(pre, "smaug-bpe") == 0);

    /* Special ids and flags, with llama.cpp's defaults. */
    t->eot = t->eom = t->pad = -1;
    if (kind == TOK_SPM) {
        t->bos = 1;
        t->eos = 2;
        t->unk = 0;
        t->add_bos = true;
        t->add_eos = false;
        t->add_space_prefix = true;
    } else {
        t->bos = 11;
        t->eos = 11;
        t->unk = -1;
        t->add_bos = false;
        t->add_eos = false;
        t->add_space_prefix = false;
    }
    /* Defaults that do not fit the vocabulary are dropped (only explicit keys are errors). */
    if (t->bos >= n) t->bos = -1;
    if (t->eos >= n) t->eos = -1;
    if (t->unk >= n) t->unk = -1;
    if ((st = read_id(g, "tokenizer.ggml.bos_token_id", n, &t->bos, err, err_size)) ||
        (st = read_id(g, "tokenizer.ggml.eos_token_id", n, &t->eos, err, err_size)) ||
        (st = read_id(g, "tokenizer.ggml.unknown_token_id", n, &t->unk, err, err_size)) ||
        (st = read_id(g, "tokenizer.ggml.padding_token_id", n, &t->pad, err, err_size)) ||
        (st = read_id(g, "tokenizer.ggml.eot_token_id", n, &t->eot, err, err_size)) ||
        (st = read_id(g, "tokenizer.ggml.eom_token_id", n, &t->eom, err, err_size)) ||
        (st = read_bool(g, "tokenizer.ggml.add_bos_token", &t->add_bos, err, err_size)) ||
        (st = read_bool(g, "tokenizer.ggml.add_eos_token", &t->add_eos, err, err_size)) ||
        (st = read_bool(g, "tokenizer.ggml.add_space_prefix", &t->add_space_prefix, err,
                        err_size))) {
        xllm_tokenizer_free(t);
        return st;
    }
    if (t->add_bos && t->bos < 0) t->add_bos = false;
    if (t->add_eos && t->eos < 0) t->add_eos = false;

    /* End-of-generation set: eos, eot, eom and the usual end-of-turn texts (which are treated as
     * control tokens, as llama.cpp does). */
    t->eog = xllm_xcalloc((size_t)n, 1);
    for (int32_t i = 0; i < n; i++) {
        if (is_eog_text(t->text + t->tok[i].off, t->tok[i].len)) {
            t->eog[i] = 1;
            t->tok[i].type = XLLM_TOKEN_TYPE_CONTROL;
        }
    }
    if (t->eos >= 0) t->eog[t->eos] = 1;
    if (t->eot >= 0) t->eog[t->eot] = 1;
    if (t->eom >= 0) t->eog[t->eom] = 1;

    /* Special tokens matched in text before the tokenizer proper. */
    t->special = xllm_xmalloc((size_t)n * sizeof(int32_t));
    for (int32_t i = 0; i < n; i++) {
        int ty = t->tok[i].type;
        if (t->tok[i].len && (ty == XLLM_TOKEN_TYPE_CONTROL || ty == XLLM_TOKEN_TYPE_USER_DEFINED ||
                              ty == XLLM_TOKEN_TYPE_UNKNOWN))
            t->special[t->n_special++] = i;
    }
    sort_special(t);

    /* Byte tokens. */
    for (int b = 0; b < 256; b++) t->byte_tok[b] = -1;
    if (kind == TOK_SPM) {
        for (int b = 0; b < 256; b++) {
            char buf[8];
            snprintf(buf, sizeof(buf), "<0x%02X>", b);
            int32_t id = text_to_token(t, buf, 6);
            if (id < 0) { /* fall back to the byte itself as a token */
                char c = (char)b;
                id = text_to_token(t, &c, 1);
            }
            t->byte_tok[b] = id;
        }
    } else {
        build_gpt2_byte_map(t);
        for (int b = 0; b < 256; b++) {
            char buf[4];
            int l = utf8_encode(t->byte_cp[b], buf);
            t->byte_tok[b] = text_to_token(t, buf, (size_t)l);
        }
    }

    *out = t;
    return XLLM_OK;
}

/* ---------------------------------------------------------------------------------------- */
/* Accessors                                                                                 */
/* ---------------------------------------------------------------------------------------- */

int32_t xllm_tokenizer_n_vocab(const xllm_tokenizer *tok) {
    return tok ? tok->n_vocab : 0;
}
int32_t xllm_token_bos(const xllm_tokenizer *tok) {
    return tok ? tok->bos : -1;
}
int32_t xllm_token_eos(const xllm_tokenizer *tok) {
    return tok ? tok->eos : -1;
}
bool xllm_token_is_eog(const xllm_tokenizer *tok, int32_t id) {
    return tok && id >= 0 && id < tok->n_vocab && tok->eog[id];
}
bool xllm_tokenizer_add_bos(const xllm_tokenizer *tok) {
    return tok && tok->add_bos;
}
const char *xllm_tokenizer_type(const xllm_tokenizer *tok) {
    return tok ? tok->model : "";
}
bool xllm_tokenizer_add_space_prefix(const xllm_tokenizer *tok) {
    return tok && tok->add_space_prefix;
}

const char *xllm_tokenizer_token_text(const xllm_tokenizer *tok, int32_t id, size_t *len) {
    if (!tok || id < 0 || id >= tok->n_vocab) return NULL;
    if (len) *len = tok->tok[id].len;
    return tok->text + tok->tok[id].off;
}

xllm_token_type xllm_tokenizer_token_type(const xllm_tokenizer *tok, int32_t id) {
    if (!tok || id < 0 || id >= tok->n_vocab) return XLLM_TOKEN_TYPE_UNDEFINED;
    return (xllm_token_type)tok->tok[id].type;
}

/* ---------------------------------------------------------------------------------------- */
/* Pair merging (shared by SPM and BPE)                                                      */
/* ---------------------------------------------------------------------------------------- */

typedef struct symbol {
    int32_t prev, next;
    size_t off; /* into the session text */
    size_t n;   /* 0 once merged into its left neighbour */
} symbol;

typedef struct bigram {
    int32_t left, right;
    float score; /* higher first; BPE stores -rank */
    size_t size;
} bigram;

typedef struct session {
    const xllm_tokenizer *t;
    const char *text;
    symbol *sym;
    size_t n_sym, cap_sym;
    bigram *heap;
    size_t n_heap, cap_heap;
    bbuf key; /* scratch for BPE merge keys */
} session;

static bool bigram_before(const bigram *a, const bigram *b) {
    return a->score > b->score || (a->score == b->score && a->left < b->left);
}

static void heap_push(session *s, bigram b) {
    if (s->n_heap == s->cap_heap) {
        s->cap_heap = s->cap_heap ? s->cap_heap * 2 : 64;
        s->heap = xllm_xrealloc(s->heap, s->cap_heap * sizeof(bigram));
    }
    size_t i = s->n_heap++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!bigram_before(&b, &s->heap[p])) break;
        s->heap[i] = s->heap[p];
        i = p;
    }
    s->heap[i] = b;
}

static bigram heap_pop(session *s) {
    bigram top = s->heap[0];
    bigram last = s->heap[--s->n_heap];
    size_t i = 0, n = s->n_heap;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && bigram_before(&s->heap[c + 1], &s->heap[c])) c++;
        if (!bigram_before(&s->heap[c], &last)) break;
        s->heap[i] = s->heap[c];
        i = c;
    }
    if (n) s->heap[i] = last;
    return top;
}

/* Score of merging two adjacent symbols, false when they do not merge. */
static bool pair_score(session *s, int32_t l, int32_t r, float *score) {
    const xllm_tokenizer *t = s->t;
    const symbol *a = &s->sym[l], *b = &s->sym[r];
    if (t->kind == TOK_SPM) {
        int32_t id = text_to_token(t, s->text + a->off, a->n + b->n);
        if (id < 0) return false;
        *score = t->tok[id].score;
        return true;
    }
    s->key.n = 0;
    bbuf_put(&s->key, s->text + a->off, a->n);
    bbuf_put(&s->key, " ", 1);
    bbuf_put(&s->key, s->text + b->off, b->n);
    int32_t rank = map_find(&t->merge_map, t, merge_key, s->key.p, s->key.n);
    if (rank < 0) return false;
    *score = -(float)rank;
    return true;
}

static void try_add_bigram(session *s, int32_t l, int32_t r) {
    if (l < 0 || r < 0) return;
    float score;
    if (!pair_score(s, l, r, &score)) return;
    bigram b = {l, r, score, s->sym[l].n + s->sym[r].n};
    heap_push(s, b);
}

/* Splits text[0..len) into symbols (one per UTF-8 character) and merges pairs to exhaustion;
 * then emits one token per symbol, or its bytes' tokens when a symbol is not in the vocab. */
static void merge_and_emit(session *s, const char *text, size_t len, ivec *out) {
    const xllm_tokenizer *t = s->t;
    s->text = text;
    s->n_sym = 0;
    s->n_heap = 0;
    for (size_t off = 0; off < len;) {
        size_t l = (size_t)utf8_len((uint8_t)text[off]);
        if (l > len - off) l = len - off;
        if (s->n_sym == s->cap_sym) {
            s->cap_sym = s->cap_sym ? s->cap_sym * 2 : 64;
            s->sym = xllm_xrealloc(s->sym, s->cap_sym * sizeof(symbol));
        }
        symbol *y = &s->sym[s->n_sym];
        y->off = off;
        y->n = l;
        y->prev = (int32_t)s->n_sym - 1;
        off += l;
        y->next = off == len ? -1 : (int32_t)s->n_sym + 1;
        s->n_sym++;
    }
    if (s->n_sym == 0) return;
    for (size_t i = 1; i < s->n_sym; i++) try_add_bigram(s, (int32_t)i - 1, (int32_t)i);
    while (s->n_heap) {
        bigram b = heap_pop(s);
        symbol *l = &s->sym[b.left], *r = &s->sym[b.right];
        if (l->n == 0 || r->n == 0 || l->n + r->n != b.size) continue;
        l->n += r->n;
        r->n = 0;
        l->next = r->next;
        if (r->next >= 0) s->sym[r->next].prev = b.left;
        try_add_bigram(s, l->prev, b.left);
        try_add_bigram(s, b.left, l->next);
    }
    for (int32_t i = 0; i != -1; i = s->sym[i].next) {
        const symbol *y = &s->sym[i];
        int32_t id = text_to_token(t, text + y->off, y->n);
        if (id >= 0) {
            ivec_push(out, id);
            continue;
        }
        if (t->kind == TOK_SPM) {
            for (size_t j = 0; j < y->n; j++) {
                int32_t b = t->byte_tok[(uint8_t)text[y->off + j]];
                if (b < 0) b = t->unk;
                if (b >= 0) ivec_push(out, b);
            }
        } else { /* one token per byte-level character */
            for (size_t j = 0; j < y->n;) {
                size_t l = (size_t)utf8_len((uint8_t)text[y->off + j]);
                if (l > y->n - j) l = y->n - j;
                int32_t b = text_to_token(t, text + y->off + j, l);
                if (b < 0) b = t->unk;
                if (b >= 0) ivec_push(out, b);
                j += l;
            }
        }
    }
}

/* ---------------------------------------------------------------------------------------- */
/* BPE pre-tokenizer: an approximation of the Qwen2 / Llama-3 split regex                    */
/*   (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1 or 1-3}                    */
/*   | ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+                                       */
/* with coarse Unicode classes (exact tables belong to the full BPE implementation).         */
/* ---------------------------------------------------------------------------------------- */

enum { CL_OTHER = 0, CL_L = 1, CL_N = 2, CL_S = 3 };

static int cp_class(uint32_t c) {
    if (c < 0x80) {
        if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')) return CL_L;
        if (c >= '0' && c <= '9') return CL_N;
        if ((c >= 9 && c <= 13) || c == ' ') return CL_S;
        return CL_OTHER;
    }
    if (c == 0x85 || c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 ||
        c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000)
        return CL_S;
    if (c == 0xB2 || c == 0xB3 || c == 0xB9 || (c >= 0xBC && c <= 0xBE) ||
        (c >= 0x660 && c <= 0x669) || (c >= 0x6F0 && c <= 0x6F9) || (c >= 0x966 && c <= 0x96F) ||
        c == 0x2070 || (c >= 0x2074 && c <= 0x2079) || (c >= 0x2080 && c <= 0x2089) ||
        (c >= 0x2150 && c <= 0x2189) || (c >= 0x2460 && c <= 0x249B) ||
        (c >= 0x2776 && c <= 0x2793) || c == 0x3007 || (c >= 0x3021 && c <= 0x3029) ||
        (c >= 0xFF10 && c <= 0xFF19))
        return CL_N;
    if (c == 0xAA || c == 0xB5 || c == 0xBA) return CL_L;
    if (c <= 0xBF || c == 0xD7 || c == 0xF7 || (c >= 0x300 && c <= 0x36F) || c == 0x37E ||
        c == 0x387 || (c >= 0x2000 && c <= 0x2BFF) || (c >= 0x2E00 && c <= 0x2E7F) ||
        (c >= 0x3000 && c <= 0x3004) || (c >= 0x3008 && c <= 0x3020) || c == 0x3030 ||
        (c >= 0x3099 && c <= 0x309C) || c == 0x30A0 || c == 0x30FB ||
        (c >= 0xD800 && c <= 0xF8FF) || (c >= 0xFE00 && c <= 0xFE0F) ||
        (c >= 0xFE30 && c <= 0xFE6F) || (c >= 0xFF00 && c <= 0xFF20) ||
        (c >= 0xFF3B && c <= 0xFF40) || (c >= 0xFF5B && c <= 0xFF65) ||
        (c >= 0xFFF0 && c <= 0xFFFF) || (c >= 0x1F000 && c <= 0x1FAFF) || c >= 0xE0000)
        return CL_OTHER;
    return CL_L;
}

typedef struct cpinfo {
    uint32_t cp;
    size_t off; /* byte offset */
    int cls;
} cpinfo;

static bool is_crlf(uint32_t c) {
    return c == '\r' || c == '\n';
}

static uint32_t lower_ascii(uint32_t c) {
    return c >= 'A' && c <= 'Z' ? c + 32 : c;
}

/* Length in code points of the pre-token starting at cps[i]. */
static size_t pretoken_len(const cpinfo *c, size_t n, size_t i, bool digits3) {
    /* contractions */
    if (c[i].cp == '\'' && i + 1 < n) {
        uint32_t a = lower_ascii(c[i + 1].cp);
        uint32_t b = i + 2 < n ? lower_ascii(c[i + 2].cp) : 0;
        if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return 3;
        if (a == 's' || a == 't' || a == 'm' || a == 'd') return 2;
    }
    /* [^\r\n\p{L}\p{N}]?\p{L}+ */
    {
        size_t j = i;
        if (c[j].cls != CL_L && c[j].cls != CL_N && !is_crlf(c[j].cp) && j + 1 < n &&
            c[j + 1].cls == CL_L)
            j++;
        if (c[j].cls == CL_L) {
            while (j < n && c[j].cls == CL_L) j++;
            return j - i;
        }
    }
    /* \p{N} or \p{N}{1,3} */
    if (c[i].cls == CL_N) {
        size_t j = i + 1;
        if (digits3)
            while (j < n && j < i + 3 && c[j].cls == CL_N) j++;
        return j - i;
    }
    /*  ?[^\s\p{L}\p{N}]+[\r\n]* */
    {
        size_t j = i;
        if (c[j].cp == ' ' && j + 1 < n) j++;
        if (c[j].cls == CL_OTHER) {
            while (j < n && c[j].cls == CL_OTHER) j++;
            while (j < n && is_crlf(c[j].cp)) j++;
            return j - i;
        }
    }
    /* whitespace */
    size_t e = i;
    while (e < n && c[e].cls == CL_S) e++;
    /* \s*[\r\n]+ : up to and including the last CR/LF of the run */
    for (size_t k = e; k > i; k--) {
        if (is_crlf(c[k - 1].cp)) return k - i;
    }
    /* \s+(?!\S) */
    if (e == n) return e - i;
    if (e - i >= 2) return e - i - 1;
    return 1; /* \s+ (or a lone character of another class) */
}

static void bpe_tokenize(session *s, const char *text, size_t len, ivec *out) {
    const xllm_tokenizer *t = s->t;
    cpinfo *c = xllm_xmalloc((len + 1) * sizeof(cpinfo));
    size_t n = 0;
    for (size_t off = 0; off < len;) {
        int l;
        uint32_t cp = utf8_decode((const uint8_t *)text + off, len - off, &l);
        c[n].cp = cp;
        c[n].off = off;
        c[n].cls = cp_class(cp);
        n++;
        off += (size_t)l;
    }
    c[n].off = len;
    bbuf word = {0};
    for (size_t i = 0; i < n;) {
        size_t k = pretoken_len(c, n, i, t->digits3);
        word.n = 0;
        for (size_t b = c[i].off; b < c[i + k].off; b++) {
            char enc[4];
            int l = utf8_encode(t->byte_cp[(uint8_t)text[b]], enc);
            bbuf_put(&word, enc, (size_t)l);
        }
        merge_and_emit(s, word.p, word.n, out);
        i += k;
    }
    free(word.p);
    free(c);
}

/* ---------------------------------------------------------------------------------------- */
/* Tokenize                                                                                  */
/* ---------------------------------------------------------------------------------------- */

typedef struct fragment {
    int32_t tok; /* -1 for raw text */
    size_t off, len;
} fragment;

typedef struct fvec {
    fragment *v;
    size_t n, cap;
} fvec;

static void fvec_push(fvec *a, int32_t tok, size_t off, size_t len) {
    if (a->n == a->cap) {
        a->cap = a->cap ? a->cap * 2 : 16;
        a->v = xllm_xrealloc(a->v, a->cap * sizeof(fragment));
    }
    a->v[a->n++] = (fragment){tok, off, len};
}

static const char *find_bytes(const char *h, size_t hn, const char *nd, size_t nn) {
    if (nn == 0 || nn > hn) return NULL;
    return memmem(h, hn, nd, nn);
}

/* Splits the text at every occurrence of the special tokens, longest tokens first. */
static void partition(const xllm_tokenizer *t, const char *text, size_t len, bool parse_special,
                      fvec *frags) {
    fvec tmp = {0};
    fvec_push(frags, -1, 0, len);
    for (int32_t si = 0; si < t->n_special; si++) {
        int32_t id = t->special[si];
        int ty = t->tok[id].type;
        if (!parse_special && (ty == XLLM_TOKEN_TYPE_CONTROL || ty == XLLM_TOKEN_TYPE_UNKNOWN))
            continue;
        const char *st = t->text + t->tok[id].off;
        size_t sl = t->tok[id].len;
        bool any = false;
        tmp.n = 0;
        for (size_t fi = 0; fi < frags->n; fi++) {
            fragment f = frags->v[fi];
            if (f.tok >= 0) {
                fvec_push(&tmp, f.tok, f.off, f.len);
                continue;
            }
            size_t pos = f.off, end = f.off + f.len;
            for (;;) {
                const char *m = find_bytes(text + pos, end - pos, st, sl);
                if (!m) break;
                size_t mo = (size_t)(m - text);
                if (mo > pos) fvec_push(&tmp, -1, pos, mo - pos);
                fvec_push(&tmp, id, mo, sl);
                pos = mo + sl;
                any = true;
            }
            if (pos < end) fvec_push(&tmp, -1, pos, end - pos);
        }
        if (any) {
            fvec sw = *frags;
            *frags = tmp;
            tmp = sw;
        }
    }
    free(tmp.v);
}

int32_t xllm_tokenize(const xllm_tokenizer *tok, const char *text, size_t len, int32_t *ids,
                      int32_t max, bool add_special, bool parse_special) {
    if (!tok || (!text && len) || max < 0 || (!ids && max > 0)) return INT32_MIN;
    ivec out = {0};
    fvec frags = {0};
    session s = {.t = tok};
    bbuf buf = {0};

    if (len) partition(tok, text, len, parse_special, &frags);
    bool prev_special = true; /* SPM: prefix a space at the start and after special tokens */
    if (add_special && tok->add_bos) ivec_push(&out, tok->bos);
    for (size_t fi = 0; fi < frags.n; fi++) {
        const fragment *f = &frags.v[fi];
        if (f->tok >= 0) {
            ivec_push(&out, f->tok);
            prev_special = true;
            continue;
        }
        if (tok->kind == TOK_SPM) {
            buf.n = 0;
            if (tok->add_space_prefix && prev_special) bbuf_put(&buf, "\xE2\x96\x81", 3);
            for (size_t i = 0; i < f->len; i++) {
                char ch = text[f->off + i];
                if (ch == ' ')
                    bbuf_put(&buf, "\xE2\x96\x81", 3);
                else
                    bbuf_put(&buf, &ch, 1);
            }
            merge_and_emit(&s, buf.p, buf.n, &out);
        } else {
            bpe_tokenize(&s, text + f->off, f->len, &out);
        }
        prev_special = false;
    }
    if (add_special && tok->add_eos) ivec_push(&out, tok->eos);

    free(buf.p);
    free(frags.v);
    free(s.sym);
    free(s.heap);
    free(s.key.p);
    int32_t res;
    if (out.n > INT32_MAX) {
        res = INT32_MIN;
    } else if ((int32_t)out.n > max) {
        res = -(int32_t)out.n;
    } else {
        if (out.n) memcpy(ids, out.v, out.n * sizeof(int32_t));
        res = (int32_t)out.n;
    }
    free(out.v);
    return res;
}

/* ---------------------------------------------------------------------------------------- */
/* Detokenize                                                                                */
/* ---------------------------------------------------------------------------------------- */

static int32_t copy_piece(const char *src, size_t n, char *buf, int32_t buf_size) {
    if (n > (size_t)INT32_MAX) return INT32_MIN;
    if ((int32_t)n > buf_size) return -(int32_t)n;
    if (n) memcpy(buf, src, n);
    return (int32_t)n;
}

static int hexval(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
}

int32_t xllm_token_to_piece(const xllm_tokenizer *tok, int32_t id, char *buf, int32_t buf_size,
                            bool special) {
    if (!tok || id < 0 || id >= tok->n_vocab || buf_size < 0 || (!buf && buf_size > 0))
        return INT32_MIN;
    const tok_entry *e = &tok->tok[id];
    const char *s = tok->text + e->off;
    size_t n = e->len;
    switch (e->type) {
        case XLLM_TOKEN_TYPE_CONTROL:
        case XLLM_TOKEN_TYPE_UNKNOWN:
            if (!special) return 0;
            return copy_piece(s, n, buf, buf_size);
        case XLLM_TOKEN_TYPE_USER_DEFINED:
            return copy_piece(s, n, buf, buf_size);
        case XLLM_TOKEN_TYPE_BYTE:
            if (tok->kind == TOK_SPM) {
                if (n == 6 && memcmp(s, "<0x", 3) == 0 && s[5] == '>' && hexval(s[3]) >= 0 &&
                    hexval(s[4]) >= 0) {
                    char b = (char)(hexval(s[3]) * 16 + hexval(s[4]));
                    return copy_piece(&b, 1, buf, buf_size);
                }
                return copy_piece(s, n, buf, buf_size);
            }
            return 0; /* llama.cpp prints nothing for BPE byte-typed tokens */
        case XLLM_TOKEN_TYPE_NORMAL:
            break;
        default: /* unused / undefined */
            return 0;
    }
    /* Normal tokens: decode into a small local buffer chunk by chunk, counting the length. */
    int32_t need = 0;
    for (size_t i = 0; i < n;) {
        char piece[4];
        size_t pl;
        if (tok->kind == TOK_SPM) {
            if (i + 3 <= n && memcmp(s + i, "\xE2\x96\x81", 3) == 0) {
                piece[0] = ' ';
                pl = 1;
                i += 3;
            } else {
                piece[0] = s[i];
                pl = 1;
                i++;
            }
        } else {
            int l;
            uint32_t cp = utf8_decode((const uint8_t *)s + i, n - i, &l);
            if (cp < 512 && tok->cp_byte[cp] >= 0) {
                piece[0] = (char)tok->cp_byte[cp];
                pl = 1;
            } else { /* not a byte-level character: keep it as it is */
                memcpy(piece, s + i, (size_t)l);
                pl = (size_t)l;
            }
            i += (size_t)l;
        }
        if (need + (int32_t)pl <= buf_size) memcpy(buf + need, piece, pl);
        need += (int32_t)pl;
    }
    return need <= buf_size ? need : -need;
}
