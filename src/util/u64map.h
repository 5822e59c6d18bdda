/* A map from 64-bit keys (hashes) to non-negative int32 values: open addressing with linear
 * probing and backward-shift deletion (no tombstones), for the KV prefix index and the
 * service's per-instance prefix index. Not thread-safe: the owner's lock guards it. */
#ifndef XLLM_UTIL_U64MAP_H
#define XLLM_UTIL_U64MAP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct xllm_u64map {
    uint64_t *keys; /* [cap] */
    int32_t *vals;  /* [cap]; -1 marks an empty slot */
    size_t cap;     /* a power of two */
    size_t n;       /* keys held; the user keeps n < cap (xllm_u64map_reserve) */
} xllm_u64map;

/* An empty map with room for at least min_cap / 2 keys at load 1/2. */
void xllm_u64map_init(xllm_u64map *m, size_t min_cap);
void xllm_u64map_free(xllm_u64map *m); /* accepts a zeroed map */
void xllm_u64map_clear(xllm_u64map *m);
/* Grows the table (rehashing) so that n keys stay at load <= 1/2. */
void xllm_u64map_reserve(xllm_u64map *m, size_t n);

/* The value of key k, or -1 when absent. */
int32_t xllm_u64map_get(const xllm_u64map *m, uint64_t k);
/* Inserts k or replaces its value; v >= 0. The table must have a free slot (n < cap). */
void xllm_u64map_put(xllm_u64map *m, uint64_t k, int32_t v);
/* Removes k; false when it was absent. */
bool xllm_u64map_del(xllm_u64map *m, uint64_t k);

#endif
