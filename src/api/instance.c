/* The instance RPC that a cluster service (`xllm service`) speaks to an engine instance over
 * HTTP: POST /v1/instance/generate takes token ids and streams token events as JSON lines,
 * GET /v1/instance/load reports the engine's load (and, with ?kv_since=N, its prefix-cache
 * events), POST /v1/instance/role switches the role.
 * Every message starts with {"magic": "xllm-rpc", "version": 1} (docs/cluster.md). */
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <string.h>
#include <time.h>

#include "api/api-impl.h"
#include "util/common.h"

#define RPC_MAGIC      "xllm-rpc"
#define RPC_VERSION    1
#define KV_EVENTS_MAX  4096            /* prefix-cache events per load answer */
#define KV_HASH_SCHEME "xxh3-chain-v1" /* XLLM_KV_HASH_ROOT, xllm_kv_block_hash */

/* ---------------------------------------------------------------------------------------- */
/* Parsing                                                                                   */
/* ---------------------------------------------------------------------------------------- */

static bool rpc_header_ok(json_t *o) {
    const char *m = json_string_value(json_object_get(o, "magic"));
    json_t *v = json_object_get(o, "version");
    return m && !strcmp(m, RPC_MAGIC) && json_is_integer(v) && json_integer_value(v) == RPC_VERSION;
}

static bool get_int(json_t *o, const char *k, int64_t lo, int64_t hi, int64_t *out) {
    json_t *v = json_object_get(o, k);
    if (!v) return true;
    if (!json_is_integer(v)) return false;
    int64_t x = json_integer_value(v);
    if (x < lo || x > hi) return false;
    *out = x;
    return true;
}

static bool get_num(json_t *o, const char *k, float *out) {
    json_t *v = json_object_get(o, k);
    if (!v) return true;
    if (!json_is_number(v)) return false;
    *out = (float)json_number_value(v);
    return true;
}

/* Reads an RPC generate body into rp (prompt malloc'd into *ids). Returns false with a message. */
static bool parse_generate(json_t *o, int32_t n_vocab, xllm_request_params *rp, int32_t **ids,
                           char *pd_to, size_t pd_to_size, char *err, size_t err_size) {
    if (!json_is_object(o) || !rpc_header_ok(o)) {
        xllm_set_err(err, err_size, "not an xllm-rpc version %d message", RPC_VERSION);
        return false;
    }
    json_t *pr = json_object_get(o, "prompt");
    size_t n = json_array_size(pr);
    if (!json_is_array(pr) || n == 0 || n > (1u << 20)) {
        xllm_set_err(err, err_size, "prompt: a non-empty array of token ids is required");
        return false;
    }
    *ids = xllm_xmalloc(n * sizeof(int32_t));
    for (size_t i = 0; i < n; i++) {
        json_t *t = json_array_get(pr, i);
        if (!json_is_integer(t) || json_integer_value(t) < 0 || json_integer_value(t) >= n_vocab) {
            xllm_set_err(err, err_size, "prompt[%zu]: not a token id", i);
            return false;
        }
        (*ids)[i] = (int32_t)json_integer_value(t);
    }
    rp->prompt = *ids;
    rp->n_prompt = (int32_t)n;
    int64_t max_tokens = 0, prio = 0, top = -1, ttft = 0, tpot = 0,
            last_n = rp->sampling.penalty_last_n, top_k = rp->sampling.top_k;
    xllm_sampler_params *sp = &rp->sampling;
    bool ok = get_int(o, "max_tokens", 0, INT32_MAX, &max_tokens) &&
              get_int(o, "priority", INT32_MIN, INT32_MAX, &prio) &&
              get_int(o, "top_logprobs", -1, XLLM_MAX_TOP_LOGPROBS, &top) &&
              get_int(o, "ttft_slo_ms", 0, INT64_MAX, &ttft) &&
              get_int(o, "tpot_slo_ms", 0, INT64_MAX, &tpot) &&
              get_int(o, "penalty_last_n", -1, INT32_MAX, &last_n) &&
              get_int(o, "top_k", 0, INT32_MAX, &top_k) &&
              get_num(o, "temperature", &sp->temperature) && get_num(o, "top_p", &sp->top_p) &&
              get_num(o, "min_p", &sp->min_p) &&
              get_num(o, "repeat_penalty", &sp->repeat_penalty) &&
              get_num(o, "frequency_penalty", &sp->frequency_penalty) &&
              get_num(o, "presence_penalty", &sp->presence_penalty);
    if (!ok) {
        xllm_set_err(err, err_size, "a field has the wrong type or range");
        return false;
    }
    const char *seed = json_string_value(json_object_get(o, "seed"));
    if (seed) sp->seed = strtoull(seed, NULL, 10);
    rp->max_tokens = (int32_t)max_tokens;
    rp->priority = (int32_t)prio;
    rp->top_logprobs = (int32_t)top;
    rp->ttft_slo_ms = ttft;
    rp->tpot_slo_ms = tpot;
    sp->penalty_last_n = (int32_t)last_n;
    sp->top_k = (int32_t)top_k;
    rp->ignore_eos = json_is_true(json_object_get(o, "ignore_eos"));
    rp->offline = json_is_true(json_object_get(o, "offline"));
    /* PD: {"pd_export": {"id": "N", "to": "host:port"}} on the prefill leg,
     * {"pd_import": {"id": "N"}} on the decode leg (ids are decimal strings: 64 bits) */
    json_t *ex = json_object_get(o, "pd_export"), *im = json_object_get(o, "pd_import");
    if (ex) {
        const char *id = json_string_value(json_object_get(ex, "id"));
        const char *to = json_string_value(json_object_get(ex, "to"));
        if (!id || !to || !*to || strlen(to) >= pd_to_size ||
            !(rp->pd_export_id = strtoull(id, NULL, 10))) {
            xllm_set_err(err, err_size, "pd_export: needs a nonzero id and a receiver 'to'");
            return false;
        }
        snprintf(pd_to, pd_to_size, "%s", to);
        rp->pd_export_to = pd_to;
    }
    if (im) {
        const char *id = json_string_value(json_object_get(im, "id"));
        if (!id || !(rp->pd_import_id = strtoull(id, NULL, 10))) {
            xllm_set_err(err, err_size, "pd_import: needs a nonzero id");
            return false;
        }
    }
    return true;
}

