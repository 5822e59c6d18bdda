/* Dynamic PD controller: a thread in every service that acts while its service is master. Each
 * window it reads the router's per-instance window (what the engines reported since the last
 * one), decides with xllm_pdctl_decide and, at most once per cooldown, switches one instance's
 * role through the instance RPC. The instance updates its own registry key; the watch brings
 * the change back to every service's router. */
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>

#include <curl/curl.h>

#include "api/api-impl.h"
#include "service/pdctl.h"
#include "service/registry-impl.h"
#include "util/common.h"

#define MAX_INST 256

struct xllm_pdctl {
    xllm_pdctl_params p;
    xllm_router *r;
    bool (*is_leader)(void *);
    void *user;
    pthread_t th;
    pthread_mutex_t mu; /* stop flag and the figures below */
    pthread_cond_t cv;
    bool stop;
    double prefill_pressure, decode_pressure;
    uint64_t switches[XLLM_ROLE_COUNT]; /* by new role */
    uint64_t failed_switches;
};

static double pos_or(double v, double def) {
    return v > 0 ? v : def;
}

/* Weighted mean of a side's samples: ttft (prefill side) or itl (decode side). */
static double side_mean(const xllm_router_inst_info *w, int32_t n, xllm_role role, bool ttft,
                        int64_t *count) {
    double sum = 0;
    int64_t k = 0;
    for (int32_t i = 0; i < n; i++) {
        if (w[i].role != role) continue;
        int64_t c = ttft ? w[i].ttft_n : w[i].itl_n;
        sum += (ttft ? w[i].ttft_ms : w[i].itl_ms) * (double)c;
        k += c;
    }
    *count = k;
    return k ? sum / (double)k : 0;
}

/* The least busy instance of a role, and how many there are. */
static int32_t least_busy(const xllm_router_inst_info *w, int32_t n, xllm_role role,
                          int32_t *count) {
    int32_t best = -1;
    *count = 0;
    for (int32_t i = 0; i < n; i++) {
        if (w[i].role != role) continue;
        (*count)++;
        int32_t busy = w[i].running + w[i].waiting + w[i].in_flight;
        if (best < 0 || busy < w[best].running + w[best].waiting + w[best].in_flight) best = i;
    }
    return best;
}

void xllm_pdctl_decide(const xllm_pdctl_params *p, const xllm_router_inst_info *w, int32_t n,
                       xllm_pdctl_decision *d) {
    memset(d, 0, sizeof(*d));
    d->inst = -1;
    const double ttft_t = pos_or(p->ttft_target_ms, 1000), tpot_t = pos_or(p->tpot_target_ms, 100);
    const double hyst = pos_or(p->hysteresis, 1.5);
    const int64_t min_ttft = p->min_ttft_n > 0 ? p->min_ttft_n : 2;
    const int64_t min_itl = p->min_itl_n > 0 ? p->min_itl_n : 8;
    int64_t nt = 0, ni = 0;
    double ttft = side_mean(w, n, XLLM_ROLE_PREFILL, true, &nt);
    double itl = side_mean(w, n, XLLM_ROLE_DECODE, false, &ni);
    d->prefill_judged = nt >= min_ttft;
    d->decode_judged = ni >= min_itl;
    d->prefill_pressure = d->prefill_judged ? ttft / ttft_t : 0;
    d->decode_pressure = d->decode_judged ? itl / tpot_t : 0;
    int32_t n_pre = 0, n_dec = 0;
    int32_t pre = least_busy(w, n, XLLM_ROLE_PREFILL, &n_pre);
    int32_t dec = least_busy(w, n, XLLM_ROLE_DECODE, &n_dec);
    const double pp = d->prefill_pressure, dp = d->decode_pressure;
    if (pp > 1 && pp > hyst * dp && n_dec >= 2) {
        d->inst = dec;
        d->to = XLLM_ROLE_PREFILL;
        snprintf(d->why, sizeof(d->why),
                 "prefill TTFT %.1f ms over its target %.0f ms (pressure %.2f), decode %.2f", ttft,
                 ttft_t, pp, dp);
    } else if (dp > 1 && dp > hyst * pp && n_pre >= 2) {
        d->inst = pre;
        d->to = XLLM_ROLE_DECODE;
        snprintf(d->why, sizeof(d->why),
                 "decode inter-token %.2f ms over its target %.0f ms (pressure %.2f), prefill "
                 "%.2f",
                 itl, tpot_t, dp, pp);
    }
}

