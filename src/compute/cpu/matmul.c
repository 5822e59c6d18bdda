/* The matmul driver: picks a path per weight type and batch size (direct GEMV for a few
 * tokens, packed weight-stationary GEMM for more), makes the input's 8-bit / bf16 forms once
 * per input, and splits rows (or 16-row panels) across the thread pool. */
#include <stdatomic.h>
#include <string.h>
#include <sys/mman.h>

#include "compute/cpu/kernels.h"
#include "compute/dtype.h"
#include "util/common.h"

enum {
    FORM_Q32 = 1,     /* 8-bit, 32-element blocks, with g for groups of 32 */
    FORM_Q256 = 2,    /* 8-bit, 256-element blocks */
    FORM_G256_32 = 4, /* g of the 256 form for groups of 32 */
    FORM_G256_16 = 8, /* ... and for groups of 16 */
    FORM_BF16 = 16,
};

typedef struct mm_thread {
    uint8_t *stage; /* (16, Kp) bytes */
    uint8_t *pq;    /* 2 x (Kp / 4, 16, 4) panel values */
    float *ps, *pm; /* 2 x (Kp / 16 + 1, 16) panel scales / offsets */
    float *pf;      /* 2 x (Kp, 16) float panels; also bf16 panels (K / 2, 16, 2) */
    float *row;     /* (K) one dequantized row (portable paths) */
} mm_thread;

/* A thread's share of a parallel region's units: [front, back) packed in one word, front in
 * the low half. The owner takes units from the front; a thread done with its own share takes
 * them from the back of another's. One cache line each. */
typedef struct mm_share {
    _Alignas(64) atomic_uint_fast64_t fb;
} mm_share;

struct xllm_mm {
    xllm_threadpool *tp;
    const xllm_cpu_kernels *k;
    int64_t max_T, max_cols;
    int n_threads;
    mm_thread *th;
    mm_share *share; /* (n_threads) */
    /* the current input */
    const float *x;
    int64_t x_stride, T, n;
    unsigned forms;
    xllm_q8act q32, q256, q256_16; /* q256_16 shares q/d/s16 with q256, its own g */
    uint16_t *xb;                  /* (max_T, max_cols) bf16 form */
    const xllm_mm_packs *packs;    /* weights packed ahead of time (xllm_mm_use_packs), or NULL */
};

/* One matrix in panel form, groups interleaved (xllm_qpanel): panel i (16 rows) at
 * q + i * qstride; within it group g at g * gb: 16 * G q bytes, 16 scales, and for asymmetric
 * types (sym == 0) 16 offsets. */
typedef struct prepacked {
    const void *data; /* the matrix's data pointer (key); NULL = free slot */
    xllm_dtype type;
    int64_t n_rows, n_cols;
    uint8_t *q;
    size_t qstride, alloc;
    int64_t gb; /* bytes per group */
    int G, sym;
    bool h16;        /* groups in pairs with f16 scales (xllm_qpanel.h16) */
    bool bf16;       /* BF16 weights: q holds pack_bf16 panels (K / 2, 16, 2), qstride apart */
    bool dense_gone; /* the dense rows were released: every reader uses the panels */
    bool decode;     /* one-token decode reads the panels (they are no bigger than 9/8 of the
                        dense rows: 8-bit types) */
    uint8_t *dq;     /* decode panels of the sub-8-bit types (xllm_pack_dpanel), or NULL; without
                        8-bit panels (q NULL: low memory) the GEMM reads them too */
    size_t dq_stride, dq_alloc;
} prepacked;

/* Panel pi of a packed matrix as the kernels see it. */
static xllm_qpanel prepacked_panel(const prepacked *e, int64_t pi) {
    uint8_t *q = e->q + (size_t)pi * e->qstride;
    float *s = e->h16 ? NULL : (float *)(q + 16 * e->G);
    return (xllm_qpanel){.q = q,
                         .s = s,
                         .m = e->sym || e->h16 ? NULL : s + 16,
                         .G = e->G,
                         .sym = e->sym,
                         .qgs = e->gb,
                         .sgs = e->gb / (int64_t)sizeof(float),
                         .h16 = e->h16};
}

/* Panel pi of a matrix packed in bf16 pairs (prepacked.bf16). */
static const uint16_t *prepacked_bf16(const prepacked *e, int64_t pi) {
    return (const uint16_t *)(e->q + (size_t)pi * e->qstride);
}

/* Memory of the packs: chunks of whole 2 MiB pages (xllm_map_huge), the panels bumped in one
 * after the other. Every byte a product reads then lies in a huge page, whatever a matrix's
 * size. In 4 KiB pages a plain read runs ~15-35% slower here (one thread 20-23 GB/s against
 * 27-31, two 26-28 against 31-52, runs alternating), and a matrix in a mapping of its own had
 * its tail (all of it below 2 MiB: K / V of small models) in such pages: one-token products
 * on one thread streamed 22.9 GB/s against 27.5 now (Q8_0 3072 x 1024 matrices). */
typedef struct pack_chunk {
    uint8_t *base;
    size_t size, used;
} pack_chunk;

#define PACK_CHUNK ((size_t)256 << 20)