/* ---------------------------------------------------------------------------------------- */
/* Streaming token events                                                                    */
/* ---------------------------------------------------------------------------------------- */

typedef struct rpc_job {
    xllm_api_server *s;
    char pd_to[128]; /* PD receiver address (copied out of the body) */
    xllm_request *req;
    int32_t *ids;
    xllm_api_waiter *w;
    int fd;
    xllm_api_buf out;
    size_t out_pos;
    bool ended;
} rpc_job;

static void rpc_job_free(rpc_job *j) {
    xllm_request_free(j->req); /* cancels it when the service went away */
    if (j->w) xllm_api_waiter_put(j->s, j->w);
    xllm_api_buf_free(&j->out);
    free(j->ids);
    atomic_fetch_sub(&j->s->in_flight, 1);
    free(j);
}

static void line(rpc_job *j, json_t *o) {
    char *t = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    xllm_api_buf_add(&j->out, t, strlen(t));
    xllm_api_buf_add(&j->out, "\n", 1);
    free(t);
}

static const char *finish_str(xllm_finish_reason f) {
    switch (f) {
        case XLLM_FINISH_STOP:
            return "stop";
        case XLLM_FINISH_LENGTH:
            return "length";
        case XLLM_FINISH_CANCEL:
            return "cancel";
        default:
            return "abort";
    }
}

/* Formats the events published so far into j->out. */
static void rpc_pump(rpc_job *j) {
    xllm_token_event ev;
    for (;;) {
        int rc = xllm_request_next(j->req, &ev, 0);
        if (rc == 0) return;
        if (rc < 0) {
            xllm_request_stats st;
            xllm_request_get_stats(j->req, &st);
            json_t *o = json_object();
            json_object_set_new(o, "finish",
                                json_string(finish_str(xllm_request_finish_reason(j->req))));
            json_object_set_new(o, "n_cached", json_integer(st.n_cached));
            json_object_set_new(o, "n_preempted", json_integer(st.n_preempted));
            json_object_set_new(o, "t_queue_ms", json_real(st.t_queue_ms));
            json_object_set_new(o, "t_first_ms", json_real(st.t_first_ms));
            line(j, o);
            j->ended = true;
            return;
        }
        json_t *o = json_object();
        json_object_set_new(o, "t", json_integer(ev.token));
        json_object_set_new(o, "lp", json_real(ev.logprob));
        if (ev.n_top > 0) {
            json_t *top = json_array();
            for (int32_t k = 0; k < ev.n_top; k++)
                json_array_append_new(
                    top, json_pack("[i,f]", ev.top_ids[k], (double)ev.top_logprobs[k]));
            json_object_set_new(o, "top", top);
        }
        line(j, o);
    }
}

