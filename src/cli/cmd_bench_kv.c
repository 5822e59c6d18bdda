/* xllm bench-kv: the KV memory layouts side by side in one run: append latency per token,
 * footprint against tokens stored, decode attention time at 1..64 concurrent sequences of mixed
 * lengths, and prefix-cache savings. Measures the internal KV module directly (src/kv). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "cli/common.h"
#include "compute/dtype.h"
#include "compute/threadpool.h"
#include "engine/attention.h"
#include "kv/kv.h"

typedef struct bench_cfg {
    int32_t n_layer, n_head, n_head_kv, head_dim, n_ctx, threads, reps;
    xllm_dtype type;
    uint64_t seed;
} bench_cfg;

static uint64_t rnd(uint64_t *s) {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static xllm_kv *make_kv(const bench_cfg *c, xllm_kv_layout layout, int32_t n_seq, size_t memory,
                        bool cache) {
    xllm_kv_params p = {.n_layer = c->n_layer,
                        .n_seq = n_seq,
                        .n_ctx = c->n_ctx,
                        .row_elems = c->n_head_kv * c->head_dim,
                        .type = c->type,
                        .layout = layout,
                        .memory = memory,
                        .prefix_cache = cache,
                        .background = layout == XLLM_KV_LAYOUT_XTENSOR};
    xllm_kv *kv = NULL;
    char err[256];
    if (xllm_kv_new(&p, &kv, err, sizeof(err)) != XLLM_OK) {
        fprintf(stderr, "xllm bench-kv: %s\n", err);
        return NULL;
    }
    return kv;
}

/* Appends one token to seq the way the engine does: reserve, record, write rows, commit. */
static bool append_one(xllm_kv *kv, const bench_cfg *c, int32_t seq, int32_t token) {
    int32_t pos = xllm_kv_seq_len(kv, seq);
    if (xllm_kv_reserve(kv, seq, pos + 1) != XLLM_OK) return false;
    xllm_kv_seq_set_tokens(kv, seq, pos, &token, 1);
    size_t rb = xllm_kv_row_bytes(kv);
    for (int32_t l = 0; l < c->n_layer; l++) {
        memset(xllm_kv_row_k(kv, l, seq, pos), (int)(token & 0x3f), rb);
        memset(xllm_kv_row_v(kv, l, seq, pos), (int)(token & 0x3f), rb);
    }
    xllm_kv_seq_set_len(kv, seq, pos + 1);
    return true;
}

/* Mixed lengths in [128, 4096] (log-uniform), capped by the context. */
static int32_t mixed_len(uint64_t *s, int32_t n_ctx) {
    double u = (double)(rnd(s) >> 11) / (double)(1ull << 53);
    int32_t n = (int32_t)(128.0 * pow(32.0, u));
    return n > n_ctx - 1 ? n_ctx - 1 : n;
}

typedef struct layout_result {
    double p50_us, p99_us, max_us;
    double held_mb, stored_mb, waste_pages_per_seq;
    double attn_ms[4];      /* the engine's path */
    double attn_same_ms[4]; /* one kernel for both layouts */
    int32_t block_tokens;
    uint64_t sync_maps, bg_maps;
    int64_t mappings;
    double reuse_saved;
} layout_result;

typedef struct attn_job {
    xllm_kv *kv;
    const bench_cfg *c;
    int32_t n_seq;
    const int32_t *lens;
    const float *q;      /* (n_head, head_dim) */
    float *scratch;      /* (threads, n_ctx + head_dim) */
    xllm_kv_span *spans; /* (threads, max_spans) */
    float *out;          /* (threads, head_dim) */
    bool same_loop;      /* read every layout run by run (one kernel for both) */
} attn_job;

