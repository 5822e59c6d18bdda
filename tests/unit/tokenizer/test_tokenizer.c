/* Unit tests of the tokenizer: reference tokenizations of the tiny models' prompts, llama.cpp's
 * vocab test vectors for SentencePiece vocabularies, round trips, and the byte-level BPE vocab. */
#include <dirent.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <jansson.h>

#include "gguf/gguf.h"
#include "gguf/gguf_write.h"
#include "testutil.h"
#include "tokenizer/tokenizer-impl.h"
#include "tokenizer/tokenizer.h"

#define SEP "\n__ggml_vocab_test__\n"

typedef struct loaded {
    xllm_gguf *g;
    xllm_tokenizer *tok;
} loaded;

static bool load(const char *rel, loaded *l) {
    char err[512] = "";
    l->g = NULL;
    l->tok = NULL;
    if (xllm_gguf_open(xllm_test_shared(rel), &l->g, err, sizeof(err)) != XLLM_OK) {
        print_message("%s: %s\n", rel, err);
        return false;
    }
    xllm_status st = xllm_tokenizer_from_gguf(l->g, &l->tok, err, sizeof(err));
    if (st != XLLM_OK) print_message("%s: %s\n", rel, err);
    /* The tokenizer copies what it needs: drop the file right away. */
    xllm_gguf_free(l->g);
    l->g = NULL;
    return st == XLLM_OK;
}

static int32_t *tokenize(const xllm_tokenizer *tok, const char *text, size_t len, bool add_special,
                         bool parse_special, int32_t *n_out) {
    int32_t n = xllm_tokenize(tok, text, len, NULL, 0, add_special, parse_special);
    assert_true(n <= 0);
    int32_t need = -n;
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)(need + 1));
    n = xllm_tokenize(tok, text, len, ids, need, add_special, parse_special);
    assert_int_equal(n, need);
    if (need > 0) { /* one short must report the need again */
        assert_int_equal(xllm_tokenize(tok, text, len, ids, need - 1, add_special, parse_special),
                         -need);
    }
    *n_out = n;
    return ids;
}

/* Concatenated pieces of ids (malloc'd, NUL-terminated). */
static char *detokenize(const xllm_tokenizer *tok, const int32_t *ids, int32_t n, bool special,
                        size_t *len) {
    size_t cap = 64, used = 0;
    char *out = malloc(cap);
    for (int32_t i = 0; i < n; i++) {
        int32_t k = xllm_token_to_piece(tok, ids[i], NULL, 0, special);
        if (k < 0) {
            k = -k;
            while (used + (size_t)k + 1 > cap) cap *= 2;
            out = realloc(out, cap);
            assert_int_equal(xllm_token_to_piece(tok, ids[i], out + used, k, special), k);
        }
        used += (size_t)k;
    }
    out[used] = 0;
    *len = used;
    return out;
}

/* ---- reference prompts of the tiny models ------------------------------------------------ */

static void test_tiny_refs(void **state) {
    (void)state;
    const char *dir = xllm_test_shared("models/tiny/refs");
    char dirpath[4096 - 512];
    snprintf(dirpath, sizeof(dirpath), "%s", dir);
    DIR *d = opendir(dirpath);
    assert_non_null(d);
    struct dirent *de;
    int checked = 0;
    while ((de = readdir(d)) != NULL) {
        const char *name = de->d_name;
        size_t nl = strlen(name);
        if (nl < 9 || strcmp(name + nl - 5, ".json") != 0) continue;
        char model[512], path[4400];
        const char *dot = strstr(name, ".p");
        assert_non_null(dot);
        snprintf(model, sizeof(model), "models/tiny/%.*s.gguf", (int)(dot - name), name);
        snprintf(path, sizeof(path), "%s/%s", dirpath, name);
        json_error_t jerr;
        json_t *j = json_load_file(path, 0, &jerr);
        assert_non_null(j);
        const char *prompt = json_string_value(json_object_get(j, "prompt"));
        json_t *want = json_object_get(j, "prompt_ids");
        assert_non_null(prompt);
        assert_true(json_is_array(want));
        loaded l;
        assert_true(load(model, &l));
        bool spm = strcmp(xllm_tokenizer_type(l.tok), "llama") == 0;
        assert_true(xllm_tokenizer_add_bos(l.tok) == spm); /* stories260K's vocab; Qwen's */
        int32_t n;
        int32_t *ids = tokenize(l.tok, prompt, strlen(prompt), true, true, &n);
        assert_int_equal(n, (int32_t)json_array_size(want));
        for (int32_t i = 0; i < n; i++)
            assert_int_equal(ids[i], json_integer_value(json_array_get(want, (size_t)i)));
        size_t len;
        if (spm) { /* skipping BOS; the leading space comes from the space prefix */
            char *text = detokenize(l.tok, ids + 1, n - 1, false, &len);
            assert_string_equal(text + 1, prompt);
            assert_int_equal(text[0], ' ');
            free(text);
        } else { /* the special tokens' text too */
            char *text = detokenize(l.tok, ids, n, true, &len);
            assert_string_equal(text, prompt);
            free(text);
        }
        free(ids);
        xllm_tokenizer_free(l.tok);
        json_decref(j);
        checked++;
    }
    closedir(d);
    assert_true(checked >= 40); /* 43 reference files at the time of writing */
}

