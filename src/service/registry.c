/* Instance registry over any store (registry.h): key layout, instance JSON, the session thread
 * (lease keepalive, lease recovery, election retries) and the watch cache that turns key events
 * into instance events. */
#include "service/registry.h"

#include <errno.h>
#include <jansson.h>
#include <pthread.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include "service/registry-impl.h"
#include "util/common.h"

#define NAME_MAX_LEN  63
#define ADDR_MAX_LEN  255
#define ID_MAX_LEN    255
#define ATTRS_MAX_LEN 65536

/* ============================================================================================ */
/* Small helpers                                                                                */
/* ============================================================================================ */

int64_t xllm_registry_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

void xllm_registry_cond_init(pthread_cond_t *cv) {
    pthread_condattr_t a;
    pthread_condattr_init(&a);
    pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
    pthread_cond_init(cv, &a);
    pthread_condattr_destroy(&a);
}

void xllm_registry_cond_wait_until(pthread_cond_t *cv, pthread_mutex_t *mu, int64_t deadline_ns) {
    struct timespec ts = {.tv_sec = deadline_ns / 1000000000, .tv_nsec = deadline_ns % 1000000000};
    int rc = pthread_cond_timedwait(cv, mu, &ts);
    XLLM_ASSERT(rc == 0 || rc == ETIMEDOUT);
}

const char *xllm_role_name(xllm_role role) {
    switch (role) {
        case XLLM_ROLE_MIXED:
            return "mixed";
        case XLLM_ROLE_PREFILL:
            return "prefill";
        case XLLM_ROLE_DECODE:
            return "decode";
        default:
            return NULL;
    }
}

xllm_status xllm_role_parse(const char *s, xllm_role *out) {
    for (int r = 0; r < XLLM_ROLE_COUNT; r++) {
        if (s && strcmp(s, xllm_role_name((xllm_role)r)) == 0) {
            *out = (xllm_role)r;
            return XLLM_OK;
        }
    }
    return XLLM_ERR_INVALID_ARG;
}

void xllm_instance_clear(xllm_instance *inst) {
    if (!inst) return;
    free(inst->name);
    free(inst->addr);
    free(inst->attrs);
    memset(inst, 0, sizeof(*inst));
}

void xllm_instance_copy(xllm_instance *dst, const xllm_instance *src) {
    dst->name = xllm_xstrdup(src->name ? src->name : "");
    dst->incarnation = src->incarnation;
    dst->role = src->role;
    dst->addr = xllm_xstrdup(src->addr ? src->addr : "");
    dst->attrs = xllm_xstrdup(src->attrs ? src->attrs : "{}");
}

uint64_t xllm_instance_new_incarnation(void) {
    uint64_t v = 0;
    if (getrandom(&v, sizeof(v), 0) != (ssize_t)sizeof(v)) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        v = ((uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec) ^
            ((uint64_t)getpid() << 40) ^ (uint64_t)xllm_registry_now_ns();
        v ^= v >> 33;
        v *= 0xff51afd7ed558ccdULL;
        v ^= v >> 33;
    }
    return v ? v : 1;
}

void xllm_instance_list_free(xllm_instance_list *list) {
    if (!list) return;
    for (size_t i = 0; i < list->n; i++) xllm_instance_clear(&list->items[i]);
    free(list->items);
    memset(list, 0, sizeof(*list));
}

void xllm_registry_kvs_free(xllm_registry_kv *kvs, size_t n) {
    for (size_t i = 0; i < n; i++) {
        free(kvs[i].key);
        free(kvs[i].value);
    }
    free(kvs);
}

static bool valid_name(const char *s) {
    size_t n = s ? strlen(s) : 0;
    if (n == 0 || n > NAME_MAX_LEN) return false;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '.' || c == '_' || c == '-'))
            return false;
    }
    return true;
}

static bool valid_text(const char *s, size_t max) {
    size_t n = s ? strlen(s) : 0;
    if (n == 0 || n > max) return false;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] <= ' ' || s[i] == 0x7f) return false;
    return true;
}

/* ============================================================================================ */
/* Instance JSON                                                                                */
/* ============================================================================================ */

/* Parses attrs text (NULL or "" = {}) into a JSON object; NULL with err when it is not one. */
static json_t *parse_attrs(const char *attrs, char *err, size_t err_size) {
    if (!attrs || !attrs[0]) return json_object();
    if (strlen(attrs) > ATTRS_MAX_LEN) {
        xllm_set_err(err, err_size, "registry: attrs longer than %d bytes", ATTRS_MAX_LEN);
        return NULL;
    }
    json_error_t je;
    json_t *o = json_loads(attrs, JSON_REJECT_DUPLICATES, &je);
    if (!o || !json_is_object(o)) {
        xllm_set_err(err, err_size, "registry: attrs must be a JSON object%s%s", o ? "" : ": ",
                     o ? "" : je.text);
        json_decref(o);
        return NULL;
    }
    return o;
}