/* Open-addressing table of packed matrices keyed by the data pointer. */
struct xllm_mm_packs {
    prepacked *pre;
    int64_t cap, n;
    pack_chunk *chunks;
    int n_chunks;
};

/* n bytes of pack memory, 64-byte aligned, or NULL. A request the last chunk has no room
 * for opens a new one (the old one's untouched pages cost nothing). */
static void *packs_alloc(xllm_mm_packs *pk, size_t n) {
    const size_t H = (size_t)2 << 20;
    n = (n + 63) & ~(size_t)63;
    pack_chunk *c = pk->n_chunks ? &pk->chunks[pk->n_chunks - 1] : NULL;
    if (!c || c->size - c->used < n) {
        const size_t size = n > PACK_CHUNK ? (n + H - 1) / H * H : PACK_CHUNK;
        uint8_t *b = xllm_map_huge(size);
        if (!b) return NULL;
        pk->chunks = xllm_xrealloc(pk->chunks, (size_t)(pk->n_chunks + 1) * sizeof(pack_chunk));
        c = &pk->chunks[pk->n_chunks++];
        *c = (pack_chunk){.base = b, .size = size};
    }
    void *p = c->base + c->used;
    c->used += n;
    return p;
}

static prepacked *find_prepacked(const xllm_mm_packs *pk, const xllm_mat *w) {
    if (!pk || !pk->cap) return NULL;
    size_t h = ((uintptr_t)w->data >> 6) % (size_t)pk->cap;
    for (;;) {
        prepacked *e = &pk->pre[h];
        if (!e->data) return NULL;
        if (e->data == w->data && e->n_rows == w->n_rows && e->n_cols == w->n_cols) return e;
        h = (h + 1) % (size_t)pk->cap;
    }
}

/* Row r of a packed matrix as floats (n_cols): s * (q - sym) for symmetric types, exactly the
 * reference dequantization; s * q + m otherwise. */
static void panel_row(const prepacked *e, int64_t r, float *out) {
    const int rr = (int)(r % XLLM_PANEL);
    if (!e->q) {
        xllm_dpanel_row(e->type, e->dq + (size_t)(r / XLLM_PANEL) * e->dq_stride, e->n_cols, rr,
                        out);
        return;
    }
    if (e->bf16) {
        const uint16_t *p = prepacked_bf16(e, r / XLLM_PANEL);
        for (int64_t k = 0; k < e->n_cols; k++)
            out[k] = xllm_bf16_to_fp32(p[(k / 2) * 32 + rr * 2 + (k & 1)]);
        return;
    }
    const xllm_qpanel p = prepacked_panel(e, r / XLLM_PANEL);
    for (int64_t k = 0; k < e->n_cols; k++) {
        const int64_t g = k / e->G, e4 = (k % e->G) / 4;
        const int v = xllm_qpanel_q(&p, g, p.qgs)[e4 * 4 * XLLM_PANEL + rr * 4 + k % 4];
        const float sc =
            p.h16 ? xllm_fp16_to_fp32(xllm_qpanel_sh(&p, g, p.qgs)[rr]) : p.s[g * p.sgs + rr];
        out[k] = p.m ? sc * (float)v + p.m[g * p.sgs + rr] : sc * (float)(v - e->sym);
    }
}

static void *zalloc(size_t n) {
    return xllm_xcalloc(n ? n : 1, 1);
}

xllm_mm *xllm_mm_new(xllm_threadpool *tp, xllm_cpu_level level, int64_t max_T, int64_t max_cols) {
    xllm_mm *mm = xllm_xcalloc(1, sizeof(*mm));
    mm->tp = tp;
    mm->k = xllm_cpu_kernels_get(level);
    mm->max_T = max_T;
    mm->max_cols = max_cols;
    mm->n_threads = xllm_threadpool_n_threads(tp);
    const size_t K = (size_t)max_cols, Kp = (K + 63) / 64 * 64, T = (size_t)max_T;
    mm->th = xllm_xcalloc((size_t)mm->n_threads, sizeof(mm_thread));
    mm->share = aligned_alloc(64, (size_t)mm->n_threads * sizeof(mm_share));
    XLLM_ASSERT(mm->share); /* (small: the policy for small allocations) */
    for (int i = 0; i < mm->n_threads; i++) atomic_init(&mm->share[i].fb, 0);
    for (int i = 0; i < mm->n_threads; i++) {
        mm_thread *t = &mm->th[i];
        t->stage = zalloc(16 * Kp);
        t->pq = zalloc(2 * 16 * Kp);
        t->ps = zalloc(2 * (Kp / 16 + 1) * 16 * sizeof(float));
        t->pm = zalloc(2 * (Kp / 16 + 1) * 16 * sizeof(float));
        t->pf = zalloc(2 * 16 * Kp * sizeof(float));
        t->row = zalloc(Kp * sizeof(float));
    }
    xllm_q8act *fs[2] = {&mm->q32, &mm->q256};
    for (int i = 0; i < 2; i++) {
        fs[i]->q = zalloc(T * Kp);
        fs[i]->d = zalloc(T * (Kp / 32 + 1) * sizeof(float));
        fs[i]->s16 = zalloc(T * (Kp / 16 + 1) * sizeof(int16_t));
        fs[i]->g = zalloc(T * (Kp / 16 + 1) * 2 * sizeof(float));
    }
    mm->q32.B = 32;
    mm->q32.G = 32;
    mm->q256.B = 256;
    mm->q256.G = 32;
    mm->q256_16 = mm->q256;
    mm->q256_16.g = zalloc(T * (Kp / 16 + 1) * 2 * sizeof(float));
    mm->q256_16.G = 16;
    mm->xb = zalloc(T * Kp * sizeof(uint16_t));
    return mm;
}

