/* The embedded registry store: an in-process key-value table with leases on the monotonic clock
 * and revisions, after etcd v3, shared by every registry opened on it. One store thread expires
 * leases on time and delivers watch events, so watchers are called as with etcd: off the
 * caller's thread, in revision order. */
#include <pthread.h>
#include <string.h>

#include "service/registry-impl.h"
#include "service/registry.h"
#include "util/common.h"

#define MEM_MIN_TTL_MS 10

typedef struct mem_kv {
    char *key;
    char *value;
    int64_t mod_revision;
    int64_t lease;
} mem_kv;

typedef struct mem_lease {
    int64_t id;
    int64_t ttl_ms;
    int64_t deadline_ns;
} mem_lease;

/* The changes of one revision, queued for the store thread. */
typedef struct mem_batch {
    xllm_registry_kv_event *events; /* keys and values owned */
    size_t n;
    struct mem_batch *next;
} mem_batch;

typedef struct mem_watcher {
    char *prefix;
    int64_t from_rev; /* deliver events of this revision on */
    bool resync;      /* owe the watcher a resync call */
    bool dead;
    xllm_registry_watch_fn fn;
    void *user;
    struct mem_watcher *next;
} mem_watcher;

struct xllm_registry_mem {
    pthread_mutex_t mu;
    pthread_cond_t cv;      /* store thread: new batch, lease change, stop */
    pthread_cond_t idle_cv; /* watch_stop: the running callback returned */
    int refs;
    mem_kv *kvs; /* sorted by key */
    size_t n_kvs;
    mem_lease *leases;
    size_t n_leases;
    int64_t revision, next_lease;
    mem_watcher *watchers;
    mem_watcher *running; /* whose callback runs now (without mu) */
    mem_batch *head, *tail;
    bool stop;
    pthread_t thr;
};

/* ============================================================================================ */
/* Table operations (mu held)                                                                   */
/* ============================================================================================ */

static size_t kv_find(const xllm_registry_mem *m, const char *key, bool *found) {
    size_t lo = 0, hi = m->n_kvs;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        int c = strcmp(m->kvs[mid].key, key);
        if (c == 0) {
            *found = true;
            return mid;
        }
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    *found = false;
    return lo;
}

static void batch_add(mem_batch *b, xllm_registry_op_type t, const char *key, const char *value,
                      int64_t rev) {
    b->events = xllm_xrealloc(b->events, (b->n + 1) * sizeof(*b->events));
    b->events[b->n++] =
        (xllm_registry_kv_event){t, xllm_xstrdup(key), xllm_xstrdup(value ? value : ""), rev};
}

static void batch_free(mem_batch *b) {
    for (size_t i = 0; i < b->n; i++) {
        free((char *)b->events[i].key);
        free((char *)b->events[i].value);
    }
    free(b->events);
    free(b);
}

/* Queues b for the watchers (or frees it when empty). */
static void batch_queue(xllm_registry_mem *m, mem_batch *b) {
    if (b->n == 0) {
        batch_free(b);
        return;
    }
    if (!m->watchers) { /* nobody to tell */
        batch_free(b);
        return;
    }
    if (m->tail)
        m->tail->next = b;
    else
        m->head = b;
    m->tail = b;
    pthread_cond_broadcast(&m->cv);
}

static void kv_delete_at(xllm_registry_mem *m, size_t i, mem_batch *b, int64_t rev) {
    batch_add(b, XLLM_REGISTRY_OP_DELETE, m->kvs[i].key, NULL, rev);
    free(m->kvs[i].key);
    free(m->kvs[i].value);
    memmove(&m->kvs[i], &m->kvs[i + 1], (m->n_kvs - i - 1) * sizeof(mem_kv));
    m->n_kvs--;
}

static mem_lease *lease_find(xllm_registry_mem *m, int64_t id) {
    for (size_t i = 0; i < m->n_leases; i++)
        if (m->leases[i].id == id) return &m->leases[i];
    return NULL;
}

/* Removes lease i and its keys, all in one revision. */
static void lease_remove_at(xllm_registry_mem *m, size_t i) {
    int64_t id = m->leases[i].id;
    m->leases[i] = m->leases[--m->n_leases];
    mem_batch *b = xllm_xcalloc(1, sizeof(*b));
    int64_t rev = m->revision + 1;
    for (size_t k = 0; k < m->n_kvs;) {
        if (m->kvs[k].lease == id)
            kv_delete_at(m, k, b, rev);
        else
            k++;
    }
    if (b->n) m->revision = rev;
    batch_queue(m, b);
}

