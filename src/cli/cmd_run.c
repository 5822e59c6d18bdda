/* xllm run: one prompt, in-process, no server. Streams the generated text to stdout (never
 * splitting a UTF-8 character) and prints load time and speeds to stderr. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "cli/common.h"

static void usage(FILE *f) {
    fprintf(f,
            "usage: xllm run -m MODEL -p PROMPT [options]\n"
            "  -m, --model FILE        GGUF model\n"
            "  -p, --prompt TEXT       prompt (\"\" = BOS alone); the output is the continuation\n"
            "  -n, --n-predict N       tokens to generate (default 128)\n"
            "  --temp T                temperature, 0 = greedy (default 0.8)\n"
            "  --top-k K               (default 40, 0 = off)\n"
            "  --top-p P               (default 0.95, 1 = off)\n"
            "  --min-p P               (default 0.05, 0 = off)\n"
            "  --repeat-penalty R      (default 1 = off)\n"
            "  --repeat-last-n N       tokens the penalties look at (default 64, -1 = all)\n"
            "  --frequency-penalty F   (default 0)\n"
            "  --presence-penalty F    (default 0)\n"
            "  --seed S                RNG seed (default 0xFFFFFFFF)\n"
            "  -t, --threads N         compute threads (default: all cores)\n"
            "  -c, --ctx-size N        context length (default: the model's, max 4096)\n"
            "  --kv-type f16|f32       KV cache type (default f16)\n"
            "  --kv-layout L           xtensor (default) or paged (block-table baseline)\n"
            "  --kv-memory BYTES       KV page pool size, e.g. 512M (default: a full context)\n"
            "  --kv-block-tokens N     tokens per KV page / prefix block (default: automatic)\n"
            "  --ignore-eos            keep generating past end-of-generation tokens\n"
            "  --low-memory            weights copied to memory, sub-8-bit matrices as decode\n"
            "                          panels only: about the file size in memory\n");
}

/* Length of the longest prefix of buf[0..n) that ends on a complete UTF-8 character. */
static size_t utf8_complete(const char *buf, size_t n) {
    size_t i = n;
    /* look back at most 3 bytes for a lead byte whose sequence is incomplete */
    for (size_t back = 1; back <= 3 && back <= n; back++) {
        unsigned char c = (unsigned char)buf[n - back];
        if ((c & 0xC0) == 0x80) continue; /* continuation byte */
        size_t need = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
        if (need > back) i = n - back;
        break;
    }
    return i;
}

