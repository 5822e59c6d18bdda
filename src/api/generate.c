/* POST /v1/completions and /v1/chat/completions: builds engine requests from a validated body,
 * then, on the connection's own HTTP thread, reads the token streams (woken once per engine
 * step), detokenizes, applies stop strings and writes either one JSON response or SSE chunks.
 * A client that goes away cancels its requests; the engine frees their KV at the next step. */
#include <poll.h>
#include <stdarg.h>
#include <string.h>
#include <time.h>

#include "api/api-impl.h"
#include "util/common.h"

/* ---------------------------------------------------------------------------------------- */
/* Jobs                                                                                      */
/* ---------------------------------------------------------------------------------------- */

typedef struct choice {
    void *req; /* the backend's request */
    int32_t index;
    int32_t prompt; /* index into the job's prompts */
    xllm_api_detok dt;
    int32_t n_gen;
    bool done;       /* the stream ended or a stop string was found */
    bool final_sent; /* stream: the finish chunk was written */
    const char *finish;
    const char *error; /* the backend's reason for an abort (owned by the request) */
    json_t *lp;        /* logprobs not yet sent (chat: array of entries; completions: object) */
} choice;

typedef struct job {
    xllm_api_server *s;
    xllm_api_request rq;
    int32_t *ids[XLLM_API_MAX_PROMPTS]; /* tokenized prompts */
    int32_t n_ids[XLLM_API_MAX_PROMPTS];
    bool strip_space[XLLM_API_MAX_PROMPTS];
    choice *ch;
    int32_t n_ch;
    xllm_api_waiter *w;
    int fd; /* the client's socket, for noticing that it closed (-1: unknown) */
    char id[48];
    int64_t created;
    int32_t prompt_tokens;
    double t_start;
    /* streaming */
    xllm_api_buf out;
    size_t out_pos;
    bool head_sent;      /* chat: the role chunks */
    bool ended;          /* [DONE] written */
    double t_last_write; /* keep-alive comments go out after XLLM_API_PING_S of silence */
    bool counted;        /* in s->in_flight */
} job;

#define XLLM_API_PING_S 15.0

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void job_free(job *j) {
    if (!j) return;
    for (int32_t i = 0; i < j->n_ch; i++) {
        if (j->ch[i].req) j->s->be->release(j->ch[i].req); /* cancels a request still running */
        xllm_api_detok_free(&j->ch[i].dt);
        json_decref(j->ch[i].lp);
    }
    free(j->ch);
    for (int32_t i = 0; i < XLLM_API_MAX_PROMPTS; i++) free(j->ids[i]);
    if (j->w) xllm_api_waiter_put(j->s, j->w);
    xllm_api_buf_free(&j->out);
    if (j->counted) atomic_fetch_sub(&j->s->in_flight, 1);
    xllm_api_request_clear(&j->rq);
    free(j);
}

static bool client_gone(const job *j) {
    if (j->fd < 0) return false;
    struct pollfd pfd = {.fd = j->fd, .events = POLLRDHUP};
    return poll(&pfd, 1, 0) > 0 && (pfd.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL));
}

uint64_t xllm_api_waiter_seq(xllm_api_waiter *w) {
    pthread_mutex_lock(&w->mu);
    uint64_t v = w->seq;
    pthread_mutex_unlock(&w->mu);
    return v;
}

/* Sleeps until the engine changes one of the job's streams after `seen`, or ms pass. */
void xllm_api_waiter_wait(xllm_api_waiter *w, uint64_t seen, int ms) {
    struct timespec dl;
    clock_gettime(CLOCK_REALTIME, &dl);
    dl.tv_nsec += (long)ms * 1000000L;
    dl.tv_sec += dl.tv_nsec / 1000000000L;
    dl.tv_nsec %= 1000000000L;
    pthread_mutex_lock(&w->mu);
    while (w->seq == seen)
        if (pthread_cond_timedwait(&w->cv, &w->mu, &dl) != 0) break;
    pthread_mutex_unlock(&w->mu);
}

/* ---------------------------------------------------------------------------------------- */
/* Reading the streams                                                                       */
/* ---------------------------------------------------------------------------------------- */

