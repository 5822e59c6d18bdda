/* The cluster service: a remote backend for the API layer (each request runs on a thread of its
 * own that routes it, speaks the instance RPC over libcurl and relays the token events; PD
 * requests drive a prefill and a decode instance at once), plus the process's registry session
 * (watch → router, master candidacy). Threads: HTTP connection threads submit and read; one
 * relay thread per request; the router's poller; the registry's threads. */
#include <stdatomic.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <curl/curl.h>
#include <jansson.h>

#include "api/api-impl.h"
#include "api/rpc.h"
#include "service/service.h"
#include "util/common.h"

struct xllm_service {
    xllm_service_params p;
    char id[128];
    xllm_api_server *api;
    xllm_router *router;
    xllm_registry *reg;
    xllm_pdctl *pdctl;  /* NULL unless dynamic PD */
    pthread_mutex_t mu; /* live relay threads */
    pthread_cond_t cv;
    int32_t live;
    atomic_bool stopping;
    atomic_uint_fast64_t next_id;
    atomic_uint_fast64_t retries, midstream_failures, requests;
    atomic_uint_fast64_t offline_waits; /* offline requests that waited for idle capacity */
    atomic_int offline_waiting;
    atomic_bool leader;
};

/* ---------------------------------------------------------------------------------------- */
/* A relayed request                                                                         */
/* ---------------------------------------------------------------------------------------- */

typedef struct rreq {
    xllm_service *svc;
    int32_t n_vocab; /* the model's: token ids in instance answers must be below it */
    pthread_mutex_t mu;
    xllm_token_event *ev; /* received, not yet read */
    int32_t n_ev, cap_ev, rd;
    bool ended;
    xllm_finish_reason finish;
    char error[480];
    atomic_bool cancel;
    int refs;
    void (*notify)(void *);
    void *notify_user;
    xllm_request_params rp; /* prompt points at ids */
    int32_t *ids;
    uint64_t xfer_id;
    int32_t n_gen;
    double t_submit, t_first, t_end;
} rreq;

static double mono_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void rreq_unref(rreq *q) {
    pthread_mutex_lock(&q->mu);
    bool last = --q->refs == 0;
    pthread_mutex_unlock(&q->mu);
    if (!last) return;
    pthread_mutex_destroy(&q->mu);
    free(q->ev);
    free(q->ids);
    free(q);
}

static void push_event(rreq *q, const xllm_token_event *ev) {
    pthread_mutex_lock(&q->mu);
    if (q->n_ev == q->cap_ev) {
        q->cap_ev = q->cap_ev ? 2 * q->cap_ev : 32;
        q->ev = xllm_xrealloc(q->ev, sizeof(*q->ev) * (size_t)q->cap_ev);
    }
    q->ev[q->n_ev++] = *ev;
    if (q->n_gen++ == 0) q->t_first = mono_s();
    pthread_mutex_unlock(&q->mu);
    if (q->notify) q->notify(q->notify_user);
}

static void end_req(rreq *q, xllm_finish_reason why, const char *error) {
    pthread_mutex_lock(&q->mu);
    q->ended = true;
    q->finish = why;
    q->t_end = mono_s();
    if (error) snprintf(q->error, sizeof(q->error), "%s", error);
    pthread_mutex_unlock(&q->mu);
    if (q->notify) q->notify(q->notify_user);
}

/* One HTTP exchange of the instance RPC: the body, the reader of the answer, what came back. */
typedef struct leg {
    rreq *q;
    CURL *c;
    struct curl_slist *hdr;
    char *body;
    bool relay;           /* its token events go to the client */
    xllm_rpc_reader rd;   /* the answer's lines (header, tokens, finish) */
    char bad[256];        /* why the answer broke the RPC (the transfer was stopped there) */
    xllm_api_buf errbody; /* a non-200 answer */
    bool done;
    CURLcode cc;
    long code;
} leg;

static xllm_status leg_token(void *user, const xllm_token_event *ev, char *err, size_t err_size) {
    leg *l = user;
    if (l->relay) push_event(l->q, ev);
    return XLLM_OK;
}

