/* OpenAI request bodies: parses and validates /v1/completions and /v1/chat/completions JSON
 * into an xllm_api_request, naming the offending field on error. Called on HTTP threads; pure
 * (no model needed), so it is also the fuzz target's entry point. */
#include <math.h>
#include <string.h>

#include "api/api-impl.h"
#include "util/common.h"

#define FAIL(field, ...)                                                                           \
    do {                                                                                           \
        *param = (field);                                                                          \
        xllm_set_err(err, err_size, __VA_ARGS__);                                                  \
        return false;                                                                              \
    } while (0)

/* A field that is absent or null counts as not given. */
static json_t *field(json_t *o, const char *key) {
    json_t *v = json_object_get(o, key);
    return json_is_null(v) ? NULL : v;
}

static bool get_bool(json_t *o, const char *key, bool *out, const char **param, char *err,
                     size_t err_size) {
    json_t *v = field(o, key);
    if (!v) return true;
    if (!json_is_boolean(v)) FAIL(key, "'%s' must be a boolean", key);
    *out = json_is_true(v);
    return true;
}

/* Integers; a real with an integral value is accepted too. */
static bool get_int(json_t *o, const char *key, int64_t lo, int64_t hi, int64_t *out,
                    const char **param, char *err, size_t err_size) {
    json_t *v = field(o, key);
    if (!v) return true;
    int64_t x;
    if (json_is_integer(v)) {
        x = json_integer_value(v);
    } else if (json_is_real(v) && json_real_value(v) == floor(json_real_value(v)) &&
               fabs(json_real_value(v)) < 9e15) {
        x = (int64_t)json_real_value(v);
    } else {
        FAIL(key, "'%s' must be an integer", key);
    }
    if (x < lo || x > hi)
        FAIL(key, "'%s' must be between %lld and %lld, got %lld", key, (long long)lo, (long long)hi,
             (long long)x);
    *out = x;
    return true;
}

static bool get_num(json_t *o, const char *key, double lo, double hi, float *out,
                    const char **param, char *err, size_t err_size) {
    json_t *v = field(o, key);
    if (!v) return true;
    if (!json_is_number(v)) FAIL(key, "'%s' must be a number", key);
    double x = json_number_value(v);
    if (!(x >= lo && x <= hi)) FAIL(key, "'%s' must be between %g and %g, got %g", key, lo, hi, x);
    *out = (float)x;
    return true;
}

static bool parse_stop(json_t *o, xllm_api_request *r, const char **param, char *err,
                       size_t err_size) {
    json_t *v = field(o, "stop");
    if (!v) return true;
    if (json_is_string(v)) {
        if (json_string_length(v) == 0) return true;
        if (json_string_length(v) > XLLM_API_MAX_STOP_LEN)
            FAIL("stop", "a stop string may have at most %d bytes", XLLM_API_MAX_STOP_LEN);
        r->stop[0] = json_string_value(v);
        r->stop_len[0] = json_string_length(v);
        r->n_stop = 1;
        return true;
    }
    if (!json_is_array(v)) FAIL("stop", "'stop' must be a string or an array of strings");
    if (json_array_size(v) > XLLM_API_MAX_STOP)
        FAIL("stop", "'stop' may hold at most %d strings", XLLM_API_MAX_STOP);
    size_t i;
    json_t *s;
    json_array_foreach(v, i, s) {
        if (!json_is_string(s)) FAIL("stop", "'stop' must be a string or an array of strings");
        if (json_string_length(s) > XLLM_API_MAX_STOP_LEN)
            FAIL("stop", "a stop string may have at most %d bytes", XLLM_API_MAX_STOP_LEN);
        if (json_string_length(s) == 0) continue;
        r->stop[r->n_stop] = json_string_value(s);
        r->stop_len[r->n_stop++] = json_string_length(s);
    }
    return true;
}

/* A token-id array (completions' prompt as ids). */
static bool parse_ids(json_t *a, xllm_api_prompt *p, const char **param, char *err,
                      size_t err_size) {
    size_t n = json_array_size(a), i;
    if (n == 0) FAIL("prompt", "'prompt' must not be empty");
    if (n > (1u << 20)) FAIL("prompt", "'prompt' has too many tokens");
    p->ids = xllm_xmalloc(n * sizeof(int32_t));
    p->n_ids = 0;
    json_t *t;
    json_array_foreach(a, i, t) {
        if (!json_is_integer(t) || json_integer_value(t) < 0 || json_integer_value(t) > INT32_MAX)
            FAIL("prompt", "'prompt' token ids must be non-negative integers");
        p->ids[p->n_ids++] = (int32_t)json_integer_value(t);
    }
    return true;
}

