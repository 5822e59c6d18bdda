/* Unit tests of the KV memory (xTensor and paged layouts): the invariant checker runs after every
 * operation, including a randomized run of thousands of interleaved grow / share / truncate /
 * free / evict operations in which every stored row is verified against what it should hold, and
 * in which the prefix-cache event stream, replayed, always equals the set of cached blocks. */
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>
#include <xxhash.h>

#include "kv/kv.h"
#include "util/common.h"
#include "util/u64map.h"
#include "testutil.h"

#define NL  2  /* layers */
#define RE  64 /* row elements (f32: 256-byte rows -> 16-token blocks) */
#define CTX 256

static xllm_kv *make_ev(xllm_kv_layout layout, int n_seq, size_t memory, bool background,
                        int32_t events) {
    xllm_kv_params p = {.n_layer = NL,
                        .n_seq = n_seq,
                        .n_ctx = CTX,
                        .row_elems = RE,
                        .type = XLLM_DTYPE_F32,
                        .layout = layout,
                        .memory = memory,
                        .prefix_cache = true,
                        .background = background,
                        .events = events};
    xllm_kv *kv = NULL;
    char err[256];
    assert_int_equal(xllm_kv_new(&p, &kv, err, sizeof(err)), XLLM_OK);
    return kv;
}

static xllm_kv *make(xllm_kv_layout layout, int n_seq, size_t memory, bool background) {
    return make_ev(layout, n_seq, memory, background, 0);
}

static void check(xllm_kv *kv) {
    char err[256] = "";
    bool ok = xllm_kv_check(kv, err, sizeof(err));
    if (!ok) fprintf(stderr, "xllm_kv_check: %s\n", err);
    assert_true(ok);
}

/* The value stored at a position is a function of the tokens up to it, as real K/V are. */
static float value_at(const int32_t *tokens, int32_t pos, int32_t layer, int kv) {
    uint64_t h = 1469598103934665603ull;
    for (int32_t i = 0; i <= pos; i++) h = (h ^ (uint64_t)tokens[i]) * 1099511628211ull;
    return (float)((h >> 40) % 100000) + 0.25f * (float)layer + 0.5f * (float)kv;
}

static void write_rows(xllm_kv *kv, int32_t seq, const int32_t *tokens, int32_t from, int32_t to) {
    for (int32_t p = from; p < to; p++)
        for (int32_t l = 0; l < NL; l++) {
            float *k = xllm_kv_row_k(kv, l, seq, p), *v = xllm_kv_row_v(kv, l, seq, p);
            for (int e = 0; e < RE; e++) {
                k[e] = value_at(tokens, p, l, 0) + (float)e;
                v[e] = value_at(tokens, p, l, 1) + (float)e;
            }
        }
}

/* Every stored row, read the way attention reads it (spans), holds what it should. */
static void verify_rows(xllm_kv *kv, int32_t seq, const int32_t *tokens) {
    int32_t len = xllm_kv_seq_len(kv, seq);
    xllm_kv_span spans[CTX];
    for (int32_t l = 0; l < NL; l++) {
        int32_t n = xllm_kv_spans(kv, l, seq, len, spans, xllm_kv_max_spans(kv));
        int32_t covered = 0;
        for (int32_t r = 0; r < n; r++) {
            assert_int_equal(spans[r].pos0, covered);
            for (int32_t i = 0; i < spans[r].n; i++) {
                const float *k = (const float *)((const uint8_t *)spans[r].k +
                                                 (size_t)i * xllm_kv_row_bytes(kv));
                const float *v = (const float *)((const uint8_t *)spans[r].v +
                                                 (size_t)i * xllm_kv_row_bytes(kv));
                int32_t p = spans[r].pos0 + i;
                assert_float_equal(k[0], value_at(tokens, p, l, 0), 0);
                assert_float_equal(k[RE - 1], value_at(tokens, p, l, 0) + (float)(RE - 1), 0);
                assert_float_equal(v[3], value_at(tokens, p, l, 1) + 3.0f, 0);
            }
            covered += spans[r].n;
        }
        assert_int_equal(covered, len);
    }
}

/* Appends tokens [from, to) of seq: reserve, record tokens, write rows, commit. */
static xllm_status append(xllm_kv *kv, int32_t seq, const int32_t *tokens, int32_t to) {
    int32_t from = xllm_kv_seq_len(kv, seq);
    xllm_status st = xllm_kv_reserve(kv, seq, to);
    if (st != XLLM_OK) return st;
    xllm_kv_seq_set_tokens(kv, seq, from, tokens + from, to - from);
    write_rows(kv, seq, tokens, from, to);
    xllm_kv_seq_set_len(kv, seq, to);
    return XLLM_OK;
}