static size_t leg_write(char *p, size_t sz, size_t n, void *u) {
    leg *l = u;
    size_t len = sz * n;
    long code = 0;
    curl_easy_getinfo(l->c, CURLINFO_RESPONSE_CODE, &code);
    if (code != 200) {
        if (l->errbody.len < 4096) xllm_api_buf_add(&l->errbody, p, len);
        return len;
    }
    /* a line that is not the RPC fails the exchange: returning less stops the transfer */
    if (xllm_rpc_reader_feed(&l->rd, p, len, l->bad, sizeof(l->bad)) != XLLM_OK) return 0;
    return len;
}

/* Takes body (malloc'd). */
static void leg_init(leg *l, rreq *q, const char *addr, char *body, bool relay) {
    memset(l, 0, sizeof(*l));
    l->q = q;
    l->relay = relay;
    l->body = body;
    l->rd.n_vocab = q->n_vocab;
    l->rd.on_token = leg_token;
    l->rd.user = l;
    char url[200];
    snprintf(url, sizeof(url), "http://%s/v1/instance/generate", addr);
    l->c = curl_easy_init();
    l->hdr = curl_slist_append(NULL, "Content-Type: application/json");
    curl_easy_setopt(l->c, CURLOPT_URL, url);
    curl_easy_setopt(l->c, CURLOPT_HTTPHEADER, l->hdr);
    curl_easy_setopt(l->c, CURLOPT_POSTFIELDS, l->body);
    curl_easy_setopt(l->c, CURLOPT_WRITEFUNCTION, leg_write);
    curl_easy_setopt(l->c, CURLOPT_WRITEDATA, l);
    curl_easy_setopt(l->c, CURLOPT_PRIVATE, l);
    curl_easy_setopt(l->c, CURLOPT_CONNECTTIMEOUT_MS, 2000L);
    curl_easy_setopt(l->c, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(l->c, CURLOPT_TCP_KEEPALIVE, 1L);
}

static void leg_clear(leg *l) {
    curl_easy_cleanup(l->c);
    curl_slist_free_all(l->hdr);
    free(l->body);
    xllm_rpc_reader_free(&l->rd);
    xllm_api_buf_free(&l->errbody);
}

/* Why a leg did not finish, in words (into msg). Returns true when the instance itself broke
 * (connection refused or cut), false when it answered with an error. */
static bool leg_failure(const leg *l, char *msg, size_t n) {
    if (l->bad[0]) {
        snprintf(msg, n, "a bad instance RPC answer: %s", l->bad);
        return true;
    }
    if (l->cc != CURLE_OK) {
        snprintf(msg, n, "%s", curl_easy_strerror(l->cc));
        return true;
    }
    if (l->code != 200) {
        json_t *o = json_loadb(l->errbody.p ? l->errbody.p : "", l->errbody.len, 0, NULL);
        const char *m = json_string_value(json_object_get(json_object_get(o, "error"), "message"));
        snprintf(msg, n, "HTTP %ld: %s", l->code, m ? m : "(no message)");
        json_decref(o);
        return false;
    }
    if (xllm_rpc_reader_end(&l->rd, msg, n) != XLLM_OK) return true;
    snprintf(msg, n, "the request ended with '%s'", xllm_rpc_finish_name(l->rd.last.finish));
    return false;
}

/* The request as leg bodies: one, or for a PD route the prefill leg's (into *pre) and the
 * decode leg's. False with a message when the request cannot be encoded. */
static bool leg_bodies(const rreq *q, const xllm_route *rt, char **run, char **pre, char *why,
                       size_t n) {
    xllm_request_params rp = q->rp, pp = q->rp;
    if (rt->pd) {
        pp.max_tokens = 1;
        pp.pd_export_id = q->xfer_id;
        pp.pd_export_to = rt->run.kv_addr;
        rp.pd_import_id = q->xfer_id;
    }
    *pre = NULL;
    *run = xllm_rpc_generate_encode(&rp, NULL, why, n);
    if (*run && rt->pd) *pre = xllm_rpc_generate_encode(&pp, NULL, why, n);
    if (*run && (!rt->pd || *pre)) return true;
    free(*run);
    return false;
}

typedef enum { ATT_DONE, ATT_CANCELLED, ATT_FAILED } attempt_result;

/* Runs one try of the request on a route. On failure names the instance to blame (or "" when
 * it answered an error such as 429) and says why. */
static attempt_result attempt(rreq *q, const xllm_route *rt, char *blame, char *why, size_t n) {
    leg run, pre;
    char *b, *bp;
    blame[0] = why[0] = 0;
    if (!leg_bodies(q, rt, &b, &bp, why, n)) return ATT_FAILED;
    if (rt->pd) leg_init(&pre, q, rt->prefill.addr, bp, false);
    leg_init(&run, q, rt->run.addr, b, true);
    CURLM *m = curl_multi_init();
    curl_multi_add_handle(m, run.c);
    if (rt->pd) curl_multi_add_handle(m, pre.c);
    int n_legs = rt->pd ? 2 : 1, n_done = 0;
    attempt_result res = ATT_FAILED;
    bool first_seen = false;
    for (;;) {
        int running = 0;
        curl_multi_perform(m, &running);
        CURLMsg *msg;
        int left;
        while ((msg = curl_multi_info_read(m, &left))) {
            if (msg->msg != CURLMSG_DONE) continue;
            leg *l = NULL;
            curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&l);
            l->done = true;
            l->cc = msg->data.result;
            curl_easy_getinfo(l->c, CURLINFO_RESPONSE_CODE, &l->code);
            n_done++;
        }
        if (!first_seen && run.rd.n_tokens > 0) {
            first_seen = true;
            xllm_router_first_token(q->svc->router, rt, (mono_s() - q->t_submit) * 1e3);
        }
        if (run.done) {
            if (run.rd.finished && run.code == 200 && !run.bad[0]) {
                res = ATT_DONE;
                break;
            }
            bool broke = leg_failure(&run, why, n);
            snprintf(blame, 64, "%s", broke ? rt->run.name : "");
            break;
        }
        if (rt->pd && pre.done && run.rd.n_tokens == 0 &&
            !(pre.rd.finished && pre.code == 200 && !pre.bad[0] &&
              pre.rd.last.finish != XLLM_FINISH_ABORT)) {
            /* the prefill side failed before the decode side produced anything */
            char w[160];
            bool broke = leg_failure(&pre, w, sizeof(w));
            snprintf(why, n, "prefill instance %s: %s", rt->prefill.name, w);
            snprintf(blame, 64, "%s", broke ? rt->prefill.name : "");
            break;
        }
        if (atomic_load(&q->cancel) || atomic_load(&q->svc->stopping)) {
            res = ATT_CANCELLED;
            break;
        }
        if (n_done == n_legs) break;
        curl_multi_poll(m, NULL, 0, 50, NULL);
    }
    /* removing a handle closes its connection: the instance cancels the request and frees its
     * KV (and, for PD, the staged transfer) */
    curl_multi_remove_handle(m, run.c);
    if (rt->pd) curl_multi_remove_handle(m, pre.c);
    curl_multi_cleanup(m);
    if (res == ATT_DONE) {
        xllm_finish_reason f = run.rd.last.finish;
        if (f == XLLM_FINISH_ABORT) {
            snprintf(why, n, "instance %s aborted the request", rt->run.name);
            res = ATT_FAILED;
        } else {
            end_req(q, f, NULL);
        }
    }
    leg_clear(&run);
    if (rt->pd) leg_clear(&pre);
    return res;
}

