/* The HTTP server: libmicrohttpd with a thread per connection (streams block in their own
 * thread while the engine thread runs), routing, auth, body limits, the small endpoints
 * (health, models, tokenize, detokenize, Prometheus metrics), and the server's lifecycle. */
#include <netdb.h>
#include <stdarg.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "api/api-impl.h"
#include "util/common.h"

/* ---------------------------------------------------------------------------------------- */
/* Responses                                                                                 */
/* ---------------------------------------------------------------------------------------- */

static const unsigned k_codes[XLLM_API_N_CODES] = {200, 400, 401, 404, 405, 413, 429, 500, 503, 0};

static int code_slot(unsigned code) {
    for (int i = 0; i < XLLM_API_N_CODES - 1; i++)
        if (k_codes[i] == code) return i;
    return XLLM_API_N_CODES - 1; /* other */
}

void xllm_api_count_code(xllm_api_server *s, unsigned code) {
    atomic_fetch_add(&s->http_codes[code_slot(code)], 1);
}

static enum MHD_Result send_bytes(xllm_api_server *s, struct MHD_Connection *c, unsigned code,
                                  const char *ctype, char *body, size_t len) {
    struct MHD_Response *r = MHD_create_response_from_buffer(len, body, MHD_RESPMEM_MUST_FREE);
    if (!r) {
        free(body);
        return MHD_NO;
    }
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, ctype);
    if (code == 405) MHD_add_response_header(r, MHD_HTTP_HEADER_ALLOW, "GET, POST");
    enum MHD_Result ret = MHD_queue_response(c, code, r);
    MHD_destroy_response(r);
    xllm_api_count_code(s, code);
    return ret;
}

enum MHD_Result xllm_api_send_json(xllm_api_server *s, struct MHD_Connection *c, unsigned code,
                                   json_t *o) {
    char *text = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    if (!text) return MHD_NO;
    size_t n = strlen(text);
    /* a trailing newline is friendlier to curl users */
    char *body = xllm_xrealloc(text, n + 2);
    body[n] = '\n';
    body[n + 1] = 0;
    return send_bytes(s, c, code, "application/json", body, n + 1);
}

static const char *error_type(unsigned code) {
    switch (code) {
        case 400:
            return "invalid_request_error";
        case 401:
            return "authentication_error";
        case 404:
            return "not_found_error";
        case 405:
            return "invalid_request_error";
        case 413:
            return "invalid_request_error";
        case 429:
            return "rate_limit_error";
        case 503:
            return "service_unavailable_error";
        default:
            return "server_error";
    }
}

enum MHD_Result xllm_api_send_error(xllm_api_server *s, struct MHD_Connection *c, unsigned code,
                                    const char *param, const char *ecode, const char *fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    json_t *e = json_object();
    json_object_set_new(e, "message", xllm_api_json_str(msg, strlen(msg)));
    json_object_set_new(e, "type", json_string(error_type(code)));
    json_object_set_new(e, "param", param ? json_string(param) : json_null());
    json_object_set_new(e, "code", ecode ? json_string(ecode) : json_null());
    json_t *o = json_object();
    json_object_set_new(o, "error", e);
    if (s->p.log_requests) fprintf(stderr, "xllm serve: %u %s\n", code, msg);
    return xllm_api_send_json(s, c, code, o);
}

json_t *xllm_api_json_str(const char *p, size_t n) {
    json_t *j = json_stringn(p, n);
    if (j) return j;
    xllm_api_buf b = {0};
    xllm_api_utf8_repair(p, n, true, &b);
    j = json_stringn(b.p ? b.p : "", b.len);
    xllm_api_buf_free(&b);
    return j;
}

/* ---------------------------------------------------------------------------------------- */
/* Waiters                                                                                   */
/* ---------------------------------------------------------------------------------------- */

xllm_api_waiter *xllm_api_waiter_get(xllm_api_server *s) {
    pthread_mutex_lock(&s->mu);
    xllm_api_waiter *w = s->free_waiters;
    if (w) {
        s->free_waiters = w->next;
    } else {
        w = xllm_xcalloc(1, sizeof(*w));
        pthread_mutex_init(&w->mu, NULL);
        pthread_cond_init(&w->cv, NULL);
        if (s->n_waiters == s->waiters_cap) {
            s->waiters_cap = s->waiters_cap ? 2 * s->waiters_cap : 64;
            s->waiters = xllm_xrealloc(s->waiters, (size_t)s->waiters_cap * sizeof(*s->waiters));
        }
        s->waiters[s->n_waiters++] = w;
    }
    w->next = NULL;
    pthread_mutex_unlock(&s->mu);
    return w;
}

void xllm_api_waiter_put(xllm_api_server *s, xllm_api_waiter *w) {
    pthread_mutex_lock(&s->mu);
    w->next = s->free_waiters;
    s->free_waiters = w;
    pthread_mutex_unlock(&s->mu);
}

