/* xllm bench-serve prompts: ShareGPT-style JSON files and random-word prompts of a chosen
 * length (see bench_serve.h). */
#include <dirent.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "cli/bench_serve.h"
#include "util/common.h"

uint64_t xllm_bserve_rand(uint64_t *s) {
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * 2685821657736338717ull;
}

double xllm_bserve_rand_unit(uint64_t *s) {
    return (double)(xllm_bserve_rand(s) >> 11) / (double)(1ull << 53);
}

int32_t xllm_bserve_estimate_tokens(const char *text) {
    size_t n = strlen(text);
    size_t t = (n + 3) / 4;
    return t > INT32_MAX ? INT32_MAX : (t ? (int32_t)t : 1);
}

void xllm_bserve_dataset_free(xllm_bserve_dataset *d) {
    if (!d) return;
    for (size_t i = 0; i < d->n; i++) free(d->v[i].text);
    free(d->v);
    d->v = NULL;
    d->n = 0;
}

static void push(xllm_bserve_dataset *d, size_t *cap, const char *text, int32_t in, int32_t out) {
    if (d->n == *cap) {
        *cap = *cap ? *cap * 2 : 64;
        d->v = xllm_xrealloc(d->v, *cap * sizeof(*d->v));
    }
    d->v[d->n++] = (xllm_bserve_prompt){xllm_xstrdup(text), in, out};
}

static int32_t int_field(json_t *o, const char *key) {
    json_t *v = json_object_get(o, key);
    if (!json_is_integer(v)) return 0;
    json_int_t x = json_integer_value(v);
    return x < 0 ? 0 : x > INT32_MAX ? INT32_MAX : (int32_t)x;
}

/* One entry of either shape; entries without a usable prompt are skipped. */
static void add_entry(xllm_bserve_dataset *d, size_t *cap, json_t *e, int32_t max_input) {
    const char *prompt = NULL, *answer = NULL;
    int32_t in = 0, out = 0;
    if (!json_is_object(e)) return;
    json_t *conv = json_object_get(e, "conversations");
    const char *p = json_string_value(json_object_get(e, "prompt"));
    if (p) {
        prompt = p;
        answer = json_string_value(json_object_get(e, "response"));
        in = int_field(e, "prompt_tokens");
        out = int_field(e, "response_tokens");
    } else if (json_is_array(conv)) {
        size_t i;
        json_t *turn;
        json_array_foreach(conv, i, turn) {
            const char *from = json_string_value(json_object_get(turn, "from"));
            const char *value = json_string_value(json_object_get(turn, "value"));
            if (!from || !value) continue;
            if (!prompt && (!strcmp(from, "human") || !strcmp(from, "user"))) {
                prompt = value;
            } else if (prompt && (!strcmp(from, "gpt") || !strcmp(from, "assistant"))) {
                answer = value;
                break;
            }
        }
    }
    if (!prompt || !prompt[0]) return;
    if (in <= 0) in = xllm_bserve_estimate_tokens(prompt);
    if (out <= 0 && answer && answer[0]) out = xllm_bserve_estimate_tokens(answer);
    if (max_input > 0 && in > max_input) return;
    push(d, cap, prompt, in, out);
}

static int load_file(const char *path, int32_t max_input, xllm_bserve_dataset *d, size_t *cap,
                     char *err, size_t err_size) {
    json_error_t je;
    json_t *root = json_load_file(path, 0, &je);
    if (!root) {
        xllm_set_err(err, err_size, "%s: %s (line %d)", path, je.text, je.line);
        return -1;
    }
    if (!json_is_array(root)) {
        json_decref(root);
        xllm_set_err(err, err_size, "%s: expected a JSON array of conversations", path);
        return -1;
    }
    size_t i;
    json_t *e;
    json_array_foreach(root, i, e) add_entry(d, cap, e, max_input);
    json_decref(root);
    return 0;
}

