/* libFuzzer target: the registry's parsers of store contents and etcd gateway responses
 * (instance values, range / watch / lease / txn responses, base64). The first byte picks one. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "service/registry-impl.h"
#include "service/registry.h"

int LLVMFuzzerTestOneInput(const uint8_t *buf, size_t n) {
    if (n == 0) return 0;
    const char *p = (const char *)buf + 1;
    size_t len = n - 1;
    char err[256];
    switch (buf[0] % 6) {
        case 0: {
            xllm_instance inst;
            if (xllm_registry_instance_decode(p, len, &inst, err, sizeof(err)) == XLLM_OK) {
                /* what decodes must encode again, and round-trip */
                char *s = xllm_registry_instance_encode(&inst, err, sizeof(err));
                if (!s) abort();
                xllm_instance again;
                if (xllm_registry_instance_decode(s, strlen(s), &again, err, sizeof(err)) !=
                    XLLM_OK)
                    abort();
                if (strcmp(again.name, inst.name) || again.incarnation != inst.incarnation ||
                    again.role != inst.role || strcmp(again.addr, inst.addr) ||
                    strcmp(again.attrs, inst.attrs))
                    abort();
                xllm_instance_clear(&again);
                free(s);
            }
            xllm_instance_clear(&inst);
            break;
        }
        case 1: {
            xllm_registry_kv *kvs = NULL;
            size_t nk = 0;
            int64_t rev = 0;
            if (xllm_etcd_parse_range(p, len, &kvs, &nk, &rev, err, sizeof(err)) == XLLM_OK)
                for (size_t i = 0; i < nk; i++)
                    if (!kvs[i].key || !kvs[i].value) abort();
            xllm_registry_kvs_free(kvs, nk);
            break;
        }
        case 2: {
            xllm_etcd_watch_msg msg;
            if (xllm_etcd_parse_watch_msg(p, len, &msg, err, sizeof(err)) == XLLM_OK) {
                for (size_t i = 0; i < msg.n_events; i++)
                    if (strlen(msg.events[i].key) + strlen(msg.events[i].value) > len * 2) abort();
                xllm_etcd_watch_msg_free(&msg);
            }
            break;
        }
        case 3: {
            int64_t id, ttl;
            xllm_etcd_parse_lease(p, len, &id, &ttl, err, sizeof(err));
            break;
        }
        case 4: {
            bool ok;
            int64_t rev;
            xllm_etcd_parse_txn(p, len, &ok, &rev, err, sizeof(err));
            break;
        }
        default: {
            char *out = NULL;
            size_t out_len = 0;
            if (xllm_etcd_b64_decode(p, len, &out, &out_len) == XLLM_OK) {
                char *enc = xllm_etcd_b64_encode(out, out_len);
                char *back = NULL;
                size_t back_len = 0;
                if (xllm_etcd_b64_decode(enc, strlen(enc), &back, &back_len) != XLLM_OK ||
                    back_len != out_len || memcmp(back, out, out_len) != 0)
                    abort();
                free(back);
                free(enc);
            }
            free(out);
            break;
        }
    }
    return 0;
}