char *xllm_registry_instance_encode(const xllm_instance *inst, char *err, size_t err_size) {
    if (!inst || !valid_name(inst->name)) {
        xllm_set_err(err, err_size, "registry: instance name must be 1-%d of [A-Za-z0-9._-]",
                     NAME_MAX_LEN);
        return NULL;
    }
    if (inst->incarnation == 0) {
        xllm_set_err(err, err_size, "registry: instance %s: incarnation must be nonzero",
                     inst->name);
        return NULL;
    }
    if (!xllm_role_name(inst->role)) {
        xllm_set_err(err, err_size, "registry: instance %s: invalid role %d", inst->name,
                     (int)inst->role);
        return NULL;
    }
    if (!valid_text(inst->addr, ADDR_MAX_LEN)) {
        xllm_set_err(err, err_size, "registry: instance %s: addr must be host:port", inst->name);
        return NULL;
    }
    json_t *attrs = parse_attrs(inst->attrs, err, err_size);
    if (!attrs) return NULL;
    char inc[17];
    snprintf(inc, sizeof(inc), "%016llx", (unsigned long long)inst->incarnation);
    json_t *o = json_pack("{s:s, s:s, s:s, s:s, s:o}", "name", inst->name, "incarnation", inc,
                          "role", xllm_role_name(inst->role), "addr", inst->addr, "attrs", attrs);
    XLLM_ASSERT(o);
    char *s = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    XLLM_ASSERT(s);
    return s;
}

xllm_status xllm_registry_instance_decode(const char *text, size_t len, xllm_instance *out,
                                          char *err, size_t err_size) {
    memset(out, 0, sizeof(*out));
    json_error_t je;
    json_t *o = json_loadb(text, len, JSON_REJECT_DUPLICATES, &je);
    if (!o || !json_is_object(o)) {
        xllm_set_err(err, err_size, "registry: instance value is not a JSON object%s%s",
                     o ? "" : ": ", o ? "" : je.text);
        json_decref(o);
        return XLLM_ERR_FORMAT;
    }
    const char *name = json_string_value(json_object_get(o, "name"));
    const char *inc = json_string_value(json_object_get(o, "incarnation"));
    const char *role = json_string_value(json_object_get(o, "role"));
    const char *addr = json_string_value(json_object_get(o, "addr"));
    json_t *attrs = json_object_get(o, "attrs");
    xllm_role r = XLLM_ROLE_MIXED;
    uint64_t incv = 0;
    bool ok = valid_name(name) && valid_text(addr, ADDR_MAX_LEN) &&
              xllm_role_parse(role, &r) == XLLM_OK && inc && strlen(inc) >= 1 &&
              strlen(inc) <= 16 && (!attrs || json_is_object(attrs));
    for (size_t i = 0; ok && inc[i]; i++) {
        char c = inc[i];
        int d = c >= '0' && c <= '9'   ? c - '0'
                : c >= 'a' && c <= 'f' ? c - 'a' + 10
                : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                       : -1;
        if (d < 0) ok = false;
        incv = incv << 4 | (uint64_t)(d < 0 ? 0 : d);
    }
    if (!ok || incv == 0) {
        xllm_set_err(err, err_size,
                     "registry: instance value lacks a valid name, incarnation, "
                     "role or addr");
        json_decref(o);
        return XLLM_ERR_FORMAT;
    }
    char *attrs_text = attrs ? json_dumps(attrs, JSON_COMPACT) : xllm_xstrdup("{}");
    XLLM_ASSERT(attrs_text);
    out->name = xllm_xstrdup(name);
    out->incarnation = incv;
    out->role = r;
    out->addr = xllm_xstrdup(addr);
    out->attrs = attrs_text;
    json_decref(o);
    return XLLM_OK;
}

static bool same_instance(const xllm_instance *a, const xllm_instance *b) {
    return strcmp(a->name, b->name) == 0 && a->incarnation == b->incarnation;
}

static bool same_state(const xllm_instance *a, const xllm_instance *b) {
    return same_instance(a, b) && a->role == b->role && strcmp(a->addr, b->addr) == 0 &&
           strcmp(a->attrs, b->attrs) == 0;
}

/* ============================================================================================ */
/* The registry handle                                                                          */
/* ============================================================================================ */

typedef struct mine_entry {
    xllm_instance inst;
    char *key;
} mine_entry;

typedef struct cache_entry {
    char *key;
    xllm_instance inst;
} cache_entry;

struct xllm_registry {
    xllm_registry_store st;
    char *inst_prefix; /* /xllm/<cluster>/instances/ */
    char *master_key;  /* /xllm/<cluster>/master */
    int64_t ttl_ms, keepalive_ms, campaign_ms;
    xllm_registry_event_fn on_event;
    void *on_event_user;
    xllm_registry_leader_fn on_leader;
    void *on_leader_user;
    bool abandon;

