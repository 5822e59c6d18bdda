/* xllm tokenize: stdin's bytes to token ids with a model's (or a Hugging Face directory's)
 * tokenizer; and xllm bench-tokenize: encoding speed on files. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <jansson.h>

#include "cli/cli.h"
#include "cli/common.h"

static void usage(FILE *f) {
    fprintf(f,
            "usage: xllm tokenize -m MODEL_OR_DIR [--no-bos] [--special] [--ids] < TEXT\n"
            "\n"
            "  -m, --model PATH  a GGUF file or a Hugging Face model directory\n"
            "                    (tokenizer.json, or vocab.json + merges.txt)\n"
            "  --no-bos          add no special tokens (BOS/EOS) even where the vocab wants them\n"
            "  --special         parse special-token text such as <|im_start|>\n"
            "  --ids             print the ids on one line, separated by spaces\n"
            "\n"
            "The text is stdin, byte for byte. Without --ids, one line per token: the id, a tab,\n"
            "and the token's text with \\\\, \\n, \\r, \\t, other control bytes and bytes that\n"
            "are not whole UTF-8 characters escaped (\\xNN).\n");
}

/* Reads all of f; returns malloc'd bytes (NUL-terminated) or NULL. */
static char *read_all(FILE *f, size_t *n) {
    size_t cap = 1 << 16, len = 0;
    char *buf = malloc(cap);
    if (!buf) return NULL;
    for (;;) {
        if (len + 1 >= cap) {
            char *nb = realloc(buf, cap * 2);
            if (!nb) {
                free(buf);
                return NULL;
            }
            buf = nb;
            cap *= 2;
        }
        size_t r = fread(buf + len, 1, cap - len - 1, f);
        if (r == 0) break;
        len += r;
    }
    if (ferror(f)) {
        free(buf);
        return NULL;
    }
    buf[len] = 0;
    *n = len;
    return buf;
}

/* Length of the valid UTF-8 character at s[0..n), or 0. */
static int utf8_char(const unsigned char *s, size_t n) {
    int l = s[0] < 0x80         ? 1
            : (s[0] >> 5) == 6  ? 2
            : (s[0] >> 4) == 14 ? 3
            : (s[0] >> 3) == 30 ? 4
                                : 0;
    if (l == 0 || (size_t)l > n) return 0;
    for (int i = 1; i < l; i++)
        if ((s[i] & 0xC0) != 0x80) return 0;
    return l;
}

static void print_escaped(const char *p, size_t n) {
    const unsigned char *s = (const unsigned char *)p;
    for (size_t i = 0; i < n;) {
        unsigned char c = s[i];
        if (c == '\\')
            fputs("\\\\", stdout);
        else if (c == '\n')
            fputs("\\n", stdout);
        else if (c == '\r')
            fputs("\\r", stdout);
        else if (c == '\t')
            fputs("\\t", stdout);
        else if (c < 0x20 || c == 0x7F)
            printf("\\x%02X", c);
        if (c == '\\' || c < 0x20 || c == 0x7F) {
            i++;
            continue;
        }
        int l = utf8_char(s + i, n - i);
        if (l == 0) {
            printf("\\x%02X", c);
            i++;
        } else {
            fwrite(s + i, 1, (size_t)l, stdout);
            i += (size_t)l;
        }
    }
}