/* ---------------------------------------------------------------------------------------- */
/* The local engine as a backend                                                            */
/* ---------------------------------------------------------------------------------------- */

static xllm_status eng_submit(void *ctx, const xllm_request_params *p, void **out, char *err,
                              size_t err_size) {
    xllm_request *r = NULL;
    xllm_status st = xllm_engine_submit(ctx, p, &r, err, err_size);
    *out = r;
    return st;
}
static int eng_next(void *r, xllm_token_event *ev, int timeout_ms) {
    return xllm_request_next(r, ev, timeout_ms);
}
static xllm_finish_reason eng_finish(void *r) {
    return xllm_request_finish_reason(r);
}
static void eng_cancel(void *r) {
    xllm_request_cancel(r);
}
static void eng_release(void *r) {
    xllm_request_free(r);
}
static void eng_stats(void *r, xllm_request_stats *st) {
    xllm_request_get_stats(r, st);
}

const xllm_api_backend_i xllm_api_engine_backend = {
    .version = XLLM_API_BACKEND_VERSION,
    .submit = eng_submit,
    .next = eng_next,
    .finish_reason = eng_finish,
    .error = NULL,
    .cancel = eng_cancel,
    .release = eng_release,
    .get_stats = eng_stats,
    .metrics = NULL,
};

void xllm_api_waiter_notify(void *p) {
    xllm_api_waiter *w = p;
    pthread_mutex_lock(&w->mu);
    w->seq++;
    pthread_cond_signal(&w->cv);
    pthread_mutex_unlock(&w->mu);
}

/* ---------------------------------------------------------------------------------------- */
/* Tokenizing and chat rendering                                                             */
/* ---------------------------------------------------------------------------------------- */

int32_t xllm_api_tokenize(const xllm_tokenizer *tok, const char *text, size_t len, bool add_special,
                          int32_t **out) {
    *out = NULL;
    int32_t n = xllm_tokenize(tok, text, len, NULL, 0, add_special, true);
    if (n == INT32_MIN) return -1;
    if (n < 0) n = -n;
    int32_t *ids = xllm_xmalloc(sizeof(int32_t) * (size_t)(n + 1));
    int32_t k = xllm_tokenize(tok, text, len, ids, n + 1, add_special, true);
    if (k < 0) {
        free(ids);
        return -1;
    }
    *out = ids;
    return k;
}

char *xllm_api_render_chat(xllm_api_server *s, json_t *chat, size_t *len, char *err,
                           size_t err_size) {
    char *in = json_dumps(chat, JSON_COMPACT);
    if (!in) {
        xllm_set_err(err, err_size, "cannot serialize the messages");
        return NULL;
    }
    char *out = NULL;
    xllm_status st = xllm_chat_template_render(s->tmpl, in, strlen(in), s->bos_text, s->eos_text,
                                               &out, len, err, err_size);
    free(in);
    return st == XLLM_OK ? out : NULL;
}

/* ---------------------------------------------------------------------------------------- */
/* Small endpoints                                                                           */
/* ---------------------------------------------------------------------------------------- */

static enum MHD_Result handle_models(xllm_api_server *s, struct MHD_Connection *c) {
    json_t *m = json_object();
    json_object_set_new(m, "id", json_string(s->served_name));
    json_object_set_new(m, "object", json_string("model"));
    json_object_set_new(m, "created", json_integer(s->created));
    json_object_set_new(m, "owned_by", json_string("xllm"));
    json_object_set_new(m, "max_model_len", json_integer(s->n_ctx));
    json_t *o = json_object();
    json_object_set_new(o, "object", json_string("list"));
    json_t *data = json_array();
    json_array_append_new(data, m);
    json_object_set_new(o, "data", data);
    return xllm_api_send_json(s, c, 200, o);
}

/* POST /tokenize: {"prompt": text, "add_special_tokens": true} or a chat body {"messages": ...};
 * answers {"tokens", "count", "max_model_len"} (+ "token_strs" when return_token_strs). */
