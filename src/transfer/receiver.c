/* KV transfer receiver (decode instance): an I/O thread accepts connections, runs each one's
 * protocol state machine over the bytes it reads and stages incoming sequences within a memory
 * budget; the engine thread polls finished transfers and imports them into its own KV.
 *
 * Threads: the I/O thread owns the connections and writes the rows of in-flight transfers; the
 * mutex guards the transfer lists, the budget and the stats, which poll / cancel / free (any
 * thread) touch. Import runs on the engine thread of the importing context. */
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "engine/engine-impl.h"
#include "transfer/transfer-impl.h"
#include "util/common.h"

#define OUT_LIMIT ((size_t)1 << 20) /* answers queued for one peer before it is not read */

/* A staged transfer. In flight it belongs to its connection (the I/O thread fills rows);
 * complete or failed it waits in the ready queue, then belongs to whoever polled it. */
struct xllm_kv_transfer_priv {
    xllm_kv_transfer pub; /* first: &priv->pub == the public pointer */
    xllm_kv_receiver *r;
    xllm_xfer_conn *conn; /* owner while in flight, else NULL */
    uint32_t n;
    int32_t *tokens; /* (n) */
    uint8_t *rows;   /* (n_layer, 2, n, row_bytes): K rows then V rows of each layer */
    uint32_t *got;   /* (n_layer) positions received so far per layer */
    size_t bytes;    /* charged to the staging budget */
    bool cancelled;  /* xllm_kv_receiver_cancel asked; the I/O thread tells the sender */
    struct xllm_kv_transfer_priv *next;
};
typedef struct xllm_kv_transfer_priv xfer_rx;

struct xllm_xfer_conn {
    xllm_kv_receiver *r;
    int fd;
    bool hello_done;
    bool closing; /* a protocol error: flush out, then close */
    xllm_xfer_buf in, out;
    char err[256];
    xllm_xfer_conn *next;
};

struct xllm_kv_receiver {
    pthread_mutex_t mu;
    pthread_cond_t cv; /* a transfer became ready */
    int refs;          /* 1 for the receiver + 1 per polled transfer not yet freed */
    xllm_xfer_hello self;
    xllm_kv_receiver_params p;
    xfer_rx *in_flight;          /* list (modified by the I/O thread, under mu) */
    xfer_rx *ready, *ready_tail; /* FIFO of finished transfers */
    int32_t n_in_flight, n_ready;
    size_t staged_bytes;
    bool cancel_pending;
    xllm_kv_receiver_stats st;
    /* sockets (absent in a detached receiver) */
    int lfd, wake_fd, port;
    bool has_thread, stop;
    pthread_t thread;
    xllm_xfer_conn *conns; /* I/O thread only */
};

xllm_kv_receiver_params xllm_kv_receiver_default_params(void) {
    xllm_kv_receiver_params p = {0};
    p.host = "127.0.0.1";
    return p;
}

static void fill_defaults(xllm_kv_receiver_params *p) {
    if (!p->host) p->host = "127.0.0.1";
    if (p->max_staging_bytes == 0) p->max_staging_bytes = (size_t)1 << 30;
    if (p->max_frame_bytes == 0) p->max_frame_bytes = (size_t)16 << 20;
    if (p->max_frame_bytes > UINT32_MAX) p->max_frame_bytes = UINT32_MAX;
    if (p->max_conns <= 0) p->max_conns = 64;
    if (p->max_transfers <= 0) p->max_transfers = 256;
}

/* ==== transfer bookkeeping (callers hold mu unless noted) ==================================== */

static void rx_free_data(xfer_rx *t) {
    free(t->tokens);
    free(t->rows);
    free(t->got);
    t->tokens = NULL;
    t->rows = NULL;
    t->got = NULL;
    t->pub.tokens = NULL;
}

static xfer_rx *find_in_flight(xllm_kv_receiver *r, uint64_t id, xfer_rx ***link) {
    for (xfer_rx **pp = &r->in_flight; *pp; pp = &(*pp)->next) {
        if ((*pp)->pub.id == id) {
            if (link) *link = pp;
            return *pp;
        }
    }
    return NULL;
}

static bool id_staged(xllm_kv_receiver *r, uint64_t id) {
    if (find_in_flight(r, id, NULL)) return true;
    for (xfer_rx *t = r->ready; t; t = t->next)
        if (t->pub.id == id && t->pub.status == XLLM_OK) return true;
    return false;
}

static void push_ready(xllm_kv_receiver *r, xfer_rx *t) {
    t->next = NULL;
    t->conn = NULL;
    if (r->ready_tail)
        r->ready_tail->next = t;
    else
        r->ready = t;
    r->ready_tail = t;
    r->n_ready++;
    pthread_cond_broadcast(&r->cv);
}

