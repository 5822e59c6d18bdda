/* Unit tests of the u64 -> int32 open-addressing map: random put / replace / delete against a
 * plain array, with keys that collide in the table (probe chains across the wrap-around) and
 * growth by reserve. */
#include <string.h>

#include "util/common.h"
#include "util/u64map.h"
#include "testutil.h"

#define NK 300 /* distinct keys */

static void test_random_ops(void **state) {
    (void)state;
    uint64_t rng = 7;
    uint64_t keys[NK];
    for (int i = 0; i < NK; i++) keys[i] = xllm_test_rand_u64(&rng) | (i % 2 ? 0 : 1ull << 63);
    keys[0] = 0; /* 0 is a key like any other */
    int32_t want[NK];
    for (int i = 0; i < NK; i++) want[i] = -1;
    xllm_u64map m;
    xllm_u64map_init(&m, 4);
    assert_int_equal(m.cap, 16);
    size_t held = 0;
    for (int it = 0; it < 20000; it++) {
        int k = (int)(xllm_test_rand_u64(&rng) % NK);
        int op = (int)(xllm_test_rand_u64(&rng) % 3);
        if (op < 2) {
            int32_t v = (int32_t)(xllm_test_rand_u64(&rng) % 1000);
            xllm_u64map_reserve(&m, m.n + 1);
            xllm_u64map_put(&m, keys[k], v);
            if (want[k] < 0) held++;
            want[k] = v;
        } else {
            assert_int_equal(xllm_u64map_del(&m, keys[k]), want[k] >= 0);
            if (want[k] >= 0) held--;
            want[k] = -1;
        }
        assert_int_equal(m.n, held);
        assert_true(2 * m.n <= m.cap);
        if (it % 97 == 0)
            for (int i = 0; i < NK; i++) assert_int_equal(xllm_u64map_get(&m, keys[i]), want[i]);
    }
    for (int i = 0; i < NK; i++) assert_int_equal(xllm_u64map_get(&m, keys[i]), want[i]);
    assert_true(m.cap >= 256); /* it grew */
    xllm_u64map_clear(&m);
    assert_int_equal(m.n, 0);
    for (int i = 0; i < NK; i++) assert_int_equal(xllm_u64map_get(&m, keys[i]), -1);
    xllm_u64map_free(&m);
    xllm_u64map_free(&m); /* a freed map is a zeroed map */
}

/* Keys with the same home slot form one chain; deleting from its middle keeps the rest found. */
static void test_collisions(void **state) {
    (void)state;
    xllm_u64map m;
    xllm_u64map_init(&m, 16);
    /* the home slot uses bits 7.. of k * golden: multiples of the inverse step collide */
    uint64_t same[6];
    int n = 0;
    uint64_t home0 = 0;
    for (uint64_t k = 1; n < 6; k++) {
        uint64_t h = (k * 0x9E3779B97F4A7C15ull >> 7) & 15;
        if (n == 0) home0 = h;
        if (h == home0) same[n++] = k;
    }
    for (int i = 0; i < 6; i++) xllm_u64map_put(&m, same[i], i);
    for (int d = 0; d < 6; d += 2) assert_true(xllm_u64map_del(&m, same[d]));
    for (int i = 0; i < 6; i++) assert_int_equal(xllm_u64map_get(&m, same[i]), i % 2 ? i : -1);
    assert_false(xllm_u64map_del(&m, same[0]));
    xllm_u64map_free(&m);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_random_ops),
        cmocka_unit_test(test_collisions),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