void xllm_mm_free(xllm_mm *mm) {
    if (!mm) return;
    for (int i = 0; i < mm->n_threads; i++) {
        mm_thread *t = &mm->th[i];
        free(t->stage);
        free(t->pq);
        free(t->ps);
        free(t->pm);
        free(t->pf);
        free(t->row);
    }
    free(mm->th);
    free(mm->share);
    xllm_q8act *fs[2] = {&mm->q32, &mm->q256};
    for (int i = 0; i < 2; i++) {
        free(fs[i]->q);
        free(fs[i]->d);
        free(fs[i]->s16);
        free(fs[i]->g);
    }
    free(mm->q256_16.g);
    free(mm->xb);
    free(mm);
}

const xllm_cpu_kernels *xllm_mm_kernels(const xllm_mm *mm) {
    return mm->k;
}

xllm_cpu_level xllm_mm_level(const xllm_mm *mm) {
    return mm->k->level;
}

void xllm_mm_input(xllm_mm *mm, const float *x, int64_t x_stride, int64_t T, int64_t n) {
    XLLM_ASSERT(T >= 0 && T <= mm->max_T && n <= mm->max_cols);
    mm->x = x;
    mm->x_stride = x_stride;
    mm->T = T;
    mm->n = n;
    mm->forms = 0;
}

/* ---- input forms ------------------------------------------------------------------------ */

typedef struct form_task {
    xllm_mm *mm;
    unsigned want;
} form_task;

/* g for tokens [lo, hi): per group of G, (d of its block, d * sum of its q). */
static void make_g(const xllm_q8act *a, xllm_q8act *out, int64_t n, int64_t lo, int64_t hi) {
    const int64_t ng = n / out->G, nb = n / a->B, n16 = n / 16;
    for (int64_t t = lo; t < hi; t++)
        for (int64_t g = 0; g < ng; g++) {
            const float d = a->d[t * nb + (g * out->G) / a->B];
            int sum = 0;
            for (int i = 0; i < out->G / 16; i++) sum += a->s16[t * n16 + g * (out->G / 16) + i];
            out->g[(t * ng + g) * 2] = d;
            out->g[(t * ng + g) * 2 + 1] = d * (float)sum;
        }
}

static void form_worker(void *arg, int ith, int nth) {
    const form_task *f = arg;
    xllm_mm *mm = f->mm;
    const int64_t n = mm->n;
    int64_t lo, hi;
    xllm_split_range(mm->T, ith, nth, &lo, &hi);
    for (int64_t t = lo; t < hi; t++) {
        const float *x = mm->x + t * mm->x_stride;
        if (f->want & FORM_Q32)
            mm->k->quant_row(x, n, 32, mm->q32.q + t * n, mm->q32.d + t * (n / 32),
                             mm->q32.s16 + t * (n / 16));
        if (f->want & FORM_Q256)
            mm->k->quant_row(x, n, 256, mm->q256.q + t * n, mm->q256.d + t * (n / 256),
                             mm->q256.s16 + t * (n / 16));
        if (f->want & FORM_BF16) mm->k->to_bf16(x, mm->xb + t * n, n);
    }
    if (f->want & FORM_Q32) make_g(&mm->q32, &mm->q32, n, lo, hi);
    if (f->want & FORM_G256_32) make_g(&mm->q256, &mm->q256, n, lo, hi);
    if (f->want & FORM_G256_16) make_g(&mm->q256, &mm->q256_16, n, lo, hi);
}

static void ensure_forms(xllm_mm *mm, unsigned want) {
    if (want & (FORM_G256_32 | FORM_G256_16)) want |= FORM_Q256;
    if ((mm->forms & FORM_Q256) && (want & FORM_Q256)) want &= ~(unsigned)FORM_Q256;
    want &= ~mm->forms;
    if (!want) return;
    form_task f = {mm, want};
    /* Up to 64K elements (16 tokens of 4096: batched decode) the main thread quantizes alone
     * (~5 us per 16 x 1024): cheaper than a barrier, which on a loaded host costs a wake-up
     * of the worker (measured: 4 of the 9 parallel regions of a layer at batch 16, each 1 ms
     * on average, mostly the worker's wake-up). */
    if (mm->T * mm->n <= 16 * 4096)
        form_worker(&f, 0, 1);
    else
        xllm_threadpool_run(mm->tp, form_worker, &f);
    mm->forms |= want;
}

/* The 8-bit form (with g for groups of G) a quantized type reads. */
static const xllm_q8act *q_form(xllm_mm *mm, xllm_dtype t, bool need_g16) {
    if (xllm_act_block(t) == 32) {
        ensure_forms(mm, FORM_Q32);
        return &mm->q32;
    }
    if (need_g16) {
        ensure_forms(mm, FORM_G256_16);
        return &mm->q256_16;
    }
    ensure_forms(mm, FORM_G256_32);
    return &mm->q256;
}

