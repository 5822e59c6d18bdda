/* The etcd registry store: etcd v3 through its JSON gRPC gateway (etcd >= 3.4, /v3/...) over
 * HTTP with libcurl; keys and values are base64, int64 fields decimal strings. Unary calls run
 * on the caller's thread, each bounded by the store timeout; every watch has its own thread
 * that reads the streaming /v3/watch response and reconnects when the stream breaks. */
#include <curl/curl.h>
#include <jansson.h>
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>

#include "service/registry-impl.h"
#include "service/registry.h"
#include "util/common.h"

#define ETCD_MAX_BODY        (64u << 20)
#define WATCH_BACKOFF_MIN_MS 100
#define WATCH_BACKOFF_MAX_MS 2000

typedef struct etcd_store {
    char *endpoint; /* "http://host:port", no trailing slash */
    long timeout_ms;
} etcd_store;

/* ============================================================================================ */
/* Base64 and JSON parsing (untrusted input)                                                    */
/* ============================================================================================ */

static const char B64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

char *xllm_etcd_b64_encode(const void *data, size_t n) {
    const unsigned char *p = data;
    char *out = xllm_xmalloc((n + 2) / 3 * 4 + 1), *o = out;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)p[i] << 16;
        if (i + 1 < n) v |= (uint32_t)p[i + 1] << 8;
        if (i + 2 < n) v |= p[i + 2];
        *o++ = B64[v >> 18 & 63];
        *o++ = B64[v >> 12 & 63];
        *o++ = i + 1 < n ? B64[v >> 6 & 63] : '=';
        *o++ = i + 2 < n ? B64[v & 63] : '=';
    }
    *o = 0;
    return out;
}

static int b64_val(char c) {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+' || c == '-') return 62;
    if (c == '/' || c == '_') return 63;
    return -1;
}

xllm_status xllm_etcd_b64_decode(const char *s, size_t n, char **out, size_t *out_len) {
    *out = NULL;
    *out_len = 0;
    while (n > 0 && s[n - 1] == '=') n--;
    if (n % 4 == 1) return XLLM_ERR_FORMAT;
    char *buf = xllm_xmalloc(n / 4 * 3 + 3), *o = buf;
    uint32_t acc = 0;
    int bits = 0;
    for (size_t i = 0; i < n; i++) {
        int v = b64_val(s[i]);
        if (v < 0) {
            free(buf);
            return XLLM_ERR_FORMAT;
        }
        acc = acc << 6 | (uint32_t)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            *o++ = (char)(acc >> bits & 0xff);
        }
    }
    *o = 0;
    *out = buf;
    *out_len = (size_t)(o - buf);
    return XLLM_OK;
}

xllm_status xllm_etcd_parse_int64(const void *json_value, int64_t *out) {
    const json_t *v = json_value;
    *out = 0;
    if (!v) return XLLM_OK;
    if (json_is_integer(v)) {
        *out = (int64_t)json_integer_value(v);
        return XLLM_OK;
    }
    const char *s = json_string_value(v);
    if (!s) return XLLM_ERR_FORMAT;
    bool neg = *s == '-';
    if (neg) s++;
    if (!*s || strlen(s) > 19) return XLLM_ERR_FORMAT;
    uint64_t acc = 0;
    for (; *s; s++) {
        if (*s < '0' || *s > '9') return XLLM_ERR_FORMAT;
        acc = acc * 10 + (uint64_t)(*s - '0');
    }
    if (acc > (uint64_t)INT64_MAX) return XLLM_ERR_FORMAT;
    *out = neg ? -(int64_t)acc : (int64_t)acc;
    return XLLM_OK;
}

/* Decodes a base64 string field of o ("" when absent and optional). */
static xllm_status b64_field(const json_t *o, const char *name, bool required, char **out) {
    *out = NULL;
    const json_t *v = json_object_get(o, name);
    if (!v) {
        if (required) return XLLM_ERR_FORMAT;
        *out = xllm_xstrdup("");
        return XLLM_OK;
    }
    const char *s = json_string_value(v);
    if (!s) return XLLM_ERR_FORMAT;
    size_t n;
    return xllm_etcd_b64_decode(s, json_string_length(v), out, &n);
}

