/* Open-addressing map from 64-bit keys to int32 values (linear probing, backward shift). */
#include "util/u64map.h"

#include "util/common.h"

static size_t home(const xllm_u64map *m, uint64_t k) {
    /* keys are hashes already; the multiply spreads sequential keys in tests */
    return (size_t)(k * 0x9E3779B97F4A7C15ull >> 7) & (m->cap - 1);
}

static void alloc_slots(xllm_u64map *m, size_t cap) {
    m->cap = cap;
    m->n = 0;
    m->keys = xllm_xcalloc(cap, sizeof(uint64_t));
    m->vals = xllm_xmalloc(cap * sizeof(int32_t));
    for (size_t i = 0; i < cap; i++) m->vals[i] = -1;
}

void xllm_u64map_init(xllm_u64map *m, size_t min_cap) {
    size_t cap = 16;
    while (cap < min_cap) cap *= 2;
    alloc_slots(m, cap);
}

void xllm_u64map_free(xllm_u64map *m) {
    free(m->keys);
    free(m->vals);
    m->keys = NULL;
    m->vals = NULL;
    m->cap = m->n = 0;
}

void xllm_u64map_clear(xllm_u64map *m) {
    for (size_t i = 0; i < m->cap; i++) m->vals[i] = -1;
    m->n = 0;
}

void xllm_u64map_reserve(xllm_u64map *m, size_t n) {
    if (2 * n <= m->cap) return;
    xllm_u64map old = *m;
    size_t cap = old.cap;
    while (cap < 2 * n) cap *= 2;
    alloc_slots(m, cap);
    for (size_t i = 0; i < old.cap; i++)
        if (old.vals[i] >= 0) xllm_u64map_put(m, old.keys[i], old.vals[i]);
    xllm_u64map_free(&old);
}

int32_t xllm_u64map_get(const xllm_u64map *m, uint64_t k) {
    for (size_t i = home(m, k);; i = (i + 1) & (m->cap - 1)) {
        if (m->vals[i] < 0) return -1;
        if (m->keys[i] == k) return m->vals[i];
    }
}

void xllm_u64map_put(xllm_u64map *m, uint64_t k, int32_t v) {
    XLLM_ASSERT(v >= 0);
    size_t i = home(m, k);
    while (m->vals[i] >= 0 && m->keys[i] != k) i = (i + 1) & (m->cap - 1);
    if (m->vals[i] < 0) {
        XLLM_ASSERT(m->n + 1 < m->cap); /* one slot stays empty: probes end */
        m->n++;
        m->keys[i] = k;
    }
    m->vals[i] = v;
}

bool xllm_u64map_del(xllm_u64map *m, uint64_t k) {
    size_t mask = m->cap - 1, i = home(m, k);
    while (m->vals[i] >= 0 && m->keys[i] != k) i = (i + 1) & mask;
    if (m->vals[i] < 0) return false;
    m->vals[i] = -1;
    m->n--;
    for (size_t j = (i + 1) & mask; m->vals[j] >= 0; j = (j + 1) & mask) {
        size_t h = home(m, m->keys[j]);
        /* move j back to i when its home is not in (i, j] (cyclically) */
        bool between = i <= j ? (h > i && h <= j) : (h > i || h <= j);
        if (!between) {
            m->keys[i] = m->keys[j];
            m->vals[i] = m->vals[j];
            m->vals[j] = -1;
            i = j;
        }
    }
    return true;
}