    /* Serializes the writes that depend on the lease id (register, update, deregister,
     * campaign, resign, lease recovery), so none runs with a lease that is being replaced.
     * Taken before mu, never while holding mu. */
    pthread_mutex_t opmu;
    /* Guards the fields below; the session thread waits on cv. */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int64_t lease, granted_ms;
    int64_t lease_deadline_ns; /* local bound: the lease surely lives until then */
    mine_entry *mine;
    size_t n_mine;
    char *cand_id; /* NULL = not campaigning */
    bool leader;   /* holds the master key (as of the last check) */
    bool reported; /* the leader state last told to on_leader */
    bool kick;     /* campaign/check now */
    bool stop;
    pthread_t thr;
    bool thr_started;
    bool ka_failing; /* session thread only: the last keepalive failed (log changes only) */

    /* Watch state: touched only on the store's watch thread once the watch runs. */
    void *watch;
    cache_entry *cache; /* sorted by key */
    size_t n_cache;
    int64_t cache_rev;
};

xllm_registry_params xllm_registry_default_params(void) {
    xllm_registry_params p;
    memset(&p, 0, sizeof(p));
    p.cluster = "default";
    p.ttl_ms = 10000;
    return p;
}

static char *key_for(const xllm_registry *reg, xllm_role role, const char *name) {
    size_t n = strlen(reg->inst_prefix) + strlen(name) + 16;
    char *k = xllm_xmalloc(n);
    snprintf(k, n, "%s%s/%s", reg->inst_prefix, xllm_role_name(role), name);
    return k;
}

static void cache_clear(cache_entry *c, size_t n) {
    for (size_t i = 0; i < n; i++) {
        free(c[i].key);
        xllm_instance_clear(&c[i].inst);
    }
    free(c);
}

/* ============================================================================================ */
/* Watch cache (store watch thread)                                                            */
/* ============================================================================================ */

static void emit(xllm_registry *reg, xllm_registry_event_type t, const xllm_instance *inst,
                 int64_t rev) {
    xllm_registry_event ev = {.type = t, .inst = inst, .revision = rev};
    reg->on_event(&ev, reg->on_event_user);
}

/* Replaces the cache by next (sorted by key, ownership taken) and reports the difference:
 * removals first (a stale incarnation before its successor), then changes, then additions. A
 * key removed and another added for the same (name, incarnation) is a role change. */
static void cache_replace(xllm_registry *reg, cache_entry *next, size_t n_next, int64_t rev) {
    cache_entry *old = reg->cache;
    size_t n_old = reg->n_cache;
    /* removed[i] / added[j]: indexes into old / next; -1 once paired into a change */
    size_t *removed = xllm_xcalloc(n_old + 1, sizeof(size_t));
    size_t *added = xllm_xcalloc(n_next + 1, sizeof(size_t));
    size_t n_rm = 0, n_add = 0;
    size_t i = 0, j = 0;
    while (i < n_old || j < n_next) {
        int c = i == n_old ? 1 : j == n_next ? -1 : strcmp(old[i].key, next[j].key);
        if (c < 0) {
            removed[n_rm++] = i++;
        } else if (c > 0) {
            added[n_add++] = j++;
        } else {
            if (!same_instance(&old[i].inst, &next[j].inst)) {
                removed[n_rm++] = i;
                added[n_add++] = j;
            } else if (!same_state(&old[i].inst, &next[j].inst)) {
                emit(reg, XLLM_REGISTRY_CHANGED, &next[j].inst, rev);
            }
            i++, j++;
        }
    }
    for (size_t a = 0; a < n_rm; a++) {
        bool paired = false;
        for (size_t b = 0; b < n_add && !paired; b++) {
            if (added[b] != (size_t)-1 &&
                same_instance(&old[removed[a]].inst, &next[added[b]].inst)) {
                emit(reg, XLLM_REGISTRY_CHANGED, &next[added[b]].inst, rev);
                added[b] = (size_t)-1;
                paired = true;
            }
        }
        if (!paired) emit(reg, XLLM_REGISTRY_REMOVED, &old[removed[a]].inst, rev);
    }
    for (size_t b = 0; b < n_add; b++)
        if (added[b] != (size_t)-1) emit(reg, XLLM_REGISTRY_ADDED, &next[added[b]].inst, rev);
    free(removed);
    free(added);
    cache_clear(old, n_old);
    reg->cache = next;
    reg->n_cache = n_next;
    if (rev > reg->cache_rev) reg->cache_rev = rev;
}

static int cache_cmp(const void *a, const void *b) {
    return strcmp(((const cache_entry *)a)->key, ((const cache_entry *)b)->key);
}

