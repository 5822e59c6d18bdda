/* KV transfer sender (prefill instance): the engine thread copies a sequence's rows, layer by
 * layer, into frames on a bounded queue; an I/O thread writes them to the receiver and reads its
 * answers (ACK / ERROR), so the network never blocks compute.
 *
 * Threads: begin / send_layer / end run on the engine thread that owns the context; abort,
 * wait and connected on any thread; the mutex guards the queue and the transfer table. */
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

#define MAX_TRANSFERS 4096 /* unfinished transfers one sender tracks */
#define POOL_BUFS     4    /* written LAYER frame buffers kept for reuse (each up to a frame) */
#define POOL_MIN      (64u << 10) /* smaller buffers are not worth keeping */

typedef enum tx_state { TX_OPEN, TX_ENDED, TX_DONE, TX_FAILED } tx_state;

typedef struct tx {
    uint64_t id;
    uint32_t n;
    tx_state state;
    xllm_status st; /* TX_FAILED: why */
    char msg[320];
    uint32_t *done; /* (n_layer) positions of each layer queued: [0, done[il]) */
    struct tx *next;
} tx;

/* One frame (or several) waiting for the socket. */
typedef struct chunk {
    uint8_t *data;
    size_t len, cap;
    size_t off;   /* off > 0: partly written, must be finished */
    bool writing; /* the I/O thread is writing it without the lock: nobody else frees it */
    uint64_t id;  /* transfer, 0 for none */
    struct chunk *next;
} chunk;

struct xllm_kv_sender {
    xllm_context *ctx;
    xllm_kv_sender_params p;
    xllm_xfer_hello self, peer;
    int fd, wake_fd;
    pthread_t thread;
    bool has_thread;
    pthread_mutex_t mu;
    pthread_cond_t cv; /* queue drained, answer arrived, connection lost */
    chunk *head, *tail;
    size_t queued;
    tx *txs;
    int32_t n_txs;
    bool connected, stop;
    char conn_err[320];
    xllm_kv_span *spans; /* engine thread: runs of one layer */
    int32_t max_spans;
    /* buffers of frames already written, for the next LAYER frames: a fresh buffer costs a page
     * fault per 4 KiB on first touch, several times the copy itself */
    xllm_xfer_buf pool[POOL_BUFS];
    int32_t n_pool;
};

xllm_kv_sender_params xllm_kv_sender_default_params(void) {
    xllm_kv_sender_params p = {0};
    p.host = "127.0.0.1";
    return p;
}

/* ==== helpers (callers hold mu) ================================================================
 */

static tx *find_tx(xllm_kv_sender *s, uint64_t id, tx ***link) {
    for (tx **pp = &s->txs; *pp; pp = &(*pp)->next) {
        if ((*pp)->id == id) {
            if (link) *link = pp;
            return *pp;
        }
    }
    return NULL;
}

static void remove_tx(xllm_kv_sender *s, tx **link) {
    tx *t = *link;
    *link = t->next;
    s->n_txs--;
    free(t->done);
    free(t);
}

/* Drops the queued frames of transfer id that have not started on the wire. */
static void drop_queued(xllm_kv_sender *s, uint64_t id) {
    chunk *prev = NULL;
    for (chunk *c = s->head; c;) {
        chunk *next = c->next;
        if (c->id == id && c->off == 0 && !c->writing) {
            if (prev)
                prev->next = next;
            else
                s->head = next;
            if (s->tail == c) s->tail = prev;
            s->queued -= c->len;
            free(c->data);
            free(c);
        } else {
            prev = c;
        }
        c = next;
    }
    pthread_cond_broadcast(&s->cv);
}

static void fail_tx(xllm_kv_sender *s, tx *t, xllm_status st, const char *msg) {
    if (t->state == TX_DONE || t->state == TX_FAILED) return;
    t->state = TX_FAILED;
    t->st = st;
    snprintf(t->msg, sizeof(t->msg), "%s", msg);
    drop_queued(s, t->id);
}

