/* Tokenizer from a Hugging Face model directory (tokenizer.json, or vocab.json + merges.txt, with
 * tokenizer_config.json), and xllm_tokenizer_load, which opens a GGUF file or such a directory. */
#include <jansson.h>
#include <string.h>
#include <sys/stat.h>

#include "tokenizer/tokenizer-impl.h"
#include "util/common.h"

#define JFLAGS (JSON_DECODE_INT_AS_REAL | JSON_ALLOW_NUL)

static json_t *load_json(const char *dir, const char *name, bool required, xllm_status *st,
                         char *err, size_t err_size) {
    char path[4096];
    snprintf(path, sizeof(path), "%s/%s", dir, name);
    struct stat sb;
    if (stat(path, &sb) != 0) {
        if (required) {
            xllm_set_err(err, err_size, "%s: cannot open", path);
            *st = XLLM_ERR_IO;
        }
        return NULL;
    }
    json_error_t je;
    json_t *j = json_load_file(path, JFLAGS, &je);
    if (!j) {
        xllm_set_err(err, err_size, "%s: line %d: %s", path, je.line, je.text);
        *st = XLLM_ERR_FORMAT;
    }
    return j;
}

/* A token given as "text" or {"content": "text"} (tokenizer_config.json), or NULL. */
static const char *token_str(json_t *v, size_t *len) {
    if (json_is_object(v)) v = json_object_get(v, "content");
    if (!json_is_string(v)) return NULL;
    *len = json_string_length(v);
    return json_string_value(v);
}

static bool json_id(json_t *v, int64_t *out) {
    if (!json_is_number(v)) return false;
    double d = json_number_value(v);
    if (d < 0 || d > (double)(INT32_MAX / 2) || d != (double)(int64_t)d) return false;
    *out = (int64_t)d;
    return true;
}

/* ---------------------------------------------------------------------------------------- */
/* A vocabulary being gathered: id -> text, type                                              */
/* ---------------------------------------------------------------------------------------- */

typedef struct vocab_acc {
    const char **str;
    size_t *len;
    int8_t *type;
    int64_t n, cap;
} vocab_acc;

static void acc_set(vocab_acc *a, int64_t id, const char *s, size_t len, int type) {
    if (id >= a->cap) {
        int64_t c = a->cap ? a->cap : 1024;
        while (c <= id) c *= 2;
        a->str = xllm_xrealloc(a->str, (size_t)c * sizeof(char *));
        a->len = xllm_xrealloc(a->len, (size_t)c * sizeof(size_t));
        a->type = xllm_xrealloc(a->type, (size_t)c);
        for (int64_t i = a->cap; i < c; i++) {
            a->str[i] = NULL;
            a->len[i] = 0;
            a->type[i] = XLLM_TOKEN_TYPE_UNUSED;
        }
        a->cap = c;
    }
    a->str[id] = s;
    a->len[id] = len;
    a->type[id] = (int8_t)type;
    if (id >= a->n) a->n = id + 1;
}

static void acc_free(vocab_acc *a) {
    free(a->str);
    free(a->len);
    free(a->type);
}

/* ---------------------------------------------------------------------------------------- */
/* tokenizer.json pieces                                                                      */
/* ---------------------------------------------------------------------------------------- */

typedef struct pre_acc {
    const char *re[8];
    char *owned[8]; /* regexes built here */
    int n;
    bool byte_level;
} pre_acc;

static bool pre_add(pre_acc *p, const char *re, char *owned) {
    if (p->n == 8) {
        free(owned);
        return false;
    }
    p->owned[p->n] = owned;
    p->re[p->n++] = re;
    return true;
}

/* Quotes a literal string as a PCRE2 pattern. */
static char *quote_literal(const char *s) {
    size_t n = strlen(s);
    char *out = xllm_xmalloc(n * 2 + 1);
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        if (strchr("\\^$.|?*+()[]{}", s[i])) out[o++] = '\\';
        out[o++] = s[i];
    }
    out[o] = 0;
    return out;
}

