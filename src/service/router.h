/* The global scheduler's routing state (src/service/router.c): the live instances (fed by the
 * registry watch), their load (polled from each instance) and the policies that pick where a
 * request runs: round-robin, least-load, prefix-cache-aware, SLO-aware; prefill/decode pairs
 * for PD disaggregation. All functions are thread-safe (one mutex). */
#ifndef XLLM_SERVICE_ROUTER_H
#define XLLM_SERVICE_ROUTER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "service/registry.h"
#include "xllm/xllm.h"

typedef enum xllm_policy {
    XLLM_POLICY_ROUND_ROBIN = 0,
    XLLM_POLICY_LEAST_LOAD = 1,
    XLLM_POLICY_PREFIX = 2,
    XLLM_POLICY_SLO = 3,
} xllm_policy;

const char *xllm_policy_name(xllm_policy p);
xllm_status xllm_policy_parse(const char *s, xllm_policy *out);

typedef struct xllm_router_params {
    xllm_policy policy;
    int32_t block_tokens;      /* prefix policy: block size for instances that publish none
                                  (no kv_block_tokens attribute, no events); 0 = 16 */
    int32_t prefix_max_blocks; /* prefix policy: blocks indexed per instance; stored events
                                  beyond it are not indexed (counted); 0 = 262144 */
    int32_t prefix_pending_ms; /* prefix policy: how long the blocks of a prompt routed to an
                                  instance count as there before its events confirm them;
                                  0 = 5000 */
    double prefix_max_gap;     /* prefix policy: an instance whose load exceeds the least loaded
                                  one's by more than this (requests) is skipped; 0 = 4 */
    double prefix_load_weight; /* score = matched fraction - weight * load / (1 + max load);
                                  0 = 0.25 */
    int64_t ttft_slo_ms;       /* SLO policy defaults when a request has none; 0 = 1000 */
    int64_t tpot_slo_ms;       /* 0 = 100 */
    int32_t poll_ms;           /* load polling period; 0 = 200 */
    bool pd;                   /* use prefill/decode pairs when both roles exist (default true
                                  via xllm_router_default_params) */
    /* Offline requests fill idle capacity: they go only to instances running fewer than
     * offline_idle_online online requests (of this service) and fewer than
     * offline_max_inflight offline ones; elsewhere they wait (XLLM_ERR_BUSY from pick). */
    int32_t offline_idle_online;  /* 0 = 1 (only instances with no online request) */
    int32_t offline_max_inflight; /* 0 = 16 */
} xllm_router_params;

xllm_router_params xllm_router_default_params(void);

typedef struct xllm_router xllm_router;

/* Starts the load poller thread. */
xllm_router *xllm_router_new(const xllm_router_params *p);
void xllm_router_free(xllm_router *r); /* joins the poller; accepts NULL */

/* The registry watch callback (registry thread). */
void xllm_router_on_event(const xllm_registry_event *ev, void *user);

/* One instance a request is sent to. */
typedef struct xllm_route_target {
    char name[64];
    uint64_t incarnation;
    char addr[128];    /* host:port of its HTTP API */
    char kv_addr[128]; /* host:port of its KV receiver ("" when none) */
} xllm_route_target;

/* Where a request runs: one instance (mixed), or a prefill and a decode instance (pd). */
typedef struct xllm_route {
    bool pd;
    xllm_route_target run;     /* mixed: the instance; pd: the decode instance (streams) */
    xllm_route_target prefill; /* pd only */
    int32_t n_prompt;
    bool offline;
    int64_t ttft_slo_ms, tpot_slo_ms;
    double t_start; /* monotonic seconds at pick */
} xllm_route;

/* What a request asks of the router. */
typedef struct xllm_route_req {
    const int32_t *prompt;
    int32_t n_prompt;
    bool offline; /* fills idle capacity only; online requests count it at a discount */
    int64_t ttft_slo_ms, tpot_slo_ms;
} xllm_route_req;

/* Picks a route for a request, avoiding the instances named in avoid[0..n_avoid) (earlier
 * tries of the same request). Counts the request as in flight on the chosen instances.
 * XLLM_ERR_IO when no instance can take it; XLLM_ERR_BUSY when the request is offline and
 * every instance that could take it is busy with online work (wait and pick again). */
xllm_status xllm_router_pick(xllm_router *r, const xllm_route_req *q, char (*avoid)[64],
                             int32_t n_avoid, xllm_route *out, char *err, size_t err_size);
/* The request's first token arrived (ttft) on its route. */
void xllm_router_first_token(xllm_router *r, const xllm_route *rt, double ttft_ms);
/* The request left its route: ok (finished), or failed because the instance named `failed`
 * broke (NULL: not an instance failure); the failed instance leaves routing until a load poll
 * or a new registration shows it alive. n_gen and tpot_ms feed the SLO model. */
void xllm_router_done(xllm_router *r, const xllm_route *rt, int32_t n_gen, double tpot_ms,
                      const char *failed);

/* Number of instances that can serve now (mixed, or prefill and decode pairs). */
int32_t xllm_router_n_routable(xllm_router *r);

/* Appends Prometheus lines (per instance: role, in flight, routed, failures; totals). */
struct xllm_api_buf;
void xllm_router_metrics(xllm_router *r, struct xllm_api_buf *b);

/* The names and roles of the live instances as JSON text (malloc'd), for /v1/cluster. */
char *xllm_router_describe(xllm_router *r);

/* One live instance as the PD controller sees it: its role and what its engine reported over
 * the window since the previous call (means from the sums and counts of GET
 * /v1/instance/load, so they cover every service's requests, not only this one's). */
typedef struct xllm_router_inst_info {
    char name[64];
    char addr[128];
    xllm_role role;
    int32_t waiting, running, in_flight;
    double ttft_ms; /* mean time to first token of the window's first tokens (0: none) */
    int64_t ttft_n;
    double itl_ms; /* mean inter-token latency of the window's decode tokens (0: none) */
    int64_t itl_n;
} xllm_router_inst_info;
/* Copies up to max live instances and starts a new window. */
int32_t xllm_router_window(xllm_router *r, xllm_router_inst_info *out, int32_t max);

/* The "kv" object of an instance's load answer (docs/cluster.md), decoded; exposed for the fuzz
 * target. xllm_router_kv_parse reads a whole load answer (JSON text) and returns false when it
 * has no kv object or any field of it is malformed (wrong hash scheme, a block size outside
 * 1..2^20, a hash that is not 16 hex digits, ...); the arrays are malloc'd either way: release
 * them with xllm_router_kv_answer_clear. */
typedef struct xllm_router_kv_answer {
    int32_t block_tokens;
    uint64_t next;
    bool reset, more;
    uint64_t *stored, *evicted;
    size_t n_stored, n_evicted;
} xllm_router_kv_answer;
bool xllm_router_kv_parse(const char *text, size_t len, xllm_router_kv_answer *a);
void xllm_router_kv_answer_clear(xllm_router_kv_answer *a);

#endif
