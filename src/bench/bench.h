/* Building blocks of the serving load generator (xllm bench-serve) that need no network:
 * an incremental Server-Sent-Events parser and latency summaries (mean, percentiles). */
#ifndef XLLM_BENCH_H
#define XLLM_BENCH_H

#include <stdbool.h>
#include <stddef.h>

#include "xllm/xllm.h"

/* ---- SSE parser ------------------------------------------------------------------------------
 * Follows the WHATWG event-stream rules that matter to OpenAI-style streams: lines end in LF,
 * CRLF or CR (which may be split across feeds); "data:" lines of one event are joined with LF;
 * a blank line dispatches the event; comment lines (":...") and other fields are ignored.
 * One parser per stream; not thread-safe. */
typedef struct xllm_bench_sse {
    char *line; /* the current, unfinished line (owned) */
    size_t line_len, line_cap;
    char *data; /* the data of the current event, lines joined by LF (owned) */
    size_t data_len, data_cap;
    bool has_data;   /* a data field was seen since the last dispatch */
    bool after_cr;   /* the previous byte was CR: a following LF belongs to the same line end */
    size_t max_line; /* longest line or event accepted, bytes (default 16 MiB) */
} xllm_bench_sse;

/* Called once per event with its data (NUL-terminated, len bytes). A nonzero return stops the
 * parse and is returned by feed / finish. */
typedef int (*xllm_bench_sse_cb)(void *user, const char *data, size_t len);

void xllm_bench_sse_init(xllm_bench_sse *p);
/* Frees the buffers; the parser may be initialized again. */
void xllm_bench_sse_free(xllm_bench_sse *p);
/* Feeds n bytes. Returns 0, the callback's nonzero value, or XLLM_ERR_FORMAT when a line or an
 * event is longer than max_line. */
int xllm_bench_sse_feed(xllm_bench_sse *p, const char *buf, size_t n, xllm_bench_sse_cb cb,
                        void *user);
/* End of stream: an unterminated last line is processed, and a pending event is dispatched
 * (servers often omit the final blank line before closing). Returns as feed does. */
int xllm_bench_sse_finish(xllm_bench_sse *p, xllm_bench_sse_cb cb, void *user);

/* ---- statistics ----------------------------------------------------------------------------- */
typedef struct xllm_bench_summary {
    size_t n; /* number of values (0: every other field is 0) */
    double mean, min, max, p50, p90, p99;
} xllm_bench_summary;

/* Sorts v (n values) in place and summarizes it. Percentiles interpolate linearly between the
 * nearest ranks, as numpy.percentile does. */
xllm_bench_summary xllm_bench_summarize(double *v, size_t n);
/* The q-th percentile (0..100) of sorted values. */
double xllm_bench_percentile(const double *sorted, size_t n, double q);

#endif
