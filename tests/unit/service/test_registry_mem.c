/* Unit tests of the instance registry over the embedded store: register / list / update,
 * watch events, TTL expiry, lease recovery, election and takeover, incarnations. */
#include "testutil.h"

#include <pthread.h>
#include <string.h>
#include <unistd.h>

#include "service/registry-impl.h"
#include "service/registry.h"
#include "registry_collector.h"

static bool wait_leader(xllm_registry *reg, bool want, int timeout_ms) {
    int64_t deadline = xllm_registry_now_ns() + (int64_t)timeout_ms * 1000000;
    while (xllm_registry_now_ns() < deadline) {
        if (xllm_registry_is_leader(reg) == want) return true;
        usleep(5000);
    }
    return xllm_registry_is_leader(reg) == want;
}

static xllm_registry *open_reg(xllm_registry_mem *mem, int64_t ttl_ms, collector *events,
                               collector *leader, bool abandon) {
    xllm_registry_params p = xllm_registry_default_params();
    p.store = xllm_registry_mem_store(mem);
    p.cluster = "test";
    p.ttl_ms = ttl_ms;
    p.campaign_ms = 20;
    if (events) {
        p.on_event = on_event;
        p.on_event_user = events;
    }
    if (leader) {
        p.on_leader = on_leader;
        p.on_leader_user = leader;
    }
    p.abandon_on_free = abandon;
    xllm_registry *reg = NULL;
    char err[256] = "";
    xllm_status st = xllm_registry_new(&p, &reg, err, sizeof(err));
    if (st != XLLM_OK) fail_msg("registry_new: %s", err);
    return reg;
}

static xllm_instance inst_of(const char *name, uint64_t inc, xllm_role role, const char *addr,
                             const char *attrs) {
    return (xllm_instance){(char *)name, inc, role, (char *)addr, (char *)attrs};
}

/* ---- tests --------------------------------------------------------------------------------- */

static void test_roles_and_json(void **state) {
    (void)state;
    xllm_role r;
    assert_int_equal(xllm_role_parse("prefill", &r), XLLM_OK);
    assert_int_equal(r, XLLM_ROLE_PREFILL);
    assert_int_equal(xllm_role_parse("bogus", &r), XLLM_ERR_INVALID_ARG);
    assert_string_equal(xllm_role_name(XLLM_ROLE_DECODE), "decode");
    assert_null(xllm_role_name((xllm_role)7));

    xllm_instance in = inst_of("e-1", 0xdeadbeef12345678ULL, XLLM_ROLE_DECODE, "127.0.0.1:9000",
                               "{\"model\":\"tiny\",\"kv_blocks\":64}");
    char err[256];
    char *s = xllm_registry_instance_encode(&in, err, sizeof(err));
    assert_non_null(s);
    xllm_instance out;
    assert_int_equal(xllm_registry_instance_decode(s, strlen(s), &out, err, sizeof(err)), XLLM_OK);
    assert_string_equal(out.name, "e-1");
    assert_true(out.incarnation == 0xdeadbeef12345678ULL);
    assert_int_equal(out.role, XLLM_ROLE_DECODE);
    assert_string_equal(out.addr, "127.0.0.1:9000");
    assert_non_null(strstr(out.attrs, "\"model\":\"tiny\""));
    xllm_instance_clear(&out);
    free(s);

    /* invalid instances are refused with a message */
    xllm_instance bad = inst_of("bad name", 1, XLLM_ROLE_MIXED, "h:1", NULL);
    assert_null(xllm_registry_instance_encode(&bad, err, sizeof(err)));
    assert_non_null(strstr(err, "name"));
    bad = inst_of("ok", 0, XLLM_ROLE_MIXED, "h:1", NULL);
    assert_null(xllm_registry_instance_encode(&bad, err, sizeof(err)));
    bad = inst_of("ok", 1, XLLM_ROLE_MIXED, "h:1", "[1]");
    assert_null(xllm_registry_instance_encode(&bad, err, sizeof(err)));
    assert_non_null(strstr(err, "attrs"));

    const char *garbage[] = {"",
                             "{",
                             "[]",
                             "{\"name\":\"x\"}",
                             "{\"name\":\"x\",\"incarnation\":\"zz\",\"role\":\"mixed\","
                             "\"addr\":\"a:1\"}",
                             "{\"name\":\"x\",\"incarnation\":\"0\",\"role\":\"mixed\","
                             "\"addr\":\"a:1\"}",
                             "{\"name\":\"x\",\"incarnation\":\"1\",\"role\":\"boss\","
                             "\"addr\":\"a:1\"}"};
    for (size_t i = 0; i < sizeof(garbage) / sizeof(garbage[0]); i++)
        assert_int_equal(
            xllm_registry_instance_decode(garbage[i], strlen(garbage[i]), &out, err, sizeof(err)),
            XLLM_ERR_FORMAT);

    uint64_t a = xllm_instance_new_incarnation(), b = xllm_instance_new_incarnation();
    assert_true(a != 0 && b != 0 && a != b);
}

