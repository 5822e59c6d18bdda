/* xTensor KV memory on CPU: a memfd page pool, per-sequence virtual regions with pages mapped in
 * on demand (MAP_FIXED), a background pre-mapper, a prefix cache of full blocks (chained XXH3,
 * shared pages, LRU eviction) with a ring of its store / evict events for other threads, and the
 * block-table ("paged") baseline over the same pool. */
#include "kv/kv.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>
#include <xxhash.h>

#include "compute/dtype.h"
#include "util/common.h"
#include "util/u64map.h"

#define OS_PAGE        4096
#define HASH_SEED      XLLM_KV_HASH_ROOT /* "xllmkv01": the chain's root */
#define MAP_SLACK      2048              /* mappings left to the rest of the process */
#define PREMAP_DIVISOR 4     /* pre-map the next page when <= B/4 rows are left in the last */
#define EVENTS_DEFAULT 65536 /* prefix-cache events kept for readers */

/* ---------------------------------------------------------------------------------------- */
/* Structures                                                                                */
/* ---------------------------------------------------------------------------------------- */

typedef struct page_info {
    int32_t refs; /* sequences whose block table holds this page */
    bool cached;  /* in the prefix index under `hash` */
    uint64_t hash;
    int32_t lru_prev, lru_next; /* idle cached pages (refs == 0), oldest first */
} page_info;

typedef struct kv_seq {
    atomic_int len;      /* committed positions; written by the engine, read by the mapper */
    atomic_int n_blocks; /* blocks with a page (mapped, for xtensor); read without the lock */
    int32_t n_hashed;    /* leading full blocks whose chained hash is known */
    int32_t runs;        /* maximal runs of blocks on consecutive pages (mappings per region) */
    int32_t *pages;      /* [max_blocks] */
    uint64_t *hashes;    /* [max_blocks] */
    int32_t *tokens;     /* [n_ctx] */
    uint8_t *base;       /* xtensor: n_regions regions of region_bytes each */
} kv_seq;

struct xllm_kv {
    xllm_kv_params p;
    size_t row_bytes;    /* one position of one layer's K (or V) */
    size_t slice_bytes;  /* B rows: the part of a page mapped into one region */
    size_t page_bytes;   /* slice_bytes * n_regions */
    size_t region_bytes; /* max_blocks * slice_bytes */
    int32_t B;           /* tokens per block */
    int32_t max_blocks;  /* per sequence */
    int32_t n_regions;   /* 2 * n_layer: region j = layer j/2, K (even) or V (odd) */
    int64_t n_pages;
    int fd;
    uint8_t *pool; /* the whole pool mapped once: paged access, copies, checks */

    page_info *pg;
    int32_t *free_stack; /* free page ids; top is the next to hand out */
    int32_t *free_pos;   /* index of a page in free_stack, -1 when not free */
    int64_t n_free;
    int32_t lru_head, lru_tail;
    int64_t n_idle;

    xllm_u64map index; /* prefix index: chained block hash -> page */

    kv_seq *seqs;
    int64_t mappings, max_mappings;
    xllm_kv_stats st;
    char last_err[256];

    pthread_mutex_t mu;
    pthread_cond_t cv;
    pthread_t thread;
    bool thread_on, stop;

    /* prefix-cache events: appended by whoever changes the index (holding mu, then ev_mu), read
     * by any thread under ev_mu alone. Event s lives in slot s % ev_cap. */
    pthread_mutex_t ev_mu;
    uint64_t *ev_hash; /* [ev_cap] */
    uint8_t *ev_kind;  /* [ev_cap] xllm_kv_event_kind */
    int64_t ev_cap;
    uint64_t ev_last; /* seq of the newest event (the ring's random start before any) */
    int64_t ev_n;     /* events held: seqs (ev_last - ev_n, ev_last] */
};

/* ---------------------------------------------------------------------------------------- */
/* Prefix index                                                                              */
/* ---------------------------------------------------------------------------------------- */

/* Appends an event (caller holds mu). No allocation: the ring overwrites its oldest slot. */
static void ev_push(xllm_kv *kv, xllm_kv_event_kind kind, uint64_t h) {
    pthread_mutex_lock(&kv->ev_mu);
    uint64_t s = ++kv->ev_last;
    size_t slot = (size_t)(s % (uint64_t)kv->ev_cap);
    kv->ev_hash[slot] = h;
    kv->ev_kind[slot] = (uint8_t)kind;
    if (kv->ev_n < kv->ev_cap) kv->ev_n++;
    pthread_mutex_unlock(&kv->ev_mu);
}

/* Page p (holding the block with chained hash h) enters the index. Caller holds mu. */
static void index_add(xllm_kv *kv, uint64_t h, int32_t p) {
    xllm_u64map_put(&kv->index, h, p);
    kv->pg[p].cached = true;
    kv->pg[p].hash = h;
    ev_push(kv, XLLM_KV_EVENT_STORED, h);
}

/* Cached page p leaves the index (evicted, or about to be rewritten). Caller holds mu. */
static void index_drop(xllm_kv *kv, int32_t p) {
    xllm_u64map_del(&kv->index, kv->pg[p].hash);
    kv->pg[p].cached = false;
    ev_push(kv, XLLM_KV_EVENT_EVICTED, kv->pg[p].hash);
}

/* ---------------------------------------------------------------------------------------- */
/* Pages                                                                                     */
/* ---------------------------------------------------------------------------------------- */

static void lru_unlink(xllm_kv *kv, int32_t p) {
    page_info *g = &kv->pg[p];
    if (g->lru_prev >= 0)
        kv->pg[g->lru_prev].lru_next = g->lru_next;
    else
        kv->lru_head = g->lru_next;
    if (g->lru_next >= 0)
        kv->pg[g->lru_next].lru_prev = g->lru_prev;
    else
        kv->lru_tail = g->lru_prev;
    g->lru_prev = g->lru_next = -1;
    kv->n_idle--;
}