static json_t *load(const char *body, size_t len, char *err, size_t err_size) {
    json_error_t je;
    json_t *o = json_loadb(body, len, 0, &je);
    if (!o || !json_is_object(o)) {
        xllm_set_err(err, err_size, "etcd: bad JSON response%s%s", o ? "" : ": ", o ? "" : je.text);
        json_decref(o);
        return NULL;
    }
    json_t *e = json_object_get(o, "error");
    if (e) {
        const char *msg = json_string_value(json_object_get(o, "message"));
        if (!msg) msg = json_string_value(e);
        if (!msg) msg = json_string_value(json_object_get(e, "message"));
        xllm_set_err(err, err_size, "etcd: %s", msg ? msg : "error");
        json_decref(o);
        return NULL;
    }
    return o;
}

static xllm_status header_revision(const json_t *o, int64_t *rev) {
    return xllm_etcd_parse_int64(json_object_get(json_object_get(o, "header"), "revision"), rev);
}

/* Parses the "kvs" array of a range response object. */
static xllm_status parse_kvs(const json_t *o, xllm_registry_kv **kvs, size_t *n) {
    *kvs = NULL;
    *n = 0;
    const json_t *arr = json_object_get(o, "kvs");
    if (arr && !json_is_array(arr)) return XLLM_ERR_FORMAT;
    size_t cnt = arr ? json_array_size(arr) : 0;
    xllm_registry_kv *out = xllm_xcalloc(cnt + 1, sizeof(*out));
    for (size_t i = 0; i < cnt; i++) {
        const json_t *kv = json_array_get(arr, i);
        if (!json_is_object(kv) || b64_field(kv, "key", true, &out[i].key) != XLLM_OK ||
            b64_field(kv, "value", false, &out[i].value) != XLLM_OK ||
            xllm_etcd_parse_int64(json_object_get(kv, "mod_revision"), &out[i].mod_revision) !=
                XLLM_OK ||
            xllm_etcd_parse_int64(json_object_get(kv, "lease"), &out[i].lease) != XLLM_OK) {
            xllm_registry_kvs_free(out, i + 1);
            return XLLM_ERR_FORMAT;
        }
    }
    *kvs = out;
    *n = cnt;
    return XLLM_OK;
}

xllm_status xllm_etcd_parse_range(const char *body, size_t len, xllm_registry_kv **kvs, size_t *n,
                                  int64_t *revision, char *err, size_t err_size) {
    *kvs = NULL;
    *n = 0;
    json_t *o = load(body, len, err, err_size);
    if (!o) return XLLM_ERR_FORMAT;
    int64_t rev = 0;
    xllm_status st = header_revision(o, &rev);
    if (st == XLLM_OK) st = parse_kvs(o, kvs, n);
    if (st != XLLM_OK)
        xllm_set_err(err, err_size, "etcd: malformed range response");
    else if (revision)
        *revision = rev;
    json_decref(o);
    return st;
}

xllm_status xllm_etcd_parse_lease(const char *body, size_t len, int64_t *id, int64_t *ttl_s,
                                  char *err, size_t err_size) {
    *id = 0;
    *ttl_s = 0;
    json_t *o = load(body, len, err, err_size);
    if (!o) return XLLM_ERR_FORMAT;
    json_t *r = json_object_get(o, "result");
    if (!r) r = o;
    xllm_status st = json_is_object(r) ? XLLM_OK : XLLM_ERR_FORMAT;
    if (st == XLLM_OK) st = xllm_etcd_parse_int64(json_object_get(r, "ID"), id);
    if (st == XLLM_OK) st = xllm_etcd_parse_int64(json_object_get(r, "TTL"), ttl_s);
    if (st == XLLM_OK && *ttl_s < 0) *ttl_s = 0;
    if (st != XLLM_OK) xllm_set_err(err, err_size, "etcd: malformed lease response");
    json_decref(o);
    return st;
}

xllm_status xllm_etcd_parse_txn(const char *body, size_t len, bool *succeeded, int64_t *revision,
                                char *err, size_t err_size) {
    *succeeded = false;
    json_t *o = load(body, len, err, err_size);
    if (!o) return XLLM_ERR_FORMAT;
    int64_t rev = 0;
    xllm_status st = header_revision(o, &rev);
    json_t *s = json_object_get(o, "succeeded");
    if (s && !json_is_boolean(s)) st = XLLM_ERR_FORMAT;
    if (st != XLLM_OK) {
        xllm_set_err(err, err_size, "etcd: malformed txn response");
    } else {
        *succeeded = json_is_true(s);
        if (revision) *revision = rev;
    }
    json_decref(o);
    return st;
}

