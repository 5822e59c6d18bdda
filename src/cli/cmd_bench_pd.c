/* xllm bench-pd: PD disaggregation through two engines in one process (a prefill engine sending
 * over loopback TCP to a decode engine): for one long prompt, how long after the end of the last
 * prefill step the decode side has the whole KV (imported, first token out), with the KV sent
 * layer by layer from inside the forward pass of each chunk and, for comparison, all at once
 * after the last chunk (pd_export_after_prefill). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "cli/common.h"
#include "xllm/engine.h"

typedef struct run_result {
    double prefill_ms; /* submit -> end of the last chunk's forward pass (prefill side) */
    double ttft_ms;    /* submit -> the decode side's first token */
    double gap_ms;     /* end of the last forward pass -> the decode side's first token */
    double copy_ms;    /* engine-thread time copying rows into frames */
    int32_t steps, sends_fwd;
} run_result;

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof(double), cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* One PD request of prompt[0..n) from pe to de as transfer id. */
static bool run_one(xllm_engine *pe, xllm_engine *de, const int32_t *prompt, int32_t n, uint64_t id,
                    run_result *out) {
    char to[64], err[256];
    snprintf(to, sizeof(to), "127.0.0.1:%d", xllm_engine_kv_port(de));
    xllm_request_params rp = xllm_request_default_params();
    rp.prompt = prompt;
    rp.n_prompt = n;
    rp.max_tokens = 1;
    rp.sampling.temperature = 0;
    rp.ignore_eos = true;
    rp.pd_import_id = id;
    xllm_request *dr = NULL, *pr = NULL;
    if (xllm_engine_submit(de, &rp, &dr, err, sizeof(err)) != XLLM_OK) {
        fprintf(stderr, "xllm bench-pd: decode leg: %s\n", err);
        return false;
    }
    rp.pd_import_id = 0;
    rp.pd_export_id = id;
    rp.pd_export_to = to;
    const double t0 = xllm_cli_now();
    if (xllm_engine_submit(pe, &rp, &pr, err, sizeof(err)) != XLLM_OK) {
        fprintf(stderr, "xllm bench-pd: prefill leg: %s\n", err);
        xllm_request_free(dr);
        return false;
    }
    xllm_token_event ev;
    bool ok = xllm_request_next(dr, &ev, -1) == 1;
    const double t_dec = xllm_cli_now();
    while (xllm_request_next(pr, &ev, -1) == 1) {
    }
    while (xllm_request_next(dr, &ev, -1) == 1) {
    }
    xllm_request_stats ps;
    xllm_request_get_stats(pr, &ps);
    ok = ok && xllm_request_finish_reason(pr) == XLLM_FINISH_LENGTH && ps.t_prefill_ms > 0;
    if (!ok) fprintf(stderr, "xllm bench-pd: transfer %llu failed\n", (unsigned long long)id);
    out->prefill_ms = ps.t_prefill_ms;
    out->ttft_ms = (t_dec - t0) * 1e3;
    out->gap_ms = out->ttft_ms - ps.t_prefill_ms;
    out->copy_ms = ps.kv_copy_ms;
    out->steps = ps.n_prefill_steps;
    out->sends_fwd = ps.kv_sends_forward;
    xllm_request_free(pr);
    xllm_request_free(dr);
    return ok;
}

static void usage(FILE *f) {
    fprintf(f,
            "usage: xllm bench-pd -m MODEL [-n PROMPT_TOKENS] [-c CHUNK] [-t THREADS] [-r REPS]\n"
            "                     [--kv-type f16|f32]\n"
            "Defaults: 1024 prompt tokens prefilled in chunks of 512, 2 threads, 3 repetitions of\n"
            "each mode (interleaved), f16 KV. Both engines run in this process; the decode\n"
            "engine uses one thread.\n");
}