/* ---- llama.cpp vocab test vectors -------------------------------------------------------- */

/* Checks the .inp/.out pairs models/vocab/BASE.gguf.{inp,out} against tok; returns the number of
 * strings (-1 when the files are absent) and the number that match exactly (and round-trip). */
static int check_pairs(const xllm_tokenizer *tok, const char *base, bool require_all, int *n_ok) {
    size_t inp_size, out_size;
    char rel[512], path[4200];
    snprintf(rel, sizeof(rel), "models/vocab/%s.gguf", base);
    snprintf(path, sizeof(path), "%s.inp", xllm_test_shared(rel));
    char *inp = xllm_test_read_file(path, &inp_size);
    snprintf(path, sizeof(path), "%s.out", xllm_test_shared(rel));
    char *outf = xllm_test_read_file(path, &out_size);
    if (!inp || !outf) {
        free(inp);
        free(outf);
        return -1;
    }
    int count = 0;
    *n_ok = 0;
    char *s = inp, *line = outf;
    for (;;) {
        char *sep = strstr(s, SEP);
        if (!sep) break;
        size_t len = (size_t)(sep - s);
        char *eol = strchr(line, '\n');
        if (!eol) eol = line + strlen(line);
        /* expected ids */
        int32_t want[1024];
        int32_t nw = 0;
        for (char *p = line; p < eol;) {
            char *q;
            long v = strtol(p, &q, 10);
            if (q == p) break;
            assert_true(nw < 1024);
            want[nw++] = (int32_t)v;
            p = q;
        }
        int32_t n;
        int32_t *ids = tokenize(tok, s, len, false, false, &n);
        bool ok = n == nw && memcmp(ids, want, sizeof(int32_t) * (size_t)n) == 0;
        if (!ok) {
            print_message("%s: string %d (%.*s) differs:\n  want", base, count, (int)len, s);
            for (int32_t i = 0; i < nw; i++) print_message(" %d", want[i]);
            print_message("\n  got ");
            for (int32_t i = 0; i < n; i++) print_message(" %d", ids[i]);
            print_message("\n");
        }
        if (require_all) {
            assert_int_equal(n, nw);
            for (int32_t i = 0; i < n; i++) assert_int_equal(ids[i], want[i]);
        }
        /* round trip: one leading space comes from the space prefix */
        size_t dl;
        char *text = detokenize(tok, ids, n, false, &dl);
        const char *t = text;
        if (xllm_tokenizer_add_space_prefix(tok) && dl > 0 && t[0] == ' ') {
            t++;
            dl--;
        }
        bool rt = dl == len && memcmp(t, s, len) == 0;
        if (!rt) print_message("%s: string %d does not round-trip: '%s'\n", base, count, t);
        if (require_all) assert_true(rt);
        free(text);
        if (ok && rt) (*n_ok)++;
        free(ids);
        count++;
        s = sep + strlen(SEP);
        line = *eol ? eol + 1 : eol;
    }
    free(inp);
    free(outf);
    return count;
}

/* Checks one GGUF vocab's pairs; -1 when the vocab does not load or has no pairs. */
static int check_vocab(const char *base, bool require_all, int *n_ok) {
    char rel[512];
    snprintf(rel, sizeof(rel), "models/vocab/%s.gguf", base);
    loaded l;
    if (!load(rel, &l)) return -1;
    int n = check_pairs(l.tok, base, require_all, n_ok);
    xllm_tokenizer_free(l.tok);
    return n;
}

static void test_vocab_llama_spm(void **state) {
    (void)state;
    int ok;
    /* 46 strings in the llama.cpp copy at hand */
    assert_int_equal(check_vocab("ggml-vocab-llama-spm", true, &ok), 46);
    assert_int_equal(ok, 46);
}

/* Every other vocab GGUF (SentencePiece and byte-level BPE) that has test vectors: all exact. */
static void test_vocab_gguf_all(void **state) {
    (void)state;
    DIR *d = opendir(xllm_test_shared("models/vocab"));
    assert_non_null(d);
    struct dirent *de;
    int n_vocabs = 0, n_bpe = 0;
    while ((de = readdir(d)) != NULL) {
        size_t nl = strlen(de->d_name);
        if (nl < 6 || strcmp(de->d_name + nl - 5, ".gguf") != 0) continue;
        if (strcmp(de->d_name, "ggml-vocab-llama-spm.gguf") == 0) continue;
        if (strcmp(de->d_name, "ggml-vocab-bert-bge.gguf") == 0) continue; /* WordPiece */
        char base[256], rel[512];
        snprintf(base, sizeof(base), "%.*s", (int)(nl - 5), de->d_name);
        snprintf(rel, sizeof(rel), "models/vocab/%s", de->d_name);
        loaded l;
        assert_true(load(rel, &l));
        bool bpe = strcmp(xllm_tokenizer_type(l.tok), "gpt2") == 0;
        int ok;
        int n = check_pairs(l.tok, base, true, &ok);
        xllm_tokenizer_free(l.tok);
        if (n < 0) continue;
        print_message("%s: %d/%d\n", base, ok, n);
        assert_int_equal(ok, n);
        n_vocabs++;
        n_bpe += bpe;
    }
    closedir(d);
    /* phi-3; deepseek-coder, deepseek-llm, falcon, gpt-2, mpt, refact, starcoder */
    assert_true(n_bpe >= 7);
    assert_true(n_vocabs >= 8);
}