static bool parse_prompt(json_t *o, xllm_api_request *r, const char **param, char *err,
                         size_t err_size) {
    json_t *v = field(o, "prompt");
    if (!v) FAIL("prompt", "'prompt' is required");
    if (json_is_string(v)) {
        r->prompts[0].text = json_string_value(v);
        r->prompts[0].len = json_string_length(v);
        r->n_prompts = 1;
        return true;
    }
    if (!json_is_array(v) || json_array_size(v) == 0)
        FAIL("prompt", "'prompt' must be a string, an array of strings, or token ids");
    json_t *first = json_array_get(v, 0);
    if (json_is_integer(first)) {
        r->n_prompts = 1;
        return parse_ids(v, &r->prompts[0], param, err, err_size);
    }
    if (json_array_size(v) > XLLM_API_MAX_PROMPTS)
        FAIL("prompt", "'prompt' may hold at most %d prompts", XLLM_API_MAX_PROMPTS);
    size_t i;
    json_t *e;
    json_array_foreach(v, i, e) {
        xllm_api_prompt *p = &r->prompts[r->n_prompts++];
        if (json_is_string(e)) {
            p->text = json_string_value(e);
            p->len = json_string_length(e);
        } else if (json_is_array(e)) {
            if (!parse_ids(e, p, param, err, err_size)) return false;
        } else {
            FAIL("prompt", "'prompt' must be a string, an array of strings, or token ids");
        }
    }
    return true;
}

/* Chat messages: each {role, content}; content a string, null, or an array of text parts (joined
 * into one string for the template). Builds the renderer's input object. */
static bool parse_messages(json_t *o, xllm_api_request *r, const char **param, char *err,
                           size_t err_size) {
    json_t *v = field(o, "messages");
    if (!v) FAIL("messages", "'messages' is required");
    if (!json_is_array(v) || json_array_size(v) == 0)
        FAIL("messages", "'messages' must be a non-empty array");
    json_t *msgs = json_array();
    r->chat = json_object();
    json_object_set_new(r->chat, "messages", msgs);
    size_t i;
    json_t *m;
    json_array_foreach(v, i, m) {
        if (!json_is_object(m)) FAIL("messages", "messages[%zu] must be an object", i);
        json_t *role = json_object_get(m, "role");
        if (!json_is_string(role)) FAIL("messages", "messages[%zu].role must be a string", i);
        json_t *copy = json_copy(m); /* shallow: values are shared, not modified */
        json_t *c = json_object_get(m, "content");
        if (json_is_array(c)) {
            xllm_api_buf text = {0};
            xllm_api_buf_add(&text, "", 0);
            size_t k;
            json_t *part;
            json_array_foreach(c, k, part) {
                json_t *type = json_object_get(part, "type");
                json_t *t = json_object_get(part, "text");
                if (!json_is_object(part) || !json_is_string(type) ||
                    strcmp(json_string_value(type), "text") || !json_is_string(t)) {
                    xllm_api_buf_free(&text);
                    json_decref(copy);
                    FAIL("messages", "messages[%zu].content: only text parts are supported", i);
                }
                xllm_api_buf_add(&text, json_string_value(t), json_string_length(t));
            }
            json_object_set_new(copy, "content", json_stringn(text.p, text.len));
            xllm_api_buf_free(&text);
        } else if (c && !json_is_string(c) && !json_is_null(c)) {
            json_decref(copy);
            FAIL("messages", "messages[%zu].content must be a string, an array or null", i);
        }
        json_array_append_new(msgs, copy);
    }
    static const char *const passed[] = {"tools", "documents", "chat_template_kwargs",
                                         "add_generation_prompt"};
    for (size_t k = 0; k < sizeof(passed) / sizeof(passed[0]); k++) {
        json_t *x = field(o, passed[k]);
        if (!x) continue;
        if (k == 2 && !json_is_object(x))
            FAIL("chat_template_kwargs", "'chat_template_kwargs' must be an object");
        if (k == 3 && !json_is_boolean(x))
            FAIL("add_generation_prompt", "'add_generation_prompt' must be a boolean");
        if (k < 2 && !json_is_array(x)) FAIL(passed[k], "'%s' must be an array", passed[k]);
        json_object_set(r->chat, passed[k], x);
    }
    return true;
}

