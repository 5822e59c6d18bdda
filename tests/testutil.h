/* Helpers shared by the C tests: where the shared data is, file reading, error metrics. */
#ifndef XLLM_TESTUTIL_H
#define XLLM_TESTUTIL_H

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <cmocka.h>

/* Absolute path of a file under the shared folder ($XLLM_SHARED, default ../shared beside the
 * repository). Returns a static buffer that the next call overwrites. */
const char *xllm_test_shared(const char *rel);

/* Build folder (for test outputs). */
const char *xllm_test_build_dir(void);

/* Reads a whole file; returns malloc'd bytes (NUL-terminated) and its size, or NULL. */
void *xllm_test_read_file(const char *path, size_t *size);

/* ||a-b|| / ||b|| */
double xllm_test_norm_err(const float *a, const float *b, int64_t n);
int64_t xllm_test_argmax(const float *x, int64_t n);

/* Deterministic random numbers for tests (xorshift). */
uint64_t xllm_test_rand_u64(uint64_t *state);
float xllm_test_rand_f(uint64_t *state); /* uniform in [-1, 1) */

#endif
