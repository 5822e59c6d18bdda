/* Helpers shared by the subcommands. */
#include "cli/common.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

bool xllm_cli_int(const char *cmd, const char *opt, const char *s, int64_t lo, int64_t hi,
                  int64_t *out) {
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) {
        fprintf(stderr, "xllm %s: bad value '%s' for %s (expected an integer in %lld..%lld)\n", cmd,
                s, opt, (long long)lo, (long long)hi);
        return false;
    }
    *out = v;
    return true;
}

bool xllm_cli_float(const char *cmd, const char *opt, const char *s, float *out) {
    char *end;
    errno = 0;
    float v = strtof(s, &end);
    if (errno || end == s || *end || !isfinite(v)) {
        fprintf(stderr, "xllm %s: bad value '%s' for %s (expected a number)\n", cmd, s, opt);
        return false;
    }
    *out = v;
    return true;
}

const char *xllm_cli_value(const char *cmd, int argc, char **argv, int *i) {
    if (*i + 1 >= argc) {
        fprintf(stderr, "xllm %s: option %s needs a value\n", cmd, argv[*i]);
        return NULL;
    }
    return argv[++*i];
}

bool xllm_cli_kv_type(const char *cmd, const char *s, xllm_dtype *out) {
    if (!strcmp(s, "f32"))
        *out = XLLM_DTYPE_F32;
    else if (!strcmp(s, "f16"))
        *out = XLLM_DTYPE_F16;
    else {
        fprintf(stderr, "xllm %s: bad KV type '%s' (expected f32 or f16)\n", cmd, s);
        return false;
    }
    return true;
}

int xllm_cli_kv_option(const char *cmd, int argc, char **argv, int *i, xllm_context_params *cp) {
    const char *a = argv[*i], *v;
    if (strcmp(a, "--kv-type") && strcmp(a, "--kv-layout") && strcmp(a, "--kv-memory") &&
        strcmp(a, "--kv-block-tokens"))
        return 0;
    if (!(v = xllm_cli_value(cmd, argc, argv, i))) return -1;
    if (!strcmp(a, "--kv-type")) return xllm_cli_kv_type(cmd, v, &cp->kv_type) ? 1 : -1;
    if (!strcmp(a, "--kv-layout")) {
        if (!strcmp(v, "xtensor"))
            cp->kv_layout = XLLM_KV_LAYOUT_XTENSOR;
        else if (!strcmp(v, "paged"))
            cp->kv_layout = XLLM_KV_LAYOUT_PAGED;
        else {
            fprintf(stderr, "xllm %s: bad KV layout '%s' (expected xtensor or paged)\n", cmd, v);
            return -1;
        }
        return 1;
    }
    int64_t n;
    if (!strcmp(a, "--kv-memory")) {
        /* bytes, with an optional K/M/G suffix (powers of 1024) */
        char *end;
        errno = 0;
        double x = strtod(v, &end);
        double mul = 1;
        if (*end == 'K' || *end == 'k')
            mul = 1024.0, end++;
        else if (*end == 'M' || *end == 'm')
            mul = 1024.0 * 1024, end++;
        else if (*end == 'G' || *end == 'g')
            mul = 1024.0 * 1024 * 1024, end++;
        if (errno || end == v || *end || x <= 0 || x * mul > 1e15) {
            fprintf(stderr, "xllm %s: bad value '%s' for --kv-memory (bytes, e.g. 512M)\n", cmd, v);
            return -1;
        }
        cp->kv_memory = (size_t)(x * mul);
        return 1;
    }
    if (!xllm_cli_int(cmd, a, v, 1, 1 << 20, &n)) return -1;
    cp->kv_block_tokens = (int32_t)n;
    return 1;
}

double xllm_cli_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

typedef struct progress {
    int last;
} progress;

static void draw_progress(float frac, void *user) {
    progress *p = user;
    int pct = (int)(frac * 100.0f + 0.5f);
    if (pct == p->last) return;
    p->last = pct;
    const int width = 40;
    int fill = pct * width / 100;
    fprintf(stderr, "\rloading [");
    for (int i = 0; i < width; i++) fputc(i < fill ? '=' : ' ', stderr);
    fprintf(stderr, "] %3d%%", pct);
    if (pct >= 100) fputc('\n', stderr);
    fflush(stderr);
}

xllm_model *xllm_cli_load_model(const char *cmd, const char *path, bool quiet, bool no_mmap,
                                bool low_memory) {
    xllm_model_params mp = xllm_model_default_params();
    mp.no_mmap = no_mmap;
    mp.low_memory = low_memory;
    progress pr = {.last = -1};
    struct stat st;
    if (!quiet && isatty(STDERR_FILENO) && stat(path, &st) == 0 && st.st_size > (64 << 20)) {
        mp.progress = draw_progress;
        mp.progress_user = &pr;
    }
    xllm_model *m = NULL;
    char err[1024];
    if (xllm_model_load(path, &mp, &m, err, sizeof(err)) != XLLM_OK) {
        fprintf(stderr, "xllm %s: %s\n", cmd, err);
        return NULL;
    }
    xllm_cli_report_layout(cmd, m);
    return m;
}

void xllm_cli_report_layout(const char *cmd, const xllm_model *m) {
    static const char *const names[] = {"panel", "low-memory", "dense"};
    xllm_model_layout_info li;
    xllm_model_layout(m, &li);
    if (li.layout == li.asked) return;
    fprintf(stderr,
            "xllm %s: weights in the %s layout: the %s layout's panels (%.2f GB) would not fit "
            "in the %.2f GB of memory available (an eighth kept free)\n",
            cmd, names[li.layout], names[li.asked], (double)li.wanted_bytes / 1e9,
            (double)li.available_bytes / 1e9);
}

const char *xllm_cli_config_template(json_t *cfg) {
    json_t *ct = json_object_get(cfg, "chat_template");
    if (json_is_array(ct)) {
        size_t i;
        json_t *e, *found = NULL;
        json_array_foreach(ct, i, e) {
            json_t *name = json_object_get(e, "name");
            if (json_is_string(name) && !strcmp(json_string_value(name), "default"))
                found = json_object_get(e, "template");
        }
        ct = found;
    }
    return json_string_value(ct);
}