/* ---- paths ------------------------------------------------------------------------------ */

typedef enum path {
    PATH_SCALAR,
    PATH_GEMV,
    PATH_GEMV_BF16,
    PATH_GEMV_BF16P,
    PATH_GEMV_DP,
    PATH_GEMM_DP,
    PATH_GEMM_Q,
    PATH_GEMM_BF16,
    PATH_GEMM_F
} path;

/* One matrix of a run: its path and how its rows are cut into work units. */
typedef struct mm_job {
    const xllm_mat *w;
    const xllm_q8act *a;
    float *y;
    int64_t y_stride;
    path p;
    const prepacked *pre;    /* panels packed ahead of time, or NULL */
    bool dense;              /* w's dense rows are there (else rows come from the panels) */
    int64_t n_chunks, chunk; /* work units: chunk rows (row paths) or 32-row panel pairs */
} mm_job;

#define MM_MAX_JOBS 4

typedef struct run_task {
    xllm_mm *mm;
    mm_job job[MM_MAX_JOBS]; /* matrices sharing the input, run in one parallel region */
    int n_jobs;
    int64_t total; /* units over all jobs */
    bool acc;
} run_task;

/* Units are split into contiguous shares, one a thread, each taken front to back, so that
 * every thread streams one long run of weights: in the host's fast memory state (2 threads
 * reading ~60 GB/s) decode matrices stream at 41-44 GB/s against 32-34 with units handed
 * out in turn from one counter (the two threads then read neighbouring runs of ~150 KB, each
 * run a new stream for the prefetchers). A thread done with its share takes units from the
 * back of another's, so a thread the OS preempts does not hold the others at the barrier. */
static void share_units(xllm_mm *mm, int64_t total) {
    XLLM_ASSERT(total < ((int64_t)1 << 32));
    const int n = mm->n_threads;
    for (int i = 0; i < n; i++) {
        const uint64_t lo = (uint64_t)(total * i / n), hi = (uint64_t)(total * (i + 1) / n);
        atomic_store_explicit(&mm->share[i].fb, lo | hi << 32, memory_order_relaxed);
    }
}

/* The next unit for thread ith, or -1 when none is left. */
static int64_t take_unit(xllm_mm *mm, int ith, int nth) {
    atomic_uint_fast64_t *own = &mm->share[ith].fb;
    uint_fast64_t v = atomic_load_explicit(own, memory_order_relaxed);
    while ((uint32_t)v < (uint32_t)(v >> 32))
        if (atomic_compare_exchange_weak_explicit(own, &v, v + 1, memory_order_relaxed,
                                                  memory_order_relaxed))
            return (int64_t)(uint32_t)v;
    for (int j = 1; j < nth; j++) {
        atomic_uint_fast64_t *other = &mm->share[(ith + j) % nth].fb;
        v = atomic_load_explicit(other, memory_order_relaxed);
        for (;;) {
            const uint32_t f = (uint32_t)v, b = (uint32_t)(v >> 32);
            if (f >= b) break;
            if (atomic_compare_exchange_weak_explicit(
                    other, &v, (uint_fast64_t)f | (uint_fast64_t)(b - 1) << 32,
                    memory_order_relaxed, memory_order_relaxed))
                return (int64_t)b - 1;
        }
    }
    return -1;
}

/* Dequantizes 16 rows to a float panel (K, 16) with the reference dequantizer. */
static void pack_f_ref(const xllm_mat *w, int64_t r0, int nr, float *row, float *panel) {
    const int64_t K = w->n_cols;
    for (int r = 0; r < 16; r++) {
        if (r < nr)
            xllm_dequant_row_ref(
                w->type, (const uint8_t *)w->data + (size_t)(r0 + r) * w->row_bytes, row, K);
        for (int64_t k = 0; k < K; k++) panel[k * 16 + r] = r < nr ? row[k] : 0.0f;
    }
}

/* The 8-bit form a of n columns from token t0 on. */
static xllm_q8act act_at(const xllm_q8act *a, int64_t t0, int64_t n) {
    xllm_q8act r = *a;
    r.q += t0 * n;
    r.d += t0 * (n / r.B);
    r.s16 += t0 * (n / 16);
    if (r.G) r.g += t0 * (n / r.G) * 2;
    return r;
}

