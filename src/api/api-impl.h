/* Private interface of the API module: OpenAI request parsing and validation, byte-safe
 * incremental detokenization with stop strings, UTF-8 repair. All of it is thread-agnostic:
 * each object is used by one HTTP thread at a time. */
#ifndef XLLM_API_IMPL_H
#define XLLM_API_IMPL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "xllm/xllm.h"

/* ---------------------------------------------------------------------------------------- */
/* Requests                                                                                  */
/* ---------------------------------------------------------------------------------------- */

typedef enum xllm_api_kind {
    XLLM_API_COMPLETION = 0, /* POST /v1/completions */
    XLLM_API_CHAT = 1,       /* POST /v1/chat/completions */
} xllm_api_kind;

#define XLLM_API_MAX_STOP     16  /* stop strings per request */
#define XLLM_API_MAX_STOP_LEN 256 /* bytes of one stop string */
#define XLLM_API_MAX_N        16  /* choices per prompt */
#define XLLM_API_MAX_PROMPTS  16  /* prompts in one completion request */

/* One completion prompt: text (borrowed from the parsed body) or token ids (owned). */
typedef struct xllm_api_prompt {
    const char *text; /* NULL when ids are given */
    size_t len;
    int32_t *ids;
    int32_t n_ids;
} xllm_api_prompt;

/* A validated request. Strings point into `body`, which the request owns. */
typedef struct xllm_api_request {
    xllm_api_kind kind;
    json_t *body;
    const char *model; /* NULL when absent */
    bool stream;
    bool include_usage; /* stream_options.include_usage */
    int32_t max_tokens; /* 0 = the default (16 for completions, the rest of the context for chat) */
    int32_t n;          /* choices per prompt, 1..XLLM_API_MAX_N */
    xllm_sampler_params sampling;
    bool has_seed;
    const char *stop[XLLM_API_MAX_STOP];
    size_t stop_len[XLLM_API_MAX_STOP];
    int32_t n_stop;
    int32_t logprobs; /* -1 = none; else alternatives per token (0..20) */
    bool echo;        /* completions: prepend the prompt text to the output */
    bool ignore_eos;
    int32_t priority; /* lower first */
    bool offline;
    int64_t ttft_slo_ms;
    int64_t tpot_slo_ms;
    xllm_api_prompt prompts[XLLM_API_MAX_PROMPTS]; /* completions */
    int32_t n_prompts;
    json_t *chat; /* chat: normalized {messages, tools?, documents?, add_generation_prompt,
                     chat_template_kwargs?} for the template renderer */
} xllm_api_request;

/* Parses and validates a body. On error returns XLLM_ERR_INVALID_ARG with a message in err and
 * the name of the offending field in *param (NULL when the body as a whole is wrong); the
 * request is then empty. The caller clears a parsed request with xllm_api_request_clear. */
xllm_status xllm_api_request_parse(const char *body, size_t len, xllm_api_kind kind,
                                   xllm_api_request *out, const char **param, char *err,
                                   size_t err_size);
void xllm_api_request_clear(xllm_api_request *r);

/* ---------------------------------------------------------------------------------------- */
/* UTF-8                                                                                     */
/* ---------------------------------------------------------------------------------------- */

