/* Helpers shared by the C tests. */
#include "testutil.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char *xllm_test_shared(const char *rel) {
    static char buf[4096];
    const char *root = getenv("XLLM_SHARED");
    if (!root || !*root) root = XLLM_SHARED_DEFAULT;
    snprintf(buf, sizeof(buf), "%s/%s", root, rel);
    return buf;
}

const char *xllm_test_build_dir(void) {
    return XLLM_BUILD_DIR;
}

void *xllm_test_read_file(const char *path, size_t *size) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    if (fseek(f, 0, SEEK_END) != 0) {
        fclose(f);
        return NULL;
    }
    long n = ftell(f);
    rewind(f);
    char *buf = malloc((size_t)n + 1);
    if (!buf || fread(buf, 1, (size_t)n, f) != (size_t)n) {
        free(buf);
        fclose(f);
        return NULL;
    }
    buf[n] = 0;
    fclose(f);
    if (size) *size = (size_t)n;
    return buf;
}

double xllm_test_norm_err(const float *a, const float *b, int64_t n) {
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; i++) {
        double d = (double)a[i] - (double)b[i];
        num += d * d;
        den += (double)b[i] * (double)b[i];
    }
    if (den == 0) return num == 0 ? 0 : INFINITY;
    return sqrt(num / den);
}

int64_t xllm_test_argmax(const float *x, int64_t n) {
    int64_t best = 0;
    for (int64_t i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

uint64_t xllm_test_rand_u64(uint64_t *s) {
    uint64_t x = *s ? *s : 0x9E3779B97F4A7C15ull;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *s = x;
    return x;
}

float xllm_test_rand_f(uint64_t *s) {
    return (float)((double)(xllm_test_rand_u64(s) >> 11) / (double)(1ull << 53) * 2.0 - 1.0);
}