static void lru_push(xllm_kv *kv, int32_t p) {
    page_info *g = &kv->pg[p];
    g->lru_prev = kv->lru_tail;
    g->lru_next = -1;
    if (kv->lru_tail >= 0)
        kv->pg[kv->lru_tail].lru_next = p;
    else
        kv->lru_head = p;
    kv->lru_tail = p;
    kv->n_idle++;
}

static void free_push(xllm_kv *kv, int32_t p) {
    kv->free_pos[p] = (int32_t)kv->n_free;
    kv->free_stack[kv->n_free++] = p;
}

static void free_take(xllm_kv *kv, int32_t p) {
    int32_t at = kv->free_pos[p], last = kv->free_stack[--kv->n_free];
    kv->free_stack[at] = last;
    kv->free_pos[last] = at;
    kv->free_pos[p] = -1;
}

/* Takes a page for a new block: the hinted one if free (so mappings merge), else the next free
 * one, else the least recently used idle cached page (evicted). -1 when none. With evict false,
 * only free pages are taken. */
static int32_t page_alloc(xllm_kv *kv, int32_t hint, bool evict) {
    int32_t p = -1;
    if (hint >= 0 && hint < kv->n_pages && kv->free_pos[hint] >= 0)
        p = hint;
    else if (kv->n_free > 0)
        p = kv->free_stack[kv->n_free - 1];
    if (p >= 0) {
        free_take(kv, p);
    } else if (evict && kv->lru_head >= 0) {
        p = kv->lru_head;
        lru_unlink(kv, p);
        index_drop(kv, p);
        kv->st.evictions++;
    } else {
        return -1;
    }
    kv->pg[p].refs = 1;
    return p;
}

static void page_ref(xllm_kv *kv, int32_t p) {
    if (kv->pg[p].refs++ == 0) lru_unlink(kv, p); /* only cached pages can be idle */
}

static void page_unref(xllm_kv *kv, int32_t p) {
    XLLM_ASSERT(kv->pg[p].refs > 0);
    if (--kv->pg[p].refs > 0) return;
    if (kv->pg[p].cached)
        lru_push(kv, p);
    else
        free_push(kv, p);
}

static size_t pool_off(const xllm_kv *kv, int32_t region, int32_t page) {
    return ((size_t)region * (size_t)kv->n_pages + (size_t)page) * kv->slice_bytes;
}

/* ---------------------------------------------------------------------------------------- */
/* Mapping (xtensor)                                                                         */
/* ---------------------------------------------------------------------------------------- */

static uint8_t *region_addr(const xllm_kv *kv, const kv_seq *s, int32_t region, int32_t block) {
    return s->base + (size_t)region * kv->region_bytes + (size_t)block * kv->slice_bytes;
}

/* Maps page into block b of seq (b == s->n_blocks). */
static bool map_block(xllm_kv *kv, kv_seq *s, int32_t b, int32_t page) {
    bool extends = b > 0 && s->pages[b - 1] == page - 1;
    if (kv->p.layout == XLLM_KV_LAYOUT_XTENSOR) {
        if (!extends && kv->mappings + kv->n_regions > kv->max_mappings) {
            snprintf(kv->last_err, sizeof(kv->last_err),
                     "kv: %" PRId64 " memory mappings would exceed the budget of %" PRId64
                     " (vm.max_map_count); use larger --kv-block-tokens or less KV memory",
                     kv->mappings + kv->n_regions, kv->max_mappings);
            return false;
        }
        for (int32_t j = 0; j < kv->n_regions; j++) {
            void *want = region_addr(kv, s, j, b);
            void *got =
                mmap(want, kv->slice_bytes, PROT_READ | PROT_WRITE,
                     MAP_SHARED | MAP_FIXED | MAP_POPULATE, kv->fd, (off_t)pool_off(kv, j, page));
            if (got == MAP_FAILED) {
                snprintf(kv->last_err, sizeof(kv->last_err), "kv: mmap of a page failed: %s",
                         strerror(errno));
                /* restore the reservation of what was mapped */
                for (int32_t i = 0; i < j; i++)
                    mmap(region_addr(kv, s, i, b), kv->slice_bytes, PROT_NONE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0);
                return false;
            }
        }
    }
    s->pages[b] = page;
    if (!extends) {
        s->runs++;
        if (kv->p.layout == XLLM_KV_LAYOUT_XTENSOR) kv->mappings += kv->n_regions;
    }
    s->n_blocks = b + 1;
    return true;
}

/* Unmaps the last block of seq and releases its page. */
static void unmap_last(xllm_kv *kv, kv_seq *s) {
    int32_t b = s->n_blocks - 1, page = s->pages[b];
    if (kv->p.layout == XLLM_KV_LAYOUT_XTENSOR) {
        for (int32_t j = 0; j < kv->n_regions; j++)
            mmap(region_addr(kv, s, j, b), kv->slice_bytes, PROT_NONE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0);
    }
    if (!(b > 0 && s->pages[b - 1] == page - 1)) {
        s->runs--;
        if (kv->p.layout == XLLM_KV_LAYOUT_XTENSOR) kv->mappings -= kv->n_regions;
    }
    s->pages[b] = -1;
    s->n_blocks = b;
    page_unref(kv, page);
}

/* Gives seq blocks up to n_blocks; evict: may evict cached pages. Caller holds mu. */
static xllm_status grow_locked(xllm_kv *kv, kv_seq *s, int32_t n_blocks, bool evict) {
    while (s->n_blocks < n_blocks) {
        int32_t b = s->n_blocks;
        int32_t hint = b > 0 ? s->pages[b - 1] + 1 : -1;
        int32_t page = page_alloc(kv, hint, evict);
        if (page < 0) {
            snprintf(kv->last_err, sizeof(kv->last_err),
                     "kv: out of KV pages (%" PRId64 " pages of %d tokens, none free)", kv->n_pages,
                     kv->B);
            return XLLM_ERR_KV_FULL;
        }
        if (!map_block(kv, s, b, page)) {
            kv->pg[page].refs = 0;
            free_push(kv, page);
            return XLLM_ERR_KV_FULL;
        }
    }
    return XLLM_OK;
}

