/* Jinja chat-template interpreter (module API): parse a template, render it with variables
 * given as a jansson object. The public wrapper is include/xllm/chat.h (chat.c). */
#ifndef XLLM_TEMPLATE_H
#define XLLM_TEMPLATE_H

#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "xllm/chat.h"
#include "xllm/xllm.h"

typedef struct xllm_template xllm_template;

/* Resolved limits (no zeros). */
typedef struct xllm_template_limits {
    size_t max_output;
    size_t max_memory;
    uint64_t max_steps;
    int max_depth;
} xllm_template_limits;

xllm_template_limits xllm_template_limits_from(const xllm_chat_params *p);

/* Parses src (n bytes). Returns XLLM_OK and *out, or a status and "line N: ..." in err. */
xllm_status xllm_template_parse(const char *src, size_t n, const xllm_template_limits *lim,
                                xllm_template **out, char *err, size_t err_size);
void xllm_template_free(xllm_template *t);

/* Renders with vars (a JSON object: each key a variable). now: see xllm_chat_params.now.
 * *out is malloc'd (NUL-terminated, *out_len bytes). Thread-safe for one template. */
xllm_status xllm_template_render(const xllm_template *t, const json_t *vars, int64_t now,
                                 char **out, size_t *out_len, char *err, size_t err_size);

#endif