static xllm_status read_pre(json_t *pt, pre_acc *p, char *err, size_t err_size) {
    if (!pt || json_is_null(pt)) return XLLM_OK;
    const char *type = json_string_value(json_object_get(pt, "type"));
    if (!type) {
        xllm_set_err(err, err_size, "tokenizer.json: pre_tokenizer without a type");
        return XLLM_ERR_FORMAT;
    }
    if (!strcmp(type, "Sequence")) {
        json_t *arr = json_object_get(pt, "pretokenizers");
        size_t i;
        json_t *v;
        json_array_foreach(arr, i, v) {
            xllm_status st = read_pre(v, p, err, err_size);
            if (st != XLLM_OK) return st;
        }
        return XLLM_OK;
    }
    if (!strcmp(type, "ByteLevel")) {
        if (json_is_true(json_object_get(pt, "add_prefix_space"))) {
            xllm_set_err(err, err_size,
                         "tokenizer.json: ByteLevel pre-tokenizer with add_prefix_space is not "
                         "supported");
            return XLLM_ERR_UNSUPPORTED;
        }
        json_t *ur = json_object_get(pt, "use_regex");
        if (!ur || json_is_true(ur)) pre_add(p, XLLM_RE_GPT2, NULL);
        p->byte_level = true;
        return XLLM_OK;
    }
    if (!strcmp(type, "Split")) {
        json_t *pat = json_object_get(pt, "pattern");
        const char *behavior = json_string_value(json_object_get(pt, "behavior"));
        const char *re = json_string_value(json_object_get(pat, "Regex"));
        const char *lit = json_string_value(json_object_get(pat, "String"));
        if ((!re && !lit) || !behavior || strcmp(behavior, "Isolated") != 0 ||
            json_is_true(json_object_get(pt, "invert"))) {
            xllm_set_err(err, err_size,
                         "tokenizer.json: Split pre-tokenizer other than an isolated pattern is "
                         "not supported");
            return XLLM_ERR_UNSUPPORTED;
        }
        char *owned = re ? NULL : quote_literal(lit);
        if (!pre_add(p, re ? re : owned, owned)) goto too_many;
        return XLLM_OK;
    }
    if (!strcmp(type, "Digits")) {
        bool one = json_is_true(json_object_get(pt, "individual_digits"));
        if (!pre_add(p, one ? "\\p{N}" : "\\p{N}+", NULL)) goto too_many;
        return XLLM_OK;
    }
    xllm_set_err(err, err_size, "tokenizer.json: pre-tokenizer '%s' is not supported", type);
    return XLLM_ERR_UNSUPPORTED;
too_many:
    xllm_set_err(err, err_size, "tokenizer.json: more than 8 pre-tokenizer patterns");
    return XLLM_ERR_UNSUPPORTED;
}

/* Normalizers: none, NFC, or a sequence of those. */
static xllm_status read_norm(json_t *nm, bool *nfc, char *err, size_t err_size) {
    if (!nm || json_is_null(nm)) return XLLM_OK;
    const char *type = json_string_value(json_object_get(nm, "type"));
    if (type && !strcmp(type, "NFC")) {
        *nfc = true;
        return XLLM_OK;
    }
    if (type && !strcmp(type, "Sequence")) {
        size_t i;
        json_t *v;
        json_array_foreach(json_object_get(nm, "normalizers"), i, v) {
            xllm_status st = read_norm(v, nfc, err, err_size);
            if (st != XLLM_OK) return st;
        }
        return XLLM_OK;
    }
    xllm_set_err(err, err_size, "tokenizer.json: normalizer '%s' is not supported",
                 type ? type : "?");
    return XLLM_ERR_UNSUPPORTED;
}