static const char *finish_name(xllm_finish_reason f) {
    switch (f) {
        case XLLM_FINISH_STOP:
            return "stop";
        case XLLM_FINISH_LENGTH:
            return "length";
        default:
            return "abort";
    }
}

static json_t *bytes_array(const xllm_api_buf *raw) {
    json_t *a = json_array();
    for (size_t i = 0; i < raw->len; i++)
        json_array_append_new(a, json_integer((unsigned char)raw->p[i]));
    return a;
}

/* Records the logprobs of one token in the choice's pending list. */
static void add_logprobs(job *j, choice *c, const xllm_token_event *ev, size_t text_offset) {
    const xllm_tokenizer *tok = j->s->tok;
    xllm_api_buf t = {0}, raw = {0};
    xllm_api_token_text(tok, ev->token, &t, &raw);
    if (j->rq.kind == XLLM_API_CHAT) {
        if (!c->lp) c->lp = json_array();
        json_t *e = json_object();
        json_object_set_new(e, "token", xllm_api_json_str(t.p, t.len));
        json_object_set_new(e, "logprob", json_real(ev->logprob));
        json_object_set_new(e, "bytes", bytes_array(&raw));
        json_t *top = json_array();
        for (int32_t k = 0; k < ev->n_top; k++) {
            xllm_api_token_text(tok, ev->top_ids[k], &t, &raw);
            json_t *a = json_object();
            json_object_set_new(a, "token", xllm_api_json_str(t.p, t.len));
            json_object_set_new(a, "logprob", json_real(ev->top_logprobs[k]));
            json_object_set_new(a, "bytes", bytes_array(&raw));
            json_array_append_new(top, a);
        }
        json_object_set_new(e, "top_logprobs", top);
        json_array_append_new(c->lp, e);
    } else {
        if (!c->lp) {
            c->lp = json_object();
            json_object_set_new(c->lp, "tokens", json_array());
            json_object_set_new(c->lp, "token_logprobs", json_array());
            json_object_set_new(c->lp, "top_logprobs", json_array());
            json_object_set_new(c->lp, "text_offset", json_array());
        }
        json_array_append_new(json_object_get(c->lp, "tokens"), xllm_api_json_str(t.p, t.len));
        json_array_append_new(json_object_get(c->lp, "token_logprobs"), json_real(ev->logprob));
        json_array_append_new(json_object_get(c->lp, "text_offset"),
                              json_integer((json_int_t)text_offset));
        json_t *top = json_object();
        for (int32_t k = 0; k < ev->n_top; k++) {
            xllm_api_token_text(tok, ev->top_ids[k], &t, &raw);
            json_object_set_new(top, t.p ? t.p : "", json_real(ev->top_logprobs[k]));
        }
        json_array_append_new(json_object_get(c->lp, "top_logprobs"), top);
    }
    xllm_api_buf_free(&t);
    xllm_api_buf_free(&raw);
}

/* Takes every token the engine has published for each choice. */
static void pump(job *j) {
    for (int32_t i = 0; i < j->n_ch; i++) {
        choice *c = &j->ch[i];
        xllm_token_event ev;
        while (!c->done) {
            int rc = j->s->be->next(c->req, &ev, 0);
            if (rc == 0) break;
            if (rc < 0) {
                c->done = true;
                xllm_finish_reason why = j->s->be->finish_reason(c->req);
                c->finish = finish_name(why);
                if (why == XLLM_FINISH_ABORT && j->s->be->error) c->error = j->s->be->error(c->req);
                xllm_api_detok_finish(&c->dt);
                break;
            }
            c->n_gen++;
            if (j->rq.logprobs >= 0) add_logprobs(j, c, &ev, c->dt.text.len);
            if (xllm_api_detok_push(&c->dt, ev.token)) {
                /* a stop string: the text ends before it; the engine frees the sequence */
                j->s->be->cancel(c->req);
                atomic_fetch_add(&j->s->stop_hits, 1);
                c->done = true;
                c->finish = "stop";
                xllm_api_detok_finish(&c->dt);
            }
        }
    }
}

