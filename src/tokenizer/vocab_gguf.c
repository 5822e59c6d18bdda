/* Tokenizer from a GGUF's tokenizer.ggml.* keys: SentencePiece ("llama") and byte-level BPE
 * ("gpt2") vocabularies, with llama.cpp's defaults for absent keys; and the same keys written
 * from a tokenizer (xllm gen-model, with a Hugging Face tokenizer). */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tokenizer/tokenizer-impl.h"
#include "util/common.h"

/* Reads an optional token id key: absent keeps *id; present must be an integer. */
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
    for (int32_t i = 0; i < n; i++) {
        if (toks->arr_strs[i].len > UINT32_MAX / 2) {
            xllm_set_err(err, err_size, "tokenizer.ggml.tokens[%d]: too long", i);
            return XLLM_ERR_FORMAT;
        }
    }

    xllm_tokenizer *t = xllm_tok_alloc(kind, model, n);

    /* Token texts, scores, types. */
    const char **strs = xllm_xmalloc((size_t)n * sizeof(char *));
    size_t *lens = xllm_xmalloc((size_t)n * sizeof(size_t));
    for (int32_t i = 0; i < n; i++) {
        strs[i] = toks->arr_strs[i].ptr;
        lens[i] = (size_t)toks->arr_strs[i].len;
    }
    xllm_tok_set_texts(t, strs, lens);
    free(strs);
    free(lens);
    for (int32_t i = 0; i < n; i++) {
        if (scores) memcpy(&t->tok[i].score, (const char *)scores->arr_data + 4 * (size_t)i, 4);
        int32_t ty = XLLM_TOKEN_TYPE_NORMAL;
        if (types) memcpy(&ty, (const char *)types->arr_data + 4 * (size_t)i, 4);
        if (ty < XLLM_TOKEN_TYPE_NORMAL || ty > XLLM_TOKEN_TYPE_BYTE)
            ty = XLLM_TOKEN_TYPE_UNDEFINED;
        t->tok[i].type = (int8_t)ty;
    }

    /* Special ids and flags, with llama.cpp's defaults. */
    if (kind == TOK_SPM) {
        t->bos = 1;
        t->eos = 2;
        t->unk = 0;
        t->add_bos = true;
        t->add_eos = false;
        t->add_space_prefix = true;
        snprintf(t->pre, sizeof(t->pre), "spm");
    } else {
        t->bos = 11;
        t->eos = 11;
        t->add_bos = false;
        t->add_eos = false;
        t->add_space_prefix = false;

        /* Pre-tokenizer, and merges "left right" in rank order. */
        const char *pre = xllm_gguf_get_str(g, "tokenizer.ggml.pre");
        snprintf(t->pre, sizeof(t->pre), "%s", pre ? pre : "default");
        st = xllm_pretok_from_name(pre, &t->pretok, &t->ignore_merges, &t->nfc, err, err_size);
        if (st != XLLM_OK) {
            xllm_tokenizer_free(t);
            return st;
        }
        if (t->ignore_merges) t->add_bos = true; /* the Llama 3 family starts with BOS */
        xllm_tok_merges_reserve(t, (size_t)merges->arr_n);
        for (uint64_t i = 0; i < merges->arr_n; i++) {
            const char *m = merges->arr_strs[i].ptr;
            size_t ml = (size_t)merges->arr_strs[i].len;
            const char *sp = ml > 1 ? memchr(m + 1, ' ', ml - 1) : NULL;
            if (!sp) { /* keeps its rank, merges nothing */
                xllm_tok_add_merge(t, "", 0, "", 0);
                continue;
            }
            xllm_tok_add_merge(t, m, (size_t)(sp - m), sp + 1, ml - (size_t)(sp - m) - 1);
        }
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
                        err_size)) ||
        (st = xllm_tok_finalize(t, err, err_size))) {
        xllm_tokenizer_free(t);
        return st;
    }
    *out = t;
    return XLLM_OK;
}

/* ---------------------------------------------------------------------------------------- */
/* Writing                                                                                   */
/* ---------------------------------------------------------------------------------------- */

static int cmp_rank(const void *a, const void *b) {
    const merge_slot *x = *(const merge_slot *const *)a, *y = *(const merge_slot *const *)b;
    return (x->rank > y->rank) - (x->rank < y->rank);
}

/* An id key: -1 (none) as UINT32_MAX, which the readers take for "none" (llama.cpp warns and
 * keeps its default, which add_bos_token = false makes unused). */
static void write_id(xllm_gguf_writer *w, const char *key, int32_t id) {
    xllm_gguf_writer_u32(w, key, id >= 0 ? (uint32_t)id : UINT32_MAX);
}