static void test_register_list_update(void **state) {
    (void)state;
    xllm_registry_mem *mem = xllm_registry_mem_new();
    xllm_registry *a = open_reg(mem, 5000, NULL, NULL, false);
    xllm_registry *b = open_reg(mem, 5000, NULL, NULL, false);
    char err[256];
    xllm_instance p1 = inst_of("p1", 11, XLLM_ROLE_PREFILL, "127.0.0.1:1001", NULL);
    xllm_instance d1 = inst_of("d1", 12, XLLM_ROLE_DECODE, "127.0.0.1:1002", "{\"m\":\"x\"}");
    xllm_instance m1 = inst_of("m1", 13, XLLM_ROLE_MIXED, "127.0.0.1:1003", NULL);
    assert_int_equal(xllm_registry_register(a, &p1, err, sizeof(err)), XLLM_OK);
    assert_int_equal(xllm_registry_register(a, &d1, err, sizeof(err)), XLLM_OK);
    assert_int_equal(xllm_registry_register(b, &m1, err, sizeof(err)), XLLM_OK);

    xllm_instance_list l;
    assert_int_equal(xllm_registry_list(b, -1, &l, err, sizeof(err)), XLLM_OK);
    assert_int_equal(l.n, 3);
    /* sorted by role then name */
    assert_string_equal(l.items[0].name, "m1");
    assert_string_equal(l.items[1].name, "p1");
    assert_string_equal(l.items[2].name, "d1");
    assert_string_equal(l.items[2].attrs, "{\"m\":\"x\"}");
    assert_true(l.revision > 1);
    xllm_instance_list_free(&l);
    assert_int_equal(xllm_registry_list(b, XLLM_ROLE_DECODE, &l, err, sizeof(err)), XLLM_OK);
    assert_int_equal(l.n, 1);
    assert_string_equal(l.items[0].name, "d1");
    xllm_instance_list_free(&l);

    /* role switch and attribute update: still one d1, now prefill */
    assert_int_equal(
        xllm_registry_update(a, "d1", XLLM_ROLE_PREFILL, "{\"m\":\"y\"}", err, sizeof(err)),
        XLLM_OK);
    assert_int_equal(xllm_registry_list(b, XLLM_ROLE_DECODE, &l, err, sizeof(err)), XLLM_OK);
    assert_int_equal(l.n, 0);
    xllm_instance_list_free(&l);
    assert_int_equal(xllm_registry_list(b, XLLM_ROLE_PREFILL, &l, err, sizeof(err)), XLLM_OK);
    assert_int_equal(l.n, 2);
    assert_string_equal(l.items[0].name, "d1");
    assert_string_equal(l.items[0].attrs, "{\"m\":\"y\"}");
    assert_true(l.items[0].incarnation == 12);
    xllm_instance_list_free(&l);

    /* only the owner may update or deregister */
    assert_int_equal(xllm_registry_update(b, "d1", XLLM_ROLE_MIXED, NULL, err, sizeof(err)),
                     XLLM_ERR_INVALID_ARG);
    assert_int_equal(xllm_registry_deregister(b, "p1", err, sizeof(err)), XLLM_ERR_INVALID_ARG);
    assert_int_equal(xllm_registry_deregister(a, "p1", err, sizeof(err)), XLLM_OK);
    assert_int_equal(xllm_registry_list(b, -1, &l, err, sizeof(err)), XLLM_OK);
    assert_int_equal(l.n, 2);
    xllm_instance_list_free(&l);

    /* invalid registrations fail cleanly */
    xllm_instance bad = inst_of("x/y", 1, XLLM_ROLE_MIXED, "h:1", NULL);
    assert_int_equal(xllm_registry_register(a, &bad, err, sizeof(err)), XLLM_ERR_INVALID_ARG);

    /* a graceful close removes the instances at once */
    xllm_registry_free(a);
    assert_int_equal(xllm_registry_list(b, -1, &l, err, sizeof(err)), XLLM_OK);
    assert_int_equal(l.n, 1);
    assert_string_equal(l.items[0].name, "m1");
    xllm_instance_list_free(&l);
    xllm_registry_free(b);
    xllm_registry_mem_free(mem);
}