/* BOS/EOS the post-processor adds (TemplateProcessing, possibly inside a Sequence). */
static void read_post(json_t *pp, const char **bos, const char **eos) {
    if (!pp) return;
    const char *type = json_string_value(json_object_get(pp, "type"));
    if (!type) return;
    if (!strcmp(type, "Sequence")) {
        size_t i;
        json_t *v;
        json_array_foreach(json_object_get(pp, "processors"), i, v) read_post(v, bos, eos);
        return;
    }
    if (strcmp(type, "TemplateProcessing") != 0) return;
    json_t *single = json_object_get(pp, "single");
    size_t n = json_array_size(single);
    if (n == 0) return;
    json_t *first = json_object_get(json_array_get(single, 0), "SpecialToken");
    json_t *last = json_object_get(json_array_get(single, n - 1), "SpecialToken");
    if (first) *bos = json_string_value(json_object_get(first, "id"));
    if (last && n > 1) *eos = json_string_value(json_object_get(last, "id"));
}

/* ---------------------------------------------------------------------------------------- */
/* merges.txt                                                                                 */
/* ---------------------------------------------------------------------------------------- */

static char *read_text(const char *path, size_t *size) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    size_t cap = 1 << 20, n = 0;
    char *buf = xllm_xmalloc(cap);
    for (;;) {
        if (n == cap) buf = xllm_xrealloc(buf, cap *= 2);
        size_t r = fread(buf + n, 1, cap - n, f);
        if (r == 0) break;
        n += r;
    }
    fclose(f);
    *size = n;
    return buf;
}

static size_t count_lines(const char *s, size_t n) {
    size_t c = 1;
    for (size_t i = 0; i < n; i++) c += s[i] == '\n';
    return c;
}

/* One merge line "left right": split at the first space after the first byte. */
static void add_merge_line(xllm_tokenizer *t, const char *m, size_t ml) {
    const char *sp = ml > 1 ? memchr(m + 1, ' ', ml - 1) : NULL;
    if (!sp) {
        xllm_tok_add_merge(t, "", 0, "", 0); /* keeps its rank, merges nothing */
        return;
    }
    xllm_tok_add_merge(t, m, (size_t)(sp - m), sp + 1, ml - (size_t)(sp - m) - 1);
}

/* ---------------------------------------------------------------------------------------- */
/* The loader                                                                                 */
/* ---------------------------------------------------------------------------------------- */

static int32_t find_str(const xllm_tokenizer *t, const char *s) {
    return s ? xllm_tok_find(t, s, strlen(s)) : -1;
}