static bool all_done(const job *j) {
    for (int32_t i = 0; i < j->n_ch; i++)
        if (!j->ch[i].done) return false;
    return true;
}

static json_t *usage_json(const job *j) {
    int32_t gen = 0;
    for (int32_t i = 0; i < j->n_ch; i++) gen += j->ch[i].n_gen;
    json_t *u = json_object();
    json_object_set_new(u, "prompt_tokens", json_integer(j->prompt_tokens));
    json_object_set_new(u, "completion_tokens", json_integer(gen));
    json_object_set_new(u, "total_tokens", json_integer(j->prompt_tokens + gen));
    return u;
}

static json_t *envelope(const job *j, const char *object) {
    json_t *o = json_object();
    json_object_set_new(o, "id", json_string(j->id));
    json_object_set_new(o, "object", json_string(object));
    json_object_set_new(o, "created", json_integer(j->created));
    json_object_set_new(o, "model", json_string(j->s->served_name));
    return o;
}

static void log_job(const job *j, const char *how) {
    if (!j->s->p.log_requests) return;
    int32_t gen = 0;
    for (int32_t i = 0; i < j->n_ch; i++) gen += j->ch[i].n_gen;
    xllm_request_stats st = {0};
    if (j->n_ch && j->ch[0].req) j->s->be->get_stats(j->ch[0].req, &st);
    fprintf(stderr, "xllm serve: %s %s: %d prompt + %d generated tokens, ttft %.1f ms, %.1f ms\n",
            j->id, how, j->prompt_tokens, gen, st.t_first_ms, (now_s() - j->t_start) * 1e3);
}

/* The prompt of a choice as text (for echo). */
static void prompt_text(const job *j, const choice *c, xllm_api_buf *b) {
    const xllm_api_prompt *p = &j->rq.prompts[c->prompt];
    if (p->text) {
        xllm_api_buf_add(b, p->text, p->len);
        return;
    }
    xllm_api_detok d;
    xllm_api_detok_init(&d, j->s->tok, false, NULL, NULL, 0);
    for (int32_t k = 0; k < p->n_ids; k++) xllm_api_detok_push(&d, p->ids[k]);
    xllm_api_detok_finish(&d);
    xllm_api_buf_add(b, d.text.p, d.text.len);
    xllm_api_detok_free(&d);
}

/* ---------------------------------------------------------------------------------------- */
/* Non-streamed responses                                                                    */
/* ---------------------------------------------------------------------------------------- */

static enum MHD_Result respond_whole(job *j, struct MHD_Connection *conn) {
    xllm_api_server *s = j->s;
    for (;;) {
        uint64_t seen = xllm_api_waiter_seq(j->w);
        pump(j);
        if (all_done(j)) break;
        if (client_gone(j)) {
            atomic_fetch_add(&s->disconnects, 1);
            log_job(j, "client gone");
            return MHD_NO; /* job_free (by the caller) cancels the requests */
        }
        xllm_api_waiter_wait(j->w, seen, 200);
    }
    for (int32_t i = 0; i < j->n_ch; i++)
        if (j->ch[i].error)
            return xllm_api_send_error(s, conn, 502, NULL, "instance_failed", "%s", j->ch[i].error);
    const bool chat = j->rq.kind == XLLM_API_CHAT;
    json_t *o = envelope(j, chat ? "chat.completion" : "text_completion");
    json_t *choices = json_array();
    for (int32_t i = 0; i < j->n_ch; i++) {
        choice *c = &j->ch[i];
        const char *text;
        size_t n = xllm_api_detok_take(&c->dt, &text);
        (void)n;
        json_t *e = json_object();
        json_object_set_new(e, "index", json_integer(c->index));
        json_t *str;
        if (!chat && j->rq.echo) {
            xllm_api_buf b = {0};
            prompt_text(j, c, &b);
            xllm_api_buf_add(&b, c->dt.text.p, c->dt.text.len);
            str = xllm_api_json_str(b.p, b.len);
            xllm_api_buf_free(&b);
        } else {
            str = xllm_api_json_str(c->dt.text.p, c->dt.text.len);
        }
        if (chat) {
            json_t *m = json_object();
            json_object_set_new(m, "role", json_string("assistant"));
            json_object_set_new(m, "content", str);
            json_object_set_new(e, "message", m);
        } else {
            json_object_set_new(e, "text", str);
        }
        if (j->rq.logprobs >= 0) {
            json_t *lp = c->lp;
            c->lp = NULL;
            if (chat) {
                json_t *w = json_object();
                json_object_set_new(w, "content", lp ? lp : json_array());
                lp = w;
            }
            json_object_set_new(e, "logprobs", lp ? lp : json_null());
        } else {
            json_object_set_new(e, "logprobs", json_null());
        }
        json_object_set_new(e, "finish_reason", json_string(c->finish));
        json_array_append_new(choices, e);
    }
    json_object_set_new(o, "choices", choices);
    json_object_set_new(o, "usage", usage_json(j));
    log_job(j, "done");
    return xllm_api_send_json(s, conn, 200, o);
}