static void *relay_main(void *arg) {
    rreq *q = arg;
    xllm_service *svc = q->svc;
    const int32_t max_att = svc->p.max_attempts > 0 ? svc->p.max_attempts : 3;
    char avoid[8][64];
    int32_t n_avoid = 0;
    char why[320] = "", blame[64];
    bool ended = false;
    const xllm_route_req rq = {.prompt = q->rp.prompt,
                               .n_prompt = q->rp.n_prompt,
                               .offline = q->rp.offline,
                               .ttft_slo_ms = q->rp.ttft_slo_ms,
                               .tpot_slo_ms = q->rp.tpot_slo_ms};
    for (int32_t a = 0; a < max_att && !ended; a++) {
        xllm_route rt;
        char err[256];
        xllm_status ps = xllm_router_pick(svc->router, &rq, avoid, n_avoid, &rt, err, sizeof(err));
        if (ps == XLLM_ERR_BUSY) { /* offline: wait for idle capacity */
            atomic_fetch_add(&svc->offline_waits, 1);
            atomic_fetch_add(&svc->offline_waiting, 1);
            while (ps == XLLM_ERR_BUSY && !atomic_load(&q->cancel) &&
                   !atomic_load(&svc->stopping)) {
                usleep(10000);
                ps = xllm_router_pick(svc->router, &rq, avoid, n_avoid, &rt, err, sizeof(err));
            }
            atomic_fetch_sub(&svc->offline_waiting, 1);
            if (ps == XLLM_ERR_BUSY) {
                bool stopping = atomic_load(&svc->stopping);
                end_req(q, stopping ? XLLM_FINISH_ABORT : XLLM_FINISH_CANCEL,
                        stopping ? "the service is stopping" : NULL);
                ended = true;
                break;
            }
        }
        if (ps != XLLM_OK) {
            if (!why[0]) snprintf(why, sizeof(why), "%s", err);
            break;
        }
        if (a > 0) atomic_fetch_add(&svc->retries, 1);
        int32_t before = q->n_gen;
        attempt_result res = attempt(q, &rt, blame, why, sizeof(why));
        double tpot = 0;
        pthread_mutex_lock(&q->mu);
        int32_t n_gen = q->n_gen;
        if (n_gen > 1) tpot = (mono_s() - q->t_first) * 1e3 / (n_gen - 1);
        pthread_mutex_unlock(&q->mu);
        xllm_router_done(svc->router, &rt, n_gen, tpot,
                         res == ATT_FAILED && blame[0] ? blame : NULL);
        if (res == ATT_DONE) {
            ended = true;
        } else if (res == ATT_CANCELLED) {
            end_req(q, atomic_load(&svc->stopping) ? XLLM_FINISH_ABORT : XLLM_FINISH_CANCEL,
                    atomic_load(&svc->stopping) ? "the service is stopping" : NULL);
            ended = true;
        } else if (n_gen > before || n_gen > 0) {
            /* tokens already reached the client: a retry would repeat them */
            char msg[480];
            snprintf(msg, sizeof(msg), "instance %s failed mid-stream: %s", rt.run.name, why);
            atomic_fetch_add(&svc->midstream_failures, 1);
            end_req(q, XLLM_FINISH_ABORT, msg);
            ended = true;
        } else {
            const char *who = blame[0] ? blame : rt.run.name;
            if (n_avoid < 8) snprintf(avoid[n_avoid++], 64, "%s", who);
            if (rt.pd && n_avoid < 8 && !blame[0])
                snprintf(avoid[n_avoid++], 64, "%s", rt.prefill.name);
        }
    }
    if (!ended) {
        char msg[480];
        snprintf(msg, sizeof(msg), "the request failed on every instance tried: %s", why);
        end_req(q, XLLM_FINISH_ABORT, msg);
    }
    rreq_unref(q);
    pthread_mutex_lock(&svc->mu);
    svc->live--;
    pthread_cond_broadcast(&svc->cv);
    pthread_mutex_unlock(&svc->mu);
    return NULL;
}