/* The connection is gone: every unfinished transfer fails, the queue is dropped. */
static void lose_connection(xllm_kv_sender *s, const char *why) {
    if (!s->connected) return;
    s->connected = false;
    snprintf(s->conn_err, sizeof(s->conn_err), "%s", why);
    for (tx *t = s->txs; t; t = t->next) fail_tx(s, t, XLLM_ERR_IO, why);
    while (s->head) {
        chunk *c = s->head;
        s->head = c->next;
        free(c->data);
        free(c);
    }
    s->tail = NULL;
    s->queued = 0;
    pthread_cond_broadcast(&s->cv);
}

static void wake(xllm_kv_sender *s) {
    uint64_t one = 1;
    ssize_t w = write(s->wake_fd, &one, sizeof(one));
    (void)w;
}

/* Queues a frame; waits while the queue is over its bound (never for an empty queue). Takes
 * ownership of b's data. Caller holds mu. */
static xllm_status enqueue(xllm_kv_sender *s, xllm_xfer_buf *b, uint64_t id) {
    while (s->connected && s->queued > 0 && s->queued + b->len > s->p.max_queue_bytes)
        pthread_cond_wait(&s->cv, &s->mu);
    if (!s->connected) {
        xllm_xfer_buf_free(b);
        return XLLM_ERR_IO;
    }
    chunk *c = xllm_xcalloc(1, sizeof(*c));
    c->data = b->data;
    c->len = b->len;
    c->cap = b->cap;
    c->id = id;
    memset(b, 0, sizeof(*b));
    if (s->tail)
        s->tail->next = c;
    else
        s->head = c;
    s->tail = c;
    s->queued += c->len;
    wake(s);
    return XLLM_OK;
}

/* ==== I/O thread ================================================================================
 */

/* Handles one answer from the receiver. Returns false on a protocol violation. Holds mu. */
static bool on_answer(xllm_kv_sender *s, const xllm_xfer_header *h, const uint8_t *p, char *err,
                      size_t err_size) {
    if (h->type == XLLM_XFER_ACK) {
        uint16_t acked;
        if (xllm_xfer_get_ack(p, h->len, &acked, err, err_size) != XLLM_OK) return false;
        tx *t = find_tx(s, h->id, NULL);
        if (t && t->state == TX_ENDED) {
            t->state = TX_DONE;
            pthread_cond_broadcast(&s->cv);
        }
        return true;
    }
    if (h->type == XLLM_XFER_ERROR) {
        xllm_xfer_status st;
        if (xllm_xfer_get_status(p, h->len, &st, err, err_size) != XLLM_OK) return false;
        char msg[300];
        snprintf(msg, sizeof(msg), "receiver: %s", st.msg);
        if (h->id == 0) {
            lose_connection(s, msg);
            return true;
        }
        tx *t = find_tx(s, h->id, NULL);
        if (t) fail_tx(s, t, xllm_xfer_code_status(st.code), msg);
        pthread_cond_broadcast(&s->cv);
        return true;
    }
    xllm_set_err(err, err_size, "kv frame: unexpected type %u from a receiver", h->type);
    return false;
}