/* ---------------------------------------------------------------------------------------- */
/* Streamed responses (SSE)                                                                  */
/* ---------------------------------------------------------------------------------------- */

static void sse(job *j, json_t *o) {
    char *t = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    if (!t) return;
    xllm_api_buf_add(&j->out, "data: ", 6);
    xllm_api_buf_add(&j->out, t, strlen(t));
    xllm_api_buf_add(&j->out, "\n\n", 2);
    free(t);
}

/* One chunk for choice c: text (may be empty), its logprobs, a finish reason or none; usage
 * (stolen) when not NULL. */
static void chunk(job *j, choice *c, const char *text, size_t n, const char *finish, bool role,
                  json_t *usage) {
    const bool chat = j->rq.kind == XLLM_API_CHAT;
    json_t *o = envelope(j, chat ? "chat.completion.chunk" : "text_completion");
    json_t *e = json_object();
    json_object_set_new(e, "index", json_integer(c->index));
    if (chat) {
        json_t *d = json_object();
        if (role) json_object_set_new(d, "role", json_string("assistant"));
        if (role || n || !finish) json_object_set_new(d, "content", xllm_api_json_str(text, n));
        json_object_set_new(e, "delta", d);
    } else {
        json_object_set_new(e, "text", xllm_api_json_str(text, n));
    }
    if (c->lp) {
        json_t *lp = c->lp;
        c->lp = NULL;
        if (chat) {
            json_t *w = json_object();
            json_object_set_new(w, "content", lp);
            lp = w;
        }
        json_object_set_new(e, "logprobs", lp);
    } else {
        json_object_set_new(e, "logprobs", json_null());
    }
    json_object_set_new(e, "finish_reason", finish ? json_string(finish) : json_null());
    json_t *arr = json_array();
    json_array_append_new(arr, e);
    json_object_set_new(o, "choices", arr);
    if (usage)
        json_object_set_new(o, "usage", usage);
    else if (j->rq.include_usage)
        json_object_set_new(o, "usage", json_null());
    sse(j, o);
}