/* Reads the whole instance prefix again and reports the difference from the cache. */
static void watch_resync(xllm_registry *reg) {
    xllm_registry_kv *kvs = NULL;
    size_t n = 0;
    int64_t rev = 0;
    char err[256];
    /* Retry a few times: a resync comes right after the watch (re)started, so the store is
     * usually reachable; if not, the next resync (watch restart) will catch up. */
    xllm_status st = XLLM_ERR_IO;
    for (int tries = 0; tries < 3 && st != XLLM_OK; tries++) {
        st = reg->st.iface->range(reg->st.ctx, reg->inst_prefix, true, &kvs, &n, &rev, err,
                                  sizeof(err));
        if (st != XLLM_OK) usleep(100 * 1000);
    }
    if (st != XLLM_OK) {
        fprintf(stderr, "xllm registry: watch resync failed: %s\n", err);
        return;
    }
    cache_entry *next = xllm_xcalloc(n + 1, sizeof(cache_entry));
    size_t m = 0;
    for (size_t i = 0; i < n; i++) {
        if (xllm_registry_instance_decode(kvs[i].value, strlen(kvs[i].value), &next[m].inst, NULL,
                                          0) != XLLM_OK)
            continue;
        next[m].key = kvs[i].key;
        kvs[i].key = NULL;
        m++;
    }
    xllm_registry_kvs_free(kvs, n);
    qsort(next, m, sizeof(cache_entry), cache_cmp);
    /* A resync may read an older revision than events already applied only if the store went
     * back in time (restored from a backup); then the read wins. */
    reg->cache_rev = 0;
    cache_replace(reg, next, m, rev);
}

/* Store watch callback: apply the key events to a copy of the cache, then diff. */
static void watch_fn(void *user, const xllm_registry_kv_event *evs, size_t n, bool resync) {
    xllm_registry *reg = user;
    if (resync) {
        watch_resync(reg);
        return;
    }
    size_t cap = reg->n_cache + n + 1, m = reg->n_cache;
    cache_entry *next = xllm_xcalloc(cap, sizeof(cache_entry));
    for (size_t i = 0; i < m; i++) {
        next[i].key = xllm_xstrdup(reg->cache[i].key);
        xllm_instance_copy(&next[i].inst, &reg->cache[i].inst);
    }
    int64_t rev = reg->cache_rev;
    for (size_t e = 0; e < n; e++) {
        if (evs[e].mod_revision <= reg->cache_rev) continue; /* already in the resync read */
        if (evs[e].mod_revision > rev) rev = evs[e].mod_revision;
        size_t k = 0;
        while (k < m && strcmp(next[k].key, evs[e].key) != 0) k++;
        xllm_instance inst;
        bool put = evs[e].type == XLLM_REGISTRY_OP_PUT &&
                   xllm_registry_instance_decode(evs[e].value, strlen(evs[e].value), &inst, NULL,
                                                 0) == XLLM_OK;
        if (k < m) {
            xllm_instance_clear(&next[k].inst);
            if (put) {
                next[k].inst = inst;
            } else {
                free(next[k].key);
                next[k] = next[--m];
                memset(&next[m], 0, sizeof(cache_entry));
            }
        } else if (put) {
            next[m].key = xllm_xstrdup(evs[e].key);
            next[m].inst = inst;
            m++;
        }
    }
    qsort(next, m, sizeof(cache_entry), cache_cmp);
    cache_replace(reg, next, m, rev);
}

/* ============================================================================================ */
/* Session thread: keepalive, lease recovery, election                                          */
/* ============================================================================================ */

/* Puts every instance of this session again with the current lease (after a lease loss). Holds
 * opmu. */
static void reput_all(xllm_registry *reg, int64_t lease) {
    pthread_mutex_lock(&reg->mu);
    size_t n = reg->n_mine;
    mine_entry *copy = xllm_xcalloc(n + 1, sizeof(mine_entry));
    for (size_t i = 0; i < n; i++) {
        xllm_instance_copy(&copy[i].inst, &reg->mine[i].inst);
        copy[i].key = xllm_xstrdup(reg->mine[i].key);
    }
    pthread_mutex_unlock(&reg->mu);
    for (size_t i = 0; i < n; i++) {
        char err[256];
        char *val = xllm_registry_instance_encode(&copy[i].inst, err, sizeof(err));
        if (val) {
            xllm_registry_op op = {XLLM_REGISTRY_OP_PUT, copy[i].key, val, lease};
            bool ok = false;
            if (reg->st.iface->txn(reg->st.ctx, NULL, &op, 1, &ok, NULL, err, sizeof(err)) !=
                XLLM_OK)
                fprintf(stderr, "xllm registry: re-register %s: %s\n", copy[i].inst.name, err);
        }
        free(val);
        xllm_instance_clear(&copy[i].inst);
        free(copy[i].key);
    }
    free(copy);
}