/* A failure record for the engine (no rows): the request waiting for id must be failed. Failure
 * records are capped so that a peer cannot grow the queue without bound. */
static void push_failure(xllm_kv_receiver *r, uint64_t id, xllm_status st, const char *msg) {
    if (r->n_ready >= 4 * r->p.max_transfers) return;
    xfer_rx *t = xllm_xcalloc(1, sizeof(*t));
    t->pub.id = id;
    t->pub.status = st;
    t->pub.priv = t;
    t->r = r;
    snprintf(t->pub.error, sizeof(t->pub.error), "%s", msg);
    push_ready(r, t);
}

/* Takes an in-flight transfer out of the list, releases its staging and queues a failure
 * record (unless quiet). */
static void fail_in_flight(xllm_kv_receiver *r, xfer_rx **link, xllm_status st, const char *msg,
                           bool quiet) {
    xfer_rx *t = *link;
    *link = t->next;
    r->n_in_flight--;
    r->staged_bytes -= t->bytes;
    r->st.failed++;
    uint64_t id = t->pub.id;
    rx_free_data(t);
    free(t);
    if (!quiet) push_failure(r, id, st, msg);
}

/* ==== connection state machine (I/O thread, or the test driving a detached receiver) ========== */

xllm_xfer_conn *xllm_xfer_conn_new(xllm_kv_receiver *r) {
    xllm_xfer_conn *c = xllm_xcalloc(1, sizeof(*c));
    c->r = r;
    c->fd = -1;
    return c;
}

xllm_xfer_buf *xllm_xfer_conn_out(xllm_xfer_conn *c) {
    return &c->out;
}

const char *xllm_xfer_conn_error(const xllm_xfer_conn *c) {
    return c->err;
}

void xllm_xfer_conn_free(xllm_xfer_conn *c) {
    if (!c) return;
    xllm_kv_receiver *r = c->r;
    char msg[300];
    snprintf(msg, sizeof(msg), "connection to the sender closed%s%s", c->err[0] ? ": " : "",
             c->err);
    pthread_mutex_lock(&r->mu);
    for (xfer_rx **pp = &r->in_flight; *pp;) {
        if ((*pp)->conn == c)
            fail_in_flight(r, pp, XLLM_ERR_IO, msg, false);
        else
            pp = &(*pp)->next;
    }
    pthread_mutex_unlock(&r->mu);
    xllm_xfer_buf_free(&c->in);
    xllm_xfer_buf_free(&c->out);
    free(c);
}

void xllm_xfer_conn_flush_cancelled(xllm_xfer_conn *c) {
    xllm_kv_receiver *r = c->r;
    pthread_mutex_lock(&r->mu);
    for (xfer_rx **pp = &r->in_flight; *pp;) {
        if ((*pp)->conn == c && (*pp)->cancelled) {
            xllm_xfer_put_status(&c->out, XLLM_XFER_ERROR, (*pp)->pub.id, XLLM_XFER_CODE_CANCELLED,
                                 "cancelled by the decode instance");
            fail_in_flight(r, pp, XLLM_ERR_IO, "cancelled", true);
        } else {
            pp = &(*pp)->next;
        }
    }
    pthread_mutex_unlock(&r->mu);
}

/* A protocol violation: an ERROR frame for the peer, then the connection closes. */
static xllm_status conn_fail(xllm_xfer_conn *c, xllm_status st, uint32_t code) {
    xllm_xfer_put_status(&c->out, XLLM_XFER_ERROR, 0, code, c->err);
    c->closing = true;
    pthread_mutex_lock(&c->r->mu);
    c->r->st.bad_conns++;
    pthread_mutex_unlock(&c->r->mu);
    return st;
}

/* Refuses one transfer (the connection stays). */
static void refuse(xllm_xfer_conn *c, uint64_t id, uint32_t code, const char *msg, bool report) {
    xllm_kv_receiver *r = c->r;
    xllm_xfer_put_status(&c->out, XLLM_XFER_ERROR, id, code, msg);
    pthread_mutex_lock(&r->mu);
    r->st.refused++;
    if (report) push_failure(r, id, xllm_xfer_code_status(code), msg);
    pthread_mutex_unlock(&r->mu);
}

