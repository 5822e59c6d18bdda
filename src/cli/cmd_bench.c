/* xllm bench: prompt processing (ppN) and generation (tgN) speed like llama-bench, batched
 * decode at several batch sizes with every sequence at a given context, and decode's achieved
 * weight bandwidth next to the machine's streaming read bandwidth at the same thread count. */
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "cli/cli.h"
#include "cli/common.h"
#include "compute/cpu/cpu.h"
#include "compute/cpu/ops.h"
#include "compute/dtype.h"
#include "compute/threadpool.h"
#include "engine/engine-impl.h"
#include "kv/kv.h"
#include "util/common.h"

typedef struct opts {
    const char *model;
    int64_t p, n, t, r, ctx, steps;
    int64_t batches[8];
    int n_batches;
    bool json, mmap, low_memory;
} opts;

typedef struct result {
    double mean, sd;
} result;

static result stats(const double *v, int n) {
    result r = {0, 0};
    for (int i = 0; i < n; i++) r.mean += v[i];
    r.mean /= n;
    for (int i = 0; i < n; i++) r.sd += (v[i] - r.mean) * (v[i] - r.mean);
    r.sd = n > 1 ? sqrt(r.sd / (n - 1)) : 0.0;
    return r;
}

/* ---- streaming read bandwidth ---------------------------------------------------------- */

typedef struct bw_task {
    const float *buf;
    int64_t n;
    const xllm_cpu_kernels *k;
    float sink[256];
} bw_task;

static void bw_worker(void *arg, int ith, int nth) {
    bw_task *b = arg;
    int64_t lo, hi;
    xllm_split_range(b->n / 4096, ith, nth, &lo, &hi);
    b->sink[ith & 255] +=
        xllm_cpu_dot_f32(b->k, b->buf + lo * 4096, b->buf + lo * 4096, (hi - lo) * 4096);
}

/* The process's resident memory in GB: anonymous and file-backed (/proc/self/status). */
static void resident_gb(double *anon, double *file) {
    *anon = *file = 0.0;
    FILE *f = fopen("/proc/self/status", "r");
    if (!f) return;
    char line[256];
    long kb;
    while (fgets(line, sizeof(line), f)) {
        if (sscanf(line, "RssAnon: %ld", &kb) == 1) *anon = (double)kb * 1024 / 1e9;
        if (sscanf(line, "RssFile: %ld", &kb) == 1) *file = (double)kb * 1024 / 1e9;
    }
    fclose(f);
}

/* The streaming read probe: a 1 GiB buffer read by a pool of the bench's thread count, in 2 MiB
 * pages as the weights' panels are (4 KiB pages read 15-35% slower here). The host's memory
 * bandwidth drifts (here 30-65 GB/s with 2 threads within minutes), so each
 * decode test is put next to probes taken around its own repetitions. */
typedef struct bw_probe {
    xllm_threadpool *tp;
    float *buf;
    int64_t n;
} bw_probe;

static bool bw_probe_init(bw_probe *p, int threads) {
    p->n = (int64_t)1 << 28; /* floats */
    p->buf = xllm_map_huge((size_t)p->n * sizeof(float));
    p->tp = p->buf ? xllm_threadpool_new(threads) : NULL;
    if (!p->tp) {
        if (p->buf) munmap(p->buf, (size_t)p->n * sizeof(float));
        p->buf = NULL;
        return false;
    }
    for (int64_t i = 0; i < p->n; i++) p->buf[i] = (float)(i & 7) * 0.125f;
    return true;
}

static void bw_probe_free(bw_probe *p) {
    xllm_threadpool_free(p->tp);
    if (p->buf) munmap(p->buf, (size_t)p->n * sizeof(float));
}