xllm_status xllm_tokenizer_write_gguf(const xllm_tokenizer *t, xllm_gguf_writer *w, int32_t n_vocab,
                                      char *err, size_t err_size) {
    if (!t || !w) return XLLM_ERR_INVALID_ARG;
    if (t->kind == TOK_BPE && (!strcmp(t->pre, "hf") || !strcmp(t->pre, "default"))) {
        xllm_set_err(err, err_size,
                     "tokenizer: its pre-tokenizer split matches no tokenizer.ggml.pre name");
        return XLLM_ERR_UNSUPPORTED;
    }
    const int32_t n = n_vocab > t->n_vocab ? n_vocab : t->n_vocab;
    const char **strs = xllm_xmalloc((size_t)n * sizeof(char *));
    size_t *lens = xllm_xmalloc((size_t)n * sizeof(size_t));
    int32_t *types = xllm_xmalloc((size_t)n * sizeof(int32_t));
    float *scores = xllm_xmalloc((size_t)n * sizeof(float));
    char *pads = xllm_xmalloc((size_t)n * 24); /* "[PAD<id>]" texts */
    for (int32_t i = 0; i < n; i++) {
        if (i < t->n_vocab && t->tok[i].len > 0) {
            strs[i] = t->text + t->tok[i].off;
            lens[i] = t->tok[i].len;
            types[i] = t->tok[i].type;
            scores[i] = t->tok[i].score;
        } else { /* padding, or an id the vocabulary skips */
            char *p = pads + (size_t)i * 24;
            lens[i] = (size_t)snprintf(p, 24, "[PAD%d]", (int)i);
            strs[i] = p;
            types[i] = XLLM_TOKEN_TYPE_UNUSED;
            scores[i] = 0.0f;
        }
    }
    xllm_gguf_writer_str(w, "tokenizer.ggml.model", t->model);
    if (t->kind == TOK_BPE) xllm_gguf_writer_str(w, "tokenizer.ggml.pre", t->pre);
    xllm_gguf_writer_arr_str(w, "tokenizer.ggml.tokens", strs, lens, (uint64_t)n);
    if (t->kind == TOK_SPM)
        xllm_gguf_writer_arr_f32(w, "tokenizer.ggml.scores", scores, (uint64_t)n);
    xllm_gguf_writer_arr_i32(w, "tokenizer.ggml.token_type", types, (uint64_t)n);
    if (t->kind == TOK_BPE) {
        /* merges "left right" in rank order, from the merge table */
        const merge_slot **ms = xllm_xmalloc(((size_t)t->n_merges + 1) * sizeof(merge_slot *));
        size_t nm = 0;
        for (size_t i = 0; t->merge && i <= t->merge_mask; i++)
            if (t->merge[i].key) ms[nm++] = &t->merge[i];
        qsort(ms, nm, sizeof(ms[0]), cmp_rank);
        const char **mstr = xllm_xmalloc((nm + 1) * sizeof(char *));
        size_t *mlen = xllm_xmalloc((nm + 1) * sizeof(size_t));
        for (size_t i = 0; i < nm; i++) {
            const uint64_t k = ms[i]->key - 1;
            const tok_entry *l = &t->tok[k >> 32], *r = &t->tok[k & 0xffffffffu];
            char *m = xllm_xmalloc((size_t)l->len + (size_t)r->len + 1);
            memcpy(m, t->text + l->off, l->len);
            m[l->len] = ' ';
            memcpy(m + l->len + 1, t->text + r->off, r->len);
            mstr[i] = m;
            mlen[i] = (size_t)l->len + (size_t)r->len + 1;
        }
        xllm_gguf_writer_arr_str(w, "tokenizer.ggml.merges", mstr, mlen, nm);
        for (size_t i = 0; i < nm; i++) free((char *)mstr[i]);
        free(mstr);
        free(mlen);
        free(ms);
    }
    write_id(w, "tokenizer.ggml.bos_token_id", t->bos);
    write_id(w, "tokenizer.ggml.eos_token_id", t->eos);
    /* (SPM readers default unk to 0: "none" must be written there) */
    if (t->unk >= 0 || t->kind == TOK_SPM) write_id(w, "tokenizer.ggml.unknown_token_id", t->unk);
    if (t->pad >= 0) write_id(w, "tokenizer.ggml.padding_token_id", t->pad);
    if (t->eot >= 0) write_id(w, "tokenizer.ggml.eot_token_id", t->eot);
    if (t->eom >= 0) write_id(w, "tokenizer.ggml.eom_token_id", t->eom);
    xllm_gguf_writer_bool(w, "tokenizer.ggml.add_bos_token", t->add_bos);
    xllm_gguf_writer_bool(w, "tokenizer.ggml.add_eos_token", t->add_eos);
    if (t->kind == TOK_SPM)
        xllm_gguf_writer_bool(w, "tokenizer.ggml.add_space_prefix", t->add_space_prefix);
    free(strs);
    free(lens);
    free(types);
    free(scores);
    free(pads);
    return XLLM_OK;
}