static xllm_status on_seq_begin(xllm_xfer_conn *c, const xllm_xfer_header *h,
                                const uint8_t *payload) {
    xllm_kv_receiver *r = c->r;
    uint32_t n;
    const uint8_t *tok;
    xllm_status st = xllm_xfer_get_seq_begin(payload, h->len, XLLM_XFER_MAX_POS, &n, &tok, c->err,
                                             sizeof(c->err));
    if (st != XLLM_OK) return conn_fail(c, st, XLLM_XFER_CODE_PROTOCOL);
    char msg[200];
    if (n > r->self.n_ctx) {
        snprintf(msg, sizeof(msg), "%u positions exceed the decode context of %u", n,
                 r->self.n_ctx);
        refuse(c, h->id, XLLM_XFER_CODE_TOO_LONG, msg, true);
        return XLLM_OK;
    }
    size_t rows = (size_t)r->self.n_layer * 2 * n * r->self.row_bytes;
    size_t bytes = rows + (size_t)n * sizeof(int32_t) + r->self.n_layer * sizeof(uint32_t);
    pthread_mutex_lock(&r->mu);
    bool dup = id_staged(r, h->id);
    bool full = r->n_in_flight + r->n_ready >= r->p.max_transfers ||
                bytes > r->p.max_staging_bytes - r->staged_bytes;
    if (!dup && !full) r->staged_bytes += bytes; /* charge now, before allocating */
    pthread_mutex_unlock(&r->mu);
    if (dup) {
        snprintf(msg, sizeof(msg), "transfer %llu is already staged", (unsigned long long)h->id);
        refuse(c, h->id, XLLM_XFER_CODE_DUPLICATE, msg, false);
        return XLLM_OK;
    }
    if (full) {
        snprintf(msg, sizeof(msg), "staging full: %zu bytes needed, budget %zu bytes", bytes,
                 r->p.max_staging_bytes);
        refuse(c, h->id, XLLM_XFER_CODE_BUSY, msg, true);
        return XLLM_OK;
    }
    xfer_rx *t = calloc(1, sizeof(*t));
    uint8_t *data = t ? malloc(rows) : NULL; /* large: may fail, refused then */
    if (!data) {
        free(t);
        pthread_mutex_lock(&r->mu);
        r->staged_bytes -= bytes;
        pthread_mutex_unlock(&r->mu);
        refuse(c, h->id, XLLM_XFER_CODE_BUSY, "out of memory for staging", true);
        return XLLM_OK;
    }
    t->rows = data;
    t->r = r;
    t->conn = c;
    t->n = n;
    t->bytes = bytes;
    t->tokens = xllm_xmalloc((size_t)n * sizeof(int32_t));
    for (uint32_t i = 0; i < n; i++) t->tokens[i] = (int32_t)xllm_xfer_r32(tok + 4 * (size_t)i);
    t->got = xllm_xcalloc(r->self.n_layer, sizeof(uint32_t));
    t->pub.id = h->id;
    t->pub.priv = t;
    t->pub.n_tokens = (int32_t)n;
    pthread_mutex_lock(&r->mu);
    t->next = r->in_flight;
    r->in_flight = t;
    r->n_in_flight++;
    pthread_mutex_unlock(&r->mu);
    return XLLM_OK;
}

/* The in-flight transfer id of this connection, or NULL (refused, cancelled or unknown). Only
 * the I/O thread changes the list, so the pointer stays valid while it uses it. */
static xfer_rx *conn_transfer(xllm_xfer_conn *c, uint64_t id, xfer_rx ***link) {
    pthread_mutex_lock(&c->r->mu);
    xfer_rx *t = find_in_flight(c->r, id, link);
    if (t && t->conn != c) t = NULL;
    pthread_mutex_unlock(&c->r->mu);
    return t;
}

static xllm_status on_layer(xllm_xfer_conn *c, const xllm_xfer_header *h, const uint8_t *payload) {
    xllm_kv_receiver *r = c->r;
    xllm_xfer_layer l;
    xllm_status st = xllm_xfer_get_layer(payload, h->len, r->self.n_layer, r->self.row_bytes,
                                         XLLM_XFER_MAX_POS, &l, c->err, sizeof(c->err));
    if (st != XLLM_OK) return conn_fail(c, st, XLLM_XFER_CODE_PROTOCOL);
    xfer_rx *t = conn_transfer(c, h->id, NULL);
    if (!t) return XLLM_OK; /* refused or cancelled: its remaining frames are dropped */
    if (l.pos0 != t->got[l.layer] || l.n > t->n - l.pos0) {
        xllm_set_err(c->err, sizeof(c->err),
                     "kv frame: LAYER %u of transfer %llu carries positions [%u, %u), expected "
                     "them from %u of %u",
                     l.layer, (unsigned long long)h->id, l.pos0, l.pos0 + l.n, t->got[l.layer],
                     t->n);
        return conn_fail(c, XLLM_ERR_FORMAT, XLLM_XFER_CODE_PROTOCOL);
    }
    const size_t rb = r->self.row_bytes;
    uint8_t *k = t->rows + ((size_t)l.layer * 2 * t->n + l.pos0) * rb;
    uint8_t *v = t->rows + (((size_t)l.layer * 2 + 1) * t->n + l.pos0) * rb;
    memcpy(k, l.k, (size_t)l.n * rb);
    memcpy(v, l.v, (size_t)l.n * rb);
    t->got[l.layer] += l.n;
    return XLLM_OK;
}