/* ---------------------------------------------------------------------------------------- */
/* Background pre-mapper                                                                     */
/* ---------------------------------------------------------------------------------------- */

/* Blocks a sequence should have mapped ahead of its length. */
static int32_t premap_target(const xllm_kv *kv, const kv_seq *s) {
    if (s->len == 0) return 0;
    int32_t need = (s->len + kv->B - 1) / kv->B;
    int32_t left = need * kv->B - s->len;
    if (left <= XLLM_MAX(1, kv->B / PREMAP_DIVISOR)) need++;
    return XLLM_MIN(need, kv->max_blocks);
}

/* Pre-faults the page tables of block b of seq (all regions) so that the engine's first writes
 * do not fault. Runs without the lock: if the block is unmapped meanwhile, madvise fails on the
 * reservation and nothing happens. */
static void prefault_block(const xllm_kv *kv, const kv_seq *s, int32_t b) {
#ifdef MADV_POPULATE_WRITE
    for (int32_t j = 0; j < kv->n_regions; j++)
        (void)madvise(region_addr(kv, s, j, b), kv->slice_bytes, MADV_POPULATE_WRITE);
#else
    (void)kv;
    (void)s;
    (void)b;
#endif
}

static void *premapper_main(void *arg) {
    xllm_kv *kv = arg;
    pthread_mutex_lock(&kv->mu);
    while (!kv->stop) {
        bool did = false;
        for (int32_t i = 0; i < kv->p.n_seq && !kv->stop; i++) {
            kv_seq *s = &kv->seqs[i];
            if (s->n_blocks >= premap_target(kv, s) || kv->n_free == 0) continue;
            /* one block at a time, so the engine thread gets the lock in between */
            int32_t b = s->n_blocks;
            int32_t page = page_alloc(kv, b > 0 ? s->pages[b - 1] + 1 : -1, false);
            if (page < 0) continue;
            if (!map_block(kv, s, b, page)) {
                kv->pg[page].refs = 0;
                free_push(kv, page);
                continue;
            }
            kv->st.bg_maps++;
            did = true;
            if (kv->p.layout == XLLM_KV_LAYOUT_XTENSOR) {
                pthread_mutex_unlock(&kv->mu);
                prefault_block(kv, s, b);
                pthread_mutex_lock(&kv->mu);
            }
        }
        if (!did) pthread_cond_wait(&kv->cv, &kv->mu);
    }
    pthread_mutex_unlock(&kv->mu);
    return NULL;
}

/* ---------------------------------------------------------------------------------------- */
/* Creation                                                                                  */
/* ---------------------------------------------------------------------------------------- */

static int64_t read_max_map_count(void) {
    FILE *f = fopen("/proc/sys/vm/max_map_count", "r");
    long long v = 65530;
    if (f) {
        if (fscanf(f, "%lld", &v) != 1) v = 65530;
        fclose(f);
    }
    return v;
}

static size_t gcd_sz(size_t a, size_t b) {
    while (b) {
        size_t t = a % b;
        a = b;
        b = t;
    }
    return a;
}

/* The sequence number before a ring's first event: random in [2^32, 2^32 + 2^47), so that a
 * cursor of another ring (another process, an earlier run) is almost surely outside this one's
 * window and gets a reset, and cursors stay below 2^53 (exact in any JSON reader). */
static uint64_t ring_start(void) {
    uint64_t r = 0;
    if (getrandom(&r, sizeof(r), 0) != (ssize_t)sizeof(r)) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        r = XXH3_64bits(&ts, sizeof(ts)) ^ (uint64_t)getpid();
    }
    return (1ull << 32) + (r & ((1ull << 47) - 1));
}

