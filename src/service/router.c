/* The global scheduler's routing state: live instances from the registry watch, their load from
 * a poller thread (GET /v1/instance/load every poll_ms), a service-side prefix index per
 * instance, online fits of TTFT / TPOT per instance, and the four policies. One mutex guards
 * everything; callers are the registry watch thread, the poller and the request threads. */
#include <math.h>
#include <pthread.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <curl/curl.h>
#include <jansson.h>

#include "api/api-impl.h"
#include "service/router.h"
#include "util/common.h"

/* ---------------------------------------------------------------------------------------- */
/* Instances                                                                                 */
/* ---------------------------------------------------------------------------------------- */

#define PREFIX_CAP                                                                                 \
    8192 /* block hashes remembered per instance (open addressing, cleared when full) */

/* An online least-squares fit y = a + b x with exponential forgetting. */
typedef struct linfit {
    double n, sx, sy, sxx, sxy;
} linfit;

static void fit_add(linfit *f, double x, double y) {
    const double decay = 0.97;
    f->n = f->n * decay + 1;
    f->sx = f->sx * decay + x;
    f->sy = f->sy * decay + y;
    f->sxx = f->sxx * decay + x * x;
    f->sxy = f->sxy * decay + x * y;
}

/* Predicts y at x; prior (a0, b0) until there are enough points. */
static double fit_predict(const linfit *f, double x, double a0, double b0) {
    if (f->n < 1) return a0 + b0 * x;
    double mx = f->sx / f->n, my = f->sy / f->n;
    double var = f->sxx / f->n - mx * mx;
    double b = var > 1e-9 && f->n >= 3 ? (f->sxy / f->n - mx * my) / var : b0;
    if (b < 0) b = 0;
    double a = my - b * mx;
    if (a < 0) a = 0;
    return a + b * x;
}

typedef struct inst {
    char name[64];
    uint64_t incarnation;
    xllm_role role;
    char addr[128];
    char kv_addr[128];
    bool down; /* a connection to it failed; cleared by a successful load poll */
    /* load: polled, plus what this service has in flight there (in_flight_off of them
     * offline) */
    int32_t waiting, running, in_flight, in_flight_off;
    int64_t queued_prompt; /* prompt tokens sent and not yet answered with a first token */
    double kv_usage;
    uint64_t routed, failures;
    /* prefix index: block hashes of prompts routed here */
    uint64_t *blocks;
    int32_t n_blocks;
    /* SLO model: ttft_ms ~ a + b * (prompt + queued prompt tokens); tpot_ms ~ c + d * batch */
    linfit ttft_fit, tpot_fit;
    double ttft_ewma, tpot_ewma;
    /* the engine's cumulative TTFT / inter-token sums at the last poll, and what they grew by
     * since the PD controller's last window */
    double eng_ttft_sum, eng_itl_sum;
    int64_t eng_ttft_n, eng_itl_n;
    bool eng_seen;
    double win_ttft_sum, win_itl_sum;
    int64_t win_ttft_n, win_itl_n;
} inst;

struct xllm_router {
    xllm_router_params p;
    pthread_mutex_t mu;
    inst **in;
    int32_t n, cap;
    uint64_t rr;
    uint64_t picks[2]; /* mixed, pd */
    uint64_t no_route;
    pthread_t poller;
    pthread_mutex_t stop_mu;
    pthread_cond_t stop_cv;
    bool stop;
};

const char *xllm_policy_name(xllm_policy p) {
    switch (p) {
        case XLLM_POLICY_ROUND_ROBIN:
            return "round-robin";
        case XLLM_POLICY_LEAST_LOAD:
            return "least-load";
        case XLLM_POLICY_PREFIX:
            return "prefix";
        case XLLM_POLICY_SLO:
            return "slo";
    }
    return NULL;
}

xllm_status xllm_policy_parse(const char *s, xllm_policy *out) {
    for (int i = 0; i <= XLLM_POLICY_SLO; i++)
        if (!strcmp(s, xllm_policy_name((xllm_policy)i))) {
            *out = (xllm_policy)i;
            return XLLM_OK;
        }
    return XLLM_ERR_INVALID_ARG;
}

xllm_router_params xllm_router_default_params(void) {
    xllm_router_params p = {0};
    p.pd = true;
    return p;
}

static double mono_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int32_t find(xllm_router *r, const char *name) {
    for (int32_t i = 0; i < r->n; i++)
        if (!strcmp(r->in[i]->name, name)) return i;
    return -1;
}

