/* Unit tests of the router's prefix index: two fake engine instances (libmicrohttpd on loopback)
 * answer GET /v1/instance/load?kv_since=N with scripted prefix-cache events, registered through
 * the embedded registry store; the router's poller applies the events and the prefix policy must
 * follow them: the longest cached run of leading blocks wins, an eviction takes the match away, a
 * reset replaces the set, a new incarnation starts empty, prompts just routed stick until their
 * entries expire, the per-instance bound holds, malformed answers change nothing. */
#include "testutil.h"

#include <inttypes.h>
#include <microhttpd.h>
#include <pthread.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "api/api-impl.h"
#include "service/registry.h"
#include "service/router.h"
#include "util/common.h"

/* ---- a fake engine instance ---------------------------------------------------------------- */

#define FAKE_LOG 512

typedef struct fake {
    struct MHD_Daemon *d;
    int port;
    pthread_mutex_t mu;
    uint64_t set[FAKE_LOG]; /* the blocks its prefix cache holds */
    int n_set;
    struct {
        uint64_t hash;
        bool stored;
    } log[FAKE_LOG]; /* events after cursor `base` */
    int n_log;
    uint64_t base;
    int max_per_answer; /* events per answer; "more" beyond */
    bool bad;           /* answer a malformed kv object */
    bool other_proto;   /* answer with another magic */
    int served;         /* load requests answered */
} fake;

static void hexs(json_t *arr, uint64_t h) {
    char t[17];
    snprintf(t, sizeof(t), "%016" PRIx64, h);
    json_array_append_new(arr, json_string(t));
}

/* Answers like an engine: events after kv_since (netted as the instance RPC does), or the whole
 * set when the cursor is not in its log. */
static enum MHD_Result fake_answer(void *cls, struct MHD_Connection *c, const char *url,
                                   const char *method, const char *version, const char *upload,
                                   size_t *upload_size, void **con_cls) {
    (void)version, (void)upload, (void)upload_size, (void)con_cls, (void)method;
    fake *f = cls;
    if (strcmp(url, "/v1/instance/load") != 0) return MHD_NO;
    const char *since_s = MHD_lookup_connection_value(c, MHD_GET_ARGUMENT_KIND, "kv_since");
    uint64_t since = since_s ? strtoull(since_s, NULL, 10) : 0;
    json_t *stored = json_array(), *evicted = json_array();
    pthread_mutex_lock(&f->mu);
    uint64_t next = f->base + (uint64_t)f->n_log;
    bool reset = since < f->base || since > next, more = false;
    if (reset) {
        for (int i = 0; i < f->n_set; i++) hexs(stored, f->set[i]);
    } else {
        int from = (int)(since - f->base), to = XLLM_MIN(f->n_log, from + f->max_per_answer);
        more = to < f->n_log;
        next = f->base + (uint64_t)to;
        xllm_kv_events ev = {.next = next, .n = to - from};
        ev.ev = xllm_xcalloc((size_t)ev.n + 1, sizeof(xllm_kv_event));
        for (int i = from; i < to; i++)
            ev.ev[i - from] = (xllm_kv_event){.seq = f->base + (uint64_t)i + 1,
                                              .hash = f->log[i].hash,
                                              .kind = f->log[i].stored ? XLLM_KV_EVENT_STORED
                                                                       : XLLM_KV_EVENT_EVICTED};
        xllm_kv_events_net(&ev);
        for (int32_t i = 0; i < ev.n; i++)
            hexs(ev.ev[i].kind == XLLM_KV_EVENT_STORED ? stored : evicted, ev.ev[i].hash);
        xllm_kv_events_free(&ev);
    }
    if (f->bad) json_array_append_new(stored, json_string("00000000000000zz"));
    json_t *o =
        json_pack("{s:s,s:i,s:i,s:i,s:f,s:i}", "magic", f->other_proto ? "other-rpc" : "xllm-rpc",
                  "version", 1, "running", 0, "waiting", 0, "kv_usage", 0.0, "in_flight", 0);
    if (since_s)
        json_object_set_new(o, "kv",
                            json_pack("{s:i,s:s,s:I,s:b,s:b,s:o,s:o}", "block_tokens", 16, "hash",
                                      "xxh3-chain-v1", "next", (json_int_t)next, "reset", reset,
                                      "more", more, "stored", stored, "evicted", evicted));
    else
        json_decref(stored), json_decref(evicted);
    f->served++;
    pthread_mutex_unlock(&f->mu);
    char *t = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    struct MHD_Response *r = MHD_create_response_from_buffer(strlen(t), t, MHD_RESPMEM_MUST_FREE);
    enum MHD_Result ret = MHD_queue_response(c, 200, r);
    MHD_destroy_response(r);
    return ret;
}