static bool parse(json_t *o, xllm_api_request *r, const char **param, char *err, size_t err_size) {
    const bool chat = r->kind == XLLM_API_CHAT;
    json_t *model = field(o, "model");
    if (model && !json_is_string(model)) FAIL("model", "'model' must be a string");
    r->model = model ? json_string_value(model) : NULL;
    if (!get_bool(o, "stream", &r->stream, param, err, err_size)) return false;
    json_t *so = field(o, "stream_options");
    if (so) {
        if (!json_is_object(so)) FAIL("stream_options", "'stream_options' must be an object");
        if (!r->stream) FAIL("stream_options", "'stream_options' needs 'stream': true");
        if (!get_bool(so, "include_usage", &r->include_usage, param, err, err_size)) {
            *param = "stream_options.include_usage";
            return false;
        }
    }
    int64_t x;
    x = 0;
    if (!get_int(o, "max_tokens", 1, INT32_MAX, &x, param, err, err_size)) return false;
    if (chat && !get_int(o, "max_completion_tokens", 1, INT32_MAX, &x, param, err, err_size))
        return false;
    r->max_tokens = (int32_t)x;
    x = 1;
    if (!get_int(o, "n", 1, XLLM_API_MAX_N, &x, param, err, err_size)) return false;
    r->n = (int32_t)x;

    /* sampling: OpenAI's defaults (temperature 1, nucleus and top-k off) */
    xllm_sampler_params *sp = &r->sampling;
    *sp = xllm_sampler_default_params();
    sp->temperature = 1.0f;
    sp->top_p = 1.0f;
    sp->top_k = 0;
    sp->min_p = 0.0f;
    sp->penalty_last_n = -1;
    if (!get_num(o, "temperature", 0, 100, &sp->temperature, param, err, err_size)) return false;
    if (!get_num(o, "top_p", 1e-9, 1, &sp->top_p, param, err, err_size)) return false;
    if (!get_num(o, "min_p", 0, 1, &sp->min_p, param, err, err_size)) return false;
    x = 0;
    if (!get_int(o, "top_k", -1, INT32_MAX, &x, param, err, err_size)) return false;
    sp->top_k = x < 0 ? 0 : (int32_t)x;
    if (!get_num(o, "presence_penalty", -2, 2, &sp->presence_penalty, param, err, err_size))
        return false;
    if (!get_num(o, "frequency_penalty", -2, 2, &sp->frequency_penalty, param, err, err_size))
        return false;
    if (!get_num(o, "repetition_penalty", 1e-6, 100, &sp->repeat_penalty, param, err, err_size))
        return false;
    if (field(o, "seed")) {
        x = 0;
        if (!get_int(o, "seed", INT64_MIN, INT64_MAX, &x, param, err, err_size)) return false;
        sp->seed = (uint64_t)x;
        r->has_seed = true;
    }
    if (!parse_stop(o, r, param, err, err_size)) return false;

    r->logprobs = -1;
    if (chat) {
        bool lp = false;
        if (!get_bool(o, "logprobs", &lp, param, err, err_size)) return false;
        x = 0;
        if (!get_int(o, "top_logprobs", 0, 20, &x, param, err, err_size)) return false;
        if (field(o, "top_logprobs") && !lp)
            FAIL("top_logprobs", "'top_logprobs' needs 'logprobs': true");
        if (lp) r->logprobs = (int32_t)x;
    } else {
        x = -1;
        if (!get_int(o, "logprobs", 0, 20, &x, param, err, err_size)) return false;
        r->logprobs = (int32_t)x;
        if (!get_bool(o, "echo", &r->echo, param, err, err_size)) return false;
    }
    if (!get_bool(o, "ignore_eos", &r->ignore_eos, param, err, err_size)) return false;
    x = 0;
    if (!get_int(o, "priority", INT32_MIN, INT32_MAX, &x, param, err, err_size)) return false;
    r->priority = (int32_t)x;
    if (!get_bool(o, "offline", &r->offline, param, err, err_size)) return false;
    float slo = 0;
    if (!get_num(o, "ttft_slo_ms", 0, 1e12, &slo, param, err, err_size)) return false;
    r->ttft_slo_ms = (int64_t)slo;
    slo = 0;
    if (!get_num(o, "tpot_slo_ms", 0, 1e12, &slo, param, err, err_size)) return false;
    r->tpot_slo_ms = (int64_t)slo;

    if (chat) return parse_messages(o, r, param, err, err_size);
    return parse_prompt(o, r, param, err, err_size);
}

xllm_status xllm_api_request_parse(const char *body, size_t len, xllm_api_kind kind,
                                   xllm_api_request *out, const char **param, char *err,
                                   size_t err_size) {
    memset(out, 0, sizeof(*out));
    *param = NULL;
    out->kind = kind;
    json_error_t je;
    out->body = json_loadb(body, len, JSON_REJECT_DUPLICATES, &je);
    if (!out->body) {
        xllm_set_err(err, err_size, "the body is not valid JSON: %s (line %d, column %d)", je.text,
                     je.line, je.column);
        return XLLM_ERR_INVALID_ARG;
    }
    if (!json_is_object(out->body)) {
        xllm_set_err(err, err_size, "the body must be a JSON object");
        xllm_api_request_clear(out);
        return XLLM_ERR_INVALID_ARG;
    }
    if (!parse(out->body, out, param, err, err_size)) {
        const char *p = *param;
        xllm_api_request_clear(out);
        *param = p;
        return XLLM_ERR_INVALID_ARG;
    }
    return XLLM_OK;
}

void xllm_api_request_clear(xllm_api_request *r) {
    for (int32_t i = 0; i < XLLM_API_MAX_PROMPTS; i++) free(r->prompts[i].ids);
    json_decref(r->chat);
    json_decref(r->body);
    xllm_api_kind kind = r->kind;
    memset(r, 0, sizeof(*r));
    r->kind = kind;
}