/* ---------------------------------------------------------------------------------------- */
/* The backend interface                                                                     */
/* ---------------------------------------------------------------------------------------- */

static xllm_status rb_submit(void *ctx, const xllm_request_params *p, void **out, char *err,
                             size_t err_size) {
    xllm_service *svc = ctx;
    *out = NULL;
    if (xllm_router_n_routable(svc->router) == 0) {
        xllm_set_err(err, err_size, "no engine instance is available");
        return XLLM_ERR_IO;
    }
    /* what the instance RPC cannot carry fails here, once, rather than on every instance */
    char *body = xllm_rpc_generate_encode(p, NULL, err, err_size);
    if (!body) return XLLM_ERR_INVALID_ARG;
    free(body);
    rreq *q = xllm_xcalloc(1, sizeof(*q));
    q->svc = svc;
    q->n_vocab = xllm_model_n_vocab(svc->api->model); /* submit runs under the server's lock */
    pthread_mutex_init(&q->mu, NULL);
    q->refs = 2;
    q->rp = *p;
    q->ids = xllm_xmalloc(sizeof(int32_t) * (size_t)p->n_prompt);
    memcpy(q->ids, p->prompt, sizeof(int32_t) * (size_t)p->n_prompt);
    q->rp.prompt = q->ids;
    q->notify = p->notify;
    q->notify_user = p->notify_user;
    q->t_submit = mono_s();
    uint64_t x = ((uint64_t)getpid() << 40) ^ ((uint64_t)time(NULL) << 20) ^
                 atomic_fetch_add(&svc->next_id, 1);
    q->xfer_id = x ? x : 1;
    atomic_fetch_add(&svc->requests, 1);
    pthread_mutex_lock(&svc->mu);
    svc->live++;
    pthread_mutex_unlock(&svc->mu);
    pthread_attr_t at;
    pthread_attr_init(&at);
    pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
    pthread_t th;
    if (pthread_create(&th, &at, relay_main, q) != 0) XLLM_ASSERT(!"pthread_create");
    pthread_attr_destroy(&at);
    *out = q;
    return XLLM_OK;
}