/* Tries to take the master key (or checks that this session still holds it). Holds opmu. */
static void campaign_step(xllm_registry *reg) {
    pthread_mutex_lock(&reg->mu);
    char *id = reg->cand_id ? xllm_xstrdup(reg->cand_id) : NULL;
    int64_t lease = reg->lease;
    pthread_mutex_unlock(&reg->mu);
    if (!id) return;
    char err[256];
    xllm_registry_cmp cmp = {XLLM_REGISTRY_CMP_ABSENT, reg->master_key, 0};
    xllm_registry_op op = {XLLM_REGISTRY_OP_PUT, reg->master_key, id, lease};
    bool created = false, leader = false;
    xllm_status st =
        reg->st.iface->txn(reg->st.ctx, &cmp, &op, 1, &created, NULL, err, sizeof(err));
    if (st == XLLM_OK && !created) {
        xllm_registry_kv *kvs = NULL;
        size_t n = 0;
        st = reg->st.iface->range(reg->st.ctx, reg->master_key, false, &kvs, &n, NULL, err,
                                  sizeof(err));
        leader = st == XLLM_OK && n == 1 && kvs[0].lease == lease;
        xllm_registry_kvs_free(kvs, n);
    } else {
        leader = st == XLLM_OK;
    }
    pthread_mutex_lock(&reg->mu);
    /* On a store error keep the last answer: is_leader() bounds it by the lease deadline. */
    if (st == XLLM_OK && reg->cand_id && lease == reg->lease) reg->leader = leader;
    pthread_mutex_unlock(&reg->mu);
    free(id);
}

/* Replaces a lost lease: new lease, instances put again, leadership lost. Holds opmu. */
static void recover_lease(xllm_registry *reg) {
    char err[256];
    int64_t lease = 0, granted = 0;
    int64_t t0 = xllm_registry_now_ns();
    if (reg->st.iface->lease_grant(reg->st.ctx, reg->ttl_ms, &lease, &granted, err, sizeof(err)) !=
        XLLM_OK) {
        fprintf(stderr, "xllm registry: lease lost and cannot grant a new one: %s\n", err);
        return;
    }
    pthread_mutex_lock(&reg->mu);
    reg->lease = lease;
    reg->granted_ms = granted;
    reg->lease_deadline_ns = t0 + granted * 1000000;
    reg->leader = false;
    pthread_mutex_unlock(&reg->mu);
    reput_all(reg, lease);
}

static void keepalive_step(xllm_registry *reg) {
    pthread_mutex_lock(&reg->mu);
    int64_t lease = reg->lease;
    pthread_mutex_unlock(&reg->mu);
    char err[256];
    int64_t ttl = 0;
    int64_t t0 = xllm_registry_now_ns();
    xllm_status st = reg->st.iface->lease_keepalive(reg->st.ctx, lease, &ttl, err, sizeof(err));
    if (st != XLLM_OK) {
        /* Unreachable store: keep trying; the lease deadline bounds what is_leader() claims. */
        if (!reg->ka_failing) fprintf(stderr, "xllm registry: keepalive failed: %s\n", err);
        reg->ka_failing = true;
        return;
    }
    if (reg->ka_failing) fprintf(stderr, "xllm registry: keepalive works again\n");
    reg->ka_failing = false;
    if (ttl > 0) {
        pthread_mutex_lock(&reg->mu);
        if (lease == reg->lease) reg->lease_deadline_ns = t0 + ttl * 1000000;
        pthread_mutex_unlock(&reg->mu);
        return;
    }
    pthread_mutex_lock(&reg->opmu);
    pthread_mutex_lock(&reg->mu);
    bool same = lease == reg->lease;
    pthread_mutex_unlock(&reg->mu);
    if (same) recover_lease(reg);
    pthread_mutex_unlock(&reg->opmu);
}

static void *session_main(void *arg) {
    xllm_registry *reg = arg;
    int64_t next_ka = 0, next_camp = 0;
    pthread_mutex_lock(&reg->mu);
    while (!reg->stop) {
        int64_t now = xllm_registry_now_ns();
        bool leader_now = reg->leader && now < reg->lease_deadline_ns;
        if (leader_now != reg->reported) {
            reg->reported = leader_now;
            if (reg->on_leader) {
                pthread_mutex_unlock(&reg->mu);
                reg->on_leader(leader_now, reg->on_leader_user);
                pthread_mutex_lock(&reg->mu);
            }
            continue;
        }
        if (now >= next_ka) {
            int64_t ka_ms = reg->keepalive_ms > 0 ? reg->keepalive_ms : reg->granted_ms / 3;
            next_ka = now + XLLM_MAX(ka_ms, 1) * 1000000;
            pthread_mutex_unlock(&reg->mu);
            keepalive_step(reg);
            pthread_mutex_lock(&reg->mu);
            continue;
        }
        if (reg->cand_id && (now >= next_camp || reg->kick)) {
            reg->kick = false;
            next_camp = now + reg->campaign_ms * 1000000;
            pthread_mutex_unlock(&reg->mu);
            pthread_mutex_lock(&reg->opmu);
            campaign_step(reg);
            pthread_mutex_unlock(&reg->opmu);
            pthread_mutex_lock(&reg->mu);
            continue;
        }
        int64_t wake = next_ka;
        if (reg->cand_id) wake = XLLM_MIN(wake, next_camp);
        if (reg->leader && reg->lease_deadline_ns > now)
            wake = XLLM_MIN(wake, reg->lease_deadline_ns);
        if (!reg->kick) xllm_registry_cond_wait_until(&reg->cv, &reg->mu, wake);
    }
    pthread_mutex_unlock(&reg->mu);
    return NULL;
}

/* ============================================================================================ */
/* Public API                                                                                   */
/* ============================================================================================ */

