/* Instance registry: service discovery, liveness (leases with a TTL) and master election for
 * the xllm cluster, over a pluggable key-value store with leases (embedded in memory, or etcd). */
#ifndef XLLM_SERVICE_REGISTRY_H
#define XLLM_SERVICE_REGISTRY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "xllm/xllm.h"

/* ------------------------------------------------------------------------------------------ */
/* Instances                                                                                   */
/* ------------------------------------------------------------------------------------------ */

/* What an engine instance does. Stored by name in the store, so the values are not a wire
 * format, but keep them append-only anyway. */
typedef enum xllm_role {
    XLLM_ROLE_MIXED = 0,
    XLLM_ROLE_PREFILL = 1,
    XLLM_ROLE_DECODE = 2,
    XLLM_ROLE_COUNT = 3,
} xllm_role;

/* "mixed", "prefill", "decode"; NULL for an unknown value. */
const char *xllm_role_name(xllm_role role);
/* Parses a role name; returns XLLM_ERR_INVALID_ARG for anything else. */
xllm_status xllm_role_parse(const char *s, xllm_role *out);

/* One registered engine instance. Identity is (name, incarnation): the name is stable across
 * restarts, the incarnation is a random nonzero value drawn at each start, so state kept about
 * an earlier run of the same name is never reused. */
typedef struct xllm_instance {
    char *name;           /* [A-Za-z0-9._-], 1..63 bytes, unique in the cluster */
    uint64_t incarnation; /* nonzero */
    xllm_role role;
    char *addr;  /* "host:port" where its RPC listens */
    char *attrs; /* a JSON object as text (model name, ...); "{}" when none */
} xllm_instance;

/* Frees the strings of *inst (not inst itself); accepts NULL. */
void xllm_instance_clear(xllm_instance *inst);
/* Deep copy into *dst (strings malloc'd; free with xllm_instance_clear). */
void xllm_instance_copy(xllm_instance *dst, const xllm_instance *src);
/* A fresh random nonzero incarnation (getrandom, falling back on clock and pid). */
uint64_t xllm_instance_new_incarnation(void);

/* An array of instances, sorted by role then name. Free with xllm_instance_list_free. */
typedef struct xllm_instance_list {
    xllm_instance *items;
    size_t n;
    int64_t revision; /* store revision the list was read at */
} xllm_instance_list;

void xllm_instance_list_free(xllm_instance_list *list); /* frees items; accepts NULL */

/* Encodes an instance as the JSON value stored under its key:
 * {"name":..,"incarnation":"<16 hex digits>","role":"decode","addr":..,"attrs":{..}}.
 * Returns a malloc'd string, or NULL when inst is invalid (err says why). */
char *xllm_registry_instance_encode(const xllm_instance *inst, char *err, size_t err_size);
/* Decodes such a value (untrusted input: anything may be in the store). On success fills *out
 * (free with xllm_instance_clear). */
xllm_status xllm_registry_instance_decode(const char *json, size_t len, xllm_instance *out,
                                          char *err, size_t err_size);

/* ------------------------------------------------------------------------------------------ */
/* Store interface: a key-value store with leases and revisions, after etcd v3.                */
/* ------------------------------------------------------------------------------------------ */

#define XLLM_REGISTRY_STORE_VERSION 1

typedef enum xllm_registry_op_type {
    XLLM_REGISTRY_OP_PUT = 0,
    XLLM_REGISTRY_OP_DELETE = 1,
} xllm_registry_op_type;

/* One operation of a transaction. */
typedef struct xllm_registry_op {
    xllm_registry_op_type type;
    const char *key;
    const char *value; /* PUT only */
    int64_t lease;     /* PUT only; 0 = no lease */
} xllm_registry_op;

typedef enum xllm_registry_cmp_type {
    XLLM_REGISTRY_CMP_ABSENT = 0,   /* key does not exist */
    XLLM_REGISTRY_CMP_LEASE_EQ = 1, /* key exists and is bound to lease */
} xllm_registry_cmp_type;

typedef struct xllm_registry_cmp {
    xllm_registry_cmp_type type;
    const char *key;
    int64_t lease; /* LEASE_EQ only */
} xllm_registry_cmp;

/* A key-value pair read from the store. */
typedef struct xllm_registry_kv {
    char *key;
    char *value; /* NUL-terminated; "" for an empty value */
    int64_t mod_revision;
    int64_t lease;
} xllm_registry_kv;

void xllm_registry_kvs_free(xllm_registry_kv *kvs, size_t n);

/* One change seen by a store watch. For DELETE, value is "" and mod_revision is the revision of
 * the deletion. Pointers are valid only during the callback. */