/* A growable byte buffer. */
typedef struct xllm_api_buf {
    char *p;
    size_t len, cap;
} xllm_api_buf;
void xllm_api_buf_add(xllm_api_buf *b, const char *s, size_t n);
void xllm_api_buf_printf(xllm_api_buf *b, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
void xllm_api_buf_free(xllm_api_buf *b);

/* Appends in[0..n) to out as valid UTF-8: each maximal ill-formed subsequence becomes U+FFFD
 * (the Unicode "best practice", as Python and WHATWG decoders do). Unless final, a trailing
 * incomplete (but so far valid) character is left unconsumed. Returns the bytes consumed. */
size_t xllm_api_utf8_repair(const char *in, size_t n, bool final, xllm_api_buf *out);

/* ---------------------------------------------------------------------------------------- */
/* Incremental detokenization                                                                */
/* ---------------------------------------------------------------------------------------- */

/* Turns a stream of token ids into text that is always valid UTF-8 and never contains a stop
 * string: incomplete characters and text that may be the start of a stop string are held
 * back until the next token settles them. */
typedef struct xllm_api_detok {
    const xllm_tokenizer *tok; /* may be NULL when only xllm_api_detok_push_bytes is used */
    bool strip_space;          /* drop the first piece's leading space (SPM, text start) */
    xllm_api_buf raw;          /* bytes not yet decoded (an incomplete character) */
    xllm_api_buf text;         /* decoded text (valid UTF-8); ends at a stop string once hit */
    size_t sent;               /* bytes of text handed out by xllm_api_detok_take */
    size_t checked;            /* bytes of text searched for stop strings */
    const char *const *stop;
    const size_t *stop_len;
    int32_t n_stop;
    size_t max_stop;
    bool stopped; /* a stop string was found (text ends before it) */
} xllm_api_detok;

void xllm_api_detok_init(xllm_api_detok *d, const xllm_tokenizer *tok, bool strip_space,
                         const char *const *stop, const size_t *stop_len, int32_t n_stop);
void xllm_api_detok_free(xllm_api_detok *d);
/* Adds a token (or raw bytes). Returns true when a stop string completed: the text is cut
 * before it, and later pushes are ignored. */
bool xllm_api_detok_push(xllm_api_detok *d, int32_t token);
bool xllm_api_detok_push_bytes(xllm_api_detok *d, const char *s, size_t n);
/* The stream ended: decodes held bytes (an incomplete character becomes U+FFFD) and releases
 * text held for a possible stop string. */
void xllm_api_detok_finish(xllm_api_detok *d);
/* Text that is now safe to send: *out points into the detokenizer (valid until the next call),
 * returns its length and marks it sent. */
size_t xllm_api_detok_take(xllm_api_detok *d, const char **out);

/* A token's bytes (special tokens rendered) as valid UTF-8 text into out (cleared first);
 * raw receives the raw bytes when not NULL. */
void xllm_api_token_text(const xllm_tokenizer *tok, int32_t id, xllm_api_buf *out,
                         xllm_api_buf *raw);

/* ---------------------------------------------------------------------------------------- */
/* The server (server.c) and the generation endpoints (generate.c)                           */
/* ---------------------------------------------------------------------------------------- */

#include <pthread.h>
#include <stdatomic.h>

#include <microhttpd.h>

#include "xllm/api.h"
#include "xllm/chat.h"
#include "xllm/engine.h"

typedef enum xllm_api_state {
    XLLM_API_LOADING = 0,
    XLLM_API_READY = 1,
    XLLM_API_DRAINING = 2,
    XLLM_API_STOPPING = 3,
} xllm_api_state;

/* A wake-up target for the engine's per-step notify callback. Waiters live as long as the
 * server (a late notify after a request ended only causes a spurious wake-up of the next user),
 * and are recycled through a free list. */
typedef struct xllm_api_waiter {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    uint64_t seq; /* bumped once per engine step that changed one of the user's streams */
    struct xllm_api_waiter *next;
} xllm_api_waiter;

enum { XLLM_API_N_CODES = 10 };

/* Where generation requests go: the local engine (`xllm serve`, `xllm engine`) or remote
 * instances (`xllm service`, src/service/remote.c). A request handle is opaque to the API layer.
 * Calls come from HTTP connection threads, one thread per request handle at a time (submit: any
 * HTTP thread). Versioned like every interface struct. */
#define XLLM_API_BACKEND_VERSION 1
typedef struct xllm_api_backend_i {
    int version; /* XLLM_API_BACKEND_VERSION */
    /* Queues a request; XLLM_ERR_BUSY (429), XLLM_ERR_INVALID_ARG (400), XLLM_ERR_IO (503: no
     * instance can take it) or another error (500), with a message in err. */
    xllm_status (*submit)(void *ctx, const xllm_request_params *p, void **out, char *err,
                          size_t err_size);
    int (*next)(void *r, xllm_token_event *ev, int timeout_ms); /* as xllm_request_next */
    xllm_finish_reason (*finish_reason)(void *r);
    /* Why a stream ended with XLLM_FINISH_ABORT, NULL when there is no message (optional). */
    const char *(*error)(void *r);
    void (*cancel)(void *r);
    void (*release)(void *r); /* as xllm_request_free */
    void (*get_stats)(void *r, xllm_request_stats *st);
    /* Appends Prometheus lines to /metrics (optional). Any HTTP thread. */
    void (*metrics)(void *ctx, struct xllm_api_buf *b);
    /* GET /v1/cluster: a malloc'd JSON text describing the instances (optional; NULL = 404). */
    char *(*describe)(void *ctx);
} xllm_api_backend_i;

/* The local engine as a backend (ctx = the xllm_engine). */
extern const xllm_api_backend_i xllm_api_engine_backend;

struct xllm_api_server {
    xllm_api_params p; /* string fields point at the owned copies below */
    char *host, *api_key, *model_path, *served_name, *template_file;
    bool low_memory; /* xllm_api_params.low_memory */
    struct MHD_Daemon *mhd;
    int32_t port;
    int64_t created; /* Unix seconds */

    /* state: written under eng_lock (write side); handlers that touch the engine hold the read
     * side, so the engine is never freed under them */
    _Atomic int state;
    pthread_rwlock_t eng_lock;
    xllm_model *model;
    const xllm_tokenizer *tok;
    xllm_engine *engine; /* NULL with a remote backend */
    const xllm_api_backend_i *be;
    void *be_ctx;
    xllm_chat_template *tmpl; /* NULL: chat requests get 400 */
    char *bos_text, *eos_text;
    int32_t n_ctx;

    pthread_mutex_t mu; /* waiters */
    xllm_api_waiter **waiters;
    int32_t n_waiters, waiters_cap;
    xllm_api_waiter *free_waiters;

    atomic_int in_flight; /* generation jobs alive */
    atomic_uint_fast64_t next_id;
    atomic_uint_fast64_t http_codes[XLLM_API_N_CODES]; /* see code_slot() in server.c */
    atomic_uint_fast64_t disconnects;                  /* requests cancelled by a client leaving */
    atomic_uint_fast64_t stop_hits;                    /* requests ended by a stop string */
    atomic_uint_fast64_t detok_ns;                     /* HTTP-side detokenize + format time */
};

/* Responses (any HTTP thread). send_json steals o. */
enum MHD_Result xllm_api_send_json(xllm_api_server *s, struct MHD_Connection *c, unsigned code,
                                   json_t *o);
enum MHD_Result xllm_api_send_error(xllm_api_server *s, struct MHD_Connection *c, unsigned code,
                                    const char *param, const char *ecode, const char *fmt, ...)
    __attribute__((format(printf, 6, 7)));
void xllm_api_count_code(xllm_api_server *s, unsigned code);

xllm_api_waiter *xllm_api_waiter_get(xllm_api_server *s);
void xllm_api_waiter_put(xllm_api_server *s, xllm_api_waiter *w);
void xllm_api_waiter_notify(void *w); /* engine thread */
/* The waiter's step count now; sleeps until it passes `seen` or ms pass. HTTP threads. */
uint64_t xllm_api_waiter_seq(xllm_api_waiter *w);
void xllm_api_waiter_wait(xllm_api_waiter *w, uint64_t seen, int ms);

/* A JSON string from bytes that should be UTF-8 (repaired when not). */
json_t *xllm_api_json_str(const char *p, size_t n);

/* Tokenizes a prompt text; *out malloc'd. Returns the count, or -1. */
int32_t xllm_api_tokenize(const xllm_tokenizer *tok, const char *text, size_t len, bool add_special,
                          int32_t **out);
/* Renders a chat request (r->chat) with the server's template into a malloc'd prompt; on error
 * NULL with a message in err. */
char *xllm_api_render_chat(xllm_api_server *s, json_t *chat, size_t *len, char *err,
                           size_t err_size);

/* POST /v1/completions and /v1/chat/completions, with the whole body received. HTTP thread
 * of the connection; blocks for non-streamed requests. */
enum MHD_Result xllm_api_handle_generate(xllm_api_server *s, struct MHD_Connection *c,
                                         xllm_api_kind kind, const char *body, size_t len);

/* The instance RPC (src/api/instance.c), served by `xllm engine` (and `xllm serve`) for a
 * cluster service: POST /v1/instance/generate (token ids in, a stream of token events out),
 * GET /v1/instance/load, POST /v1/instance/role. HTTP thread of the connection. */
enum MHD_Result xllm_api_handle_instance_generate(xllm_api_server *s, struct MHD_Connection *c,
                                                  const char *body, size_t len);
enum MHD_Result xllm_api_handle_instance_load(xllm_api_server *s, struct MHD_Connection *c);
enum MHD_Result xllm_api_handle_instance_role(xllm_api_server *s, struct MHD_Connection *c,
                                              const char *body, size_t len);

/* Loads the tokenizer and chat template of the model and serves through a remote backend
 * instead of a local engine (`xllm service`). n_ctx: the context length per request. Main
 * thread, once, instead of xllm_api_server_load. */
xllm_status xllm_api_server_load_remote(xllm_api_server *s, const xllm_api_backend_i *be,
                                        void *be_ctx, int32_t n_ctx, char *err, size_t err_size);

#endif /* XLLM_API_IMPL_H */