static bool peer_gone(int fd) {
    if (fd < 0) return false;
    struct pollfd pfd = {.fd = fd, .events = POLLRDHUP};
    return poll(&pfd, 1, 0) > 0 && (pfd.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL));
}

static ssize_t rpc_read(void *cls, uint64_t pos, char *buf, size_t max) {
    rpc_job *j = cls;
    for (;;) {
        if (j->out_pos < j->out.len) {
            size_t n = XLLM_MIN(max, j->out.len - j->out_pos);
            memcpy(buf, j->out.p + j->out_pos, n);
            j->out_pos += n;
            return (ssize_t)n;
        }
        if (j->ended) return MHD_CONTENT_READER_END_OF_STREAM;
        j->out.len = j->out_pos = 0;
        uint64_t seen = xllm_api_waiter_seq(j->w);
        rpc_pump(j);
        if (j->out.len) continue;
        if (peer_gone(j->fd)) return MHD_CONTENT_READER_END_WITH_ERROR;
        xllm_api_waiter_wait(j->w, seen, 200);
    }
}

static void rpc_free_cb(void *cls) {
    rpc_job_free(cls);
}

enum MHD_Result xllm_api_handle_instance_generate(xllm_api_server *s, struct MHD_Connection *c,
                                                  const char *body, size_t len) {
    if (!s->engine) return xllm_api_send_error(s, c, 404, NULL, NULL, "not an engine instance");
    json_error_t jerr;
    json_t *o = json_loadb(body, len, 0, &jerr);
    rpc_job *j = xllm_xcalloc(1, sizeof(*j));
    j->s = s;
    j->fd = -1;
    atomic_fetch_add(&s->in_flight, 1);
    xllm_request_params rp = xllm_request_default_params();
    char err[512];
    bool ok = parse_generate(o, xllm_tokenizer_n_vocab(s->tok), &rp, &j->ids, j->pd_to,
                             sizeof(j->pd_to), err, sizeof(err));
    json_decref(o);
    if (!ok) {
        rpc_job_free(j);
        return xllm_api_send_error(s, c, 400, NULL, NULL, "%s", err);
    }
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD);
    if (ci) j->fd = ci->connect_fd;
    j->w = xllm_api_waiter_get(s);
    rp.notify = xllm_api_waiter_notify;
    rp.notify_user = j->w;
    pthread_rwlock_rdlock(&s->eng_lock);
    xllm_status st = atomic_load(&s->state) == XLLM_API_READY
                         ? xllm_engine_submit(s->engine, &rp, &j->req, err, sizeof(err))
                         : XLLM_ERR_IO;
    pthread_rwlock_unlock(&s->eng_lock);
    if (st != XLLM_OK) {
        rpc_job_free(j);
        if (st == XLLM_ERR_IO)
            return xllm_api_send_error(s, c, 503, NULL, "draining", "the instance is stopping");
        if (st == XLLM_ERR_BUSY)
            return xllm_api_send_error(s, c, 429, NULL, "queue_full", "%s", err);
        return xllm_api_send_error(s, c, st == XLLM_ERR_INVALID_ARG ? 400 : 500, NULL, NULL, "%s",
                                   err);
    }
    line(j, json_pack("{s:s,s:i}", "magic", RPC_MAGIC, "version", RPC_VERSION));
    struct MHD_Response *r =
        MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16384, rpc_read, j, rpc_free_cb);
    if (!r) {
        rpc_job_free(j);
        return MHD_NO;
    }
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, "application/x-ndjson");
    enum MHD_Result ret = MHD_queue_response(c, 200, r);
    MHD_destroy_response(r);
    xllm_api_count_code(s, 200);
    return ret;
}

/* ---------------------------------------------------------------------------------------- */
/* Load and role                                                                             */
/* ---------------------------------------------------------------------------------------- */

/* Parses ?kv_since=N (a decimal cursor). */
static bool parse_cursor(const char *t, uint64_t *out) {
    if (!t || *t < '0' || *t > '9' || strlen(t) > 20) return false;
    char *end;
    errno = 0;
    unsigned long long v = strtoull(t, &end, 10);
    if (errno || *end) return false;
    *out = v;
    return true;
}

/* The "kv" object of a load answer: the engine's prefix-cache events after cursor `since`, as
 * the net change per block (the two lists lose the order of events, so a block stored and then
 * evicted within one answer appears once, under its last event), or the whole set on a reset.
 * HTTP thread, holding eng_lock's read side. */