/* Every GGUF vocab loads (or is refused as unsupported), never a crash. */
static void test_vocab_all_load(void **state) {
    (void)state;
    DIR *d = opendir(xllm_test_shared("models/vocab"));
    assert_non_null(d);
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        size_t nl = strlen(de->d_name);
        if (nl < 6 || strcmp(de->d_name + nl - 5, ".gguf") != 0) continue;
        char rel[512], err[512] = "";
        snprintf(rel, sizeof(rel), "models/vocab/%s", de->d_name);
        xllm_gguf *g = NULL;
        assert_int_equal(xllm_gguf_open(xllm_test_shared(rel), &g, err, sizeof(err)), XLLM_OK);
        xllm_tokenizer *tok = NULL;
        xllm_status st = xllm_tokenizer_from_gguf(g, &tok, err, sizeof(err));
        const char *model = xllm_gguf_get_str(g, "tokenizer.ggml.model");
        if (strcmp(model, "llama") == 0 || strcmp(model, "gpt2") == 0) {
            assert_int_equal(st, XLLM_OK);
            int32_t ids[64];
            assert_true(xllm_tokenize(tok, "Hello world", 11, ids, 64, true, true) > 0);
        } else {
            assert_int_equal(st, XLLM_ERR_UNSUPPORTED);
            assert_non_null(strstr(err, "tokenizer.ggml.model"));
            assert_null(tok);
        }
        xllm_tokenizer_free(tok);
        xllm_gguf_free(g);
    }
    closedir(d);
}

/* ---- the Llama-2 vocabulary -------------------------------------------------------------- */

static void test_llama2_tiny_random(void **state) {
    (void)state;
    loaded l;
    assert_true(load("models/tiny-random/llama-2-tiny-random.gguf", &l));
    const xllm_tokenizer *tok = l.tok;
    assert_int_equal(xllm_tokenizer_n_vocab(tok), 32000);
    assert_int_equal(xllm_token_bos(tok), 1);
    assert_int_equal(xllm_token_eos(tok), 2);
    assert_true(xllm_token_is_eog(tok, 2));
    assert_false(xllm_token_is_eog(tok, 1));
    assert_false(xllm_token_is_eog(tok, -1));
    assert_false(xllm_token_is_eog(tok, 32000));
    assert_string_equal(xllm_tokenizer_type(tok), "llama");
    int32_t ids[64];
    int32_t n = xllm_tokenize(tok, "Hello world", 11, ids, 64, true, false);
    assert_int_equal(n, 3);
    assert_int_equal(ids[0], 1);
    assert_int_equal(ids[1], 15043);
    assert_int_equal(ids[2], 3186);
    /* empty text: BOS only, or nothing */
    assert_int_equal(xllm_tokenize(tok, "", 0, ids, 64, true, false), 1);
    assert_int_equal(xllm_tokenize(tok, "", 0, ids, 64, false, false), 0);
    /* special tokens: parsed only when asked */
    const char *sp = "<s>Hi</s>";
    n = xllm_tokenize(tok, sp, strlen(sp), ids, 64, false, true);
    assert_true(n >= 3);
    assert_int_equal(ids[0], 1);
    assert_int_equal(ids[n - 1], 2);
    n = xllm_tokenize(tok, sp, strlen(sp), ids, 64, false, false);
    for (int32_t i = 0; i < n; i++) assert_true(ids[i] != 1 && ids[i] != 2);
    /* pieces */
    char buf[32];
    assert_int_equal(xllm_token_to_piece(tok, 15043, buf, sizeof(buf), false), 6);
    assert_memory_equal(buf, " Hello", 6);
    assert_int_equal(xllm_token_to_piece(tok, 1, buf, sizeof(buf), false), 0);
    assert_int_equal(xllm_token_to_piece(tok, 1, buf, sizeof(buf), true), 3);
    assert_memory_equal(buf, "<s>", 3);
    assert_int_equal(xllm_token_to_piece(tok, 15043, buf, 3, false), -6);
    /* byte tokens: <0x0A> is id 13 */
    assert_int_equal(xllm_token_to_piece(tok, 13, buf, sizeof(buf), false), 1);
    assert_int_equal(buf[0], '\n');
    /* invalid arguments */
    assert_true(xllm_token_to_piece(tok, -1, buf, sizeof(buf), false) < 0);
    assert_true(xllm_token_to_piece(tok, 32000, buf, sizeof(buf), false) < 0);
    xllm_tokenizer_free(l.tok);
}

/* ---- byte-level BPE (Qwen vocabulary) ---------------------------------------------------- */