void xllm_etcd_watch_msg_free(xllm_etcd_watch_msg *msg) {
    for (size_t i = 0; i < msg->n_strings; i++) free(msg->strings[i]);
    free(msg->strings);
    free(msg->events);
    memset(msg, 0, sizeof(*msg));
}

xllm_status xllm_etcd_parse_watch_msg(const char *line, size_t len, xllm_etcd_watch_msg *msg,
                                      char *err, size_t err_size) {
    memset(msg, 0, sizeof(*msg));
    json_t *o = load(line, len, err, err_size);
    if (!o) return XLLM_ERR_FORMAT;
    json_t *r = json_object_get(o, "result");
    xllm_status st = json_is_object(r) ? XLLM_OK : XLLM_ERR_FORMAT;
    if (st == XLLM_OK) st = header_revision(r, &msg->revision);
    if (st == XLLM_OK)
        st = xllm_etcd_parse_int64(json_object_get(r, "compact_revision"), &msg->compact_revision);
    if (st == XLLM_OK) {
        msg->created = json_is_true(json_object_get(r, "created"));
        msg->canceled = json_is_true(json_object_get(r, "canceled"));
    }
    json_t *evs = st == XLLM_OK ? json_object_get(r, "events") : NULL;
    if (evs && !json_is_array(evs)) st = XLLM_ERR_FORMAT;
    size_t n = evs ? json_array_size(evs) : 0;
    if (st == XLLM_OK && n) {
        msg->events = xllm_xcalloc(n, sizeof(*msg->events));
        msg->strings = xllm_xcalloc(2 * n, sizeof(char *));
    }
    for (size_t i = 0; st == XLLM_OK && i < n; i++) {
        json_t *ev = json_array_get(evs, i);
        json_t *kv = json_object_get(ev, "kv");
        const char *type = json_string_value(json_object_get(ev, "type"));
        xllm_registry_kv_event *e = &msg->events[i];
        char *key = NULL, *value = NULL;
        if (!json_is_object(kv) || (json_object_get(ev, "type") && !type)) {
            st = XLLM_ERR_FORMAT;
            break;
        }
        e->type =
            type && strcmp(type, "DELETE") == 0 ? XLLM_REGISTRY_OP_DELETE : XLLM_REGISTRY_OP_PUT;
        if (type && strcmp(type, "DELETE") != 0 && strcmp(type, "PUT") != 0) st = XLLM_ERR_FORMAT;
        if (st == XLLM_OK) st = b64_field(kv, "key", true, &key);
        if (key) msg->strings[msg->n_strings++] = key;
        if (st == XLLM_OK) st = b64_field(kv, "value", false, &value);
        if (value) msg->strings[msg->n_strings++] = value;
        if (st == XLLM_OK)
            st = xllm_etcd_parse_int64(json_object_get(kv, "mod_revision"), &e->mod_revision);
        if (st == XLLM_OK && e->type == XLLM_REGISTRY_OP_DELETE) value[0] = 0;
        e->key = key;
        e->value = value;
        msg->n_events = i + 1;
    }
    json_decref(o);
    if (st != XLLM_OK) {
        xllm_etcd_watch_msg_free(msg);
        xllm_set_err(err, err_size, "etcd: malformed watch message");
    }
    return st;
}

/* ============================================================================================ */
/* HTTP                                                                                         */
/* ============================================================================================ */

typedef struct buf {
    char *p;
    size_t n, cap;
    bool overflow;
} buf;

static size_t buf_write(char *data, size_t size, size_t nmemb, void *user) {
    buf *b = user;
    size_t n = size * nmemb;
    if (b->n + n + 1 > ETCD_MAX_BODY) {
        b->overflow = true;
        return 0;
    }
    if (b->n + n + 1 > b->cap) {
        b->cap = XLLM_MAX(b->cap * 2, b->n + n + 1);
        b->p = xllm_xrealloc(b->p, b->cap);
    }
    memcpy(b->p + b->n, data, n);
    b->n += n;
    b->p[b->n] = 0;
    return n;
}