static enum MHD_Result handle_tokenize(xllm_api_server *s, struct MHD_Connection *c,
                                       const char *body, size_t len) {
    json_error_t je;
    json_t *o = json_loadb(body, len, 0, &je);
    if (!json_is_object(o)) {
        json_decref(o);
        return xllm_api_send_error(s, c, 400, NULL, NULL, "the body must be a JSON object");
    }
    json_t *add = json_object_get(o, "add_special_tokens");
    json_t *strs = json_object_get(o, "return_token_strs");
    json_t *prompt = json_object_get(o, "prompt");
    bool add_special = json_is_boolean(add) ? json_is_true(add) : true;
    char *rendered = NULL;
    const char *text = NULL;
    size_t tlen = 0;
    enum MHD_Result ret;
    if (json_is_string(prompt)) {
        text = json_string_value(prompt);
        tlen = json_string_length(prompt);
    } else if (json_object_get(o, "messages")) {
        xllm_api_request rq;
        const char *param;
        char err[512];
        size_t blen = 0;
        if (!s->tmpl) {
            ret = xllm_api_send_error(s, c, 400, "messages", NULL,
                                      "the model has no chat template (start the server with "
                                      "--chat-template FILE)");
            goto done;
        }
        if (xllm_api_request_parse(body, len, XLLM_API_CHAT, &rq, &param, err, sizeof(err))) {
            ret = xllm_api_send_error(s, c, 400, param, NULL, "%s", err);
            goto done;
        }
        rendered = xllm_api_render_chat(s, rq.chat, &blen, err, sizeof(err));
        xllm_api_request_clear(&rq);
        if (!rendered) {
            ret = xllm_api_send_error(s, c, 400, "messages", NULL, "chat template: %s", err);
            goto done;
        }
        text = rendered;
        tlen = blen;
        if (!json_is_boolean(add)) add_special = false;
    } else {
        ret = xllm_api_send_error(s, c, 400, "prompt", NULL,
                                  "'prompt' (a string) or 'messages' is required");
        goto done;
    }
    int32_t *ids = NULL;
    int32_t n = xllm_api_tokenize(s->tok, text, tlen, add_special, &ids);
    if (n < 0) {
        ret = xllm_api_send_error(s, c, 400, "prompt", NULL, "cannot tokenize the prompt");
        goto done;
    }
    json_t *r = json_object(), *arr = json_array(), *sarr = json_array();
    xllm_api_buf piece = {0};
    for (int32_t i = 0; i < n; i++) {
        json_array_append_new(arr, json_integer(ids[i]));
        if (json_is_true(strs)) {
            xllm_api_token_text(s->tok, ids[i], &piece, NULL);
            json_array_append_new(sarr, xllm_api_json_str(piece.p, piece.len));
        }
    }
    xllm_api_buf_free(&piece);
    free(ids);
    json_object_set_new(r, "tokens", arr);
    if (json_is_true(strs))
        json_object_set_new(r, "token_strs", sarr);
    else
        json_decref(sarr);
    json_object_set_new(r, "count", json_integer(n));
    json_object_set_new(r, "max_model_len", json_integer(s->n_ctx));
    ret = xllm_api_send_json(s, c, 200, r);
done:
    free(rendered);
    json_decref(o);
    return ret;
}

/* POST /detokenize: {"tokens": [ids]} -> {"prompt": text}. */
static enum MHD_Result handle_detokenize(xllm_api_server *s, struct MHD_Connection *c,
                                         const char *body, size_t len) {
    json_error_t je;
    json_t *o = json_loadb(body, len, 0, &je);
    json_t *t = json_object_get(o, "tokens");
    if (!json_is_array(t)) {
        json_decref(o);
        return xllm_api_send_error(s, c, 400, "tokens", NULL,
                                   "'tokens' (an array of ids) is "
                                   "required");
    }
    const int32_t n_vocab = xllm_tokenizer_n_vocab(s->tok);
    xllm_api_detok d;
    /* SentencePiece: the text starts here, so the first piece's space prefix is not part of it */
    xllm_api_detok_init(&d, s->tok, xllm_tokenizer_add_space_prefix(s->tok), NULL, NULL, 0);
    size_t i;
    json_t *v;
    json_array_foreach(t, i, v) {
        if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) >= n_vocab) {
            xllm_api_detok_free(&d);
            json_decref(o);
            return xllm_api_send_error(s, c, 400, "tokens", NULL,
                                       "tokens[%zu] is not a token id (0..%d)", i, n_vocab - 1);
        }
        xllm_api_detok_push(&d, (int32_t)json_integer_value(v));
    }
    xllm_api_detok_finish(&d);
    json_t *r = json_object();
    json_object_set_new(r, "prompt", xllm_api_json_str(d.text.p, d.text.len));
    xllm_api_detok_free(&d);
    json_decref(o);
    return xllm_api_send_json(s, c, 200, r);
}

static void metric(xllm_api_buf *b, const char *name, const char *type, const char *help,
                   double v) {
    xllm_api_buf_printf(b, "# HELP %s %s\n# TYPE %s %s\n%s %.17g\n", name, help, name, type, name,
                        v);
}

static void metric_hist(xllm_api_buf *b, const char *name, const char *help,
                        const xllm_histogram *h) {
    xllm_api_buf_printf(b, "# HELP %s %s\n# TYPE %s histogram\n", name, help, name);
    uint64_t cum = 0;
    for (int i = 0; i < XLLM_HIST_BUCKETS; i++) {
        cum += h->counts[i];
        xllm_api_buf_printf(b, "%s_bucket{le=\"%g\"} %llu\n", name, h->bounds[i],
                            (unsigned long long)cum);
    }
    cum += h->counts[XLLM_HIST_BUCKETS];
    xllm_api_buf_printf(b, "%s_bucket{le=\"+Inf\"} %llu\n%s_sum %.17g\n%s_count %llu\n", name,
                        (unsigned long long)cum, name, h->sum, name, (unsigned long long)h->n);
}

