/* xllm API server: an OpenAI-compatible HTTP front door (completions, chat completions with SSE
 * streaming, models, tokenize, health, Prometheus metrics) over one engine, in one process. */
#ifndef XLLM_API_H
#define XLLM_API_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "xllm/engine.h"
#include "xllm/xllm.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct xllm_api_server xllm_api_server;

typedef struct xllm_api_params {
    const char *host;               /* address to listen on; NULL = "127.0.0.1" */
    int32_t port;                   /* TCP port; 0 = a free port (see xllm_api_server_port) */
    const char *api_key;            /* required as "Authorization: Bearer KEY"; NULL = none */
    size_t max_body;                /* request body bytes; 0 = 4 MiB; larger bodies get 413 */
    int32_t max_connections;        /* open connections at once; 0 = 1024 */
    int32_t max_choices;            /* n x prompts of one request; 0 = 16 */
    const char *model_path;         /* GGUF file (required) */
    const char *served_model_name;  /* name in /v1/models; NULL = file name without .gguf */
    const char *chat_template_file; /* a .jinja file overriding the model's template; NULL */
    xllm_engine_params engine;      /* batching, queue and KV settings */
    bool log_requests;              /* one line per request on stderr (default false) */
    /* Weights copied to memory, sub-8-bit matrices kept as decode panels only (model params
     * no_mmap + low_memory): the model takes about its file size (default false). */
    bool low_memory;
    /* Cluster instance (`xllm engine`): POST /v1/instance/role {"role": R} calls on_role on
     * the HTTP thread (it updates the registry); NULL = the endpoint answers 404. */
    xllm_status (*on_role)(const char *role, void *user, char *err, size_t err_size);
    void *on_role_user;
} xllm_api_params;

xllm_api_params xllm_api_default_params(void);

/* Binds the socket and starts answering HTTP at once: until xllm_api_server_load succeeds,
 * /health answers 503 {"status": "loading"}, /metrics works, and every other endpoint answers
 * 503. The HTTP threads are libmicrohttpd's, one per connection. On error returns a status and
 * a message in err. Main thread. */
xllm_status xllm_api_server_start(const xllm_api_params *params, xllm_api_server **out, char *err,
                                  size_t err_size);
/* The port the server listens on (useful with port 0). */
int32_t xllm_api_server_port(const xllm_api_server *s);
/* The port of the engine's KV receiver (PD decode side), 0 when none or not loaded yet. */
int xllm_api_server_kv_port(const xllm_api_server *s);
/* Tokens per KV block of the engine (the prefix cache's granularity), 0 when not loaded yet. */
int32_t xllm_api_server_kv_block_tokens(const xllm_api_server *s);
/* Loads the model, the chat template and starts the engine; then the server is ready. Blocks
 * for the load. Main thread, once. */
xllm_status xllm_api_server_load(xllm_api_server *s, char *err, size_t err_size);
/* The model being served: NULL before xllm_api_server_load, and with a remote backend. */
const xllm_model *xllm_api_server_model(const xllm_api_server *s);
/* Stops taking requests (new ones get 503 "draining") and waits up to timeout_ms (-1: no limit)
 * for the requests in flight to finish. Returns the number still in flight. Main thread. */
int32_t xllm_api_server_drain(xllm_api_server *s, int32_t timeout_ms);
/* Ends every request, closes every connection, stops the engine, frees all. Accepts NULL. */
void xllm_api_server_free(xllm_api_server *s);

#ifdef __cplusplus
}
#endif

#endif /* XLLM_API_H */
