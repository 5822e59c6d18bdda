/* The instance RPC that a cluster service (`xllm service`) speaks to an engine instance over
 * HTTP: POST /v1/instance/generate takes token ids and streams token events as JSON lines,
 * GET /v1/instance/load reports the engine's load (and, with ?kv_since=N, its prefix-cache
 * events), POST /v1/instance/role switches the role.
 * Every message starts with {"magic": "xllm-rpc", "version": 1} (docs/cluster.md). */
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <poll.h>
#include <string.h>
#include <time.h>

#include "api/api-impl.h"
#include "api/rpc.h"
#include "util/common.h"

#define KV_EVENTS_MAX  4096            /* prefix-cache events per load answer */
#define KV_HASH_SCHEME "xxh3-chain-v1" /* XLLM_KV_HASH_ROOT, xllm_kv_block_hash */

/* ---------------------------------------------------------------------------------------- */
/* Streaming token events                                                                    */
/* ---------------------------------------------------------------------------------------- */

typedef struct rpc_job {
    xllm_api_server *s;
    xllm_rpc_request in; /* the parsed body (prompt, PD receiver address) */
    xllm_request *req;
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
    xllm_rpc_request_clear(&j->in);
    atomic_fetch_sub(&j->s->in_flight, 1);
    free(j);
}

/* Appends one line; false when the line cannot be encoded (the stream then ends with an error,
 * which the service reads as a broken instance). */
static bool line(rpc_job *j, const xllm_rpc_line *l) {
    char err[256];
    size_t n;
    char *t = xllm_rpc_line_encode(l, &n, err, sizeof(err));
    if (!t) {
        fprintf(stderr, "xllm engine: instance RPC: %s\n", err);
        return false;
    }
    xllm_api_buf_add(&j->out, t, n);
    free(t);
    return true;
}

static double ms_or_0(double x) {
    return isfinite(x) && x > 0 ? x : 0;
}

/* Formats the events published so far into j->out. False when a line could not be encoded. */
static bool rpc_pump(rpc_job *j) {
    xllm_rpc_line l = {.kind = XLLM_RPC_LINE_TOKEN};
    for (;;) {
        int rc = xllm_request_next(j->req, &l.ev, 0);
        if (rc == 0) return true;
        if (rc > 0) {
            if (!line(j, &l)) return false;
            continue;
        }
        xllm_request_stats st;
        xllm_request_get_stats(j->req, &st);
        xllm_finish_reason f = xllm_request_finish_reason(j->req);
        xllm_rpc_line fin = {
            .kind = XLLM_RPC_LINE_FINISH,
            .finish = f >= XLLM_FINISH_STOP && f <= XLLM_FINISH_CANCEL ? f : XLLM_FINISH_ABORT,
            .n_cached = XLLM_MAX(st.n_cached, 0),
            .n_preempted = XLLM_MAX(st.n_preempted, 0),
            .t_queue_ms = ms_or_0(st.t_queue_ms),
            .t_first_ms = ms_or_0(st.t_first_ms),
        };
        j->ended = true;
        return line(j, &fin);
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
        if (!rpc_pump(j)) return MHD_CONTENT_READER_END_WITH_ERROR;
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
    rpc_job *j = xllm_xcalloc(1, sizeof(*j));
    j->s = s;
    j->fd = -1;
    atomic_fetch_add(&s->in_flight, 1);
    char err[512];
    const char *field = NULL;
    if (xllm_rpc_generate_parse(body, len, xllm_tokenizer_n_vocab(s->tok), &j->in, &field, err,
                                sizeof(err)) != XLLM_OK) {
        rpc_job_free(j);
        return xllm_api_send_error(s, c, 400, field, NULL, "%s", err);
    }
    xllm_request_params rp = j->in.rp;
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
    const xllm_rpc_line header = {.kind = XLLM_RPC_LINE_HEADER};
    line(j, &header);
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
    json_t *o = json_pack("{s:s,s:i}", "magic", XLLM_RPC_MAGIC, "version", XLLM_RPC_VERSION);
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