static void fake_start(fake *f) {
    memset(f, 0, sizeof(*f));
    pthread_mutex_init(&f->mu, NULL);
    f->base = 1000;
    f->max_per_answer = 3;
    f->d = MHD_start_daemon(MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_THREAD_PER_CONNECTION, 0,
                            NULL, NULL, fake_answer, f, MHD_OPTION_END);
    assert_non_null(f->d);
    f->port = MHD_get_daemon_info(f->d, MHD_DAEMON_INFO_BIND_PORT)->port;
}

static void fake_stop(fake *f) {
    MHD_stop_daemon(f->d);
    pthread_mutex_destroy(&f->mu);
}

static void fake_store(fake *f, uint64_t h) {
    pthread_mutex_lock(&f->mu);
    assert_true(f->n_set < FAKE_LOG && f->n_log < FAKE_LOG);
    f->set[f->n_set++] = h;
    f->log[f->n_log].hash = h;
    f->log[f->n_log++].stored = true;
    pthread_mutex_unlock(&f->mu);
}

static void fake_evict(fake *f, uint64_t h) {
    pthread_mutex_lock(&f->mu);
    int i = 0;
    while (i < f->n_set && f->set[i] != h) i++;
    assert_true(i < f->n_set);
    f->set[i] = f->set[--f->n_set];
    f->log[f->n_log].hash = h;
    f->log[f->n_log++].stored = false;
    pthread_mutex_unlock(&f->mu);
}

/* Its event log is lost (as when a reader falls behind the ring): the next read is a reset. */
static void fake_lose_log(fake *f) {
    pthread_mutex_lock(&f->mu);
    f->base += (uint64_t)f->n_log + 100;
    f->n_log = 0;
    pthread_mutex_unlock(&f->mu);
}

/* A restarted engine: an empty cache and a new cursor space. */
static void fake_restart(fake *f) {
    pthread_mutex_lock(&f->mu);
    f->n_set = f->n_log = 0;
    f->base = 777777;
    pthread_mutex_unlock(&f->mu);
}

static int fake_served(fake *f) {
    pthread_mutex_lock(&f->mu);
    int n = f->served;
    pthread_mutex_unlock(&f->mu);
    return n;
}

/* ---- the router, fed by the embedded registry ------------------------------------------------ */

typedef struct cluster {
    fake a, b;
    xllm_registry_mem *mem;
    xllm_registry *svc, *eng; /* the service's session (watch) and the engines' */
    xllm_router *r;
} cluster;

static xllm_registry *open_reg(xllm_registry_mem *mem, xllm_router *r) {
    xllm_registry_params p = xllm_registry_default_params();
    p.store = xllm_registry_mem_store(mem);
    p.cluster = "rt";
    if (r) {
        p.on_event = xllm_router_on_event;
        p.on_event_user = r;
    }
    xllm_registry *reg = NULL;
    char err[256];
    assert_int_equal(xllm_registry_new(&p, &reg, err, sizeof(err)), XLLM_OK);
    return reg;
}

static void register_inst(cluster *c, const char *name, uint64_t inc, int port) {
    char addr[64];
    snprintf(addr, sizeof(addr), "127.0.0.1:%d", port);
    xllm_instance in = {.name = (char *)name,
                        .incarnation = inc,
                        .role = XLLM_ROLE_MIXED,
                        .addr = addr,
                        .attrs = "{\"kv_block_tokens\":16}"};
    char err[256];
    assert_int_equal(xllm_registry_register(c->eng, &in, err, sizeof(err)), XLLM_OK);
}

static int64_t metric(xllm_router *r, const char *name, const char *inst);