static void test_watch_events(void **state) {
    (void)state;
    xllm_registry_mem *mem = xllm_registry_mem_new();
    char err[256];
    xllm_registry *a = open_reg(mem, 5000, NULL, NULL, false);
    xllm_instance e0 = inst_of("e0", 100, XLLM_ROLE_MIXED, "h:1", NULL);
    assert_int_equal(xllm_registry_register(a, &e0, err, sizeof(err)), XLLM_OK);

    collector c;
    col_init(&c);
    xllm_registry *w = open_reg(mem, 5000, &c, NULL, false);
    size_t cur = 0;
    /* instances present at start come as ADDED */
    assert_true(col_wait(&c, &cur, XLLM_REGISTRY_ADDED, "e0", 100, 2000) >= 0);

    xllm_instance e1 = inst_of("e1", 101, XLLM_ROLE_PREFILL, "h:2", "{\"a\":1}");
    assert_int_equal(xllm_registry_register(a, &e1, err, sizeof(err)), XLLM_OK);
    assert_true(col_wait(&c, &cur, XLLM_REGISTRY_ADDED, "e1", 101, 2000) >= 0);
    assert_int_equal(
        xllm_registry_update(a, "e1", XLLM_ROLE_PREFILL, "{\"a\":2}", err, sizeof(err)), XLLM_OK);
    long i = col_wait(&c, &cur, XLLM_REGISTRY_CHANGED, "e1", 101, 2000);
    assert_true(i >= 0);
    assert_string_equal(c.evs[i].inst.attrs, "{\"a\":2}");
    /* a role switch is a change of the same instance, not a removal and an addition */
    size_t before = col_count(&c);
    assert_int_equal(xllm_registry_update(a, "e1", XLLM_ROLE_DECODE, NULL, err, sizeof(err)),
                     XLLM_OK);
    i = col_wait(&c, &cur, XLLM_REGISTRY_CHANGED, "e1", 101, 2000);
    assert_true(i >= 0);
    assert_int_equal(c.evs[i].inst.role, XLLM_ROLE_DECODE);
    assert_int_equal(col_count(&c), before + 1);
    /* re-registering the same state tells nothing */
    assert_int_equal(xllm_registry_update(a, "e1", XLLM_ROLE_DECODE, NULL, err, sizeof(err)),
                     XLLM_OK);
    assert_int_equal(xllm_registry_deregister(a, "e1", err, sizeof(err)), XLLM_OK);
    i = col_wait(&c, &cur, XLLM_REGISTRY_REMOVED, "e1", 101, 2000);
    assert_true(i >= 0);
    assert_int_equal(col_count(&c), before + 2);
    /* closing a removes e0 */
    xllm_registry_free(a);
    assert_true(col_wait(&c, &cur, XLLM_REGISTRY_REMOVED, "e0", 100, 2000) >= 0);
    xllm_registry_free(w);
    col_destroy(&c);
    xllm_registry_mem_free(mem);
}