/* GB/s of reading the buffer with the probe's threads, best of passes. */
static double bw_measure(bw_probe *p, int passes) {
    if (!p->tp) return 0.0;
    bw_task b = {p->buf, p->n, xllm_cpu_kernels_get(xllm_cpu_level_default()), {0}};
    double best = 0.0;
    for (int it = 0; it < passes; it++) {
        double t0 = xllm_cli_now();
        xllm_threadpool_run(p->tp, bw_worker, &b);
        double gbs = (double)p->n * sizeof(float) / (xllm_cli_now() - t0) / 1e9;
        if (gbs > best) best = gbs;
    }
    return best;
}

/* The probes taken around one test's repetitions. */
typedef struct reads {
    double sum, lo, hi;
    int n;
} reads;

static void reads_take(reads *rd, bw_probe *p) {
    const double g = bw_measure(p, 2);
    if (g <= 0) return;
    rd->lo = rd->n == 0 || g < rd->lo ? g : rd->lo;
    rd->hi = rd->n == 0 || g > rd->hi ? g : rd->hi;
    rd->sum += g;
    rd->n++;
}

/* ---- model facts ----------------------------------------------------------------------- */

/* Bytes of weights one decode step reads: every matrix but the embedding table (which is read
 * one row per token) unless it doubles as the output; experts scaled by used / total. */
static double weight_bytes(const xllm_model *m) {
    double sum = 0;
    bool has_output = false;
    const double moe = xllm_model_n_expert(m) > 0
                           ? (double)xllm_model_n_expert_used(m) / (double)xllm_model_n_expert(m)
                           : 1.0;
    for (int64_t i = 0; i < xllm_model_n_tensors(m); i++) {
        xllm_tensor_info ti;
        xllm_model_tensor(m, i, &ti);
        if (!strcmp(ti.name, "output.weight")) has_output = true;
    }
    for (int64_t i = 0; i < xllm_model_n_tensors(m); i++) {
        xllm_tensor_info ti;
        xllm_model_tensor(m, i, &ti);
        if (!strcmp(ti.name, "token_embd.weight") && has_output) continue;
        sum += (double)ti.n_bytes * (strstr(ti.name, "_exps") ? moe : 1.0);
    }
    return sum;
}

static xllm_context *new_ctx(const xllm_model *m, const opts *o, int n_seq, int n_ctx,
                             int n_batch) {
    xllm_context_params cp = xllm_context_default_params();
    cp.n_ctx = n_ctx;
    cp.n_seq_max = n_seq;
    cp.n_batch = n_batch;
    cp.n_threads = (int32_t)o->t;
    xllm_context *ctx = NULL;
    char err[256];
    if (xllm_context_new(m, &cp, &ctx, err, sizeof(err)) != XLLM_OK)
        fprintf(stderr, "xllm bench: %s\n", err);
    return ctx;
}