/* GET /metrics: Prometheus text exposition format 0.0.4. */
static enum MHD_Result handle_metrics(xllm_api_server *s, struct MHD_Connection *c) {
    xllm_api_buf b = {0};
    xllm_api_buf_add(&b, "", 0);
    pthread_rwlock_rdlock(&s->eng_lock);
    int state = atomic_load(&s->state);
    if (s->engine && state != XLLM_API_STOPPING) {
        xllm_engine_stats st;
        xllm_engine_get_stats(s->engine, &st);
        metric(&b, "xllm_requests_running", "gauge", "Requests holding a sequence slot.",
               st.running);
        metric(&b, "xllm_requests_waiting", "gauge", "Requests queued for a slot.", st.waiting);
        metric(&b, "xllm_kv_usage_ratio", "gauge", "KV pages in use by sequences / all pages.",
               st.kv_usage);
        metric(&b, "xllm_kv_pages_total", "gauge", "KV pages in the pool.", (double)st.kv.n_pages);
        metric(&b, "xllm_kv_pages_used", "gauge", "KV pages mapped by at least one sequence.",
               (double)st.kv.used_pages);
        metric(&b, "xllm_kv_pages_cached", "gauge", "Idle KV pages holding a prefix-cache block.",
               (double)st.kv.cached_pages);
        metric(&b, "xllm_kv_pages_free", "gauge", "KV pages never used or released.",
               (double)st.kv.free_pages);
        metric(&b, "xllm_prefix_cache_hit_tokens_total", "counter",
               "Prompt positions served from the prefix cache.", (double)st.kv.prefix_hit_tokens);
        metric(&b, "xllm_prefix_cache_query_tokens_total", "counter",
               "Prompt positions looked up in the prefix cache.",
               (double)st.kv.prefix_query_tokens);
        metric(&b, "xllm_prompt_tokens_total", "counter", "Prompt tokens of admitted requests.",
               (double)st.prompt_tokens);
        metric(&b, "xllm_prompt_tokens_cached_total", "counter",
               "Prompt tokens served from the prefix cache at first admission.",
               (double)st.cached_tokens);
        metric(&b, "xllm_generation_tokens_total", "counter", "Generated tokens.",
               (double)st.generated_tokens);
        metric(&b, "xllm_requests_finished_total", "counter",
               "Requests ended (any reason) by the engine.", (double)st.requests_finished);
        metric(&b, "xllm_preemptions_total", "counter",
               "Running requests preempted (KV freed, recomputed later).", (double)st.preemptions);
        metric(&b, "xllm_engine_steps_total", "counter", "Engine steps (forward passes).",
               (double)st.steps);
        metric(&b, "xllm_kv_exports_total", "counter",
               "PD: prompts whose KV was sent to a decode instance.", (double)st.kv_exports);
        metric(&b, "xllm_kv_export_aborts_total", "counter",
               "PD: KV transfers started and then aborted (failure or cancellation mid-prefill).",
               (double)st.kv_export_aborts);
        metric(&b, "xllm_kv_imports_total", "counter",
               "PD: requests started from received KV instead of computing the prompt.",
               (double)st.kv_imports);
        metric(&b, "xllm_kv_import_tokens_total", "counter",
               "PD: prompt positions received instead of computed.", (double)st.kv_import_tokens);
        metric_hist(&b, "xllm_time_to_first_token_seconds", "Time to first token.", &st.ttft);
        metric_hist(&b, "xllm_time_per_output_token_seconds",
                    "Time per output token after the "
                    "first.",
                    &st.tpot);
        metric_hist(&b, "xllm_inter_token_latency_seconds",
                    "Time between consecutive tokens of a request, as emitted.", &st.itl);
        metric_hist(&b, "xllm_e2e_request_latency_seconds",
                    "Submit to end of completed "
                    "requests.",
                    &st.e2e);
    }
    if (s->be && s->be->metrics && state != XLLM_API_STOPPING) s->be->metrics(s->be_ctx, &b);
    pthread_rwlock_unlock(&s->eng_lock);
    metric(&b, "xllm_server_ready", "gauge", "1 when the model is loaded and requests are taken.",
           state == XLLM_API_READY);
    metric(&b, "xllm_http_inflight_generations", "gauge", "Generation requests being served.",
           atomic_load(&s->in_flight));
    metric(&b, "xllm_client_disconnects_total", "counter",
           "Requests cancelled because the client went away.",
           (double)atomic_load(&s->disconnects));
    metric(&b, "xllm_stop_string_hits_total", "counter", "Requests ended by a stop string.",
           (double)atomic_load(&s->stop_hits));
    metric(&b, "xllm_http_detokenize_seconds_total", "counter",
           "Time HTTP threads spent detokenizing and formatting streams (off the engine).",
           (double)atomic_load(&s->detok_ns) * 1e-9);
    xllm_api_buf_printf(&b, "# HELP xllm_http_responses_total HTTP responses by status code.\n"
                            "# TYPE xllm_http_responses_total counter\n");
    for (int i = 0; i < XLLM_API_N_CODES; i++) {
        uint64_t v = atomic_load(&s->http_codes[i]);
        if (k_codes[i])
            xllm_api_buf_printf(&b, "xllm_http_responses_total{code=\"%u\"} %llu\n", k_codes[i],
                                (unsigned long long)v);
        else
            xllm_api_buf_printf(&b, "xllm_http_responses_total{code=\"other\"} %llu\n",
                                (unsigned long long)v);
    }
    return send_bytes(s, c, 200, "text/plain; version=0.0.4; charset=utf-8", b.p, b.len);
}