/* Waits until cond holds; the deadline only keeps a broken build from hanging. */
#define WAIT_FOR(cond)                                                                             \
    do {                                                                                           \
        int waited_ = 0;                                                                           \
        while (!(cond) && waited_++ < 2000) usleep(5000);                                          \
        assert_true(cond);                                                                         \
    } while (0)

static void cluster_start(cluster *c, const xllm_router_params *rp) {
    fake_start(&c->a);
    fake_start(&c->b);
    c->r = xllm_router_new(rp);
    c->mem = xllm_registry_mem_new();
    c->svc = open_reg(c->mem, c->r);
    c->eng = open_reg(c->mem, NULL);
    register_inst(c, "A", 1, c->a.port);
    register_inst(c, "B", 2, c->b.port);
    WAIT_FOR(xllm_router_n_routable(c->r) == 2);
    /* both have answered a first (reset) read */
    WAIT_FOR(metric(c->r, "xllm_cluster_prefix_resets_total", "A") >= 1 &&
             metric(c->r, "xllm_cluster_prefix_resets_total", "B") >= 1);
}

static void cluster_stop(cluster *c) {
    xllm_registry_free(c->eng);
    xllm_registry_free(c->svc); /* stops the watch before the router goes */
    xllm_registry_mem_free(c->mem);
    xllm_router_free(c->r);
    fake_stop(&c->a);
    fake_stop(&c->b);
}

/* A per-instance series of the router's /metrics, -1 when absent. */
static int64_t metric(xllm_router *r, const char *name, const char *inst) {
    xllm_api_buf b = {0};
    xllm_router_metrics(r, &b);
    xllm_api_buf_add(&b, "", 1);
    char key[160];
    snprintf(key, sizeof(key), "\n%s{instance=\"%s\"} ", name, inst);
    const char *at = strstr(b.p, key);
    int64_t v = at ? strtoll(at + strlen(key), NULL, 10) : -1;
    xllm_api_buf_free(&b);
    return v;
}

/* Routes the prompt (avoiding `avoid` when not NULL), ends the request, returns the instance. */
static char picked[64];
static const char *route(cluster *c, const int32_t *p, int32_t n, const char *avoid) {
    char av[1][64];
    if (avoid) snprintf(av[0], sizeof(av[0]), "%s", avoid);
    xllm_route rt;
    char err[256];
    const xllm_route_req q = {.prompt = p, .n_prompt = n};
    assert_int_equal(xllm_router_pick(c->r, &q, av, avoid ? 1 : 0, &rt, err, sizeof(err)), XLLM_OK);
    assert_false(rt.pd);
    xllm_router_done(c->r, &rt, 1, 0, NULL);
    snprintf(picked, sizeof(picked), "%s", rt.run.name);
    return picked;
}

/* A prompt of 100 tokens (6 full 16-token blocks) and its chained hashes. */
typedef struct prompt {
    int32_t ids[100];
    uint64_t h[6];
} prompt;

static void make_prompt(prompt *p, int seed) {
    for (int i = 0; i < 100; i++) p->ids[i] = (i * 31 + seed * 1009) % 5000;
    uint64_t parent = XLLM_KV_HASH_ROOT;
    for (int b = 0; b < 6; b++) p->h[b] = parent = xllm_kv_block_hash(p->ids + 16 * b, 16, parent);
}

static int64_t blocks(cluster *c, const char *inst) {
    return metric(c->r, "xllm_cluster_prefix_blocks", inst);
}

/* Does the router hold incarnation inc of instance name (the watch is asynchronous)? */
static bool has_incarnation(cluster *c, const char *name, uint64_t inc) {
    char *t = xllm_router_describe(c->r);
    char want[128];
    snprintf(want, sizeof(want), "\"name\":\"%s\",\"incarnation\":\"%016" PRIx64 "\"", name, inc);
    bool found = strstr(t, want) != NULL;
    free(t);
    return found;
}

/* ---- tests ------------------------------------------------------------------------------------
 */

static xllm_router_params params(void) {
    xllm_router_params rp = xllm_router_default_params();
    rp.policy = XLLM_POLICY_PREFIX;
    rp.poll_ms = 10;
    rp.prefix_pending_ms = 600000; /* nothing expires during a test unless it asks */
    return rp;
}