static void *io_main(void *arg) {
    xllm_kv_sender *s = arg;
    xllm_xfer_buf in = {0};
    uint8_t buf[4096];
    struct timespec t_stop = {0};
    for (;;) {
        pthread_mutex_lock(&s->mu);
        bool up = s->connected, stop = s->stop, pending = s->head != NULL;
        pthread_mutex_unlock(&s->mu);
        if (!up || (stop && !pending)) break;
        int timeout = -1;
        if (stop) { /* flushing before close: bounded by the timeout */
            struct timespec now;
            clock_gettime(CLOCK_MONOTONIC, &now);
            if (t_stop.tv_sec == 0) t_stop = now;
            long ms =
                (now.tv_sec - t_stop.tv_sec) * 1000 + (now.tv_nsec - t_stop.tv_nsec) / 1000000;
            if (ms >= s->p.timeout_ms) break;
            timeout = (int)(s->p.timeout_ms - ms);
        }
        struct pollfd pfd[2] = {{.fd = s->wake_fd, .events = POLLIN},
                                {.fd = s->fd, .events = (short)(POLLIN | (pending ? POLLOUT : 0))}};
        if (poll(pfd, 2, timeout) < 0) {
            if (errno == EINTR) continue;
            break;
        }
        if (pfd[0].revents) {
            uint64_t v;
            ssize_t rd = read(s->wake_fd, &v, sizeof(v));
            (void)rd;
        }
        char err[256] = "";
        if (pfd[1].revents & (POLLIN | POLLHUP | POLLERR)) {
            ssize_t got = recv(s->fd, buf, sizeof(buf), MSG_DONTWAIT);
            if (got == 0 ||
                (got < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
                pthread_mutex_lock(&s->mu);
                lose_connection(s, got == 0 ? "connection closed by the receiver"
                                            : "connection to the receiver failed");
                pthread_mutex_unlock(&s->mu);
                break;
            }
            if (got > 0) {
                xllm_xfer_buf_reserve(&in, (size_t)got);
                memcpy(in.data + in.len, buf, (size_t)got);
                in.len += (size_t)got;
            }
            size_t at = 0;
            bool ok = true;
            pthread_mutex_lock(&s->mu);
            while (ok && in.len - at >= XLLM_XFER_HEADER) {
                xllm_xfer_header h;
                if (xllm_xfer_get_header(in.data + at, 8 + XLLM_XFER_MAX_MSG, &h, err,
                                         sizeof(err)) != XLLM_OK) {
                    ok = false;
                    break;
                }
                if (in.len - at - XLLM_XFER_HEADER < h.len) break;
                ok = on_answer(s, &h, in.data + at + XLLM_XFER_HEADER, err, sizeof(err));
                at += XLLM_XFER_HEADER + h.len;
            }
            if (!ok) lose_connection(s, err);
            pthread_mutex_unlock(&s->mu);
            xllm_xfer_buf_consume(&in, at);
            if (!ok) break;
        }
        /* write the head without holding mu (the engine thread queues the next frames meanwhile);
         * abort may drop queued chunks, never the one on the wire */
        pthread_mutex_lock(&s->mu);
        bool failed = false;
        while (s->head) {
            chunk *c = s->head;
            size_t n = XLLM_MIN(c->len - c->off, (size_t)1 << 20);
            c->writing = true;
            pthread_mutex_unlock(&s->mu);
            ssize_t w = send(s->fd, c->data + c->off, n, MSG_NOSIGNAL | MSG_DONTWAIT);
            int e = errno;
            pthread_mutex_lock(&s->mu);
            c->writing = false;
            if (w < 0) {
                failed = e != EAGAIN && e != EWOULDBLOCK && e != EINTR;
                break;
            }
            c->off += (size_t)w;
            s->queued -= (size_t)w;
            if (c->off == c->len) {
                s->head = c->next;
                if (!s->head) s->tail = NULL;
                if (s->n_pool < POOL_BUFS && c->cap >= POOL_MIN)
                    s->pool[s->n_pool++] = (xllm_xfer_buf){.data = c->data, .cap = c->cap};
                else
                    free(c->data);
                free(c);
                pthread_cond_broadcast(&s->cv);
            }
        }
        if (failed) lose_connection(s, "connection to the receiver failed while sending");
        pthread_mutex_unlock(&s->mu);
        if (failed) break;
    }
    xllm_xfer_buf_free(&in);
    return NULL;
}

/* ==== connect + handshake =======================================================================
 */

static long ms_left(const struct timespec *deadline) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    long ms = (deadline->tv_sec - now.tv_sec) * 1000 + (deadline->tv_nsec - now.tv_nsec) / 1000000;
    return ms > 0 ? ms : 0;
}

static bool wait_fd(int fd, short ev, const struct timespec *deadline) {
    for (;;) {
        struct pollfd p = {.fd = fd, .events = ev};
        int r = poll(&p, 1, (int)ms_left(deadline));
        if (r < 0 && errno == EINTR) continue;
        return r > 0;
    }
}