/* ---------------------------------------------------------------------------------------- */
/* Routing                                                                                   */
/* ---------------------------------------------------------------------------------------- */

typedef enum route {
    R_NONE = 0,
    R_HEALTH,
    R_METRICS,
    R_MODELS,
    R_COMPLETIONS,
    R_CHAT,
    R_TOKENIZE,
    R_DETOKENIZE,
    R_INST_GENERATE,
    R_INST_LOAD,
    R_INST_ROLE,
    R_CLUSTER,
} route;

static const struct {
    const char *path;
    route r;
    bool post;
    bool auth;
} k_routes[] = {
    {"/health", R_HEALTH, false, false},
    {"/metrics", R_METRICS, false, false},
    {"/v1/models", R_MODELS, false, true},
    {"/v1/completions", R_COMPLETIONS, true, true},
    {"/v1/chat/completions", R_CHAT, true, true},
    {"/tokenize", R_TOKENIZE, true, true},
    {"/detokenize", R_DETOKENIZE, true, true},
    {"/v1/instance/generate", R_INST_GENERATE, true, true},
    {"/v1/instance/load", R_INST_LOAD, false, true},
    {"/v1/instance/role", R_INST_ROLE, true, true},
    {"/v1/cluster", R_CLUSTER, false, true},
};

/* Per-request state of a connection (MHD's con_cls). */
typedef struct conn_req {
    route r;
    bool responded; /* an early answer (413 and the like) was queued */
    bool too_large;
    xllm_api_buf body;
} conn_req;

static bool auth_ok(xllm_api_server *s, struct MHD_Connection *c) {
    if (!s->api_key) return true;
    const char *h = MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_AUTHORIZATION);
    if (!h || strncmp(h, "Bearer ", 7)) return false;
    h += 7;
    size_t a = strlen(h), b = strlen(s->api_key);
    /* constant time in the key's length */
    unsigned diff = (unsigned)(a != b);
    for (size_t i = 0; i < b; i++)
        diff |=
            (unsigned)(unsigned char)s->api_key[i] ^ (unsigned)(unsigned char)(i < a ? h[i] : 0);
    return diff == 0;
}