static void run_worker(void *arg, int ith, int nth) {
    run_task *rt = arg;
    xllm_mm *mm = rt->mm;
    const xllm_cpu_kernels *k = mm->k;
    mm_thread *th = &mm->th[ith];
    const int64_t T = mm->T;
    const bool acc = rt->acc;
    for (;;) {
        int64_t c = take_unit(mm, ith, nth);
        if (c < 0) break;
        const mm_job *t = rt->job;
        while (c >= t->n_chunks) c -= (t++)->n_chunks;
        const xllm_mat *w = t->w;
        const int64_t K = w->n_cols;
        if (t->p == PATH_GEMV_DP || t->p == PATH_GEMM_DP) {
            /* (more tokens: a panel against each group of up to 4 in turn, from cache) */
            const prepacked *e = t->pre;
            for (int64_t r0 = c * t->chunk; r0 < XLLM_MIN((c + 1) * t->chunk, w->n_rows); r0 += 16)
                for (int64_t t0 = 0; t0 < T; t0 += XLLM_GEMV_MAX_T) {
                    const xllm_q8act a = act_at(t->a, t0, mm->n);
                    k->gemv_dp(w->type, e->dq + (size_t)(r0 / 16) * e->dq_stride, K, &a,
                               XLLM_MIN(T - t0, (int64_t)XLLM_GEMV_MAX_T),
                               (int)XLLM_MIN((int64_t)16, w->n_rows - r0),
                               t->y + t0 * t->y_stride + r0, t->y_stride, acc);
                }
            continue;
        }
        if (t->p == PATH_GEMV_BF16P) {
            const prepacked *e = t->pre;
            for (int64_t r0 = c * t->chunk; r0 < XLLM_MIN((c + 1) * t->chunk, w->n_rows); r0 += 16)
                k->gemv_bf16p(prepacked_bf16(e, r0 / 16), K, mm->xb, T,
                              (int)XLLM_MIN((int64_t)16, w->n_rows - r0), t->y + r0, t->y_stride,
                              acc);
            continue;
        }
        if (t->p == PATH_GEMV_BF16) {
            const int64_t lo = c * t->chunk, hi = XLLM_MIN(lo + t->chunk, w->n_rows);
            k->gemv_bf16(w, lo, hi, mm->xb, T, t->y, t->y_stride, acc);
            continue;
        }
        if (t->p == PATH_SCALAR || t->p == PATH_GEMV) {
            const int64_t lo = c * t->chunk, hi = XLLM_MIN(lo + t->chunk, w->n_rows);
            /* (more tokens than the direct kernels take: groups of them, see plan) */
            for (int64_t t0 = 0; t->p == PATH_GEMV && t0 < T; t0 += XLLM_GEMV_MAX_T) {
                xllm_q8act a;
                if (t->a) a = act_at(t->a, t0, mm->n);
                k->gemv(w, lo, hi, mm->x + t0 * mm->x_stride, mm->x_stride, t->a ? &a : NULL,
                        XLLM_MIN(T - t0, (int64_t)XLLM_GEMV_MAX_T), t->y + t0 * t->y_stride,
                        t->y_stride, acc);
            }
            if (t->p == PATH_GEMV) continue;
            for (int64_t r = lo; r < hi; r++) {
                const uint8_t *src = (const uint8_t *)w->data + (size_t)r * w->row_bytes;
                const float *wr = (const float *)src;
                if (!t->dense) {
                    panel_row(t->pre, r, th->row);
                    wr = th->row;
                } else if (w->type != XLLM_DTYPE_F32) {
                    xllm_dequant_row_ref(w->type, src, th->row, K);
                    wr = th->row;
                }
                for (int64_t i = 0; i < T; i++) {
                    const float v = k->dot_f32(wr, mm->x + i * mm->x_stride, K);
                    float *yp = t->y + i * t->y_stride + r;
                    *yp = acc ? *yp + v : v;
                }
            }
            continue;
        }
        /* a unit is chunk rows, a whole number of panel pairs (32 rows), on the GEMM paths */
        const int64_t r_end = XLLM_MIN((c + 1) * t->chunk, w->n_rows);
        for (int64_t r0 = c * t->chunk; r0 < r_end; r0 += 2 * XLLM_PANEL) {
            const int nr = (int)XLLM_MIN((int64_t)2 * XLLM_PANEL, w->n_rows - r0);
            const int np = nr > XLLM_PANEL ? 2 : 1;
            const size_t Kp = (size_t)(mm->max_cols + 63) / 64 * 64;
            float *y = t->y + r0;
            if (t->p == PATH_GEMM_Q) {
                xllm_qpanel p[2];
                const prepacked *pp = t->pre && t->pre->q ? t->pre : NULL;
                for (int i = 0; i < np && pp; i++) p[i] = prepacked_panel(pp, r0 / XLLM_PANEL + i);
                if (pp && r0 + 4 * XLLM_PANEL < w->n_rows) { /* the pair after next */
                    const int64_t next = r0 / XLLM_PANEL + 4;
                    p[0].pf = pp->q + (size_t)next * pp->qstride;
                    p[0].pf_bytes =
                        (int64_t)pp->qstride *
                        XLLM_MIN((int64_t)2, (w->n_rows + XLLM_PANEL - 1) / XLLM_PANEL - next);
                }
                for (int i = 0; i < np && !pp; i++) {
                    p[i] = (xllm_qpanel){.q = th->pq + i * 16 * Kp,
                                         .s = th->ps + i * (Kp / 16 + 1) * 16,
                                         .m = th->pm + i * (Kp / 16 + 1) * 16};
                    k->pack_q(w, r0 + i * XLLM_PANEL, XLLM_MIN(nr - i * XLLM_PANEL, XLLM_PANEL),
                              th->stage, &p[i]);
                }
                k->gemm_q(p, np, K, t->a, T, nr, y, t->y_stride, acc);
            } else if (t->p == PATH_GEMM_BF16) {
                const uint16_t *pb = (const uint16_t *)th->pf;
                if (t->pre && t->pre->bf16)
                    pb = prepacked_bf16(t->pre, r0 / XLLM_PANEL);
                else
                    for (int i = 0; i < np; i++)
                        k->pack_bf16(w, r0 + i * XLLM_PANEL,
                                     XLLM_MIN(nr - i * XLLM_PANEL, XLLM_PANEL),
                                     (uint16_t *)th->pf + (size_t)i * (size_t)K * 16);
                k->gemm_bf16(pb, np, K, mm->xb, T, nr, y, t->y_stride, acc);
            } else {
                for (int i = 0; i < np; i++) {
                    const int nri = XLLM_MIN(nr - i * XLLM_PANEL, XLLM_PANEL);
                    if (w->type == XLLM_DTYPE_F32 || w->type == XLLM_DTYPE_F16 ||
                        w->type == XLLM_DTYPE_BF16)
                        k->pack_f(w, r0 + i * XLLM_PANEL, nri, th->pf);
                    else
                        pack_f_ref(w, r0 + i * XLLM_PANEL, nri, th->row, th->pf);
                    k->gemm_f(th->pf, K, mm->x, mm->x_stride, T, nri, y + i * XLLM_PANEL,
                              t->y_stride, acc);
                }
            }
        }
    }
}

