/* Unit tests of src/util: status strings and error formatting. */
#include <string.h>

#include "testutil.h"
#include "util/common.h"
#include "xllm/xllm.h"

static void test_status_str(void **state) {
    (void)state;
    assert_string_equal(xllm_status_str(XLLM_OK), "ok");
    assert_string_equal(xllm_status_str(XLLM_ERR_FORMAT), "corrupt or truncated file");
    assert_string_equal(xllm_status_str((xllm_status)-99), "unknown status");
}

static void test_set_err(void **state) {
    (void)state;
    char buf[8];
    xllm_set_err(buf, sizeof(buf), "value %d too big", 12345);
    assert_int_equal(strlen(buf), 7); /* truncated, terminated */
    xllm_set_err(NULL, 0, "ignored %d", 1);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_status_str),
        cmocka_unit_test(test_set_err),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