xllm_status xllm_kv_new(const xllm_kv_params *p, xllm_kv **out, char *err, size_t err_size) {
    *out = NULL;
    if (p->n_layer <= 0 || p->n_seq <= 0 || p->n_ctx <= 0 || p->row_elems <= 0 ||
        (p->type != XLLM_DTYPE_F32 && p->type != XLLM_DTYPE_F16) || p->block_tokens < 0 ||
        (p->layout != XLLM_KV_LAYOUT_XTENSOR && p->layout != XLLM_KV_LAYOUT_PAGED)) {
        xllm_set_err(err, err_size, "kv: invalid parameters (layers %d, seqs %d, ctx %d, type %d)",
                     p->n_layer, p->n_seq, p->n_ctx, (int)p->type);
        return XLLM_ERR_INVALID_ARG;
    }
    const size_t row_bytes = xllm_dtype_row_bytes(p->type, p->row_elems);
    const int32_t R = 2 * p->n_layer;
    /* the smallest block whose slice is a whole number of OS pages */
    const int32_t B0 = (int32_t)(OS_PAGE / gcd_sz(row_bytes, OS_PAGE));
    int64_t max_map = p->max_map_count > 0 ? p->max_map_count : read_max_map_count();
    int64_t budget = max_map - MAP_SLACK;
    if (budget < 4 * (int64_t)R) {
        xllm_set_err(err, err_size, "kv: vm.max_map_count %" PRId64 " is too small", max_map);
        return XLLM_ERR_UNSUPPORTED;
    }
    int32_t B;
    if (p->block_tokens > 0) {
        if (p->block_tokens % B0 != 0) {
            xllm_set_err(err, err_size,
                         "kv: block of %d tokens is not a whole number of 4 KiB pages per layer "
                         "(use a multiple of %d)",
                         p->block_tokens, B0);
            return XLLM_ERR_INVALID_ARG;
        }
        B = p->block_tokens;
    } else {
        B = B0;
        while (B < 16) B += B0;
    }
    int64_t n_pages;
    for (;;) {
        size_t page_bytes = (size_t)B * row_bytes * (size_t)R;
        int64_t per_seq = (p->n_ctx + B - 1) / B;
        n_pages = p->memory ? (int64_t)(p->memory / page_bytes) : per_seq * p->n_seq;
        /* a full pool, every page mapped once, must stay well under the limit */
        int64_t worst = (n_pages + p->n_seq) * R;
        if (p->block_tokens > 0 || worst <= budget / 2 || B >= p->n_ctx) break;
        B *= 2;
    }
    if (n_pages < 1) {
        xllm_set_err(err, err_size, "kv: %zu bytes hold no page of %zu bytes", p->memory,
                     (size_t)B * row_bytes * (size_t)R);
        return XLLM_ERR_INVALID_ARG;
    }
    if (n_pages > INT32_MAX / 2) n_pages = INT32_MAX / 2;

    xllm_kv *kv = xllm_xcalloc(1, sizeof(*kv));
    kv->p = *p;
    kv->fd = -1;
    kv->row_bytes = row_bytes;
    kv->B = B;
    kv->n_regions = R;
    kv->slice_bytes = (size_t)B * row_bytes;
    kv->page_bytes = kv->slice_bytes * (size_t)R;
    kv->max_blocks = (p->n_ctx + B - 1) / B;
    kv->region_bytes = (size_t)kv->max_blocks * kv->slice_bytes;
    kv->n_pages = n_pages;
    kv->max_mappings = budget;
    kv->lru_head = kv->lru_tail = -1;
    pthread_mutex_init(&kv->mu, NULL);
    pthread_cond_init(&kv->cv, NULL);
    pthread_mutex_init(&kv->ev_mu, NULL);
    kv->ev_cap = p->events > 0 ? p->events : EVENTS_DEFAULT;
    kv->ev_hash = xllm_xcalloc((size_t)kv->ev_cap, sizeof(uint64_t));
    kv->ev_kind = xllm_xcalloc((size_t)kv->ev_cap, 1);
    kv->ev_last = ring_start();

    size_t pool_bytes = kv->page_bytes * (size_t)n_pages;
    kv->fd = memfd_create("xllm-kv", MFD_CLOEXEC);
    if (kv->fd < 0 || ftruncate(kv->fd, (off_t)pool_bytes) != 0) {
        xllm_set_err(err, err_size, "kv: cannot create a %zu-byte page pool: %s", pool_bytes,
                     strerror(errno));
        xllm_kv_free(kv);
        return XLLM_ERR_NOMEM;
    }
    kv->pool = mmap(NULL, pool_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, kv->fd, 0);
    if (kv->pool == MAP_FAILED) {
        kv->pool = NULL;
        xllm_set_err(err, err_size, "kv: cannot map the page pool: %s", strerror(errno));
        xllm_kv_free(kv);
        return XLLM_ERR_NOMEM;
    }
    kv->mappings = 1;

    kv->pg = xllm_xcalloc((size_t)n_pages, sizeof(page_info));
    kv->free_stack = xllm_xcalloc((size_t)n_pages, sizeof(int32_t));
    kv->free_pos = xllm_xcalloc((size_t)n_pages, sizeof(int32_t));
    for (int64_t i = n_pages - 1; i >= 0; i--) { /* page 0 on top: handed out in order */
        kv->pg[i].lru_prev = kv->pg[i].lru_next = -1;
        free_push(kv, (int32_t)i);
    }
    xllm_u64map_init(&kv->index, (size_t)n_pages * 2);

    kv->seqs = xllm_xcalloc((size_t)p->n_seq, sizeof(kv_seq));
    for (int32_t i = 0; i < p->n_seq; i++) {
        kv_seq *s = &kv->seqs[i];
        s->pages = xllm_xmalloc((size_t)kv->max_blocks * sizeof(int32_t));
        for (int32_t b = 0; b < kv->max_blocks; b++) s->pages[b] = -1;
        s->hashes = xllm_xcalloc((size_t)kv->max_blocks, sizeof(uint64_t));
        s->tokens = xllm_xcalloc((size_t)p->n_ctx, sizeof(int32_t));
        if (p->layout == XLLM_KV_LAYOUT_XTENSOR) {
            size_t bytes = kv->region_bytes * (size_t)R;
            void *base =
                mmap(NULL, bytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
            if (base == MAP_FAILED) {
                xllm_set_err(err, err_size, "kv: cannot reserve %zu bytes of address space: %s",
                             bytes, strerror(errno));
                xllm_kv_free(kv);
                return XLLM_ERR_NOMEM;
            }
            s->base = base;
            kv->mappings++;
        }
    }
    if (p->layout == XLLM_KV_LAYOUT_XTENSOR && p->background) {
        if (pthread_create(&kv->thread, NULL, premapper_main, kv) == 0) kv->thread_on = true;
    }
    *out = kv;
    return XLLM_OK;
}

void xllm_kv_free(xllm_kv *kv) {
    if (!kv) return;
    if (kv->thread_on) {
        pthread_mutex_lock(&kv->mu);
        kv->stop = true;
        pthread_cond_signal(&kv->cv);
        pthread_mutex_unlock(&kv->mu);
        pthread_join(kv->thread, NULL);
    }
    if (kv->seqs) {
        for (int32_t i = 0; i < kv->p.n_seq; i++) {
            kv_seq *s = &kv->seqs[i];
            if (s->base) munmap(s->base, kv->region_bytes * (size_t)kv->n_regions);
            free(s->pages);
            free(s->hashes);
            free(s->tokens);
        }
        free(kv->seqs);
    }
    if (kv->pool) munmap(kv->pool, kv->page_bytes * (size_t)kv->n_pages);
    if (kv->fd >= 0) close(kv->fd);
    free(kv->pg);
    free(kv->free_stack);
    free(kv->free_pos);
    xllm_u64map_free(&kv->index);
    free(kv->ev_hash);
    free(kv->ev_kind);
    pthread_mutex_destroy(&kv->ev_mu);
    pthread_mutex_destroy(&kv->mu);
    pthread_cond_destroy(&kv->cv);
    free(kv);
}

/* ---------------------------------------------------------------------------------------- */
/* Sequences                                                                                 */
/* ---------------------------------------------------------------------------------------- */

static kv_seq *seq_of(const xllm_kv *kv, int32_t seq) {
    XLLM_ASSERT(seq >= 0 && seq < kv->p.n_seq);
    return &kv->seqs[seq];
}

int32_t xllm_kv_seq_len(const xllm_kv *kv, int32_t seq) {
    return seq_of(kv, seq)->len;
}

xllm_status xllm_kv_reserve(xllm_kv *kv, int32_t seq, int32_t n) {
    kv_seq *s = seq_of(kv, seq);
    kv->last_err[0] = 0;
    if (n > kv->p.n_ctx) {
        snprintf(kv->last_err, sizeof(kv->last_err), "kv: %d positions exceed the context of %d", n,
                 kv->p.n_ctx);
        return XLLM_ERR_KV_FULL;
    }
    int32_t need = (n + kv->B - 1) / kv->B;
    if (s->n_blocks >= need) return XLLM_OK;
    pthread_mutex_lock(&kv->mu);
    int32_t before = s->n_blocks;
    xllm_status st = grow_locked(kv, s, need, true);
    kv->st.sync_maps += (uint64_t)(s->n_blocks - before);
    pthread_mutex_unlock(&kv->mu);
    return st;
}

void xllm_kv_seq_set_tokens(xllm_kv *kv, int32_t seq, int32_t pos, const int32_t *tokens,
                            int32_t n) {
    kv_seq *s = seq_of(kv, seq);
    XLLM_ASSERT(pos >= 0 && n >= 0 && pos + n <= kv->p.n_ctx);
    memcpy(s->tokens + pos, tokens, (size_t)n * sizeof(int32_t));
}

uint64_t xllm_kv_block_hash(const int32_t *tokens, int32_t block_tokens, uint64_t parent) {
    return XXH3_64bits_withSeed(tokens, (size_t)block_tokens * sizeof(int32_t), parent);
}

static uint64_t block_hash(const xllm_kv *kv, const int32_t *tokens, uint64_t parent) {
    return xllm_kv_block_hash(tokens, kv->B, parent);
}

/* Copies the rows of block b into a fresh private page (the block was shared or cached and is
 * about to be written). Caller holds mu. */
static bool make_private(xllm_kv *kv, kv_seq *s, int32_t b) {
    int32_t old = s->pages[b];
    int32_t hint = b > 0 ? s->pages[b - 1] + 1 : -1;
    int32_t page = page_alloc(kv, hint, true);
    if (page < 0) return false;
    for (int32_t j = 0; j < kv->n_regions; j++)
        memcpy(kv->pool + pool_off(kv, j, page), kv->pool + pool_off(kv, j, old), kv->slice_bytes);
    /* swap the page in place: a MAP_FIXED mapping replaces the old one */
    if (kv->p.layout == XLLM_KV_LAYOUT_XTENSOR) {
        for (int32_t j = 0; j < kv->n_regions; j++) {
            void *got = mmap(region_addr(kv, s, j, b), kv->slice_bytes, PROT_READ | PROT_WRITE,
                             MAP_SHARED | MAP_FIXED, kv->fd, (off_t)pool_off(kv, j, page));
            XLLM_ASSERT(got != MAP_FAILED); /* replacing a mapping of the same size */
        }
    }
    /* the run structure may change around b: recount this sequence's runs */
    s->pages[b] = page;
    int32_t runs = 0;
    for (int32_t i = 0; i < s->n_blocks; i++)
        if (!(i > 0 && s->pages[i - 1] == s->pages[i] - 1)) runs++;
    if (kv->p.layout == XLLM_KV_LAYOUT_XTENSOR)
        kv->mappings += (int64_t)(runs - s->runs) * kv->n_regions;
    s->runs = runs;
    page_unref(kv, old);
    return true;
}

void xllm_kv_seq_set_len(xllm_kv *kv, int32_t seq, int32_t n) {
    kv_seq *s = seq_of(kv, seq);
    XLLM_ASSERT(n >= 0 && n <= s->n_blocks * kv->B);
    int32_t len = s->len;
    if (n >= len && n / kv->B == len / kv->B) {
        /* growing inside the last block (most decode steps): nothing shared changes, so no
         * lock; wake the pre-mapper only when the next page should now be mapped ahead */
        s->len = n;
        if (kv->thread_on && s->n_blocks < premap_target(kv, s)) {
            pthread_mutex_lock(&kv->mu);
            pthread_cond_signal(&kv->cv);
            pthread_mutex_unlock(&kv->mu);
        }
        return;
    }
    pthread_mutex_lock(&kv->mu);
    if (n < s->len) {
        /* drop whole blocks past n; a partly kept block that is shared or cached becomes
         * private before anyone writes into it again */
        int32_t keep = (n + kv->B - 1) / kv->B;
        while (s->n_blocks > keep) unmap_last(kv, s);
        s->n_hashed = XLLM_MIN(s->n_hashed, n / kv->B);
        if (n % kv->B != 0) {
            int32_t b = n / kv->B, page = s->pages[b];
            if (kv->pg[page].refs > 1) {
                if (!make_private(kv, s, b)) {
                    /* no page to copy into: drop the partial block too */
                    unmap_last(kv, s);
                    n = b * kv->B;
                }
            } else if (kv->pg[page].cached) {
                index_drop(kv, page);
            }
        }
        s->len = n;
    } else {
        s->len = n;
        /* full blocks enter the prefix cache */
        for (int32_t b = s->n_hashed; b < n / kv->B; b++) {
            uint64_t parent = b > 0 ? s->hashes[b - 1] : HASH_SEED;
            uint64_t h = block_hash(kv, s->tokens + (size_t)b * kv->B, parent);
            s->hashes[b] = h;
            int32_t page = s->pages[b];
            if (kv->p.prefix_cache && !kv->pg[page].cached && xllm_u64map_get(&kv->index, h) < 0)
                index_add(kv, h, page);
            s->n_hashed = b + 1;
        }
    }
    if (kv->thread_on) pthread_cond_signal(&kv->cv);
    pthread_mutex_unlock(&kv->mu);
}

int32_t xllm_kv_seq_reuse_prefix(xllm_kv *kv, int32_t seq, const int32_t *tokens, int32_t n) {
    kv_seq *s = seq_of(kv, seq);
    if (!kv->p.prefix_cache || n <= 0 || s->len != 0) return 0;
    pthread_mutex_lock(&kv->mu);
    while (s->n_blocks > 0) unmap_last(kv, s); /* pre-mapped pages of an empty sequence */
    int32_t max_b = XLLM_MIN((n - 1) / kv->B, kv->max_blocks);
    uint64_t parent = HASH_SEED;
    int32_t b = 0;
    for (; b < max_b; b++) {
        uint64_t h = block_hash(kv, tokens + (size_t)b * kv->B, parent);
        int32_t page = xllm_u64map_get(&kv->index, h);
        if (page < 0) break;
        page_ref(kv, page);
        if (!map_block(kv, s, b, page)) {
            page_unref(kv, page);
            break;
        }
        s->hashes[b] = h;
        parent = h;
    }
    int32_t hit = b * kv->B;
    memcpy(s->tokens, tokens, (size_t)hit * sizeof(int32_t));
    s->n_hashed = b;
    s->len = hit;
    kv->st.prefix_hit_tokens += (uint64_t)hit;
    kv->st.prefix_query_tokens += (uint64_t)n;
    if (kv->thread_on) pthread_cond_signal(&kv->cv);
    pthread_mutex_unlock(&kv->mu);
    return hit;
}

void xllm_kv_seq_free(xllm_kv *kv, int32_t seq) {
    kv_seq *s = seq_of(kv, seq);
    pthread_mutex_lock(&kv->mu);
    while (s->n_blocks > 0) unmap_last(kv, s);
    s->len = 0;
    s->n_hashed = 0;
    pthread_mutex_unlock(&kv->mu);
}

/* ---------------------------------------------------------------------------------------- */
/* Access                                                                                    */
/* ---------------------------------------------------------------------------------------- */

static uint8_t *row_ptr(xllm_kv *kv, int32_t region, int32_t seq, int32_t pos) {
    kv_seq *s = seq_of(kv, seq);
    XLLM_ASSERT(pos >= 0 && pos < s->n_blocks * kv->B);
    if (kv->p.layout == XLLM_KV_LAYOUT_XTENSOR)
        return s->base + (size_t)region * kv->region_bytes + (size_t)pos * kv->row_bytes;
    int32_t b = pos / kv->B;
    return kv->pool + pool_off(kv, region, s->pages[b]) + (size_t)(pos % kv->B) * kv->row_bytes;
}

void *xllm_kv_row_k(xllm_kv *kv, int32_t il, int32_t seq, int32_t pos) {
    return row_ptr(kv, 2 * il, seq, pos);
}

void *xllm_kv_row_v(xllm_kv *kv, int32_t il, int32_t seq, int32_t pos) {
    return row_ptr(kv, 2 * il + 1, seq, pos);
}

int32_t xllm_kv_spans(xllm_kv *kv, int32_t il, int32_t seq, int32_t n_pos, xllm_kv_span *spans,
                      int32_t max) {
    kv_seq *s = seq_of(kv, seq);
    XLLM_ASSERT(n_pos <= s->n_blocks * kv->B);
    if (n_pos <= 0 || max <= 0) return 0;
    if (kv->p.layout == XLLM_KV_LAYOUT_XTENSOR) {
        spans[0].k = s->base + (size_t)(2 * il) * kv->region_bytes;
        spans[0].v = s->base + (size_t)(2 * il + 1) * kv->region_bytes;
        spans[0].pos0 = 0;
        spans[0].n = n_pos;
        return 1;
    }
    int32_t n = 0;
    for (int32_t p0 = 0; p0 < n_pos && n < max; p0 += kv->B, n++) {
        int32_t page = s->pages[p0 / kv->B];
        spans[n].k = kv->pool + pool_off(kv, 2 * il, page);
        spans[n].v = kv->pool + pool_off(kv, 2 * il + 1, page);
        spans[n].pos0 = p0;
        spans[n].n = XLLM_MIN(kv->B, n_pos - p0);
    }
    return n;
}

int32_t xllm_kv_max_spans(const xllm_kv *kv) {
    return kv->p.layout == XLLM_KV_LAYOUT_XTENSOR ? 1 : kv->max_blocks;
}

size_t xllm_kv_row_bytes(const xllm_kv *kv) {
    return kv->row_bytes;
}

xllm_dtype xllm_kv_type(const xllm_kv *kv) {
    return kv->p.type;
}

xllm_kv_layout xllm_kv_get_layout(const xllm_kv *kv) {
    return kv->p.layout;
}

int32_t xllm_kv_block_tokens(const xllm_kv *kv) {
    return kv->B;
}

/* ---------------------------------------------------------------------------------------- */
/* Accounting                                                                                */
/* ---------------------------------------------------------------------------------------- */

void xllm_kv_get_stats(xllm_kv *kv, xllm_kv_stats *st) {
    pthread_mutex_lock(&kv->mu);
    *st = kv->st;
    st->n_pages = kv->n_pages;
    st->free_pages = kv->n_free;
    st->cached_pages = kv->n_idle;
    st->used_pages = kv->n_pages - kv->n_free - kv->n_idle;
    st->page_bytes = kv->page_bytes;
    st->block_tokens = kv->B;
    st->mappings = kv->mappings;
    st->max_mappings = kv->max_mappings;
    pthread_mutex_unlock(&kv->mu);
}

int64_t xllm_kv_seq_pages(const xllm_kv *kv, int32_t seq) {
    return seq_of(kv, seq)->n_blocks;
}

int64_t xllm_kv_pages_needed(const xllm_kv *kv, int32_t seq, int32_t n) {
    const kv_seq *s = seq_of(kv, seq);
    int32_t need = (XLLM_MIN(n, kv->p.n_ctx) + kv->B - 1) / kv->B;
    return need > s->n_blocks ? need - s->n_blocks : 0;
}

int64_t xllm_kv_pages_available(xllm_kv *kv) {
    pthread_mutex_lock(&kv->mu);
    int64_t n = kv->n_free + kv->n_idle;
    pthread_mutex_unlock(&kv->mu);
    return n;
}

size_t xllm_kv_waste_bytes(const xllm_kv *kv) {
    size_t waste = 0;
    for (int32_t i = 0; i < kv->p.n_seq; i++) {
        const kv_seq *s = &kv->seqs[i];
        size_t held = (size_t)s->n_blocks * kv->B, used = (size_t)s->len;
        if (held > used) waste += (held - used) * kv->row_bytes * (size_t)kv->n_regions;
    }
    return waste;
}

const char *xllm_kv_last_error(const xllm_kv *kv) {
    return kv->last_err;
}

/* ---------------------------------------------------------------------------------------- */
/* Prefix-cache events                                                                       */
/* ---------------------------------------------------------------------------------------- */

/* The whole index as STORED entries at the current cursor. Takes mu (which every append
 * holds), so no event can fall between the set and its cursor. */
static void events_snapshot(xllm_kv *kv, xllm_kv_events *out) {
    /* allocated before locking: a cached block holds a page, so n_pages bounds the set */
    xllm_kv_event *ev = xllm_xmalloc((size_t)kv->n_pages * sizeof(*ev));
    int32_t n = 0;
    pthread_mutex_lock(&kv->mu);
    pthread_mutex_lock(&kv->ev_mu);
    const uint64_t at = kv->ev_last;
    pthread_mutex_unlock(&kv->ev_mu);
    for (size_t i = 0; i < kv->index.cap; i++) {
        if (kv->index.vals[i] < 0) continue;
        XLLM_ASSERT(n < kv->n_pages);
        ev[n++] =
            (xllm_kv_event){.seq = at, .hash = kv->index.keys[i], .kind = XLLM_KV_EVENT_STORED};
    }
    pthread_mutex_unlock(&kv->mu);
    out->next = at;
    out->reset = true;
    out->n = n;
    out->ev = ev;
}

xllm_status xllm_kv_events_read(xllm_kv *kv, uint64_t since, int32_t max, xllm_kv_events *out) {
    memset(out, 0, sizeof(*out));
    if (max <= 0) return XLLM_ERR_INVALID_ARG;
    int32_t room = (int32_t)XLLM_MIN((int64_t)max, kv->ev_cap);
    xllm_kv_event *ev = xllm_xmalloc((size_t)room * sizeof(*ev)); /* outside the lock */
    pthread_mutex_lock(&kv->ev_mu);
    const uint64_t last = kv->ev_last;
    if (since > last || last - since > (uint64_t)kv->ev_n) {
        /* overwritten, ahead, or another ring's cursor */
        pthread_mutex_unlock(&kv->ev_mu);
        free(ev);
        events_snapshot(kv, out);
        return XLLM_OK;
    }
    int32_t n = (int32_t)XLLM_MIN(last - since, (uint64_t)room);
    for (int32_t i = 0; i < n; i++) {
        uint64_t s = since + 1 + (uint64_t)i;
        size_t slot = (size_t)(s % (uint64_t)kv->ev_cap);
        ev[i] = (xllm_kv_event){
            .seq = s, .hash = kv->ev_hash[slot], .kind = (xllm_kv_event_kind)kv->ev_kind[slot]};
    }
    pthread_mutex_unlock(&kv->ev_mu);
    out->next = since + (uint64_t)n;
    out->more = out->next < last;
    out->n = n;
    out->ev = ev;
    return XLLM_OK;
}

void xllm_kv_events_net(xllm_kv_events *ev) {
    if (ev->reset || ev->n < 2) return;
    xllm_u64map last; /* hash -> index of its last event */
    xllm_u64map_init(&last, 2 * (size_t)ev->n + 2);
    for (int32_t i = 0; i < ev->n; i++) xllm_u64map_put(&last, ev->ev[i].hash, i);
    int32_t n = 0;
    for (int32_t i = 0; i < ev->n; i++)
        if (xllm_u64map_get(&last, ev->ev[i].hash) == i) ev->ev[n++] = ev->ev[i];
    ev->n = n;
    xllm_u64map_free(&last);
}

void xllm_kv_events_free(xllm_kv_events *ev) {
    if (!ev) return;
    free(ev->ev);
    ev->ev = NULL;
    ev->n = 0;
}

/* ---------------------------------------------------------------------------------------- */
/* Invariant checker                                                                         */
/* ---------------------------------------------------------------------------------------- */

#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            xllm_set_err(err, err_size, __VA_ARGS__);                                              \
            ok = false;                                                                            \
            goto out;                                                                              \
        }                                                                                          \
    } while (0)

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