static void expire_leases(xllm_registry_mem *m, int64_t now) {
    for (size_t i = 0; i < m->n_leases;) {
        if (m->leases[i].deadline_ns <= now)
            lease_remove_at(m, i);
        else
            i++;
    }
}

/* ============================================================================================ */
/* Store thread: lease expiry and watch delivery                                                */
/* ============================================================================================ */

/* Calls w->fn without mu; returns with mu held again. */
static void deliver(xllm_registry_mem *m, mem_watcher *w, const xllm_registry_kv_event *evs,
                    size_t n, bool resync) {
    m->running = w;
    pthread_mutex_unlock(&m->mu);
    w->fn(w->user, evs, n, resync);
    pthread_mutex_lock(&m->mu);
    m->running = NULL;
    pthread_cond_broadcast(&m->idle_cv);
}

static void *mem_main(void *arg) {
    xllm_registry_mem *m = arg;
    xllm_registry_kv_event *sel = NULL;
    size_t sel_cap = 0;
    pthread_mutex_lock(&m->mu);
    while (!m->stop) {
        int64_t now = xllm_registry_now_ns();
        expire_leases(m, now);
        bool worked = false;
        for (mem_watcher *w = m->watchers; w; w = w->next) {
            if (w->resync && !w->dead) {
                w->resync = false;
                deliver(m, w, NULL, 0, true);
                worked = true;
                break; /* the list may have changed while unlocked */
            }
        }
        if (worked) continue;
        if (m->head) {
            mem_batch *b = m->head;
            m->head = b->next;
            if (!m->head) m->tail = NULL;
            if (sel_cap < b->n) {
                sel_cap = b->n;
                sel = xllm_xrealloc(sel, sel_cap * sizeof(*sel));
            }
            for (mem_watcher *w = m->watchers; w;) {
                size_t n = 0;
                for (size_t i = 0; i < b->n; i++) {
                    size_t pl = strlen(w->prefix);
                    if (b->events[i].mod_revision >= w->from_rev &&
                        strncmp(b->events[i].key, w->prefix, pl) == 0)
                        sel[n++] = b->events[i];
                }
                if (n && !w->dead) deliver(m, w, sel, n, false);
                w = w->next; /* w is still linked: watch_stop waits for running != w */
            }
            batch_free(b);
            continue;
        }
        int64_t wake = now + 1000000000;
        for (size_t i = 0; i < m->n_leases; i++) wake = XLLM_MIN(wake, m->leases[i].deadline_ns);
        xllm_registry_cond_wait_until(&m->cv, &m->mu, wake);
    }
    pthread_mutex_unlock(&m->mu);
    free(sel);
    return NULL;
}

/* ============================================================================================ */
/* Store interface                                                                              */
/* ============================================================================================ */

static xllm_status mem_lease_grant(void *ctx, int64_t ttl_ms, int64_t *lease, int64_t *granted,
                                   char *err, size_t err_size) {
    xllm_registry_mem *m = ctx;
    if (ttl_ms <= 0) {
        xllm_set_err(err, err_size, "registry mem: TTL must be positive");
        return XLLM_ERR_INVALID_ARG;
    }
    ttl_ms = XLLM_MAX(ttl_ms, MEM_MIN_TTL_MS);
    pthread_mutex_lock(&m->mu);
    m->leases = xllm_xrealloc(m->leases, (m->n_leases + 1) * sizeof(mem_lease));
    mem_lease *l = &m->leases[m->n_leases++];
    l->id = ++m->next_lease;
    l->ttl_ms = ttl_ms;
    l->deadline_ns = xllm_registry_now_ns() + ttl_ms * 1000000;
    *lease = l->id;
    *granted = ttl_ms;
    pthread_cond_broadcast(&m->cv);
    pthread_mutex_unlock(&m->mu);
    return XLLM_OK;
}