static void test_follows_events(void **state) {
    (void)state;
    cluster c;
    xllm_router_params rp = params();
    cluster_start(&c, &rp);
    prompt p1, p2, p3, p4;
    make_prompt(&p1, 1);
    make_prompt(&p2, 2);
    make_prompt(&p3, 3);
    make_prompt(&p4, 4);

    /* the longest cached run wins: A holds 2 leading blocks, B 4 (read in pieces of 3) */
    fake_store(&c.a, p1.h[0]);
    fake_store(&c.a, p1.h[1]);
    for (int b = 0; b < 4; b++) fake_store(&c.b, p1.h[b]);
    WAIT_FOR(blocks(&c, "A") == 2 && blocks(&c, "B") == 4);
    assert_string_equal(route(&c, p1.ids, 100, NULL), "B");
    /* B's pending entries: the blocks of p1 it did not hold yet */
    assert_int_equal(metric(c.r, "xllm_cluster_prefix_pending", "B"), 2);

    /* after an eviction event the match is gone: B's run breaks at block 1 */
    fake_store(&c.a, p2.h[0]);
    fake_store(&c.a, p2.h[1]);
    for (int b = 0; b < 4; b++) fake_store(&c.b, p2.h[b]);
    WAIT_FOR(blocks(&c, "A") == 4 && blocks(&c, "B") == 8);
    assert_string_equal(route(&c, p2.ids, 100, NULL), "B");
    fake_evict(&c.b, p2.h[1]);
    WAIT_FOR(blocks(&c, "B") == 7);
    assert_string_equal(route(&c, p2.ids, 100, NULL), "A");

    /* a reset replaces the set: A's events are lost, its snapshot holds p3's first 3 blocks */
    int64_t resets = metric(c.r, "xllm_cluster_prefix_resets_total", "A");
    fake_store(&c.b, p3.h[0]);
    fake_store(&c.a, p3.h[0]);
    fake_store(&c.a, p3.h[1]);
    fake_store(&c.a, p3.h[2]);
    fake_lose_log(&c.a);
    WAIT_FOR(metric(c.r, "xllm_cluster_prefix_resets_total", "A") == resets + 1 &&
             blocks(&c, "B") == 8);
    assert_int_equal(blocks(&c, "A"), 7); /* p1: 2, p2: 2, p3: 3 */
    assert_string_equal(route(&c, p3.ids, 100, NULL), "A");

    /* a new incarnation of B starts with an empty index and reads its whole set */
    fake_restart(&c.b);
    for (int b = 0; b < 5; b++) fake_store(&c.b, p4.h[b]);
    fake_store(&c.a, p4.h[0]);
    register_inst(&c, "B", 3, c.b.port);
    WAIT_FOR(has_incarnation(&c, "B", 3) && blocks(&c, "B") == 5 && blocks(&c, "A") == 8);
    assert_int_equal(metric(c.r, "xllm_cluster_prefix_pending", "B"), 0);
    assert_string_equal(route(&c, p4.ids, 100, NULL), "B");
    assert_string_equal(route(&c, p1.ids, 100, NULL), "A"); /* B's old blocks are gone */

    /* a malformed answer is ignored whole, and the cursor stays: nothing is lost */
    pthread_mutex_lock(&c.a.mu);
    c.a.bad = true;
    pthread_mutex_unlock(&c.a.mu);
    fake_store(&c.a, p4.h[1]);
    WAIT_FOR(metric(c.r, "xllm_cluster_prefix_bad_answers_total", "A") >= 2);
    assert_int_equal(blocks(&c, "A"), 8);
    pthread_mutex_lock(&c.a.mu);
    c.a.bad = false;
    pthread_mutex_unlock(&c.a.mu);
    WAIT_FOR(blocks(&c, "A") == 9);
    cluster_stop(&c);
}

/* The tie-break's choice for a prompt nobody holds (dflt) and the other instance. */
static void tie_break(cluster *c, int seed, char *dflt, char *other, fake **fo) {
    prompt p;
    make_prompt(&p, seed);
    snprintf(dflt, 64, "%s", route(c, p.ids, 100, NULL));
    snprintf(other, 64, "%s", strcmp(dflt, "A") ? "A" : "B");
    *fo = strcmp(other, "A") ? &c->b : &c->a;
}