static void test_basic(void **state) {
    (void)state;
    for (int layout = 0; layout < 2; layout++) {
        xllm_kv *kv = make((xllm_kv_layout)layout, 2, 0, layout == 0);
        int32_t tok[CTX];
        for (int i = 0; i < CTX; i++) tok[i] = i * 7 % 50;
        assert_int_equal(xllm_kv_block_tokens(kv), 16);
        check(kv);
        assert_int_equal(append(kv, 0, tok, 1), XLLM_OK);
        check(kv);
        assert_int_equal(append(kv, 0, tok, 40), XLLM_OK);
        check(kv);
        verify_rows(kv, 0, tok);
        assert_int_equal(xllm_kv_seq_len(kv, 0), 40);
        assert_true(xllm_kv_seq_pages(kv, 0) >= 3);
        /* the context limit */
        assert_int_equal(xllm_kv_reserve(kv, 0, CTX + 1), XLLM_ERR_KV_FULL);
        assert_non_null(strstr(xllm_kv_last_error(kv), "context"));
        /* a second sequence with the same prompt reuses the two full blocks */
        assert_int_equal(xllm_kv_seq_reuse_prefix(kv, 1, tok, 40), 32);
        check(kv);
        verify_rows(kv, 1, tok);
        xllm_kv_stats st;
        xllm_kv_get_stats(kv, &st);
        assert_int_equal(st.prefix_hit_tokens, 32);
        /* the shared pages are not copied */
        assert_true(st.used_pages <= xllm_kv_seq_pages(kv, 0) + 2);
        /* diverge: seq 1 continues differently, seq 0 truncates into a shared block */
        int32_t tok2[CTX];
        memcpy(tok2, tok, sizeof(tok));
        for (int i = 32; i < CTX; i++) tok2[i] = 99 - i % 40;
        assert_int_equal(append(kv, 1, tok2, 70), XLLM_OK);
        check(kv);
        xllm_kv_seq_set_len(kv, 0, 20); /* block 1 is shared with seq 1: made private */
        check(kv);
        tok[20] = 42;
        assert_int_equal(append(kv, 0, tok, 30), XLLM_OK);
        check(kv);
        verify_rows(kv, 0, tok);
        verify_rows(kv, 1, tok2);
        xllm_kv_seq_free(kv, 0);
        xllm_kv_seq_free(kv, 1);
        check(kv);
        xllm_kv_get_stats(kv, &st);
        assert_int_equal(st.used_pages, 0);
        assert_true(st.cached_pages > 0); /* idle cached blocks stay for reuse */
        assert_int_equal(st.free_pages + st.cached_pages, st.n_pages);
        xllm_kv_free(kv);
    }
}

static void test_pool_exhaustion_and_eviction(void **state) {
    (void)state;
    /* 6 pages of 16 tokens */
    size_t page = 16 * RE * 4 * 2 * NL;
    xllm_kv *kv = make(XLLM_KV_LAYOUT_XTENSOR, 3, 6 * page, false);
    int32_t a[CTX], b[CTX];
    for (int i = 0; i < CTX; i++) {
        a[i] = i;
        b[i] = 1000 + i;
    }
    assert_int_equal(append(kv, 0, a, 64), XLLM_OK); /* 4 pages */
    assert_int_equal(append(kv, 1, b, 32), XLLM_OK); /* 2 pages */
    assert_int_equal(xllm_kv_pages_available(kv), 0);
    assert_int_equal(xllm_kv_reserve(kv, 2, 1), XLLM_ERR_KV_FULL);
    assert_non_null(strstr(xllm_kv_last_error(kv), "out of KV pages"));
    check(kv);
    xllm_kv_seq_free(kv, 0); /* its 4 full blocks become idle cached pages */
    check(kv);
    assert_int_equal(xllm_kv_pages_available(kv), 4);
    assert_int_equal(xllm_kv_pages_needed(kv, 2, 48), 3);
    assert_int_equal(append(kv, 2, b + 100, 48), XLLM_OK); /* evicts 3 */
    check(kv);
    xllm_kv_stats st;
    xllm_kv_get_stats(kv, &st);
    assert_int_equal(st.evictions, 3);
    /* the surviving cached block is the most recently used one */
    xllm_kv_free(kv);
}

