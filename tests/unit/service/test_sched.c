/* Unit tests of the cluster scheduling decisions that need no process: offline requests fill
 * idle capacity only (the router's offline gate) and the dynamic PD controller's rule. */
#include "testutil.h"

#include <string.h>

#include "service/pdctl.h"
#include "service/router.h"

/* ---- a router fed by hand (its poller never runs: poll_ms is huge) ------------------------- */

static void add_inst(xllm_router *r, const char *name, xllm_role role, uint64_t inc) {
    char addr[] = "127.0.0.1:1", attrs[] = "{}";
    xllm_instance in = {
        .name = (char *)name, .incarnation = inc, .role = role, .addr = addr, .attrs = attrs};
    xllm_registry_event ev = {.type = XLLM_REGISTRY_ADDED, .inst = &in, .revision = 1};
    xllm_router_on_event(&ev, r);
}

static xllm_router *new_router(int32_t idle_online, int32_t max_off) {
    xllm_router_params p = xllm_router_default_params();
    p.policy = XLLM_POLICY_LEAST_LOAD;
    p.poll_ms = 1 << 30;
    p.offline_idle_online = idle_online;
    p.offline_max_inflight = max_off;
    return xllm_router_new(&p);
}

static xllm_status pick(xllm_router *r, bool offline, xllm_route *rt) {
    static const int32_t prompt[20] = {1, 2, 3};
    xllm_route_req q = {.prompt = prompt, .n_prompt = 20, .offline = offline};
    char err[128];
    return xllm_router_pick(r, &q, NULL, 0, rt, err, sizeof(err));
}

static void test_offline_fills_idle(void **state) {
    (void)state;
    xllm_router *r = new_router(1, 2);
    add_inst(r, "a", XLLM_ROLE_MIXED, 1);
    add_inst(r, "b", XLLM_ROLE_MIXED, 2);
    /* an online request on one instance: offline work goes to the other one */
    xllm_route on1, off[4];
    assert_int_equal(pick(r, false, &on1), XLLM_OK);
    const char *busy = on1.run.name, *idle = !strcmp(busy, "a") ? "b" : "a";
    assert_int_equal(pick(r, true, &off[0]), XLLM_OK);
    assert_string_equal(off[0].run.name, idle);
    assert_true(off[0].offline);
    assert_int_equal(pick(r, true, &off[1]), XLLM_OK);
    assert_string_equal(off[1].run.name, idle);
    /* the idle instance holds offline_max_inflight (2) offline requests: the next waits */
    assert_int_equal(pick(r, true, &off[2]), XLLM_ERR_BUSY);
    /* online requests are not held back by offline work, and count it at a discount: with 2
     * offline requests on `idle` and 1 online on `busy`, the next online one goes to `idle` */
    xllm_route on2;
    assert_int_equal(pick(r, false, &on2), XLLM_OK);
    assert_string_equal(on2.run.name, idle);
    /* the online request on `busy` ends: offline work may go there now */
    xllm_router_done(r, &on1, 5, 1.0, NULL);
    assert_int_equal(pick(r, true, &off[2]), XLLM_OK);
    assert_string_equal(off[2].run.name, busy);
    /* an offline request ending frees its slot on `idle`, but `idle` runs an online request */
    xllm_router_done(r, &off[0], 5, 1.0, NULL);
    assert_int_equal(pick(r, true, &off[3]), XLLM_OK);
    assert_string_equal(off[3].run.name, busy);
    xllm_router_done(r, &on2, 5, 1.0, NULL);
    xllm_router_done(r, &off[1], 5, 1.0, NULL);
    xllm_router_done(r, &off[2], 5, 1.0, NULL);
    xllm_router_done(r, &off[3], 5, 1.0, NULL);
    /* everything ended: both instances take offline work again */
    assert_int_equal(pick(r, true, &off[0]), XLLM_OK);
    xllm_router_done(r, &off[0], 5, 1.0, NULL);
    xllm_router_free(r);
}

static void test_offline_without_instances(void **state) {
    (void)state;
    xllm_router *r = new_router(0, 0);
    xllm_route rt;
    /* no instance at all is an error (not a wait), for offline requests too */
    assert_int_equal(pick(r, true, &rt), XLLM_ERR_IO);
    add_inst(r, "a", XLLM_ROLE_MIXED, 1);
    /* defaults: idle means no online request there */
    xllm_route on;
    assert_int_equal(pick(r, false, &on), XLLM_OK);
    assert_int_equal(pick(r, true, &rt), XLLM_ERR_BUSY);
    xllm_router_done(r, &on, 1, 0, NULL);
    assert_int_equal(pick(r, true, &rt), XLLM_OK);
    xllm_router_done(r, &rt, 1, 0, NULL);
    xllm_router_free(r);
}

