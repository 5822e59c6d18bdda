/* KV transfer between instances (PD disaggregation): a prefill instance sends one sequence's KV
 * cache, layer by layer, over TCP to a decode instance, which stages it and imports it into a
 * sequence of its own context. Wire format: docs/transfer.md (src/transfer/frame.c).
 *
 * Threads: each sender and each receiver runs one background I/O thread of its own. The calls
 * that touch a context's KV (xllm_kv_sender_send_layer, xllm_kv_transfer_import) run on the
 * engine thread that owns that context; the others say which thread may call them. */
#ifndef XLLM_TRANSFER_H
#define XLLM_TRANSFER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "xllm/xllm.h"

/* A 64-bit identity of a model for the handshake: a hash of its architecture, hyperparameters
 * and every tensor's name, type and shape. Instances whose ids differ refuse each other (their
 * KV would not mean the same thing). Any thread. */
uint64_t xllm_transfer_model_id(const xllm_model *model);

/* ------------------------------------------------------------------------------------------ */
/* Sender (prefill instance)                                                                   */
/* ------------------------------------------------------------------------------------------ */

typedef struct xllm_kv_sender xllm_kv_sender;

typedef struct xllm_kv_sender_params {
    const char *host;       /* peer address (numeric IPv4/IPv6 or name); default "127.0.0.1" */
    int port;               /* peer port; required (1..65535) */
    int timeout_ms;         /* connect + handshake limit; 0 = 5000 */
    size_t max_queue_bytes; /* frames queued but not yet written to the socket; a send that
                               would pass it waits for the network. 0 = 256 MiB */
    size_t max_frame_bytes; /* K+V bytes in one LAYER frame (a layer is split into several
                               frames of whole positions beyond it); 0 = 4 MiB */
} xllm_kv_sender_params;

xllm_kv_sender_params xllm_kv_sender_default_params(void);

/* Connects to a receiver, exchanges HELLO (synchronously: a model, KV type or shape mismatch is
 * refused here, with the peer's reason in err) and starts the I/O thread. ctx is the context
 * whose KV is sent; it must outlive the sender. Engine thread (or before it starts). */
xllm_status xllm_kv_sender_new(xllm_context *ctx, const xllm_kv_sender_params *params,
                               xllm_kv_sender **out, char *err, size_t err_size);
/* Aborts every unfinished transfer (ABORT frames are flushed when the socket allows, within the
 * timeout), closes the connection, joins the thread. Accepts NULL. Engine thread. */
void xllm_kv_sender_free(xllm_kv_sender *s);

/* Starts transfer id (nonzero, unique among this sender's unfinished transfers, and chosen so
 * that it is unique at the receiver: the service's request id) of n positions whose token ids
 * are tokens[0..n). The rows themselves follow with send_layer. XLLM_ERR_INVALID_ARG for a bad
 * id or n (n must be within the receiver's context), XLLM_ERR_IO when the connection is gone.
 * Engine thread. */
xllm_status xllm_kv_sender_begin(xllm_kv_sender *s, uint64_t id, const int32_t *tokens, int32_t n);
/* Copies the K and V rows of positions [0, n) of layer il of sequence seq (which must hold them)
 * into frames queued for the I/O thread, and returns: the caller may compute the next layer
 * while this one is on the wire. Only for a layer of which nothing was sent yet. Waits only when
 * max_queue_bytes are already queued. Returns the transfer's error when the receiver refused or
 * cancelled it or the connection dropped (the caller should then stop, forget the id with
 * xllm_kv_sender_abort and free its sequence). Engine thread. */
xllm_status xllm_kv_sender_send_layer(xllm_kv_sender *s, uint64_t id, int32_t seq, int32_t il);
/* The same for positions [pos0, pos0 + m) of layer il only: a layer may be sent in several
 * ranges (a prompt computed in chunks), in order: pos0 must be the number of positions of that
 * layer sent so far, and pos0 + m <= n. The rows must have been stored in reserved positions of
 * seq; they need not be committed, so the forward pass may send a layer right after storing it
 * (the copy is made before this returns: the rows may change afterwards). XLLM_ERR_INVALID_ARG
 * for a range out of order or not reserved. Engine thread. */
xllm_status xllm_kv_sender_send_rows(xllm_kv_sender *s, uint64_t id, int32_t seq, int32_t il,
                                     int32_t pos0, int32_t m);
/* Ends the transfer: every position of every layer must have been sent. first_token is the token
 * sampled from the last prompt position (the decode instance feeds it next) and logprob its
 * log-probability. After this the sender's sequence may be freed. Engine thread. */
xllm_status xllm_kv_sender_end(xllm_kv_sender *s, uint64_t id, int32_t first_token, float logprob);
/* Cancels the transfer: frames not yet on the wire are dropped, an ABORT frame tells the
 * receiver to free its staging, and the sender forgets the id. reason may be NULL. Any thread. */
xllm_status xllm_kv_sender_abort(xllm_kv_sender *s, uint64_t id, const char *reason);
/* Waits up to timeout_ms (-1: no limit) for the receiver's answer to an ended transfer:
 * XLLM_OK when it acknowledged the whole sequence (staged for import), the refusal or failure
 * otherwise (message in err), XLLM_ERR_BUSY when no answer came in time (ask again). An answer
 * other than XLLM_ERR_BUSY forgets the id: call it once per transfer. Any thread. */