static void test_map_limit(void **state) {
    (void)state;
    /* a tiny mapping budget: creation picks larger blocks; a forced small block fails cleanly */
    xllm_kv_params p = {.n_layer = NL,
                        .n_seq = 2,
                        .n_ctx = CTX,
                        .row_elems = RE,
                        .type = XLLM_DTYPE_F32,
                        .layout = XLLM_KV_LAYOUT_XTENSOR,
                        .prefix_cache = true,
                        .max_map_count = 2048 + 40};
    xllm_kv *kv = NULL;
    char err[256];
    assert_int_equal(xllm_kv_new(&p, &kv, err, sizeof(err)), XLLM_OK);
    assert_true(xllm_kv_block_tokens(kv) > 16);
    xllm_kv_free(kv);
    p.block_tokens = 16;
    assert_int_equal(xllm_kv_new(&p, &kv, err, sizeof(err)), XLLM_OK);
    int32_t tok[CTX];
    for (int i = 0; i < CTX; i++) tok[i] = i;
    /* interleave two sequences so their pages never merge into one mapping */
    xllm_status st = XLLM_OK;
    for (int32_t n = 16; n <= CTX && st == XLLM_OK; n += 16) {
        st = append(kv, 0, tok, n);
        if (st == XLLM_OK) st = append(kv, 1, tok + 1, n);
    }
    assert_int_equal(st, XLLM_ERR_KV_FULL);
    assert_non_null(strstr(xllm_kv_last_error(kv), "max_map_count"));
    check(kv);
    xllm_kv_free(kv);
    p.block_tokens = 24; /* not a whole number of OS pages per layer */
    assert_int_equal(xllm_kv_new(&p, &kv, err, sizeof(err)), XLLM_ERR_INVALID_ARG);
    assert_non_null(strstr(err, "multiple of 16"));
}

/* ---- prefix-cache events ------------------------------------------------------------------- */

/* The chained hashes of the first nb 16-token blocks, from the scheme's definition (not kv.c's). */
static void chain(const int32_t *tokens, int32_t nb, uint64_t *out) {
    uint64_t parent = 0x786c6c6d6b763031ull; /* "xllmkv01" */
    for (int32_t b = 0; b < nb; b++) {
        out[b] = XXH3_64bits_withSeed(tokens + 16 * b, 16 * sizeof(int32_t), parent);
        parent = out[b];
    }
}

/* A reader's copy of the cached set, rebuilt from the event stream alone. */
typedef struct replay {
    xllm_u64map set;
    uint64_t cursor; /* 0: nothing read yet (the first read is a reset) */
    int64_t events, resets;
    bool net; /* apply each read netted (xllm_kv_events_net): evictions first, then stores */
} replay;

static void replay_init(replay *r) {
    memset(r, 0, sizeof(*r));
    xllm_u64map_init(&r->set, 64);
}

/* Reads every event after the cursor, max at a time, and applies it: a reset replaces the set,
 * a STORED block must be absent before, an EVICTED one present, and sequence numbers follow
 * each other. False (with a message) on any inconsistency; no cmocka asserts, so that a reader
 * thread can call it. */
static bool replay_pull(replay *r, xllm_kv *kv, int32_t max) {
    for (;;) {
        xllm_kv_events ev;
        if (xllm_kv_events_read(kv, r->cursor, max, &ev) != XLLM_OK) return false;
        bool ok = ev.reset || ev.n <= max;
        if (ev.reset) {
            xllm_u64map_clear(&r->set);
            r->resets++;
        }
        const int32_t n_read = ev.n;
        if (r->net && !ev.reset) {
            xllm_kv_events_net(&ev);
            for (int32_t i = 0; ok && i < ev.n; i++) /* in order, one per block, in the window */
                ok = ev.ev[i].seq > (i ? ev.ev[i - 1].seq : r->cursor) && ev.ev[i].seq <= ev.next;
            for (int k = 0; ok && k < 2; k++)
                for (int32_t i = 0; i < ev.n; i++) {
                    const xllm_kv_event *e = &ev.ev[i];
                    if (k == 0 && e->kind == XLLM_KV_EVENT_EVICTED) {
                        xllm_u64map_del(&r->set, e->hash);
                    } else if (k == 1 && e->kind == XLLM_KV_EVENT_STORED) {
                        xllm_u64map_reserve(&r->set, r->set.n + 1);
                        xllm_u64map_put(&r->set, e->hash, 1);
                    }
                }
            ev.n = 0; /* applied */
        }
        for (int32_t i = 0; ok && i < ev.n; i++) {
            const xllm_kv_event *e = &ev.ev[i];
            xllm_u64map_reserve(&r->set, r->set.n + 1);
            if (ev.reset) {
                ok = e->kind == XLLM_KV_EVENT_STORED && e->seq == ev.next &&
                     xllm_u64map_get(&r->set, e->hash) < 0;
                xllm_u64map_put(&r->set, e->hash, 1);
            } else if (e->seq != r->cursor + 1 + (uint64_t)i) {
                ok = false;
            } else if (e->kind == XLLM_KV_EVENT_STORED) {
                ok = xllm_u64map_get(&r->set, e->hash) < 0;
                xllm_u64map_put(&r->set, e->hash, 1);
            } else {
                ok = e->kind == XLLM_KV_EVENT_EVICTED && xllm_u64map_del(&r->set, e->hash);
            }
            if (!ok) fprintf(stderr, "replay: bad event %d of %d (reset %d)\n", i, ev.n, ev.reset);
        }
        if (!ev.reset) {
            r->events += n_read;
            ok = ok && ev.next == r->cursor + (uint64_t)n_read;
        }
        r->cursor = ev.next;
        bool more = ev.more;
        xllm_kv_events_free(&ev);
        if (!ok) return false;
        if (!more) return true;
    }
}