xllm_status xllm_registry_new(const xllm_registry_params *params, xllm_registry **out, char *err,
                              size_t err_size) {
    *out = NULL;
    xllm_registry_params p = params ? *params : xllm_registry_default_params();
    if (!p.store.iface) {
        xllm_registry_mem *mem = xllm_registry_mem_new();
        p.store = xllm_registry_mem_store(mem);
        xllm_registry_mem_free(mem);
    }
    if (p.store.iface->version != XLLM_REGISTRY_STORE_VERSION) {
        xllm_set_err(err, err_size, "registry: store %s has interface version %u, want %u",
                     p.store.iface->name, p.store.iface->version, XLLM_REGISTRY_STORE_VERSION);
        if (p.store.iface->free) p.store.iface->free(p.store.ctx);
        return XLLM_ERR_UNSUPPORTED;
    }
    const char *cluster = p.cluster ? p.cluster : "default";
    if (!valid_name(cluster) || p.ttl_ms < 0 || p.keepalive_ms < 0 || p.campaign_ms < 0) {
        xllm_set_err(err, err_size, "registry: invalid cluster name or negative interval");
        if (p.store.iface->free) p.store.iface->free(p.store.ctx);
        return XLLM_ERR_INVALID_ARG;
    }
    xllm_registry *reg = xllm_xcalloc(1, sizeof(*reg));
    reg->st = p.store;
    size_t n = strlen(cluster) + 32;
    reg->inst_prefix = xllm_xmalloc(n);
    snprintf(reg->inst_prefix, n, "/xllm/%s/instances/", cluster);
    reg->master_key = xllm_xmalloc(n);
    snprintf(reg->master_key, n, "/xllm/%s/master", cluster);
    reg->ttl_ms = p.ttl_ms ? p.ttl_ms : 10000;
    reg->keepalive_ms = p.keepalive_ms;
    reg->campaign_ms = p.campaign_ms ? p.campaign_ms : 250;
    reg->on_event = p.on_event;
    reg->on_event_user = p.on_event_user;
    reg->on_leader = p.on_leader;
    reg->on_leader_user = p.on_leader_user;
    reg->abandon = p.abandon_on_free;
    pthread_mutex_init(&reg->opmu, NULL);
    pthread_mutex_init(&reg->mu, NULL);
    xllm_registry_cond_init(&reg->cv);

    int64_t t0 = xllm_registry_now_ns();
    xllm_status st = reg->st.iface->lease_grant(reg->st.ctx, reg->ttl_ms, &reg->lease,
                                                &reg->granted_ms, err, err_size);
    if (st != XLLM_OK) {
        xllm_registry_free(reg);
        return st;
    }
    reg->lease_deadline_ns = t0 + reg->granted_ms * 1000000;
    if (reg->on_event) {
        st = reg->st.iface->watch_start(reg->st.ctx, reg->inst_prefix, 0, watch_fn, reg,
                                        &reg->watch, err, err_size);
        if (st != XLLM_OK) {
            xllm_registry_free(reg);
            return st;
        }
    }
    if (pthread_create(&reg->thr, NULL, session_main, reg) != 0) {
        xllm_set_err(err, err_size, "registry: cannot start the session thread");
        xllm_registry_free(reg);
        return XLLM_ERR_INTERNAL;
    }
    reg->thr_started = true;
    *out = reg;
    return XLLM_OK;
}

void xllm_registry_free(xllm_registry *reg) {
    if (!reg) return;
    if (reg->thr_started) {
        pthread_mutex_lock(&reg->mu);
        reg->stop = true;
        pthread_cond_broadcast(&reg->cv);
        pthread_mutex_unlock(&reg->mu);
        pthread_join(reg->thr, NULL);
    }
    if (reg->watch) reg->st.iface->watch_stop(reg->st.ctx, reg->watch);
    if (reg->lease && !reg->abandon) {
        char err[256];
        if (reg->cand_id) xllm_registry_resign(reg, NULL, 0);
        if (reg->st.iface->lease_revoke(reg->st.ctx, reg->lease, err, sizeof(err)) != XLLM_OK)
            fprintf(stderr, "xllm registry: revoke at close: %s\n", err);
    }
    if (reg->st.iface->free) reg->st.iface->free(reg->st.ctx);
    for (size_t i = 0; i < reg->n_mine; i++) {
        xllm_instance_clear(&reg->mine[i].inst);
        free(reg->mine[i].key);
    }
    free(reg->mine);
    cache_clear(reg->cache, reg->n_cache);
    free(reg->cand_id);
    free(reg->inst_prefix);
    free(reg->master_key);
    pthread_cond_destroy(&reg->cv);
    pthread_mutex_destroy(&reg->mu);
    pthread_mutex_destroy(&reg->opmu);
    free(reg);
}

/* Writes inst under its role key, deleting the keys of its name under the other roles, and
 * records it as this session's. Holds opmu. */