xllm_status xllm_kv_sender_wait(xllm_kv_sender *s, uint64_t id, int timeout_ms, char *err,
                                size_t err_size);
/* True while the connection is up. Any thread. */
bool xllm_kv_sender_connected(xllm_kv_sender *s);

/* ------------------------------------------------------------------------------------------ */
/* Receiver (decode instance)                                                                  */
/* ------------------------------------------------------------------------------------------ */

typedef struct xllm_kv_receiver xllm_kv_receiver;

typedef struct xllm_kv_receiver_params {
    const char *host;         /* address to listen on; default "127.0.0.1" */
    int port;                 /* 0 = any free port (see xllm_kv_receiver_port) */
    size_t max_staging_bytes; /* rows + tokens of every staged transfer, in flight or waiting
                                 for import; a transfer that would pass it is refused with
                                 XLLM_ERR_BUSY. 0 = 1 GiB */
    size_t max_frame_bytes;   /* largest frame payload accepted (a connection buffers at most
                                 one frame: max_conns x this bounds that memory); 0 = 16 MiB */
    int32_t max_conns;        /* connections at once; more are refused; 0 = 64 */
    int32_t max_transfers;    /* staged transfers at once (in flight + waiting); 0 = 256 */
} xllm_kv_receiver_params;

xllm_kv_receiver_params xllm_kv_receiver_default_params(void);

/* Listens on host:port and starts the I/O thread. ctx gives the identity checked at HELLO
 * (model, KV type, row size, layers, context length); it is read only here. Any thread. */
xllm_status xllm_kv_receiver_new(const xllm_context *ctx, const xllm_kv_receiver_params *params,
                                 xllm_kv_receiver **out, char *err, size_t err_size);
/* Stops the thread, closes every connection, frees all staging (transfers returned by
 * xllm_kv_receiver_poll stay valid until xllm_kv_transfer_free). Accepts NULL. Any thread. */
void xllm_kv_receiver_free(xllm_kv_receiver *r);
/* The port listened on. Any thread. */
int xllm_kv_receiver_port(const xllm_kv_receiver *r);

/* A transfer that finished at the receiver: complete (status XLLM_OK, rows staged) or failed
 * (the sender aborted, the connection dropped, or it was cancelled; no rows). Returned by
 * xllm_kv_receiver_poll; the caller owns it until xllm_kv_transfer_free. Fields are read-only. */
typedef struct xllm_kv_transfer {
    uint64_t id;
    xllm_status status;
    char error[160]; /* why it failed ("" when complete) */
    int32_t n_tokens;
    const int32_t *tokens; /* (n_tokens) prompt token ids; NULL when failed */
    int32_t first_token;   /* token to feed next (at position n_tokens) */
    float first_logprob;
    struct xllm_kv_transfer_priv *priv;
} xllm_kv_transfer;

/* The next finished transfer in order of completion, waiting up to timeout_ms (0: do not wait,
 * -1: no limit); NULL when none. Any thread (the engine thread polls it once per step). */
xllm_kv_transfer *xllm_kv_receiver_poll(xllm_kv_receiver *r, int timeout_ms);
/* Cancels transfer id: in flight, the sender is told (ERROR frame) and the staging is freed; if
 * it is waiting to be polled it is dropped. Returns false when the receiver does not hold it.
 * Any thread. */
bool xllm_kv_receiver_cancel(xllm_kv_receiver *r, uint64_t id);

typedef struct xllm_kv_receiver_stats {
    int32_t conns;       /* connections open */
    int32_t in_flight;   /* transfers being received */
    int32_t ready;       /* complete, waiting to be polled */
    size_t staged_bytes; /* charged to max_staging_bytes (in flight, ready and polled) */
    uint64_t completed;  /* transfers acknowledged */
    uint64_t failed;     /* aborted, dropped or cancelled */
    uint64_t refused;    /* refused at SEQ_BEGIN (budget, duplicate id) */
    uint64_t bad_conns;  /* connections dropped for a protocol violation */
    uint64_t bytes_rx;   /* bytes read from the network */
} xllm_kv_receiver_stats;
void xllm_kv_receiver_get_stats(xllm_kv_receiver *r, xllm_kv_receiver_stats *st);

/* Writes a complete transfer into sequence seq of ctx, which must be empty: reserves its
 * positions, copies every row, records the tokens and commits the length (full blocks enter the
 * prefix cache). The next token to evaluate is t->first_token at position t->n_tokens. On
 * failure (XLLM_ERR_KV_FULL when the KV memory has no room, XLLM_ERR_INVALID_ARG when the
 * context does not match) the sequence is left empty and t stays valid, so the caller may retry
 * later. ctx must match the receiver's (model, KV type); its layout may differ from the
 * sender's. Engine thread of ctx. */
xllm_status xllm_kv_transfer_import(const xllm_kv_transfer *t, xllm_context *ctx, int32_t seq,
                                    char *err, size_t err_size);
/* Releases a polled transfer and its staging (returns its bytes to the receiver's budget, even
 * after the receiver was freed). Accepts NULL. Any thread. */
void xllm_kv_transfer_free(xllm_kv_transfer *t);

#endif