static CURL *easy_new(const etcd_store *s, const char *path, const char *body) {
    CURL *c = curl_easy_init();
    XLLM_ASSERT(c);
    size_t n = strlen(s->endpoint) + strlen(path) + 1;
    char *url = xllm_xmalloc(n);
    snprintf(url, n, "%s%s", s->endpoint, path);
    curl_easy_setopt(c, CURLOPT_URL, url);
    free(url); /* libcurl copies URL strings */
    curl_easy_setopt(c, CURLOPT_COPYPOSTFIELDS, body);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT_MS, s->timeout_ms);
    curl_easy_setopt(c, CURLOPT_TCP_KEEPALIVE, 1L);
    curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http,https");
    return c;
}

/* POSTs body to path; on success *resp is the malloc'd response body (NUL-terminated). */
static xllm_status http_post(const etcd_store *s, const char *path, const char *body, char **resp,
                             size_t *resp_len, char *err, size_t err_size) {
    *resp = NULL;
    CURL *c = easy_new(s, path, body);
    buf b = {0};
    curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, s->timeout_ms);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, buf_write);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, &b);
    CURLcode rc = curl_easy_perform(c);
    long code = 0;
    curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &code);
    curl_easy_cleanup(c);
    if (rc != CURLE_OK) {
        if (b.overflow)
            xllm_set_err(err, err_size, "etcd at %s: response larger than %u bytes", s->endpoint,
                         ETCD_MAX_BODY);
        else if (rc == CURLE_OPERATION_TIMEDOUT)
            xllm_set_err(err, err_size, "etcd at %s: no answer within %ld ms (%s)", s->endpoint,
                         s->timeout_ms, path);
        else
            xllm_set_err(err, err_size, "etcd at %s unreachable: %s", s->endpoint,
                         curl_easy_strerror(rc));
        free(b.p);
        return XLLM_ERR_IO;
    }
    if (!b.p) b.p = xllm_xstrdup("");
    if (code != 200) {
        /* The gateway answers errors as {"error":..,"message":..,"code":..}. */
        json_t *o = json_loadb(b.p, b.n, 0, NULL);
        const char *msg = json_string_value(json_object_get(o, "message"));
        xllm_set_err(err, err_size, "etcd at %s: HTTP %ld on %s: %s", s->endpoint, code, path,
                     msg ? msg : "(no message)");
        json_decref(o);
        free(b.p);
        return code == 404 || code == 400 ? XLLM_ERR_INVALID_ARG : XLLM_ERR_IO;
    }
    *resp = b.p;
    *resp_len = b.n;
    return XLLM_OK;
}

/* POSTs a JSON object (reference stolen) and returns the response body. */
static xllm_status post_json(const etcd_store *s, const char *path, json_t *req, char **resp,
                             size_t *resp_len, char *err, size_t err_size) {
    char *body = json_dumps(req, JSON_COMPACT);
    json_decref(req);
    XLLM_ASSERT(body);
    xllm_status st = http_post(s, path, body, resp, resp_len, err, err_size);
    free(body);
    return st;
}

static json_t *b64_json(const char *s) {
    char *e = xllm_etcd_b64_encode(s, strlen(s));
    json_t *v = json_string(e);
    free(e);
    XLLM_ASSERT(v);
    return v;
}

static json_t *int64_json(int64_t v) {
    char tmp[32];
    snprintf(tmp, sizeof(tmp), "%lld", (long long)v);
    return json_string(tmp);
}

/* The end of the key range that holds every key starting with prefix: prefix with its last
 * byte below 0xff incremented (etcd's "prefix end"); "\0" = to the end of the keyspace. */
static char *prefix_end(const char *prefix) {
    size_t n = strlen(prefix);
    char *e = xllm_xstrdup(prefix);
    while (n > 0 && (unsigned char)e[n - 1] == 0xff) n--;
    if (n == 0) {
        free(e);
        return NULL;
    }
    e[n - 1]++;
    e[n] = 0;
    return e;
}

static void set_range(json_t *o, const char *key, bool prefix) {
    json_object_set_new(o, "key", b64_json(key));
    if (prefix) {
        char *end = prefix_end(key);
        json_object_set_new(o, "range_end", end ? b64_json(end) : json_string("AA=="));
        free(end);
    }
}

/* ============================================================================================ */
/* Unary store calls                                                                            */
/* ============================================================================================ */

