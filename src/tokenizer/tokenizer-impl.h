/* Private layout of xllm_tokenizer, shared by the vocabulary loaders (GGUF, Hugging Face), the
 * pre-tokenizer and the encoder/decoder. Not part of the public API. */
#ifndef XLLM_TOKENIZER_IMPL_H
#define XLLM_TOKENIZER_IMPL_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tokenizer/tokenizer.h"

typedef enum tok_kind { TOK_SPM = 0, TOK_BPE = 1 } tok_kind;

typedef struct tok_entry {
    size_t off; /* into text */
    uint32_t len;
    float score;
    int8_t type; /* xllm_token_type */
} tok_entry;

/* Open-addressing string -> int32 map whose keys live elsewhere (found through a key function). */
typedef struct str_map {
    int32_t *slot; /* value, -1 = empty */
    size_t mask;
} str_map;

/* A merge (left id, right id) -> (rank, merged id). */
typedef struct merge_slot {
    uint64_t key; /* (left << 32 | right) + 1; 0 = empty */
    int32_t rank;
    int32_t id;
} merge_slot;

/* ---- pre-tokenizer (pretok.c) ------------------------------------------------------------ */

/* A list of regular expressions applied one after another: each splits every current fragment
 * into its matches and the text between them (Hugging Face's Split with "Isolated" behaviour).
 * Immutable after creation; safe to use from several threads. */
typedef struct xllm_pretok xllm_pretok;

typedef struct tok_span {
    size_t off, len;
} tok_span;

typedef struct span_vec {
    tok_span *v;
    size_t n, cap;
} span_vec;

/* GPT-2's split, which Hugging Face's ByteLevel pre-tokenizer applies when use_regex is on. */
#define XLLM_RE_GPT2                                                                               \
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"

/* Compiles the regexes (PCRE2 syntax, as Hugging Face tokenizer.json writes them; `\s` and `\S`
 * mean Unicode White_Space). n may be 0 (no splitting). */
xllm_status xllm_pretok_new(const char *const *regexes, int n, xllm_pretok **out, char *err,
                            size_t err_size);
/* The pre-tokenizer of a GGUF tokenizer.ggml.pre name; also reports whether that vocabulary
 * takes a pre-token that is itself a token whole (ignore_merges) and wants NFC. */
xllm_status xllm_pretok_from_name(const char *name, xllm_pretok **out, bool *ignore_merges,
                                  bool *nfc, char *err, size_t err_size);
/* The regex list and flags of a named variant; false when the name is unknown. */
bool xllm_pretok_variant(const char *name, const char *const **re, int *n, bool *ignore_merges,
                         bool *nfc);
/* The tokenizer.ggml.pre name (the first of its variant) whose regex list and flags are exactly
 * these, written to name; false when none is (or it does not fit). */
bool xllm_pretok_name_of(const char *const *re, int n, bool ignore_merges, bool nfc, char *name,
                         size_t size);
void xllm_pretok_free(xllm_pretok *p);
/* Splits text[0..len) into pieces appended to out (offsets relative to text). Every byte ends up
 * in exactly one piece, in order. Thread-safe (match data is per call). */
void xllm_pretok_split(const xllm_pretok *p, const char *text, size_t len, span_vec *out);
void xllm_span_push(span_vec *a, size_t off, size_t len);

/* ---- the tokenizer ----------------------------------------------------------------------- */

struct xllm_tokenizer {
    tok_kind kind;
    char model[16];
    char pre[48]; /* tokenizer.ggml.pre name ("hf": a Hugging Face split no GGUF name has) */
    int32_t n_vocab;
    char *text; /* all token texts, back to back */
    tok_entry *tok;
    str_map tok_map; /* text -> id (the last id wins for duplicates, as llama.cpp) */

    /* Byte-level BPE. */
    merge_slot *merge;
    size_t merge_mask;
    int32_t n_merges;
    char *raw_text; /* each normal token's bytes (byte-level decoded), back to back */
    size_t *raw_off;
    uint32_t *raw_len;
    str_map raw_map; /* raw bytes -> id, normal tokens only */
    /* Per token: 0 = not known yet, 1 = BPE of its own bytes gives exactly it, 2 = it does not.
     * Filled lazily by encoders (idempotent, so concurrent writers agree). */
    _Atomic uint8_t *self_ok;
    bool ignore_merges; /* a pre-token that is a token is emitted whole (Llama 3) */
    bool nfc;           /* NFC-normalize text before pre-tokenizing (Qwen2) */
    xllm_pretok *pretok;

    int32_t bos, eos, unk, pad, eot, eom;
    bool add_bos, add_eos, add_space_prefix;

    /* Control, user-defined and unknown tokens, by first byte, then longest first: those
     * starting with byte c are special[sp_start[c] .. sp_start[c + 1]). */
    int32_t *special;
    int32_t n_special;
    int32_t sp_start[257];
    uint8_t *eog; /* n_vocab flags */

    int32_t byte_tok[256]; /* SPM: <0xNN> token of each byte; BPE: the byte's character token */
    /* BPE: GPT-2 byte <-> code point map. */
    uint16_t byte_cp[256];
    int16_t cp_byte[512]; /* -1 when the code point is not a byte's */
};

/* ---- construction helpers shared by the loaders (tokenizer.c) ----------------------------- */

/* A new tokenizer of n tokens (texts empty, types undefined, scores 0, ids -1). */
xllm_tokenizer *xllm_tok_alloc(tok_kind kind, const char *model, int32_t n);
/* Copies all token texts (strs[i] of lens[i] bytes; NULL = empty) and builds the text map. */
void xllm_tok_set_texts(xllm_tokenizer *t, const char *const *strs, const size_t *lens);
/* Looks up a token by its exact text; -1 when absent. */
int32_t xllm_tok_find(const xllm_tokenizer *t, const char *s, size_t n);
/* Merges, in rank order: reserve once, then add. A merge whose parts or result are not tokens
 * is ignored (returns false). */
void xllm_tok_merges_reserve(xllm_tokenizer *t, size_t n);
bool xllm_tok_add_merge(xllm_tokenizer *t, const char *l, size_t ln, const char *r, size_t rn);
/* Builds the derived tables (byte maps, special-token list, end-of-generation set) once texts,
 * types, ids and flags are set. Takes ownership of t->pretok. */
xllm_status xllm_tok_finalize(xllm_tokenizer *t, char *err, size_t err_size);
/* Whether a token text is one of the usual end-of-turn markers. */
bool xllm_tok_is_eog_text(const char *s, size_t n);

/* Hugging Face loader (vocab_hf.c): dir holds tokenizer.json, or vocab.json + merges.txt, with
 * an optional tokenizer_config.json (and added_tokens.json, generation_config.json). */
xllm_status xllm_tokenizer_from_hf_dir(const char *dir, xllm_tokenizer **out, char *err,
                                       size_t err_size);

#endif