static uint64_t rng_next(uint64_t *s) {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

/* Fills positions [0, len) of sequences [0, n_seq) with small random f16/f32 K and V values
 * without running the model (attention cost depends only on the length). */
static bool fill_kv(xllm_context *ctx, int n_seq, int32_t len) {
    xllm_kv *kv = ctx->kv;
    const size_t rb = xllm_kv_row_bytes(kv);
    const bool f16 = xllm_kv_type(kv) == XLLM_DTYPE_F16;
    uint64_t st = 88172645463325252ull;
    for (int s = 0; s < n_seq; s++) {
        if (xllm_kv_reserve(kv, s, len) != XLLM_OK) return false;
        for (int il = 0; il < ctx->model->hp.n_layer; il++)
            for (int32_t p = 0; p < len; p++) {
                uint8_t *rows[2] = {xllm_kv_row_k(kv, il, s, p), xllm_kv_row_v(kv, il, s, p)};
                for (int b = 0; b < 2; b++)
                    for (size_t i = 0; i < rb; i += f16 ? 2 : 4) {
                        float v = (float)(rng_next(&st) & 0xffff) / 65536.0f - 0.5f;
                        if (f16) {
                            uint16_t h = xllm_fp32_to_fp16(v);
                            memcpy(rows[b] + i, &h, 2);
                        } else {
                            memcpy(rows[b] + i, &v, 4);
                        }
                    }
            }
        xllm_kv_seq_set_len(kv, s, len);
    }
    return true;
}

/* ---- tests ----------------------------------------------------------------------------- */

/* One test's line; decode tests (rd != NULL) add the weight bandwidth achieved and the read
 * bandwidth probed around their repetitions (mean, and the range in JSON). */
static void report(const opts *o, const xllm_model *m, const char *test, result r, double wgbs,
                   const reads *rd) {
    const double rgbs = rd && rd->n ? rd->sum / rd->n : 0.0;
    if (o->json) {
        printf("{\"test\": \"%s\", \"threads\": %" PRId64
               ", \"tokens_per_s\": %.2f, \"stddev\": %.2f",
               test, o->t, r.mean, r.sd);
        if (rd) printf(", \"weight_gbs\": %.2f", wgbs);
        if (rgbs > 0)
            printf(", \"read_gbs\": %.2f, \"read_gbs_min\": %.2f, \"read_gbs_max\": %.2f", rgbs,
                   rd->lo, rd->hi);
        printf(", \"model\": \"%s\", \"cpu\": \"%s\"}\n", xllm_model_name(m),
               xllm_cpu_level_name(xllm_cpu_level_default()));
    } else {
        printf("| %-12s | %3" PRId64 " | %10.2f ± %-7.2f |", test, o->t, r.mean, r.sd);
        if (rd && rgbs > 0)
            printf(" %6.1f GB/s of %5.1f (%4.1f%%) |", wgbs, rgbs, 100.0 * wgbs / rgbs);
        else if (rd)
            printf(" %6.1f GB/s |", wgbs);
        printf("\n");
    }
    fflush(stdout);
}

static void set_batch(xllm_batch *b, int32_t *tok, int32_t *pos, int32_t *seq, int32_t n,
                      int32_t p0, int32_t s0, bool one_seq, int32_t V, uint64_t *rs) {
    for (int32_t i = 0; i < n; i++) {
        tok[i] = (int32_t)(rng_next(rs) % (uint64_t)V);
        pos[i] = one_seq ? p0 + i : p0;
        seq[i] = one_seq ? s0 : s0 + i;
    }
    b->n_tokens = n;
    b->token = tok;
    b->pos = pos;
    b->seq_id = seq;
    b->logits = NULL;
}

/* ppN: one batch of p prompt tokens; tgN: n tokens one step at a time; both from an empty
 * sequence, after one warm-up run. */
static bool run_pp_tg(const opts *o, const xllm_model *m, double wbytes, bw_probe *probe,
                      int32_t *tok, int32_t *pos, int32_t *seq, double *tv, uint64_t *rs) {
    const int32_t V = xllm_model_n_vocab(m);
    xllm_context *ctx =
        new_ctx(m, o, 1, (int)(XLLM_MAX(o->p, o->n) + 1), (int)XLLM_MIN(XLLM_MAX(o->p, 1), 4096));
    if (!ctx) return false;
    xllm_batch b;
    char name[32];
    if (o->p > 0) {
        for (int64_t r = -1; r < o->r; r++) {
            xllm_seq_truncate(ctx, 0, 0);
            set_batch(&b, tok, pos, seq, (int32_t)o->p, 0, 0, true, V, rs);
            double t0 = xllm_cli_now();
            if (xllm_decode(ctx, &b) != XLLM_OK) goto fail;
            if (r >= 0) tv[r] = (double)o->p / (xllm_cli_now() - t0);
        }
        snprintf(name, sizeof(name), "pp%" PRId64, o->p);
        report(o, m, name, stats(tv, (int)o->r), 0, NULL);
    }
    if (o->n > 0) {
        reads rd = {0};
        for (int64_t r = -1; r < o->r; r++) {
            if (r >= 0) reads_take(&rd, probe);
            xllm_seq_truncate(ctx, 0, 0);
            double t0 = xllm_cli_now();
            for (int64_t i = 0; i < o->n; i++) {
                set_batch(&b, tok, pos, seq, 1, (int32_t)i, 0, true, V, rs);
                if (xllm_decode(ctx, &b) != XLLM_OK) goto fail;
            }
            if (r >= 0) tv[r] = (double)o->n / (xllm_cli_now() - t0);
        }
        reads_take(&rd, probe);
        snprintf(name, sizeof(name), "tg%" PRId64, o->n);
        result res = stats(tv, (int)o->r);
        report(o, m, name, res, wbytes * res.mean / 1e9, &rd);
    }
    xllm_context_free(ctx);
    return true;
fail:
    xllm_context_free(ctx);
    return false;
}

static void usage(FILE *f) {
    fprintf(f, "usage: xllm bench -m MODEL [-p 512] [-n 128] [-t N] [-r REPS] [--json]\n"
               "                  [-b 1,4,16,64] [--ctx 256] [--steps 16] [--mmap] [--low-memory]\n"
               "  -p       prompt tokens of the ppN test (0 = skip)\n"
               "  -n       generated tokens of the tgN test (0 = skip)\n"
               "  -t       threads (default: physical cores)\n"
               "  -r       repetitions (default 5)\n"
               "  -b       batch sizes of the decode_bB tests (0 = skip), each sequence at --ctx\n"
               "  --mmap   decode from the file mapping (default: weights copied to memory)\n"
               "  --low-memory  sub-8-bit matrices keep their decode panels only (about the\n"
               "           file size in memory; prompt processing up to ~15%% slower)\n"
               "  env XLLM_CPU=scalar|avx2|avx512 lowers the kernel level\n");
}

int xllm_cmd_bench(int argc, char **argv) {
    const char *cmd = "bench";
    opts o = {.p = 512,
              .n = 128,
              .r = 5,
              .ctx = 256,
              .steps = 16,
              .batches = {1, 4, 16, 64},
              .n_batches = 4};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return 0;
        }
        if (!strcmp(a, "--json")) {
            o.json = true;
            continue;
        }
        if (!strcmp(a, "--mmap")) {
            o.mmap = true;
            continue;
        }
        if (!strcmp(a, "--low-memory")) {
            o.low_memory = true;
            continue;
        }
        if (!(v = xllm_cli_value(cmd, argc, argv, &i))) return 1;
        int64_t *dst = NULL, lo = 0;
        if (!strcmp(a, "-m")) {
            o.model = v;
        } else if (!strcmp(a, "-p")) {
            dst = &o.p;
        } else if (!strcmp(a, "-n")) {
            dst = &o.n;
        } else if (!strcmp(a, "-t")) {
            dst = &o.t;
        } else if (!strcmp(a, "-r")) {
            dst = &o.r;
            lo = 1;
        } else if (!strcmp(a, "--ctx")) {
            dst = &o.ctx;
        } else if (!strcmp(a, "--steps")) {
            dst = &o.steps;
            lo = 1;
        } else if (!strcmp(a, "-b")) {
            o.n_batches = 0;
            char buf[128];
            snprintf(buf, sizeof(buf), "%s", v);
            for (char *tk = strtok(buf, ","); tk && o.n_batches < 8; tk = strtok(NULL, ",")) {
                int64_t bv;
                if (!xllm_cli_int(cmd, a, tk, 0, 4096, &bv)) return 1;
                if (bv > 0) o.batches[o.n_batches++] = bv;
            }
        } else {
            fprintf(stderr, "xllm bench: unknown option '%s'\n", a);
            usage(stderr);
            return 1;
        }
        if (dst && !xllm_cli_int(cmd, a, v, lo, 1 << 20, dst)) return 1;
    }
    if (!o.model) {
        usage(stderr);
        return 1;
    }
    if (o.t <= 0) o.t = xllm_cpu_physical_cores();
    xllm_model_params mp = xllm_model_default_params();
    mp.no_mmap = !o.mmap;
    mp.low_memory = o.low_memory;
    xllm_model *m = NULL;
    char err[512];
    if (xllm_model_load(o.model, &mp, &m, err, sizeof(err)) != XLLM_OK) {
        fprintf(stderr, "xllm bench: %s\n", err);
        return 1;
    }
    xllm_cli_report_layout(cmd, m);
    const int32_t V = xllm_model_n_vocab(m);
    const double wbytes = weight_bytes(m);
    double rss_anon, rss_file; /* the loaded model's, before any context or buffer */
    resident_gb(&rss_anon, &rss_file);
    uint64_t rs = 0x2545F4914F6CDD1Dull;
    bw_probe probe = {0};
    /* (the first pass, on cold pages, not counted) */
    const double rgbs =
        bw_probe_init(&probe, (int)o.t) ? (bw_measure(&probe, 1), bw_measure(&probe, 3)) : 0.0;
    if (!o.json) {
        printf("model: %s (%s), %.2f GB of weights per token, cpu %s, weights %s\n",
               xllm_model_name(m), o.model, wbytes / 1e9,
               xllm_cpu_level_name(xllm_cpu_level_default()), o.mmap ? "mmap" : "in memory");
        printf("resident after load: %.2f GB anonymous, %.2f GB file-backed\n", rss_anon, rss_file);
        printf("read bandwidth (%" PRId64 " threads): %.1f GB/s\n", o.t, rgbs);
        printf("| test         | thr |        tokens/s        | decode weight bandwidth |\n");
    }
    int32_t *tok = calloc(4096, sizeof(int32_t)), *pos = calloc(4096, sizeof(int32_t)),
            *seq = calloc(4096, sizeof(int32_t));
    double *tv = calloc((size_t)o.r, sizeof(double));
    int rc = 0;
    xllm_batch b;
    (void)V;
    /* ppN and tgN: one sequence from an empty context, one warm-up run first */
    if ((o.p > 0 || o.n > 0) && !run_pp_tg(&o, m, wbytes, &probe, tok, pos, seq, tv, &rs))
        goto fail;
    /* decode_bB: B sequences at context ctx, one token each per step */
    int64_t bmax = 0;
    for (int i = 0; i < o.n_batches; i++) bmax = XLLM_MAX(bmax, o.batches[i]);
    if (bmax > 0) {
        xllm_context *ctx = new_ctx(m, &o, (int)bmax, (int)(o.ctx + o.steps + 1), (int)bmax);
        if (!ctx || !fill_kv(ctx, (int)bmax, (int32_t)o.ctx)) {
            xllm_context_free(ctx);
            goto fail;
        }
        for (int bi = 0; bi < o.n_batches; bi++) {
            const int32_t B = (int32_t)o.batches[bi];
            reads rd = {0};
            for (int64_t r = -1; r < o.r; r++) {
                if (r >= 0) reads_take(&rd, &probe);
                for (int s = 0; s < B; s++) xllm_seq_truncate(ctx, s, (int32_t)o.ctx);
                double t0 = xllm_cli_now();
                for (int64_t st = 0; st < o.steps; st++) {
                    set_batch(&b, tok, pos, seq, B, (int32_t)(o.ctx + st), 0, false, V, &rs);
                    if (xllm_decode(ctx, &b) != XLLM_OK) {
                        xllm_context_free(ctx);
                        goto fail;
                    }
                }
                if (r >= 0) tv[r] = (double)(B * o.steps) / (xllm_cli_now() - t0);
            }
            reads_take(&rd, &probe);
            char name[32];
            snprintf(name, sizeof(name), "decode_b%d", B);
            result res = stats(tv, (int)o.r);
            report(&o, m, name, res, wbytes * res.mean / B / 1e9, &rd);
        }
        xllm_context_free(ctx);
    }
    goto done;
fail:
    fprintf(stderr, "xllm bench: a decode failed\n");
    rc = 1;
done:
    bw_probe_free(&probe);
    free(tok);
    free(pos);
    free(seq);
    free(tv);
    xllm_model_free(m);
    return rc;
}
