/* xllm chat-template: renders a model's chat template (GGUF metadata, a tokenizer_config.json
 * folder, or a .jinja file) for an OpenAI-style request and prints the prompt exactly. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <jansson.h>

#include "cli/cli.h"
#include "cli/common.h"
#include "xllm/chat.h"

static void usage(FILE *f) {
    fprintf(f, "usage: xllm chat-template (-m MODEL.gguf|MODEL_DIR | --template FILE.jinja)\n"
               "                          -i REQUEST.json [--bos-token S] [--eos-token S]\n"
               "\n"
               "REQUEST.json is an OpenAI chat request body: messages, optional tools,\n"
               "add_generation_prompt (default true) and chat_template_kwargs. '-' reads stdin.\n"
               "The rendered prompt is printed as is, with no newline added.\n");
}

/* Reads a whole file ("-" = stdin); malloc'd, NUL-terminated. */
static char *read_all(const char *path, size_t *len) {
    FILE *f = strcmp(path, "-") ? fopen(path, "rb") : stdin;
    if (!f) return NULL;
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap);
    for (;;) {
        if (n + 1 >= cap) {
            cap *= 2;
            char *nb = realloc(buf, cap);
            if (!nb) {
                free(buf);
                buf = NULL;
                break;
            }
            buf = nb;
        }
        size_t k = fread(buf + n, 1, cap - n - 1, f);
        n += k;
        if (k == 0) break;
    }
    bool bad = ferror(f);
    if (f != stdin) fclose(f);
    if (!buf || bad) {
        free(buf);
        return NULL;
    }
    buf[n] = 0;
    *len = n;
    return buf;
}

static char *dup_str(const char *s) {
    if (!s) return NULL;
    size_t n = strlen(s);
    char *d = malloc(n + 1);
    if (d) memcpy(d, s, n + 1);
    return d;
}

/* bos_token / eos_token in tokenizer_config.json: a string or {"content": ...}. */
static char *config_token(json_t *cfg, const char *key) {
    json_t *v = json_object_get(cfg, key);
    if (json_is_object(v)) v = json_object_get(v, "content");
    return json_is_string(v) ? dup_str(json_string_value(v)) : NULL;
}

/* Reads DIR/tokenizer_config.json: the template ("default" of a named list) and tokens. */
static bool load_dir(const char *dir, char **tmpl, char **bos, char **eos) {
    char path[4096];
    snprintf(path, sizeof(path), "%s/tokenizer_config.json", dir);
    json_error_t je;
    json_t *cfg = json_load_file(path, 0, &je);
    if (!cfg) {
        fprintf(stderr, "xllm chat-template: %s: %s\n", path, je.text);
        return false;
    }
    const char *ct = xllm_cli_config_template(cfg);
    if (!ct) {
        fprintf(stderr, "xllm chat-template: %s has no chat_template\n", path);
        json_decref(cfg);
        return false;
    }
    *tmpl = dup_str(ct);
    *bos = config_token(cfg, "bos_token");
    *eos = config_token(cfg, "eos_token");
    json_decref(cfg);
    return *tmpl != NULL;
}

static char *token_text(const xllm_tokenizer *tok, int32_t id) {
    if (id < 0) return NULL;
    int32_t k = xllm_token_to_piece(tok, id, NULL, 0, true);
    if (k == INT32_MIN) return NULL;
    if (k < 0) k = -k;
    char *s = malloc((size_t)k + 1);
    if (!s) return NULL;
    int32_t w = xllm_token_to_piece(tok, id, s, k + 1, true);
    s[w > 0 ? w : 0] = 0;
    return s;
}

static bool load_gguf(const char *path, char **tmpl, char **bos, char **eos) {
    xllm_model *m = xllm_cli_load_model("chat-template", path, true, false, false);
    if (!m) return false;
    const char *t = xllm_model_chat_template(m);
    if (!t) {
        fprintf(stderr, "xllm chat-template: %s has no tokenizer.chat_template\n", path);
        xllm_model_free(m);
        return false;
    }
    *tmpl = dup_str(t);
    const xllm_tokenizer *tok = xllm_model_tokenizer(m);
    *bos = token_text(tok, xllm_token_bos(tok));
    *eos = token_text(tok, xllm_token_eos(tok));
    xllm_model_free(m);
    return *tmpl != NULL;
}