int xllm_cmd_bench_pd(int argc, char **argv) {
    const char *cmd = "bench-pd", *model_path = NULL;
    int32_t n_prompt = 1024, chunk = 512, threads = 2, reps = 3;
    xllm_dtype kv_type = XLLM_DTYPE_F16;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v;
        int64_t n;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return 0;
        }
        int32_t *dst = !strcmp(a, "-n")                                ? &n_prompt
                       : !strcmp(a, "-c")                              ? &chunk
                       : (!strcmp(a, "-t") || !strcmp(a, "--threads")) ? &threads
                       : (!strcmp(a, "-r") || !strcmp(a, "--reps"))    ? &reps
                                                                       : NULL;
        if (dst) {
            if (!(v = xllm_cli_value(cmd, argc, argv, &i)) ||
                !xllm_cli_int(cmd, a, v, 1, 1 << 20, &n))
                return 1;
            *dst = (int32_t)n;
        } else if (!strcmp(a, "-m") || !strcmp(a, "--model")) {
            if (!(model_path = xllm_cli_value(cmd, argc, argv, &i))) return 1;
        } else if (!strcmp(a, "--kv-type")) {
            if (!(v = xllm_cli_value(cmd, argc, argv, &i)) || !xllm_cli_kv_type(cmd, v, &kv_type))
                return 1;
        } else {
            fprintf(stderr, "xllm bench-pd: unknown option '%s'\n", a);
            usage(stderr);
            return 1;
        }
    }
    if (!model_path) {
        usage(stderr);
        return 1;
    }
    xllm_model *m = xllm_cli_load_model(cmd, model_path, false, false, false);
    if (!m) return 1;
    /* engines: [0] after the last chunk (before), [1] layer by layer (now), [2] decode */
    xllm_engine *e[3] = {NULL, NULL, NULL};
    char err[256];
    int rc = 1;
    for (int k = 0; k < 3; k++) {
        xllm_engine_params ep = xllm_engine_default_params();
        ep.max_seqs = 1;
        ep.n_ctx = n_prompt + 8;
        ep.kv_type = kv_type;
        ep.no_prefix_cache = true; /* every repetition computes the whole prompt */
        ep.n_threads = k < 2 ? threads : 1;
        ep.max_batch_tokens = k < 2 ? chunk : 512;
        ep.pd_export_after_prefill = k == 0;
        ep.kv_receiver = k == 2;
        if (xllm_engine_new(m, &ep, &e[k], err, sizeof(err)) != XLLM_OK) {
            fprintf(stderr, "xllm bench-pd: %s\n", err);
            goto done;
        }
    }
    int32_t *prompt = malloc((size_t)n_prompt * sizeof(int32_t));
    double *v[2][5];
    for (int k = 0; k < 2; k++)
        for (int j = 0; j < 5; j++) v[k][j] = calloc((size_t)reps, sizeof(double));
    run_result last[2] = {{0}};
    uint64_t seed = 0x9e3779b97f4a7c15ull, id = 1;
    bool ok = true;
    /* a warm-up of each mode (weights paged in, connection opened), then the repetitions with
     * the modes interleaved, so that a slow period of the machine hits both */
    for (int rep = -1; rep < reps && ok; rep++) {
        for (int k = 0; k < 2 && ok; k++) {
            for (int32_t i = 0; i < n_prompt; i++) {
                seed = seed * 6364136223846793005ull + 1442695040888963407ull;
                prompt[i] = (int32_t)((seed >> 33) % (uint64_t)xllm_model_n_vocab(m));
            }
            run_result r;
            ok = run_one(e[k], e[2], prompt, n_prompt, id++, &r);
            if (!ok || rep < 0) continue;
            double vals[5] = {r.prefill_ms, r.ttft_ms, r.gap_ms, r.copy_ms,
                              r.prefill_ms / (double)r.steps};
            for (int j = 0; j < 5; j++) v[k][j][rep] = vals[j];
            last[k] = r;
        }
    }
    if (ok) {
        const double kv_mib = (double)xllm_model_n_layer(m) * 2.0 * n_prompt *
                              xllm_model_n_head_kv(m) * xllm_model_head_dim(m) *
                              (kv_type == XLLM_DTYPE_F16 ? 2 : 4) / (1 << 20);
        printf("PD over loopback, %s: %d prompt tokens in chunks of %d (%d steps), %d threads, KV "
               "%.1f MiB (%s), median of %d\n\n",
               model_path, n_prompt, chunk, last[1].steps, threads, kv_mib,
               kv_type == XLLM_DTYPE_F16 ? "f16" : "f32", reps);
        printf("| ms | after the last chunk (before) | layer by layer (now) |\n|---|---:|---:|\n");
        const char *names[5] = {"prefill: submit -> end of the last forward pass",
                                "PD TTFT: submit -> decode side's first token",
                                "end of the last forward pass -> decode side's first token",
                                "row copies into frames (engine thread)", "per prefill step"};
        double med[2][5];
        for (int k = 0; k < 2; k++)
            for (int j = 0; j < 5; j++) med[k][j] = median(v[k][j], reps);
        for (int j = 0; j < 5; j++)
            printf("| %s | %.1f | %.1f |\n", names[j], med[0][j], med[1][j]);
        printf("\nLAYER sends from inside the forward pass: before %d, now %d\n", last[0].sends_fwd,
               last[1].sends_fwd);
        rc = 0;
    }
    for (int k = 0; k < 2; k++)
        for (int j = 0; j < 5; j++) free(v[k][j]);
    free(prompt);
done:
    for (int k = 0; k < 3; k++) xllm_engine_free(e[k]);
    xllm_model_free(m);
    return rc;
}