static int rb_next(void *r, xllm_token_event *ev, int timeout_ms) {
    rreq *q = r;
    double until = mono_s() + (timeout_ms < 0 ? 1e9 : timeout_ms * 1e-3);
    for (;;) {
        pthread_mutex_lock(&q->mu);
        if (q->rd < q->n_ev) {
            *ev = q->ev[q->rd++];
            pthread_mutex_unlock(&q->mu);
            return 1;
        }
        bool ended = q->ended;
        pthread_mutex_unlock(&q->mu);
        if (ended) return -1;
        if (mono_s() >= until) return 0;
        usleep(2000);
    }
}

static xllm_finish_reason rb_finish(void *r) {
    rreq *q = r;
    pthread_mutex_lock(&q->mu);
    xllm_finish_reason f = q->ended ? q->finish : XLLM_FINISH_NONE;
    pthread_mutex_unlock(&q->mu);
    return f;
}

static const char *rb_error(void *r) {
    rreq *q = r;
    pthread_mutex_lock(&q->mu);
    const char *e = q->ended && q->error[0] ? q->error : NULL;
    pthread_mutex_unlock(&q->mu);
    return e; /* stable once ended */
}

static void rb_cancel(void *r) {
    atomic_store(&((rreq *)r)->cancel, true);
}

static void rb_release(void *r) {
    rb_cancel(r);
    rreq_unref(r);
}

static void rb_stats(void *r, xllm_request_stats *st) {
    rreq *q = r;
    memset(st, 0, sizeof(*st));
    pthread_mutex_lock(&q->mu);
    st->n_prompt = q->rp.n_prompt;
    st->n_generated = q->n_gen;
    if (q->n_gen) st->t_first_ms = (q->t_first - q->t_submit) * 1e3;
    if (q->ended) st->t_total_ms = (q->t_end - q->t_submit) * 1e3;
    pthread_mutex_unlock(&q->mu);
}

static void rb_metrics(void *ctx, xllm_api_buf *b) {
    xllm_service *svc = ctx;
    xllm_router_metrics(svc->router, b);
    xllm_api_buf_printf(
        b,
        "# HELP xllm_service_is_master 1 while this service holds the master key.\n"
        "# TYPE xllm_service_is_master gauge\nxllm_service_is_master %d\n"
        "# TYPE xllm_service_requests_total counter\nxllm_service_requests_total %llu\n"
        "# HELP xllm_service_retries_total Tries on another instance after a failure before "
        "any token.\n# TYPE xllm_service_retries_total counter\nxllm_service_retries_total %llu\n"
        "# HELP xllm_service_midstream_failures_total Streams ended by an error event.\n"
        "# TYPE xllm_service_midstream_failures_total counter\n"
        "xllm_service_midstream_failures_total %llu\n"
        "# HELP xllm_service_offline_waits_total Offline requests that waited for an instance "
        "idle of online work.\n# TYPE xllm_service_offline_waits_total counter\n"
        "xllm_service_offline_waits_total %llu\n"
        "# TYPE xllm_service_offline_waiting gauge\nxllm_service_offline_waiting %d\n",
        xllm_service_is_leader(svc), (unsigned long long)atomic_load(&svc->requests),
        (unsigned long long)atomic_load(&svc->retries),
        (unsigned long long)atomic_load(&svc->midstream_failures),
        (unsigned long long)atomic_load(&svc->offline_waits), atomic_load(&svc->offline_waiting));
    if (svc->pdctl) xllm_pdctl_metrics(svc->pdctl, b);
}

static char *rb_describe(void *ctx) {
    xllm_service *svc = ctx;
    char *inst = xllm_router_describe(svc->router);
    size_t n = strlen(inst) + strlen(svc->id) + 128;
    char *t = xllm_xmalloc(n);
    snprintf(t, n,
             "{\"service\":\"%s\",\"master\":%s,\"policy\":\"%s\",\"dynamic_pd\":%s,"
             "\"instances\":%s}",
             svc->id, xllm_service_is_leader(svc) ? "true" : "false",
             xllm_policy_name(svc->p.router.policy), svc->pdctl ? "true" : "false", inst);
    free(inst);
    return t;
}