/* The replayed set equals the blocks cached now (read from the pages). */
static void replay_verify(replay *r, xllm_kv *kv) {
    uint64_t *h = xllm_xmalloc((r->set.n + 1) * sizeof(uint64_t));
    int64_t n = 0;
    for (size_t i = 0; i < r->set.cap; i++)
        if (r->set.vals[i] >= 0) h[n++] = r->set.keys[i];
    char err[256] = "";
    bool ok = xllm_kv_check_cached(kv, h, n, err, sizeof(err));
    if (!ok) fprintf(stderr, "xllm_kv_check_cached: %s\n", err);
    free(h);
    assert_true(ok);
}

/* Reads events after since, expecting no reset. */
static xllm_kv_events read_ev(xllm_kv *kv, uint64_t since, int32_t max) {
    xllm_kv_events ev;
    assert_int_equal(xllm_kv_events_read(kv, since, max, &ev), XLLM_OK);
    assert_false(ev.reset);
    return ev;
}

/* Stored events after a prompt of k full blocks are exactly the chain a reader computes. */
static void test_events_stored(void **state) {
    (void)state;
    assert_true(XLLM_KV_HASH_ROOT == 0x786c6c6d6b763031ull);
    for (int layout = 0; layout < 2; layout++) {
        xllm_kv *kv = make((xllm_kv_layout)layout, 2, 0, layout == 0);
        int32_t tok[CTX];
        for (int i = 0; i < CTX; i++) tok[i] = (i * 13 + 5) % 97;
        uint64_t h[8];
        chain(tok, 8, h);
        for (int b = 0; b < 8; b++)
            assert_true(xllm_kv_block_hash(tok + 16 * b, 16, b ? h[b - 1] : XLLM_KV_HASH_ROOT) ==
                        h[b]);
        /* cursor 0: a reset with the (empty) set and the current cursor */
        xllm_kv_events ev;
        assert_int_equal(xllm_kv_events_read(kv, 0, 16, &ev), XLLM_OK);
        assert_true(ev.reset);
        assert_int_equal(ev.n, 0);
        const uint64_t c0 = ev.next;
        assert_true(c0 > 0 && c0 < (1ull << 53));
        xllm_kv_events_free(&ev);
        assert_int_equal(xllm_kv_events_read(kv, c0, 0, &ev), XLLM_ERR_INVALID_ARG);

        assert_int_equal(append(kv, 0, tok, 3 * 16 + 5), XLLM_OK); /* 3 full blocks */
        check(kv);
        ev = read_ev(kv, c0, 4096);
        assert_int_equal(ev.n, 3);
        assert_false(ev.more);
        for (int b = 0; b < 3; b++) {
            assert_int_equal(ev.ev[b].kind, XLLM_KV_EVENT_STORED);
            assert_true(ev.ev[b].hash == h[b]);
            assert_true(ev.ev[b].seq == c0 + 1 + (uint64_t)b);
        }
        assert_true(ev.next == c0 + 3);
        xllm_kv_events_free(&ev);
        /* a bounded read stops at max and says there is more */
        ev = read_ev(kv, c0, 2);
        assert_int_equal(ev.n, 2);
        assert_true(ev.more && ev.next == c0 + 2);
        xllm_kv_events_free(&ev);
        ev = read_ev(kv, c0 + 2, 2);
        assert_int_equal(ev.n, 1);
        assert_true(!ev.more && ev.ev[0].hash == h[2]);
        xllm_kv_events_free(&ev);
        /* reusing cached blocks stores nothing new; the next full block is stored once */
        assert_int_equal(xllm_kv_seq_reuse_prefix(kv, 1, tok, 60), 48);
        assert_int_equal(append(kv, 1, tok, 70), XLLM_OK);
        check(kv);
        ev = read_ev(kv, c0 + 3, 4096);
        assert_int_equal(ev.n, 1);
        assert_int_equal(ev.ev[0].kind, XLLM_KV_EVENT_STORED);
        assert_true(ev.ev[0].hash == h[3]);
        xllm_kv_events_free(&ev);
        /* a snapshot now is the set h[0..4) */
        assert_int_equal(xllm_kv_events_read(kv, 0, 1, &ev), XLLM_OK);
        assert_true(ev.reset && ev.next == c0 + 4);
        assert_int_equal(ev.n, 4); /* not bounded by max */
        uint64_t got[4];
        for (int i = 0; i < 4; i++) got[i] = ev.ev[i].hash;
        char err[256];
        assert_true(xllm_kv_check_cached(kv, got, 4, err, sizeof(err)));
        assert_true(xllm_kv_check_cached(kv, h, 4, err, sizeof(err)));
        assert_false(xllm_kv_check_cached(kv, h, 3, err, sizeof(err))); /* the checker bites */
        xllm_kv_events_free(&ev);
        xllm_kv_free(kv);
    }
}

