/* Shared helpers: asserts, error strings, allocation policy, status names. */
#include "util/common.h"

#include <string.h>
#include <sys/mman.h>

#include "xllm/xllm.h"

void xllm_assert_fail(const char *file, int line, const char *cond) {
    fprintf(stderr, "xllm: assertion failed at %s:%d: %s\n", file, line, cond);
    fflush(stderr);
    abort();
}

void xllm_set_err(char *err, size_t err_size, const char *fmt, ...) {
    if (!err || err_size == 0) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, err_size, fmt, ap);
    va_end(ap);
}

void *xllm_xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) xllm_assert_fail(__FILE__, __LINE__, "out of memory");
    return p;
}

void *xllm_xcalloc(size_t n, size_t size) {
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (!p) xllm_assert_fail(__FILE__, __LINE__, "out of memory");
    return p;
}

void *xllm_xrealloc(void *p, size_t n) {
    void *q = realloc(p, n ? n : 1);
    if (!q) xllm_assert_fail(__FILE__, __LINE__, "out of memory");
    return q;
}

void *xllm_map_huge(size_t n) {
    const size_t H = (size_t)2 << 20;
    if (n == 0 || n > SIZE_MAX - H) return NULL;
    uint8_t *p = mmap(NULL, n + H, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return NULL;
    const size_t head = (H - (uintptr_t)p % H) % H; /* the rest is given back */
    if (head) munmap(p, head);
    if (H - head) munmap(p + head + n, H - head);
    p += head;
#ifdef MADV_HUGEPAGE
    (void)madvise(p, n, MADV_HUGEPAGE);
#endif
    return p;
}

char *xllm_xstrdup(const char *s) {
    size_t n = strlen(s) + 1;
    char *d = xllm_xmalloc(n);
    memcpy(d, s, n);
    return d;
}

const char *xllm_status_str(xllm_status st) {
    switch (st) {
        case XLLM_OK:
            return "ok";
        case XLLM_ERR_INVALID_ARG:
            return "invalid argument";
        case XLLM_ERR_IO:
            return "I/O error";
        case XLLM_ERR_FORMAT:
            return "corrupt or truncated file";
        case XLLM_ERR_UNSUPPORTED:
            return "unsupported";
        case XLLM_ERR_NOMEM:
            return "out of memory";
        case XLLM_ERR_KV_FULL:
            return "KV cache full";
        case XLLM_ERR_INTERNAL:
            return "internal error";
        case XLLM_ERR_BUSY:
            return "busy";
    }
    return "unknown status";
}

const char *xllm_version(void) {
    return XLLM_VERSION;
}