static const xllm_api_backend_i k_remote_backend = {
    .version = XLLM_API_BACKEND_VERSION,
    .submit = rb_submit,
    .next = rb_next,
    .finish_reason = rb_finish,
    .error = rb_error,
    .cancel = rb_cancel,
    .release = rb_release,
    .get_stats = rb_stats,
    .metrics = rb_metrics,
    .describe = rb_describe,
};

/* ---------------------------------------------------------------------------------------- */
/* Lifecycle                                                                                 */
/* ---------------------------------------------------------------------------------------- */

xllm_service_params xllm_service_default_params(void) {
    xllm_service_params p = {0};
    p.api = xllm_api_default_params();
    p.router = xllm_router_default_params();
    return p;
}

static void on_leader(bool leader, void *user) {
    xllm_service *s = user;
    atomic_store(&s->leader, leader);
    fprintf(stderr, "xllm service: %s master\n", leader ? "became" : "is no longer");
}

bool xllm_service_is_leader(xllm_service *s) {
    return s->reg && xllm_registry_is_leader(s->reg);
}

static bool leader_cb(void *user) {
    return xllm_service_is_leader(user);
}

xllm_status xllm_service_start(const xllm_service_params *p, xllm_service **out, char *err,
                               size_t err_size) {
    *out = NULL;
    curl_global_init(CURL_GLOBAL_DEFAULT);
    xllm_service *s = xllm_xcalloc(1, sizeof(*s));
    s->p = *p;
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    xllm_status st = xllm_api_server_start(&p->api, &s->api, err, err_size);
    if (st != XLLM_OK) {
        xllm_service_free(s);
        return st;
    }
    s->router = xllm_router_new(&p->router);
    xllm_registry_params rp = xllm_registry_default_params();
    if (p->etcd) {
        st = xllm_registry_etcd_store(p->etcd, 0, &rp.store, err, err_size);
        if (st != XLLM_OK) {
            xllm_service_free(s);
            return st;
        }
    } else {
        rp.store = p->store;
    }
    if (p->cluster) rp.cluster = p->cluster;
    if (p->ttl_ms) rp.ttl_ms = p->ttl_ms;
    rp.on_event = xllm_router_on_event;
    rp.on_event_user = s->router;
    rp.on_leader = on_leader;
    rp.on_leader_user = s;
    st = xllm_registry_new(&rp, &s->reg, err, err_size);
    if (st != XLLM_OK) {
        xllm_service_free(s);
        return st;
    }
    if (p->id)
        snprintf(s->id, sizeof(s->id), "%s", p->id);
    else
        snprintf(s->id, sizeof(s->id), "service-%d-%d", (int)getpid(),
                 (int)xllm_api_server_port(s->api));
    bool elected = false;
    st = xllm_registry_campaign(s->reg, s->id, &elected, err, err_size);
    if (st != XLLM_OK) {
        xllm_service_free(s);
        return st;
    }
    if (p->dynamic_pd) s->pdctl = xllm_pdctl_new(&p->pdctl, s->router, leader_cb, s);
    /* last: publishing the backend lets HTTP threads call it, and everything above (registry,
     * id, controller) is visible to them through the server's lock */
    st = xllm_api_server_load_remote(s->api, &k_remote_backend, s, p->api.engine.n_ctx, err,
                                     err_size);
    if (st != XLLM_OK) {
        xllm_service_free(s);
        return st;
    }
    *out = s;
    return XLLM_OK;
}

int32_t xllm_service_port(const xllm_service *s) {
    return xllm_api_server_port(s->api);
}

int32_t xllm_service_drain(xllm_service *s, int32_t timeout_ms) {
    return xllm_api_server_drain(s->api, timeout_ms);
}

void xllm_service_free(xllm_service *s) {
    if (!s) return;
    /* relay threads end their streams (abort), so connection threads return */
    atomic_store(&s->stopping, true);
    pthread_mutex_lock(&s->mu);
    while (s->live > 0) pthread_cond_wait(&s->cv, &s->mu);
    pthread_mutex_unlock(&s->mu);
    xllm_api_server_free(s->api);
    xllm_pdctl_free(s->pdctl);
    xllm_registry_free(s->reg); /* stops the watch before the router goes */
    xllm_router_free(s->router);
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->cv);
    free(s);
}