static size_t sink(char *p, size_t sz, size_t n, void *u) {
    (void)p;
    (void)u;
    return sz * n;
}

/* POST /v1/instance/role. */
static bool switch_role(CURL *c, const char *addr, xllm_role to, char *err, size_t err_size) {
    char url[200], body[64];
    snprintf(url, sizeof(url), "http://%s/v1/instance/role", addr);
    snprintf(body, sizeof(body), "{\"role\":\"%s\"}", xllm_role_name(to));
    struct curl_slist *h = curl_slist_append(NULL, "Content-Type: application/json");
    curl_easy_reset(c);
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, h);
    curl_easy_setopt(c, CURLOPT_POSTFIELDS, body);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, sink);
    curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, 3000L);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    CURLcode cc = curl_easy_perform(c);
    long code = 0;
    curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &code);
    curl_slist_free_all(h);
    if (cc != CURLE_OK) {
        snprintf(err, err_size, "%s", curl_easy_strerror(cc));
        return false;
    }
    if (code != 200) {
        snprintf(err, err_size, "HTTP %ld", code);
        return false;
    }
    return true;
}

/* Samples carried over from earlier windows, by instance: a window judges a side only with
 * min_ttft_n / min_itl_n samples, which a slow side may not yield in one interval. */
typedef struct carry {
    char name[64];
    double ttft_sum, itl_sum; /* ms x samples */
    int64_t ttft_n, itl_n;
} carry;

/* Adds the carried samples into w (by name) and keeps the sums in cr for the next window. */
static int32_t carry_merge(carry *cr, int32_t n_cr, xllm_router_inst_info *w, int32_t n) {
    carry *next = xllm_xcalloc((size_t)n + 1, sizeof(*next));
    for (int32_t i = 0; i < n; i++) {
        carry *x = &next[i];
        snprintf(x->name, sizeof(x->name), "%s", w[i].name);
        x->ttft_sum = w[i].ttft_ms * (double)w[i].ttft_n;
        x->ttft_n = w[i].ttft_n;
        x->itl_sum = w[i].itl_ms * (double)w[i].itl_n;
        x->itl_n = w[i].itl_n;
        for (int32_t k = 0; k < n_cr; k++) {
            if (strcmp(cr[k].name, x->name)) continue;
            x->ttft_sum += cr[k].ttft_sum;
            x->ttft_n += cr[k].ttft_n;
            x->itl_sum += cr[k].itl_sum;
            x->itl_n += cr[k].itl_n;
        }
        w[i].ttft_n = x->ttft_n;
        w[i].ttft_ms = x->ttft_n ? x->ttft_sum / (double)x->ttft_n : 0;
        w[i].itl_n = x->itl_n;
        w[i].itl_ms = x->itl_n ? x->itl_sum / (double)x->itl_n : 0;
    }
    memcpy(cr, next, sizeof(*cr) * (size_t)n);
    free(next);
    return n;
}