typedef struct xllm_registry_kv_event {
    xllm_registry_op_type type;
    const char *key;
    const char *value;
    int64_t mod_revision;
} xllm_registry_kv_event;

/* Called on the store's watch thread with the changes of one or more revisions, in order. With
 * resync true (events empty), the store may have lost changes (a compacted history, or a watch
 * that could not start at the asked revision): the receiver must read the prefix again. */
typedef void (*xllm_registry_watch_fn)(void *user, const xllm_registry_kv_event *events, size_t n,
                                       bool resync);

/* A store implementation: every function takes the store context first, may be called from any
 * thread, returns XLLM_OK or an error with one line in err, and never blocks longer than the
 * store's timeout. XLLM_ERR_IO means the store could not be reached. */
typedef struct xllm_registry_store_i {
    uint32_t version; /* XLLM_REGISTRY_STORE_VERSION */
    const char *name; /* "mem", "etcd" */

    /* Grants a lease of ttl_ms; *granted_ms is what the store granted (etcd rounds to seconds
     * and has a minimum of 2 s). */
    xllm_status (*lease_grant)(void *ctx, int64_t ttl_ms, int64_t *lease, int64_t *granted_ms,
                               char *err, size_t err_size);
    /* Refreshes a lease. *ttl_ms = its TTL, or 0 when the lease no longer exists (expired or
     * revoked): that is XLLM_OK, not an error. */
    xllm_status (*lease_keepalive)(void *ctx, int64_t lease, int64_t *ttl_ms, char *err,
                                   size_t err_size);
    /* Revokes a lease and deletes every key bound to it. Revoking an unknown lease is OK. */
    xllm_status (*lease_revoke)(void *ctx, int64_t lease, char *err, size_t err_size);
    /* Applies ops atomically (one revision) if cmp holds (cmp NULL = always). *succeeded says
     * whether it held; *revision (may be NULL) is the store revision afterwards. */
    xllm_status (*txn)(void *ctx, const xllm_registry_cmp *cmp, const xllm_registry_op *ops,
                       size_t n_ops, bool *succeeded, int64_t *revision, char *err,
                       size_t err_size);
    /* Reads every key that starts with prefix (or exactly key when prefix is false), sorted by
     * key. *kvs is malloc'd (xllm_registry_kvs_free); *revision is the store revision read. */
    xllm_status (*range)(void *ctx, const char *key, bool prefix, xllm_registry_kv **kvs, size_t *n,
                         int64_t *revision, char *err, size_t err_size);
    /* Starts watching keys under prefix from revision start_rev (inclusive). fn runs on a
     * thread of the store until watch_stop returns. *watch is the handle for watch_stop. */
    xllm_status (*watch_start)(void *ctx, const char *prefix, int64_t start_rev,
                               xllm_registry_watch_fn fn, void *user, void **watch, char *err,
                               size_t err_size);
    /* Stops a watch; after it returns fn is not running and will not run. Not from fn. */
    void (*watch_stop)(void *ctx, void *watch);
    /* Frees the context (optional). */
    void (*free)(void *ctx);
} xllm_registry_store_i;

typedef struct xllm_registry_store {
    const xllm_registry_store_i *iface;
    void *ctx;
} xllm_registry_store;

/* The embedded store: one in-process table shared by every registry opened on it (the
 * single-process server, and unit tests that play several processes). TTLs run on the
 * monotonic clock; a store thread expires leases and delivers watch events. Refcounted:
 * xllm_registry_mem_new returns one reference, each store made by xllm_registry_mem_store takes
 * another; xllm_registry_mem_free drops one. */
typedef struct xllm_registry_mem xllm_registry_mem;

xllm_registry_mem *xllm_registry_mem_new(void);
void xllm_registry_mem_free(xllm_registry_mem *mem); /* accepts NULL */
xllm_registry_store xllm_registry_mem_store(xllm_registry_mem *mem);

/* etcd v3 through its JSON gateway (etcd >= 3.4: /v3/...). endpoint: "http://host:port" or
 * "host:port". timeout_ms bounds every request (0 = 3000). Checks nothing on the network. */
xllm_status xllm_registry_etcd_store(const char *endpoint, int timeout_ms, xllm_registry_store *out,
                                     char *err, size_t err_size);

/* ------------------------------------------------------------------------------------------ */
/* Registry: one session (one lease) of one process with the store.                            */
/* ------------------------------------------------------------------------------------------ */

typedef enum xllm_registry_event_type {
    XLLM_REGISTRY_ADDED = 0,   /* a new (name, incarnation) */
    XLLM_REGISTRY_CHANGED = 1, /* same (name, incarnation), new role / addr / attrs */
    XLLM_REGISTRY_REMOVED = 2, /* deregistered, its lease lapsed, or replaced by a restart */
} xllm_registry_event_type;

