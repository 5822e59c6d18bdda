/* Tokenizer from a GGUF's tokenizer.ggml.* keys: SentencePiece ("llama") and byte-level BPE
 * ("gpt2") vocabularies, with llama.cpp's defaults for absent keys. */
#include <limits.h>
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