static void inst_free(inst *x) {
    if (!x) return;
    free(x->blocks);
    free(x);
}

static void set_from(inst *x, const xllm_instance *src) {
    snprintf(x->name, sizeof(x->name), "%s", src->name);
    x->incarnation = src->incarnation;
    x->role = src->role;
    snprintf(x->addr, sizeof(x->addr), "%s", src->addr);
    x->kv_addr[0] = 0;
    json_t *a = json_loads(src->attrs ? src->attrs : "{}", 0, NULL);
    const char *kv = json_string_value(json_object_get(a, "kv_addr"));
    if (kv) snprintf(x->kv_addr, sizeof(x->kv_addr), "%s", kv);
    json_decref(a);
}

void xllm_router_on_event(const xllm_registry_event *ev, void *user) {
    xllm_router *r = user;
    pthread_mutex_lock(&r->mu);
    int32_t i = find(r, ev->inst->name);
    if (ev->type == XLLM_REGISTRY_REMOVED) {
        /* only the incarnation that left: a restart's ADDED may have come first */
        if (i >= 0 && r->in[i]->incarnation == ev->inst->incarnation) {
            inst_free(r->in[i]);
            r->in[i] = r->in[--r->n];
        }
    } else if (i >= 0 && r->in[i]->incarnation == ev->inst->incarnation) {
        set_from(r->in[i], ev->inst); /* CHANGED: a role switch keeps load and index */
    } else {
        /* a new incarnation: nothing of the old run is kept */
        if (i >= 0) {
            inst_free(r->in[i]);
            r->in[i] = r->in[--r->n];
        }
        if (r->n == r->cap) {
            r->cap = r->cap ? 2 * r->cap : 8;
            r->in = xllm_xrealloc(r->in, sizeof(inst *) * (size_t)r->cap);
        }
        inst *x = xllm_xcalloc(1, sizeof(*x));
        set_from(x, ev->inst);
        x->blocks = xllm_xcalloc(PREFIX_CAP, sizeof(uint64_t));
        r->in[r->n++] = x;
    }
    pthread_mutex_unlock(&r->mu);
}

/* ---------------------------------------------------------------------------------------- */
/* Prefix index                                                                              */
/* ---------------------------------------------------------------------------------------- */

/* Chained hashes of the prompt's full blocks (FNV-1a over the ids, seeded by the previous). */
static int32_t block_hashes(const int32_t *ids, int32_t n, int32_t bt, uint64_t *out, int32_t max) {
    int32_t nb = XLLM_MIN(n / bt, max);
    uint64_t h = 0xcbf29ce484222325ull;
    for (int32_t b = 0; b < nb; b++) {
        for (int32_t k = 0; k < bt; k++) {
            uint32_t t = (uint32_t)ids[b * bt + k];
            for (int s = 0; s < 4; s++) {
                h ^= (t >> (8 * s)) & 0xff;
                h *= 0x100000001b3ull;
            }
        }
        out[b] = h ? h : 1;
    }
    return nb;
}

static bool blocks_has(const inst *x, uint64_t h) {
    for (uint32_t i = (uint32_t)(h % PREFIX_CAP), k = 0; k < PREFIX_CAP;
         k++, i = (i + 1) % PREFIX_CAP) {
        if (x->blocks[i] == h) return true;
        if (!x->blocks[i]) return false;
    }
    return false;
}

static void blocks_add(inst *x, uint64_t h) {
    if (blocks_has(x, h)) return;
    if (x->n_blocks >= PREFIX_CAP / 2) { /* crude aging: forget everything */
        memset(x->blocks, 0, PREFIX_CAP * sizeof(uint64_t));
        x->n_blocks = 0;
    }
    uint32_t i = (uint32_t)(h % PREFIX_CAP);
    while (x->blocks[i]) i = (i + 1) % PREFIX_CAP;
    x->blocks[i] = h;
    x->n_blocks++;
}

static int32_t prefix_match(const inst *x, const uint64_t *h, int32_t nb) {
    int32_t m = 0;
    while (m < nb && blocks_has(x, h[m])) m++;
    return m;
}

/* ---------------------------------------------------------------------------------------- */
/* Policies                                                                                  */
/* ---------------------------------------------------------------------------------------- */

/* Load as an online request sees it: offline requests there yield (the engine preempts them),
 * so they count a quarter. */