int xllm_cmd_tokenize(int argc, char **argv) {
    const char *cmd = "tokenize", *path = NULL;
    bool add_special = true, parse_special = false, ids_only = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "-m") || !strcmp(a, "--model")) {
            if (!(path = xllm_cli_value(cmd, argc, argv, &i))) return 1;
        } else if (!strcmp(a, "--no-bos")) {
            add_special = false;
        } else if (!strcmp(a, "--special")) {
            parse_special = true;
        } else if (!strcmp(a, "--ids")) {
            ids_only = true;
        } else {
            fprintf(stderr, "xllm tokenize: unknown option '%s'\n", a);
            usage(stderr);
            return 1;
        }
    }
    if (!path) {
        fprintf(stderr, "xllm tokenize: -m MODEL_OR_DIR is required\n");
        usage(stderr);
        return 1;
    }
    char err[512] = "";
    xllm_tokenizer *tok = NULL;
    xllm_status st = xllm_tokenizer_load(path, &tok, err, sizeof(err));
    if (st != XLLM_OK) {
        fprintf(stderr, "xllm tokenize: %s\n", err[0] ? err : xllm_status_str(st));
        return 1;
    }
    size_t len = 0;
    char *text = read_all(stdin, &len);
    if (!text) {
        fprintf(stderr, "xllm tokenize: cannot read stdin\n");
        xllm_tokenizer_free(tok);
        return 1;
    }
    int32_t need = xllm_tokenize(tok, text, len, NULL, 0, add_special, parse_special);
    int32_t *ids = NULL;
    int32_t n = need;
    if (need < 0) {
        ids = malloc(sizeof(int32_t) * (size_t)-need);
        n = ids ? xllm_tokenize(tok, text, len, ids, -need, add_special, parse_special) : -1;
    }
    if (n < 0 || need == INT32_MIN) {
        fprintf(stderr, "xllm tokenize: the input is too large\n");
        free(ids);
        free(text);
        xllm_tokenizer_free(tok);
        return 1;
    }
    char small[256];
    for (int32_t i = 0; i < n; i++) {
        if (ids_only) {
            printf(i ? " %d" : "%d", ids[i]);
            continue;
        }
        char *piece = small;
        int32_t k = xllm_token_to_piece(tok, ids[i], small, sizeof(small), true);
        if (k < 0 && k != INT32_MIN) {
            piece = malloc((size_t)-k);
            k = piece ? xllm_token_to_piece(tok, ids[i], piece, -k, true) : 0;
        }
        printf("%d\t", ids[i]);
        if (k > 0) print_escaped(piece, (size_t)k);
        putchar('\n');
        if (piece != small) free(piece);
    }
    if (ids_only) putchar('\n');
    free(ids);
    free(text);
    xllm_tokenizer_free(tok);
    if (fflush(stdout) != 0) {
        fprintf(stderr, "xllm tokenize: cannot write stdout\n");
        return 1;
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------- */
/* bench-tokenize                                                                            */
/* ---------------------------------------------------------------------------------------- */

static void bench_usage(FILE *f) {
    fprintf(f,
            "usage: xllm bench-tokenize -m MODEL_OR_DIR [--special] [--min-seconds S] FILE...\n"
            "\n"
            "Encodes each file (a .json file of ShareGPT prompts is read as its prompts: every\n"
            "\"prompt\" or human \"value\" string, each encoded on its own) on this one thread,\n"
            "repeating until S seconds of CPU time (default 2) have passed, and prints MB/s and\n"
            "tokens/s per CPU second (and MB/s of wall time).\n");
}

typedef struct text_list {
    char **s;
    size_t *n;
    size_t count, cap, bytes;
} text_list;

static void list_add(text_list *l, const char *s, size_t n) {
    if (l->count == l->cap) {
        l->cap = l->cap ? l->cap * 2 : 64;
        l->s = realloc(l->s, l->cap * sizeof(char *));
        l->n = realloc(l->n, l->cap * sizeof(size_t));
        if (!l->s || !l->n) abort();
    }
    char *c = malloc(n + 1);
    if (!c) abort();
    memcpy(c, s, n);
    c[n] = 0;
    l->s[l->count] = c;
    l->n[l->count++] = n;
    l->bytes += n;
}

/* CPU seconds of this thread: the machine may be shared, and the encoder runs on one core. */
static double cpu_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void list_free(text_list *l) {
    for (size_t i = 0; i < l->count; i++) free(l->s[i]);
    free(l->s);
    free(l->n);
}

/* Collects ShareGPT-style prompts: "prompt" strings, and "value" strings of {"from": "human"}
 * turns (objects with a "prompt" are not searched further). */
static void collect_prompts(json_t *j, text_list *out) {
    if (json_is_array(j)) {
        size_t i;
        json_t *v;
        json_array_foreach(j, i, v) collect_prompts(v, out);
        return;
    }
    if (!json_is_object(j)) return;
    json_t *p = json_object_get(j, "prompt");
    if (json_is_string(p)) {
        list_add(out, json_string_value(p), json_string_length(p));
        return;
    }
    const char *from = json_string_value(json_object_get(j, "from"));
    json_t *val = json_object_get(j, "value");
    if (from && !strcmp(from, "human") && json_is_string(val)) {
        list_add(out, json_string_value(val), json_string_length(val));
        return;
    }
    const char *key;
    json_t *v;
    json_object_foreach(j, key, v) collect_prompts(v, out);
}

int xllm_cmd_bench_tokenize(int argc, char **argv) {
    const char *cmd = "bench-tokenize", *path = NULL;
    bool parse_special = false;
    float min_s = 2.0f;
    const char *files[64];
    int n_files = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            bench_usage(stdout);
            return 0;
        } else if (!strcmp(a, "-m") || !strcmp(a, "--model")) {
            if (!(path = xllm_cli_value(cmd, argc, argv, &i))) return 1;
        } else if (!strcmp(a, "--special")) {
            parse_special = true;
        } else if (!strcmp(a, "--min-seconds")) {
            const char *v = xllm_cli_value(cmd, argc, argv, &i);
            if (!v || !xllm_cli_float(cmd, a, v, &min_s)) return 1;
        } else if (a[0] == '-' && a[1]) {
            fprintf(stderr, "xllm bench-tokenize: unknown option '%s'\n", a);
            bench_usage(stderr);
            return 1;
        } else if (n_files < 64) {
            files[n_files++] = a;
        }
    }
    if (!path || n_files == 0) {
        fprintf(stderr, "xllm bench-tokenize: -m MODEL_OR_DIR and at least one FILE are needed\n");
        bench_usage(stderr);
        return 1;
    }
    char err[512] = "";
    xllm_tokenizer *tok = NULL;
    double t0 = xllm_cli_now();
    xllm_status st = xllm_tokenizer_load(path, &tok, err, sizeof(err));
    if (st != XLLM_OK) {
        fprintf(stderr, "xllm bench-tokenize: %s\n", err[0] ? err : xllm_status_str(st));
        return 1;
    }
    printf("tokenizer: %s (%s, pre %s, %d tokens), loaded in %.2f s\n", path,
           xllm_tokenizer_type(tok), xllm_tokenizer_pre(tok), xllm_tokenizer_n_vocab(tok),
           xllm_cli_now() - t0);
    int rc = 0;
    for (int fi = 0; fi < n_files; fi++) {
        FILE *f = fopen(files[fi], "rb");
        size_t len = 0;
        char *data = f ? read_all(f, &len) : NULL;
        if (f) fclose(f);
        if (!data) {
            fprintf(stderr, "xllm bench-tokenize: cannot read %s\n", files[fi]);
            rc = 1;
            continue;
        }
        text_list texts = {0};
        size_t fl = strlen(files[fi]);
        if (fl > 5 && !strcmp(files[fi] + fl - 5, ".json")) {
            json_error_t je;
            json_t *j = json_loadb(data, len, 0, &je);
            if (!j) {
                fprintf(stderr, "xllm bench-tokenize: %s: line %d: %s\n", files[fi], je.line,
                        je.text);
                free(data);
                rc = 1;
                continue;
            }
            collect_prompts(j, &texts);
            json_decref(j);
        } else {
            list_add(&texts, data, len);
        }
        free(data);
        if (texts.count == 0 || texts.bytes == 0) {
            fprintf(stderr, "xllm bench-tokenize: %s: no text\n", files[fi]);
            list_free(&texts);
            rc = 1;
            continue;
        }
        size_t cap = 0;
        for (size_t k = 0; k < texts.count; k++)
            if (texts.n[k] > cap) cap = texts.n[k];
        cap += 16;
        int32_t *ids = malloc(cap * sizeof(int32_t));
        if (!ids) abort();
        double start = cpu_now(), wall0 = xllm_cli_now(), el = 0;
        size_t bytes = 0, tokens = 0;
        int rounds = 0;
        do {
            for (size_t k = 0; k < texts.count; k++) {
                int32_t n = xllm_tokenize(tok, texts.s[k], texts.n[k], ids, (int32_t)cap, false,
                                          parse_special);
                if (n < 0) {
                    fprintf(stderr, "xllm bench-tokenize: tokenize failed\n");
                    abort();
                }
                tokens += (size_t)n;
                bytes += texts.n[k];
            }
            rounds++;
            el = cpu_now() - start;
        } while (el < min_s);
        double wall = xllm_cli_now() - wall0;
        printf("%s: %zu texts, %.3f MB, %d rounds: %.2f MB/s (%.2f MB/s wall), %.0f tokens/s, "
               "%.2f bytes/token\n",
               files[fi], texts.count, (double)texts.bytes / 1e6, rounds, (double)bytes / 1e6 / el,
               (double)bytes / 1e6 / wall, (double)tokens / el,
               tokens ? (double)bytes / (double)tokens : 0.0);
        free(ids);
        list_free(&texts);
    }
    xllm_tokenizer_free(tok);
    return rc;
}