static int connect_to(const char *host, int port, const struct timespec *deadline, char *err,
                      size_t err_size) {
    char ps[16];
    snprintf(ps, sizeof(ps), "%d", port);
    struct addrinfo hints = {
        .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICSERV};
    struct addrinfo *ai = NULL;
    int gai = getaddrinfo(host, ps, &hints, &ai);
    if (gai != 0) {
        xllm_set_err(err, err_size, "kv sender: %s: %s", host, gai_strerror(gai));
        return -1;
    }
    int fd = -1, e = ETIMEDOUT;
    for (struct addrinfo *a = ai; a && fd < 0; a = a->ai_next) {
        fd = socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0) continue;
        if (connect(fd, a->ai_addr, a->ai_addrlen) == 0) break;
        if (errno == EINPROGRESS && wait_fd(fd, POLLOUT, deadline)) {
            int so = 0;
            socklen_t sl = sizeof(so);
            getsockopt(fd, SOL_SOCKET, SO_ERROR, &so, &sl);
            if (so == 0) break;
            e = so;
        } else if (errno != EINPROGRESS) {
            e = errno;
        }
        close(fd);
        fd = -1;
    }
    freeaddrinfo(ai);
    if (fd < 0) {
        xllm_set_err(err, err_size, "kv sender: cannot connect to %s:%d: %s", host, port,
                     strerror(e));
        return -1;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    return fd;
}

static bool send_all(int fd, const uint8_t *p, size_t n, const struct timespec *deadline) {
    while (n) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w > 0) {
            p += w;
            n -= (size_t)w;
        } else if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
            if (!wait_fd(fd, POLLOUT, deadline)) return false;
        } else {
            return false;
        }
    }
    return true;
}

static bool recv_all(int fd, uint8_t *p, size_t n, const struct timespec *deadline) {
    while (n) {
        ssize_t got = recv(fd, p, n, MSG_DONTWAIT);
        if (got > 0) {
            p += got;
            n -= (size_t)got;
        } else if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
            if (!wait_fd(fd, POLLIN, deadline)) return false;
        } else {
            return false;
        }
    }
    return true;
}

/* HELLO both ways. The receiver answers a mismatch with ERROR and closes. */
static xllm_status handshake(xllm_kv_sender *s, const struct timespec *deadline, char *err,
                             size_t err_size) {
    xllm_xfer_buf b = {0};
    xllm_xfer_put_hello(&b, &s->self);
    bool ok = send_all(s->fd, b.data, b.len, deadline);
    xllm_xfer_buf_free(&b);
    uint8_t hdr[XLLM_XFER_HEADER], payload[XLLM_XFER_HELLO_BYTES + XLLM_XFER_MAX_MSG + 8];
    if (!ok || !recv_all(s->fd, hdr, sizeof(hdr), deadline)) {
        xllm_set_err(err, err_size, "kv sender: no HELLO from %s:%d (closed or timed out)",
                     s->p.host, s->p.port);
        return XLLM_ERR_IO;
    }
    xllm_xfer_header h;
    char why[256];
    xllm_status st = xllm_xfer_get_header(hdr, sizeof(payload), &h, why, sizeof(why));
    if (st == XLLM_OK && h.type != XLLM_XFER_HELLO && !(h.type == XLLM_XFER_ERROR && h.id == 0)) {
        xllm_set_err(why, sizeof(why), "kv frame: type %u instead of HELLO", h.type);
        st = XLLM_ERR_FORMAT;
    }
    if (st != XLLM_OK) {
        xllm_set_err(err, err_size, "kv sender: bad handshake from %s:%d: %s", s->p.host, s->p.port,
                     why);
        return st;
    }
    if (!recv_all(s->fd, payload, h.len, deadline)) {
        xllm_set_err(err, err_size, "kv sender: handshake with %s:%d cut short", s->p.host,
                     s->p.port);
        return XLLM_ERR_IO;
    }
    if (h.type == XLLM_XFER_ERROR) {
        xllm_xfer_status es;
        st = xllm_xfer_get_status(payload, h.len, &es, why, sizeof(why));
        if (st != XLLM_OK) {
            xllm_set_err(err, err_size, "kv sender: bad handshake: %s", why);
            return st;
        }
        xllm_set_err(err, err_size, "kv sender: %s:%d refused: %s", s->p.host, s->p.port, es.msg);
        return xllm_xfer_code_status(es.code);
    }
    st = xllm_xfer_get_hello(payload, h.len, &s->peer, why, sizeof(why));
    if (st != XLLM_OK) {
        xllm_set_err(err, err_size, "kv sender: bad handshake: %s", why);
        return st;
    }
    if (!xllm_xfer_hello_compatible(&s->self, &s->peer, why, sizeof(why))) {
        xllm_set_err(err, err_size, "kv sender: %s:%d: %s", s->p.host, s->p.port, why);
        return XLLM_ERR_UNSUPPORTED;
    }
    return XLLM_OK;
}