static int cmp_str(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

int xllm_bserve_load_sharegpt(const char *path, int32_t max_input, xllm_bserve_dataset *out,
                              char *err, size_t err_size) {
    memset(out, 0, sizeof(*out));
    size_t cap = 0;
    struct stat st;
    if (stat(path, &st) != 0) {
        xllm_set_err(err, err_size, "cannot open dataset '%s'", path);
        return -1;
    }
    if (!S_ISDIR(st.st_mode)) {
        if (load_file(path, max_input, out, &cap, err, err_size)) goto fail;
    } else {
        DIR *dir = opendir(path);
        if (!dir) {
            xllm_set_err(err, err_size, "cannot open dataset folder '%s'", path);
            return -1;
        }
        char **names = NULL;
        size_t n = 0, ncap = 0;
        struct dirent *de;
        while ((de = readdir(dir))) {
            size_t l = strlen(de->d_name);
            if (l < 6 || strcmp(de->d_name + l - 5, ".json") != 0) continue;
            if (n == ncap) {
                ncap = ncap ? ncap * 2 : 8;
                names = xllm_xrealloc(names, ncap * sizeof(*names));
            }
            names[n++] = xllm_xstrdup(de->d_name);
        }
        closedir(dir);
        if (n) qsort(names, n, sizeof(*names), cmp_str);
        int rc = 0;
        for (size_t i = 0; i < n; i++) {
            size_t len = strlen(path) + strlen(names[i]) + 2;
            char *full = xllm_xmalloc(len);
            snprintf(full, len, "%s/%s", path, names[i]);
            if (!rc) rc = load_file(full, max_input, out, &cap, err, err_size);
            free(full);
            free(names[i]);
        }
        free(names);
        if (rc) goto fail;
        if (n == 0) {
            xllm_set_err(err, err_size, "no .json files in dataset folder '%s'", path);
            goto fail;
        }
    }
    if (out->n == 0) {
        xllm_set_err(err, err_size, "dataset '%s' has no usable prompts%s", path,
                     max_input > 0 ? " within --max-input-tokens" : "");
        goto fail;
    }
    return 0;
fail:
    xllm_bserve_dataset_free(out);
    return -1;
}

/* Short, frequent English words: each is a single BPE token with its leading space. */
static const char *const WORDS[] = {
    "the",   "of",    "and",   "to",     "in",   "is",   "you",   "that",   "it",    "he",
    "was",   "for",   "on",    "are",    "as",   "with", "his",   "they",   "at",    "be",
    "this",  "have",  "from",  "or",     "one",  "had",  "by",    "word",   "but",   "not",
    "what",  "all",   "were",  "we",     "when", "your", "can",   "said",   "there", "use",
    "an",    "each",  "which", "she",    "do",   "how",  "their", "if",     "will",  "up",
    "other", "about", "out",   "many",   "then", "them", "these", "so",     "some",  "her",
    "would", "make",  "like",  "him",    "into", "time", "has",   "look",   "two",   "more",
    "write", "go",    "see",   "number", "no",   "way",  "could", "people", "my",    "than",
    "first", "water", "been",  "call",   "who",  "oil",  "its",   "now",    "find",  "long",
    "down",  "day",   "did",   "get",    "come", "made", "may",   "part",   "over",  "new",
};

static int32_t draw_len(uint64_t *s, int32_t n, double range) {
    if (range <= 0 || n <= 1) return n < 1 ? 1 : n;
    double lo = n * (1.0 - range), hi = n * (1.0 + range);
    int32_t v = (int32_t)(lo + (hi - lo) * xllm_bserve_rand_unit(s) + 0.5);
    return v < 1 ? 1 : v;
}

void xllm_bserve_make_random(uint64_t seed, size_t n, int32_t n_in, int32_t n_out, double range,
                             xllm_bserve_dataset *out) {
    uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
    size_t n_words = sizeof(WORDS) / sizeof(WORDS[0]);
    out->v = xllm_xcalloc(n ? n : 1, sizeof(*out->v));
    out->n = n;
    for (size_t i = 0; i < n; i++) {
        int32_t in = draw_len(&s, n_in, range), o = draw_len(&s, n_out, range);
        size_t cap = (size_t)in * 8 + 1, len = 0;
        char *t = xllm_xmalloc(cap);
        for (int32_t w = 0; w < in; w++) {
            const char *word = WORDS[xllm_bserve_rand(&s) % n_words];
            size_t wl = strlen(word);
            if (len + wl + 2 > cap) {
                cap = cap * 2 + wl + 2;
                t = xllm_xrealloc(t, cap);
            }
            if (w) t[len++] = ' ';
            memcpy(t + len, word, wl);
            len += wl;
        }
        t[len] = '\0';
        out->v[i] = (xllm_bserve_prompt){t, in, o};
    }
}