/* Formats what the streams hold now into j->out. */
static void format_stream(job *j) {
    uint64_t t0 = now_ns();
    if (!j->head_sent) {
        j->head_sent = true;
        for (int32_t i = 0; i < j->n_ch; i++) {
            if (j->rq.kind == XLLM_API_CHAT) {
                chunk(j, &j->ch[i], "", 0, NULL, true, NULL);
            } else if (j->rq.echo) {
                xllm_api_buf b = {0};
                prompt_text(j, &j->ch[i], &b);
                chunk(j, &j->ch[i], b.p ? b.p : "", b.len, NULL, false, NULL);
                xllm_api_buf_free(&b);
            }
        }
    }
    pump(j);
    int32_t left = 0;
    for (int32_t i = 0; i < j->n_ch; i++) left += !j->ch[i].final_sent;
    for (int32_t i = 0; i < j->n_ch; i++) {
        choice *c = &j->ch[i];
        if (c->final_sent) continue;
        const char *text;
        size_t n = xllm_api_detok_take(&c->dt, &text);
        if (n || c->lp) chunk(j, c, text, n, NULL, false, NULL);
        if (c->done && c->error) {
            /* the request failed on its instance mid-stream: say so, never end silently */
            json_t *o = json_object(), *e = json_object();
            json_object_set_new(e, "message", xllm_api_json_str(c->error, strlen(c->error)));
            json_object_set_new(e, "type", json_string("server_error"));
            json_object_set_new(e, "code", json_string("instance_failed"));
            json_object_set_new(e, "index", json_integer(c->index));
            json_object_set_new(o, "error", e);
            sse(j, o);
            c->error = NULL;
        }
        if (c->done) {
            /* the last finish chunk carries the usage too, unless a usage chunk follows */
            bool last = --left == 0 && !j->rq.include_usage;
            chunk(j, c, "", 0, c->finish, false, last ? usage_json(j) : NULL);
            c->final_sent = true;
        }
    }
    bool all_final = left == 0;
    if (all_final && !j->ended) {
        if (j->rq.include_usage) {
            json_t *o = envelope(j, j->rq.kind == XLLM_API_CHAT ? "chat.completion.chunk"
                                                                : "text_completion");
            json_object_set_new(o, "choices", json_array());
            json_object_set_new(o, "usage", usage_json(j));
            sse(j, o);
        }
        xllm_api_buf_add(&j->out, "data: [DONE]\n\n", 14);
        j->ended = true;
        log_job(j, "streamed");
    }
    atomic_fetch_add(&j->s->detok_ns, now_ns() - t0);
}

/* MHD's content reader, on the connection's thread: blocks until there is something to send. */
static ssize_t stream_read(void *cls, uint64_t pos, char *buf, size_t max) {
    job *j = cls;
    for (;;) {
        if (j->out_pos < j->out.len) {
            size_t n = XLLM_MIN(max, j->out.len - j->out_pos);
            memcpy(buf, j->out.p + j->out_pos, n);
            j->out_pos += n;
            j->t_last_write = now_s();
            return (ssize_t)n;
        }
        if (j->ended) return MHD_CONTENT_READER_END_OF_STREAM;
        j->out.len = 0;
        j->out_pos = 0;
        uint64_t seen = xllm_api_waiter_seq(j->w);
        format_stream(j);
        if (j->out.len) continue;
        if (client_gone(j)) return MHD_CONTENT_READER_END_WITH_ERROR;
        if (now_s() - j->t_last_write > XLLM_API_PING_S) {
            /* an SSE comment keeps proxies and client read timeouts from giving up on a
             * request that waits long in the queue (and a failed write notices a gone client) */
            xllm_api_buf_add(&j->out, ": ping\n\n", 8);
            continue;
        }
        xllm_api_waiter_wait(j->w, seen, 200);
    }
}

/* MHD releases the response: the stream ended, or the client went away (our poll saw it, or
 * a write failed); then job_free cancels the requests. */
static void stream_free(void *cls) {
    job *j = cls;
    if (!j->ended) {
        atomic_fetch_add(&j->s->disconnects, 1);
        log_job(j, "client gone");
    }
    job_free(j);
}

/* ---------------------------------------------------------------------------------------- */
/* Building the requests                                                                     */
/* ---------------------------------------------------------------------------------------- */

static uint64_t random_seed(xllm_api_server *s) {
    uint64_t x = now_ns() ^ (atomic_fetch_add(&s->next_id, 1) * 0x9E3779B97F4A7C15ull);
    x ^= x >> 31;
    x *= 0xBF58476D1CE4E5B9ull;
    return x ^ (x >> 29);
}

/* Tokenizes the prompts (or renders the chat). Returns 0 or an HTTP status with the answer
 * queued. */