xllm_status xllm_kv_sender_new(xllm_context *ctx, const xllm_kv_sender_params *params,
                               xllm_kv_sender **out, char *err, size_t err_size) {
    *out = NULL;
    xllm_kv_sender_params p = params ? *params : xllm_kv_sender_default_params();
    if (!p.host) p.host = "127.0.0.1";
    if (p.port <= 0 || p.port > 65535) {
        xllm_set_err(err, err_size, "kv sender: port %d out of range", p.port);
        return XLLM_ERR_INVALID_ARG;
    }
    if (p.timeout_ms <= 0) p.timeout_ms = 5000;
    if (p.max_queue_bytes == 0) p.max_queue_bytes = (size_t)256 << 20;
    if (p.max_frame_bytes == 0) p.max_frame_bytes = (size_t)4 << 20;
    xllm_kv_sender *s = xllm_xcalloc(1, sizeof(*s));
    s->ctx = ctx;
    s->p = p;
    s->fd = s->wake_fd = -1;
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    xllm_xfer_hello_from_ctx(ctx, 0, &s->self);
    s->self.max_frame = (uint32_t)XLLM_MAX(XLLM_MIN(p.max_frame_bytes, (size_t)UINT32_MAX),
                                           12 + 2 * (size_t)s->self.row_bytes);
    s->max_spans = xllm_kv_max_spans(ctx->kv);
    s->spans = xllm_xcalloc((size_t)s->max_spans, sizeof(xllm_kv_span));

    struct timespec deadline;
    clock_gettime(CLOCK_MONOTONIC, &deadline);
    deadline.tv_sec += p.timeout_ms / 1000;
    deadline.tv_nsec += (long)(p.timeout_ms % 1000) * 1000000L;
    if (deadline.tv_nsec >= 1000000000L) {
        deadline.tv_sec++;
        deadline.tv_nsec -= 1000000000L;
    }
    xllm_status st = XLLM_ERR_IO;
    s->fd = connect_to(p.host, p.port, &deadline, err, err_size);
    if (s->fd >= 0) st = handshake(s, &deadline, err, err_size);
    if (st == XLLM_OK) {
        s->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        s->connected = true;
        if (s->wake_fd < 0 || pthread_create(&s->thread, NULL, io_main, s) != 0) {
            xllm_set_err(err, err_size, "kv sender: cannot start the I/O thread");
            s->connected = false;
            st = XLLM_ERR_INTERNAL;
        } else {
            s->has_thread = true;
        }
    }
    if (st != XLLM_OK) {
        xllm_kv_sender_free(s);
        return st;
    }
    *out = s;
    return XLLM_OK;
}

void xllm_kv_sender_free(xllm_kv_sender *s) {
    if (!s) return;
    if (s->has_thread) {
        pthread_mutex_lock(&s->mu);
        /* unfinished transfers: tell the receiver to drop their staging */
        for (tx *t = s->txs; t && s->connected; t = t->next) {
            if (t->state != TX_OPEN) continue;
            drop_queued(s, t->id);
            xllm_xfer_buf b = {0};
            xllm_xfer_put_status(&b, XLLM_XFER_ABORT, t->id, XLLM_XFER_CODE_SHUTDOWN,
                                 "the sender is closing");
            s->p.max_queue_bytes = SIZE_MAX; /* never wait here */
            enqueue(s, &b, t->id);
        }
        s->stop = true;
        pthread_mutex_unlock(&s->mu);
        wake(s);
        pthread_join(s->thread, NULL);
    }
    while (s->txs) remove_tx(s, &s->txs);
    while (s->head) {
        chunk *c = s->head;
        s->head = c->next;
        free(c->data);
        free(c);
    }
    if (s->fd >= 0) close(s->fd);
    if (s->wake_fd >= 0) close(s->wake_fd);
    for (int32_t i = 0; i < s->n_pool; i++) xllm_xfer_buf_free(&s->pool[i]);
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->cv);
    free(s->spans);
    free(s);
}