/* Checks that need only the request line and headers. Returns true when it queued an answer. */
static bool early_checks(xllm_api_server *s, struct MHD_Connection *c, const char *url,
                         const char *method, conn_req *q, enum MHD_Result *ret) {
    size_t i, n = sizeof(k_routes) / sizeof(k_routes[0]);
    for (i = 0; i < n; i++)
        if (!strcmp(url, k_routes[i].path)) break;
    if (i == n) {
        *ret = xllm_api_send_error(s, c, 404, NULL, NULL, "no such endpoint: %s %s", method, url);
        return true;
    }
    bool is_post = !strcmp(method, "POST"), is_get = !strcmp(method, "GET");
    if (k_routes[i].post ? !is_post : !(is_get || !strcmp(method, "HEAD"))) {
        *ret = xllm_api_send_error(s, c, 405, NULL, NULL, "%s takes %s, not %s", url,
                                   k_routes[i].post ? "POST" : "GET", method);
        return true;
    }
    q->r = k_routes[i].r;
    if (k_routes[i].auth && !auth_ok(s, c)) {
        *ret = xllm_api_send_error(s, c, 401, NULL, "invalid_api_key",
                                   "a valid API key is required (Authorization: Bearer KEY)");
        return true;
    }
    int state = atomic_load(&s->state);
    if (q->r != R_HEALTH && q->r != R_METRICS && state != XLLM_API_READY) {
        *ret = xllm_api_send_error(
            s, c, 503, NULL, state == XLLM_API_LOADING ? "loading" : "draining",
            state == XLLM_API_LOADING ? "the model is loading" : "the server is shutting down");
        return true;
    }
    const char *cl =
        MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
    if (cl && strtoull(cl, NULL, 10) > s->p.max_body) {
        *ret = xllm_api_send_error(s, c, 413, NULL, "request_too_large",
                                   "the body has %s bytes; the limit is %zu (--max-body)", cl,
                                   s->p.max_body);
        return true;
    }
    return false;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *c, const char *url,
                                  const char *method, const char *version, const char *upload_data,
                                  size_t *upload_data_size, void **con_cls) {
    xllm_api_server *s = cls;
    conn_req *q = *con_cls;
    if (!q) {
        q = xllm_xcalloc(1, sizeof(*q));
        *con_cls = q;
        enum MHD_Result ret = MHD_YES;
        if (early_checks(s, c, url, method, q, &ret)) q->responded = true;
        return ret;
    }
    if (q->responded) {
        *upload_data_size = 0; /* discard the rest of the body */
        return MHD_YES;
    }
    if (*upload_data_size) {
        if (q->body.len + *upload_data_size > s->p.max_body) q->too_large = true;
        if (!q->too_large) xllm_api_buf_add(&q->body, upload_data, *upload_data_size);
        *upload_data_size = 0;
        return MHD_YES;
    }
    q->responded = true;
    if (q->too_large)
        return xllm_api_send_error(s, c, 413, NULL, "request_too_large",
                                   "the body is larger than %zu bytes (--max-body)", s->p.max_body);
    const char *body = q->body.p ? q->body.p : "";
    size_t len = q->body.len;
    switch (q->r) {
        case R_HEALTH: {
            int st = atomic_load(&s->state);
            json_t *o = json_object();
            json_object_set_new(o, "status",
                                json_string(st == XLLM_API_READY     ? "ok"
                                            : st == XLLM_API_LOADING ? "loading"
                                                                     : "draining"));
            return xllm_api_send_json(s, c, st == XLLM_API_READY ? 200 : 503, o);
        }
        case R_METRICS:
            return handle_metrics(s, c);
        case R_MODELS:
            return handle_models(s, c);
        case R_TOKENIZE:
            return handle_tokenize(s, c, body, len);
        case R_DETOKENIZE:
            return handle_detokenize(s, c, body, len);
        case R_COMPLETIONS:
            return xllm_api_handle_generate(s, c, XLLM_API_COMPLETION, body, len);
        case R_CHAT:
            return xllm_api_handle_generate(s, c, XLLM_API_CHAT, body, len);
        case R_INST_GENERATE:
            return xllm_api_handle_instance_generate(s, c, body, len);
        case R_INST_LOAD:
            return xllm_api_handle_instance_load(s, c);
        case R_INST_ROLE:
            return xllm_api_handle_instance_role(s, c, body, len);
        case R_CLUSTER: {
            pthread_rwlock_rdlock(&s->eng_lock); /* the backend is published under it */
            char *t = s->be && s->be->describe ? s->be->describe(s->be_ctx) : NULL;
            pthread_rwlock_unlock(&s->eng_lock);
            if (!t) return xllm_api_send_error(s, c, 404, NULL, NULL, "not a cluster service");
            return send_bytes(s, c, 200, "application/json", t, strlen(t));
        }
        default:
            return MHD_NO;
    }
}

static void on_completed(void *cls, struct MHD_Connection *c, void **con_cls,
                         enum MHD_RequestTerminationCode toe) {
    conn_req *q = *con_cls;
    if (!q) return;
    xllm_api_buf_free(&q->body);
    free(q);
    *con_cls = NULL;
}

static void on_mhd_log(void *cls, const char *fmt, va_list ap) {
    xllm_api_server *s = cls;
    if (!s->p.log_requests) return;
    fprintf(stderr, "xllm serve: microhttpd: ");
    vfprintf(stderr, fmt, ap);
}

/* ---------------------------------------------------------------------------------------- */
/* Lifecycle                                                                                 */
/* ---------------------------------------------------------------------------------------- */

xllm_api_params xllm_api_default_params(void) {
    xllm_api_params p = {0};
    p.engine = xllm_engine_default_params();
    return p;
}

static char *dup_or_null(const char *s) {
    return s ? xllm_xstrdup(s) : NULL;
}

