/* xllm info: architecture, hyperparameters, tokenizer, chat template, tensors and metadata. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "cli/common.h"

static void usage(FILE *f) {
    fprintf(f, "usage: xllm info -m MODEL [--no-tensors] [--no-meta]\n");
}

int xllm_cmd_info(int argc, char **argv) {
    const char *cmd = "info", *model_path = NULL;
    bool tensors = true, meta = true;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "-m") || !strcmp(a, "--model")) {
            if (!(model_path = xllm_cli_value(cmd, argc, argv, &i))) return 1;
        } else if (!strcmp(a, "--no-tensors")) {
            tensors = false;
        } else if (!strcmp(a, "--no-meta")) {
            meta = false;
        } else {
            fprintf(stderr, "xllm info: unknown option '%s'\n", a);
            usage(stderr);
            return 1;
        }
    }
    if (!model_path) {
        fprintf(stderr, "xllm info: -m MODEL is required\n");
        usage(stderr);
        return 1;
    }
    xllm_model *m = xllm_cli_load_model(cmd, model_path, false, false, false);
    if (!m) return 1;
    const xllm_tokenizer *tok = xllm_model_tokenizer(m);
    printf("model:        %s\n", model_path);
    printf("name:         %s\n", xllm_model_name(m));
    printf("architecture: %s\n", xllm_model_arch(m));
    printf("parameters:   %" PRIu64 " (%.2f M)\n", xllm_model_n_params(m),
           (double)xllm_model_n_params(m) / 1e6);
    printf("size:         %" PRIu64 " bytes (%.2f MiB)\n", xllm_model_size_bytes(m),
           (double)xllm_model_size_bytes(m) / (1024.0 * 1024.0));
    printf("context:      %d (trained)\n", xllm_model_n_ctx_train(m));
    printf("embedding:    %d\n", xllm_model_n_embd(m));
    printf("layers:       %d\n", xllm_model_n_layer(m));
    printf("heads:        %d (kv %d, head dim %d)\n", xllm_model_n_head(m), xllm_model_n_head_kv(m),
           xllm_model_head_dim(m));
    printf("ffn:          %d\n", xllm_model_n_ff(m));
    if (xllm_model_n_expert(m) > 0)
        printf("experts:      %d (%d used per token)\n", xllm_model_n_expert(m),
               xllm_model_n_expert_used(m));
    printf("rope base:    %g\n", xllm_model_rope_freq_base(m));
    printf("norm eps:     %g\n", xllm_model_norm_eps(m));
    printf("tokenizer:    %s, %d tokens, bos %d, eos %d, add bos %s\n", xllm_tokenizer_type(tok),
           xllm_tokenizer_n_vocab(tok), xllm_token_bos(tok), xllm_token_eos(tok),
           xllm_tokenizer_add_bos(tok) ? "yes" : "no");
    const char *tmpl = xllm_model_chat_template(m);
    if (tmpl)
        printf("chat template:\n%s\n", tmpl);
    else
        printf("chat template: none\n");

    /* tensor types summary */
    int64_t counts[XLLM_DTYPE_COUNT] = {0};
    for (int64_t i = 0; i < xllm_model_n_tensors(m); i++) {
        xllm_tensor_info ti;
        xllm_model_tensor(m, i, &ti);
        if ((unsigned)ti.type < XLLM_DTYPE_COUNT) counts[ti.type]++;
    }
    printf("tensor types:");
    for (int t = 0; t < XLLM_DTYPE_COUNT; t++)
        if (counts[t]) printf(" %s (%" PRId64 ")", xllm_dtype_name((xllm_dtype)t), counts[t]);
    printf("\n");
    if (tensors) {
        printf("tensors (%" PRId64 "):\n", xllm_model_n_tensors(m));
        for (int64_t i = 0; i < xllm_model_n_tensors(m); i++) {
            xllm_tensor_info ti;
            xllm_model_tensor(m, i, &ti);
            char shape[96];
            int off = 0;
            for (int d = 0; d < ti.n_dims; d++)
                off += snprintf(shape + off, sizeof(shape) - (size_t)off, "%s%" PRId64,
                                d ? " x " : "", ti.ne[d]);
            printf("  %-36s %-6s %-22s %" PRIu64 " bytes\n", ti.name, xllm_dtype_name(ti.type),
                   shape, ti.n_bytes);
        }
    }
    if (meta) {
        printf("metadata (%" PRId64 "):\n", xllm_model_meta_count(m));
        char buf[512];
        for (int64_t i = 0; i < xllm_model_meta_count(m); i++) {
            const char *key = xllm_model_meta_key(m, i);
            if (!strcmp(key, "tokenizer.chat_template")) continue;
            xllm_model_meta_value(m, i, buf, sizeof(buf));
            for (char *c = buf; *c; c++)
                if (*c == '\n') *c = ' ';
            printf("  %s = %s\n", key, buf);
        }
    }
    xllm_model_free(m);
    return 0;
}