static enum MHD_Result prepare(job *j, struct MHD_Connection *conn, bool *fail) {
    xllm_api_server *s = j->s;
    const xllm_tokenizer *tok = s->tok;
    const int32_t bos = xllm_token_bos(tok), n_vocab = xllm_tokenizer_n_vocab(tok);
    const bool spm_space = xllm_tokenizer_add_space_prefix(tok);
    *fail = true;
    if (j->rq.kind == XLLM_API_CHAT) {
        if (!s->tmpl)
            return xllm_api_send_error(s, conn, 400, "messages", "no_chat_template",
                                       "the model has no chat template; start the server with "
                                       "--chat-template FILE to serve chat requests");
        char err[512];
        size_t len = 0;
        char *text = xllm_api_render_chat(s, j->rq.chat, &len, err, sizeof(err));
        if (!text)
            return xllm_api_send_error(s, conn, 400, "messages", NULL, "chat template: %s", err);
        j->n_ids[0] = xllm_api_tokenize(tok, text, len, false, &j->ids[0]);
        free(text);
        j->rq.n_prompts = 1;
    } else {
        for (int32_t i = 0; i < j->rq.n_prompts; i++) {
            const xllm_api_prompt *p = &j->rq.prompts[i];
            if (p->text) {
                j->n_ids[i] = xllm_api_tokenize(tok, p->text, p->len, true, &j->ids[i]);
                if (j->n_ids[i] == 0 && bos >= 0) j->ids[i][j->n_ids[i]++] = bos;
                j->strip_space[i] =
                    spm_space && (p->len == 0 || (j->n_ids[i] == 1 && j->ids[i][0] == bos));
            } else {
                for (int32_t k = 0; k < p->n_ids; k++)
                    if (p->ids[k] >= n_vocab)
                        return xllm_api_send_error(s, conn, 400, "prompt", NULL,
                                                   "prompt token %d is outside the vocabulary "
                                                   "(%d tokens)",
                                                   p->ids[k], n_vocab);
                j->ids[i] = xllm_xmalloc(sizeof(int32_t) * (size_t)p->n_ids);
                memcpy(j->ids[i], p->ids, sizeof(int32_t) * (size_t)p->n_ids);
                j->n_ids[i] = p->n_ids;
                j->strip_space[i] = spm_space && p->n_ids == 1 && p->ids[0] == bos;
            }
        }
    }
    const char *pname = j->rq.kind == XLLM_API_CHAT ? "messages" : "prompt";
    for (int32_t i = 0; i < j->rq.n_prompts; i++) {
        if (j->n_ids[i] <= 0)
            return xllm_api_send_error(s, conn, 400, pname, NULL,
                                       "the prompt is empty (or cannot be tokenized)");
        j->prompt_tokens += j->n_ids[i];
        int32_t max = j->rq.max_tokens;
        if (j->n_ids[i] + (max ? max : 1) > s->n_ctx)
            return xllm_api_send_error(
                s, conn, 400, pname, "context_length_exceeded",
                "This model's maximum context length is %d tokens. However, you requested %d "
                "tokens (%d in the prompt, %d in the completion). Please reduce the prompt or "
                "max_tokens.",
                s->n_ctx, j->n_ids[i] + (max ? max : 1), j->n_ids[i], max ? max : 1);
    }
    int64_t n_ch = (int64_t)j->rq.n_prompts * j->rq.n;
    if (n_ch > s->p.max_choices)
        return xllm_api_send_error(s, conn, 400, "n", NULL,
                                   "n times the number of prompts is %lld; the limit is %d",
                                   (long long)n_ch, s->p.max_choices);
    *fail = false;
    return MHD_YES;
}