static xllm_status on_seq_end(xllm_xfer_conn *c, const xllm_xfer_header *h,
                              const uint8_t *payload) {
    xllm_kv_receiver *r = c->r;
    int32_t tok;
    float lp;
    xllm_status st = xllm_xfer_get_seq_end(payload, h->len, &tok, &lp, c->err, sizeof(c->err));
    if (st != XLLM_OK) return conn_fail(c, st, XLLM_XFER_CODE_PROTOCOL);
    xfer_rx **link = NULL;
    xfer_rx *t = conn_transfer(c, h->id, &link);
    if (!t) {
        /* refused earlier (the sender was told) or never begun: answer so it never waits */
        xllm_xfer_put_status(&c->out, XLLM_XFER_ERROR, h->id, XLLM_XFER_CODE_UNKNOWN,
                             "unknown transfer");
        return XLLM_OK;
    }
    for (uint32_t il = 0; il < r->self.n_layer; il++) {
        if (t->got[il] != t->n) {
            xllm_set_err(c->err, sizeof(c->err),
                         "kv frame: SEQ_END of transfer %llu before layer %u is complete (%u of "
                         "%u positions)",
                         (unsigned long long)h->id, il, t->got[il], t->n);
            return conn_fail(c, XLLM_ERR_FORMAT, XLLM_XFER_CODE_PROTOCOL);
        }
    }
    pthread_mutex_lock(&r->mu);
    if (t->cancelled) { /* cancelled while its last frames were being read */
        fail_in_flight(r, link, XLLM_ERR_IO, "cancelled", true);
        pthread_mutex_unlock(&r->mu);
        xllm_xfer_put_status(&c->out, XLLM_XFER_ERROR, h->id, XLLM_XFER_CODE_CANCELLED,
                             "cancelled by the decode instance");
        return XLLM_OK;
    }
    *link = t->next;
    r->n_in_flight--;
    t->pub.status = XLLM_OK;
    t->pub.tokens = t->tokens;
    t->pub.first_token = tok;
    t->pub.first_logprob = lp;
    r->st.completed++;
    push_ready(r, t);
    pthread_mutex_unlock(&r->mu);
    xllm_xfer_put_ack(&c->out, h->id, XLLM_XFER_SEQ_END);
    return XLLM_OK;
}

static xllm_status on_abort(xllm_xfer_conn *c, const xllm_xfer_header *h, const uint8_t *payload) {
    xllm_xfer_status s;
    xllm_status st = xllm_xfer_get_status(payload, h->len, &s, c->err, sizeof(c->err));
    if (st != XLLM_OK) return conn_fail(c, st, XLLM_XFER_CODE_PROTOCOL);
    xfer_rx **link = NULL;
    char msg[300];
    snprintf(msg, sizeof(msg), "aborted by the sender%s%s", s.len ? ": " : "", s.msg);
    bool known = conn_transfer(c, h->id, &link) != NULL;
    pthread_mutex_lock(&c->r->mu);
    if (known)
        fail_in_flight(c->r, link, XLLM_ERR_IO, msg, false);
    else /* its frames never left the sender: the engine may still wait for the id */
        push_failure(c->r, h->id, XLLM_ERR_IO, msg);
    pthread_mutex_unlock(&c->r->mu);
    return XLLM_OK;
}