static json_t *kv_events_json(xllm_engine *e, uint64_t since) {
    xllm_kv_events ev;
    if (xllm_engine_kv_events(e, since, KV_EVENTS_MAX, &ev) != XLLM_OK) return NULL;
    xllm_kv_events_net(&ev);
    json_t *stored = json_array(), *evicted = json_array();
    for (int32_t i = 0; i < ev.n; i++) {
        const xllm_kv_event *x = &ev.ev[i];
        char hex[17];
        snprintf(hex, sizeof(hex), "%016" PRIx64, x->hash);
        json_array_append_new(x->kind == XLLM_KV_EVENT_STORED ? stored : evicted, json_string(hex));
    }
    json_t *o =
        json_pack("{s:i,s:s,s:I,s:b,s:b,s:o,s:o}", "block_tokens", xllm_engine_kv_block_tokens(e),
                  "hash", KV_HASH_SCHEME, "next", (json_int_t)ev.next, "reset", ev.reset, "more",
                  ev.more, "stored", stored, "evicted", evicted);
    xllm_kv_events_free(&ev);
    return o;
}

enum MHD_Result xllm_api_handle_instance_load(xllm_api_server *s, struct MHD_Connection *c) {
    if (!s->engine) return xllm_api_send_error(s, c, 404, NULL, NULL, "not an engine instance");
    const char *since_s = MHD_lookup_connection_value(c, MHD_GET_ARGUMENT_KIND, "kv_since");
    uint64_t since = 0;
    if (since_s && !parse_cursor(since_s, &since))
        return xllm_api_send_error(s, c, 400, "kv_since", NULL,
                                   "kv_since: a decimal cursor is expected (0 for the whole set)");
    json_t *o = json_pack("{s:s,s:i}", "magic", RPC_MAGIC, "version", RPC_VERSION);
    pthread_rwlock_rdlock(&s->eng_lock);
    if (s->engine && atomic_load(&s->state) != XLLM_API_STOPPING) {
        xllm_engine_stats st;
        xllm_engine_get_stats(s->engine, &st);
        json_object_set_new(o, "running", json_integer(st.running));
        json_object_set_new(o, "waiting", json_integer(st.waiting));
        json_object_set_new(o, "kv_usage", json_real(st.kv_usage));
        json_object_set_new(o, "requests_finished", json_integer((json_int_t)st.requests_finished));
        json_object_set_new(o, "prompt_tokens", json_integer((json_int_t)st.prompt_tokens));
        json_object_set_new(o, "generated_tokens", json_integer((json_int_t)st.generated_tokens));
        json_object_set_new(o, "steps", json_integer((json_int_t)st.steps));
        /* sums and counts, so that a reader can take recent means from two readings */
        json_object_set_new(o, "ttft_sum_s", json_real(st.ttft.sum));
        json_object_set_new(o, "ttft_n", json_integer((json_int_t)st.ttft.n));
        json_object_set_new(o, "tpot_sum_s", json_real(st.tpot.sum));
        json_object_set_new(o, "tpot_n", json_integer((json_int_t)st.tpot.n));
        json_object_set_new(o, "itl_sum_s", json_real(st.itl.sum));
        json_object_set_new(o, "itl_n", json_integer((json_int_t)st.itl.n));
        if (since_s) {
            json_t *kv = kv_events_json(s->engine, since);
            if (kv) json_object_set_new(o, "kv", kv);
        }
    }
    pthread_rwlock_unlock(&s->eng_lock);
    json_object_set_new(o, "in_flight", json_integer(atomic_load(&s->in_flight)));
    return xllm_api_send_json(s, c, 200, o);
}

enum MHD_Result xllm_api_handle_instance_role(xllm_api_server *s, struct MHD_Connection *c,
                                              const char *body, size_t len) {
    if (!s->p.on_role) return xllm_api_send_error(s, c, 404, NULL, NULL, "not a cluster instance");
    json_t *o = json_loadb(body, len, 0, NULL);
    const char *role = json_string_value(json_object_get(o, "role"));
    char err[256] = "";
    xllm_status st =
        role ? s->p.on_role(role, s->p.on_role_user, err, sizeof(err)) : XLLM_ERR_INVALID_ARG;
    if (st != XLLM_OK) {
        json_decref(o);
        return xllm_api_send_error(s, c, 400, "role", NULL, "%s",
                                   *err ? err : "{\"role\": \"mixed|prefill|decode\"} expected");
    }
    json_t *ans = json_pack("{s:s}", "role", role);
    json_decref(o);
    return xllm_api_send_json(s, c, 200, ans);
}