static xllm_status put_instance(xllm_registry *reg, const xllm_instance *inst, char *err,
                                size_t err_size) {
    char *val = xllm_registry_instance_encode(inst, err, err_size);
    if (!val) return XLLM_ERR_INVALID_ARG;
    char *keys[XLLM_ROLE_COUNT];
    xllm_registry_op ops[XLLM_ROLE_COUNT];
    size_t n_ops = 0;
    pthread_mutex_lock(&reg->mu);
    int64_t lease = reg->lease;
    pthread_mutex_unlock(&reg->mu);
    for (int r = 0; r < XLLM_ROLE_COUNT; r++) {
        keys[r] = key_for(reg, (xllm_role)r, inst->name);
        if (r != (int)inst->role)
            ops[n_ops++] = (xllm_registry_op){XLLM_REGISTRY_OP_DELETE, keys[r], NULL, 0};
    }
    ops[n_ops++] = (xllm_registry_op){XLLM_REGISTRY_OP_PUT, keys[inst->role], val, lease};
    bool ok = false;
    xllm_status st = reg->st.iface->txn(reg->st.ctx, NULL, ops, n_ops, &ok, NULL, err, err_size);
    if (st == XLLM_OK) {
        pthread_mutex_lock(&reg->mu);
        size_t i = 0;
        while (i < reg->n_mine && strcmp(reg->mine[i].inst.name, inst->name) != 0) i++;
        if (i == reg->n_mine) {
            reg->mine = xllm_xrealloc(reg->mine, (reg->n_mine + 1) * sizeof(mine_entry));
            reg->n_mine++;
        } else {
            xllm_instance_clear(&reg->mine[i].inst);
            free(reg->mine[i].key);
        }
        xllm_instance_copy(&reg->mine[i].inst, inst);
        reg->mine[i].key = keys[inst->role];
        keys[inst->role] = NULL;
        pthread_mutex_unlock(&reg->mu);
    }
    for (int r = 0; r < XLLM_ROLE_COUNT; r++) free(keys[r]);
    free(val);
    return st;
}

xllm_status xllm_registry_register(xllm_registry *reg, const xllm_instance *inst, char *err,
                                   size_t err_size) {
    pthread_mutex_lock(&reg->opmu);
    xllm_status st = put_instance(reg, inst, err, err_size);
    pthread_mutex_unlock(&reg->opmu);
    return st;
}

xllm_status xllm_registry_update(xllm_registry *reg, const char *name, xllm_role role,
                                 const char *attrs, char *err, size_t err_size) {
    pthread_mutex_lock(&reg->opmu);
    pthread_mutex_lock(&reg->mu);
    xllm_instance inst = {0};
    for (size_t i = 0; i < reg->n_mine; i++)
        if (name && strcmp(reg->mine[i].inst.name, name) == 0)
            xllm_instance_copy(&inst, &reg->mine[i].inst);
    pthread_mutex_unlock(&reg->mu);
    xllm_status st;
    if (!inst.name) {
        xllm_set_err(err, err_size, "registry: %s is not registered by this process",
                     name ? name : "(null)");
        st = XLLM_ERR_INVALID_ARG;
    } else {
        inst.role = role;
        if (attrs) {
            free(inst.attrs);
            inst.attrs = xllm_xstrdup(attrs);
        }
        st = put_instance(reg, &inst, err, err_size);
    }
    xllm_instance_clear(&inst);
    pthread_mutex_unlock(&reg->opmu);
    return st;
}

xllm_status xllm_registry_deregister(xllm_registry *reg, const char *name, char *err,
                                     size_t err_size) {
    pthread_mutex_lock(&reg->opmu);
    pthread_mutex_lock(&reg->mu);
    size_t i = 0;
    while (i < reg->n_mine && !(name && strcmp(reg->mine[i].inst.name, name) == 0)) i++;
    char *key = i < reg->n_mine ? xllm_xstrdup(reg->mine[i].key) : NULL;
    pthread_mutex_unlock(&reg->mu);
    xllm_status st;
    if (!key) {
        xllm_set_err(err, err_size, "registry: %s is not registered by this process",
                     name ? name : "(null)");
        st = XLLM_ERR_INVALID_ARG;
    } else {
        xllm_registry_op op = {XLLM_REGISTRY_OP_DELETE, key, NULL, 0};
        bool ok = false;
        st = reg->st.iface->txn(reg->st.ctx, NULL, &op, 1, &ok, NULL, err, err_size);
        if (st == XLLM_OK) {
            pthread_mutex_lock(&reg->mu);
            xllm_instance_clear(&reg->mine[i].inst);
            free(reg->mine[i].key);
            reg->mine[i] = reg->mine[--reg->n_mine];
            pthread_mutex_unlock(&reg->mu);
        }
    }
    free(key);
    pthread_mutex_unlock(&reg->opmu);
    return st;
}

static int inst_cmp(const void *a, const void *b) {
    const xllm_instance *x = a, *y = b;
    if (x->role != y->role) return (int)x->role - (int)y->role;
    return strcmp(x->name, y->name);
}