static xllm_status on_frame(xllm_xfer_conn *c, const xllm_xfer_header *h, const uint8_t *payload) {
    xllm_kv_receiver *r = c->r;
    if (!c->hello_done) {
        if (h->type != XLLM_XFER_HELLO) {
            xllm_set_err(c->err, sizeof(c->err), "kv frame: type %u before HELLO", h->type);
            return conn_fail(c, XLLM_ERR_FORMAT, XLLM_XFER_CODE_PROTOCOL);
        }
        xllm_xfer_hello peer;
        xllm_status st = xllm_xfer_get_hello(payload, h->len, &peer, c->err, sizeof(c->err));
        if (st != XLLM_OK) return conn_fail(c, st, XLLM_XFER_CODE_PROTOCOL);
        if (!xllm_xfer_hello_compatible(&r->self, &peer, c->err, sizeof(c->err)))
            return conn_fail(c, XLLM_ERR_UNSUPPORTED, XLLM_XFER_CODE_MISMATCH);
        xllm_xfer_put_hello(&c->out, &r->self);
        c->hello_done = true;
        return XLLM_OK;
    }
    switch (h->type) {
        case XLLM_XFER_SEQ_BEGIN:
            return on_seq_begin(c, h, payload);
        case XLLM_XFER_LAYER:
            return on_layer(c, h, payload);
        case XLLM_XFER_SEQ_END:
            return on_seq_end(c, h, payload);
        case XLLM_XFER_ABORT:
            return on_abort(c, h, payload);
        case XLLM_XFER_ERROR: {
            xllm_xfer_status s;
            if (xllm_xfer_get_status(payload, h->len, &s, c->err, sizeof(c->err)) == XLLM_OK)
                xllm_set_err(c->err, sizeof(c->err), "the sender reported an error: %s", s.msg);
            c->closing = true; /* the sender gave up on the connection */
            return XLLM_ERR_IO;
        }
        default:
            xllm_set_err(c->err, sizeof(c->err), "kv frame: unexpected type %u from a sender",
                         h->type);
            return conn_fail(c, XLLM_ERR_FORMAT, XLLM_XFER_CODE_PROTOCOL);
    }
}

xllm_status xllm_xfer_conn_feed(xllm_xfer_conn *c, const uint8_t *data, size_t n) {
    if (c->closing) return XLLM_ERR_IO;
    xllm_xfer_buf_reserve(&c->in, n);
    memcpy(c->in.data + c->in.len, data, n);
    c->in.len += n;
    size_t at = 0;
    xllm_status st = XLLM_OK;
    while (c->in.len - at >= XLLM_XFER_HEADER) {
        xllm_xfer_header h;
        /* before HELLO only a HELLO-sized frame is accepted */
        size_t max = c->hello_done ? c->r->p.max_frame_bytes : XLLM_XFER_HELLO_BYTES;
        st = xllm_xfer_get_header(c->in.data + at, max, &h, c->err, sizeof(c->err));
        if (st != XLLM_OK) {
            st = conn_fail(c, st, XLLM_XFER_CODE_PROTOCOL);
            break;
        }
        if (c->in.len - at - XLLM_XFER_HEADER < h.len) break; /* wait for the payload */
        st = on_frame(c, &h, c->in.data + at + XLLM_XFER_HEADER);
        at += XLLM_XFER_HEADER + h.len;
        if (st != XLLM_OK) break;
    }
    xllm_xfer_buf_consume(&c->in, at);
    return st;
}

/* ==== public API: poll, cancel, import, free ===================================================
 */

int xllm_kv_receiver_port(const xllm_kv_receiver *r) {
    return r->port;
}

static void deadline_after(struct timespec *ts, int ms) {
    clock_gettime(CLOCK_MONOTONIC, ts);
    ts->tv_sec += ms / 1000;
    ts->tv_nsec += (long)(ms % 1000) * 1000000L;
    if (ts->tv_nsec >= 1000000000L) {
        ts->tv_sec++;
        ts->tv_nsec -= 1000000000L;
    }
}

xllm_kv_transfer *xllm_kv_receiver_poll(xllm_kv_receiver *r, int timeout_ms) {
    struct timespec dl;
    if (timeout_ms > 0) deadline_after(&dl, timeout_ms);
    pthread_mutex_lock(&r->mu);
    while (!r->ready && timeout_ms != 0) {
        if (timeout_ms < 0) {
            pthread_cond_wait(&r->cv, &r->mu);
        } else if (pthread_cond_timedwait(&r->cv, &r->mu, &dl) == ETIMEDOUT) {
            break;
        }
    }
    xfer_rx *t = r->ready;
    if (t) {
        r->ready = t->next;
        if (!r->ready) r->ready_tail = NULL;
        r->n_ready--;
        t->next = NULL;
        r->refs++;
    }
    pthread_mutex_unlock(&r->mu);
    return t ? &t->pub : NULL;
}

static void wake(xllm_kv_receiver *r) {
    if (r->wake_fd < 0) return;
    uint64_t one = 1;
    ssize_t w = write(r->wake_fd, &one, sizeof(one));
    (void)w; /* an eventfd only fails when the counter is saturated: already woken */
}

bool xllm_kv_receiver_cancel(xllm_kv_receiver *r, uint64_t id) {
    bool found = false;
    pthread_mutex_lock(&r->mu);
    xfer_rx *t = find_in_flight(r, id, NULL);
    if (t) {
        t->cancelled = true;
        r->cancel_pending = true;
        found = true;
    } else {
        for (xfer_rx **pp = &r->ready; *pp; pp = &(*pp)->next) {
            if ((*pp)->pub.id != id) continue;
            xfer_rx *x = *pp;
            *pp = x->next;
            if (r->ready_tail == x) {
                r->ready_tail = NULL;
                for (xfer_rx *y = r->ready; y; y = y->next) r->ready_tail = y;
            }
            r->n_ready--;
            r->staged_bytes -= x->bytes;
            rx_free_data(x);
            free(x);
            found = true;
            break;
        }
    }
    pthread_mutex_unlock(&r->mu);
    if (t) wake(r);
    return found;
}