bool xllm_kv_sender_connected(xllm_kv_sender *s) {
    pthread_mutex_lock(&s->mu);
    bool up = s->connected;
    pthread_mutex_unlock(&s->mu);
    return up;
}

/* ==== transfers =================================================================================
 */

xllm_status xllm_kv_sender_begin(xllm_kv_sender *s, uint64_t id, const int32_t *tokens, int32_t n) {
    if (id == 0 || n <= 0 || (uint32_t)n > s->peer.n_ctx || !tokens) return XLLM_ERR_INVALID_ARG;
    for (int32_t i = 0; i < n; i++)
        if (tokens[i] < 0) return XLLM_ERR_INVALID_ARG;
    pthread_mutex_lock(&s->mu);
    xllm_status st = XLLM_OK;
    if (!s->connected)
        st = XLLM_ERR_IO;
    else if (find_tx(s, id, NULL))
        st = XLLM_ERR_INVALID_ARG;
    else if (s->n_txs >= MAX_TRANSFERS)
        st = XLLM_ERR_BUSY;
    if (st == XLLM_OK) {
        tx *t = xllm_xcalloc(1, sizeof(*t));
        t->id = id;
        t->n = (uint32_t)n;
        t->state = TX_OPEN;
        t->done = xllm_xcalloc(s->self.n_layer, sizeof(uint32_t));
        t->next = s->txs;
        s->txs = t;
        s->n_txs++;
        xllm_xfer_buf b = {0};
        xllm_xfer_put_seq_begin(&b, id, tokens, (uint32_t)n);
        st = enqueue(s, &b, id);
    }
    pthread_mutex_unlock(&s->mu);
    return st;
}

/* Copies rows [p0, p0 + m) of K (or V) from the runs into dst. */
static void copy_rows(const xllm_kv_span *sp, int32_t ns, bool v, int32_t p0, int32_t m, size_t rb,
                      uint8_t *dst) {
    for (int32_t i = 0; i < ns && m > 0; i++) {
        int32_t a = XLLM_MAX(p0, sp[i].pos0), e = XLLM_MIN(p0 + m, sp[i].pos0 + sp[i].n);
        if (a >= e) continue;
        const uint8_t *src =
            (const uint8_t *)(v ? sp[i].v : sp[i].k) + (size_t)(a - sp[i].pos0) * rb;
        memcpy(dst + (size_t)(a - p0) * rb, src, (size_t)(e - a) * rb);
    }
}

/* Checks that transfer id may take positions [pos0, pos0 + m) of layer il next (whole: pos0 == 0
 * and nothing of the layer sent yet). Returns the transfer's error first when it failed. */
static xllm_status check_rows(xllm_kv_sender *s, uint64_t id, int32_t il, int32_t pos0, int32_t m,
                              bool whole, uint32_t *n) {
    pthread_mutex_lock(&s->mu);
    tx *t = find_tx(s, id, NULL);
    xllm_status st = XLLM_OK;
    if (t && t->state == TX_FAILED)
        st = t->st; /* its error first: the caller learns it whatever it asks */
    else if (!t || t->state == TX_ENDED || t->state == TX_DONE)
        st = XLLM_ERR_INVALID_ARG;
    else if (whole ? t->done[il] != 0
                   : (uint32_t)pos0 != t->done[il] || (uint32_t)m > t->n - t->done[il])
        st = XLLM_ERR_INVALID_ARG;
    *n = t ? t->n : 0;
    pthread_mutex_unlock(&s->mu);
    return st;
}

/* An empty buffer of at least need bytes: a written frame's when one is big enough. */
static xllm_xfer_buf take_buf(xllm_kv_sender *s, size_t need) {
    xllm_xfer_buf b = {0};
    pthread_mutex_lock(&s->mu);
    for (int32_t i = 0; i < s->n_pool; i++) {
        if (s->pool[i].cap < need) continue;
        b = s->pool[i];
        s->pool[i] = s->pool[--s->n_pool];
        break;
    }
    pthread_mutex_unlock(&s->mu);
    return b;
}