static void test_qwentok(void **state) {
    (void)state;
    loaded l;
    assert_true(load("models/tiny/qwen3-qwentok-f16.gguf", &l));
    const xllm_tokenizer *tok = l.tok;
    assert_string_equal(xllm_tokenizer_type(tok), "gpt2");
    assert_int_equal(xllm_tokenizer_n_vocab(tok), 151936);
    assert_false(xllm_tokenizer_add_bos(tok));
    char buf[64];
    /* 198 = "Ċ" = "\n"; 872 = "user"; 279 = "Ġthe" */
    assert_int_equal(xllm_token_to_piece(tok, 198, buf, sizeof(buf), false), 1);
    assert_int_equal(buf[0], '\n');
    assert_int_equal(xllm_token_to_piece(tok, 872, buf, sizeof(buf), false), 4);
    assert_memory_equal(buf, "user", 4);
    assert_int_equal(xllm_token_to_piece(tok, 279, buf, sizeof(buf), false), 4);
    assert_memory_equal(buf, " the", 4);
    /* control tokens */
    assert_int_equal(xllm_token_to_piece(tok, 151645, buf, sizeof(buf), false), 0);
    assert_int_equal(xllm_token_to_piece(tok, 151645, buf, sizeof(buf), true), 10);
    assert_memory_equal(buf, "<|im_end|>", 10);
    assert_true(xllm_token_is_eog(tok, 151645)); /* <|im_end|> */
    assert_true(xllm_token_is_eog(tok, 151643)); /* <|endoftext|> */
    assert_false(xllm_token_is_eog(tok, 151644));

    json_error_t jerr;
    char path[4200];
    snprintf(path, sizeof(path), "%s",
             xllm_test_shared("models/tiny/refs/qwen3-qwentok-f16.p1.json"));
    json_t *j = json_load_file(path, 0, &jerr);
    assert_non_null(j);
    const char *prompt = json_string_value(json_object_get(j, "prompt"));
    json_t *want = json_object_get(j, "prompt_ids");
    int32_t n;
    int32_t *ids = tokenize(tok, prompt, strlen(prompt), true, true, &n);
    assert_int_equal(n, (int32_t)json_array_size(want));
    for (int32_t i = 0; i < n; i++)
        assert_int_equal(ids[i], json_integer_value(json_array_get(want, (size_t)i)));
    size_t len;
    char *text = detokenize(tok, ids, n, true, &len);
    assert_string_equal(text, prompt);
    free(text);
    free(ids);
    json_decref(j);
    xllm_tokenizer_free(l.tok);
}

/* llama.cpp's qwen2 vectors with the tiny model's GGUF vocab (the Qwen vocab is the same): all
 * 46 must match. */
static void test_qwentok_vectors(void **state) {
    (void)state;
    loaded l;
    assert_true(load("models/tiny/qwen3-qwentok-f16.gguf", &l));
    size_t inp_size, out_size;
    char *inp =
        xllm_test_read_file(xllm_test_shared("models/vocab/ggml-vocab-qwen2.gguf.inp"), &inp_size);
    char *outf =
        xllm_test_read_file(xllm_test_shared("models/vocab/ggml-vocab-qwen2.gguf.out"), &out_size);
    assert_non_null(inp);
    assert_non_null(outf);
    int count = 0, ok = 0, rt_ok = 0;
    char *s = inp, *line = outf;
    for (char *sep; (sep = strstr(s, SEP)) != NULL; count++) {
        size_t len = (size_t)(sep - s);
        char *eol = strchr(line, '\n');
        if (!eol) eol = line + strlen(line);
        int32_t want[1024], nw = 0;
        for (char *p = line; p < eol;) {
            char *q;
            long v = strtol(p, &q, 10);
            if (q == p) break;
            want[nw++] = (int32_t)v;
            p = q;
        }
        int32_t n;
        int32_t *ids = tokenize(l.tok, s, len, false, false, &n);
        if (n == nw && memcmp(ids, want, sizeof(int32_t) * (size_t)n) == 0)
            ok++;
        else
            print_message("qwen2 vectors: string %d (%.*s) differs\n", count, (int)len, s);
        size_t dl;
        char *text = detokenize(l.tok, ids, n, false, &dl);
        if (dl == len && memcmp(text, s, len) == 0) rt_ok++;
        free(text);
        free(ids);
        s = sep + strlen(SEP);
        line = *eol ? eol + 1 : eol;
    }
    print_message("qwen2 vectors from the GGUF vocab: %d/%d exact, %d/%d round trips\n", ok, count,
                  rt_ok, count);
    assert_int_equal(count, 46);
    assert_int_equal(rt_ok, count); /* byte-level BPE always round-trips */
    assert_int_equal(ok, count);    /* all of them, with the interim pre-tokenizer */
    free(inp);
    free(outf);
    xllm_tokenizer_free(l.tok);
}

/* ---- Hugging Face model directories ----------------------------------------------------- */

static xllm_tokenizer *load_any(const char *rel) {
    char err[512] = "";
    xllm_tokenizer *tok = NULL;
    xllm_status st = xllm_tokenizer_load(xllm_test_shared(rel), &tok, err, sizeof(err));
    if (st != XLLM_OK) print_message("%s: %s\n", rel, err);
    assert_int_equal(st, XLLM_OK);
    return tok;
}

