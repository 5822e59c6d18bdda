/* Public chat-template API (include/xllm/chat.h): parses the request JSON with jansson and
 * renders the template with the variables transformers passes to a chat template. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "template/template-impl.h"
#include "xllm/chat.h"

struct xllm_chat_template {
    xllm_template *t;
    int64_t now;
};

xllm_chat_params xllm_chat_default_params(void) {
    xllm_chat_params p;
    memset(&p, 0, sizeof(p));
    return p;
}

xllm_status xllm_chat_template_new(const char *source, size_t len, const xllm_chat_params *params,
                                   xllm_chat_template **out, char *err, size_t err_size) {
    if (!out) return XLLM_ERR_INVALID_ARG;
    *out = NULL;
    xllm_template_limits lim = xllm_template_limits_from(params);
    xllm_chat_template *ct = calloc(1, sizeof(*ct));
    if (!ct) return XLLM_ERR_NOMEM;
    xllm_status st = xllm_template_parse(source, len, &lim, &ct->t, err, err_size);
    if (st != XLLM_OK) {
        free(ct);
        return st;
    }
    ct->now = params ? params->now : 0;
    *out = ct;
    return XLLM_OK;
}

void xllm_chat_template_free(xllm_chat_template *t) {
    if (!t) return;
    xllm_template_free(t->t);
    free(t);
}

static json_t *parse_json(const char *text, size_t len, char *err, size_t err_size) {
    json_error_t je;
    json_t *j = json_loadb(text ? text : "", text ? len : 0, JSON_DECODE_ANY, &je);
    if (!j && err && err_size)
        snprintf(err, err_size, "bad JSON at line %d column %d: %s", je.line, je.column, je.text);
    return j;
}

xllm_status xllm_chat_template_render(const xllm_chat_template *t, const char *request_json,
                                      size_t len, const char *bos_token, const char *eos_token,
                                      char **out, size_t *out_len, char *err, size_t err_size) {
    if (!out) return XLLM_ERR_INVALID_ARG;
    *out = NULL;
    if (out_len) *out_len = 0;
    if (!t) return XLLM_ERR_INVALID_ARG;
    json_t *req = parse_json(request_json, len, err, err_size);
    if (!req) return XLLM_ERR_INVALID_ARG;
    xllm_status st = XLLM_ERR_INVALID_ARG;
    json_t *vars = json_object();
    json_t *messages = json_object_get(req, "messages");
    json_t *kwargs = json_object_get(req, "chat_template_kwargs");
    json_t *agp = json_object_get(req, "add_generation_prompt");
    if (!json_is_object(req)) {
        if (err && err_size) snprintf(err, err_size, "the request must be a JSON object");
        goto done;
    }
    if (!json_is_array(messages)) {
        if (err && err_size) snprintf(err, err_size, "the request needs a \"messages\" array");
        goto done;
    }
    if (kwargs && !json_is_object(kwargs) && !json_is_null(kwargs)) {
        if (err && err_size) snprintf(err, err_size, "\"chat_template_kwargs\" must be an object");
        goto done;
    }
    if (agp && !json_is_boolean(agp)) {
        if (err && err_size) snprintf(err, err_size, "\"add_generation_prompt\" must be a boolean");
        goto done;
    }
    /* What transformers' apply_chat_template passes: messages, tools (None when absent),
     * documents, add_generation_prompt, the special tokens, then the extra kwargs. */
    json_object_set(vars, "messages", messages);
    json_t *tools = json_object_get(req, "tools");
    json_object_set_new(vars, "tools", tools ? json_incref(tools) : json_null());
    json_t *docs = json_object_get(req, "documents");
    json_object_set_new(vars, "documents", docs ? json_incref(docs) : json_null());
    json_object_set_new(vars, "add_generation_prompt", json_boolean(agp ? json_is_true(agp) : 1));
    /* a tokenizer without the token leaves the variable undefined, as transformers does */
    if (bos_token) json_object_set_new(vars, "bos_token", json_string(bos_token));
    if (eos_token) json_object_set_new(vars, "eos_token", json_string(eos_token));
    if (json_is_object(kwargs)) json_object_update(vars, kwargs);
    st = xllm_template_render(t->t, vars, t->now, out, out_len, err, err_size);
done:
    json_decref(vars);
    json_decref(req);
    return st;
}

xllm_status xllm_chat_template_render_vars(const xllm_chat_template *t, const char *vars_json,
                                           size_t len, char **out, size_t *out_len, char *err,
                                           size_t err_size) {
    if (!out) return XLLM_ERR_INVALID_ARG;
    *out = NULL;
    if (out_len) *out_len = 0;
    if (!t) return XLLM_ERR_INVALID_ARG;
    json_t *vars = parse_json(vars_json, len, err, err_size);
    if (!vars) return XLLM_ERR_INVALID_ARG;
    if (!json_is_object(vars)) {
        json_decref(vars);
        if (err && err_size) snprintf(err, err_size, "the variables must be a JSON object");
        return XLLM_ERR_INVALID_ARG;
    }
    xllm_status st = xllm_template_render(t->t, vars, t->now, out, out_len, err, err_size);
    json_decref(vars);
    return st;
}