/* Truncation emits EVICTED for exactly the cached blocks it rewrites, none for blocks that only
 * go idle (they stay cached) or that another sequence still shares. */
static void test_events_truncate(void **state) {
    (void)state;
    xllm_kv *kv = make(XLLM_KV_LAYOUT_XTENSOR, 2, 0, false);
    int32_t tok[CTX], tok2[CTX];
    for (int i = 0; i < CTX; i++) tok[i] = tok2[i] = i % 61;
    for (int i = 16; i < CTX; i++) tok2[i] = 200 + i % 50;
    uint64_t h[4], h2[4];
    chain(tok, 4, h);
    chain(tok2, 4, h2);
    replay r;
    replay_init(&r);
    assert_true(replay_pull(&r, kv, 4096));
    const uint64_t c0 = r.cursor;
    assert_int_equal(append(kv, 0, tok, 53), XLLM_OK); /* blocks 0..2 cached, 3 partial */
    assert_true(replay_pull(&r, kv, 4096));
    /* into block 2, which only seq 0 holds: it leaves the cache */
    xllm_kv_seq_set_len(kv, 0, 40);
    check(kv);
    xllm_kv_events ev = read_ev(kv, c0 + 3, 4096);
    assert_int_equal(ev.n, 1);
    assert_int_equal(ev.ev[0].kind, XLLM_KV_EVENT_EVICTED);
    assert_true(ev.ev[0].hash == h[2]);
    xllm_kv_events_free(&ev);
    assert_true(replay_pull(&r, kv, 4096));
    replay_verify(&r, kv);
    /* to a block boundary: block 1 goes idle but stays cached, no event */
    xllm_kv_seq_set_len(kv, 0, 16);
    check(kv);
    ev = read_ev(kv, c0 + 4, 4096);
    assert_int_equal(ev.n, 0);
    xllm_kv_events_free(&ev);
    /* a shared block: seq 1 reuses blocks 0..1, seq 0 truncates into block 0 (made private):
     * block 0 stays cached for seq 1, no event */
    assert_int_equal(xllm_kv_seq_reuse_prefix(kv, 1, tok, 40), 32);
    xllm_kv_seq_set_len(kv, 0, 8);
    check(kv);
    ev = read_ev(kv, c0 + 4, 4096);
    assert_int_equal(ev.n, 0);
    xllm_kv_events_free(&ev);
    /* seq 0 goes on with other tokens: their blocks are stored */
    assert_int_equal(append(kv, 0, tok2, 64), XLLM_OK);
    check(kv);
    ev = read_ev(kv, c0 + 4, 4096);
    assert_int_equal(ev.n, 3);
    for (int b = 1; b < 4; b++) {
        assert_int_equal(ev.ev[b - 1].kind, XLLM_KV_EVENT_STORED);
        assert_true(ev.ev[b - 1].hash == h2[b]);
    }
    xllm_kv_events_free(&ev);
    assert_true(replay_pull(&r, kv, 4096));
    replay_verify(&r, kv);
    uint64_t want[5] = {h[0], h[1], h2[1], h2[2], h2[3]};
    char err[256];
    assert_true(xllm_kv_check_cached(kv, want, 5, err, sizeof(err)));
    xllm_u64map_free(&r.set);
    xllm_kv_free(kv);
}

/* Eviction under pool pressure emits EVICTED for exactly the blocks whose pages were taken. */
static void test_events_evict(void **state) {
    (void)state;
    size_t page = 16 * RE * 4 * 2 * NL;
    xllm_kv *kv = make(XLLM_KV_LAYOUT_PAGED, 3, 6 * page, false); /* 6 pages */
    int32_t a[CTX], b[CTX];
    for (int i = 0; i < CTX; i++) {
        a[i] = i;
        b[i] = 1000 + i;
    }
    uint64_t ha[4], hb[2], hc[3];
    chain(a, 4, ha);
    chain(b, 2, hb);
    chain(b + 100, 3, hc);
    replay r;
    replay_init(&r);
    assert_true(replay_pull(&r, kv, 4096));
    assert_int_equal(append(kv, 0, a, 64), XLLM_OK);
    assert_int_equal(append(kv, 1, b, 32), XLLM_OK);
    xllm_kv_seq_free(kv, 0); /* 4 idle cached pages, still in the cache: no event */
    check(kv);
    assert_true(replay_pull(&r, kv, 4096));
    assert_int_equal(r.events, 6);
    replay_verify(&r, kv);
    const uint64_t c = r.cursor;
    assert_int_equal(append(kv, 2, b + 100, 48), XLLM_OK); /* takes 3 of the idle pages */
    check(kv);
    xllm_kv_events ev = read_ev(kv, c, 4096);
    assert_int_equal(ev.n, 6);
    /* the three least recently used blocks leave (seq_free released a's blocks last first),
     * then the new prompt's blocks enter */
    uint64_t evicted[3];
    for (int i = 0; i < 3; i++) {
        assert_int_equal(ev.ev[i].kind, XLLM_KV_EVENT_EVICTED);
        evicted[i] = ev.ev[i].hash;
    }
    assert_true(evicted[0] == ha[3] && evicted[1] == ha[2] && evicted[2] == ha[1]);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(ev.ev[3 + i].kind, XLLM_KV_EVENT_STORED);
        assert_true(ev.ev[3 + i].hash == hc[i]);
    }
    xllm_kv_events_free(&ev);
    xllm_kv_stats st;
    xllm_kv_get_stats(kv, &st);
    assert_int_equal(st.evictions, 3);
    assert_true(replay_pull(&r, kv, 4096));
    replay_verify(&r, kv);
    uint64_t want[6] = {ha[0], hb[0], hb[1], hc[0], hc[1], hc[2]};
    char err[256];
    assert_true(xllm_kv_check_cached(kv, want, 6, err, sizeof(err)));
    xllm_u64map_free(&r.set);
    xllm_kv_free(kv);
}

