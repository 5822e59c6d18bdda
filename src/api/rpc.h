/* The instance RPC's message codec (docs/cluster.md): the body of POST /v1/instance/generate
 * and the newline-delimited JSON lines that answer it (header, token events, finish), plus a
 * bounded line splitter. The only place that writes or reads these messages: the engine side
 * (src/api/instance.c) and the service side (src/service/service.c) both go through it.
 * Every function is pure and thread-agnostic (each object is used by one thread at a time). */
#ifndef XLLM_API_RPC_H
#define XLLM_API_RPC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "xllm/engine.h"

#define XLLM_RPC_MAGIC      "xllm-rpc"
#define XLLM_RPC_VERSION    1
#define XLLM_RPC_MAX_PROMPT (1 << 20) /* token ids in one request's prompt */
#define XLLM_RPC_MAX_ADDR   127       /* bytes of pd_export.to ("host:port"), without the NUL */
#define XLLM_RPC_MAX_LINE   16384     /* bytes of one response line, without its '\n' */

/* ---------------------------------------------------------------------------------------- */
/* The generate request                                                                      */
/* ---------------------------------------------------------------------------------------- */

/* Encodes a request (the prompt, every sampling and scheduling field, pd_export_id /
 * pd_export_to / pd_import_id; notify is not sent) as a JSON body. Returns malloc'd NUL-ended
 * text, or NULL with "<field>: <why>" in err when a value is outside what the format carries
 * (the same bounds the parser enforces, except the vocabulary, which only the reader knows).
 * *field (may be NULL) then names the field. */
char *xllm_rpc_generate_encode(const xllm_request_params *rp, const char **field, char *err,
                               size_t err_size);

/* A parsed request: rp as the engine takes it, pointing at the owned copies below. A plain
 * value: it may be copied, and is cleared once. */
typedef struct xllm_rpc_request {
    xllm_request_params rp; /* rp.prompt = ids; rp.pd_export_to = pd_to (NULL: no export) */
    int32_t *ids;           /* (n_prompt,) malloc'd */
    char *pd_to;            /* malloc'd, or NULL */
} xllm_rpc_request;

/* Parses and validates a body (untrusted bytes). Absent optional fields keep the defaults of
 * xllm_request_default_params. Token ids must be in [0, n_vocab). On error returns
 * XLLM_ERR_INVALID_ARG, "<field>: <why>" in err, the field's name in *field (may be NULL;
 * NULL is stored when the body as a whole is wrong) and leaves out empty. */
xllm_status xllm_rpc_generate_parse(const char *body, size_t len, int32_t n_vocab,
                                    xllm_rpc_request *out, const char **field, char *err,
                                    size_t err_size);
void xllm_rpc_request_clear(xllm_rpc_request *r); /* accepts a cleared or zeroed request */

/* Whether two requests carry the same values in every field the format carries (for tests and
 * fuzzing). */
bool xllm_rpc_params_equal(const xllm_request_params *a, const xllm_request_params *b);

/* ---------------------------------------------------------------------------------------- */
/* Response lines                                                                            */
/* ---------------------------------------------------------------------------------------- */

/* Wire values, append-only. */
typedef enum xllm_rpc_line_kind {
    XLLM_RPC_LINE_HEADER = 1, /* {"magic":"xllm-rpc","version":1}: the first line */
    XLLM_RPC_LINE_TOKEN = 2,  /* {"t":id,"lp":logprob,"top":[[id,lp],...]}: one per token */
    XLLM_RPC_LINE_FINISH = 3, /* {"finish":"stop|length|cancel|abort",...}: the last line */
} xllm_rpc_line_kind;

typedef struct xllm_rpc_line {
    xllm_rpc_line_kind kind;
    xllm_token_event ev;       /* TOKEN; a logprob that is not finite travels as null and reads
                                  back as -INFINITY */
    xllm_finish_reason finish; /* FINISH: STOP, LENGTH, CANCEL or ABORT */
    int32_t n_cached;          /* FINISH: prompt tokens served from the prefix cache, >= 0 */
    int32_t n_preempted;       /* FINISH: times preempted, >= 0 */
    double t_queue_ms;         /* FINISH: submit -> admitted, finite, >= 0 */
    double t_first_ms;         /* FINISH: submit -> first token, finite, >= 0 */
} xllm_rpc_line;