bool xllm_kv_check_cached(xllm_kv *kv, const uint64_t *hashes, int64_t n, char *err,
                          size_t err_size) {
    uint64_t *want = xllm_xmalloc((size_t)(n + 1) * sizeof(uint64_t));
    uint64_t *have = xllm_xmalloc((size_t)(kv->n_pages + 1) * sizeof(uint64_t));
    memcpy(want, hashes, (size_t)n * sizeof(uint64_t));
    int64_t m = 0;
    pthread_mutex_lock(&kv->mu);
    for (int32_t p = 0; p < kv->n_pages; p++)
        if (kv->pg[p].cached) have[m++] = kv->pg[p].hash;
    pthread_mutex_unlock(&kv->mu);
    qsort(want, (size_t)n, sizeof(uint64_t), cmp_u64);
    qsort(have, (size_t)m, sizeof(uint64_t), cmp_u64);
    bool ok = n == m;
    int64_t i = 0;
    while (ok && i < n && want[i] == have[i]) i++;
    ok = ok && i == n;
    if (!ok) {
        if (n != m)
            xllm_set_err(err, err_size, "cached set: %" PRId64 " hashes given, %" PRId64 " cached",
                         n, m);
        else
            xllm_set_err(err, err_size, "cached set: %016" PRIx64 " given, %016" PRIx64 " cached",
                         want[i], have[i]);
    }
    free(want);
    free(have);
    return ok;
}

