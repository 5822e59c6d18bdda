/* Registry internals shared by registry.c, the stores (registry_mem.c, registry_etcd.c), the
 * tests and the fuzz target: the monotonic clock and the etcd gateway response parsers. */
#ifndef XLLM_SERVICE_REGISTRY_IMPL_H
#define XLLM_SERVICE_REGISTRY_IMPL_H

#include <pthread.h>

#include "service/registry.h"

/* Monotonic clock in ns. */
int64_t xllm_registry_now_ns(void);
/* A condition variable that waits on the monotonic clock. */
void xllm_registry_cond_init(pthread_cond_t *cv);
/* Waits on cv (mu held) until signalled or the monotonic deadline passes. */
void xllm_registry_cond_wait_until(pthread_cond_t *cv, pthread_mutex_t *mu, int64_t deadline_ns);

/* ---- etcd JSON gateway parsers (registry_etcd.c); every input is untrusted ---------------- */

/* Base64 (standard alphabet, padded). decode: *out malloc'd and NUL-terminated; fails on any
 * invalid character. */
char *xllm_etcd_b64_encode(const void *data, size_t n);
xllm_status xllm_etcd_b64_decode(const char *s, size_t n, char **out, size_t *out_len);

/* A decimal int64 as etcd's JSON writes it: a string ("42") or a number; absent = 0. */
xllm_status xllm_etcd_parse_int64(const void *json_value, int64_t *out);

/* Range response {"header":{"revision":".."},"kvs":[{"key","value","mod_revision","lease"}]}
 * (also the body of a response_range inside a txn response). */
xllm_status xllm_etcd_parse_range(const char *body, size_t len, xllm_registry_kv **kvs, size_t *n,
                                  int64_t *revision, char *err, size_t err_size);

/* One message of the watch stream: {"result":{...,"created","canceled","compact_revision",
 * "events":[{"type":"DELETE"?,"kv":{...}}]}} or {"error":{...}}. events/n: decoded events whose
 * strings live in *storage (free with xllm_etcd_watch_msg_free). */
typedef struct xllm_etcd_watch_msg {
    bool created, canceled;
    int64_t revision;         /* header revision */
    int64_t compact_revision; /* > 0: asked revision was compacted */
    xllm_registry_kv_event *events;
    size_t n_events;
    char **strings; /* owned keys and values */
    size_t n_strings;
} xllm_etcd_watch_msg;

xllm_status xllm_etcd_parse_watch_msg(const char *line, size_t len, xllm_etcd_watch_msg *msg,
                                      char *err, size_t err_size);
void xllm_etcd_watch_msg_free(xllm_etcd_watch_msg *msg);

/* Lease grant / keepalive responses: {"ID":"..","TTL":".."} (keepalive wraps it in
 * "result"). *ttl_s = 0 when the lease no longer exists. */
xllm_status xllm_etcd_parse_lease(const char *body, size_t len, int64_t *id, int64_t *ttl_s,
                                  char *err, size_t err_size);

/* Txn response: {"header":{"revision":".."},"succeeded":true?}. */
xllm_status xllm_etcd_parse_txn(const char *body, size_t len, bool *succeeded, int64_t *revision,
                                char *err, size_t err_size);

#endif