/* Netting keeps the last event of each block, in order. */
static void test_events_net(void **state) {
    (void)state;
    xllm_kv_event e[6] = {
        {.seq = 11, .hash = 7, .kind = XLLM_KV_EVENT_STORED},
        {.seq = 12, .hash = 8, .kind = XLLM_KV_EVENT_EVICTED},
        {.seq = 13, .hash = 7, .kind = XLLM_KV_EVENT_EVICTED},
        {.seq = 14, .hash = 9, .kind = XLLM_KV_EVENT_STORED},
        {.seq = 15, .hash = 8, .kind = XLLM_KV_EVENT_STORED},
        {.seq = 16, .hash = 5, .kind = XLLM_KV_EVENT_EVICTED},
    };
    xllm_kv_events ev = {.next = 16, .n = 6, .ev = xllm_xmalloc(sizeof(e))};
    memcpy(ev.ev, e, sizeof(e));
    xllm_kv_events_net(&ev);
    assert_int_equal(ev.n, 4);
    const uint64_t seq[4] = {13, 14, 15, 16}, hash[4] = {7, 9, 8, 5};
    const xllm_kv_event_kind kind[4] = {XLLM_KV_EVENT_EVICTED, XLLM_KV_EVENT_STORED,
                                        XLLM_KV_EVENT_STORED, XLLM_KV_EVENT_EVICTED};
    for (int i = 0; i < 4; i++) {
        assert_true(ev.ev[i].seq == seq[i] && ev.ev[i].hash == hash[i]);
        assert_int_equal(ev.ev[i].kind, kind[i]);
    }
    assert_true(ev.next == 16);
    ev.reset = true; /* a snapshot is left alone */
    ev.n = 4;
    ev.ev[1].hash = 7;
    xllm_kv_events_net(&ev);
    assert_int_equal(ev.n, 4);
    xllm_kv_events_free(&ev);
    assert_null(ev.ev);
    xllm_kv_events_free(NULL);
}

/* A reader that falls behind the ring, asks with a cursor from the future, from another ring or
 * 0 gets a reset: the whole cached set at a cursor from which events continue exactly. */