static void expect_prompt_ids(const xllm_tokenizer *tok, const char *ref_rel) {
    json_error_t jerr;
    char path[4200];
    snprintf(path, sizeof(path), "%s", xllm_test_shared(ref_rel));
    json_t *j = json_load_file(path, 0, &jerr);
    assert_non_null(j);
    const char *prompt = json_string_value(json_object_get(j, "prompt"));
    json_t *want = json_object_get(j, "prompt_ids");
    int32_t n;
    int32_t *ids = tokenize(tok, prompt, strlen(prompt), true, true, &n);
    assert_int_equal(n, (int32_t)json_array_size(want));
    for (int32_t i = 0; i < n; i++)
        assert_int_equal(ids[i], json_integer_value(json_array_get(want, (size_t)i)));
    free(ids);
    json_decref(j);
}

static void test_hf_qwen3(void **state) {
    (void)state;
    xllm_tokenizer *tok = load_any("models/tokenizers/qwen3");
    assert_string_equal(xllm_tokenizer_type(tok), "gpt2");
    assert_int_equal(xllm_tokenizer_n_vocab(tok), 151669);
    assert_false(xllm_tokenizer_add_bos(tok));
    assert_int_equal(xllm_token_eos(tok), 151645); /* <|im_end|> */
    assert_true(xllm_token_is_eog(tok, 151643));   /* <|endoftext|> */
    int ok;
    assert_int_equal(check_pairs(tok, "ggml-vocab-qwen2", true, &ok), 46);
    assert_int_equal(ok, 46);
    assert_int_equal(check_pairs(tok, "ggml-vocab-deepseek-r1-qwen", true, &ok), 46);
    assert_int_equal(ok, 46);
    /* the Qwen-tokenizer tiny model's prompt (ChatML, special tokens parsed) */
    expect_prompt_ids(tok, "models/tiny/refs/qwen3-qwentok-f16.p1.json");
    /* NFC (Qwen's normalizer): decomposed and precomposed text tokenize alike, also between
     * characters NFC never touches and next to invalid bytes */
    static const char *const nfc_pairs[][2] = {
        {"e\xCC\x81", "\xC3\xA9"},                    /* e + U+0301 = é */
        {"\xE3\x81\x8B\xE3\x82\x99", "\xE3\x81\x8C"}, /* か + U+3099 = が */
        {"\xEA\xB0\x80\xE1\x86\xA8", "\xEA\xB0\x81"}, /* 가 + U+11A8 = 각 */
        {"\xE4\xB8\xAD"
         "e\xCC\x81\xE6\x96\x87",
         "\xE4\xB8\xAD\xC3\xA9\xE6\x96\x87"}, /* 中é文 */
        {"\xFF"
         "e\xCC\x81\xFE",
         "\xFF\xC3\xA9\xFE"},
        {"\xE2\x84\xAB", "\xC3\x85"}, /* U+212B ANGSTROM SIGN = Å */
    };
    for (size_t k = 0; k < sizeof(nfc_pairs) / sizeof(nfc_pairs[0]); k++) {
        int32_t na, nb;
        int32_t *a = tokenize(tok, nfc_pairs[k][0], strlen(nfc_pairs[k][0]), false, false, &na);
        int32_t *b = tokenize(tok, nfc_pairs[k][1], strlen(nfc_pairs[k][1]), false, false, &nb);
        assert_int_equal(na, nb);
        assert_memory_equal(a, b, sizeof(int32_t) * (size_t)na);
        free(a);
        free(b);
    }
    /* <think> is an added, non-special token: parsed even without parse_special */
    int32_t ids[16];
    assert_int_equal(xllm_tokenize(tok, "<think>", 7, ids, 16, false, false), 1);
    assert_int_equal(ids[0], 151667);
    /* <|im_start|> is special: text unless parse_special */
    assert_true(xllm_tokenize(tok, "<|im_start|>", 12, ids, 16, false, false) > 1);
    assert_int_equal(xllm_tokenize(tok, "<|im_start|>", 12, ids, 16, false, true), 1);
    assert_int_equal(ids[0], 151644);
    xllm_tokenizer_free(tok);
}

static void test_hf_llama3(void **state) {
    (void)state;
    xllm_tokenizer *tok = load_any("models/tokenizers/llama3");
    assert_true(xllm_tokenizer_add_bos(tok));
    assert_int_equal(xllm_token_bos(tok), 128000);
    assert_int_equal(xllm_token_eos(tok), 128009); /* <|eot_id|> */
    int ok;
    assert_int_equal(check_pairs(tok, "ggml-vocab-llama-bpe", true, &ok), 46);
    assert_int_equal(ok, 46);
    int32_t ids[16];
    int32_t n = xllm_tokenize(tok, "Hello world", 11, ids, 16, true, false);
    assert_int_equal(n, 3);
    assert_int_equal(ids[0], 128000);
    assert_int_equal(ids[1], 9906); /* Hello */
    assert_int_equal(ids[2], 1917); /* " world" */
    xllm_tokenizer_free(tok);
}

