/* Dynamic PD: the controller that the master service runs over the cluster's prefill and decode
 * instances (src/service/pdctl.c). Every window it compares what the engines report, time to
 * first token on prefill instances and inter-token latency on decode instances, with their
 * targets, and switches one instance from the side with slack to the side under pressure
 * (POST /v1/instance/role; the instance moves its registry key, keeps its running work). */
#ifndef XLLM_SERVICE_PDCTL_H
#define XLLM_SERVICE_PDCTL_H

#include "service/router.h"

typedef struct xllm_pdctl_params {
    double ttft_target_ms; /* prefill side target; 0 = 1000 */
    double tpot_target_ms; /* decode side target (inter-token latency); 0 = 100 */
    int32_t interval_ms;   /* the window; 0 = 1000 */
    int32_t cooldown_ms;   /* no switch for this long after one; 0 = 3000 */
    double hysteresis;     /* the side under pressure must exceed the other's pressure by this
                              factor; 0 = 1.5 */
    int32_t min_ttft_n;    /* first tokens needed in a window to judge the prefill side; 0 = 2 */
    int32_t min_itl_n;     /* tokens needed to judge the decode side; 0 = 8 */
} xllm_pdctl_params;

/* One window's verdict. */
typedef struct xllm_pdctl_decision {
    double prefill_pressure; /* mean TTFT of prefill instances / target (0: no samples) */
    double decode_pressure;  /* mean inter-token latency of decode instances / target */
    bool prefill_judged;     /* the side had min_ttft_n / min_itl_n samples */
    bool decode_judged;
    int32_t inst; /* index into the window of the instance to switch; -1: none */
    xllm_role to;
    char why[200];
} xllm_pdctl_decision;

/* The decision rule, a pure function of one window (unit-tested): switch a decode instance to
 * prefill when the prefill pressure is above 1 and `hysteresis` times the decode pressure, and
 * at least two decode instances exist (and the mirror for decode); the instance chosen is the
 * least busy of its side. Mixed instances are never switched. */
void xllm_pdctl_decide(const xllm_pdctl_params *p, const xllm_router_inst_info *w, int32_t n,
                       xllm_pdctl_decision *d);

typedef struct xllm_pdctl xllm_pdctl;

/* Starts the controller thread. It acts only while is_leader(user) says true; a switch that
 * the instance refuses or that fails is logged and retried at a later window. */
xllm_pdctl *xllm_pdctl_new(const xllm_pdctl_params *p, xllm_router *r,
                           bool (*is_leader)(void *user), void *user);
void xllm_pdctl_free(xllm_pdctl *c); /* joins the thread; accepts NULL */

/* Appends Prometheus lines: pressures and switches. */
struct xllm_api_buf;
void xllm_pdctl_metrics(xllm_pdctl *c, struct xllm_api_buf *b);

#endif