static double load_of(const inst *x) {
    return (double)x->in_flight - 0.75 * (double)x->in_flight_off + (double)x->waiting +
           0.5 * x->kv_usage;
}

/* An instance where an offline request may run now: idle enough of online work. */
static bool offline_ok(const xllm_router *r, const inst *x) {
    int32_t on = r->p.offline_idle_online > 0 ? r->p.offline_idle_online : 1;
    int32_t max_off = r->p.offline_max_inflight > 0 ? r->p.offline_max_inflight : 16;
    return x->in_flight - x->in_flight_off < on && x->in_flight_off < max_off;
}

static bool avoided(const inst *x, char (*avoid)[64], int32_t n_avoid) {
    for (int32_t i = 0; i < n_avoid; i++)
        if (!strcmp(avoid[i], x->name)) return true;
    return false;
}

static double predict_ttft(const inst *x, int32_t n_prompt) {
    return fit_predict(&x->ttft_fit, (double)(n_prompt + x->queued_prompt), 5.0, 0.05);
}

static double predict_tpot(const inst *x) {
    return fit_predict(&x->tpot_fit, (double)(x->in_flight + x->running + 1), 2.0, 0.5);
}

/* Picks the best of cand[0..n) for the policy; match[i]: matched blocks (prefix policy). */
static int32_t choose(xllm_router *r, inst **cand, int32_t n, const int32_t *match, int32_t nb,
                      int32_t n_prompt, int64_t ttft_slo, int64_t tpot_slo) {
    if (n == 0) return -1;
    int32_t best = 0;
    switch (r->p.policy) {
        case XLLM_POLICY_ROUND_ROBIN:
            return (int32_t)(r->rr++ % (uint64_t)n);
        case XLLM_POLICY_LEAST_LOAD:
            for (int32_t i = 1; i < n; i++)
                if (load_of(cand[i]) < load_of(cand[best])) best = i;
            return best;
        case XLLM_POLICY_PREFIX: {
            double lo = INFINITY, hi = 0;
            for (int32_t i = 0; i < n; i++) {
                lo = fmin(lo, load_of(cand[i]));
                hi = fmax(hi, load_of(cand[i]));
            }
            double gap = r->p.prefix_max_gap > 0 ? r->p.prefix_max_gap : 4;
            double w = r->p.prefix_load_weight > 0 ? r->p.prefix_load_weight : 0.25;
            double best_score = -INFINITY;
            best = -1;
            for (int32_t i = 0; i < n; i++) {
                double l = load_of(cand[i]);
                if (l > lo + gap) continue; /* badly imbalanced: not this one */
                double score = (nb ? (double)match[i] / nb : 0) - w * l / (1 + hi);
                if (score > best_score) best_score = score, best = i;
            }
            return best;
        }
        case XLLM_POLICY_SLO: {
            double ttft = ttft_slo > 0 ? (double)ttft_slo
                                       : (double)(r->p.ttft_slo_ms ? r->p.ttft_slo_ms : 1000);
            double tpot = tpot_slo > 0 ? (double)tpot_slo
                                       : (double)(r->p.tpot_slo_ms ? r->p.tpot_slo_ms : 100);
            int32_t meet = -1;
            double meet_t = INFINITY, any_t = INFINITY;
            for (int32_t i = 0; i < n; i++) {
                double pt = predict_ttft(cand[i], n_prompt), pp = predict_tpot(cand[i]);
                if (pt <= ttft && pp <= tpot && pt < meet_t) meet_t = pt, meet = i;
                if (pt < any_t) any_t = pt, best = i;
            }
            return meet >= 0 ? meet : best;
        }
    }
    return 0;
}

static void copy_target(xllm_route_target *t, const inst *x) {
    snprintf(t->name, sizeof(t->name), "%s", x->name);
    t->incarnation = x->incarnation;
    snprintf(t->addr, sizeof(t->addr), "%s", x->addr);
    snprintf(t->kv_addr, sizeof(t->kv_addr), "%s", x->kv_addr);
}

static inst *by_target(xllm_router *r, const xllm_route_target *t) {
    int32_t i = find(r, t->name);
    return i >= 0 && r->in[i]->incarnation == t->incarnation ? r->in[i] : NULL;
}