static void attn_worker(void *arg, int ith, int nth) {
    attn_job *j = arg;
    const bench_cfg *c = j->c;
    const int32_t D = c->head_dim, group = c->n_head / c->n_head_kv;
    const int32_t max_spans = xllm_kv_max_spans(j->kv);
    float *scores = j->scratch + (size_t)ith * (size_t)(c->n_ctx + D);
    xllm_kv_span *spans = j->spans + (size_t)ith * (size_t)max_spans;
    float *out = j->out + (size_t)ith * (size_t)D;
    int64_t total = (int64_t)j->n_seq * c->n_layer * c->n_head, lo, hi;
    xllm_split_range(total, ith, nth, &lo, &hi);
    for (int64_t idx = lo; idx < hi; idx++) {
        int32_t h = (int32_t)(idx % c->n_head);
        int32_t l = (int32_t)(idx / c->n_head % c->n_layer);
        int32_t s = (int32_t)(idx / c->n_head / c->n_layer);
        int32_t n = xllm_kv_spans(j->kv, l, s, j->lens[s], spans, max_spans);
        (j->same_loop ? xllm_attention_head_runs : xllm_attention_head)(
            j->q + (size_t)h * D, spans, n, c->type, xllm_kv_row_bytes(j->kv),
            (int64_t)(h / group) * D, D, j->lens[s], 1.0f / sqrtf((float)D), scores,
            scores + c->n_ctx, out);
    }
}

static bool bench_layout(const bench_cfg *c, xllm_kv_layout layout, layout_result *r) {
    const int32_t NS = 64;
    uint64_t s = c->seed;
    int32_t lens[64];
    size_t total_tokens = 0;
    for (int i = 0; i < NS; i++) {
        lens[i] = mixed_len(&s, c->n_ctx);
        total_tokens += (size_t)lens[i];
    }
    const size_t row = xllm_dtype_row_bytes(c->type, (int64_t)c->n_head_kv * c->head_dim);
    const size_t per_token = row * 2 * (size_t)c->n_layer;
    /* pool: the tokens plus one page of slack per sequence, prefix cache off */
    xllm_kv *kv = make_kv(c, layout, NS,
                          total_tokens * per_token * 11 / 10 + (size_t)NS * 64 * per_token, false);
    if (!kv) return false;
    r->block_tokens = xllm_kv_block_tokens(kv);

    /* 1. append latency: sequences grow round-robin one token at a time, like decode */
    double *lat = malloc(sizeof(double) * total_tokens);
    size_t n_lat = 0;
    int32_t done = 0, step = 0;
    while (done < NS) {
        done = 0;
        for (int32_t q = 0; q < NS; q++) {
            if (xllm_kv_seq_len(kv, q) >= lens[q]) {
                done++;
                continue;
            }
            double t0 = xllm_cli_now();
            if (!append_one(kv, c, q, (int32_t)(rnd(&s) % 32000))) {
                fprintf(stderr, "xllm bench-kv: append failed: %s\n", xllm_kv_last_error(kv));
                free(lat);
                xllm_kv_free(kv);
                return false;
            }
            lat[n_lat++] = (xllm_cli_now() - t0) * 1e6;
        }
        step++;
    }
    qsort(lat, n_lat, sizeof(double), cmp_double);
    r->p50_us = lat[n_lat / 2];
    r->p99_us = lat[n_lat * 99 / 100];
    r->max_us = lat[n_lat - 1];
    free(lat);

    /* 2. footprint */
    xllm_kv_stats st;
    xllm_kv_get_stats(kv, &st);
    r->held_mb = (double)st.used_pages * (double)st.page_bytes / 1048576.0;
    r->stored_mb = (double)total_tokens * (double)per_token / 1048576.0;
    r->waste_pages_per_seq = (double)xllm_kv_waste_bytes(kv) / (double)st.page_bytes / NS;
    r->sync_maps = st.sync_maps;
    r->bg_maps = st.bg_maps;
    r->mappings = st.mappings;

    /* 3. decode attention: one query per sequence, every layer and head */
    xllm_threadpool *tp = xllm_threadpool_new(c->threads);
    float *q = malloc(sizeof(float) * (size_t)c->n_head * c->head_dim);
    for (int i = 0; i < c->n_head * c->head_dim; i++)
        q[i] = (float)((double)(rnd(&s) >> 11) / (double)(1ull << 53) - 0.5);
    attn_job j = {.kv = kv, .c = c, .lens = lens, .q = q};
    j.scratch = malloc(sizeof(float) * (size_t)c->threads * (size_t)(c->n_ctx + c->head_dim));
    j.spans = malloc(sizeof(xllm_kv_span) * (size_t)c->threads * (size_t)xllm_kv_max_spans(kv));
    j.out = malloc(sizeof(float) * (size_t)c->threads * (size_t)c->head_dim);
    const int32_t batches[4] = {1, 4, 16, 64};
    for (int same = 0; same < 2; same++) {
        j.same_loop = same;
        for (int bi = 0; bi < 4; bi++) {
            j.n_seq = batches[bi];
            double best = 1e30;
            for (int rep = 0; rep < c->reps; rep++) {
                double t0 = xllm_cli_now();
                xllm_threadpool_run(tp, attn_worker, &j);
                double t = xllm_cli_now() - t0;
                best = t < best ? t : best;
            }
            (same ? r->attn_same_ms : r->attn_ms)[bi] = best * 1e3;
        }
    }
    free(j.scratch);
    free(j.spans);
    free(j.out);
    free(q);
    xllm_threadpool_free(tp);
    xllm_kv_free(kv);

    /* 4. prefix savings: 32 requests sharing a 1024-token system prompt, 128 tokens each */
    kv = make_kv(c, layout, 2, 0, true);
    if (!kv) return false;
    int32_t *prompt = malloc(sizeof(int32_t) * 1152);
    for (int i = 0; i < 1024; i++) prompt[i] = (int32_t)(rnd(&s) % 32000);
    size_t computed = 0, asked = 0;
    for (int req = 0; req < 32; req++) {
        for (int i = 1024; i < 1152; i++) prompt[i] = (int32_t)(rnd(&s) % 32000);
        int32_t seq = req % 2;
        xllm_kv_seq_free(kv, seq);
        int32_t hit = xllm_kv_seq_reuse_prefix(kv, seq, prompt, 1152);
        for (int32_t p = hit; p < 1152; p++) append_one(kv, c, seq, prompt[p]);
        computed += (size_t)(1152 - hit);
        asked += 1152;
    }
    r->reuse_saved = 1.0 - (double)computed / (double)asked;
    free(prompt);
    xllm_kv_free(kv);
    return true;
}