/* Picks the path of one matrix on the current input and makes the input forms it reads. */
static mm_job plan(xllm_mm *mm, const xllm_mat *w, float *y, int64_t y_stride) {
    XLLM_ASSERT(w->n_cols == mm->n);
    const xllm_cpu_kernels *k = mm->k;
    const int B = xllm_act_block(w->type);
    const int64_t K = w->n_cols;
    mm_job t = {.w = w, .y = y, .y_stride = y_stride, .p = PATH_SCALAR};
    t.pre = find_prepacked(mm->packs, w);
    t.dense = !t.pre || !t.pre->dense_gone;
    /* BF16 panels made ahead: the GEMM reads them, and decode too (one stream a thread) */
    const bool bfp = t.pre && t.pre->bf16 && k->gemm_bf16 && k->gemv_bf16p;
    const bool dq_only = t.pre && t.pre->dq && !t.pre->q;
    if (k->level == XLLM_CPU_SCALAR || (!t.dense && !(B && k->pack_q) && !bfp) ||
        (!t.dense && dq_only && !k->gemv_dp)) {
        t.p = PATH_SCALAR; /* (rows from the panels when the dense ones are gone) */
        /* prepacked panels whenever they are there, but for one token on panels wider than
         * 9/8 of the dense rows (sub-8-bit types: 8 bits a weight in the panel), where the
         * direct kernels read fewer bytes; in cache the panel decode kernel runs 2.6x the
         * direct Q8_0 one (one thread, 3072 x 1024) */
    } else if (bfp) {
        t.p = mm->T <= XLLM_GEMV_MAX_T ? PATH_GEMV_BF16P : PATH_GEMM_BF16;
        ensure_forms(mm, FORM_BF16);
    } else if (t.pre && t.pre->dq && mm->T <= XLLM_GEMV_MAX_T && k->gemv_dp) {
        t.p = PATH_GEMV_DP; /* decode panels: the type's own bits, one stream */
        t.a = q_form(mm, w->type, false);
    } else if (dq_only && k->gemv_dp) {
        /* no 8-bit panels (low memory): the decode panels serve batches too */
        t.p = PATH_GEMM_DP;
        t.a = q_form(mm, w->type, false);
    } else if (w->type == XLLM_DTYPE_BF16 && mm->T <= XLLM_GEMV_MAX_T && k->gemv_bf16 &&
               K % 32 == 0) {
        /* bf16 activations, as the BF16 GEMM reads them: bf16 pair dot products */
        t.p = PATH_GEMV_BF16;
        ensure_forms(mm, FORM_BF16);
    } else if ((mm->T <= XLLM_GEMV_MAX_T || (B && !k->pack_q)) && t.dense &&
               (!t.pre || !k->pack_q || (mm->T == 1 && !t.pre->decode)) && k->gemv &&
               k->gemv(w, 0, 0, NULL, 0, NULL, 0, NULL, 0, false)) {
        /* a level with direct kernels over 8-bit activations but no packed GEMM runs them for
         * every token count: the same arithmetic alone and in a batch (a sequence's results
         * must not depend on what it is batched with) */
        t.p = PATH_GEMV;
        if (B) t.a = q_form(mm, w->type, false);
    } else if (B && k->pack_q) {
        t.p = PATH_GEMM_Q;
        t.a = q_form(mm, w->type, xllm_panel_group(w->type) == 16);
    } else if (w->type == XLLM_DTYPE_BF16 && k->gemm_bf16 && K % 32 == 0) {
        t.p = PATH_GEMM_BF16;
        ensure_forms(mm, FORM_BF16);
    } else if (k->gemm_f) {
        t.p = PATH_GEMM_F;
    }
    if (t.p == PATH_SCALAR || t.p == PATH_GEMV || t.p == PATH_GEMV_BF16 || t.p == PATH_GEMV_BF16P ||
        t.p == PATH_GEMV_DP || t.p == PATH_GEMM_DP) {
        /* ~8 units per thread, whole multiples of 16 rows */
        t.chunk = (w->n_rows / (8 * mm->n_threads) + 15) / 16 * 16;
        if (t.chunk < 16) t.chunk = 16;
        t.n_chunks = (w->n_rows + t.chunk - 1) / t.chunk;
    } else {
        /* ~16 units per thread, whole panel pairs: fewer trips to the shared counter for the
         * output matrix (4748 pairs), single pairs for small matrices */
        const int64_t pairs = (w->n_rows + 2 * XLLM_PANEL - 1) / (2 * XLLM_PANEL);
        t.chunk = 2 * XLLM_PANEL * XLLM_MAX((int64_t)1, pairs / (16 * mm->n_threads));
        t.n_chunks = (w->n_rows + t.chunk - 1) / t.chunk;
    }
    return t;
}