xllm_status xllm_router_pick(xllm_router *r, const xllm_route_req *q, char (*avoid)[64],
                             int32_t n_avoid, xllm_route *out, char *err, size_t err_size) {
    memset(out, 0, sizeof(*out));
    const int32_t *prompt = q->prompt, n_prompt = q->n_prompt;
    const int64_t ttft_slo_ms = q->ttft_slo_ms, tpot_slo_ms = q->tpot_slo_ms;
    const int32_t bt = r->p.block_tokens > 0 ? r->p.block_tokens : 16;
    enum { MAX_NB = 256 };
    uint64_t h[MAX_NB];
    int32_t nb = block_hashes(prompt, n_prompt, bt, h, MAX_NB);
    pthread_mutex_lock(&r->mu);
    inst **cand[XLLM_ROLE_COUNT];
    int32_t nc[XLLM_ROLE_COUNT] = {0};
    int32_t *match[XLLM_ROLE_COUNT];
    for (int k = 0; k < XLLM_ROLE_COUNT; k++) {
        cand[k] = xllm_xmalloc(sizeof(inst *) * (size_t)(r->n + 1));
        match[k] = xllm_xmalloc(sizeof(int32_t) * (size_t)(r->n + 1));
    }
    int32_t n_busy = 0; /* instances left out because an offline request must not go there */
    for (int32_t i = 0; i < r->n; i++) {
        inst *x = r->in[i];
        if (x->down || avoided(x, avoid, n_avoid)) continue;
        if (q->offline && !offline_ok(r, x)) {
            n_busy++;
            continue;
        }
        int k = (int)x->role;
        match[k][nc[k]] = prefix_match(x, h, nb);
        cand[k][nc[k]++] = x;
    }
    /* routes: every mixed instance, plus one prefill/decode pair when both roles exist; the
     * pair's prefill side is chosen by the policy (it holds the prompt's prefix cache), its
     * decode side by load */
    const bool pd = r->p.pd && nc[XLLM_ROLE_PREFILL] > 0 && nc[XLLM_ROLE_DECODE] > 0;
    int32_t pi = pd ? choose(r, cand[XLLM_ROLE_PREFILL], nc[XLLM_ROLE_PREFILL],
                             match[XLLM_ROLE_PREFILL], nb, n_prompt, ttft_slo_ms, tpot_slo_ms)
                    : -1;
    xllm_policy saved = r->p.policy;
    if (saved != XLLM_POLICY_ROUND_ROBIN) r->p.policy = XLLM_POLICY_LEAST_LOAD;
    int32_t di = pd ? choose(r, cand[XLLM_ROLE_DECODE], nc[XLLM_ROLE_DECODE], NULL, 0, n_prompt,
                             ttft_slo_ms, tpot_slo_ms)
                    : -1;
    r->p.policy = saved;
    /* the candidate list for the final choice: mixed instances + the pair (as its prefill) */
    int32_t nm = nc[XLLM_ROLE_MIXED];
    if (pi >= 0 && di >= 0) {
        cand[XLLM_ROLE_MIXED][nm] = cand[XLLM_ROLE_PREFILL][pi];
        match[XLLM_ROLE_MIXED][nm] = match[XLLM_ROLE_PREFILL][pi];
        nm++;
    }
    int32_t c = choose(r, cand[XLLM_ROLE_MIXED], nm, match[XLLM_ROLE_MIXED], nb, n_prompt,
                       ttft_slo_ms, tpot_slo_ms);
    xllm_status st = XLLM_OK;
    if (c < 0 && n_busy > 0) {
        xllm_set_err(err, err_size, "every instance is busy with online requests");
        st = XLLM_ERR_BUSY;
    } else if (c < 0) {
        r->no_route++;
        xllm_set_err(err, err_size, "no engine instance is available%s",
                     n_avoid ? " (every instance tried failed)" : "");
        st = XLLM_ERR_IO;
    } else {
        inst *first = cand[XLLM_ROLE_MIXED][c];
        inst *run = first;
        if (first->role == XLLM_ROLE_PREFILL) {
            out->pd = true;
            run = cand[XLLM_ROLE_DECODE][di];
            copy_target(&out->prefill, first);
            first->in_flight++;
            first->in_flight_off += q->offline;
            first->routed++;
            r->picks[1]++;
        } else {
            r->picks[0]++;
        }
        copy_target(&out->run, run);
        run->in_flight++;
        run->in_flight_off += q->offline;
        out->offline = q->offline;
        run->routed++;
        first->queued_prompt += n_prompt;
        for (int32_t b = 0; b < nb; b++) blocks_add(first, h[b]);
        out->n_prompt = n_prompt;
        out->ttft_slo_ms = ttft_slo_ms;
        out->tpot_slo_ms = tpot_slo_ms;
        out->t_start = mono_s();
        /* the x of the TTFT fit is read at pick time: prompt + what was queued before it */
        (void)predict_ttft;
    }
    for (int k = 0; k < XLLM_ROLE_COUNT; k++) {
        free(cand[k]);
        free(match[k]);
    }
    pthread_mutex_unlock(&r->mu);
    return st;
}

