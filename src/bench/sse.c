/* Incremental Server-Sent-Events parser: splits a byte stream into events and hands each
 * event's data to a callback (see bench.h). */
#include <string.h>

#include "bench/bench.h"
#include "util/common.h"

void xllm_bench_sse_init(xllm_bench_sse *p) {
    memset(p, 0, sizeof(*p));
    p->max_line = (size_t)16 << 20;
}

void xllm_bench_sse_free(xllm_bench_sse *p) {
    if (!p) return;
    free(p->line);
    free(p->data);
    p->line = p->data = NULL;
    p->line_len = p->line_cap = p->data_len = p->data_cap = 0;
}

/* Grows *buf to hold need + 1 bytes (for the NUL). */
static void reserve(char **buf, size_t *cap, size_t need) {
    if (need + 1 <= *cap) return;
    size_t c = *cap ? *cap : 256;
    while (c < need + 1) c *= 2;
    *buf = xllm_xrealloc(*buf, c);
    *cap = c;
}

static int dispatch(xllm_bench_sse *p, xllm_bench_sse_cb cb, void *user) {
    if (!p->has_data) return 0;
    p->has_data = false;
    size_t len = p->data_len;
    if (len > 0 && p->data[len - 1] == '\n') len--; /* the LF after the last data line */
    p->data[len] = '\0';
    p->data_len = 0;
    return cb ? cb(user, p->data, len) : 0;
}

/* Processes one complete line (without its terminator). */
static int process_line(xllm_bench_sse *p, xllm_bench_sse_cb cb, void *user) {
    const char *s = p->line ? p->line : "";
    size_t n = p->line_len;
    p->line_len = 0;
    if (n == 0) return dispatch(p, cb, user);
    if (s[0] == ':') return 0; /* comment */
    const char *colon = memchr(s, ':', n);
    size_t name_len = colon ? (size_t)(colon - s) : n;
    if (name_len != 4 || memcmp(s, "data", 4) != 0) return 0; /* event, id, retry: unused */
    const char *v = colon ? colon + 1 : s + n;
    size_t vlen = (size_t)(s + n - v);
    if (vlen > 0 && v[0] == ' ') v++, vlen--;
    if (p->data_len + vlen + 1 > p->max_line) return XLLM_ERR_FORMAT;
    reserve(&p->data, &p->data_cap, p->data_len + vlen + 1);
    memcpy(p->data + p->data_len, v, vlen);
    p->data_len += vlen;
    p->data[p->data_len++] = '\n';
    p->data[p->data_len] = '\0';
    p->has_data = true;
    return 0;
}

int xllm_bench_sse_feed(xllm_bench_sse *p, const char *buf, size_t n, xllm_bench_sse_cb cb,
                        void *user) {
    size_t i = 0;
    while (i < n) {
        if (p->after_cr) {
            p->after_cr = false;
            if (buf[i] == '\n') {
                i++;
                continue;
            }
        }
        /* Copy up to the next line end in one go. */
        size_t j = i;
        while (j < n && buf[j] != '\n' && buf[j] != '\r') j++;
        size_t chunk = j - i;
        if (chunk) {
            if (p->line_len + chunk > p->max_line) return XLLM_ERR_FORMAT;
            reserve(&p->line, &p->line_cap, p->line_len + chunk);
            memcpy(p->line + p->line_len, buf + i, chunk);
            p->line_len += chunk;
            p->line[p->line_len] = '\0';
        }
        if (j == n) break;
        if (buf[j] == '\r') p->after_cr = true;
        i = j + 1;
        int rc = process_line(p, cb, user);
        if (rc) return rc;
    }
    return 0;
}

int xllm_bench_sse_finish(xllm_bench_sse *p, xllm_bench_sse_cb cb, void *user) {
    p->after_cr = false;
    if (p->line_len > 0) {
        int rc = process_line(p, cb, user);
        if (rc) return rc;
    }
    return dispatch(p, cb, user);
}