/* GPT-2 style files without tokenizer.json: vocab.json + merges.txt + tokenizer_config.json. */
static void test_hf_vocab_merges(void **state) {
    (void)state;
    char dir[4096], src[4200], dst[4200];
    snprintf(dir, sizeof(dir), "%s/test_tok_hf_XXXXXX", xllm_test_build_dir());
    assert_non_null(mkdtemp(dir));
    static const char *const files[] = {"vocab.json", "merges.txt", "tokenizer_config.json"};
    for (int i = 0; i < 3; i++) {
        snprintf(src, sizeof(src), "%s", xllm_test_shared("models/tokenizers/qwen3"));
        snprintf(src + strlen(src), sizeof(src) - strlen(src), "/%s", files[i]);
        snprintf(dst, sizeof(dst), "%s/%s", dir, files[i]);
        assert_int_equal(symlink(src, dst), 0);
    }
    char err[512] = "";
    xllm_tokenizer *tok = NULL;
    assert_int_equal(xllm_tokenizer_load(dir, &tok, err, sizeof(err)), XLLM_OK);
    int ok;
    assert_int_equal(check_pairs(tok, "ggml-vocab-qwen2", true, &ok), 46);
    assert_int_equal(ok, 46);
    expect_prompt_ids(tok, "models/tiny/refs/qwen3-qwentok-f16.p1.json");
    xllm_tokenizer_free(tok);
    for (int i = 0; i < 3; i++) {
        snprintf(dst, sizeof(dst), "%s/%s", dir, files[i]);
        unlink(dst);
    }
    rmdir(dir);
}

/* ---- tokenizer.ggml.* keys written back (xllm gen-model) ---------------------------------- */

/* Writes tok's keys, padded to n_vocab, to a GGUF in the build folder and loads them again. */
static xllm_tokenizer *export_reload(const xllm_tokenizer *tok, int32_t n_vocab) {
    char path[4096], err[512] = "";
    snprintf(path, sizeof(path), "%s/test_tok_export_XXXXXX", xllm_test_build_dir());
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    close(fd);
    xllm_gguf_writer *w = xllm_gguf_writer_new();
    xllm_status st = xllm_tokenizer_write_gguf(tok, w, n_vocab, err, sizeof(err));
    if (st != XLLM_OK) print_message("write: %s\n", err);
    assert_int_equal(st, XLLM_OK);
    assert_int_equal(xllm_gguf_writer_write(w, path, NULL, NULL, err, sizeof(err)), XLLM_OK);
    xllm_gguf_writer_free(w);
    xllm_gguf *g = NULL;
    assert_int_equal(xllm_gguf_open(path, &g, err, sizeof(err)), XLLM_OK);
    xllm_tokenizer *back = NULL;
    st = xllm_tokenizer_from_gguf(g, &back, err, sizeof(err));
    if (st != XLLM_OK) print_message("read: %s\n", err);
    assert_int_equal(st, XLLM_OK);
    xllm_gguf_free(g);
    unlink(path);
    return back;
}

/* The same vocabulary: every token's text and type (ids past a's end: unused "[PAD<id>]"),
 * special tokens and flags, and the same ids for texts with and without special tokens. */
static void expect_same_vocab(const xllm_tokenizer *a, const xllm_tokenizer *b, int32_t n_vocab) {
    const int32_t na = xllm_tokenizer_n_vocab(a);
    assert_int_equal(xllm_tokenizer_n_vocab(b), n_vocab > na ? n_vocab : na);
    for (int32_t i = 0; i < xllm_tokenizer_n_vocab(b); i++) {
        size_t la = 0, lb;
        const char *ta = i < na ? xllm_tokenizer_token_text(a, i, &la) : NULL;
        const char *tb = xllm_tokenizer_token_text(b, i, &lb);
        assert_non_null(tb);
        if (ta && la > 0) {
            assert_int_equal(la, lb);
            assert_memory_equal(ta, tb, la);
            assert_int_equal(xllm_tokenizer_token_type(a, i), xllm_tokenizer_token_type(b, i));
        } else {
            char pad[32];
            snprintf(pad, sizeof(pad), "[PAD%d]", (int)i);
            assert_int_equal(lb, strlen(pad));
            assert_memory_equal(tb, pad, lb);
            assert_int_equal(xllm_tokenizer_token_type(b, i), XLLM_TOKEN_TYPE_UNUSED);
        }
    }
    assert_string_equal(xllm_tokenizer_type(a), xllm_tokenizer_type(b));
    assert_string_equal(xllm_tokenizer_pre(a), xllm_tokenizer_pre(b));
    assert_int_equal(xllm_token_bos(a), xllm_token_bos(b));
    assert_int_equal(xllm_token_eos(a), xllm_token_eos(b));
    assert_int_equal(xllm_tokenizer_add_bos(a), xllm_tokenizer_add_bos(b));
    assert_int_equal(xllm_tokenizer_add_space_prefix(a), xllm_tokenizer_add_space_prefix(b));
    static const char *const texts[] = {
        "Hello world! 12345 numbers",
        "\t  tabs  and <|im_start|>user\n<|im_end|><|eot_id|><|begin_of_text|>",
        "CJK \xE4\xBD\xA0\xE5\xA5\xBD emoji \xF0\x9F\x8E\x89 caf\xC3\xA9 e\xCC\x81\r\n",
        "<think>\n\n</think>  trailing   spaces   ",
        "\xFF\xFE invalid bytes \xC3",
    };
    for (size_t k = 0; k < sizeof(texts) / sizeof(texts[0]); k++)
        for (int sp = 0; sp < 2; sp++) {
            int32_t n1, n2;
            int32_t *i1 = tokenize(a, texts[k], strlen(texts[k]), true, sp, &n1);
            int32_t *i2 = tokenize(b, texts[k], strlen(texts[k]), true, sp, &n2);
            assert_int_equal(n1, n2);
            assert_memory_equal(i1, i2, sizeof(int32_t) * (size_t)n1);
            free(i1);
            free(i2);
        }
}