/* ---- weights packed ahead of time ------------------------------------------------------- */

xllm_mm_packs *xllm_mm_packs_new(void) {
    return xllm_xcalloc(1, sizeof(xllm_mm_packs));
}

void xllm_mm_packs_free(xllm_mm_packs *pk) {
    if (!pk) return;
    for (int i = 0; i < pk->n_chunks; i++) munmap(pk->chunks[i].base, pk->chunks[i].size);
    free(pk->chunks);
    free(pk->pre);
    free(pk);
}

/* Enters e into the table (room was made). */
static void put_prepacked(xllm_mm_packs *pk, const prepacked *e) {
    size_t h = ((uintptr_t)e->data >> 6) % (size_t)pk->cap;
    while (pk->pre[h].data) h = (h + 1) % (size_t)pk->cap;
    pk->pre[h] = *e;
    pk->n++;
}

/* Whether w gets bf16 pair panels (BF16 weights at a level with the bf16 GEMM). */
static bool packs_bf16(const xllm_cpu_kernels *k, const xllm_mat *w) {
    return w->type == XLLM_DTYPE_BF16 && k->pack_bf16 && k->gemm_bf16 && k->gemv_bf16p &&
           w->n_cols % 32 == 0;
}

/* The layout of w's packs, no memory yet: BF16 pair panels (the dense size), or for the
 * quantized types 8-bit panels (left out, alloc 0, when over max_bytes) and for the sub-8-bit
 * ones decode panels in their own bits. False when w gets none. */
static bool pack_layout(const xllm_mm *mm, const xllm_mat *w, size_t max_bytes, prepacked *e) {
    const xllm_cpu_kernels *k = mm->k;
    const int64_t K = w->n_cols, np = (w->n_rows + 15) / 16;
    *e = (prepacked){.data = w->data, .type = w->type, .n_rows = w->n_rows, .n_cols = K};
    if (w->n_rows <= 0 || K > mm->max_cols) return false;
    if (packs_bf16(k, w)) {
        /* the GEMM then skips packing per call (4% of a BF16 prompt's time), decode reads
         * them as one stream */
        e->bf16 = e->decode = true;
        e->qstride = (size_t)K * 16 * sizeof(uint16_t);
        e->alloc = e->qstride * (size_t)np;
        return e->alloc <= max_bytes;
    }
    if (!k->pack_q || !xllm_act_block(w->type)) return false;
    const int G = xllm_panel_group(w->type);
    if (K % G) return false;
    const int64_t ng = K / G;
    e->G = G;
    e->sym = xllm_panel_sym(w->type);
    /* the scale of these types is the block's f16 d: exact as f16 */
    e->h16 =
        G == 32 && e->sym &&
        (w->type == XLLM_DTYPE_Q8_0 || w->type == XLLM_DTYPE_Q4_0 || w->type == XLLM_DTYPE_Q5_0);
    e->gb = e->h16 ? 2 * 16 * G + 2 * 16 * (int64_t)sizeof(uint16_t)
                   : 16 * G + (e->sym ? 1 : 2) * 16 * (int64_t)sizeof(float);
    e->qstride = (size_t)((e->h16 ? (ng + 1) / 2 : ng) * e->gb);
    e->alloc = e->qstride * (size_t)np;
    if (e->alloc > max_bytes) e->alloc = 0;
    e->decode = e->alloc && e->alloc <= (size_t)w->n_rows * w->row_bytes * 9 / 8;
    /* sub-8-bit types: decode panels in their own bits as well */
    e->dq_stride = k->gemv_dp ? xllm_dpanel_bytes(w->type, K) : 0;
    e->dq_alloc = e->dq_stride * (size_t)np;
    return e->alloc || e->dq_alloc;
}

size_t xllm_mm_pack_bytes(const xllm_mm *mm, const xllm_mat *w, size_t max_bytes) {
    prepacked e;
    return pack_layout(mm, w, max_bytes, &e) ? e.alloc + e.dq_alloc : 0;
}