xllm_status xllm_tokenizer_from_hf_dir(const char *dir, xllm_tokenizer **out, char *err,
                                       size_t err_size) {
    if (!out) return XLLM_ERR_INVALID_ARG;
    *out = NULL;
    if (!dir) return XLLM_ERR_INVALID_ARG;
    xllm_status st = XLLM_OK;
    json_t *tj = NULL, *cfg = NULL, *vj = NULL, *atj = NULL, *gen = NULL;
    char *merges_txt = NULL;
    vocab_acc acc = {0};
    pre_acc pre = {0};
    xllm_tokenizer *t = NULL;
    bool nfc = false, ignore_merges = false;
    const char *post_bos = NULL, *post_eos = NULL;
    json_t *jmerges = NULL;
    char path[4096];

    cfg = load_json(dir, "tokenizer_config.json", false, &st, err, err_size);
    if (st != XLLM_OK) goto done;
    tj = load_json(dir, "tokenizer.json", false, &st, err, err_size);
    if (st != XLLM_OK) goto done;

    if (tj) {
        json_t *model = json_object_get(tj, "model");
        const char *mtype = json_string_value(json_object_get(model, "type"));
        json_t *vocab = json_object_get(model, "vocab");
        jmerges = json_object_get(model, "merges");
        if ((mtype && strcmp(mtype, "BPE") != 0) || !json_is_object(vocab) ||
            !json_is_array(jmerges)) {
            xllm_set_err(err, err_size,
                         "%s/tokenizer.json: model type '%s' is not supported (byte-level BPE)",
                         dir, mtype ? mtype : "?");
            st = XLLM_ERR_UNSUPPORTED;
            goto done;
        }
        if (json_is_true(json_object_get(model, "byte_fallback"))) {
            xllm_set_err(err, err_size,
                         "%s/tokenizer.json: BPE with byte_fallback (SentencePiece style) is not "
                         "supported; use a GGUF file",
                         dir);
            st = XLLM_ERR_UNSUPPORTED;
            goto done;
        }
        ignore_merges = json_is_true(json_object_get(model, "ignore_merges"));
        const char *key;
        json_t *v;
        json_object_foreach(vocab, key, v) {
            int64_t id;
            if (!json_id(v, &id)) {
                xllm_set_err(err, err_size, "%s/tokenizer.json: vocab entry '%.40s': bad id", dir,
                             key);
                st = XLLM_ERR_FORMAT;
                goto done;
            }
            acc_set(&acc, id, key, strlen(key), XLLM_TOKEN_TYPE_NORMAL);
        }
        size_t i;
        json_array_foreach(json_object_get(tj, "added_tokens"), i, v) {
            int64_t id;
            json_t *c = json_object_get(v, "content");
            if (!json_id(json_object_get(v, "id"), &id) || !json_is_string(c)) {
                xllm_set_err(err, err_size, "%s/tokenizer.json: added_tokens[%zu]: bad entry", dir,
                             i);
                st = XLLM_ERR_FORMAT;
                goto done;
            }
            bool special = json_is_true(json_object_get(v, "special"));
            acc_set(&acc, id, json_string_value(c), json_string_length(c),
                    special ? XLLM_TOKEN_TYPE_CONTROL : XLLM_TOKEN_TYPE_USER_DEFINED);
        }
        if ((st = read_norm(json_object_get(tj, "normalizer"), &nfc, err, err_size)) ||
            (st = read_pre(json_object_get(tj, "pre_tokenizer"), &pre, err, err_size)))
            goto done;
        const char *dtype =
            json_string_value(json_object_get(json_object_get(tj, "decoder"), "type"));
        if (!pre.byte_level && !(dtype && !strcmp(dtype, "ByteLevel"))) {
            xllm_set_err(err, err_size,
                         "%s/tokenizer.json: not a byte-level BPE tokenizer (no ByteLevel "
                         "pre-tokenizer or decoder)",
                         dir);
            st = XLLM_ERR_UNSUPPORTED;
            goto done;
        }
        read_post(json_object_get(tj, "post_processor"), &post_bos, &post_eos);
    } else {
        /* vocab.json + merges.txt (GPT-2 style files) */
        vj = load_json(dir, "vocab.json", false, &st, err, err_size);
        if (!vj) {
            if (st == XLLM_OK) {
                xllm_set_err(err, err_size, "%s: no tokenizer.json, nor vocab.json and merges.txt",
                             dir);
                st = XLLM_ERR_IO;
            }
            goto done;
        }
        snprintf(path, sizeof(path), "%s/merges.txt", dir);
        size_t msize = 0;
        merges_txt = read_text(path, &msize);
        if (!merges_txt) {
            xllm_set_err(err, err_size, "%s: neither tokenizer.json nor merges.txt found", dir);
            st = XLLM_ERR_IO;
            goto done;
        }
        merges_txt = xllm_xrealloc(merges_txt, msize + 1);
        merges_txt[msize] = 0;
        const char *key;
        json_t *v;
        json_object_foreach(vj, key, v) {
            int64_t id;
            if (!json_id(v, &id)) {
                xllm_set_err(err, err_size, "%s/vocab.json: entry '%.40s': bad id", dir, key);
                st = XLLM_ERR_FORMAT;
                goto done;
            }
            acc_set(&acc, id, key, strlen(key), XLLM_TOKEN_TYPE_NORMAL);
        }
        /* added tokens: tokenizer_config.json's added_tokens_decoder, else added_tokens.json */
        json_t *dec = json_object_get(cfg, "added_tokens_decoder");
        if (json_is_object(dec)) {
            json_object_foreach(dec, key, v) {
                char *end;
                long long id = strtoll(key, &end, 10);
                json_t *c = json_object_get(v, "content");
                if (*end || id < 0 || id > INT32_MAX / 2 || !json_is_string(c)) continue;
                bool special = json_is_true(json_object_get(v, "special"));
                acc_set(&acc, id, json_string_value(c), json_string_length(c),
                        special ? XLLM_TOKEN_TYPE_CONTROL : XLLM_TOKEN_TYPE_USER_DEFINED);
            }
        } else {
            atj = load_json(dir, "added_tokens.json", false, &st, err, err_size);
            if (st != XLLM_OK) goto done;
            json_object_foreach(atj, key, v) {
                int64_t id;
                if (!json_id(v, &id)) continue;
                acc_set(&acc, id, key, strlen(key), XLLM_TOKEN_TYPE_CONTROL);
            }
        }
        const char *cls = json_string_value(json_object_get(cfg, "tokenizer_class"));
        const char *pname = cls && !strncmp(cls, "Qwen2Tokenizer", 14) ? "qwen2" : "gpt-2";
        const char *const *re;
        int nre;
        xllm_pretok_variant(pname, &re, &nre, &ignore_merges, &nfc);
        for (int k = 0; k < nre; k++) pre_add(&pre, re[k], NULL);
    }
    if (acc.n == 0) {
        xllm_set_err(err, err_size, "%s: empty vocabulary", dir);
        st = XLLM_ERR_FORMAT;
        goto done;
    }

    t = xllm_tok_alloc(TOK_BPE, "gpt2", (int32_t)acc.n);
    if (!xllm_pretok_name_of(pre.re, pre.n, ignore_merges, nfc, t->pre, sizeof(t->pre)))
        snprintf(t->pre, sizeof(t->pre), "hf");
    xllm_tok_set_texts(t, acc.str, acc.len);
    for (int64_t i = 0; i < acc.n; i++) t->tok[i].type = acc.type[i];
    t->nfc = nfc;
    t->ignore_merges = ignore_merges;
    if ((st = xllm_pretok_new(pre.re, pre.n, &t->pretok, err, err_size)) != XLLM_OK) goto done;

    /* Merges, in rank order. */
    if (tj) {
        xllm_tok_merges_reserve(t, json_array_size(jmerges));
        size_t i;
        json_t *v;
        json_array_foreach(jmerges, i, v) {
            if (json_is_string(v)) {
                add_merge_line(t, json_string_value(v), json_string_length(v));
            } else if (json_is_array(v) && json_array_size(v) == 2 &&
                       json_is_string(json_array_get(v, 0)) &&
                       json_is_string(json_array_get(v, 1))) {
                json_t *l = json_array_get(v, 0), *r = json_array_get(v, 1);
                xllm_tok_add_merge(t, json_string_value(l), json_string_length(l),
                                   json_string_value(r), json_string_length(r));
            } else {
                xllm_set_err(err, err_size, "%s/tokenizer.json: merges[%zu]: bad entry", dir, i);
                st = XLLM_ERR_FORMAT;
                goto done;
            }
        }
    } else {
        size_t msize = strlen(merges_txt);
        xllm_tok_merges_reserve(t, count_lines(merges_txt, msize));
        bool first = true;
        for (char *p = merges_txt; *p;) {
            char *eol = strchr(p, '\n');
            size_t l = eol ? (size_t)(eol - p) : strlen(p);
            size_t ll = l;
            if (ll && p[ll - 1] == '\r') ll--;
            if (!(first && ll >= 8 && !strncmp(p, "#version", 8)) && ll > 0)
                add_merge_line(t, p, ll);
            first = false;
            p += l + (eol ? 1 : 0);
        }
    }

    /* Special tokens and flags. */
    size_t sl;
    const char *s;
    if ((s = token_str(json_object_get(cfg, "bos_token"), &sl))) t->bos = xllm_tok_find(t, s, sl);
    if ((s = token_str(json_object_get(cfg, "eos_token"), &sl))) t->eos = xllm_tok_find(t, s, sl);
    if ((s = token_str(json_object_get(cfg, "unk_token"), &sl))) t->unk = xllm_tok_find(t, s, sl);
    if ((s = token_str(json_object_get(cfg, "pad_token"), &sl))) t->pad = xllm_tok_find(t, s, sl);
    json_t *ab = json_object_get(cfg, "add_bos_token"), *ae = json_object_get(cfg, "add_eos_token");
    if (json_is_boolean(ab)) {
        t->add_bos = json_is_true(ab);
    } else if (post_bos) {
        t->add_bos = true;
        if (t->bos < 0) t->bos = find_str(t, post_bos);
    }
    if (json_is_boolean(ae)) {
        t->add_eos = json_is_true(ae);
    } else if (post_eos) {
        t->add_eos = true;
        if (t->eos < 0) t->eos = find_str(t, post_eos);
    }
    if ((st = xllm_tok_finalize(t, err, err_size)) != XLLM_OK) goto done;

    /* generation_config.json's eos_token_id (one id or a list) also ends generation. */
    gen = load_json(dir, "generation_config.json", false, &st, err, err_size);
    st = XLLM_OK;
    json_t *ge = json_object_get(gen, "eos_token_id");
    int64_t gid;
    if (json_id(ge, &gid) && gid < t->n_vocab) t->eog[gid] = 1;
    size_t gi;
    json_t *gv;
    json_array_foreach(ge, gi, gv) {
        if (json_id(gv, &gid) && gid < t->n_vocab) t->eog[gid] = 1;
    }

done:
    if (st != XLLM_OK) {
        xllm_tokenizer_free(t);
        t = NULL;
    }
    for (int i = 0; i < pre.n; i++) free(pre.owned[i]);
    acc_free(&acc);
    free(merges_txt);
    json_decref(tj);
    json_decref(cfg);
    json_decref(vj);
    json_decref(atj);
    json_decref(gen);
    *out = t;
    return st;
}

