/* Unit tests of src/api/detok.c: UTF-8 repair as Python decodes (one U+FFFD per maximal
 * ill-formed subpart), characters split across pieces, stop strings across pieces. */
#include <string.h>

#include "api/api-impl.h"
#include "testutil.h"

static void test_repair(void **state) {
    (void)state;
    static const struct {
        const char *in;
        size_t n;
        const char *want;
        size_t want_n;
    } cases[] = {
        {"\x61\x62\x63", 3, "\x61\x62\x63", 3},
        {"\xff", 1, "\xef\xbf\xbd", 3},
        {"\xe2\x82", 2, "\xef\xbf\xbd", 3},
        {"\xe2\x82\x41", 3, "\xef\xbf\xbd\x41", 4},
        {"\xf0\x80\x80", 3, "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd", 9},
        {"\xed\xa0\x80", 3, "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd", 9},
        {"\xc3\xa9\xe4\xbd\xa0", 5, "\xc3\xa9\xe4\xbd\xa0", 5},
        {"\xf4\x90\x80\x80", 4, "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd", 12},
        {"\x80\x80", 2, "\xef\xbf\xbd\xef\xbf\xbd", 6},
        {"\x61\xc0\xaf\x62", 4, "\x61\xef\xbf\xbd\xef\xbf\xbd\x62", 8},
        {"\xf0\x9f\x98", 3, "\xef\xbf\xbd", 3},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        xllm_api_buf b = {0};
        assert_int_equal(xllm_api_utf8_repair(cases[i].in, cases[i].n, true, &b), cases[i].n);
        assert_int_equal(b.len, cases[i].want_n);
        assert_memory_equal(b.p, cases[i].want, b.len);
        /* fed one byte at a time through the detokenizer: the same text */
        xllm_api_detok d;
        xllm_api_detok_init(&d, NULL, false, NULL, NULL, 0);
        xllm_api_buf out = {0};
        for (size_t k = 0; k < cases[i].n; k++) {
            xllm_api_detok_push_bytes(&d, cases[i].in + k, 1);
            const char *t;
            size_t m = xllm_api_detok_take(&d, &t);
            xllm_api_buf_add(&out, t, m);
        }
        xllm_api_detok_finish(&d);
        const char *t;
        size_t m = xllm_api_detok_take(&d, &t);
        xllm_api_buf_add(&out, t, m);
        assert_int_equal(out.len, cases[i].want_n);
        assert_memory_equal(out.p, cases[i].want, out.len);
        xllm_api_buf_free(&out);
        xllm_api_buf_free(&b);
        xllm_api_detok_free(&d);
    }
}

static void test_incomplete_held(void **state) {
    (void)state;
    xllm_api_buf b = {0};
    /* "é" cut after its first byte: nothing consumed until the rest comes */
    assert_int_equal(xllm_api_utf8_repair("a\xc3", 2, false, &b), 1);
    assert_int_equal(b.len, 1);
    xllm_api_buf_free(&b);
}

/* Pushes pieces and returns everything taken, checking nothing of a stop string leaks. */
static void run(const char *const *pieces, int n, const char *const *stop, int n_stop, bool strip,
                const char *want, bool want_stop) {
    size_t lens[8];
    for (int i = 0; i < n_stop; i++) lens[i] = strlen(stop[i]);
    xllm_api_detok d;
    xllm_api_detok_init(&d, NULL, strip, stop, lens, n_stop);
    xllm_api_buf out = {0};
    xllm_api_buf_add(&out, "", 0);
    bool hit = false;
    for (int i = 0; i < n && !hit; i++) {
        hit = xllm_api_detok_push_bytes(&d, pieces[i], strlen(pieces[i]));
        const char *t;
        size_t m = xllm_api_detok_take(&d, &t);
        xllm_api_buf_add(&out, t, m);
    }
    xllm_api_detok_finish(&d);
    const char *t;
    size_t m = xllm_api_detok_take(&d, &t);
    xllm_api_buf_add(&out, t, m);
    assert_string_equal(out.p, want);
    assert_int_equal(hit, want_stop);
    xllm_api_buf_free(&out);
    xllm_api_detok_free(&d);
}

static void test_stop_strings(void **state) {
    (void)state;
    const char *p1[] = {" Once", " upon", " a", " time"};
    const char *s1[] = {"pon a"};
    run(p1, 4, s1, 1, true, "Once u", true); /* split across three pieces; space stripped */
    const char *s2[] = {"time!"};
    run(p1, 4, s2, 1, false, " Once upon a time", false); /* a held prefix is released */
    const char *s3[] = {"abcd", "bc"};
    const char *p3[] = {"a", "b", "c", "d"};
    run(p3, 4, s3, 2, false, "a", true); /* the stop completing first wins */
    const char *p4[] = {"abcd"};
    run(p4, 1, s3, 2, false, "a", true); /* however the text is cut */
    const char *s5[] = {"\xe5\xa4\xa7"};
    const char *p5[] = {"x\xe5", "\xa4", "\xa7y"};
    run(p5, 3, s5, 1, false, "x", true); /* a stop string that is one CJK character */
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_repair),
        cmocka_unit_test(test_incomplete_held),
        cmocka_unit_test(test_stop_strings),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
