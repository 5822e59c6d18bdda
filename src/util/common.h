/* Small shared helpers: always-on asserts, error-message formatting, checked arithmetic. */
#ifndef XLLM_UTIL_COMMON_H
#define XLLM_UTIL_COMMON_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

/* Broken invariants abort with file:line, in every build type. */
#define XLLM_ASSERT(cond)                                                                          \
    do {                                                                                           \
        if (!(cond)) xllm_assert_fail(__FILE__, __LINE__, #cond);                                  \
    } while (0)

_Noreturn void xllm_assert_fail(const char *file, int line, const char *cond);

/* Writes a formatted one-line message into err (size err_size); err may be NULL. */
void xllm_set_err(char *err, size_t err_size, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Small allocations abort on failure (documented policy: only large, expected-to-fail
 * allocations such as model buffers and KV memory propagate XLLM_ERR_NOMEM). */
void *xllm_xmalloc(size_t n);
void *xllm_xcalloc(size_t n, size_t size);
void *xllm_xrealloc(void *p, size_t n);
char *xllm_xstrdup(const char *s);
/* n bytes of zeroed anonymous memory, 2 MiB aligned and advised to use huge pages (weights a
 * decode step streams: fewer TLB misses); NULL when it cannot be mapped. Free with
 * munmap(p, n). */
void *xllm_map_huge(size_t n);

#define XLLM_MIN(a, b) ((a) < (b) ? (a) : (b))
#define XLLM_MAX(a, b) ((a) > (b) ? (a) : (b))

#endif