/* ---------------------------------------------------------------------------------------- */
/* Public: open a GGUF file or a directory                                                   */
/* ---------------------------------------------------------------------------------------- */

bool xllm_tokenizer_hf_dir(const char *path, char *dir, size_t size) {
    struct stat sb;
    if (!path || stat(path, &sb) != 0) return false;
    snprintf(dir, size, "%s", path);
    if (S_ISDIR(sb.st_mode)) return true;
    /* A tokenizer.json (or another file of an HF directory): its directory. */
    const size_t n = strlen(path);
    if (n < 5 || strcmp(path + n - 5, ".json") != 0) return false;
    char *slash = strrchr(dir, '/');
    if (slash)
        *slash = 0;
    else
        snprintf(dir, size, ".");
    return true;
}

xllm_status xllm_tokenizer_load(const char *path, xllm_tokenizer **out, char *err,
                                size_t err_size) {
    if (!out) return XLLM_ERR_INVALID_ARG;
    *out = NULL;
    if (!path) return XLLM_ERR_INVALID_ARG;
    struct stat sb;
    if (stat(path, &sb) != 0) {
        xllm_set_err(err, err_size, "%s: no such file or directory", path);
        return XLLM_ERR_IO;
    }
    char dir[4096];
    if (xllm_tokenizer_hf_dir(path, dir, sizeof(dir)))
        return xllm_tokenizer_from_hf_dir(dir, out, err, err_size);
    xllm_gguf *g = NULL;
    xllm_status st = xllm_gguf_open(path, &g, err, err_size);
    if (st != XLLM_OK) return st;
    st = xllm_tokenizer_from_gguf(g, out, err, err_size);
    xllm_gguf_free(g);
    return st;
}