int xllm_cmd_run(int argc, char **argv) {
    const char *cmd = "run", *model_path = NULL, *prompt = NULL;
    int64_t n_predict = 128, threads = 0, n_ctx = 0, last_n = 64, seed = 0xFFFFFFFF;
    bool ignore_eos = false, low_memory = false;
    xllm_context_params cp = xllm_context_default_params();
    xllm_sampler_params sp = xllm_sampler_default_params();
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = NULL;
        int kvo = xllm_cli_kv_option(cmd, argc, argv, &i, &cp);
        if (kvo < 0) return 1;
        if (kvo > 0) continue;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return 0;
        }
        if (!strcmp(a, "--ignore-eos")) {
            ignore_eos = true;
            continue;
        }
        if (!strcmp(a, "--low-memory")) {
            low_memory = true;
            continue;
        }
        static const char *const k_valued[] = {"-m",
                                               "--model",
                                               "-p",
                                               "--prompt",
                                               "-n",
                                               "--n-predict",
                                               "--temp",
                                               "--top-k",
                                               "--top-p",
                                               "--min-p",
                                               "--repeat-penalty",
                                               "--repeat-last-n",
                                               "--frequency-penalty",
                                               "--presence-penalty",
                                               "--seed",
                                               "-t",
                                               "--threads",
                                               "-c",
                                               "--ctx-size"};
        bool known = false;
        for (size_t k = 0; k < sizeof(k_valued) / sizeof(k_valued[0]); k++)
            known |= !strcmp(a, k_valued[k]);
        if (!known) {
            fprintf(stderr, "xllm run: unknown option '%s' (see xllm run --help)\n", a);
            return 1;
        }
        if (!(v = xllm_cli_value(cmd, argc, argv, &i))) return 1;
        bool ok = true;
        if (!strcmp(a, "-m") || !strcmp(a, "--model"))
            model_path = v;
        else if (!strcmp(a, "-p") || !strcmp(a, "--prompt"))
            prompt = v;
        else if (!strcmp(a, "-n") || !strcmp(a, "--n-predict"))
            ok = xllm_cli_int(cmd, a, v, 0, 1 << 24, &n_predict);
        else if (!strcmp(a, "--temp"))
            ok = xllm_cli_float(cmd, a, v, &sp.temperature);
        else if (!strcmp(a, "--top-k")) {
            int64_t k;
            ok = xllm_cli_int(cmd, a, v, 0, 1 << 30, &k);
            sp.top_k = (int32_t)k;
        } else if (!strcmp(a, "--top-p"))
            ok = xllm_cli_float(cmd, a, v, &sp.top_p);
        else if (!strcmp(a, "--min-p"))
            ok = xllm_cli_float(cmd, a, v, &sp.min_p);
        else if (!strcmp(a, "--repeat-penalty"))
            ok = xllm_cli_float(cmd, a, v, &sp.repeat_penalty);
        else if (!strcmp(a, "--repeat-last-n"))
            ok = xllm_cli_int(cmd, a, v, -1, 1 << 24, &last_n);
        else if (!strcmp(a, "--frequency-penalty"))
            ok = xllm_cli_float(cmd, a, v, &sp.frequency_penalty);
        else if (!strcmp(a, "--presence-penalty"))
            ok = xllm_cli_float(cmd, a, v, &sp.presence_penalty);
        else if (!strcmp(a, "--seed"))
            ok = xllm_cli_int(cmd, a, v, 0, INT64_MAX, &seed);
        else if (!strcmp(a, "-t") || !strcmp(a, "--threads"))
            ok = xllm_cli_int(cmd, a, v, 1, 1024, &threads);
        else if (!strcmp(a, "-c") || !strcmp(a, "--ctx-size"))
            ok = xllm_cli_int(cmd, a, v, 1, 1 << 24, &n_ctx);
        if (!ok) return 1;
    }
    if (!model_path || !prompt) {
        fprintf(stderr, "xllm run: -m MODEL and -p PROMPT are required\n");
        usage(stderr);
        return 1;
    }
    sp.penalty_last_n = (int32_t)last_n;
    sp.seed = (uint64_t)seed;

    double t0 = xllm_cli_now();
    xllm_model *model = xllm_cli_load_model(cmd, model_path, false, low_memory, low_memory);
    if (!model) return 1;
    double t_load = xllm_cli_now() - t0;
    const xllm_tokenizer *tok = xllm_model_tokenizer(model);

    int rc = 1;
    xllm_context *ctx = NULL;
    xllm_sampler *smp = NULL;
    int32_t *ids = NULL;
    char *pending = NULL;

    /* tokenize: an empty prompt means BOS alone */
    size_t plen = strlen(prompt);
    int32_t n_prompt = xllm_tokenize(tok, prompt, plen, NULL, 0, true, false);
    if (n_prompt < 0) n_prompt = -n_prompt;
    ids = malloc(sizeof(int32_t) * (size_t)(n_prompt + 1));
    n_prompt = xllm_tokenize(tok, prompt, plen, ids, n_prompt + 1, true, false);
    if (n_prompt < 0) {
        fprintf(stderr, "xllm run: cannot tokenize the prompt\n");
        goto done;
    }
    if (n_prompt == 0) {
        int32_t bos = xllm_token_bos(tok);
        if (bos < 0) {
            fprintf(stderr, "xllm run: empty prompt and the vocabulary has no BOS token\n");
            goto done;
        }
        ids[n_prompt++] = bos;
    }

    cp.n_ctx = (int32_t)n_ctx;
    cp.n_threads = (int32_t)threads;
    char err[512];
    if (xllm_context_new(model, &cp, &ctx, err, sizeof(err)) != XLLM_OK) {
        fprintf(stderr, "xllm run: %s\n", err);
        goto done;
    }
    const int32_t ctx_len = xllm_context_n_ctx(ctx);
    if (n_prompt >= ctx_len) {
        fprintf(stderr, "xllm run: the prompt has %d tokens, the context holds %d\n", n_prompt,
                ctx_len);
        goto done;
    }
    if (n_predict > ctx_len - n_prompt) n_predict = ctx_len - n_prompt;
    smp = xllm_sampler_new(&sp, xllm_model_n_vocab(model));

    /* prompt, in chunks of the batch size */
    double t1 = xllm_cli_now();
    const int32_t chunk = 512;
    int32_t pos_buf[512], seq_buf[512] = {0}, last_rows = 0;
    for (int32_t done_n = 0; done_n < n_prompt; done_n += chunk) {
        int32_t n = XLLM_CLI_MIN(chunk, n_prompt - done_n);
        for (int32_t i = 0; i < n; i++) pos_buf[i] = done_n + i;
        xllm_batch b = {n, ids + done_n, pos_buf, seq_buf, NULL};
        xllm_status st = xllm_decode(ctx, &b);
        if (st != XLLM_OK) {
            fprintf(stderr, "xllm run: decode failed: %s\n", xllm_status_str(st));
            goto done;
        }
        for (int32_t i = 0; i < n; i++) xllm_sampler_accept(smp, ids[done_n + i]);
        last_rows = n;
    }
    double t_prompt = xllm_cli_now() - t1;

    /* generation */
    double t2 = xllm_cli_now();
    size_t pend_len = 0, pend_cap = 256;
    pending = malloc(pend_cap);
    int32_t n_gen = 0, pos = n_prompt;
    const float *logits = xllm_get_logits(ctx, last_rows - 1);
    char piece[256];
    bool at_start = plen == 0, strip_space = xllm_tokenizer_add_space_prefix(tok);
    while (n_gen < n_predict) {
        int32_t t = xllm_sampler_sample(smp, logits);
        xllm_sampler_accept(smp, t);
        n_gen++;
        if (!ignore_eos && xllm_token_is_eog(tok, t)) break;
        int32_t np = xllm_token_to_piece(tok, t, piece, sizeof(piece), false);
        char *pc = piece;
        if (np > 0 && at_start) {
            /* the text starts here: SPM's space prefix is not part of it */
            if (strip_space && pc[0] == ' ') {
                pc++;
                np--;
            }
            at_start = false;
        }
        if (np > 0) {
            if (pend_len + (size_t)np > pend_cap)
                pending = realloc(pending, pend_cap = 2 * (pend_len + (size_t)np));
            memcpy(pending + pend_len, pc, (size_t)np);
            pend_len += (size_t)np;
            size_t ok = utf8_complete(pending, pend_len);
            if (ok) {
                fwrite(pending, 1, ok, stdout);
                fflush(stdout);
                memmove(pending, pending + ok, pend_len - ok);
                pend_len -= ok;
            }
        }
        if (n_gen >= n_predict) break;
        int32_t seq = 0;
        xllm_batch b = {1, &t, &pos, &seq, NULL};
        xllm_status st = xllm_decode(ctx, &b);
        if (st != XLLM_OK) {
            fprintf(stderr, "\nxllm run: decode failed: %s\n", xllm_status_str(st));
            goto done;
        }
        pos++;
        logits = xllm_get_logits(ctx, 0);
    }
    if (pend_len) fwrite(pending, 1, pend_len, stdout);
    fflush(stdout);
    double t_gen = xllm_cli_now() - t2;
    fprintf(stderr, "\n\nload:       %8.1f ms\n", t_load * 1e3);
    fprintf(stderr, "prompt:     %8.1f ms, %d tokens, %.2f tokens/s\n", t_prompt * 1e3, n_prompt,
            t_prompt > 0 ? n_prompt / t_prompt : 0.0);
    fprintf(stderr, "generation: %8.1f ms, %d tokens, %.2f tokens/s\n", t_gen * 1e3, n_gen,
            t_gen > 0 ? n_gen / t_gen : 0.0);
    rc = 0;
done:
    free(pending);
    free(ids);
    xllm_sampler_free(smp);
    xllm_context_free(ctx);
    xllm_model_free(model);
    return rc;
}