void xllm_kv_receiver_get_stats(xllm_kv_receiver *r, xllm_kv_receiver_stats *st) {
    pthread_mutex_lock(&r->mu);
    *st = r->st;
    st->in_flight = r->n_in_flight;
    st->ready = r->n_ready;
    st->staged_bytes = r->staged_bytes;
    pthread_mutex_unlock(&r->mu);
}

static void receiver_unref(xllm_kv_receiver *r) {
    pthread_mutex_lock(&r->mu);
    bool last = --r->refs == 0;
    pthread_mutex_unlock(&r->mu);
    if (!last) return;
    pthread_mutex_destroy(&r->mu);
    pthread_cond_destroy(&r->cv);
    free(r);
}

void xllm_kv_transfer_free(xllm_kv_transfer *pub) {
    if (!pub) return;
    xfer_rx *t = pub->priv;
    xllm_kv_receiver *r = t->r;
    pthread_mutex_lock(&r->mu);
    r->staged_bytes -= t->bytes;
    pthread_mutex_unlock(&r->mu);
    rx_free_data(t);
    free(t);
    receiver_unref(r);
}

xllm_status xllm_kv_transfer_import(const xllm_kv_transfer *pub, xllm_context *ctx, int32_t seq,
                                    char *err, size_t err_size) {
    const xfer_rx *t = pub->priv;
    const xllm_xfer_hello *self = &t->r->self; /* immutable after creation */
    if (pub->status != XLLM_OK || !t->rows) {
        xllm_set_err(err, err_size, "kv import: transfer %llu failed: %s",
                     (unsigned long long)pub->id, pub->error);
        return XLLM_ERR_INVALID_ARG;
    }
    if (seq < 0 || seq >= xllm_context_n_seq_max(ctx)) {
        xllm_set_err(err, err_size, "kv import: sequence %d out of range", seq);
        return XLLM_ERR_INVALID_ARG;
    }
    xllm_kv *kv = ctx->kv;
    if (xllm_kv_row_bytes(kv) != self->row_bytes || (uint32_t)xllm_kv_type(kv) != self->kv_type ||
        (uint32_t)xllm_model_n_layer(ctx->model) != self->n_layer ||
        xllm_transfer_model_id(ctx->model) != self->model_id) {
        xllm_set_err(err, err_size,
                     "kv import: the context does not match the receiver's model "
                     "and KV type");
        return XLLM_ERR_INVALID_ARG;
    }
    if (xllm_kv_seq_len(kv, seq) != 0) {
        xllm_set_err(err, err_size, "kv import: sequence %d is not empty", seq);
        return XLLM_ERR_INVALID_ARG;
    }
    const int32_t n = (int32_t)t->n;
    if (n > xllm_context_n_ctx(ctx)) {
        xllm_set_err(err, err_size, "kv import: %d positions exceed the context of %d", n,
                     xllm_context_n_ctx(ctx));
        return XLLM_ERR_KV_FULL;
    }
    xllm_status st = xllm_kv_reserve(kv, seq, n);
    if (st != XLLM_OK) {
        xllm_set_err(err, err_size, "kv import: %s", xllm_kv_last_error(kv));
        xllm_kv_seq_free(kv, seq); /* pages a partial reservation took */
        return st;
    }
    const size_t rb = self->row_bytes;
    for (uint32_t il = 0; il < self->n_layer; il++) {
        const uint8_t *k = t->rows + (size_t)il * 2 * t->n * rb;
        const uint8_t *v = k + (size_t)t->n * rb;
        for (int32_t pos = 0; pos < n; pos++) {
            memcpy(xllm_kv_row_k(kv, (int32_t)il, seq, pos), k + (size_t)pos * rb, rb);
            memcpy(xllm_kv_row_v(kv, (int32_t)il, seq, pos), v + (size_t)pos * rb, rb);
        }
    }
    xllm_kv_seq_set_tokens(kv, seq, 0, t->tokens, n);
    xllm_kv_seq_set_len(kv, seq, n);
    return XLLM_OK;
}

const uint8_t *xllm_xfer_transfer_rows(const xllm_kv_transfer *pub, uint32_t il, int kv) {
    const xfer_rx *t = pub->priv;
    if (!t->rows || il >= t->r->self.n_layer) return NULL;
    return t->rows + (((size_t)il * 2 + (kv ? 1 : 0)) * t->n) * t->r->self.row_bytes;
}

