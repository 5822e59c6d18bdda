/* Tokenizer core: SentencePiece-style ("llama") encoding with score-ordered pair merges and byte
 * fallback, byte-level BPE ("gpt2") encoding with rank-ordered merges, special-token splitting,
 * and decoding of single tokens. Vocabularies come from vocab_gguf.c and vocab_hf.c. */
#include "tokenizer/tokenizer-impl.h"

#include <limits.h>
#include <string.h>
#include <utf8proc.h>

#include "util/common.h"

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

static void bbuf_reserve(bbuf *b, size_t n) {
    if (b->n + n > b->cap) {
        size_t c = b->cap ? b->cap : 256;
        while (c < b->n + n) c *= 2;
        b->p = xllm_xrealloc(b->p, c);
        b->cap = c;
    }
}

static void bbuf_put(bbuf *b, const void *src, size_t n) {
    if (n == 0) return;
    bbuf_reserve(b, n);
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

/* key(t, value) gives the key of a stored value. */
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

static const char *raw_key(const xllm_tokenizer *t, int32_t v, size_t *len) {
    *len = t->raw_len[v];
    return t->raw_text + t->raw_off[v];
}

int32_t xllm_tok_find(const xllm_tokenizer *t, const char *s, size_t n) {
    return map_find(&t->tok_map, t, tok_key, s, n);
}

static int utf8_len(uint8_t c) {
    static const int8_t lut[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4};
    return lut[c >> 4];
}

/* Decodes one code point at s[0..n); an invalid sequence gives 0xFFFD over one byte and
 * *valid = false. */
static uint32_t utf8_decode(const uint8_t *s, size_t n, int *len, bool *valid) {
    uint8_t c = s[0];
    int l = utf8_len(c);
    *valid = true;
    if (l == 1 || (size_t)l > n) {
        *len = 1;
        if (c < 0x80) return c;
        *valid = false;
        return 0xFFFD;
    }
    uint32_t cp = c & (0x7F >> l);
    for (int i = 1; i < l; i++) {
        if ((s[i] & 0xC0) != 0x80) {
            *len = 1;
            *valid = false;
            return 0xFFFD;
        }
        cp = (cp << 6) | (s[i] & 0x3F);
    }
    static const uint32_t min_cp[5] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < min_cp[l] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
        *len = 1;
        *valid = false;
        return 0xFFFD;
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
/* Construction                                                                              */
/* ---------------------------------------------------------------------------------------- */

void xllm_tokenizer_free(xllm_tokenizer *t) {
    if (!t) return;
    free(t->text);
    free(t->tok);
    free(t->tok_map.slot);
    free(t->merge);
    free(t->raw_text);
    free(t->raw_off);
    free(t->raw_len);
    free(t->raw_map.slot);
    free((void *)t->self_ok);
    xllm_pretok_free(t->pretok);
    free(t->special);
    free(t->eog);
    free(t);
}

xllm_tokenizer *xllm_tok_alloc(tok_kind kind, const char *model, int32_t n) {
    xllm_tokenizer *t = xllm_xcalloc(1, sizeof(*t));
    t->kind = kind;
    snprintf(t->model, sizeof(t->model), "%s", model);
    t->n_vocab = n;
    t->tok = xllm_xcalloc((size_t)n, sizeof(tok_entry));
    t->bos = t->eos = t->unk = t->pad = t->eot = t->eom = -1;
    return t;
}

void xllm_tok_set_texts(xllm_tokenizer *t, const char *const *strs, const size_t *lens) {
    size_t total = 0;
    for (int32_t i = 0; i < t->n_vocab; i++) total += strs[i] ? lens[i] : 0;
    t->text = xllm_xmalloc(total + 1);
    size_t off = 0;
    for (int32_t i = 0; i < t->n_vocab; i++) {
        size_t l = strs[i] ? lens[i] : 0;
        if (l) memcpy(t->text + off, strs[i], l);
        t->tok[i].off = off;
        t->tok[i].len = (uint32_t)l;
        off += l;
    }
    map_init(&t->tok_map, (size_t)t->n_vocab);
    for (int32_t i = 0; i < t->n_vocab; i++)
        if (t->tok[i].len) map_put(&t->tok_map, t, tok_key, i);
}

static uint64_t merge_hash(uint64_t key) {
    key *= 0x9E3779B97F4A7C15ull;
    return key ^ (key >> 31);
}

void xllm_tok_merges_reserve(xllm_tokenizer *t, size_t n) {
    size_t cap = 16;
    while (cap < n * 2) cap *= 2;
    free(t->merge);
    t->merge = xllm_xcalloc(cap, sizeof(merge_slot));
    t->merge_mask = cap - 1;
    t->n_merges = 0;
}

static uint64_t merge_key(int32_t l, int32_t r) {
    return (((uint64_t)(uint32_t)l << 32) | (uint32_t)r) + 1;
}

/* The merge of ids (l, r), or NULL. */
static inline const merge_slot *merge_find(const xllm_tokenizer *t, int32_t l, int32_t r) {
    uint64_t key = merge_key(l, r);
    size_t i = (size_t)merge_hash(key) & t->merge_mask;
    for (;;) {
        const merge_slot *s = &t->merge[i];
        if (s->key == key) return s;
        if (s->key == 0) return NULL;
        i = (i + 1) & t->merge_mask;
    }
}

bool xllm_tok_add_merge(xllm_tokenizer *t, const char *l, size_t ln, const char *r, size_t rn) {
    if (!t->merge || (size_t)t->n_merges * 2 + 2 > t->merge_mask + 1) return false;
    int32_t rank = t->n_merges++;
    int32_t li = xllm_tok_find(t, l, ln), ri = xllm_tok_find(t, r, rn);
    if (li < 0 || ri < 0) return false;
    char stack[256];
    char *cat = ln + rn <= sizeof(stack) ? stack : xllm_xmalloc(ln + rn);
    memcpy(cat, l, ln);
    memcpy(cat + ln, r, rn);
    int32_t id = xllm_tok_find(t, cat, ln + rn);
    if (cat != stack) free(cat);
    if (id < 0) return false;
    uint64_t key = merge_key(li, ri);
    size_t i = (size_t)merge_hash(key) & t->merge_mask;
    for (;;) {
        merge_slot *s = &t->merge[i];
        if (s->key == key) return true; /* a duplicate: the lower rank stays */
        if (s->key == 0) {
            s->key = key;
            s->rank = rank;
            s->id = id;
            return true;
        }
        i = (i + 1) & t->merge_mask;
    }
}

bool xllm_tok_is_eog_text(const char *s, size_t n) {
    static const char *const names[] = {"<|im_end|>", "<|endoftext|>",  "<|eot_id|>",
                                        "<|eom_id|>", "<end_of_turn>",  "<|end|>",
                                        "<EOT>",      "<|end_of_text|>"};
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        if (strlen(names[i]) == n && memcmp(names[i], s, n) == 0) return true;
    }
    return false;
}

/* Special tokens sorted by first byte, then longest first, then id. */
static int cmp_special(const xllm_tokenizer *t, int32_t x, int32_t y) {
    uint8_t fx = (uint8_t)t->text[t->tok[x].off], fy = (uint8_t)t->text[t->tok[y].off];
    if (fx != fy) return fx < fy ? -1 : 1;
    if (t->tok[x].len != t->tok[y].len) return t->tok[x].len > t->tok[y].len ? -1 : 1;
    return (x > y) - (x < y);
}

static void sort_special(xllm_tokenizer *t, int32_t *a, int32_t n) {
    /* merge sort with a scratch array: special lists can be long (reserved tokens) */
    if (n < 2) return;
    int32_t *tmp = xllm_xmalloc((size_t)n * sizeof(int32_t));
    for (int32_t w = 1; w < n; w *= 2) {
        for (int32_t lo = 0; lo < n; lo += 2 * w) {
            int32_t mid = XLLM_MIN(lo + w, n), hi = XLLM_MIN(lo + 2 * w, n);
            int32_t i = lo, j = mid, k = lo;
            while (i < mid && j < hi) tmp[k++] = cmp_special(t, a[j], a[i]) < 0 ? a[j++] : a[i++];
            while (i < mid) tmp[k++] = a[i++];
            while (j < hi) tmp[k++] = a[j++];
        }
        memcpy(a, tmp, (size_t)n * sizeof(int32_t));
    }
    free(tmp);
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

/* Raw bytes of every normal byte-level token (tokens with characters outside the byte map are
 * left out: no input byte string produces them). */
static void build_raw_map(xllm_tokenizer *t) {
    int32_t n = t->n_vocab;
    size_t total = 0;
    for (int32_t i = 0; i < n; i++) total += t->tok[i].len;
    t->raw_text = xllm_xmalloc(total + 1);
    t->raw_off = xllm_xcalloc((size_t)n, sizeof(size_t));
    t->raw_len = xllm_xcalloc((size_t)n, sizeof(uint32_t));
    map_init(&t->raw_map, (size_t)n);
    size_t off = 0;
    for (int32_t i = 0; i < n; i++) {
        if (t->tok[i].type != XLLM_TOKEN_TYPE_NORMAL || t->tok[i].len == 0) continue;
        const uint8_t *s = (const uint8_t *)t->text + t->tok[i].off;
        size_t len = t->tok[i].len, o = off;
        bool ok = true;
        for (size_t j = 0; j < len;) {
            int l;
            bool valid;
            uint32_t cp = utf8_decode(s + j, len - j, &l, &valid);
            if (!valid || cp >= 512 || t->cp_byte[cp] < 0) {
                ok = false;
                break;
            }
            t->raw_text[o++] = (char)t->cp_byte[cp];
            j += (size_t)l;
        }
        if (!ok) continue;
        t->raw_off[i] = off;
        t->raw_len[i] = (uint32_t)(o - off);
        off = o;
        map_put(&t->raw_map, t, raw_key, i);
    }
}

xllm_status xllm_tok_finalize(xllm_tokenizer *t, char *err, size_t err_size) {
    int32_t n = t->n_vocab;
    (void)err;
    (void)err_size;
    if (t->add_bos && t->bos < 0) t->add_bos = false;
    if (t->add_eos && t->eos < 0) t->add_eos = false;

    /* End-of-generation set: eos, eot, eom and the usual end-of-turn texts (which are treated as
     * control tokens, as llama.cpp does). */
    t->eog = xllm_xcalloc((size_t)n, 1);
    for (int32_t i = 0; i < n; i++) {
        if (xllm_tok_is_eog_text(t->text + t->tok[i].off, t->tok[i].len)) {
            t->eog[i] = 1;
            t->tok[i].type = XLLM_TOKEN_TYPE_CONTROL;
        }
    }
    if (t->eos >= 0) t->eog[t->eos] = 1;
    if (t->eot >= 0) t->eog[t->eot] = 1;
    if (t->eom >= 0) t->eog[t->eom] = 1;

    /* Special tokens matched in text before the tokenizer proper. */
    t->special = xllm_xmalloc((size_t)n * sizeof(int32_t));
    t->n_special = 0;
    for (int32_t i = 0; i < n; i++) {
        int ty = t->tok[i].type;
        if (t->tok[i].len && (ty == XLLM_TOKEN_TYPE_CONTROL || ty == XLLM_TOKEN_TYPE_USER_DEFINED ||
                              ty == XLLM_TOKEN_TYPE_UNKNOWN))
            t->special[t->n_special++] = i;
    }
    sort_special(t, t->special, t->n_special);
    for (int c = 0; c <= 256; c++) t->sp_start[c] = 0;
    for (int32_t k = 0; k < t->n_special; k++)
        t->sp_start[(uint8_t)t->text[t->tok[t->special[k]].off] + 1] = k + 1;
    for (int c = 1; c <= 256; c++)
        if (t->sp_start[c] < t->sp_start[c - 1]) t->sp_start[c] = t->sp_start[c - 1];

    /* Byte tokens. */
    for (int b = 0; b < 256; b++) t->byte_tok[b] = -1;
    if (t->kind == TOK_SPM) {
        for (int b = 0; b < 256; b++) {
            char buf[8];
            snprintf(buf, sizeof(buf), "<0x%02X>", b);
            int32_t id = xllm_tok_find(t, buf, 6);
            if (id < 0) { /* fall back to the byte itself as a token */
                char c = (char)b;
                id = xllm_tok_find(t, &c, 1);
            }
            t->byte_tok[b] = id;
        }
    } else {
        build_gpt2_byte_map(t);
        for (int b = 0; b < 256; b++) {
            char buf[4];
            int l = utf8_encode(t->byte_cp[b], buf);
            t->byte_tok[b] = xllm_tok_find(t, buf, (size_t)l);
        }
        build_raw_map(t);
        t->self_ok = xllm_xcalloc((size_t)n, sizeof(uint8_t));
        if (!t->merge) xllm_tok_merges_reserve(t, 0);
    }
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
const char *xllm_tokenizer_pre(const xllm_tokenizer *tok) {
    return tok ? tok->pre : "";
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
/* SentencePiece: score-ordered pair merging over UTF-8 characters                           */
/* ---------------------------------------------------------------------------------------- */

typedef struct symbol {
    int32_t prev, next;
    size_t off; /* into the session text */
    size_t n;   /* 0 once merged into its left neighbour */
} symbol;

typedef struct bigram {
    int32_t left, right;
    float score; /* higher first */
    size_t size;
} bigram;

typedef struct spm_session {
    const xllm_tokenizer *t;
    const char *text;
    symbol *sym;
    size_t n_sym, cap_sym;
    bigram *heap;
    size_t n_heap, cap_heap;
} spm_session;

static bool bigram_before(const bigram *a, const bigram *b) {
    return a->score > b->score || (a->score == b->score && a->left < b->left);
}

static void heap_push(spm_session *s, bigram b) {
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

static bigram heap_pop(spm_session *s) {
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

static void try_add_bigram(spm_session *s, int32_t l, int32_t r) {
    if (l < 0 || r < 0) return;
    const symbol *a = &s->sym[l], *b = &s->sym[r];
    int32_t id = xllm_tok_find(s->t, s->text + a->off, a->n + b->n);
    if (id < 0) return;
    bigram g = {l, r, s->t->tok[id].score, a->n + b->n};
    heap_push(s, g);
}

/* Splits text[0..len) into symbols (one per UTF-8 character) and merges pairs to exhaustion;
 * then emits one token per symbol, or its bytes' tokens when a symbol is not in the vocab. */
static void spm_encode(spm_session *s, const char *text, size_t len, ivec *out) {
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
        int32_t id = xllm_tok_find(t, text + y->off, y->n);
        if (id >= 0) {
            ivec_push(out, id);
            continue;
        }
        for (size_t j = 0; j < y->n; j++) {
            int32_t b = t->byte_tok[(uint8_t)text[y->off + j]];
            if (b < 0) b = t->unk;
            if (b >= 0) ivec_push(out, b);
        }
    }
}

/* ---------------------------------------------------------------------------------------- */
/* Byte-level BPE: rank-ordered merges over token ids                                        */
/* ---------------------------------------------------------------------------------------- */

/* Words up to this many bytes merge by scanning all pairs; longer ones use a heap. */
#define BPE_LINEAR_MAX 48

typedef struct bpe_pair {
    int32_t rank; /* lower first; ties: leftmost first */
    int32_t left;
    int32_t lid, rid; /* the ids the pair was made from (stale entries are skipped) */
    int32_t mid;      /* the merged id */
} bpe_pair;

typedef struct bpe_session {
    int32_t *id; /* per symbol; -1 once merged away */
    int32_t *next, *prev;
    int32_t *prank, *pid; /* linear: rank / merged id of (i, next(i)); INT32_MAX = none */
    size_t cap;
    bpe_pair *heap;
    size_t n_heap, cap_heap;
} bpe_session;

static void bpe_reserve(bpe_session *s, size_t n) {
    if (n <= s->cap) return;
    size_t c = s->cap ? s->cap : 64;
    while (c < n) c *= 2;
    s->id = xllm_xrealloc(s->id, c * sizeof(int32_t));
    s->next = xllm_xrealloc(s->next, c * sizeof(int32_t));
    s->prev = xllm_xrealloc(s->prev, c * sizeof(int32_t));
    s->prank = xllm_xrealloc(s->prank, c * sizeof(int32_t));
    s->pid = xllm_xrealloc(s->pid, c * sizeof(int32_t));
    s->cap = c;
}

static void bpe_session_free(bpe_session *s) {
    free(s->id);
    free(s->next);
    free(s->prev);
    free(s->prank);
    free(s->pid);
    free(s->heap);
}

static bool pair_before(const bpe_pair *a, const bpe_pair *b) {
    return a->rank < b->rank || (a->rank == b->rank && a->left < b->left);
}

static void pair_push(bpe_session *s, bpe_pair p) {
    if (s->n_heap == s->cap_heap) {
        s->cap_heap = s->cap_heap ? s->cap_heap * 2 : 64;
        s->heap = xllm_xrealloc(s->heap, s->cap_heap * sizeof(bpe_pair));
    }
    size_t i = s->n_heap++;
    while (i > 0) {
        size_t up = (i - 1) / 2;
        if (!pair_before(&p, &s->heap[up])) break;
        s->heap[i] = s->heap[up];
        i = up;
    }
    s->heap[i] = p;
}

static bpe_pair pair_pop(bpe_session *s) {
    bpe_pair top = s->heap[0];
    bpe_pair last = s->heap[--s->n_heap];
    size_t i = 0, n = s->n_heap;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && pair_before(&s->heap[c + 1], &s->heap[c])) c++;
        if (!pair_before(&s->heap[c], &last)) break;
        s->heap[i] = s->heap[c];
        i = c;
    }
    if (n) s->heap[i] = last;
    return top;
}

static void heap_try_pair(const xllm_tokenizer *t, bpe_session *s, int32_t l) {
    if (l < 0) return;
    int32_t r = s->next[l];
    if (r < 0 || s->id[l] < 0 || s->id[r] < 0) return;
    const merge_slot *m = merge_find(t, s->id[l], s->id[r]);
    if (!m) return;
    bpe_pair p = {m->rank, l, s->id[l], s->id[r], m->id};
    pair_push(s, p);
}

static void linear_pair(const xllm_tokenizer *t, bpe_session *s, int32_t l) {
    int32_t r = s->next[l];
    s->prank[l] = INT32_MAX;
    if (r < 0 || s->id[l] < 0 || s->id[r] < 0) return;
    const merge_slot *m = merge_find(t, s->id[l], s->id[r]);
    if (!m) return;
    s->prank[l] = m->rank;
    s->pid[l] = m->id;
}

/* Removes symbol r (the right side of a merge into l). */
static void unlink_right(bpe_session *s, int32_t l, int32_t r) {
    s->id[r] = -1;
    s->next[l] = s->next[r];
    if (s->next[r] >= 0) s->prev[s->next[r]] = l;
}

/* BPE of the raw bytes w[0..n): starts from one symbol per byte and applies the lowest-ranked
 * merge until none applies; appends the resulting ids to out. */
static void bpe_merge(const xllm_tokenizer *t, bpe_session *s, const uint8_t *w, size_t n,
                      ivec *out) {
    bpe_reserve(s, n);
    for (size_t i = 0; i < n; i++) {
        s->id[i] = t->byte_tok[w[i]];
        s->prev[i] = (int32_t)i - 1;
        s->next[i] = i + 1 < n ? (int32_t)i + 1 : -1;
    }
    if (n <= BPE_LINEAR_MAX) {
        for (size_t i = 0; i < n; i++) linear_pair(t, s, (int32_t)i);
        for (;;) {
            int32_t best = -1, br = INT32_MAX;
            for (int32_t i = 0; i >= 0; i = s->next[i])
                if (s->prank[i] < br) br = s->prank[i], best = i;
            if (best < 0) break;
            int32_t r = s->next[best];
            s->id[best] = s->pid[best];
            unlink_right(s, best, r);
            linear_pair(t, s, best);
            if (s->prev[best] >= 0) linear_pair(t, s, s->prev[best]);
        }
    } else {
        s->n_heap = 0;
        for (size_t i = 0; i + 1 < n; i++) heap_try_pair(t, s, (int32_t)i);
        while (s->n_heap) {
            bpe_pair p = pair_pop(s);
            int32_t l = p.left, r = s->next[l];
            if (s->id[l] != p.lid || r < 0 || s->id[r] != p.rid) continue; /* stale */
            s->id[l] = p.mid;
            unlink_right(s, l, r);
            heap_try_pair(t, s, s->prev[l]);
            heap_try_pair(t, s, l);
        }
    }
    for (int32_t i = 0; i >= 0; i = s->next[i])
        if (s->id[i] >= 0) ivec_push(out, s->id[i]);
}

/* Encodes one pre-token (raw bytes). */
static void bpe_word(const xllm_tokenizer *t, bpe_session *s, const uint8_t *w, size_t n,
                     ivec *out) {
    if (n == 0) return;
    if (n == 1) {
        if (t->byte_tok[w[0]] >= 0) ivec_push(out, t->byte_tok[w[0]]);
        return;
    }
    int32_t id = map_find(&t->raw_map, t, raw_key, (const char *)w, n);
    if (id >= 0) {
        if (t->ignore_merges) {
            ivec_push(out, id);
            return;
        }
        /* A word that is a token usually merges into exactly that token: remember per token
         * whether it does, so that common words cost one lookup. */
        uint8_t ok = atomic_load_explicit(&t->self_ok[id], memory_order_relaxed);
        if (ok == 1) {
            ivec_push(out, id);
            return;
        }
        if (ok == 0) {
            size_t before = out->n;
            bpe_merge(t, s, w, n, out);
            ok = out->n == before + 1 && out->v[before] == id ? 1 : 2;
            atomic_store_explicit(&t->self_ok[id], ok, memory_order_relaxed);
            return;
        }
    }
    bpe_merge(t, s, w, n, out);
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

/* Splits the text at special tokens in one left-to-right pass, taking the longest special
 * token that starts at each position (control and unknown tokens only when parse_special). */
static void partition(const xllm_tokenizer *t, const char *text, size_t len, bool parse_special,
                      fvec *frags) {
    size_t start = 0;
    for (size_t i = 0; i < len;) {
        uint8_t c = (uint8_t)text[i];
        int32_t k0 = t->sp_start[c], k1 = t->sp_start[c + 1], hit = -1;
        for (int32_t k = k0; k < k1; k++) {
            int32_t id = t->special[k];
            size_t sl = t->tok[id].len;
            if (sl > len - i || memcmp(text + i, t->text + t->tok[id].off, sl) != 0) continue;
            int ty = t->tok[id].type;
            if (!parse_special && (ty == XLLM_TOKEN_TYPE_CONTROL || ty == XLLM_TOKEN_TYPE_UNKNOWN))
                continue;
            hit = id;
            break;
        }
        if (hit < 0) {
            i++;
            continue;
        }
        if (i > start) fvec_push(frags, -1, start, i - start);
        fvec_push(frags, hit, i, t->tok[hit].len);
        i += t->tok[hit].len;
        start = i;
    }
    if (start < len) fvec_push(frags, -1, start, len - start);
}

/* Appends the NFC of s[0..n) to b: maximal runs of valid UTF-8 are normalized, invalid bytes kept
 * as they are. */
static void nfc_segment(const char *s, size_t n, bbuf *b) {
    size_t i = 0;
    while (i < n) {
        size_t j = i;
        while (j < n) {
            int l;
            bool valid;
            utf8_decode((const uint8_t *)s + j, n - j, &l, &valid);
            if (!valid) break;
            j += (size_t)l;
        }
        if (j > i) {
            utf8proc_uint8_t *dst = NULL;
            utf8proc_ssize_t r =
                utf8proc_map((const utf8proc_uint8_t *)s + i, (utf8proc_ssize_t)(j - i), &dst,
                             UTF8PROC_STABLE | UTF8PROC_COMPOSE);
            if (r >= 0)
                bbuf_put(b, dst, (size_t)r);
            else
                bbuf_put(b, s + i, j - i);
            free(dst);
        }
        if (j < n) bbuf_put(b, s + j, 1); /* an invalid byte */
        i = j + 1;
    }
}

/* NFC class of a code point: 0 = NFC-stable, but may start a composition (below U+0300, Hangul
 * syllables),
 * 1 = a barrier (NFC leaves it alone whatever surrounds it, and nothing composes or reorders
 * across it: combining class 0, no canonical decomposition, no part in any composition), 2 = may
 * change or combine (Hangul jamo compose algorithmically, so they are 2). */
static int nfc_class(uint32_t cp) {
    if (cp < 0x300) return 0;
    if (cp >= 0x1100 && cp <= 0x11FF) return 2;
    if (cp >= 0xAC00 && cp <= 0xD7A3) return 0; /* a Hangul syllable may take a trailing jamo */
    const utf8proc_property_t *p = utf8proc_get_property((utf8proc_int32_t)cp);
    if (p->combining_class != 0 || (p->decomp_seqindex != UINT16_MAX && p->decomp_type == 0) ||
        p->comb_index != UINT16_MAX || p->comp_exclusion)
        return 2;
    return 1;
}

/* NFC of s[0..n) into b (reset) when it may differ from s; returns false (b untouched) when s is
 * certainly NFC already. Only the stretches between barriers that hold a class-2 character are
 * normalized. */
static bool nfc_apply(const char *s, size_t n, bbuf *b) {
    size_t seg = 0, copied = 0;
    bool dirty = false, any = false;
    for (size_t i = 0; i < n;) {
        if ((uint8_t)s[i] < 0xCC) { /* U+0000..U+02FF, or an invalid lead byte */
            i++;
            continue;
        }
        int l;
        bool valid;
        uint32_t cp = utf8_decode((const uint8_t *)s + i, n - i, &l, &valid);
        int c = valid ? nfc_class(cp) : 0;
        if (c == 2) {
            if (!any) b->n = 0;
            dirty = any = true;
        } else if (c == 1) {
            if (dirty) {
                bbuf_put(b, s + copied, seg - copied);
                nfc_segment(s + seg, i - seg, b);
                copied = i;
                dirty = false;
            }
            seg = i + (size_t)l;
        }
        i += (size_t)l;
    }
    if (!any) return false;
    if (dirty) {
        bbuf_put(b, s + copied, seg - copied);
        nfc_segment(s + seg, n - seg, b);
    } else {
        bbuf_put(b, s + copied, n - copied);
    }
    return true;
}

int32_t xllm_tokenize(const xllm_tokenizer *tok, const char *text, size_t len, int32_t *ids,
                      int32_t max, bool add_special, bool parse_special) {
    if (!tok || (!text && len) || max < 0 || (!ids && max > 0)) return INT32_MIN;
    ivec out = {0};
    fvec frags = {0};
    spm_session ss = {.t = tok};
    bpe_session bs = {0};
    span_vec words = {0};
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
        const char *s = text + f->off;
        size_t n = f->len;
        if (tok->kind == TOK_SPM) {
            buf.n = 0;
            if (tok->add_space_prefix && prev_special) bbuf_put(&buf, "\xE2\x96\x81", 3);
            for (size_t i = 0; i < n; i++) {
                if (s[i] == ' ')
                    bbuf_put(&buf, "\xE2\x96\x81", 3);
                else
                    bbuf_put(&buf, &s[i], 1);
            }
            spm_encode(&ss, buf.p, buf.n, &out);
        } else {
            if (tok->nfc && nfc_apply(s, n, &buf)) {
                s = buf.p;
                n = buf.n;
            }
            words.n = 0;
            xllm_pretok_split(tok->pretok, s, n, &words);
            for (size_t w = 0; w < words.n; w++)
                bpe_word(tok, &bs, (const uint8_t *)s + words.v[w].off, words.v[w].len, &out);
        }
        prev_special = false;
    }
    if (add_special && tok->add_eos) ivec_push(&out, tok->eos);

    free(buf.p);
    free(frags.v);
    free(words.v);
    free(ss.sym);
    free(ss.heap);
    bpe_session_free(&bs);
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
    /* Normal tokens: byte-level BPE tokens have their raw bytes at hand. */
    if (tok->kind == TOK_BPE && tok->raw_len && (tok->raw_len[id] || n == 0))
        return copy_piece(tok->raw_text + tok->raw_off[id], tok->raw_len[id], buf, buf_size);
    /* Otherwise decode into a small local buffer chunk by chunk, counting the length. */
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
            bool valid;
            uint32_t cp = utf8_decode((const uint8_t *)s + i, n - i, &l, &valid);
            if (valid && cp < 512 && tok->cp_byte[cp] >= 0) {
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