xllm_status xllm_api_server_start(const xllm_api_params *params, xllm_api_server **out, char *err,
                                  size_t err_size) {
    *out = NULL;
    if (!params || !params->model_path) {
        xllm_set_err(err, err_size, "a model path is required");
        return XLLM_ERR_INVALID_ARG;
    }
    if (params->port < 0 || params->port > 65535) {
        xllm_set_err(err, err_size, "bad port %d", params->port);
        return XLLM_ERR_INVALID_ARG;
    }
    xllm_api_server *s = xllm_xcalloc(1, sizeof(*s));
    s->p = *params;
    s->host = xllm_xstrdup(params->host ? params->host : "127.0.0.1");
    s->api_key = params->api_key && *params->api_key ? xllm_xstrdup(params->api_key) : NULL;
    s->model_path = xllm_xstrdup(params->model_path);
    s->low_memory = params->low_memory;
    s->template_file = dup_or_null(params->chat_template_file);
    if (params->served_model_name) {
        s->served_name = xllm_xstrdup(params->served_model_name);
    } else {
        const char *base = strrchr(s->model_path, '/');
        s->served_name = xllm_xstrdup(base ? base + 1 : s->model_path);
        size_t n = strlen(s->served_name);
        if (n > 5 && !strcmp(s->served_name + n - 5, ".gguf")) s->served_name[n - 5] = 0;
    }
    if (!s->p.max_body) s->p.max_body = 4u << 20;
    if (!s->p.max_connections) s->p.max_connections = 1024;
    if (!s->p.max_choices) s->p.max_choices = 16;
    s->created = (int64_t)time(NULL);
    pthread_rwlock_init(&s->eng_lock, NULL);
    pthread_mutex_init(&s->mu, NULL);
    atomic_init(&s->state, XLLM_API_LOADING);

    struct addrinfo hints = {0}, *ai = NULL;
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    char port[16];
    snprintf(port, sizeof(port), "%d", params->port);
    int gai = getaddrinfo(s->host, port, &hints, &ai);
    if (gai != 0 || !ai) {
        xllm_set_err(err, err_size, "cannot resolve host '%s': %s", s->host, gai_strerror(gai));
        xllm_api_server_free(s);
        return XLLM_ERR_INVALID_ARG;
    }
    unsigned flags = MHD_USE_THREAD_PER_CONNECTION | MHD_USE_INTERNAL_POLLING_THREAD |
                     MHD_USE_AUTO | MHD_USE_ERROR_LOG;
    if (ai->ai_family == AF_INET6) flags |= MHD_USE_IPv6;
    s->mhd = MHD_start_daemon(flags, (uint16_t)params->port, NULL, NULL, on_request, s,
                              MHD_OPTION_EXTERNAL_LOGGER, on_mhd_log, s, MHD_OPTION_SOCK_ADDR,
                              ai->ai_addr, MHD_OPTION_NOTIFY_COMPLETED, on_completed, s,
                              MHD_OPTION_CONNECTION_LIMIT, (unsigned)s->p.max_connections,
                              MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)300,
                              MHD_OPTION_LISTENING_ADDRESS_REUSE, (unsigned)1, MHD_OPTION_END);
    freeaddrinfo(ai);
    if (!s->mhd) {
        xllm_set_err(err, err_size, "cannot listen on %s:%d (in use?)", s->host, params->port);
        xllm_api_server_free(s);
        return XLLM_ERR_IO;
    }
    const union MHD_DaemonInfo *di = MHD_get_daemon_info(s->mhd, MHD_DAEMON_INFO_BIND_PORT);
    s->port = di ? di->port : params->port;
    *out = s;
    return XLLM_OK;
}

int xllm_api_server_kv_port(const xllm_api_server *s) {
    return s->engine ? xllm_engine_kv_port(s->engine) : 0;
}

int32_t xllm_api_server_kv_block_tokens(const xllm_api_server *s) {
    return s->engine ? xllm_engine_kv_block_tokens(s->engine) : 0;
}

int32_t xllm_api_server_port(const xllm_api_server *s) {
    return s->port;
}

static char *token_text(const xllm_tokenizer *tok, int32_t id) {
    if (id < 0) return NULL;
    int32_t k = xllm_token_to_piece(tok, id, NULL, 0, true);
    if (k == INT32_MIN) return NULL;
    if (k < 0) k = -k;
    char *t = xllm_xmalloc((size_t)k + 1);
    int32_t w = xllm_token_to_piece(tok, id, t, k + 1, true);
    t[w > 0 ? w : 0] = 0;
    return t;
}

static char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    xllm_api_buf b = {0};
    char tmp[65536];
    size_t k;
    while ((k = fread(tmp, 1, sizeof(tmp), f)) > 0) xllm_api_buf_add(&b, tmp, k);
    bool bad = ferror(f);
    fclose(f);
    if (bad) {
        xllm_api_buf_free(&b);
        return NULL;
    }
    if (!b.p) xllm_api_buf_add(&b, "", 0);
    *len = b.len;
    return b.p;
}