static void usage(FILE *f) {
    fprintf(f, "usage: xllm bench-kv [--layers N] [--heads N] [--kv-heads N] [--head-dim N]\n"
               "                     [--ctx N] [--kv-type f16|f32] [-t THREADS] [-r REPS]\n"
               "Defaults: a Qwen3-0.6B-shaped KV (16 heads, 8 KV heads, head dim 128, f16) with\n"
               "4 layers, context 4096, 64 sequences of mixed lengths 128..4096.\n");
}

int xllm_cmd_bench_kv(int argc, char **argv) {
    const char *cmd = "bench-kv";
    bench_cfg c = {.n_layer = 4,
                   .n_head = 16,
                   .n_head_kv = 8,
                   .head_dim = 128,
                   .n_ctx = 4096,
                   .threads = 2,
                   .reps = 3,
                   .type = XLLM_DTYPE_F16,
                   .seed = 0x5eed};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v;
        int64_t n;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return 0;
        }
        int32_t *dst = !strcmp(a, "--layers")                          ? &c.n_layer
                       : !strcmp(a, "--heads")                         ? &c.n_head
                       : !strcmp(a, "--kv-heads")                      ? &c.n_head_kv
                       : !strcmp(a, "--head-dim")                      ? &c.head_dim
                       : !strcmp(a, "--ctx")                           ? &c.n_ctx
                       : (!strcmp(a, "-t") || !strcmp(a, "--threads")) ? &c.threads
                       : (!strcmp(a, "-r") || !strcmp(a, "--reps"))    ? &c.reps
                                                                       : NULL;
        if (dst) {
            if (!(v = xllm_cli_value(cmd, argc, argv, &i)) ||
                !xllm_cli_int(cmd, a, v, 1, 1 << 20, &n))
                return 1;
            *dst = (int32_t)n;
        } else if (!strcmp(a, "--kv-type")) {
            if (!(v = xllm_cli_value(cmd, argc, argv, &i)) || !xllm_cli_kv_type(cmd, v, &c.type))
                return 1;
        } else {
            fprintf(stderr, "xllm bench-kv: unknown option '%s'\n", a);
            usage(stderr);
            return 1;
        }
    }
    if (c.n_head % c.n_head_kv != 0 || c.n_ctx < 256 || c.head_dim > 1024) {
        fprintf(stderr, "xllm bench-kv: heads must be a multiple of kv-heads, ctx >= 256\n");
        return 1;
    }
    layout_result res[2];
    const char *names[2] = {"xtensor", "paged"};
    for (int l = 0; l < 2; l++)
        if (!bench_layout(&c, (xllm_kv_layout)l, &res[l])) return 1;

    printf("KV: %d layers, %d heads / %d KV heads x %d, %s, 64 sequences of 128..4096 tokens, %d "
           "threads\n\n",
           c.n_layer, c.n_head, c.n_head_kv, c.head_dim, c.type == XLLM_DTYPE_F16 ? "f16" : "f32",
           c.threads);
    printf("| metric | xtensor | paged | xtensor/paged |\n|---|---:|---:|---:|\n");
    printf("| block tokens | %d | %d | |\n", res[0].block_tokens, res[1].block_tokens);
    printf("| append p50 (us/token) | %.2f | %.2f | %.2f |\n", res[0].p50_us, res[1].p50_us,
           res[0].p50_us / res[1].p50_us);
    printf("| append p99 (us/token) | %.2f | %.2f | %.2f |\n", res[0].p99_us, res[1].p99_us,
           res[0].p99_us / res[1].p99_us);
    printf("| append max (us/token) | %.1f | %.1f | |\n", res[0].max_us, res[1].max_us);
    printf("| pages mapped by the engine / ahead | %llu / %llu | %llu / - | |\n",
           (unsigned long long)res[0].sync_maps, (unsigned long long)res[0].bg_maps,
           (unsigned long long)res[1].sync_maps);
    printf("| memory mappings | %lld | 1 | |\n", (long long)res[0].mappings);
    printf("| stored (MiB) | %.1f | %.1f | |\n", res[0].stored_mb, res[1].stored_mb);
    printf("| held (MiB) | %.1f | %.1f | %.3f |\n", res[0].held_mb, res[1].held_mb,
           res[0].held_mb / res[1].held_mb);
    printf("| waste (pages per sequence) | %.2f | %.2f | |\n", res[0].waste_pages_per_seq,
           res[1].waste_pages_per_seq);
    const int32_t batches[4] = {1, 4, 16, 64};
    for (int b = 0; b < 4; b++)
        printf("| decode attention, %d seqs (ms) | %.3f | %.3f | %.3f |\n", batches[b],
               res[0].attn_ms[b], res[1].attn_ms[b], res[0].attn_ms[b] / res[1].attn_ms[b]);
    for (int b = 0; b < 4; b++)
        printf("| same kernel (run by run), %d seqs (ms) | %.3f | %.3f | %.3f |\n", batches[b],
               res[0].attn_same_ms[b], res[1].attn_same_ms[b],
               res[0].attn_same_ms[b] / res[1].attn_same_ms[b]);
    printf("| prefix cache: prefill saved | %.1f%% | %.1f%% | |\n", res[0].reuse_saved * 100,
           res[1].reuse_saved * 100);
    (void)names;
    return 0;
}
