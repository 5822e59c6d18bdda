/* xllm chat templates: renders a model's Jinja chat template (tokenizer.chat_template) for an
 * OpenAI-style chat request, byte-identical to Hugging Face transformers' jinja2 rendering. */
#ifndef XLLM_CHAT_H
#define XLLM_CHAT_H

#include <stddef.h>
#include <stdint.h>

#include "xllm/xllm.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct xllm_chat_template xllm_chat_template;

/* Bounds that keep a hostile template from hanging or exhausting memory; exceeding one makes
 * the render fail with a message. */
typedef struct xllm_chat_params {
    size_t max_output;  /* bytes of rendered text; 0 = 16 MiB */
    size_t max_memory;  /* bytes of working memory of one parse or render; 0 = 256 MiB */
    uint64_t max_steps; /* evaluation steps of one render; 0 = 50 million */
    int32_t max_depth;  /* nesting of expressions, blocks and macro calls; 0 = 200 */
    /* strftime_now(): this time (Unix seconds, formatted in UTC) instead of the current local
     * time; 0 = the current time. For reproducible renders in tests. */
    int64_t now;
} xllm_chat_params;

xllm_chat_params xllm_chat_default_params(void);

/* Parses a template (len bytes of UTF-8; need not be NUL-terminated). params may be NULL for
 * the defaults. On error returns a status, *out = NULL, and a message with the line number in
 * err. The template is immutable: several threads may render it at once. */
xllm_status xllm_chat_template_new(const char *source, size_t len, const xllm_chat_params *params,
                                   xllm_chat_template **out, char *err, size_t err_size);
void xllm_chat_template_free(xllm_chat_template *t); /* accepts NULL */

/* Renders for a request shaped like an OpenAI chat completion body (JSON text, len bytes):
 * "messages" (required), "tools" (optional; none when absent), "documents" (optional),
 * "add_generation_prompt" (optional, default true) and "chat_template_kwargs" (optional object
 * whose entries become template variables, e.g. enable_thinking, date_string). bos_token and
 * eos_token are passed as the variables of those names; NULL leaves one undefined.
 * On success *out is a malloc'd NUL-terminated string of *out_len bytes (the caller frees it;
 * out_len may be NULL). On error (bad JSON, template error, raise_exception, a limit) returns
 * a status with *out = NULL and a message in err; XLLM_ERR_FORMAT when the template raised or
 * failed, XLLM_ERR_INVALID_ARG for a bad request. */
xllm_status xllm_chat_template_render(const xllm_chat_template *t, const char *request_json,
                                      size_t len, const char *bos_token, const char *eos_token,
                                      char **out, size_t *out_len, char *err, size_t err_size);

/* Renders with the template variables given directly as a JSON object (no defaults added). */
xllm_status xllm_chat_template_render_vars(const xllm_chat_template *t, const char *vars_json,
                                           size_t len, char **out, size_t *out_len, char *err,
                                           size_t err_size);

#ifdef __cplusplus
}
#endif

#endif /* XLLM_CHAT_H */
