/* libFuzzer target: the bench-serve SSE parser on arbitrary bytes, fed in two pieces. */
#include <stdint.h>
#include <string.h>

#include "bench/bench.h"

static int on_event(void *user, const char *data, size_t len) {
    size_t *total = user;
    *total += len + (data[len] == '\0'); /* touches the terminator */
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *buf, size_t n) {
    xllm_bench_sse p;
    xllm_bench_sse_init(&p);
    p.max_line = 4096;
    size_t total = 0, cut = n ? buf[0] % (n + 1) : 0;
    if (xllm_bench_sse_feed(&p, (const char *)buf, cut, on_event, &total) == 0 &&
        xllm_bench_sse_feed(&p, (const char *)buf + cut, n - cut, on_event, &total) == 0)
        xllm_bench_sse_finish(&p, on_event, &total);
    xllm_bench_sse_free(&p);
    return 0;
}