static void test_offline_pd_pair(void **state) {
    (void)state;
    xllm_router *r = new_router(1, 4);
    add_inst(r, "p", XLLM_ROLE_PREFILL, 1);
    add_inst(r, "d1", XLLM_ROLE_DECODE, 2);
    add_inst(r, "d2", XLLM_ROLE_DECODE, 3);
    xllm_route on, off;
    assert_int_equal(pick(r, false, &on), XLLM_OK);
    assert_true(on.pd);
    /* the prefill instance runs an online request: an offline one waits */
    assert_int_equal(pick(r, true, &off), XLLM_ERR_BUSY);
    xllm_router_done(r, &on, 3, 1.0, NULL);
    assert_int_equal(pick(r, true, &off), XLLM_OK);
    assert_true(off.pd && off.offline);
    xllm_router_done(r, &off, 3, 1.0, NULL);
    xllm_router_free(r);
}

/* ---- the dynamic PD rule ----------------------------------------------------------------------
 */

static xllm_router_inst_info info(const char *name, xllm_role role, double ttft, int64_t tn,
                                  double itl, int64_t in, int32_t running) {
    xllm_router_inst_info w;
    memset(&w, 0, sizeof(w));
    snprintf(w.name, sizeof(w.name), "%s", name);
    w.role = role;
    w.ttft_ms = ttft;
    w.ttft_n = tn;
    w.itl_ms = itl;
    w.itl_n = in;
    w.running = running;
    return w;
}

static void test_pdctl_rule(void **state) {
    (void)state;
    xllm_pdctl_params p = {.ttft_target_ms = 100, .tpot_target_ms = 10};
    xllm_pdctl_decision d;
    /* prefill overloaded (TTFT 300 ms = 3x target), decode idle: the least busy decode
     * instance becomes prefill */
    xllm_router_inst_info w[4] = {
        info("p1", XLLM_ROLE_PREFILL, 300, 5, 0, 0, 1),
        info("d1", XLLM_ROLE_DECODE, 0, 0, 4, 50, 6),
        info("d2", XLLM_ROLE_DECODE, 0, 0, 4, 50, 2),
        info("m1", XLLM_ROLE_MIXED, 900, 5, 90, 50, 0),
    };
    xllm_pdctl_decide(&p, w, 4, &d);
    assert_int_equal(d.inst, 2);
    assert_int_equal(d.to, XLLM_ROLE_PREFILL);
    assert_true(d.prefill_pressure > 2.99 && d.prefill_pressure < 3.01);
    assert_true(d.decode_pressure > 0.39 && d.decode_pressure < 0.41);
    assert_true(strstr(d.why, "TTFT") != NULL);
    /* both sides over target, neither by the hysteresis factor: no switch */
    w[1].itl_ms = w[2].itl_ms = 25; /* pressure 2.5 against 3 */
    xllm_pdctl_decide(&p, w, 4, &d);
    assert_int_equal(d.inst, -1);
    /* decode overloaded, prefill idle, but only one prefill instance: no switch */
    w[0].ttft_ms = 20;
    xllm_pdctl_decide(&p, w, 4, &d);
    assert_int_equal(d.inst, -1);
    assert_true(d.decode_pressure > 2.49);
    /* with a second prefill instance, the least busy one becomes decode */
    xllm_router_inst_info w2[4] = {w[0], w[1], w[2], info("p2", XLLM_ROLE_PREFILL, 10, 3, 0, 0, 0)};
    w2[0].running = 3;
    xllm_pdctl_decide(&p, w2, 4, &d);
    assert_int_equal(d.inst, 3);
    assert_int_equal(d.to, XLLM_ROLE_DECODE);
    /* weighted means: p1 (20 ms x5) and p2 (10 ms x3) -> 16.25 ms */
    assert_true(d.prefill_pressure > 0.162 && d.prefill_pressure < 0.163);
    /* too few samples to judge a side: it counts as no pressure */
    xllm_router_inst_info w3[3] = {info("p1", XLLM_ROLE_PREFILL, 1000, 1, 0, 0, 0),
                                   info("d1", XLLM_ROLE_DECODE, 0, 0, 1, 3, 0),
                                   info("d2", XLLM_ROLE_DECODE, 0, 0, 1, 3, 0)};
    xllm_pdctl_decide(&p, w3, 3, &d);
    assert_int_equal(d.inst, -1);
    assert_true(d.prefill_pressure == 0);
    assert_false(d.prefill_judged);
    assert_false(d.decode_judged);
    w3[0].ttft_n = 2;
    xllm_pdctl_decide(&p, w3, 3, &d);
    assert_int_equal(d.inst, 0 + 1); /* d1 and d2 tie: the first */
    /* a cluster without prefill or decode instances: nothing to do */
    xllm_router_inst_info w4[1] = {info("m", XLLM_ROLE_MIXED, 5000, 9, 500, 90, 3)};
    xllm_pdctl_decide(&p, w4, 1, &d);
    assert_int_equal(d.inst, -1);
    xllm_pdctl_decide(&p, w4, 0, &d);
    assert_int_equal(d.inst, -1);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_offline_fills_idle),
        cmocka_unit_test(test_offline_without_instances),
        cmocka_unit_test(test_offline_pd_pair),
        cmocka_unit_test(test_pdctl_rule),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