static void test_events_overflow(void **state) {
    (void)state;
    xllm_kv *kv = make_ev(XLLM_KV_LAYOUT_XTENSOR, 2, 0, false, 8); /* a ring of 8 events */
    xllm_kv *other = make_ev(XLLM_KV_LAYOUT_XTENSOR, 1, 0, false, 8);
    int32_t tok[CTX];
    for (int i = 0; i < CTX; i++) tok[i] = (i * 7 + 3) % 89;
    uint64_t h[10];
    chain(tok, 10, h);
    replay r;
    replay_init(&r);
    assert_true(replay_pull(&r, kv, 4096));
    const uint64_t c0 = r.cursor;
    assert_int_equal(append(kv, 0, tok, 10 * 16), XLLM_OK); /* 10 stored events > 8 */
    check(kv);
    xllm_kv_events ev;
    assert_int_equal(xllm_kv_events_read(kv, c0 + 2, 4096, &ev), XLLM_OK); /* still held */
    assert_false(ev.reset);
    assert_int_equal(ev.n, 8);
    assert_true(ev.ev[0].hash == h[2] && ev.ev[7].hash == h[9]);
    xllm_kv_events_free(&ev);
    assert_int_equal(xllm_kv_events_read(kv, c0 + 1, 4096, &ev), XLLM_OK); /* overwritten */
    assert_true(ev.reset);
    assert_true(ev.next == c0 + 10);
    assert_int_equal(ev.n, 10);
    xllm_kv_events_free(&ev);
    assert_true(replay_pull(&r, kv, 4096)); /* from c0: a reset */
    assert_int_equal(r.resets, 2);
    assert_true(r.cursor == c0 + 10);
    replay_verify(&r, kv);
    assert_true(xllm_kv_check_cached(kv, h, 10, NULL, 0));
    /* events continue from the snapshot's cursor */
    assert_int_equal(xllm_kv_seq_reuse_prefix(kv, 1, tok, 100), 96);
    xllm_kv_seq_set_len(kv, 0, 72); /* block 4 is shared with seq 1: stays */
    xllm_kv_seq_free(kv, 1);
    xllm_kv_seq_set_len(kv, 0, 40); /* block 2: only seq 0 holds it now, leaves */
    check(kv);
    assert_true(replay_pull(&r, kv, 4096));
    assert_int_equal(r.resets, 2);
    assert_int_equal(r.events, 1);
    replay_verify(&r, kv);
    /* a cursor ahead of the ring, and one of another ring */
    assert_int_equal(xllm_kv_events_read(kv, r.cursor + 1, 4096, &ev), XLLM_OK);
    assert_true(ev.reset && ev.n == 9 && ev.next == r.cursor);
    xllm_kv_events_free(&ev);
    xllm_kv_events oev;
    assert_int_equal(xllm_kv_events_read(other, 0, 16, &oev), XLLM_OK);
    assert_int_equal(xllm_kv_events_read(kv, oev.next, 4096, &ev), XLLM_OK);
    assert_true(ev.reset); /* rings start at random points 2^47 apart on average */
    xllm_kv_events_free(&ev);
    xllm_kv_events_free(&oev);
    xllm_u64map_free(&r.set);
    xllm_kv_free(other);
    xllm_kv_free(kv);
}

/* Thousands of random operations with a pool small enough to force eviction. */
static void run_random(xllm_kv_layout layout, bool background, int ops) {
    const int NS = 5;
    size_t page = 16 * RE * 4 * 2 * NL;
    xllm_kv *kv = make_ev(layout, NS, 40 * page, background, 64);
    int32_t tokens[5][CTX];
    uint64_t rng = 12345 + (uint64_t)layout;
    /* a few shared prompt prefixes so that the cache gets hits */
    int32_t prefixes[3][CTX];
    for (int k = 0; k < 3; k++)
        for (int i = 0; i < CTX; i++) prefixes[k][i] = (int32_t)(xllm_test_rand_u64(&rng) % 64);
    int n_ops[5] = {0};
    /* readers of the events, falling behind a ring of 64 now and then: one applies them one by
     * one, the other netted, as the instance RPC sends them */
    replay rp, rn;
    replay_init(&rp);
    replay_init(&rn);
    rn.net = true;
    int next_pull = 0, next_net = 0;
    for (int it = 0; it < ops; it++) {
        int s = (int)(xllm_test_rand_u64(&rng) % NS);
        int op = (int)(xllm_test_rand_u64(&rng) % 10);
        int32_t len = xllm_kv_seq_len(kv, s);
        if (len == 0 && op < 5) {
            /* start: a shared prefix then random tokens; reuse what the cache has */
            int k = (int)(xllm_test_rand_u64(&rng) % 3);
            int32_t shared = (int32_t)(xllm_test_rand_u64(&rng) % 120);
            for (int i = 0; i < CTX; i++)
                tokens[s][i] =
                    i < shared ? prefixes[k][i] : (int32_t)(xllm_test_rand_u64(&rng) % 64);
            int32_t want = 1 + (int32_t)(xllm_test_rand_u64(&rng) % 150);
            int32_t hit = xllm_kv_seq_reuse_prefix(kv, s, tokens[s], want);
            assert_true(hit % 16 == 0 && hit < want);
            if (append(kv, s, tokens[s], want) != XLLM_OK) xllm_kv_seq_free(kv, s);
        } else if (op < 6) {
            int32_t to = XLLM_MIN(len + 1 + (int32_t)(xllm_test_rand_u64(&rng) % 20), CTX);
            if (append(kv, s, tokens[s], to) != XLLM_OK) xllm_kv_seq_free(kv, s); /* preempt */
        } else if (op < 8 && len > 0) {
            int32_t to = (int32_t)(xllm_test_rand_u64(&rng) % (uint64_t)len);
            if (to == 0)
                xllm_kv_seq_free(kv, s);
            else
                xllm_kv_seq_set_len(kv, s, to);
            /* the rewritten tail will differ */
            for (int i = to; i < CTX; i++) tokens[s][i] = (int32_t)(xllm_test_rand_u64(&rng) % 64);
        } else if (op == 8) {
            xllm_kv_seq_free(kv, s);
        } else {
            for (int q = 0; q < NS; q++) verify_rows(kv, q, tokens[q]);
        }
        n_ops[s]++;
        check(kv);
        if (it >= next_pull) {
            assert_true(replay_pull(&rp, kv, 1 + (int32_t)(xllm_test_rand_u64(&rng) % 64)));
            replay_verify(&rp, kv);
            next_pull = it + 1 + (int)(xllm_test_rand_u64(&rng) % 100);
        }
        if (it >= next_net) {
            assert_true(replay_pull(&rn, kv, 1 + (int32_t)(xllm_test_rand_u64(&rng) % 64)));
            replay_verify(&rn, kv);
            next_net = it + 1 + (int)(xllm_test_rand_u64(&rng) % 100);
        }
    }
    assert_true(replay_pull(&rp, kv, 4096));
    replay_verify(&rp, kv);
    assert_true(replay_pull(&rn, kv, 4096));
    replay_verify(&rn, kv);
    for (int q = 0; q < NS; q++) verify_rows(kv, q, tokens[q]);
    xllm_kv_stats st;
    xllm_kv_get_stats(kv, &st);
    fprintf(stderr,
            "%s%s: %d ops, hits %llu/%llu tokens, evictions %llu, bg maps %llu, events %lld "
            "replayed, %lld resets\n",
            layout == XLLM_KV_LAYOUT_XTENSOR ? "xtensor" : "paged", background ? "+bg" : "", ops,
            (unsigned long long)st.prefix_hit_tokens, (unsigned long long)st.prefix_query_tokens,
            (unsigned long long)st.evictions, (unsigned long long)st.bg_maps, (long long)rp.events,
            (long long)rp.resets);
    assert_true(st.prefix_hit_tokens > 0);
    assert_true(st.evictions > 0);
    assert_true(rp.events > 0 && rp.resets > 1); /* both paths of the reader were taken */
    assert_true(rn.events > 0 && rn.resets > 1);
    xllm_u64map_free(&rp.set);
    xllm_u64map_free(&rn.set);
    xllm_kv_free(kv);
}