static xllm_status etcd_lease_grant(void *ctx, int64_t ttl_ms, int64_t *lease, int64_t *granted,
                                    char *err, size_t err_size) {
    const etcd_store *s = ctx;
    json_t *req = json_pack("{s:I}", "TTL", (json_int_t)XLLM_MAX((ttl_ms + 999) / 1000, 1));
    char *resp;
    size_t len;
    xllm_status st = post_json(s, "/v3/lease/grant", req, &resp, &len, err, err_size);
    if (st != XLLM_OK) return st;
    int64_t ttl_s = 0;
    st = xllm_etcd_parse_lease(resp, len, lease, &ttl_s, err, err_size);
    free(resp);
    if (st == XLLM_OK && (*lease == 0 || ttl_s <= 0)) {
        xllm_set_err(err, err_size, "etcd at %s: lease grant returned no lease", s->endpoint);
        st = XLLM_ERR_FORMAT;
    }
    *granted = ttl_s * 1000;
    return st;
}

static xllm_status etcd_lease_keepalive(void *ctx, int64_t lease, int64_t *ttl_ms, char *err,
                                        size_t err_size) {
    const etcd_store *s = ctx;
    *ttl_ms = 0;
    json_t *req = json_object();
    json_object_set_new(req, "ID", int64_json(lease));
    char *resp;
    size_t len;
    xllm_status st = post_json(s, "/v3/lease/keepalive", req, &resp, &len, err, err_size);
    if (st != XLLM_OK) return st;
    int64_t id = 0, ttl_s = 0;
    st = xllm_etcd_parse_lease(resp, len, &id, &ttl_s, err, err_size);
    free(resp);
    *ttl_ms = ttl_s * 1000;
    return st;
}

static xllm_status etcd_lease_revoke(void *ctx, int64_t lease, char *err, size_t err_size) {
    const etcd_store *s = ctx;
    json_t *req = json_object();
    json_object_set_new(req, "ID", int64_json(lease));
    char *resp;
    size_t len;
    char msg[512];
    xllm_status st = post_json(s, "/v3/lease/revoke", req, &resp, &len, msg, sizeof(msg));
    if (st == XLLM_ERR_INVALID_ARG && strstr(msg, "lease not found")) return XLLM_OK;
    if (st != XLLM_OK) {
        xllm_set_err(err, err_size, "%s", msg);
        return st;
    }
    json_t *o = load(resp, len, err, err_size);
    free(resp);
    if (!o) return XLLM_ERR_FORMAT;
    json_decref(o);
    return XLLM_OK;
}

static xllm_status etcd_txn(void *ctx, const xllm_registry_cmp *cmp, const xllm_registry_op *ops,
                            size_t n_ops, bool *succeeded, int64_t *revision, char *err,
                            size_t err_size) {
    const etcd_store *s = ctx;
    *succeeded = false;
    json_t *req = json_object();
    if (cmp) {
        json_t *c = json_object();
        json_object_set_new(c, "key", b64_json(cmp->key));
        json_object_set_new(c, "result", json_string("EQUAL"));
        if (cmp->type == XLLM_REGISTRY_CMP_ABSENT) {
            json_object_set_new(c, "target", json_string("CREATE"));
            json_object_set_new(c, "create_revision", json_string("0"));
        } else {
            json_object_set_new(c, "target", json_string("LEASE"));
            json_object_set_new(c, "lease", int64_json(cmp->lease));
        }
        json_object_set_new(req, "compare", json_pack("[o]", c));
    }
    json_t *succ = json_array();
    for (size_t i = 0; i < n_ops; i++) {
        json_t *r = json_object();
        set_range(r, ops[i].key, false);
        if (ops[i].type == XLLM_REGISTRY_OP_PUT) {
            json_object_set_new(r, "value", b64_json(ops[i].value ? ops[i].value : ""));
            if (ops[i].lease) json_object_set_new(r, "lease", int64_json(ops[i].lease));
            json_array_append_new(succ, json_pack("{s:o}", "request_put", r));
        } else {
            json_array_append_new(succ, json_pack("{s:o}", "request_delete_range", r));
        }
    }
    json_object_set_new(req, "success", succ);
    char *resp;
    size_t len;
    xllm_status st = post_json(s, "/v3/kv/txn", req, &resp, &len, err, err_size);
    if (st != XLLM_OK) return st;
    st = xllm_etcd_parse_txn(resp, len, succeeded, revision, err, err_size);
    free(resp);
    return st;
}