/* Loads the model, its tokenizer and chat template (not yet published). */
static xllm_status load_model(xllm_api_server *s, xllm_model **out_model,
                              xllm_chat_template **out_tmpl, char *err, size_t err_size) {
    xllm_model_params mp = xllm_model_default_params();
    mp.no_mmap = mp.low_memory = s->low_memory;
    xllm_model *model = NULL;
    xllm_status st = xllm_model_load(s->model_path, &mp, &model, err, err_size);
    if (st != XLLM_OK) return st;
    xllm_chat_template *tmpl = NULL;
    char *src = NULL;
    size_t src_len = 0;
    if (s->template_file) {
        src = read_file(s->template_file, &src_len);
        if (!src) {
            xllm_set_err(err, err_size, "cannot read the chat template %s", s->template_file);
            xllm_model_free(model);
            return XLLM_ERR_IO;
        }
    } else if (xllm_model_chat_template(model)) {
        src = xllm_xstrdup(xllm_model_chat_template(model));
        src_len = strlen(src);
    }
    if (src) {
        char terr[512];
        st = xllm_chat_template_new(src, src_len, NULL, &tmpl, terr, sizeof(terr));
        free(src);
        if (st != XLLM_OK) {
            xllm_set_err(err, err_size, "chat template: %s", terr);
            xllm_model_free(model);
            return st;
        }
    }
    *out_model = model;
    *out_tmpl = tmpl;
    return XLLM_OK;
}

const xllm_model *xllm_api_server_model(const xllm_api_server *s) {
    return s->model;
}

static void publish(xllm_api_server *s, xllm_model *model, xllm_chat_template *tmpl) {
    const xllm_tokenizer *tok = xllm_model_tokenizer(model);
    s->model = model;
    s->tok = tok;
    s->tmpl = tmpl;
    s->bos_text = token_text(tok, xllm_token_bos(tok));
    s->eos_text = token_text(tok, xllm_token_eos(tok));
}

xllm_status xllm_api_server_load_remote(xllm_api_server *s, const xllm_api_backend_i *be,
                                        void *be_ctx, int32_t n_ctx, char *err, size_t err_size) {
    xllm_model *model = NULL;
    xllm_chat_template *tmpl = NULL;
    xllm_status st = load_model(s, &model, &tmpl, err, err_size);
    if (st != XLLM_OK) return st;
    pthread_rwlock_wrlock(&s->eng_lock);
    publish(s, model, tmpl);
    s->be = be;
    s->be_ctx = be_ctx;
    s->n_ctx = n_ctx > 0 ? n_ctx : XLLM_MIN(xllm_model_n_ctx_train(model), 4096);
    if (atomic_load(&s->state) == XLLM_API_LOADING) atomic_store(&s->state, XLLM_API_READY);
    pthread_rwlock_unlock(&s->eng_lock);
    return XLLM_OK;
}

xllm_status xllm_api_server_load(xllm_api_server *s, char *err, size_t err_size) {
    xllm_model *model = NULL;
    xllm_chat_template *tmpl = NULL;
    xllm_status st = load_model(s, &model, &tmpl, err, err_size);
    if (st != XLLM_OK) return st;
    xllm_engine *engine = NULL;
    st = xllm_engine_new(model, &s->p.engine, &engine, err, err_size);
    if (st != XLLM_OK) {
        xllm_chat_template_free(tmpl);
        xllm_model_free(model);
        return st;
    }
    pthread_rwlock_wrlock(&s->eng_lock);
    publish(s, model, tmpl);
    s->engine = engine;
    s->be = &xllm_api_engine_backend;
    s->be_ctx = engine;
    s->n_ctx = xllm_engine_n_ctx(engine);
    if (atomic_load(&s->state) == XLLM_API_LOADING) atomic_store(&s->state, XLLM_API_READY);
    pthread_rwlock_unlock(&s->eng_lock);
    return XLLM_OK;
}

int32_t xllm_api_server_drain(xllm_api_server *s, int32_t timeout_ms) {
    pthread_rwlock_wrlock(&s->eng_lock);
    if (atomic_load(&s->state) != XLLM_API_STOPPING) atomic_store(&s->state, XLLM_API_DRAINING);
    pthread_rwlock_unlock(&s->eng_lock);
    for (int32_t waited = 0; timeout_ms < 0 || waited < timeout_ms; waited += 20) {
        if (atomic_load(&s->in_flight) == 0) break;
        usleep(20000);
    }
    return atomic_load(&s->in_flight);
}

void xllm_api_server_free(xllm_api_server *s) {
    if (!s) return;
    pthread_rwlock_wrlock(&s->eng_lock);
    atomic_store(&s->state, XLLM_API_STOPPING);
    pthread_rwlock_unlock(&s->eng_lock);
    /* ending the engine ends every stream (finish "abort"), so connection threads return */
    xllm_engine_free(s->engine);
    if (s->mhd) MHD_stop_daemon(s->mhd);
    for (int32_t i = 0; i < s->n_waiters; i++) {
        pthread_mutex_destroy(&s->waiters[i]->mu);
        pthread_cond_destroy(&s->waiters[i]->cv);
        free(s->waiters[i]);
    }
    free(s->waiters);
    xllm_chat_template_free(s->tmpl);
    xllm_model_free(s->model);
    free(s->bos_text);
    free(s->eos_text);
    free(s->host);
    free(s->api_key);
    free(s->model_path);
    free(s->served_name);
    free(s->template_file);
    pthread_rwlock_destroy(&s->eng_lock);
    pthread_mutex_destroy(&s->mu);
    free(s);
}