/* ==== I/O thread ================================================================================
 */

static void conn_close(xllm_kv_receiver *r, xllm_xfer_conn **link) {
    xllm_xfer_conn *c = *link;
    *link = c->next;
    if (c->fd >= 0) close(c->fd);
    xllm_xfer_conn_free(c);
    pthread_mutex_lock(&r->mu);
    r->st.conns--;
    pthread_mutex_unlock(&r->mu);
}

/* Writes what the out buffer holds without blocking. Returns false when the socket failed. */
static bool conn_flush(xllm_xfer_conn *c) {
    while (c->out.len) {
        ssize_t w = send(c->fd, c->out.data, c->out.len, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w < 0) return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR;
        xllm_xfer_buf_consume(&c->out, (size_t)w);
    }
    return true;
}

static void accept_conns(xllm_kv_receiver *r) {
    for (;;) {
        int fd = accept4(r->lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) return;
        pthread_mutex_lock(&r->mu);
        bool full = r->st.conns >= r->p.max_conns;
        if (!full) r->st.conns++;
        pthread_mutex_unlock(&r->mu);
        if (full) {
            close(fd);
            continue;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        xllm_xfer_conn *c = xllm_xfer_conn_new(r);
        c->fd = fd;
        c->next = r->conns;
        r->conns = c;
    }
}

/* Reads what is available (bounded per wakeup so one peer cannot starve the others). Returns
 * false when the connection is to be closed now. */
static bool conn_read(xllm_kv_receiver *r, xllm_xfer_conn *c, uint8_t *buf, size_t cap) {
    for (int i = 0; i < 16; i++) {
        ssize_t got = recv(c->fd, buf, cap, MSG_DONTWAIT);
        if (got == 0) return false; /* peer closed */
        if (got < 0) return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR;
        pthread_mutex_lock(&r->mu);
        r->st.bytes_rx += (uint64_t)got;
        pthread_mutex_unlock(&r->mu);
        if (xllm_xfer_conn_feed(c, buf, (size_t)got) != XLLM_OK) {
            conn_flush(c); /* best effort: the ERROR frame is small */
            return false;
        }
    }
    return true;
}

static void *io_main(void *arg) {
    xllm_kv_receiver *r = arg;
    const size_t cap = 256 * 1024;
    uint8_t *buf = xllm_xmalloc(cap);
    struct pollfd *pfd = NULL;
    size_t pfd_cap = 0;
    for (;;) {
        pthread_mutex_lock(&r->mu);
        bool stop = r->stop, cancels = r->cancel_pending;
        r->cancel_pending = false;
        pthread_mutex_unlock(&r->mu);
        if (stop) break;
        if (cancels)
            for (xllm_xfer_conn *c = r->conns; c; c = c->next) xllm_xfer_conn_flush_cancelled(c);

        size_t n = 2;
        for (xllm_xfer_conn *c = r->conns; c; c = c->next) n++;
        if (n > pfd_cap) {
            pfd_cap = n * 2;
            pfd = xllm_xrealloc(pfd, pfd_cap * sizeof(*pfd));
        }
        pfd[0] = (struct pollfd){.fd = r->wake_fd, .events = POLLIN};
        pfd[1] = (struct pollfd){.fd = r->lfd, .events = POLLIN};
        size_t i = 2;
        for (xllm_xfer_conn *c = r->conns; c; c = c->next, i++)
            /* a peer that does not read its answers is not read either (bounded out buffer) */
            pfd[i] = (struct pollfd){.fd = c->fd,
                                     .events = (short)((c->out.len < OUT_LIMIT ? POLLIN : 0) |
                                                       (c->out.len ? POLLOUT : 0))};
        if (poll(pfd, n, -1) < 0) {
            if (errno == EINTR) continue;
            break;
        }
        if (pfd[0].revents) {
            uint64_t v;
            ssize_t rd = read(r->wake_fd, &v, sizeof(v));
            (void)rd;
        }
        /* connections first (the list order matches pfd), then new ones */
        i = 2;
        for (xllm_xfer_conn **pp = &r->conns; *pp; i++) {
            xllm_xfer_conn *c = *pp;
            bool ok = true;
            if (pfd[i].revents & (POLLIN | POLLHUP | POLLERR)) ok = conn_read(r, c, buf, cap);
            if (ok) ok = conn_flush(c) && !c->closing;
            if (!ok)
                conn_close(r, pp);
            else
                pp = &c->next;
        }
        if (pfd[1].revents & POLLIN) accept_conns(r);
    }
    while (r->conns) conn_close(r, &r->conns);
    free(pfd);
    free(buf);
    return NULL;
}

/* ==== creation ==================================================================================
 */

static xllm_kv_receiver *receiver_alloc(const xllm_xfer_hello *self,
                                        const xllm_kv_receiver_params *params) {
    xllm_kv_receiver *r = xllm_xcalloc(1, sizeof(*r));
    r->p = params ? *params : xllm_kv_receiver_default_params();
    fill_defaults(&r->p);
    r->self = *self;
    r->self.role = 1;
    r->self.max_frame = (uint32_t)XLLM_MAX(r->p.max_frame_bytes, 12 + 2 * (size_t)self->row_bytes);
    r->p.max_frame_bytes = r->self.max_frame;
    r->refs = 1;
    r->lfd = r->wake_fd = -1;
    pthread_mutex_init(&r->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&r->cv, &ca);
    pthread_condattr_destroy(&ca);
    return r;
}

xllm_kv_receiver *xllm_kv_receiver_new_detached(const xllm_xfer_hello *self,
                                                const xllm_kv_receiver_params *params) {
    return receiver_alloc(self, params);
}

xllm_status xllm_kv_receiver_new(const xllm_context *ctx, const xllm_kv_receiver_params *params,
                                 xllm_kv_receiver **out, char *err, size_t err_size) {
    *out = NULL;
    xllm_xfer_hello self;
    xllm_xfer_hello_from_ctx(ctx, 1, &self);
    xllm_kv_receiver *r = receiver_alloc(&self, params);
    if (r->p.port < 0 || r->p.port > 65535) {
        xllm_set_err(err, err_size, "kv receiver: port %d out of range", r->p.port);
        xllm_kv_receiver_free(r);
        return XLLM_ERR_INVALID_ARG;
    }
    char port[16];
    snprintf(port, sizeof(port), "%d", r->p.port);
    struct addrinfo hints = {.ai_family = AF_UNSPEC,
                             .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_PASSIVE | AI_NUMERICSERV};
    struct addrinfo *ai = NULL;
    int gai = getaddrinfo(r->p.host, port, &hints, &ai);
    if (gai != 0) {
        xllm_set_err(err, err_size, "kv receiver: %s: %s", r->p.host, gai_strerror(gai));
        xllm_kv_receiver_free(r);
        return XLLM_ERR_IO;
    }
    int e = 0;
    for (struct addrinfo *a = ai; a && r->lfd < 0; a = a->ai_next) {
        int fd = socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0) continue;
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        if (bind(fd, a->ai_addr, a->ai_addrlen) == 0 && listen(fd, 64) == 0) {
            r->lfd = fd;
        } else {
            e = errno;
            close(fd);
        }
    }
    freeaddrinfo(ai);
    if (r->lfd < 0) {
        xllm_set_err(err, err_size, "kv receiver: cannot listen on %s:%d: %s", r->p.host, r->p.port,
                     strerror(e));
        xllm_kv_receiver_free(r);
        return XLLM_ERR_IO;
    }
    struct sockaddr_storage sa;
    socklen_t sl = sizeof(sa);
    getsockname(r->lfd, (struct sockaddr *)&sa, &sl);
    r->port = ntohs(sa.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&sa)->sin6_port
                                             : ((struct sockaddr_in *)&sa)->sin_port);
    r->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (r->wake_fd < 0 || pthread_create(&r->thread, NULL, io_main, r) != 0) {
        xllm_set_err(err, err_size, "kv receiver: cannot start the I/O thread");
        xllm_kv_receiver_free(r);
        return XLLM_ERR_INTERNAL;
    }
    r->has_thread = true;
    *out = r;
    return XLLM_OK;
}

void xllm_kv_receiver_free(xllm_kv_receiver *r) {
    if (!r) return;
    if (r->has_thread) {
        pthread_mutex_lock(&r->mu);
        r->stop = true;
        pthread_mutex_unlock(&r->mu);
        wake(r);
        pthread_join(r->thread, NULL);
    }
    /* in-flight transfers of a detached receiver's connections are the caller's to close */
    pthread_mutex_lock(&r->mu);
    while (r->in_flight) fail_in_flight(r, &r->in_flight, XLLM_ERR_IO, "", true);
    while (r->ready) {
        xfer_rx *t = r->ready;
        r->ready = t->next;
        r->staged_bytes -= t->bytes;
        rx_free_data(t);
        free(t);
    }
    r->ready_tail = NULL;
    r->n_ready = 0;
    pthread_mutex_unlock(&r->mu);
    if (r->lfd >= 0) close(r->lfd);
    if (r->wake_fd >= 0) close(r->wake_fd);
    r->lfd = r->wake_fd = -1;
    receiver_unref(r);
}