/* A burst of equal prompts sticks to where the first went, before any event; the events confirm
 * the entries. */
static void test_pending(void **state) {
    (void)state;
    cluster c;
    xllm_router_params rp = params();
    cluster_start(&c, &rp);
    char dflt[64], other[64];
    fake *fo;
    tie_break(&c, 6, dflt, other, &fo);
    prompt p5;
    make_prompt(&p5, 5);
    assert_string_equal(route(&c, p5.ids, 100, dflt), other);
    assert_string_equal(route(&c, p5.ids, 100, NULL), other); /* sticks, by pending entries */
    assert_int_equal(metric(c.r, "xllm_cluster_prefix_pending", other), 6);
    assert_int_equal(blocks(&c, other), 0);
    /* the instance confirms: the entries become its blocks */
    for (int b = 0; b < 6; b++) fake_store(fo, p5.h[b]);
    WAIT_FOR(blocks(&c, other) == 6);
    assert_int_equal(metric(c.r, "xllm_cluster_prefix_pending", other), 0);
    assert_string_equal(route(&c, p5.ids, 100, NULL), other);
    /* an eviction removes a pending entry too: the next prompt's run stops there */
    prompt p10;
    make_prompt(&p10, 10);
    assert_string_equal(route(&c, p10.ids, 100, dflt), other);
    assert_int_equal(metric(c.r, "xllm_cluster_prefix_pending", other), 6);
    fake_store(fo, p10.h[0]);
    fake_evict(fo, p10.h[0]);
    WAIT_FOR(metric(c.r, "xllm_cluster_prefix_pending", other) == 5 && blocks(&c, other) == 6);
    assert_string_equal(route(&c, p10.ids, 100, NULL), dflt);
    cluster_stop(&c);
}

/* Unconfirmed entries expire: the next equal prompt goes by the tie-break again; confirmed
 * blocks do not expire. */
static void test_pending_expiry(void **state) {
    (void)state;
    cluster c;
    xllm_router_params rp = params();
    rp.prefix_pending_ms = 1;
    cluster_start(&c, &rp);
    char dflt[64], other[64];
    fake *fo;
    tie_break(&c, 6, dflt, other, &fo);
    prompt p7, p11;
    make_prompt(&p7, 7);
    make_prompt(&p11, 11);
    assert_string_equal(route(&c, p7.ids, 100, dflt), other);
    usleep(20 * 1000); /* well past 1 ms */
    assert_string_equal(route(&c, p7.ids, 100, NULL), dflt);
    assert_int_equal(metric(c.r, "xllm_cluster_prefix_pending", other), 0);
    for (int b = 0; b < 6; b++) fake_store(fo, p11.h[b]);
    WAIT_FOR(blocks(&c, other) == 6);
    usleep(20 * 1000);
    assert_string_equal(route(&c, p11.ids, 100, NULL), other);
    cluster_stop(&c);
}

/* The per-instance bound: blocks beyond it are not indexed, and counted. */
static void test_bound(void **state) {
    (void)state;
    cluster c;
    xllm_router_params rp = params();
    rp.prefix_max_blocks = 4;
    cluster_start(&c, &rp);
    prompt p8, p9;
    make_prompt(&p8, 8);
    make_prompt(&p9, 9);
    const char *d = route(&c, p9.ids, 100, NULL); /* the tie-break's choice */
    const char *o = strcmp(d, "A") ? "A" : "B";
    fake *fo = strcmp(o, "A") ? &c.b : &c.a;
    for (int b = 0; b < 6; b++) fake_store(fo, p8.h[b]);
    WAIT_FOR(metric(c.r, "xllm_cluster_prefix_dropped_total", o) == 2);
    assert_int_equal(blocks(&c, o), 4);
    /* the first four arrived first and are the ones kept: they route p8 to that instance */
    assert_string_equal(route(&c, p8.ids, 100, NULL), o);
    int served = fake_served(fo);
    WAIT_FOR(fake_served(fo) >= served + 2);
    assert_int_equal(blocks(&c, o), 4);
    assert_int_equal(metric(c.r, "xllm_cluster_prefix_pending", o), 0); /* no room either */
    cluster_stop(&c);
}