int xllm_cmd_chat_template(int argc, char **argv) {
    const char *cmd = "chat-template";
    const char *model = NULL, *tmpl_path = NULL, *req_path = NULL;
    const char *bos_opt = NULL, *eos_opt = NULL;
    int64_t now = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "-m") || !strcmp(a, "--model")) {
            if (!(model = xllm_cli_value(cmd, argc, argv, &i))) return 1;
        } else if (!strcmp(a, "--template")) {
            if (!(tmpl_path = xllm_cli_value(cmd, argc, argv, &i))) return 1;
        } else if (!strcmp(a, "-i") || !strcmp(a, "--input")) {
            if (!(req_path = xllm_cli_value(cmd, argc, argv, &i))) return 1;
        } else if (!strcmp(a, "--bos-token")) {
            if (!(bos_opt = xllm_cli_value(cmd, argc, argv, &i))) return 1;
        } else if (!strcmp(a, "--eos-token")) {
            if (!(eos_opt = xllm_cli_value(cmd, argc, argv, &i))) return 1;
        } else if (!strcmp(a, "--now")) { /* fixed strftime_now time (Unix seconds, UTC) */
            const char *v = xllm_cli_value(cmd, argc, argv, &i);
            if (!v || !xllm_cli_int(cmd, a, v, 1, INT64_MAX, &now)) return 1;
        } else {
            fprintf(stderr, "xllm chat-template: unknown option '%s'\n", a);
            usage(stderr);
            return 1;
        }
    }
    if (!!model == !!tmpl_path || !req_path) {
        fprintf(stderr, "xllm chat-template: need -i REQUEST.json and one of -m or --template\n");
        usage(stderr);
        return 1;
    }
    char *tmpl = NULL, *bos = NULL, *eos = NULL, *req = NULL, *out = NULL;
    xllm_chat_template *ct = NULL;
    int rc = 1;
    size_t tmpl_len = 0, req_len = 0, out_len = 0;
    if (tmpl_path) {
        tmpl = read_all(tmpl_path, &tmpl_len);
        if (!tmpl) {
            fprintf(stderr, "xllm chat-template: cannot read %s: %s\n", tmpl_path, strerror(errno));
            goto done;
        }
    } else {
        struct stat st;
        bool ok = stat(model, &st) == 0 && S_ISDIR(st.st_mode)
                      ? load_dir(model, &tmpl, &bos, &eos)
                      : load_gguf(model, &tmpl, &bos, &eos);
        if (!ok) goto done;
        tmpl_len = strlen(tmpl);
    }
    req = read_all(req_path, &req_len);
    if (!req) {
        fprintf(stderr, "xllm chat-template: cannot read %s: %s\n", req_path, strerror(errno));
        goto done;
    }
    char err[1024] = "";
    xllm_chat_params p = xllm_chat_default_params();
    p.now = now;
    if (xllm_chat_template_new(tmpl, tmpl_len, &p, &ct, err, sizeof(err)) != XLLM_OK) {
        fprintf(stderr, "xllm chat-template: template: %s\n", err);
        goto done;
    }
    if (xllm_chat_template_render(ct, req, req_len, bos_opt ? bos_opt : bos,
                                  eos_opt ? eos_opt : eos, &out, &out_len, err,
                                  sizeof(err)) != XLLM_OK) {
        fprintf(stderr, "xllm chat-template: %s\n", err);
        goto done;
    }
    if (fwrite(out, 1, out_len, stdout) != out_len || fflush(stdout) != 0) {
        fprintf(stderr, "xllm chat-template: write failed\n");
        goto done;
    }
    rc = 0;
done:
    xllm_chat_template_free(ct);
    free(tmpl);
    free(bos);
    free(eos);
    free(req);
    free(out);
    return rc;
}