static xllm_status mem_lease_keepalive(void *ctx, int64_t lease, int64_t *ttl_ms, char *err,
                                       size_t err_size) {
    xllm_registry_mem *m = ctx;
    pthread_mutex_lock(&m->mu);
    int64_t now = xllm_registry_now_ns();
    expire_leases(m, now);
    mem_lease *l = lease_find(m, lease);
    *ttl_ms = 0;
    if (l) {
        l->deadline_ns = now + l->ttl_ms * 1000000;
        *ttl_ms = l->ttl_ms;
    }
    pthread_mutex_unlock(&m->mu);
    return XLLM_OK;
}

static xllm_status mem_lease_revoke(void *ctx, int64_t lease, char *err, size_t err_size) {
    xllm_registry_mem *m = ctx;
    pthread_mutex_lock(&m->mu);
    for (size_t i = 0; i < m->n_leases; i++) {
        if (m->leases[i].id == lease) {
            lease_remove_at(m, i);
            break;
        }
    }
    pthread_mutex_unlock(&m->mu);
    return XLLM_OK;
}

static xllm_status mem_txn(void *ctx, const xllm_registry_cmp *cmp, const xllm_registry_op *ops,
                           size_t n_ops, bool *succeeded, int64_t *revision, char *err,
                           size_t err_size) {
    xllm_registry_mem *m = ctx;
    *succeeded = false;
    for (size_t i = 0; i < n_ops; i++) {
        if (!ops[i].key || !ops[i].key[0]) {
            xllm_set_err(err, err_size, "registry mem: empty key");
            return XLLM_ERR_INVALID_ARG;
        }
    }
    pthread_mutex_lock(&m->mu);
    expire_leases(m, xllm_registry_now_ns());
    bool ok = true;
    if (cmp) {
        bool found;
        size_t i = kv_find(m, cmp->key, &found);
        ok =
            cmp->type == XLLM_REGISTRY_CMP_ABSENT ? !found : found && m->kvs[i].lease == cmp->lease;
    }
    for (size_t i = 0; ok && i < n_ops; i++) {
        if (ops[i].type == XLLM_REGISTRY_OP_PUT && ops[i].lease && !lease_find(m, ops[i].lease)) {
            pthread_mutex_unlock(&m->mu);
            xllm_set_err(err, err_size, "registry mem: requested lease not found");
            return XLLM_ERR_INVALID_ARG;
        }
    }
    if (ok) {
        mem_batch *b = xllm_xcalloc(1, sizeof(*b));
        int64_t rev = m->revision + 1;
        for (size_t o = 0; o < n_ops; o++) {
            bool found;
            size_t i = kv_find(m, ops[o].key, &found);
            if (ops[o].type == XLLM_REGISTRY_OP_DELETE) {
                if (found) kv_delete_at(m, i, b, rev);
                continue;
            }
            if (!found) {
                m->kvs = xllm_xrealloc(m->kvs, (m->n_kvs + 1) * sizeof(mem_kv));
                memmove(&m->kvs[i + 1], &m->kvs[i], (m->n_kvs - i) * sizeof(mem_kv));
                m->n_kvs++;
                m->kvs[i].key = xllm_xstrdup(ops[o].key);
            } else {
                free(m->kvs[i].value);
            }
            m->kvs[i].value = xllm_xstrdup(ops[o].value ? ops[o].value : "");
            m->kvs[i].mod_revision = rev;
            m->kvs[i].lease = ops[o].lease;
            batch_add(b, XLLM_REGISTRY_OP_PUT, ops[o].key, m->kvs[i].value, rev);
        }
        if (b->n) m->revision = rev;
        batch_queue(m, b);
    }
    *succeeded = ok;
    if (revision) *revision = m->revision;
    pthread_mutex_unlock(&m->mu);
    return XLLM_OK;
}

static xllm_status mem_range(void *ctx, const char *key, bool prefix, xllm_registry_kv **kvs,
                             size_t *n, int64_t *revision, char *err, size_t err_size) {
    xllm_registry_mem *m = ctx;
    pthread_mutex_lock(&m->mu);
    expire_leases(m, xllm_registry_now_ns());
    bool found;
    size_t first = kv_find(m, key, &found), last = first;
    size_t kl = strlen(key);
    if (prefix) {
        while (last < m->n_kvs && strncmp(m->kvs[last].key, key, kl) == 0) last++;
    } else if (found) {
        last = first + 1;
    }
    *n = last - first;
    *kvs = xllm_xcalloc(*n + 1, sizeof(xllm_registry_kv));
    for (size_t i = first; i < last; i++) {
        (*kvs)[i - first] =
            (xllm_registry_kv){xllm_xstrdup(m->kvs[i].key), xllm_xstrdup(m->kvs[i].value),
                               m->kvs[i].mod_revision, m->kvs[i].lease};
    }
    if (revision) *revision = m->revision;
    pthread_mutex_unlock(&m->mu);
    return XLLM_OK;
}

