/* xllm bench-serve internals shared by its files: the prompt set (ShareGPT-style files or random
 * words) that the load generator sends. */
#ifndef XLLM_CLI_BENCH_SERVE_H
#define XLLM_CLI_BENCH_SERVE_H

#include <stddef.h>
#include <stdint.h>

typedef struct xllm_bserve_prompt {
    char *text;            /* UTF-8, owned by the dataset */
    int32_t input_tokens;  /* the dataset's count, else an estimate (used when the server sends
                              no usage) */
    int32_t output_tokens; /* the reference answer's length; 0 when the dataset has none */
} xllm_bserve_prompt;

typedef struct xllm_bserve_dataset {
    xllm_bserve_prompt *v;
    size_t n;
} xllm_bserve_dataset;

/* Loads ShareGPT-style prompts from a JSON file, or from every *.json file of a folder (in name
 * order). Two shapes are read: [{"conversations": [{"from": "human", "value": ...},
 * {"from": "gpt", "value": ...}]}] (the first human turn is the prompt, the next gpt turn the
 * reference answer) and [{"prompt": ..., "response": ..., "prompt_tokens": N,
 * "response_tokens": N}]. Prompts whose estimated length exceeds max_input (when > 0) are skipped.
 * Returns 0, or -1 with a message in err. */
int xllm_bserve_load_sharegpt(const char *path, int32_t max_input, xllm_bserve_dataset *out,
                              char *err, size_t err_size);

/* Makes n prompts of about n_in tokens each (uniform in n_in * [1 - range, 1 + range]) from
 * random common English words: such a word with its leading space is one token in the BPE
 * vocabularies of Llama, Qwen and GPT models, so the word count approximates the token count
 * (a chat template adds its own few tokens). output_tokens is drawn the same way from n_out. */
void xllm_bserve_make_random(uint64_t seed, size_t n, int32_t n_in, int32_t n_out, double range,
                             xllm_bserve_dataset *out);

void xllm_bserve_dataset_free(xllm_bserve_dataset *d);

/* Estimated tokens of English text when no count is known: about 4 characters a token. */
int32_t xllm_bserve_estimate_tokens(const char *text);

/* xorshift64* random numbers (state must not be 0). */
uint64_t xllm_bserve_rand(uint64_t *state);
double xllm_bserve_rand_unit(uint64_t *state); /* uniform in [0, 1) */

#endif
