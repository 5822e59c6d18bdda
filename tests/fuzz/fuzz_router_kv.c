/* libFuzzer target: the service's parser of the "kv" object in an instance's load answer
 * (prefix-cache events: block size, cursor, reset, hashes as hex strings). */
#include <stdint.h>
#include <stdlib.h>

#include "service/router.h"

int LLVMFuzzerTestOneInput(const uint8_t *buf, size_t n) {
    xllm_router_kv_answer a;
    bool ok = xllm_router_kv_parse((const char *)buf, n, &a);
    /* what is accepted is in range, and every hash was read */
    if (ok && (a.block_tokens <= 0 || a.block_tokens > (1 << 20) || a.next == 0 ||
               (a.n_stored && !a.stored) || (a.n_evicted && !a.evicted)))
        abort();
    uint64_t sum = 0;
    for (size_t i = 0; ok && i < a.n_stored; i++) sum += a.stored[i];
    for (size_t i = 0; ok && i < a.n_evicted; i++) sum += a.evicted[i];
    (void)sum;
    xllm_router_kv_answer_clear(&a);
    return 0;
}