static void test_ttl_expiry(void **state) {
    (void)state;
    xllm_registry_mem *mem = xllm_registry_mem_new();
    char err[256];
    collector c;
    col_init(&c);
    xllm_registry *w = open_reg(mem, 5000, &c, NULL, false);
    xllm_registry *a = open_reg(mem, 150, NULL, NULL, true);
    xllm_instance e = inst_of("short", 7, XLLM_ROLE_DECODE, "h:1", NULL);
    assert_int_equal(xllm_registry_register(a, &e, err, sizeof(err)), XLLM_OK);
    size_t cur = 0;
    assert_true(col_wait(&c, &cur, XLLM_REGISTRY_ADDED, "short", 7, 2000) >= 0);
    /* keepalives hold it well past its TTL */
    usleep(600 * 1000);
    assert_int_equal(col_wait(&c, &cur, XLLM_REGISTRY_REMOVED, "short", 7, 0), -1);
    /* the process "dies": no more keepalives, no revoke */
    int64_t t0 = xllm_registry_now_ns();
    xllm_registry_free(a);
    assert_true(col_wait(&c, &cur, XLLM_REGISTRY_REMOVED, "short", 7, 2000) >= 0);
    double ms = (double)(xllm_registry_now_ns() - t0) / 1e6;
    assert_true(ms <= 150 + 350); /* within its TTL (plus slack for loaded machines) */
    xllm_instance_list l;
    assert_int_equal(xllm_registry_list(w, -1, &l, err, sizeof(err)), XLLM_OK);
    assert_int_equal(l.n, 0);
    xllm_instance_list_free(&l);
    xllm_registry_free(w);
    col_destroy(&c);
    xllm_registry_mem_free(mem);
}

static void test_lease_recovery(void **state) {
    (void)state;
    xllm_registry_mem *mem = xllm_registry_mem_new();
    char err[256];
    collector c;
    col_init(&c);
    xllm_registry *w = open_reg(mem, 5000, &c, NULL, false);
    xllm_registry *a = open_reg(mem, 150, NULL, NULL, false);
    xllm_instance e = inst_of("phoenix", 9, XLLM_ROLE_MIXED, "h:1", NULL);
    assert_int_equal(xllm_registry_register(a, &e, err, sizeof(err)), XLLM_OK);
    size_t cur = 0;
    assert_true(col_wait(&c, &cur, XLLM_REGISTRY_ADDED, "phoenix", 9, 2000) >= 0);
    /* the store loses the lease (as after a long stall): the session gets a new one and puts
     * the instance back */
    int64_t old = xllm_registry_lease(a, NULL);
    xllm_registry_store st = xllm_registry_mem_store(mem);
    assert_int_equal(st.iface->lease_revoke(st.ctx, old, err, sizeof(err)), XLLM_OK);
    st.iface->free(st.ctx);
    assert_true(col_wait(&c, &cur, XLLM_REGISTRY_REMOVED, "phoenix", 9, 2000) >= 0);
    assert_true(col_wait(&c, &cur, XLLM_REGISTRY_ADDED, "phoenix", 9, 2000) >= 0);
    assert_true(xllm_registry_lease(a, NULL) != old);
    xllm_registry_free(a);
    xllm_registry_free(w);
    col_destroy(&c);
    xllm_registry_mem_free(mem);
}