static void test_export_gguf(void **state) {
    (void)state;
    int ok;
    /* Hugging Face Qwen3 (NFC, digits one by one), padded as the real models are */
    xllm_tokenizer *a = load_any("models/tokenizers/qwen3");
    assert_string_equal(xllm_tokenizer_pre(a), "qwen2");
    xllm_tokenizer *b = export_reload(a, 151936);
    expect_same_vocab(a, b, 151936);
    assert_int_equal(check_pairs(b, "ggml-vocab-qwen2", true, &ok), 46);
    expect_prompt_ids(b, "models/tiny/refs/qwen3-qwentok-f16.p1.json");
    xllm_tokenizer_free(a);
    xllm_tokenizer_free(b);
    /* Hugging Face Llama 3 (BOS, ignore_merges): no padding asked */
    a = load_any("models/tokenizers/llama3");
    assert_string_equal(xllm_tokenizer_pre(a), "llama-bpe");
    b = export_reload(a, 0);
    expect_same_vocab(a, b, 0);
    assert_int_equal(check_pairs(b, "ggml-vocab-llama-bpe", true, &ok), 46);
    xllm_tokenizer_free(a);
    xllm_tokenizer_free(b);
    /* a GGUF SentencePiece vocabulary (scores, byte tokens, space prefix) */
    loaded l;
    assert_true(load("models/vocab/ggml-vocab-llama-spm.gguf", &l));
    b = export_reload(l.tok, 0);
    expect_same_vocab(l.tok, b, 0);
    assert_int_equal(check_pairs(b, "ggml-vocab-llama-spm", true, &ok), 46);
    assert_int_equal(b->unk, l.tok->unk);
    xllm_tokenizer_free(b);
    /* no unknown token: read back as none, not as the SPM default 0 */
    l.tok->unk = -1;
    b = export_reload(l.tok, 0);
    assert_int_equal(b->unk, -1);
    xllm_tokenizer_free(l.tok);
    xllm_tokenizer_free(b);

    /* a split no tokenizer.ggml.pre name has: an error, not a file that tokenizes otherwise */
    char dir[4096], path[4200], err[512] = "";
    snprintf(dir, sizeof(dir), "%s/test_tok_split_XXXXXX", xllm_test_build_dir());
    assert_non_null(mkdtemp(dir));
    snprintf(path, sizeof(path), "%s/tokenizer.json", dir);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs("{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 1, \"ab\": 2},"
          " \"merges\": [\"a b\"]},"
          " \"pre_tokenizer\": {\"type\": \"Sequence\", \"pretokenizers\": ["
          "{\"type\": \"Split\", \"pattern\": {\"Regex\": \"x+\"}, \"behavior\": \"Isolated\"},"
          "{\"type\": \"ByteLevel\", \"use_regex\": false}]},"
          " \"decoder\": {\"type\": \"ByteLevel\"}}",
          f);
    fclose(f);
    xllm_tokenizer *odd = NULL;
    assert_int_equal(xllm_tokenizer_load(dir, &odd, err, sizeof(err)), XLLM_OK);
    assert_string_equal(xllm_tokenizer_pre(odd), "hf");
    xllm_gguf_writer *w = xllm_gguf_writer_new();
    assert_int_equal(xllm_tokenizer_write_gguf(odd, w, 0, err, sizeof(err)), XLLM_ERR_UNSUPPORTED);
    assert_non_null(strstr(err, "tokenizer.ggml.pre"));
    xllm_gguf_writer_free(w);
    xllm_tokenizer_free(odd);
    unlink(path);
    rmdir(dir);
}

