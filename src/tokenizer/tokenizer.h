/* Internal tokenizer interface: builds an xllm_tokenizer from a GGUF's tokenizer.ggml.* keys
 * (SentencePiece "llama" vocabularies, and byte-level BPE "gpt2" vocabularies), and token
 * inspection for tests and tools. */
#ifndef XLLM_TOKENIZER_TOKENIZER_H
#define XLLM_TOKENIZER_TOKENIZER_H

#include <stdbool.h>
#include <stddef.h>

#include "gguf/gguf.h"
#include "gguf/gguf_write.h"
#include "xllm/xllm.h"

/* Token types as stored in tokenizer.ggml.token_type. */
typedef enum xllm_token_type {
    XLLM_TOKEN_TYPE_UNDEFINED = 0,
    XLLM_TOKEN_TYPE_NORMAL = 1,
    XLLM_TOKEN_TYPE_UNKNOWN = 2,
    XLLM_TOKEN_TYPE_CONTROL = 3,
    XLLM_TOKEN_TYPE_USER_DEFINED = 4,
    XLLM_TOKEN_TYPE_UNUSED = 5,
    XLLM_TOKEN_TYPE_BYTE = 6,
} xllm_token_type;

/* Reads the vocabulary out of g (everything needed is copied: g may be freed afterwards). On
 * error returns a status, *out = NULL, and a message naming the offending key. */
xllm_status xllm_tokenizer_from_gguf(const xllm_gguf *g, xllm_tokenizer **out, char *err,
                                     size_t err_size);

/* Whether path names Hugging Face tokenizer files (a folder, or a .json file in one), as
 * xllm_tokenizer_load reads them; the folder goes to dir. */
bool xllm_tokenizer_hf_dir(const char *path, char *dir, size_t size);

/* Writes the vocabulary as llama.cpp's tokenizer.ggml.* keys (model, pre, tokens, scores or
 * merges, token types, special ids and flags), padded with unused "[PAD<id>]" tokens up to
 * n_vocab (a model's embedding rows; no padding when n_vocab <= the vocabulary's size). A BPE
 * vocabulary whose split matches no tokenizer.ggml.pre name is an error. */
xllm_status xllm_tokenizer_write_gguf(const xllm_tokenizer *tok, xllm_gguf_writer *w,
                                      int32_t n_vocab, char *err, size_t err_size);

/* The text of a token as stored in the vocabulary (not NUL-terminated), or NULL when id is out
 * of range. */
const char *xllm_tokenizer_token_text(const xllm_tokenizer *tok, int32_t id, size_t *len);
/* The token type of id (XLLM_TOKEN_TYPE_UNDEFINED when out of range). */
xllm_token_type xllm_tokenizer_token_type(const xllm_tokenizer *tok, int32_t id);

#endif