static xllm_status etcd_range(void *ctx, const char *key, bool prefix, xllm_registry_kv **kvs,
                              size_t *n, int64_t *revision, char *err, size_t err_size) {
    const etcd_store *s = ctx;
    *kvs = NULL;
    *n = 0;
    json_t *req = json_object();
    set_range(req, key, prefix);
    json_object_set_new(req, "sort_order", json_string("ASCEND"));
    json_object_set_new(req, "sort_target", json_string("KEY"));
    char *resp;
    size_t len;
    xllm_status st = post_json(s, "/v3/kv/range", req, &resp, &len, err, err_size);
    if (st != XLLM_OK) return st;
    st = xllm_etcd_parse_range(resp, len, kvs, n, revision, err, err_size);
    free(resp);
    return st;
}

/* ============================================================================================ */
/* Watch: one thread per watch, reading the /v3/watch stream                                   */
/* ============================================================================================ */

typedef struct etcd_watch {
    const etcd_store *s;
    char *prefix;
    xllm_registry_watch_fn fn;
    void *user;
    CURLM *multi;
    atomic_bool stop;
    pthread_t thr;
    int64_t next_rev; /* 0 = from now, then a resync */
    bool restart;     /* end this stream and open another */
    bool got_data;
    buf line;
} etcd_watch;

/* Handles one message of the stream (watch thread). */
static void watch_message(etcd_watch *w, const char *p, size_t n) {
    xllm_etcd_watch_msg msg;
    char err[256];
    if (xllm_etcd_parse_watch_msg(p, n, &msg, err, sizeof(err)) != XLLM_OK) {
        fprintf(stderr, "xllm registry: etcd watch: %s\n", err);
        w->restart = true;
        return;
    }
    w->got_data = true;
    if (msg.canceled || msg.compact_revision > 0) {
        /* The history we asked for is gone: start from now and read everything again. */
        w->next_rev = 0;
        w->restart = true;
    } else if (msg.created) {
        if (w->next_rev == 0) {
            w->next_rev = msg.revision + 1;
            w->fn(w->user, NULL, 0, true);
        }
    }
    if (!w->restart && msg.n_events) {
        w->fn(w->user, msg.events, msg.n_events, false);
        for (size_t i = 0; i < msg.n_events; i++)
            if (msg.events[i].mod_revision >= w->next_rev)
                w->next_rev = msg.events[i].mod_revision + 1;
    }
    xllm_etcd_watch_msg_free(&msg);
}

static size_t watch_write(char *data, size_t size, size_t nmemb, void *user) {
    etcd_watch *w = user;
    size_t n = size * nmemb;
    if (atomic_load(&w->stop) || w->restart) return 0;
    if (buf_write(data, 1, n, &w->line) != n) return 0;
    /* The gateway writes one JSON object per line. */
    size_t start = 0;
    for (size_t i = 0; i < w->line.n && !w->restart; i++) {
        if (w->line.p[i] != '\n') continue;
        if (i > start) watch_message(w, w->line.p + start, i - start);
        start = i + 1;
    }
    memmove(w->line.p, w->line.p + start, w->line.n - start);
    w->line.n -= start;
    return w->restart ? 0 : n;
}

static void *watch_main(void *arg) {
    etcd_watch *w = arg;
    int backoff = WATCH_BACKOFF_MIN_MS;
    while (!atomic_load(&w->stop)) {
        json_t *cr = json_object();
        set_range(cr, w->prefix, true);
        if (w->next_rev > 0) json_object_set_new(cr, "start_revision", int64_json(w->next_rev));
        json_t *req = json_pack("{s:o}", "create_request", cr);
        char *body = json_dumps(req, JSON_COMPACT);
        json_decref(req);
        CURL *c = easy_new(w->s, "/v3/watch", body);
        free(body);
        curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, watch_write);
        curl_easy_setopt(c, CURLOPT_WRITEDATA, w);
        w->line.n = 0;
        w->restart = false;
        w->got_data = false;
        curl_multi_add_handle(w->multi, c);
        CURLcode result = CURLE_OK;
        int running = 1;
        while (running && !atomic_load(&w->stop)) {
            curl_multi_perform(w->multi, &running);
            CURLMsg *m;
            int left;
            while ((m = curl_multi_info_read(w->multi, &left)))
                if (m->msg == CURLMSG_DONE) result = m->data.result;
            if (running) curl_multi_poll(w->multi, NULL, 0, 1000, NULL);
        }
        curl_multi_remove_handle(w->multi, c);
        curl_easy_cleanup(c);
        if (atomic_load(&w->stop)) break;
        if (result != CURLE_OK && !w->restart)
            fprintf(stderr, "xllm registry: etcd watch on %s broke: %s; reconnecting\n",
                    w->s->endpoint, curl_easy_strerror(result));
        backoff = w->got_data ? WATCH_BACKOFF_MIN_MS : XLLM_MIN(backoff * 2, WATCH_BACKOFF_MAX_MS);
        /* Sleep, but wake at once on watch_stop (curl_multi_wakeup). */
        curl_multi_poll(w->multi, NULL, 0, backoff, NULL);
    }
    return NULL;
}