static void test_load_errors(void **state) {
    (void)state;
    char err[512];
    xllm_tokenizer *tok = (xllm_tokenizer *)1;
    assert_int_equal(xllm_tokenizer_load("/nonexistent/xyz", &tok, err, sizeof(err)), XLLM_ERR_IO);
    assert_null(tok);
    assert_non_null(strstr(err, "/nonexistent/xyz"));
    /* a directory without tokenizer files */
    assert_int_not_equal(
        xllm_tokenizer_load(xllm_test_shared("models/templates"), &tok, err, sizeof(err)), XLLM_OK);
    assert_null(tok);
    /* a JSON file that is not a tokenizer: its directory has none */
    assert_int_not_equal(
        xllm_tokenizer_load(xllm_test_shared("models/configs/Qwen3-4B/config.json"), &tok, err,
                            sizeof(err)),
        XLLM_OK);
    assert_null(tok);
    /* WordPiece is out of scope: refused, with the key named */
    assert_int_equal(xllm_tokenizer_load(xllm_test_shared("models/vocab/ggml-vocab-bert-bge.gguf"),
                                         &tok, err, sizeof(err)),
                     XLLM_ERR_UNSUPPORTED);
    assert_non_null(strstr(err, "tokenizer.ggml.model"));
    xllm_tokenizer_free(NULL);
}

/* ---- threads ------------------------------------------------------------------------------ */

typedef struct thread_job {
    const xllm_tokenizer *tok;
    json_t *prompts;
    size_t start;
    uint64_t hash; /* of all ids, in order */
} thread_job;

static void *tokenize_all(void *arg) {
    thread_job *j = arg;
    size_t n = json_array_size(j->prompts);
    uint64_t h = 1469598103934665603ull;
    for (size_t k = 0; k < n; k++) {
        /* threads walk the prompts in different orders, so they race on the same words */
        json_t *p = json_object_get(json_array_get(j->prompts, (k + j->start) % n), "prompt");
        const char *s = json_string_value(p);
        int32_t cnt = xllm_tokenize(j->tok, s, strlen(s), NULL, 0, false, false);
        int32_t *ids = malloc(sizeof(int32_t) * (size_t)(-cnt + 1));
        cnt = xllm_tokenize(j->tok, s, strlen(s), ids, -cnt, false, false);
        uint64_t hk = 1469598103934665603ull;
        for (int32_t i = 0; i < cnt; i++) hk = (hk ^ (uint32_t)ids[i]) * 1099511628211ull;
        h += hk * ((k + j->start) % n + 1); /* order-independent sum of per-prompt hashes */
        free(ids);
    }
    j->hash = h;
    return NULL;
}

/* One tokenizer, several threads at once: the same ids as one thread alone. */
static void test_threads(void **state) {
    (void)state;
    xllm_tokenizer *tok = load_any("models/tokenizers/qwen3");
    json_error_t jerr;
    char path[4200];
    snprintf(path, sizeof(path), "%s",
             xllm_test_shared("data/sharegpt/sharegpt_sample_50_prompt_response.json"));
    json_t *prompts = json_load_file(path, 0, &jerr);
    assert_true(json_array_size(prompts) >= 10);
    thread_job jobs[4];
    pthread_t th[4];
    for (int i = 0; i < 4; i++) {
        jobs[i] = (thread_job){tok, prompts, (size_t)i * 7, 0};
        assert_int_equal(pthread_create(&th[i], NULL, tokenize_all, &jobs[i]), 0);
    }
    for (int i = 0; i < 4; i++) pthread_join(th[i], NULL);
    thread_job alone = {tok, prompts, 0, 0};
    tokenize_all(&alone);
    for (int i = 0; i < 4; i++) assert_true(jobs[i].hash == alone.hash);
    json_decref(prompts);
    xllm_tokenizer_free(tok);
}

/* ---- validation -------------------------------------------------------------------------- */

static void test_bad_metadata(void **state) {
    (void)state;
    char err[512];
    xllm_tokenizer *tok = (xllm_tokenizer *)1;
    /* A GGUF without tokenizer keys: the error names the key. */
    static const unsigned char empty_gguf[] = {'G', 'G', 'U', 'F', 3, 0, 0, 0, 0, 0, 0, 0,
                                               0,   0,   0,   0,   0, 0, 0, 0, 0, 0, 0, 0};
    xllm_gguf *g = NULL;
    assert_int_equal(xllm_gguf_parse(empty_gguf, sizeof(empty_gguf), &g, err, sizeof(err)),
                     XLLM_OK);
    assert_int_equal(xllm_tokenizer_from_gguf(g, &tok, err, sizeof(err)), XLLM_ERR_FORMAT);
    assert_null(tok);
    assert_non_null(strstr(err, "tokenizer.ggml.model"));
    xllm_gguf_free(g);
    assert_int_equal(xllm_tokenizer_from_gguf(NULL, &tok, err, sizeof(err)), XLLM_ERR_INVALID_ARG);
    assert_int_equal(xllm_tokenize(NULL, "a", 1, NULL, 0, true, true), INT32_MIN);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tiny_refs),          cmocka_unit_test(test_vocab_llama_spm),
        cmocka_unit_test(test_vocab_gguf_all),     cmocka_unit_test(test_vocab_all_load),
        cmocka_unit_test(test_llama2_tiny_random), cmocka_unit_test(test_qwentok),
        cmocka_unit_test(test_qwentok_vectors),    cmocka_unit_test(test_bad_metadata),
        cmocka_unit_test(test_hf_qwen3),           cmocka_unit_test(test_hf_llama3),
        cmocka_unit_test(test_hf_vocab_merges),    cmocka_unit_test(test_export_gguf),
        cmocka_unit_test(test_load_errors),        cmocka_unit_test(test_threads),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