static void test_election(void **state) {
    (void)state;
    xllm_registry_mem *mem = xllm_registry_mem_new();
    char err[256];
    collector la, lb, lc;
    col_init(&la);
    col_init(&lb);
    col_init(&lc);
    xllm_registry *a = open_reg(mem, 150, NULL, &la, true);
    xllm_registry *b = open_reg(mem, 150, NULL, &lb, false);
    bool elected = false;
    assert_int_equal(xllm_registry_campaign(a, "svc-a", &elected, err, sizeof(err)), XLLM_OK);
    assert_true(elected);
    assert_true(xllm_registry_is_leader(a));
    assert_int_equal(xllm_registry_campaign(b, "svc-b", &elected, err, sizeof(err)), XLLM_OK);
    assert_false(elected);
    assert_int_equal(xllm_registry_campaign(b, "svc-other", &elected, err, sizeof(err)),
                     XLLM_ERR_INVALID_ARG);
    char *id = NULL;
    assert_int_equal(xllm_registry_leader(b, &id, err, sizeof(err)), XLLM_OK);
    assert_string_equal(id, "svc-a");
    free(id);
    /* the leader keeps its key past the TTL through keepalives */
    usleep(500 * 1000);
    assert_true(xllm_registry_is_leader(a));
    assert_false(xllm_registry_is_leader(b));

    /* the leader dies: b takes over within the TTL plus a campaign period */
    int64_t t0 = xllm_registry_now_ns();
    xllm_registry_free(a);
    assert_true(wait_leader(b, true, 2000));
    double ms = (double)(xllm_registry_now_ns() - t0) / 1e6;
    assert_true(ms < 150 + 20 + 400);
    assert_int_equal(xllm_registry_leader(b, &id, err, sizeof(err)), XLLM_OK);
    assert_string_equal(id, "svc-b");
    free(id);

    /* a newcomer waits; b resigns; the newcomer takes over at once */
    xllm_registry *c = open_reg(mem, 5000, NULL, &lc, false);
    assert_int_equal(xllm_registry_campaign(c, "svc-c", &elected, err, sizeof(err)), XLLM_OK);
    assert_false(elected);
    assert_int_equal(xllm_registry_resign(b, err, sizeof(err)), XLLM_OK);
    assert_false(xllm_registry_is_leader(b));
    assert_true(wait_leader(c, true, 500));
    /* b no longer campaigns */
    usleep(100 * 1000);
    assert_false(xllm_registry_is_leader(b));

    /* on_leader told each its changes (from the session thread) */
    int64_t deadline = xllm_registry_now_ns() + 1000000000;
    pthread_mutex_lock(&lc.mu);
    while (!lc.leader && xllm_registry_now_ns() < deadline)
        xllm_registry_cond_wait_until(&lc.cv, &lc.mu, deadline);
    assert_true(lc.leader);
    pthread_mutex_unlock(&lc.mu);
    pthread_mutex_lock(&lb.mu);
    assert_true(lb.leader_changes >= 2 && !lb.leader);
    pthread_mutex_unlock(&lb.mu);
    pthread_mutex_lock(&la.mu);
    assert_true(la.leader_changes >= 1);
    pthread_mutex_unlock(&la.mu);

    /* closing the leader hands over at once (resign + revoke) */
    xllm_registry_free(c);
    xllm_registry *d = open_reg(mem, 5000, NULL, NULL, false);
    assert_int_equal(xllm_registry_campaign(d, "svc-d", &elected, err, sizeof(err)), XLLM_OK);
    assert_true(elected);
    xllm_registry_free(d);
    xllm_registry_free(b);
    col_destroy(&la);
    col_destroy(&lb);
    col_destroy(&lc);
    xllm_registry_mem_free(mem);
}

static void test_incarnations(void **state) {
    (void)state;
    xllm_registry_mem *mem = xllm_registry_mem_new();
    char err[256];
    collector c;
    col_init(&c);
    xllm_registry *w = open_reg(mem, 5000, &c, NULL, false);
    size_t cur = 0;

    /* run 1 of "eng" crashes; run 2 starts before its lease lapses, same role */
    xllm_registry *r1 = open_reg(mem, 5000, NULL, NULL, true);
    uint64_t inc1 = xllm_instance_new_incarnation(), inc2 = xllm_instance_new_incarnation();
    xllm_instance e = inst_of("eng", inc1, XLLM_ROLE_DECODE, "h:1", NULL);
    assert_int_equal(xllm_registry_register(r1, &e, err, sizeof(err)), XLLM_OK);
    assert_true(col_wait(&c, &cur, XLLM_REGISTRY_ADDED, "eng", inc1, 2000) >= 0);
    xllm_registry_free(r1);
    xllm_registry *r2 = open_reg(mem, 5000, NULL, NULL, true);
    e.incarnation = inc2;
    assert_int_equal(xllm_registry_register(r2, &e, err, sizeof(err)), XLLM_OK);
    /* watchers see the old one go before the new one comes, never a "change" */
    long rm = col_wait(&c, &cur, XLLM_REGISTRY_REMOVED, "eng", inc1, 2000);
    assert_true(rm >= 0);
    size_t cur2 = (size_t)rm;
    assert_true(col_wait(&c, &cur2, XLLM_REGISTRY_ADDED, "eng", inc2, 2000) > rm);
    cur = cur2;
    xllm_registry_free(r2);

    /* run 3 starts under another role: the stale key of run 2 goes at once */
    xllm_registry *r3 = open_reg(mem, 5000, NULL, NULL, false);
    uint64_t inc3 = xllm_instance_new_incarnation();
    e.incarnation = inc3;
    e.role = XLLM_ROLE_PREFILL;
    assert_int_equal(xllm_registry_register(r3, &e, err, sizeof(err)), XLLM_OK);
    assert_true(col_wait(&c, &cur, XLLM_REGISTRY_REMOVED, "eng", inc2, 2000) >= 0);
    assert_true(col_wait(&c, &cur, XLLM_REGISTRY_ADDED, "eng", inc3, 2000) >= 0);
    xllm_instance_list l;
    assert_int_equal(xllm_registry_list(w, -1, &l, err, sizeof(err)), XLLM_OK);
    assert_int_equal(l.n, 1);
    assert_true(l.items[0].incarnation == inc3);
    assert_int_equal(l.items[0].role, XLLM_ROLE_PREFILL);
    xllm_instance_list_free(&l);
    xllm_registry_free(r3);
    xllm_registry_free(w);
    col_destroy(&c);
    xllm_registry_mem_free(mem);
}