bool xllm_kv_check(xllm_kv *kv, char *err, size_t err_size) {
    bool ok = true;
    int32_t *refs = xllm_xcalloc((size_t)kv->n_pages, sizeof(int32_t));
    pthread_mutex_lock(&kv->mu);
    int64_t maps = 1 + (kv->p.layout == XLLM_KV_LAYOUT_XTENSOR ? kv->p.n_seq : 0);
    for (int32_t i = 0; i < kv->p.n_seq; i++) {
        kv_seq *s = &kv->seqs[i];
        CHECK(s->len >= 0 && s->len <= s->n_blocks * kv->B, "seq %d: len %d beyond %d blocks", i,
              s->len, s->n_blocks);
        CHECK(s->n_blocks <= kv->max_blocks, "seq %d: %d blocks > max", i, s->n_blocks);
        CHECK(s->n_hashed <= s->len / kv->B, "seq %d: %d hashed blocks, len %d", i, s->n_hashed,
              s->len);
        int32_t runs = 0;
        uint64_t parent = HASH_SEED;
        for (int32_t b = 0; b < s->n_blocks; b++) {
            int32_t p = s->pages[b];
            CHECK(p >= 0 && p < kv->n_pages, "seq %d block %d: page %d", i, b, p);
            refs[p]++;
            if (!(b > 0 && s->pages[b - 1] == p - 1)) runs++;
            if (b < s->n_hashed) {
                uint64_t h = block_hash(kv, s->tokens + (size_t)b * kv->B, parent);
                CHECK(h == s->hashes[b], "seq %d block %d: stale hash", i, b);
                parent = h;
                if (kv->pg[p].cached)
                    CHECK(kv->pg[p].hash == h, "seq %d block %d: page %d cached under another hash",
                          i, b, p);
            }
            if (kv->p.layout == XLLM_KV_LAYOUT_XTENSOR) {
                /* the region shows the page: compare first and last byte of each slice */
                for (int32_t j = 0; j < kv->n_regions; j += XLLM_MAX(1, kv->n_regions - 1)) {
                    const uint8_t *a = region_addr(kv, s, j, b), *c = kv->pool + pool_off(kv, j, p);
                    CHECK(a[0] == c[0] && a[kv->slice_bytes - 1] == c[kv->slice_bytes - 1],
                          "seq %d block %d region %d: mapping does not show page %d", i, b, j, p);
                }
            }
        }
        for (int32_t b = s->n_blocks; b < kv->max_blocks; b++)
            CHECK(s->pages[b] == -1, "seq %d block %d: stale page", i, b);
        CHECK(runs == s->runs, "seq %d: %d runs counted, %d recorded", i, runs, s->runs);
        if (kv->p.layout == XLLM_KV_LAYOUT_XTENSOR) maps += (int64_t)runs * kv->n_regions;
    }
    CHECK(maps == kv->mappings, "mappings: %" PRId64 " counted, %" PRId64 " recorded", maps,
          kv->mappings);
    int64_t n_free = 0, n_idle = 0, n_cached = 0;
    for (int32_t p = 0; p < kv->n_pages; p++) {
        page_info *g = &kv->pg[p];
        CHECK(g->refs == refs[p], "page %d: refs %d, %d holders", p, g->refs, refs[p]);
        bool is_free = kv->free_pos[p] >= 0;
        if (is_free) {
            n_free++;
            CHECK(kv->free_stack[kv->free_pos[p]] == p, "page %d: free index broken", p);
            CHECK(g->refs == 0 && !g->cached, "page %d: free but held or cached", p);
        } else {
            CHECK(g->refs > 0 || g->cached, "page %d: neither free, held nor cached (leaked)", p);
        }
        if (g->cached) {
            n_cached++;
            CHECK(xllm_u64map_get(&kv->index, g->hash) == p, "page %d: cached but not in the index",
                  p);
        }
        if (g->cached && g->refs == 0) n_idle++;
    }
    CHECK(n_free == kv->n_free, "free pages: %" PRId64 " found, %" PRId64 " counted", n_free,
          kv->n_free);
    CHECK(n_idle == kv->n_idle, "idle cached pages: %" PRId64 " found, %" PRId64 " counted", n_idle,
          kv->n_idle);
    int64_t walked = 0;
    for (int32_t p = kv->lru_head, prev = -1; p >= 0; prev = p, p = kv->pg[p].lru_next) {
        CHECK(kv->pg[p].lru_prev == prev, "lru: broken back link at page %d", p);
        CHECK(kv->pg[p].cached && kv->pg[p].refs == 0, "lru: page %d is not idle cached", p);
        CHECK(++walked <= kv->n_pages, "lru: cycle");
    }
    CHECK(walked == n_idle, "lru: %" PRId64 " pages listed, %" PRId64 " idle", walked, n_idle);
    int64_t entries = 0;
    for (size_t i = 0; i < kv->index.cap; i++) {
        if (kv->index.vals[i] < 0) continue;
        entries++;
        int32_t p = kv->index.vals[i];
        CHECK(p < kv->n_pages && kv->pg[p].cached && kv->pg[p].hash == kv->index.keys[i],
              "index: slot %zu points to page %d that is not cached under its key", i, p);
    }
    CHECK(entries == n_cached && (size_t)entries == kv->index.n,
          "index: %" PRId64 " entries (%zu counted), %" PRId64 " cached pages", entries,
          kv->index.n, n_cached);
    /* appends hold mu too, so the ring is still here */
    CHECK(kv->ev_n >= 0 && kv->ev_n <= kv->ev_cap, "events: %" PRId64 " held in a ring of %" PRId64,
          kv->ev_n, kv->ev_cap);
out:
    pthread_mutex_unlock(&kv->mu);
    free(refs);
    return ok;
}