static void *ctl_main(void *arg) {
    xllm_pdctl *c = arg;
    CURL *curl = curl_easy_init();
    xllm_router_inst_info *w = xllm_xmalloc(sizeof(*w) * MAX_INST);
    carry *cr = xllm_xcalloc(MAX_INST, sizeof(*cr));
    int32_t n_cr = 0, carried = 0;
    const int32_t max_carry = 8; /* windows a judgement may span */
    const int ms = c->p.interval_ms > 0 ? c->p.interval_ms : 1000;
    const int64_t cooldown_ns = (int64_t)(c->p.cooldown_ms > 0 ? c->p.cooldown_ms : 3000) * 1000000;
    int64_t last_switch = INT64_MIN / 2;
    bool was_leader = false;
    for (;;) {
        pthread_mutex_lock(&c->mu);
        if (!c->stop) {
            xllm_registry_cond_wait_until(&c->cv, &c->mu,
                                          xllm_registry_now_ns() + (int64_t)ms * 1000000);
        }
        bool stop = c->stop;
        pthread_mutex_unlock(&c->mu);
        if (stop) break;
        bool leader = c->is_leader(c->user);
        int32_t n = xllm_router_window(c->r, w, MAX_INST);
        if (!leader || !was_leader) { /* a new master judges from its first whole window */
            was_leader = leader;
            n_cr = carried = 0;
            continue;
        }
        n_cr = carry_merge(cr, n_cr, w, n);
        xllm_pdctl_decision d;
        xllm_pdctl_decide(&c->p, w, n, &d);
        /* a judgement starts the carried samples over; so do max_carry windows or a switch */
        if (d.prefill_judged || d.decode_judged || ++carried >= max_carry || d.inst >= 0)
            n_cr = carried = 0;
        pthread_mutex_lock(&c->mu);
        c->prefill_pressure = d.prefill_pressure;
        c->decode_pressure = d.decode_pressure;
        pthread_mutex_unlock(&c->mu);
        if (d.inst < 0 || xllm_registry_now_ns() - last_switch < cooldown_ns) continue;
        char err[256];
        bool ok = switch_role(curl, w[d.inst].addr, d.to, err, sizeof(err));
        pthread_mutex_lock(&c->mu);
        if (ok)
            c->switches[d.to]++;
        else
            c->failed_switches++;
        pthread_mutex_unlock(&c->mu);
        if (ok) {
            last_switch = xllm_registry_now_ns();
            fprintf(stderr, "xllm service: dynamic PD: %s %s -> %s: %s\n", w[d.inst].name,
                    xllm_role_name(w[d.inst].role), xllm_role_name(d.to), d.why);
        } else {
            fprintf(stderr, "xllm service: dynamic PD: switching %s to %s failed: %s\n",
                    w[d.inst].name, xllm_role_name(d.to), err);
        }
    }
    free(w);
    free(cr);
    curl_easy_cleanup(curl);
    return NULL;
}

xllm_pdctl *xllm_pdctl_new(const xllm_pdctl_params *p, xllm_router *r,
                           bool (*is_leader)(void *user), void *user) {
    xllm_pdctl *c = xllm_xcalloc(1, sizeof(*c));
    c->p = *p;
    c->r = r;
    c->is_leader = is_leader;
    c->user = user;
    pthread_mutex_init(&c->mu, NULL);
    xllm_registry_cond_init(&c->cv);
    if (pthread_create(&c->th, NULL, ctl_main, c) != 0) XLLM_ASSERT(!"pthread_create");
    return c;
}

void xllm_pdctl_free(xllm_pdctl *c) {
    if (!c) return;
    pthread_mutex_lock(&c->mu);
    c->stop = true;
    pthread_cond_signal(&c->cv);
    pthread_mutex_unlock(&c->mu);
    pthread_join(c->th, NULL);
    pthread_mutex_destroy(&c->mu);
    pthread_cond_destroy(&c->cv);
    free(c);
}

void xllm_pdctl_metrics(xllm_pdctl *c, struct xllm_api_buf *b) {
    pthread_mutex_lock(&c->mu);
    xllm_api_buf_printf(
        b,
        "# HELP xllm_pd_pressure Dynamic PD: the last window's mean TTFT of prefill instances and "
        "mean inter-token latency of decode instances, each over its target.\n"
        "# TYPE xllm_pd_pressure gauge\n"
        "xllm_pd_pressure{side=\"prefill\"} %.4f\nxllm_pd_pressure{side=\"decode\"} %.4f\n"
        "# HELP xllm_pd_role_switches_total Dynamic PD: instances switched, by new role.\n"
        "# TYPE xllm_pd_role_switches_total counter\n"
        "xllm_pd_role_switches_total{to=\"prefill\"} %llu\n"
        "xllm_pd_role_switches_total{to=\"decode\"} %llu\n"
        "# TYPE xllm_pd_failed_switches_total counter\nxllm_pd_failed_switches_total %llu\n",
        c->prefill_pressure, c->decode_pressure, (unsigned long long)c->switches[XLLM_ROLE_PREFILL],
        (unsigned long long)c->switches[XLLM_ROLE_DECODE], (unsigned long long)c->failed_switches);
    pthread_mutex_unlock(&c->mu);
}
