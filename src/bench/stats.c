/* Latency summaries for the serving benchmark: mean, min, max and interpolated percentiles. */
#include <stdlib.h>

#include "bench/bench.h"

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

double xllm_bench_percentile(const double *sorted, size_t n, double q) {
    if (n == 0) return 0.0;
    if (q <= 0) return sorted[0];
    if (q >= 100) return sorted[n - 1];
    double rank = q / 100.0 * (double)(n - 1);
    size_t lo = (size_t)rank;
    double frac = rank - (double)lo;
    if (lo + 1 >= n) return sorted[n - 1];
    return sorted[lo] + (sorted[lo + 1] - sorted[lo]) * frac;
}

xllm_bench_summary xllm_bench_summarize(double *v, size_t n) {
    xllm_bench_summary s = {0};
    if (n == 0) return s;
    qsort(v, n, sizeof(double), cmp_double);
    double sum = 0;
    for (size_t i = 0; i < n; i++) sum += v[i];
    s.n = n;
    s.mean = sum / (double)n;
    s.min = v[0];
    s.max = v[n - 1];
    s.p50 = xllm_bench_percentile(v, n, 50);
    s.p90 = xllm_bench_percentile(v, n, 90);
    s.p99 = xllm_bench_percentile(v, n, 99);
    return s;
}