/* Submits every choice; on failure cancels those submitted and answers. */
static enum MHD_Result submit(job *j, struct MHD_Connection *conn, bool *fail) {
    xllm_api_server *s = j->s;
    *fail = true;
    j->n_ch = j->rq.n_prompts * j->rq.n;
    j->ch = xllm_xcalloc((size_t)j->n_ch, sizeof(choice));
    uint64_t seed = j->rq.has_seed ? j->rq.sampling.seed : random_seed(s);
    for (int32_t i = 0; i < j->n_ch; i++) {
        choice *c = &j->ch[i];
        c->index = i;
        c->prompt = i / j->rq.n;
        xllm_api_detok_init(&c->dt, s->tok, j->strip_space[c->prompt], j->rq.stop, j->rq.stop_len,
                            j->rq.n_stop);
    }
    pthread_rwlock_rdlock(&s->eng_lock);
    if (atomic_load(&s->state) != XLLM_API_READY) {
        pthread_rwlock_unlock(&s->eng_lock);
        return xllm_api_send_error(s, conn, 503, NULL, "draining", "the server is shutting down");
    }
    for (int32_t i = 0; i < j->n_ch; i++) {
        choice *c = &j->ch[i];
        xllm_request_params rp = xllm_request_default_params();
        int32_t n_prompt = j->n_ids[c->prompt];
        rp.prompt = j->ids[c->prompt];
        rp.n_prompt = n_prompt;
        int32_t room = s->n_ctx - n_prompt;
        rp.max_tokens = j->rq.max_tokens
                            ? j->rq.max_tokens
                            : (j->rq.kind == XLLM_API_CHAT ? room : XLLM_MIN(16, room));
        rp.sampling = j->rq.sampling;
        rp.sampling.seed = seed + (uint64_t)i;
        rp.ignore_eos = j->rq.ignore_eos;
        rp.priority = j->rq.priority;
        rp.offline = j->rq.offline;
        rp.top_logprobs = j->rq.logprobs;
        rp.ttft_slo_ms = j->rq.ttft_slo_ms;
        rp.tpot_slo_ms = j->rq.tpot_slo_ms;
        rp.notify = xllm_api_waiter_notify;
        rp.notify_user = j->w;
        char err[512];
        xllm_status st = s->be->submit(s->be_ctx, &rp, &c->req, err, sizeof(err));
        if (st != XLLM_OK) {
            pthread_rwlock_unlock(&s->eng_lock);
            if (st == XLLM_ERR_BUSY)
                return xllm_api_send_error(s, conn, 429, NULL, "queue_full", "%s; retry later",
                                           err);
            if (st == XLLM_ERR_IO)
                return xllm_api_send_error(s, conn, 503, NULL, "no_instance", "%s", err);
            return xllm_api_send_error(s, conn, st == XLLM_ERR_INVALID_ARG ? 400 : 500, NULL, NULL,
                                       "%s", err);
        }
    }
    pthread_rwlock_unlock(&s->eng_lock);
    *fail = false;
    return MHD_YES;
}

enum MHD_Result xllm_api_handle_generate(xllm_api_server *s, struct MHD_Connection *conn,
                                         xllm_api_kind kind, const char *body, size_t len) {
    job *j = xllm_xcalloc(1, sizeof(*j));
    j->s = s;
    j->t_start = now_s();
    j->t_last_write = j->t_start;
    j->created = (int64_t)time(NULL);
    j->fd = -1;
    atomic_fetch_add(&s->in_flight, 1);
    j->counted = true;
    snprintf(j->id, sizeof(j->id), "%s-%llx%04llx", kind == XLLM_API_CHAT ? "chatcmpl" : "cmpl",
             (unsigned long long)j->created,
             (unsigned long long)(atomic_fetch_add(&s->next_id, 1) & 0xffff));
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CONNECTION_FD);
    if (ci) j->fd = ci->connect_fd;

    const char *param = NULL;
    char err[512];
    if (xllm_api_request_parse(body, len, kind, &j->rq, &param, err, sizeof(err)) != XLLM_OK) {
        job_free(j);
        return xllm_api_send_error(s, conn, 400, param, NULL, "%s", err);
    }
    bool fail;
    enum MHD_Result ret = prepare(j, conn, &fail);
    if (fail) {
        job_free(j);
        return ret;
    }
    j->w = xllm_api_waiter_get(s);
    ret = submit(j, conn, &fail);
    if (fail) {
        job_free(j);
        return ret;
    }
    if (!j->rq.stream) {
        ret = respond_whole(j, conn);
        job_free(j);
        return ret;
    }
    struct MHD_Response *r =
        MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16384, stream_read, j, stream_free);
    if (!r) {
        job_free(j);
        return MHD_NO;
    }
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, "text/event-stream");
    MHD_add_response_header(r, MHD_HTTP_HEADER_CACHE_CONTROL, "no-cache");
    MHD_add_response_header(r, "X-Accel-Buffering", "no");
    ret = MHD_queue_response(conn, 200, r);
    MHD_destroy_response(r);
    xllm_api_count_code(s, 200);
    return ret;
}