xllm_status xllm_registry_list(xllm_registry *reg, int role, xllm_instance_list *out, char *err,
                               size_t err_size) {
    memset(out, 0, sizeof(*out));
    if (role >= XLLM_ROLE_COUNT) {
        xllm_set_err(err, err_size, "registry: invalid role %d", role);
        return XLLM_ERR_INVALID_ARG;
    }
    char *prefix;
    if (role >= 0) {
        size_t n = strlen(reg->inst_prefix) + 16;
        prefix = xllm_xmalloc(n);
        snprintf(prefix, n, "%s%s/", reg->inst_prefix, xllm_role_name((xllm_role)role));
    } else {
        prefix = xllm_xstrdup(reg->inst_prefix);
    }
    xllm_registry_kv *kvs = NULL;
    size_t n = 0;
    xllm_status st =
        reg->st.iface->range(reg->st.ctx, prefix, true, &kvs, &n, &out->revision, err, err_size);
    free(prefix);
    if (st != XLLM_OK) return st;
    out->items = xllm_xcalloc(n + 1, sizeof(xllm_instance));
    for (size_t i = 0; i < n; i++)
        if (xllm_registry_instance_decode(kvs[i].value, strlen(kvs[i].value), &out->items[out->n],
                                          NULL, 0) == XLLM_OK)
            out->n++;
    xllm_registry_kvs_free(kvs, n);
    qsort(out->items, out->n, sizeof(xllm_instance), inst_cmp);
    return XLLM_OK;
}

xllm_status xllm_registry_campaign(xllm_registry *reg, const char *id, bool *elected, char *err,
                                   size_t err_size) {
    if (elected) *elected = false;
    if (!valid_text(id, ID_MAX_LEN)) {
        xllm_set_err(err, err_size, "registry: campaign id must be 1-%d printable bytes",
                     ID_MAX_LEN);
        return XLLM_ERR_INVALID_ARG;
    }
    pthread_mutex_lock(&reg->opmu);
    pthread_mutex_lock(&reg->mu);
    if (reg->cand_id && strcmp(reg->cand_id, id) != 0) {
        pthread_mutex_unlock(&reg->mu);
        pthread_mutex_unlock(&reg->opmu);
        xllm_set_err(err, err_size, "registry: already campaigning as %s", reg->cand_id);
        return XLLM_ERR_INVALID_ARG;
    }
    if (!reg->cand_id) reg->cand_id = xllm_xstrdup(id);
    pthread_mutex_unlock(&reg->mu);
    campaign_step(reg);
    pthread_mutex_unlock(&reg->opmu);
    pthread_mutex_lock(&reg->mu);
    if (elected) *elected = reg->leader;
    pthread_cond_broadcast(&reg->cv); /* the session thread reports and schedules retries */
    pthread_mutex_unlock(&reg->mu);
    return XLLM_OK;
}

bool xllm_registry_is_leader(xllm_registry *reg) {
    pthread_mutex_lock(&reg->mu);
    bool l = reg->leader && xllm_registry_now_ns() < reg->lease_deadline_ns;
    pthread_mutex_unlock(&reg->mu);
    return l;
}

xllm_status xllm_registry_resign(xllm_registry *reg, char *err, size_t err_size) {
    pthread_mutex_lock(&reg->opmu);
    pthread_mutex_lock(&reg->mu);
    char *id = reg->cand_id;
    reg->cand_id = NULL;
    reg->leader = false;
    int64_t lease = reg->lease;
    pthread_cond_broadcast(&reg->cv);
    pthread_mutex_unlock(&reg->mu);
    xllm_status st = XLLM_OK;
    if (id) {
        /* Only if this session's lease holds it: never delete a successor's key. */
        xllm_registry_cmp cmp = {XLLM_REGISTRY_CMP_LEASE_EQ, reg->master_key, lease};
        xllm_registry_op op = {XLLM_REGISTRY_OP_DELETE, reg->master_key, NULL, 0};
        bool ok = false;
        st = reg->st.iface->txn(reg->st.ctx, &cmp, &op, 1, &ok, NULL, err, err_size);
    }
    free(id);
    pthread_mutex_unlock(&reg->opmu);
    return st;
}

xllm_status xllm_registry_leader(xllm_registry *reg, char **id, char *err, size_t err_size) {
    *id = NULL;
    xllm_registry_kv *kvs = NULL;
    size_t n = 0;
    xllm_status st =
        reg->st.iface->range(reg->st.ctx, reg->master_key, false, &kvs, &n, NULL, err, err_size);
    if (st == XLLM_OK && n == 1) {
        *id = kvs[0].value;
        kvs[0].value = NULL;
    }
    xllm_registry_kvs_free(kvs, n);
    return st;
}

int64_t xllm_registry_lease(xllm_registry *reg, int64_t *ttl_ms) {
    pthread_mutex_lock(&reg->mu);
    int64_t l = reg->lease;
    if (ttl_ms) *ttl_ms = reg->granted_ms;
    pthread_mutex_unlock(&reg->mu);
    return l;
}