void xllm_router_first_token(xllm_router *r, const xllm_route *rt, double ttft_ms) {
    pthread_mutex_lock(&r->mu);
    inst *x = by_target(r, rt->pd ? &rt->prefill : &rt->run);
    if (x) {
        x->queued_prompt -= rt->n_prompt;
        if (x->queued_prompt < 0) x->queued_prompt = 0;
        fit_add(&x->ttft_fit, (double)(rt->n_prompt + x->queued_prompt), ttft_ms);
        x->ttft_ewma = x->ttft_ewma ? 0.8 * x->ttft_ewma + 0.2 * ttft_ms : ttft_ms;
    }
    pthread_mutex_unlock(&r->mu);
}

void xllm_router_done(xllm_router *r, const xllm_route *rt, int32_t n_gen, double tpot_ms,
                      const char *failed) {
    pthread_mutex_lock(&r->mu);
    for (int k = 0; k < 2; k++) {
        const xllm_route_target *t = k == 0 ? &rt->run : &rt->prefill;
        if (k == 1 && !rt->pd) break;
        inst *x = by_target(r, t);
        if (!x) continue;
        if (x->in_flight > 0) x->in_flight--;
        if (rt->offline && x->in_flight_off > 0) x->in_flight_off--;
        if (failed && !strcmp(failed, x->name)) {
            x->down = true;
            x->failures++;
        }
        if (k == 0 && n_gen > 1 && tpot_ms > 0) {
            fit_add(&x->tpot_fit, (double)(x->in_flight + x->running + 1), tpot_ms);
            x->tpot_ewma = x->tpot_ewma ? 0.8 * x->tpot_ewma + 0.2 * tpot_ms : tpot_ms;
        }
    }
    pthread_mutex_unlock(&r->mu);
}

int32_t xllm_router_n_routable(xllm_router *r) {
    pthread_mutex_lock(&r->mu);
    int32_t n[XLLM_ROLE_COUNT] = {0};
    for (int32_t i = 0; i < r->n; i++)
        if (!r->in[i]->down) n[r->in[i]->role]++;
    pthread_mutex_unlock(&r->mu);
    return n[XLLM_ROLE_MIXED] + (n[XLLM_ROLE_PREFILL] && n[XLLM_ROLE_DECODE] ? 1 : 0);
}

void xllm_router_metrics(xllm_router *r, struct xllm_api_buf *b) {
    pthread_mutex_lock(&r->mu);
    xllm_api_buf_printf(
        b, "# HELP xllm_cluster_instance_role Live instances by role "
           "(0 mixed, 1 prefill, 2 decode).\n# TYPE xllm_cluster_instance_role gauge\n");
    for (int32_t i = 0; i < r->n; i++)
        xllm_api_buf_printf(b, "xllm_cluster_instance_role{instance=\"%s\",role=\"%s\"} %d\n",
                            r->in[i]->name, xllm_role_name(r->in[i]->role), (int)r->in[i]->role);
    xllm_api_buf_printf(b, "# HELP xllm_cluster_instance_up 0 while a connection failure keeps "
                           "it out of routing.\n# TYPE xllm_cluster_instance_up gauge\n");
    for (int32_t i = 0; i < r->n; i++)
        xllm_api_buf_printf(b, "xllm_cluster_instance_up{instance=\"%s\"} %d\n", r->in[i]->name,
                            !r->in[i]->down);
    xllm_api_buf_printf(b, "# HELP xllm_cluster_routed_total Requests routed per instance.\n"
                           "# TYPE xllm_cluster_routed_total counter\n");
    for (int32_t i = 0; i < r->n; i++)
        xllm_api_buf_printf(b, "xllm_cluster_routed_total{instance=\"%s\"} %llu\n", r->in[i]->name,
                            (unsigned long long)r->in[i]->routed);
    xllm_api_buf_printf(b, "# HELP xllm_cluster_in_flight Requests in flight per instance.\n"
                           "# TYPE xllm_cluster_in_flight gauge\n");
    for (int32_t i = 0; i < r->n; i++)
        xllm_api_buf_printf(b, "xllm_cluster_in_flight{instance=\"%s\"} %d\n", r->in[i]->name,
                            r->in[i]->in_flight);
    xllm_api_buf_printf(b,
                        "# TYPE xllm_cluster_routes_total counter\n"
                        "xllm_cluster_routes_total{kind=\"mixed\"} %llu\n"
                        "xllm_cluster_routes_total{kind=\"pd\"} %llu\n"
                        "# TYPE xllm_cluster_no_route_total counter\n"
                        "xllm_cluster_no_route_total %llu\n",
                        (unsigned long long)r->picks[0], (unsigned long long)r->picks[1],
                        (unsigned long long)r->no_route);
    pthread_mutex_unlock(&r->mu);
}

