/* Unit tests of src/bench: the SSE parser (line ends, split feeds, multi-line data, limits)
 * and the percentile summaries. */
#include <string.h>

#include "bench/bench.h"
#include "testutil.h"

typedef struct events {
    char got[16][64];
    int n;
    int stop_at; /* return 1 from the callback at this event (0: never) */
} events;

static int on_event(void *user, const char *data, size_t len) {
    events *e = user;
    assert_int_equal(strlen(data), len);
    if (e->n < 16) snprintf(e->got[e->n], sizeof(e->got[0]), "%s", data);
    e->n++;
    return e->stop_at && e->n == e->stop_at ? 1 : 0;
}

static const char *STREAM = ": keep-alive\r\n"
                            "data: {\"a\":1}\r\n\r\n"
                            "event: x\nid: 7\ndata:{\"b\":2}\n\n"
                            "data: line1\ndata: line2\n\n"
                            "data\n\n"
                            "retry: 10\r\r"
                            "data: [DONE]\n\n";

static void check_stream(const events *e) {
    assert_int_equal(e->n, 5);
    assert_string_equal(e->got[0], "{\"a\":1}");
    assert_string_equal(e->got[1], "{\"b\":2}");
    assert_string_equal(e->got[2], "line1\nline2");
    assert_string_equal(e->got[3], "");
    assert_string_equal(e->got[4], "[DONE]");
}

static void test_sse_whole(void **state) {
    (void)state;
    xllm_bench_sse p;
    xllm_bench_sse_init(&p);
    events e = {0};
    assert_int_equal(xllm_bench_sse_feed(&p, STREAM, strlen(STREAM), on_event, &e), 0);
    assert_int_equal(xllm_bench_sse_finish(&p, on_event, &e), 0);
    check_stream(&e);
    xllm_bench_sse_free(&p);
}

/* Every split point of the stream, and byte-by-byte, gives the same events. */
static void test_sse_split(void **state) {
    (void)state;
    size_t n = strlen(STREAM);
    for (size_t cut = 0; cut <= n; cut++) {
        xllm_bench_sse p;
        xllm_bench_sse_init(&p);
        events e = {0};
        assert_int_equal(xllm_bench_sse_feed(&p, STREAM, cut, on_event, &e), 0);
        assert_int_equal(xllm_bench_sse_feed(&p, STREAM + cut, n - cut, on_event, &e), 0);
        assert_int_equal(xllm_bench_sse_finish(&p, on_event, &e), 0);
        check_stream(&e);
        xllm_bench_sse_free(&p);
    }
    xllm_bench_sse p;
    xllm_bench_sse_init(&p);
    events e = {0};
    for (size_t i = 0; i < n; i++)
        assert_int_equal(xllm_bench_sse_feed(&p, STREAM + i, 1, on_event, &e), 0);
    assert_int_equal(xllm_bench_sse_finish(&p, on_event, &e), 0);
    check_stream(&e);
    xllm_bench_sse_free(&p);
}

/* A stream closed without the final blank line still delivers its last event. */
static void test_sse_unterminated(void **state) {
    (void)state;
    xllm_bench_sse p;
    xllm_bench_sse_init(&p);
    events e = {0};
    const char *s = "data: one\n\ndata: two";
    assert_int_equal(xllm_bench_sse_feed(&p, s, strlen(s), on_event, &e), 0);
    assert_int_equal(e.n, 1);
    assert_int_equal(xllm_bench_sse_finish(&p, on_event, &e), 0);
    assert_int_equal(e.n, 2);
    assert_string_equal(e.got[1], "two");
    xllm_bench_sse_free(&p);
}

static void test_sse_limits(void **state) {
    (void)state;
    xllm_bench_sse p;
    xllm_bench_sse_init(&p);
    p.max_line = 16;
    events e = {0};
    const char *s = "data: 0123456789abcdefghij\n\n";
    assert_int_equal(xllm_bench_sse_feed(&p, s, strlen(s), on_event, &e), XLLM_ERR_FORMAT);
    assert_int_equal(e.n, 0);
    xllm_bench_sse_free(&p);

    /* The callback's nonzero return stops the parse. */
    xllm_bench_sse_init(&p);
    events e2 = {.stop_at = 2};
    assert_int_equal(xllm_bench_sse_feed(&p, STREAM, strlen(STREAM), on_event, &e2), 1);
    assert_int_equal(e2.n, 2);
    xllm_bench_sse_free(&p);
    xllm_bench_sse_free(NULL);
}

static void test_summary(void **state) {
    (void)state;
    double v[] = {5, 1, 4, 2, 3};
    xllm_bench_summary s = xllm_bench_summarize(v, 5);
    assert_int_equal(s.n, 5);
    assert_true(s.mean == 3.0 && s.min == 1.0 && s.max == 5.0 && s.p50 == 3.0);
    assert_true(s.p90 > 4.59 && s.p90 < 4.61); /* numpy: 4.6 */
    assert_true(s.p99 > 4.95 && s.p99 < 4.97); /* numpy: 4.96 */
    xllm_bench_summary z = xllm_bench_summarize(NULL, 0);
    assert_int_equal(z.n, 0);
    double one = 7;
    xllm_bench_summary o = xllm_bench_summarize(&one, 1);
    assert_true(o.p50 == 7 && o.p99 == 7);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sse_whole),        cmocka_unit_test(test_sse_split),
        cmocka_unit_test(test_sse_unterminated), cmocka_unit_test(test_sse_limits),
        cmocka_unit_test(test_summary),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
