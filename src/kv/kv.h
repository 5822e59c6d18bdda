/* KV memory of a context (xTensor): a physical page pool shared by all sequences, and per
 * sequence and layer a virtual region in which K (or V) rows appear contiguous by position.
 * Pages are mapped into regions on demand (a background thread keeps the next page of each
 * running sequence mapped ahead); full blocks of tokens are kept in a prefix cache keyed by a
 * chained hash and shared between sequences by mapping the same page. A classic block-table
 * layout ("paged") over the same pool is kept as a baseline with the same API. Every change of
 * the prefix cache's set of blocks is appended to a bounded event ring that other threads read
 * with a cursor (xllm_kv_events_read).
 *
 * Threads: every function is called from the engine thread that owns the context, except where
 * noted; the background mapper synchronizes with it through the kv's mutex. */
#ifndef XLLM_KV_H
#define XLLM_KV_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "xllm/xllm.h"

typedef struct xllm_kv xllm_kv;

typedef struct xllm_kv_params {
    int32_t n_layer;
    int32_t n_seq;     /* sequence slots, ids 0..n_seq-1 */
    int32_t n_ctx;     /* max positions per sequence */
    int32_t row_elems; /* elements in one position's K (or V) row: n_head_kv * head_dim */
    xllm_dtype type;   /* XLLM_DTYPE_F32 or XLLM_DTYPE_F16 */
    xllm_kv_layout layout;
    size_t memory;         /* pool bytes; 0 = room for n_seq full contexts */
    int32_t block_tokens;  /* tokens per page (prefix-cache block); 0 = chosen from the sizes */
    bool prefix_cache;     /* keep full blocks for reuse (default on in the context) */
    bool background;       /* run the pre-mapping thread (xtensor) */
    int64_t max_map_count; /* the OS limit; 0 = read /proc/sys/vm/max_map_count */
    int32_t events;        /* prefix-cache events kept for readers (ring slots, 9 bytes each);
                              0 = 65536 */
} xllm_kv_params;

/* Creates the pool (memfd), reserves the regions. Fails with a clear message when the budget,
 * the sizes or the OS mapping limit do not allow it. */
xllm_status xllm_kv_new(const xllm_kv_params *p, xllm_kv **out, char *err, size_t err_size);
void xllm_kv_free(xllm_kv *kv); /* accepts NULL */

/* ---- sequences ------------------------------------------------------------------------- */

/* Positions stored for seq. */
int32_t xllm_kv_seq_len(const xllm_kv *kv, int32_t seq);
/* Makes room for positions [0, n) of seq: pages are allocated (evicting idle cached blocks when
 * the pool is short) and mapped. XLLM_ERR_KV_FULL when n > n_ctx, the pool has no page left, or
 * the mapping limit would be crossed (a message is kept, see xllm_kv_last_error). */
xllm_status xllm_kv_reserve(xllm_kv *kv, int32_t seq, int32_t n);
/* Records the token ids of positions [pos, pos + n) of seq (needed to key its blocks in the
 * prefix cache); call before xllm_kv_seq_set_len commits them. */
void xllm_kv_seq_set_tokens(xllm_kv *kv, int32_t seq, int32_t pos, const int32_t *tokens,
                            int32_t n);
/* Sets the stored length: commits rows [old, n) written since (full blocks enter the prefix
 * cache), or drops positions >= n (pages of whole blocks past n are released). */
void xllm_kv_seq_set_len(xllm_kv *kv, int32_t seq, int32_t n);
/* Maps the cached blocks that match the start of tokens into the empty sequence seq and sets its
 * length to the number of positions they hold (a multiple of the block size, always < n so the
 * last token is computed). Returns that number (0 when nothing matched or the cache is off). */
int32_t xllm_kv_seq_reuse_prefix(xllm_kv *kv, int32_t seq, const int32_t *tokens, int32_t n);
/* Releases every page of seq now (preemption: its prompt is recomputed later). */
void xllm_kv_seq_free(xllm_kv *kv, int32_t seq);

/* ---- access for the forward pass --------------------------------------------------------- */

/* The K (or V) row of layer il, position pos of seq, to write. The position must be reserved. */
void *xllm_kv_row_k(xllm_kv *kv, int32_t il, int32_t seq, int32_t pos);
void *xllm_kv_row_v(xllm_kv *kv, int32_t il, int32_t seq, int32_t pos);

/* A run of consecutive positions [pos0, pos0 + n) whose rows lie row_bytes apart. */
typedef struct xllm_kv_span {
    const void *k;
    const void *v;
    int32_t pos0;
    int32_t n;
} xllm_kv_span;
/* Fills the runs covering positions [0, n_pos) of seq in layer il: one run for xtensor, one per
 * block for paged. Returns the number of runs (at most max). */
int32_t xllm_kv_spans(xllm_kv *kv, int32_t il, int32_t seq, int32_t n_pos, xllm_kv_span *spans,
                      int32_t max);
/* Upper bound of the runs xllm_kv_spans can return (size span buffers with it). */
int32_t xllm_kv_max_spans(const xllm_kv *kv);

size_t xllm_kv_row_bytes(const xllm_kv *kv);
xllm_dtype xllm_kv_type(const xllm_kv *kv);
xllm_kv_layout xllm_kv_get_layout(const xllm_kv *kv);
int32_t xllm_kv_block_tokens(const xllm_kv *kv);

/* ---- accounting and admission ------------------------------------------------------------- */

void xllm_kv_get_stats(xllm_kv *kv, xllm_kv_stats *st);
/* Pages seq holds (shared ones included). */
int64_t xllm_kv_seq_pages(const xllm_kv *kv, int32_t seq);
/* Pages that a reservation growing seq to n positions would take from the pool. */
int64_t xllm_kv_pages_needed(const xllm_kv *kv, int32_t seq, int32_t n);
/* Pages available to reservations: free plus evictable cached pages. */
int64_t xllm_kv_pages_available(xllm_kv *kv);
/* Bytes the sequences hold beyond the rows they store (partly filled last pages). */
size_t xllm_kv_waste_bytes(const xllm_kv *kv);

/* ---- prefix-cache events ------------------------------------------------------------------ */

/* Every block that enters the prefix index (a full block committed by xllm_kv_seq_set_len)
 * appends a STORED event, every block that leaves it (evicted for a new page, or a cached block
 * truncated into and about to be rewritten) an EVICTED event, in the order they happen. Reads
 * the events after cursor `since`, at most max (> 0), into out (see xllm_kv_events in
 * xllm/xllm.h): when `since` is no cursor of the retained window (0, overwritten, ahead, or
 * another ring's), out->reset is set and out->ev holds the whole index at out->next instead.
 * Any thread: the ring has its own lock; a reset also takes the KV's lock for one walk of the
 * index. Appending costs the engine one uncontended lock and no allocation. */
xllm_status xllm_kv_events_read(xllm_kv *kv, uint64_t since, int32_t max, xllm_kv_events *out);

/* The message of the last failed xllm_kv_reserve (empty when none). */
const char *xllm_kv_last_error(const xllm_kv *kv);

/* Walks every structure and checks its invariants (refcounts, free list, cache index, LRU,
 * mappings). Returns true when consistent; otherwise writes what is wrong into err. */
bool xllm_kv_check(xllm_kv *kv, char *err, size_t err_size);
/* Checks that hashes[0..n) is exactly the set of blocks cached now, read from the pages (not the
 * index): the view against which tests replay the event stream. */
bool xllm_kv_check_cached(xllm_kv *kv, const uint64_t *hashes, int64_t n, char *err,
                          size_t err_size);

#endif