size_t xllm_mm_pack(xllm_mm *mm, xllm_mm_packs *pk, const xllm_mat *w, size_t max_bytes) {
    const xllm_cpu_kernels *k = mm->k;
    prepacked e;
    if (find_prepacked(pk, w) || !pack_layout(mm, w, max_bytes, &e)) return 0;
    if (pk->n * 2 + 2 > pk->cap) { /* grow and rehash */
        const int64_t old_cap = pk->cap;
        prepacked *old = pk->pre;
        pk->cap = old_cap ? old_cap * 2 : 64;
        pk->pre = xllm_xcalloc((size_t)pk->cap, sizeof(prepacked));
        for (int64_t i = 0; i < old_cap; i++) {
            if (!old[i].data) continue;
            size_t h = ((uintptr_t)old[i].data >> 6) % (size_t)pk->cap;
            while (pk->pre[h].data) h = (h + 1) % (size_t)pk->cap;
            pk->pre[h] = old[i];
        }
        free(old);
    }
    const int64_t K = w->n_cols, np = (w->n_rows + 15) / 16;
    if (e.alloc && !(e.q = packs_alloc(pk, e.alloc))) e.alloc = 0;
    if (e.dq_alloc && !(e.dq = packs_alloc(pk, e.dq_alloc))) e.dq_alloc = 0;
    e.decode = e.decode && e.q;
    if (!e.q && !e.dq) return 0;
    if (e.bf16) {
        for (int64_t pi = 0; pi < np; pi++)
            k->pack_bf16(w, pi * 16, (int)XLLM_MIN((int64_t)16, w->n_rows - pi * 16),
                         (uint16_t *)(e.q + (size_t)pi * e.qstride));
        put_prepacked(pk, &e);
        return e.alloc;
    }
    /* each panel packed to the thread scratch, then copied into the groups' layout */
    mm_thread *th = &mm->th[0];
    xllm_qpanel sp = {.q = th->pq, .s = th->ps, .m = th->pm};
    const int G = e.G;
    const int64_t ng = K / G;
    for (int64_t pi = 0; e.q && pi < np; pi++) {
        k->pack_q(w, pi * 16, (int)XLLM_MIN((int64_t)16, w->n_rows - pi * 16), th->stage, &sp);
        XLLM_ASSERT(sp.G == G && sp.sym == e.sym);
        const xllm_qpanel dp = prepacked_panel(&e, pi);
        for (int64_t g = 0; g < ng; g++) {
            memcpy((uint8_t *)xllm_qpanel_q(&dp, g, dp.qgs), sp.q + g * 16 * G, (size_t)(16 * G));
            if (dp.h16) {
                uint16_t *sh = (uint16_t *)xllm_qpanel_sh(&dp, g, dp.qgs);
                for (int r = 0; r < 16; r++) sh[r] = xllm_fp32_to_fp16(sp.s[g * 16 + r]);
                continue;
            }
            memcpy(dp.s + g * dp.sgs, sp.s + g * 16, 16 * sizeof(float));
            if (dp.m) memcpy(dp.m + g * dp.sgs, sp.m + g * 16, 16 * sizeof(float));
        }
    }
    for (int64_t pi = 0; e.dq && pi < np; pi++)
        xllm_pack_dpanel(w, pi * 16, (int)XLLM_MIN((int64_t)16, w->n_rows - pi * 16),
                         e.dq + (size_t)pi * e.dq_stride);
    put_prepacked(pk, &e);
    return e.alloc + e.dq_alloc;
}

bool xllm_mm_packs_replace_dense(const xllm_mm_packs *pk, const xllm_mat *w) {
    const prepacked *e = find_prepacked(pk, w);
    return e && (e->dq || (e->q && e->decode));
}

void xllm_mm_packs_drop_dense(xllm_mm_packs *pk, const xllm_mat *w) {
    prepacked *e = find_prepacked(pk, w);
    XLLM_ASSERT(e && (e->q || e->dq));
    e->dense_gone = true;
}

void xllm_mm_use_packs(xllm_mm *mm, const xllm_mm_packs *pk) {
    mm->packs = pk;
}

void xllm_mm_row(const xllm_mm *mm, const xllm_mat *w, int64_t r, float *out) {
    const prepacked *e = find_prepacked(mm->packs, w);
    if (e && e->dense_gone)
        panel_row(e, r, out);
    else
        xllm_dequant_row_ref(w->type, (const uint8_t *)w->data + (size_t)r * w->row_bytes, out,
                             w->n_cols);
}

void xllm_mm_run_multi(xllm_mm *mm, int n, const xllm_mat *const *w, float *const *y,
                       const int64_t *y_stride, bool acc) {
    XLLM_ASSERT(n >= 1 && n <= MM_MAX_JOBS);
    if (mm->T == 0) return;
    run_task t = {.mm = mm, .acc = acc};
    for (int i = 0; i < n; i++) {
        if (w[i]->n_rows == 0) continue;
        t.job[t.n_jobs] = plan(mm, w[i], y[i], y_stride[i]);
        t.total += t.job[t.n_jobs++].n_chunks;
    }
    if (t.total == 0) return;
    share_units(mm, t.total);
    xllm_threadpool_run_shared(mm->tp, run_worker, &t);
}

void xllm_mm_run(xllm_mm *mm, const xllm_mat *w, float *y, int64_t y_stride, bool acc) {
    xllm_mm_run_multi(mm, 1, &w, &y, &y_stride, acc);
}