/* Copies rows [pos0, pos0 + m) of layer il of seq into frames and queues them. Engine thread. */
static xllm_status queue_rows(xllm_kv_sender *s, uint64_t id, int32_t seq, int32_t il, int32_t pos0,
                              int32_t m) {
    /* copy on this thread: the KV belongs to it, and the rows may change once it returns */
    const size_t rb = s->self.row_bytes;
    const int32_t end = pos0 + m;
    int32_t ns = xllm_kv_spans(s->ctx->kv, il, seq, end, s->spans, s->max_spans);
    /* frames within our limit and the receiver's (its HELLO guarantees room for one position) */
    size_t per = XLLM_MIN(s->p.max_frame_bytes, (size_t)s->peer.max_frame - 12) / (2 * rb);
    int32_t m_max = (int32_t)XLLM_MIN(XLLM_MAX(per, (size_t)1), (size_t)m);
    xllm_status st = XLLM_OK;
    for (int32_t p0 = pos0; p0 < end && st == XLLM_OK; p0 += m_max) {
        int32_t k = XLLM_MIN(m_max, end - p0);
        xllm_xfer_buf b = take_buf(s, XLLM_XFER_HEADER + 12 + 2 * (size_t)k * rb);
        xllm_xfer_put_layer_head(&b, id, (uint32_t)il, (uint32_t)p0, (uint32_t)k, rb);
        copy_rows(s->spans, ns, false, p0, k, rb, b.data + b.len);
        copy_rows(s->spans, ns, true, p0, k, rb, b.data + b.len + (size_t)k * rb);
        b.len += 2 * (size_t)k * rb;
        pthread_mutex_lock(&s->mu);
        tx *t = find_tx(s, id, NULL);      /* abort (any thread) may have removed it */
        if (!t || t->state == TX_FAILED) { /* aborted, refused or cancelled meanwhile */
            st = t ? t->st : XLLM_ERR_INVALID_ARG;
            xllm_xfer_buf_free(&b);
        } else {
            st = enqueue(s, &b, id);
            if (st == XLLM_OK) t->done[il] = (uint32_t)(p0 + k);
        }
        pthread_mutex_unlock(&s->mu);
    }
    return st;
}

xllm_status xllm_kv_sender_send_layer(xllm_kv_sender *s, uint64_t id, int32_t seq, int32_t il) {
    if (seq < 0 || seq >= xllm_context_n_seq_max(s->ctx) || il < 0 ||
        (uint32_t)il >= s->self.n_layer)
        return XLLM_ERR_INVALID_ARG;
    uint32_t n;
    xllm_status st = check_rows(s, id, il, 0, 0, true, &n);
    if (st != XLLM_OK) return st;
    if (xllm_kv_seq_len(s->ctx->kv, seq) < (int32_t)n) return XLLM_ERR_INVALID_ARG;
    return queue_rows(s, id, seq, il, 0, (int32_t)n);
}

xllm_status xllm_kv_sender_send_rows(xllm_kv_sender *s, uint64_t id, int32_t seq, int32_t il,
                                     int32_t pos0, int32_t m) {
    if (seq < 0 || seq >= xllm_context_n_seq_max(s->ctx) || il < 0 ||
        (uint32_t)il >= s->self.n_layer || pos0 < 0 || m <= 0)
        return XLLM_ERR_INVALID_ARG;
    uint32_t n;
    xllm_status st = check_rows(s, id, il, pos0, m, false, &n);
    if (st != XLLM_OK) return st;
    /* the rows need not be committed yet (the forward pass calls this), but must be reserved */
    xllm_kv *kv = s->ctx->kv;
    if ((int64_t)pos0 + m > xllm_kv_seq_pages(kv, seq) * xllm_kv_block_tokens(kv))
        return XLLM_ERR_INVALID_ARG;
    return queue_rows(s, id, seq, il, pos0, m);
}