static xllm_status etcd_watch_start(void *ctx, const char *prefix, int64_t start_rev,
                                    xllm_registry_watch_fn fn, void *user, void **watch, char *err,
                                    size_t err_size) {
    etcd_watch *w = xllm_xcalloc(1, sizeof(*w));
    w->s = ctx;
    w->prefix = xllm_xstrdup(prefix);
    w->fn = fn;
    w->user = user;
    w->next_rev = start_rev > 0 ? start_rev : 0;
    atomic_init(&w->stop, false);
    w->multi = curl_multi_init();
    if (!w->multi || pthread_create(&w->thr, NULL, watch_main, w) != 0) {
        if (w->multi) curl_multi_cleanup(w->multi);
        free(w->prefix);
        free(w);
        xllm_set_err(err, err_size, "etcd: cannot start the watch thread");
        return XLLM_ERR_INTERNAL;
    }
    *watch = w;
    return XLLM_OK;
}

static void etcd_watch_stop(void *ctx, void *watch) {
    etcd_watch *w = watch;
    atomic_store(&w->stop, true);
    curl_multi_wakeup(w->multi);
    pthread_join(w->thr, NULL);
    curl_multi_cleanup(w->multi);
    free(w->line.p);
    free(w->prefix);
    free(w);
}

static void etcd_free(void *ctx) {
    etcd_store *s = ctx;
    free(s->endpoint);
    free(s);
    curl_global_cleanup();
}

static const xllm_registry_store_i etcd_iface = {
    .version = XLLM_REGISTRY_STORE_VERSION,
    .name = "etcd",
    .lease_grant = etcd_lease_grant,
    .lease_keepalive = etcd_lease_keepalive,
    .lease_revoke = etcd_lease_revoke,
    .txn = etcd_txn,
    .range = etcd_range,
    .watch_start = etcd_watch_start,
    .watch_stop = etcd_watch_stop,
    .free = etcd_free,
};

xllm_status xllm_registry_etcd_store(const char *endpoint, int timeout_ms, xllm_registry_store *out,
                                     char *err, size_t err_size) {
    memset(out, 0, sizeof(*out));
    if (!endpoint || !endpoint[0] || strlen(endpoint) > 1024 || timeout_ms < 0) {
        xllm_set_err(err, err_size, "etcd: endpoint must be http://host:port");
        return XLLM_ERR_INVALID_ARG;
    }
    if (strncmp(endpoint, "https://", 8) == 0) {
        xllm_set_err(err, err_size, "etcd: TLS endpoints are not supported yet: %s", endpoint);
        return XLLM_ERR_UNSUPPORTED;
    }
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
        xllm_set_err(err, err_size, "etcd: libcurl initialisation failed");
        return XLLM_ERR_INTERNAL;
    }
    etcd_store *s = xllm_xcalloc(1, sizeof(*s));
    const char *hp = strncmp(endpoint, "http://", 7) == 0 ? endpoint + 7 : endpoint;
    size_t n = strlen(hp) + 8;
    s->endpoint = xllm_xmalloc(n);
    snprintf(s->endpoint, n, "http://%s", hp);
    while (strlen(s->endpoint) > 7 && s->endpoint[strlen(s->endpoint) - 1] == '/')
        s->endpoint[strlen(s->endpoint) - 1] = 0;
    s->timeout_ms = timeout_ms ? timeout_ms : 3000;
    *out = (xllm_registry_store){&etcd_iface, s};
    return XLLM_OK;
}
