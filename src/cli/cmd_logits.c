/* xllm logits: evaluates exactly the given token ids as one sequence in one batch and writes
 * float32 logits for every position (row-major, n_ids x n_vocab, no header). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "cli/common.h"

static void usage(FILE *f) {
    fprintf(f, "usage: xllm logits -m MODEL --tokens \"ID ID ...\" -o FILE [-t THREADS]\n"
               "                   [--kv-type f32|f16] [--kv-layout xtensor|paged] [--no-mmap]\n"
               "                   [--low-memory]\n"
               "Evaluates the ids (no BOS added) as one sequence in one batch and writes float32\n"
               "logits for every position, row-major (one row per id x n_vocab), no header.\n"
               "  --no-mmap     copy the weights to memory (8-bit and BF16 matrices then live\n"
               "                only in the packed panel form: their dense rows are released)\n"
               "  --low-memory  sub-8-bit matrices keep their decode panels only (prompts\n"
               "                read them too)\n");
}

int xllm_cmd_logits(int argc, char **argv) {
    const char *cmd = "logits", *model_path = NULL, *tokens = NULL, *out_path = NULL;
    int64_t threads = 0;
    bool no_mmap = false, low_memory = false;
    xllm_context_params cp = xllm_context_default_params();
    cp.kv_type = XLLM_DTYPE_F32;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v;
        int kvo = xllm_cli_kv_option(cmd, argc, argv, &i, &cp);
        if (kvo < 0) return 1;
        if (kvo > 0) continue;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "-m") || !strcmp(a, "--model")) {
            if (!(model_path = xllm_cli_value(cmd, argc, argv, &i))) return 1;
        } else if (!strcmp(a, "--no-mmap")) {
            no_mmap = true;
        } else if (!strcmp(a, "--low-memory")) {
            low_memory = true;
        } else if (!strcmp(a, "--tokens")) {
            if (!(tokens = xllm_cli_value(cmd, argc, argv, &i))) return 1;
        } else if (!strcmp(a, "-o") || !strcmp(a, "--output")) {
            if (!(out_path = xllm_cli_value(cmd, argc, argv, &i))) return 1;
        } else if (!strcmp(a, "-t") || !strcmp(a, "--threads")) {
            if (!(v = xllm_cli_value(cmd, argc, argv, &i)) ||
                !xllm_cli_int(cmd, a, v, 1, 1024, &threads))
                return 1;
        } else {
            fprintf(stderr, "xllm logits: unknown option '%s'\n", a);
            usage(stderr);
            return 1;
        }
    }
    if (!model_path || !tokens || !out_path) {
        fprintf(stderr, "xllm logits: -m, --tokens and -o are required\n");
        usage(stderr);
        return 1;
    }

    /* parse ids */
    int32_t cap = 64, n = 0;
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)cap);
    const char *p = tokens;
    for (;;) {
        while (*p == ' ' || *p == '\t' || *p == ',' || *p == '\n') p++;
        if (!*p) break;
        char *end;
        long v = strtol(p, &end, 10);
        if (end == p || v < 0 || v > INT32_MAX) {
            fprintf(stderr, "xllm logits: bad token id near '%.20s'\n", p);
            free(ids);
            return 1;
        }
        if (n == cap) ids = realloc(ids, sizeof(int32_t) * (size_t)(cap *= 2));
        ids[n++] = (int32_t)v;
        p = end;
    }
    if (n == 0) {
        fprintf(stderr, "xllm logits: --tokens holds no ids\n");
        free(ids);
        return 1;
    }

    xllm_model *model = xllm_cli_load_model(cmd, model_path, true, no_mmap, low_memory);
    if (!model) {
        free(ids);
        return 1;
    }
    const int32_t n_vocab = xllm_model_n_vocab(model);
    for (int32_t i = 0; i < n; i++) {
        if (ids[i] >= n_vocab) {
            fprintf(stderr, "xllm logits: token id %d is outside the vocabulary (%d ids)\n", ids[i],
                    n_vocab);
            free(ids);
            xllm_model_free(model);
            return 1;
        }
    }
    cp.n_ctx = n;
    cp.n_batch = n;
    cp.n_threads = (int32_t)threads;
    xllm_context *ctx = NULL;
    char err[512];
    int rc = 1;
    const size_t nn = (size_t)(uint32_t)n; /* n >= 1 here */
    int32_t *pos = malloc(sizeof(int32_t) * nn), *seq = calloc(nn, sizeof(int32_t));
    int8_t *want = malloc(nn);
    FILE *f = NULL;
    if (xllm_context_new(model, &cp, &ctx, err, sizeof(err)) != XLLM_OK) {
        fprintf(stderr, "xllm logits: %s\n", err);
        goto done;
    }
    for (int32_t i = 0; i < n; i++) {
        pos[i] = i;
        want[i] = 1;
    }
    xllm_batch b = {n, ids, pos, seq, want};
    xllm_status st = xllm_decode(ctx, &b);
    if (st != XLLM_OK) {
        fprintf(stderr, "xllm logits: decode failed: %s\n", xllm_status_str(st));
        goto done;
    }
    f = fopen(out_path, "wb");
    if (!f) {
        fprintf(stderr, "xllm logits: cannot write %s\n", out_path);
        goto done;
    }
    for (int32_t i = 0; i < n; i++) {
        if (fwrite(xllm_get_logits(ctx, i), sizeof(float), (size_t)n_vocab, f) != (size_t)n_vocab) {
            fprintf(stderr, "xllm logits: write to %s failed\n", out_path);
            goto done;
        }
    }
    if (fclose(f) != 0) {
        f = NULL;
        fprintf(stderr, "xllm logits: write to %s failed\n", out_path);
        goto done;
    }
    f = NULL;
    rc = 0;
done:
    if (f) fclose(f);
    free(pos);
    free(seq);
    free(want);
    free(ids);
    xllm_context_free(ctx);
    xllm_model_free(model);
    return rc;
}