static xllm_status mem_watch_start(void *ctx, const char *prefix, int64_t start_rev,
                                   xllm_registry_watch_fn fn, void *user, void **watch, char *err,
                                   size_t err_size) {
    xllm_registry_mem *m = ctx;
    mem_watcher *w = xllm_xcalloc(1, sizeof(*w));
    w->prefix = xllm_xstrdup(prefix);
    w->fn = fn;
    w->user = user;
    pthread_mutex_lock(&m->mu);
    /* No history is kept: a watch from an earlier revision begins with a resync. */
    w->from_rev = m->revision + 1;
    w->resync = start_rev <= m->revision;
    w->next = m->watchers;
    m->watchers = w;
    pthread_cond_broadcast(&m->cv);
    pthread_mutex_unlock(&m->mu);
    *watch = w;
    return XLLM_OK;
}

static void mem_watch_stop(void *ctx, void *watch) {
    xllm_registry_mem *m = ctx;
    mem_watcher *w = watch;
    pthread_mutex_lock(&m->mu);
    w->dead = true;
    while (m->running == w) pthread_cond_wait(&m->idle_cv, &m->mu);
    for (mem_watcher **p = &m->watchers; *p; p = &(*p)->next) {
        if (*p == w) {
            *p = w->next;
            break;
        }
    }
    pthread_mutex_unlock(&m->mu);
    free(w->prefix);
    free(w);
}

static void mem_store_free(void *ctx) {
    xllm_registry_mem_free(ctx);
}

static const xllm_registry_store_i mem_iface = {
    .version = XLLM_REGISTRY_STORE_VERSION,
    .name = "mem",
    .lease_grant = mem_lease_grant,
    .lease_keepalive = mem_lease_keepalive,
    .lease_revoke = mem_lease_revoke,
    .txn = mem_txn,
    .range = mem_range,
    .watch_start = mem_watch_start,
    .watch_stop = mem_watch_stop,
    .free = mem_store_free,
};

/* ============================================================================================ */
/* Lifecycle                                                                                    */
/* ============================================================================================ */

xllm_registry_mem *xllm_registry_mem_new(void) {
    xllm_registry_mem *m = xllm_xcalloc(1, sizeof(*m));
    pthread_mutex_init(&m->mu, NULL);
    xllm_registry_cond_init(&m->cv);
    pthread_cond_init(&m->idle_cv, NULL);
    m->refs = 1;
    m->revision = 1; /* as etcd: an empty store is at revision 1 */
    int rc = pthread_create(&m->thr, NULL, mem_main, m);
    XLLM_ASSERT(rc == 0);
    return m;
}

xllm_registry_store xllm_registry_mem_store(xllm_registry_mem *mem) {
    pthread_mutex_lock(&mem->mu);
    mem->refs++;
    pthread_mutex_unlock(&mem->mu);
    return (xllm_registry_store){&mem_iface, mem};
}

void xllm_registry_mem_free(xllm_registry_mem *m) {
    if (!m) return;
    pthread_mutex_lock(&m->mu);
    bool last = --m->refs == 0;
    if (last) {
        m->stop = true;
        pthread_cond_broadcast(&m->cv);
    }
    pthread_mutex_unlock(&m->mu);
    if (!last) return;
    pthread_join(m->thr, NULL);
    XLLM_ASSERT(!m->watchers); /* every registry on it was freed first */
    while (m->head) {
        mem_batch *b = m->head;
        m->head = b->next;
        batch_free(b);
    }
    for (size_t i = 0; i < m->n_kvs; i++) {
        free(m->kvs[i].key);
        free(m->kvs[i].value);
    }
    free(m->kvs);
    free(m->leases);
    pthread_cond_destroy(&m->cv);
    pthread_cond_destroy(&m->idle_cv);
    pthread_mutex_destroy(&m->mu);
    free(m);
}