char *xllm_router_describe(xllm_router *r) {
    json_t *a = json_array();
    pthread_mutex_lock(&r->mu);
    for (int32_t i = 0; i < r->n; i++) {
        const inst *x = r->in[i];
        char inc[24];
        snprintf(inc, sizeof(inc), "%016llx", (unsigned long long)x->incarnation);
        json_array_append_new(
            a, json_pack("{s:s,s:s,s:s,s:s,s:s,s:b,s:i,s:i,s:i,s:I,s:I}", "name", x->name,
                         "incarnation", inc, "role", xllm_role_name(x->role), "addr", x->addr,
                         "kv_addr", x->kv_addr, "up", !x->down, "in_flight", x->in_flight,
                         "waiting", x->waiting, "running", x->running, "routed",
                         (json_int_t)x->routed, "failures", (json_int_t)x->failures));
    }
    pthread_mutex_unlock(&r->mu);
    char *t = json_dumps(a, JSON_COMPACT);
    json_decref(a);
    return t;
}

int32_t xllm_router_window(xllm_router *r, xllm_router_inst_info *out, int32_t max) {
    pthread_mutex_lock(&r->mu);
    int32_t n = 0;
    for (int32_t i = 0; i < r->n; i++) {
        inst *x = r->in[i];
        if (!x->down && n < max) {
            xllm_router_inst_info *o = &out[n++];
            memset(o, 0, sizeof(*o));
            snprintf(o->name, sizeof(o->name), "%s", x->name);
            snprintf(o->addr, sizeof(o->addr), "%s", x->addr);
            o->role = x->role;
            o->waiting = x->waiting;
            o->running = x->running;
            o->in_flight = x->in_flight;
            o->ttft_n = x->win_ttft_n;
            o->ttft_ms = x->win_ttft_n ? x->win_ttft_sum * 1e3 / (double)x->win_ttft_n : 0;
            o->itl_n = x->win_itl_n;
            o->itl_ms = x->win_itl_n ? x->win_itl_sum * 1e3 / (double)x->win_itl_n : 0;
        }
        x->win_ttft_sum = x->win_itl_sum = 0;
        x->win_ttft_n = x->win_itl_n = 0;
    }
    pthread_mutex_unlock(&r->mu);
    return n;
}

/* ---------------------------------------------------------------------------------------- */
/* Load poller                                                                               */
/* ---------------------------------------------------------------------------------------- */

static size_t collect(char *p, size_t sz, size_t n, void *u) {
    xllm_api_buf_add(u, p, sz * n);
    return sz * n;
}