/* A load answer of another protocol is no answer: its events are not applied until the instance
 * speaks the RPC again. */
static void test_other_protocol(void **state) {
    (void)state;
    cluster c;
    xllm_router_params rp = params();
    cluster_start(&c, &rp);
    prompt p5;
    make_prompt(&p5, 5);
    pthread_mutex_lock(&c.a.mu);
    c.a.other_proto = true;
    pthread_mutex_unlock(&c.a.mu);
    int64_t before = blocks(&c, "A");
    fake_store(&c.a, p5.h[0]);
    int served = fake_served(&c.a);
    WAIT_FOR(fake_served(&c.a) >= served + 3);
    assert_int_equal(blocks(&c, "A"), before);
    pthread_mutex_lock(&c.a.mu);
    c.a.other_proto = false;
    pthread_mutex_unlock(&c.a.mu);
    WAIT_FOR(blocks(&c, "A") == before + 1);
    cluster_stop(&c);
}

/* The parser of the kv object: what it accepts, and that anything malformed is refused whole. */
static void test_parse(void **state) {
    (void)state;
    static const char *const good =
        "{\"kv\":{\"block_tokens\":64,\"hash\":\"xxh3-chain-v1\",\"next\":4294967301,"
        "\"reset\":false,\"more\":true,\"stored\":[\"0123456789abcdef\",\"FFFFFFFFFFFFFFFF\"],"
        "\"evicted\":[\"0000000000000001\"]}}";
    xllm_router_kv_answer a;
    assert_true(xllm_router_kv_parse(good, strlen(good), &a));
    assert_int_equal(a.block_tokens, 64);
    assert_true(a.next == 4294967301ull && !a.reset && a.more);
    assert_int_equal(a.n_stored, 2);
    assert_true(a.stored[0] == 0x0123456789abcdefull && a.stored[1] == UINT64_MAX);
    assert_int_equal(a.n_evicted, 1);
    assert_true(a.evicted[0] == 1);
    xllm_router_kv_answer_clear(&a);
    static const char *const bad[] = {
        "{}",
        "not json",
        "{\"kv\":{\"block_tokens\":64,\"hash\":\"fnv\",\"next\":5,\"reset\":true,"
        "\"stored\":[],\"evicted\":[]}}",
        "{\"kv\":{\"block_tokens\":0,\"hash\":\"xxh3-chain-v1\",\"next\":5,\"reset\":true,"
        "\"stored\":[],\"evicted\":[]}}",
        "{\"kv\":{\"block_tokens\":16,\"hash\":\"xxh3-chain-v1\",\"next\":0,\"reset\":true,"
        "\"stored\":[],\"evicted\":[]}}",
        "{\"kv\":{\"block_tokens\":16,\"hash\":\"xxh3-chain-v1\",\"next\":5,\"reset\":1,"
        "\"stored\":[],\"evicted\":[]}}",
        "{\"kv\":{\"block_tokens\":16,\"hash\":\"xxh3-chain-v1\",\"next\":5,\"reset\":false,"
        "\"stored\":[\"0x23456789abcdef\"],\"evicted\":[]}}",
        "{\"kv\":{\"block_tokens\":16,\"hash\":\"xxh3-chain-v1\",\"next\":5,\"reset\":false,"
        "\"stored\":[\"0123456789abcdef0\"],\"evicted\":[]}}",
        "{\"kv\":{\"block_tokens\":16,\"hash\":\"xxh3-chain-v1\",\"next\":5,\"reset\":false,"
        "\"stored\":[],\"evicted\":[12]}}",
        "{\"kv\":{\"block_tokens\":16,\"hash\":\"xxh3-chain-v1\",\"next\":5,\"reset\":false,"
        "\"stored\":[]}}",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        assert_false(xllm_router_kv_parse(bad[i], strlen(bad[i]), &a));
        xllm_router_kv_answer_clear(&a);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parse),   cmocka_unit_test(test_follows_events),
        cmocka_unit_test(test_pending), cmocka_unit_test(test_pending_expiry),
        cmocka_unit_test(test_bound),   cmocka_unit_test(test_other_protocol),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