typedef struct xllm_registry_event {
    xllm_registry_event_type type;
    const xllm_instance *inst; /* new state; the last one known for REMOVED */
    int64_t revision;          /* store revision of the change (of the resync read) */
} xllm_registry_event;

/* Called on a registry background thread; pointers are valid during the call only. Must not
 * call xllm_registry_free. */
typedef void (*xllm_registry_event_fn)(const xllm_registry_event *ev, void *user);
typedef void (*xllm_registry_leader_fn)(bool leader, void *user);

typedef struct xllm_registry_params {
    /* The store; NULL iface = a private embedded store (only this registry sees it). The
     * registry takes ownership: it calls iface->free at xllm_registry_free. */
    xllm_registry_store store;
    /* Cluster name: keys live under /xllm/<cluster>/. Default "default". */
    const char *cluster;
    /* Lease TTL in ms: an instance whose process stops disappears within about this. Default
     * 10000; etcd grants at least 2000. */
    int64_t ttl_ms;
    /* Keepalive period in ms. Default (0) = a third of the granted TTL. */
    int64_t keepalive_ms;
    /* How often a candidate that is not the master tries to take the master key, in ms.
     * Default (0) = 250. */
    int64_t campaign_ms;
    /* Watch instances: on_event gets an ADDED for every instance present at start, then every
     * change. NULL = no watch. */
    xllm_registry_event_fn on_event;
    void *on_event_user;
    /* Told when this registry becomes or stops being the master (optional). */
    xllm_registry_leader_fn on_leader;
    void *on_leader_user;
    /* Leave the lease to lapse at xllm_registry_free instead of revoking it (what a crash
     * looks like to the others; for tests). Default false. */
    bool abandon_on_free;
} xllm_registry_params;

typedef struct xllm_registry xllm_registry;

xllm_registry_params xllm_registry_default_params(void);

/* Opens a session: grants the lease, starts the keepalive thread and the watch (when asked).
 * On failure (store unreachable, ...) returns an error, *out = NULL, one line in err; the store
 * in params is freed either way. Any thread. */
xllm_status xllm_registry_new(const xllm_registry_params *params, xllm_registry **out, char *err,
                              size_t err_size);
/* Stops the threads, resigns, revokes the lease (unless abandon_on_free) so that the instances
 * vanish at once, and frees. Accepts NULL. Not from a registry callback. */
void xllm_registry_free(xllm_registry *reg);

/* Registers (or re-registers) an instance bound to this session's lease; it stays while the
 * session keeps the lease alive. A key of the same name under another role (a stale earlier
 * run) is removed in the same transaction. Any thread. */
xllm_status xllm_registry_register(xllm_registry *reg, const xllm_instance *inst, char *err,
                                   size_t err_size);
/* Updates the role and/or attributes of an instance this registry registered (attrs NULL =
 * keep). One transaction, seen by watchers as CHANGED. */
xllm_status xllm_registry_update(xllm_registry *reg, const char *name, xllm_role role,
                                 const char *attrs, char *err, size_t err_size);
/* Removes an instance this registry registered. */
xllm_status xllm_registry_deregister(xllm_registry *reg, const char *name, char *err,
                                     size_t err_size);

/* Reads the instances from the store: all (role < 0) or those of one role. Any thread. Values
 * that do not decode are skipped. */
xllm_status xllm_registry_list(xllm_registry *reg, int role, xllm_instance_list *out, char *err,
                               size_t err_size);

/* Master election. campaign() enrolls this session as a candidate with id (a service id, at
 * most 255 bytes) and tries at once; while not master, the keepalive thread retries every
 * campaign_ms, so a candidate takes over when the master's lease lapses or it resigns. *elected
 * (may be NULL) says whether it is master now. Any thread. */
xllm_status xllm_registry_campaign(xllm_registry *reg, const char *id, bool *elected, char *err,
                                   size_t err_size);
/* Whether this session holds the master key now: false as soon as the lease may have lapsed
 * by the local clock, even before the store says so. Any thread. */
bool xllm_registry_is_leader(xllm_registry *reg);
/* Gives up the master key (if held) and stops campaigning. */
xllm_status xllm_registry_resign(xllm_registry *reg, char *err, size_t err_size);
/* Reads the current master's id: *id malloc'd, or NULL when there is none. */
xllm_status xllm_registry_leader(xllm_registry *reg, char **id, char *err, size_t err_size);

/* This session's lease id and granted TTL in ms (for diagnostics and tests). */
int64_t xllm_registry_lease(xllm_registry *reg, int64_t *ttl_ms);

#endif
