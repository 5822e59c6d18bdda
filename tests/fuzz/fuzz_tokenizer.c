/* libFuzzer target for the tokenizer: encodes arbitrary bytes with real vocabularies (byte-level
 * BPE with NFC, with ignore_merges, with a six-regex pre-tokenizer, and SentencePiece), with and
 * without special-token parsing, decodes every id, and checks byte-level round trips.
 * Vocabularies: $XLLM_FUZZ_TOKENIZERS (paths separated by ':'), else a default set under
 * $XLLM_SHARED (default XLLM_SHARED_DEFAULT). Loaded once, on the first input. */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "xllm/xllm.h"

#ifndef XLLM_SHARED_DEFAULT
#define XLLM_SHARED_DEFAULT "../shared"
#endif

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

enum { MAX_TOK = 8 };

/* The harness's own state (not library code): the vocabularies, loaded once. */
static xllm_tokenizer *g_tok[MAX_TOK];
static bool g_roundtrip[MAX_TOK]; /* byte-level BPE without a normalizer: decode(encode(x)) == x */
static int g_n = -1;

static void load_one(const char *path, bool roundtrip) {
    char err[512] = "";
    if (g_n >= MAX_TOK) return;
    xllm_tokenizer *t = NULL;
    if (xllm_tokenizer_load(path, &t, err, sizeof(err)) != XLLM_OK) {
        fprintf(stderr, "fuzz_tokenizer: %s\n", err);
        abort();
    }
    /* Round trips hold only where every byte has a token (some vocabs lack bytes that never
     * occur in UTF-8, such as 0xF9; those bytes are dropped, as llama.cpp does). */
    for (int b = 0; b < 256 && roundtrip; b++) {
        char c = (char)b, piece[64];
        int32_t id;
        if (xllm_tokenize(t, &c, 1, &id, 1, false, false) != 1 ||
            xllm_token_to_piece(t, id, piece, sizeof(piece), true) != 1 || piece[0] != c)
            roundtrip = false;
    }
    g_roundtrip[g_n] = roundtrip;
    g_tok[g_n++] = t;
}

static void load_all(void) {
    g_n = 0;
    const char *list = getenv("XLLM_FUZZ_TOKENIZERS");
    if (list && *list) {
        char buf[4096];
        snprintf(buf, sizeof(buf), "%s", list);
        for (char *p = strtok(buf, ":"); p; p = strtok(NULL, ":")) load_one(p, false);
        return;
    }
    const char *root = getenv("XLLM_SHARED");
    if (!root || !*root) root = XLLM_SHARED_DEFAULT;
    static const struct {
        const char *rel;
        bool roundtrip;
    } k_default[] = {
        {"models/tiny/qwen3-qwentok-f16.gguf", false}, /* qwen2 regex, NFC */
        {"models/tokenizers/llama3", true},            /* HF tokenizer.json, ignore_merges */
        {"models/vocab/ggml-vocab-deepseek-llm.gguf", true},
        {"models/vocab/ggml-vocab-llama-spm.gguf", false},
        {"models/vocab/ggml-vocab-falcon.gguf", true},
    };
    for (size_t i = 0; i < sizeof(k_default) / sizeof(k_default[0]); i++) {
        char path[4096];
        snprintf(path, sizeof(path), "%s/%s", root, k_default[i].rel);
        load_one(path, k_default[i].roundtrip);
    }
}

/* Input: one control byte (tokenizer index, parse_special, add_special), then the text. */
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (g_n < 0) load_all();
    if (size < 1 || g_n == 0) return 0;
    uint8_t ctl = data[0];
    const xllm_tokenizer *tok = g_tok[(ctl & 7) % g_n];
    bool parse_special = ctl & 8, add_special = ctl & 16;
    const char *text = (const char *)data + 1;
    size_t len = size - 1;

    int32_t need = xllm_tokenize(tok, text, len, NULL, 0, add_special, parse_special);
    if (need > 0 || need == INT32_MIN) __builtin_trap(); /* max 0: always the negated size */
    int32_t cap = -need;
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)(cap + 1));
    int32_t n = xllm_tokenize(tok, text, len, ids, cap, add_special, parse_special);
    if (n != cap) __builtin_trap();
    int32_t n_vocab = xllm_tokenizer_n_vocab(tok);

    /* Decode every id; concatenate the pieces (special text included). */
    char *out = malloc(len * 4 + 64 * (size_t)n + 64);
    size_t used = 0;
    for (int32_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= n_vocab) __builtin_trap();
        char piece[512];
        int32_t k = xllm_token_to_piece(tok, ids[i], piece, sizeof(piece), true);
        if (k < 0) __builtin_trap(); /* no token here is that long */
        memcpy(out + used, piece, (size_t)k);
        used += (size_t)k;
        if (xllm_token_to_piece(tok, ids[i], piece, sizeof(piece), false) < 0) __builtin_trap();
    }
    bool rt = g_roundtrip[(ctl & 7) % g_n];
    if (rt && !add_special && !parse_special && (used != len || memcmp(out, text, len) != 0))
        __builtin_trap();
    free(out);
    free(ids);
    return 0;
}