static void test_random_xtensor(void **state) {
    (void)state;
    run_random(XLLM_KV_LAYOUT_XTENSOR, false, 4000);
    run_random(XLLM_KV_LAYOUT_XTENSOR, true, 2000);
}

static void test_random_paged(void **state) {
    (void)state;
    run_random(XLLM_KV_LAYOUT_PAGED, false, 4000);
}

/* A reader thread follows the events while the owner thread works (and the pre-mapper runs);
 * afterwards its replayed set equals the cache. Under TSan this checks the ring's locking. */
typedef struct reader_arg {
    xllm_kv *kv;
    replay r;
    atomic_bool stop;
    bool ok;
} reader_arg;

static void *reader_main(void *p) {
    reader_arg *a = p;
    a->ok = true;
    while (a->ok && !atomic_load(&a->stop)) a->ok = replay_pull(&a->r, a->kv, 7);
    return NULL;
}

static void test_events_concurrent(void **state) {
    (void)state;
    size_t page = 16 * RE * 4 * 2 * NL;
    xllm_kv *kv = make_ev(XLLM_KV_LAYOUT_XTENSOR, 3, 20 * page, true, 32);
    reader_arg a = {.kv = kv};
    replay_init(&a.r);
    atomic_init(&a.stop, false);
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, reader_main, &a), 0);
    uint64_t rng = 99;
    int32_t tok[3][CTX];
    for (int it = 0; it < 600; it++) {
        int s = (int)(xllm_test_rand_u64(&rng) % 3);
        int32_t len = xllm_kv_seq_len(kv, s);
        if (len == 0) {
            for (int i = 0; i < CTX; i++)
                tok[s][i] = i < 64 ? i % 5 : (int32_t)(xllm_test_rand_u64(&rng) % 8);
            xllm_kv_seq_reuse_prefix(kv, s, tok[s], 100);
            if (append(kv, s, tok[s], 100) != XLLM_OK) xllm_kv_seq_free(kv, s);
        } else if (len + 16 <= CTX && xllm_test_rand_u64(&rng) % 3) {
            if (append(kv, s, tok[s], len + 16) != XLLM_OK) xllm_kv_seq_free(kv, s);
        } else {
            xllm_kv_seq_free(kv, s);
        }
    }
    atomic_store(&a.stop, true);
    pthread_join(th, NULL);
    assert_true(a.ok);
    assert_true(replay_pull(&a.r, kv, 4096));
    replay_verify(&a.r, kv);
    assert_true(a.r.events > 0);
    check(kv);
    xllm_u64map_free(&a.r.set);
    xllm_kv_free(kv);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_basic),
        cmocka_unit_test(test_pool_exhaustion_and_eviction),
        cmocka_unit_test(test_map_limit),
        cmocka_unit_test(test_random_xtensor),
        cmocka_unit_test(test_random_paged),
        cmocka_unit_test(test_events_stored),
        cmocka_unit_test(test_events_truncate),
        cmocka_unit_test(test_events_evict),
        cmocka_unit_test(test_events_net),
        cmocka_unit_test(test_events_overflow),
        cmocka_unit_test(test_events_concurrent),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