/* Several sessions registering and deregistering from threads at once, with a watcher: the
 * watcher's final view equals the store's. */
typedef struct churn_arg {
    xllm_registry *reg;
    int id;
} churn_arg;

static void *churn_main(void *p) {
    churn_arg *a = p;
    char err[256], name[32];
    for (int i = 0; i < 40; i++) {
        snprintf(name, sizeof(name), "t%d-%d", a->id, i % 5);
        xllm_instance e = inst_of(name, (uint64_t)(i + 1), (xllm_role)(i % 3), "h:1", NULL);
        if (xllm_registry_register(a->reg, &e, err, sizeof(err)) != XLLM_OK) return p;
        if (i % 4 == 3) xllm_registry_deregister(a->reg, name, err, sizeof(err));
    }
    return NULL;
}

static void test_concurrent_churn(void **state) {
    (void)state;
    xllm_registry_mem *mem = xllm_registry_mem_new();
    collector c;
    col_init(&c);
    xllm_registry *w = open_reg(mem, 5000, &c, NULL, false);
    xllm_registry *regs[3];
    pthread_t thr[3];
    churn_arg args[3];
    for (int i = 0; i < 3; i++) {
        regs[i] = open_reg(mem, 5000, NULL, NULL, false);
        args[i] = (churn_arg){regs[i], i};
        pthread_create(&thr[i], NULL, churn_main, &args[i]);
    }
    for (int i = 0; i < 3; i++) {
        void *rv;
        pthread_join(thr[i], &rv);
        assert_null(rv);
    }
    char err[256];
    xllm_instance_list l;
    assert_int_equal(xllm_registry_list(w, -1, &l, err, sizeof(err)), XLLM_OK);
    /* replay the watcher's events into a set and compare */
    usleep(200 * 1000);
    pthread_mutex_lock(&c.mu);
    size_t live = 0;
    for (size_t i = 0; i < l.n; i++) {
        int state_i = 0;
        for (size_t k = 0; k < c.n; k++) {
            if (strcmp(c.evs[k].inst.name, l.items[i].name) != 0) continue;
            if (c.evs[k].inst.incarnation != l.items[i].incarnation) continue;
            state_i = c.evs[k].type == XLLM_REGISTRY_REMOVED ? 0 : 1;
        }
        live += (size_t)state_i;
    }
    pthread_mutex_unlock(&c.mu);
    assert_int_equal(live, l.n);
    xllm_instance_list_free(&l);
    for (int i = 0; i < 3; i++) xllm_registry_free(regs[i]);
    xllm_registry_free(w);
    col_destroy(&c);
    xllm_registry_mem_free(mem);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_roles_and_json), cmocka_unit_test(test_register_list_update),
        cmocka_unit_test(test_watch_events),   cmocka_unit_test(test_ttl_expiry),
        cmocka_unit_test(test_lease_recovery), cmocka_unit_test(test_election),
        cmocka_unit_test(test_incarnations),   cmocka_unit_test(test_concurrent_churn),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