xllm_status xllm_kv_sender_end(xllm_kv_sender *s, uint64_t id, int32_t first_token, float logprob) {
    if (first_token < 0 || !(logprob <= 0)) return XLLM_ERR_INVALID_ARG;
    pthread_mutex_lock(&s->mu);
    tx *t = find_tx(s, id, NULL);
    xllm_status st = XLLM_OK;
    if (!t || t->state == TX_ENDED || t->state == TX_DONE) {
        st = XLLM_ERR_INVALID_ARG;
    } else if (t->state == TX_FAILED) {
        st = t->st;
    } else {
        for (uint32_t il = 0; il < s->self.n_layer; il++)
            if (t->done[il] != t->n) st = XLLM_ERR_INVALID_ARG;
    }
    if (st == XLLM_OK) {
        xllm_xfer_buf b = {0};
        xllm_xfer_put_seq_end(&b, id, first_token, logprob);
        st = enqueue(s, &b, id);
        if (st == XLLM_OK) t->state = TX_ENDED;
    }
    pthread_mutex_unlock(&s->mu);
    return st;
}

xllm_status xllm_kv_sender_abort(xllm_kv_sender *s, uint64_t id, const char *reason) {
    pthread_mutex_lock(&s->mu);
    tx **link = NULL;
    tx *t = find_tx(s, id, &link);
    xllm_status st = XLLM_OK;
    if (!t) {
        st = XLLM_ERR_INVALID_ARG;
    } else {
        bool tell = s->connected && (t->state == TX_OPEN || t->state == TX_ENDED);
        drop_queued(s, id);
        remove_tx(s, link);
        if (tell) {
            xllm_xfer_buf b = {0};
            xllm_xfer_put_status(&b, XLLM_XFER_ABORT, id, XLLM_XFER_CODE_CANCELLED,
                                 reason ? reason : "cancelled");
            /* past the bound: an abort must not wait behind the data it cancels */
            chunk *c = xllm_xcalloc(1, sizeof(*c));
            c->data = b.data;
            c->len = b.len;
            c->cap = b.cap;
            c->id = 0;
            if (s->tail)
                s->tail->next = c;
            else
                s->head = c;
            s->tail = c;
            s->queued += c->len;
            wake(s);
        }
    }
    pthread_mutex_unlock(&s->mu);
    return st;
}

xllm_status xllm_kv_sender_wait(xllm_kv_sender *s, uint64_t id, int timeout_ms, char *err,
                                size_t err_size) {
    struct timespec dl;
    clock_gettime(CLOCK_REALTIME, &dl);
    if (timeout_ms > 0) {
        dl.tv_sec += timeout_ms / 1000;
        dl.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
        if (dl.tv_nsec >= 1000000000L) {
            dl.tv_sec++;
            dl.tv_nsec -= 1000000000L;
        }
    }
    pthread_mutex_lock(&s->mu);
    tx **link = NULL;
    tx *t = find_tx(s, id, &link);
    xllm_status st = XLLM_ERR_BUSY;
    if (!t) {
        xllm_set_err(err, err_size, "kv sender: unknown transfer %llu", (unsigned long long)id);
        st = XLLM_ERR_INVALID_ARG;
    }
    while (t) {
        if (t->state == TX_DONE) {
            st = XLLM_OK;
            break;
        }
        if (t->state == TX_FAILED) {
            st = t->st;
            xllm_set_err(err, err_size, "%s", t->msg);
            break;
        }
        if (timeout_ms == 0) break;
        if (timeout_ms < 0) {
            pthread_cond_wait(&s->cv, &s->mu);
        } else if (pthread_cond_timedwait(&s->cv, &s->mu, &dl) == ETIMEDOUT) {
            break;
        }
        t = find_tx(s, id, &link); /* abort may have removed it */
        if (!t) {
            xllm_set_err(err, err_size, "kv sender: transfer %llu was aborted",
                         (unsigned long long)id);
            st = XLLM_ERR_INVALID_ARG;
        }
    }
    if (st == XLLM_ERR_BUSY) xllm_set_err(err, err_size, "kv sender: no answer yet");
    if (t && st != XLLM_ERR_BUSY) remove_tx(s, link);
    pthread_mutex_unlock(&s->mu);
    return st;
}