static void poll_one(xllm_router *r, CURL *c, const char *name, uint64_t inc, const char *addr) {
    char url[200];
    snprintf(url, sizeof(url), "http://%s/v1/instance/load", addr);
    xllm_api_buf b = {0};
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, collect);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, &b);
    curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, 1000L);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    CURLcode cc = curl_easy_perform(c);
    long code = 0;
    curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &code);
    json_t *o = cc == CURLE_OK && code == 200 ? json_loadb(b.p ? b.p : "", b.len, 0, NULL) : NULL;
    xllm_api_buf_free(&b);
    pthread_mutex_lock(&r->mu);
    int32_t i = find(r, name);
    if (i >= 0 && r->in[i]->incarnation == inc) {
        inst *x = r->in[i];
        if (o) {
            x->down = false;
            x->waiting = (int32_t)json_integer_value(json_object_get(o, "waiting"));
            x->running = (int32_t)json_integer_value(json_object_get(o, "running"));
            x->kv_usage = json_number_value(json_object_get(o, "kv_usage"));
            /* cumulative sums: what grew since the last poll goes to the controller's window
             * (a restart of the counters, e.g. a new engine, starts over) */
            double ts = json_number_value(json_object_get(o, "ttft_sum_s"));
            double is = json_number_value(json_object_get(o, "itl_sum_s"));
            int64_t tn = (int64_t)json_integer_value(json_object_get(o, "ttft_n"));
            int64_t in = (int64_t)json_integer_value(json_object_get(o, "itl_n"));
            if (x->eng_seen && tn >= x->eng_ttft_n && in >= x->eng_itl_n) {
                x->win_ttft_sum += ts - x->eng_ttft_sum;
                x->win_ttft_n += tn - x->eng_ttft_n;
                x->win_itl_sum += is - x->eng_itl_sum;
                x->win_itl_n += in - x->eng_itl_n;
            }
            x->eng_seen = true;
            x->eng_ttft_sum = ts;
            x->eng_ttft_n = tn;
            x->eng_itl_sum = is;
            x->eng_itl_n = in;
        } else if (cc == CURLE_COULDNT_CONNECT || cc == CURLE_OPERATION_TIMEDOUT ||
                   cc == CURLE_RECV_ERROR || cc == CURLE_GOT_NOTHING) {
            x->down = true; /* its lease has not lapsed yet, but it does not answer */
        }
    }
    pthread_mutex_unlock(&r->mu);
    json_decref(o);
}

static void *poller_main(void *arg) {
    xllm_router *r = arg;
    CURL *c = curl_easy_init();
    const int ms = r->p.poll_ms > 0 ? r->p.poll_ms : 200;
    for (;;) {
        pthread_mutex_lock(&r->stop_mu);
        if (!r->stop) {
            struct timespec dl;
            clock_gettime(CLOCK_REALTIME, &dl);
            dl.tv_nsec += (long)ms * 1000000L;
            dl.tv_sec += dl.tv_nsec / 1000000000L;
            dl.tv_nsec %= 1000000000L;
            pthread_cond_timedwait(&r->stop_cv, &r->stop_mu, &dl);
        }
        bool stop = r->stop;
        pthread_mutex_unlock(&r->stop_mu);
        if (stop) break;
        pthread_mutex_lock(&r->mu);
        int32_t n = r->n;
        char(*names)[64] = xllm_xmalloc(sizeof(*names) * (size_t)(n + 1));
        char(*addrs)[128] = xllm_xmalloc(sizeof(*addrs) * (size_t)(n + 1));
        uint64_t *incs = xllm_xmalloc(sizeof(uint64_t) * (size_t)(n + 1));
        for (int32_t i = 0; i < n; i++) {
            memcpy(names[i], r->in[i]->name, 64);
            memcpy(addrs[i], r->in[i]->addr, 128);
            incs[i] = r->in[i]->incarnation;
        }
        pthread_mutex_unlock(&r->mu);
        for (int32_t i = 0; i < n; i++) poll_one(r, c, names[i], incs[i], addrs[i]);
        free(names);
        free(addrs);
        free(incs);
    }
    curl_easy_cleanup(c);
    return NULL;
}

xllm_router *xllm_router_new(const xllm_router_params *p) {
    xllm_router *r = xllm_xcalloc(1, sizeof(*r));
    r->p = *p;
    pthread_mutex_init(&r->mu, NULL);
    pthread_mutex_init(&r->stop_mu, NULL);
    pthread_cond_init(&r->stop_cv, NULL);
    if (pthread_create(&r->poller, NULL, poller_main, r) != 0) XLLM_ASSERT(!"pthread_create");
    return r;
}

void xllm_router_free(xllm_router *r) {
    if (!r) return;
    pthread_mutex_lock(&r->stop_mu);
    r->stop = true;
    pthread_cond_signal(&r->stop_cv);
    pthread_mutex_unlock(&r->stop_mu);
    pthread_join(r->poller, NULL);
    for (int32_t i = 0; i < r->n; i++) inst_free(r->in[i]);
    free(r->in);
    pthread_mutex_destroy(&r->mu);
    pthread_mutex_destroy(&r->stop_mu);
    pthread_cond_destroy(&r->stop_cv);
    free(r);
}