/* Encodes one line, '\n' included. Returns malloc'd NUL-ended text (its length in *len), or
 * NULL with "<field>: <why>" in err when l holds a value the format does not carry (a negative
 * token id, n_top outside 0..20, an unknown kind or finish reason, negative or non-finite
 * stats). */
char *xllm_rpc_line_encode(const xllm_rpc_line *l, size_t *len, char *err, size_t err_size);

/* Parses one line (untrusted bytes, without its '\n'). Token ids must be in [0, n_vocab).
 * Returns XLLM_OK, or XLLM_ERR_INVALID_ARG with "<field>: <why>" in err. */
xllm_status xllm_rpc_line_parse(const char *p, size_t n, int32_t n_vocab, xllm_rpc_line *out,
                                char *err, size_t err_size);

bool xllm_rpc_line_equal(const xllm_rpc_line *a, const xllm_rpc_line *b); /* tests, fuzzing */

/* "stop", "length", "cancel", "abort" (the wire names); "none" for anything else. */
const char *xllm_rpc_finish_name(xllm_finish_reason f);

/* ---------------------------------------------------------------------------------------- */
/* Line splitter                                                                             */
/* ---------------------------------------------------------------------------------------- */

/* Cuts a byte stream that arrives in arbitrary pieces into '\n'-ended lines. Holds at most
 * max_line bytes of an incomplete line: a longer line is an error, never unbounded memory.
 * Zero-initialize (max_line 0 = XLLM_RPC_MAX_LINE); free with xllm_rpc_splitter_free. */
typedef struct xllm_rpc_splitter {
    size_t max_line; /* bytes of one line without its '\n'; 0 = XLLM_RPC_MAX_LINE */
    char *buf;       /* the incomplete line so far (len bytes) */
    size_t len, cap;
    xllm_status status; /* XLLM_OK, or the error that stopped it (every later call fails) */
} xllm_rpc_splitter;

/* Called with each complete line (p[0..n), no '\n', not NUL-ended; valid during the call).
 * A non-OK status (with a message in err) stops the splitter. */
typedef xllm_status (*xllm_rpc_line_fn)(void *user, const char *p, size_t n, char *err,
                                        size_t err_size);

/* Feeds the next piece of the stream. Returns XLLM_OK, XLLM_ERR_FORMAT with a message when a
 * line exceeds max_line, or the first non-OK status of on_line; after an error every call
 * fails with the same status and calls nothing. */
xllm_status xllm_rpc_splitter_feed(xllm_rpc_splitter *s, const char *p, size_t n,
                                   xllm_rpc_line_fn on_line, void *user, char *err,
                                   size_t err_size);
void xllm_rpc_splitter_free(xllm_rpc_splitter *s);

/* ---------------------------------------------------------------------------------------- */
/* Reading a whole response                                                                  */
/* ---------------------------------------------------------------------------------------- */

/* Reads a generate response as it arrives: splits, parses and checks the order of its lines
 * (one header first, then token lines, then one finish line, then nothing). Any line that is
 * not valid here (a bad header, a token before the header, a line after the finish, bytes
 * that are not a line of the RPC) stops it with an error: the caller fails the exchange.
 * Zero-initialize, set n_vocab and the callback, feed, then check xllm_rpc_reader_end. */
typedef struct xllm_rpc_reader {
    int32_t n_vocab; /* token ids must be in [0, n_vocab) */
    /* each token event, in order (optional); a non-OK status stops the reader */
    xllm_status (*on_token)(void *user, const xllm_token_event *ev, char *err, size_t err_size);
    void *user;
    xllm_rpc_splitter split;
    bool header;        /* the header arrived */
    int32_t n_tokens;   /* token lines so far */
    bool finished;      /* the finish line arrived */
    xllm_rpc_line last; /* the finish line, once finished */
} xllm_rpc_reader;

/* Feeds the next piece of the response body. XLLM_OK, or the error that stopped the reader
 * (XLLM_ERR_INVALID_ARG for a bad line, XLLM_ERR_FORMAT for an over-long one), with a message
 * in err naming the line and field; then every later call fails the same way. */
xllm_status xllm_rpc_reader_feed(xllm_rpc_reader *r, const char *p, size_t n, char *err,
                                 size_t err_size);
/* The body ended: XLLM_OK when it ended right after its finish line, else XLLM_ERR_FORMAT with
 * what is missing in err. */
xllm_status xllm_rpc_reader_end(const xllm_rpc_reader *r, char *err, size_t err_size);
void xllm_rpc_reader_free(xllm_rpc_reader *r);

#endif /* XLLM_API_RPC_H */
