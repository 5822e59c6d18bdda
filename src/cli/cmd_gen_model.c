/* xllm gen-model: writes a GGUF with random weights in the shape of a named model (or given
 * dimensions), any supported weight type or llama.cpp's q4_K_M mix, with a real tokenizer
 * (copied from another GGUF, or converted from Hugging Face tokenizer files), so benchmarks run
 * on realistic sizes without downloads. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli/cli.h"
#include "cli/common.h"
#include "compute/dtype.h"
#include "compute/threadpool.h"
#include "gguf/gguf.h"
#include "gguf/gguf_write.h"
#include "tokenizer/tokenizer.h"

typedef struct shape {
    const char *like;
    const char *arch; /* llama, qwen2, qwen3, qwen3moe */
    int64_t embd, layers, heads, heads_kv, head_dim, ff, vocab, experts, experts_used, ff_exp;
    bool tied;
    float theta, eps;
    int64_t ctx;
} shape;

/* Shapes from the models' config.json files (hidden_size, num_hidden_layers, ...). */
static const shape k_shapes[] = {
    {"qwen3-0.6b", "qwen3", 1024, 28, 16, 8, 128, 3072, 151936, 0, 0, 0, true, 1e6f, 1e-6f, 40960},
    {"qwen3-1.7b", "qwen3", 2048, 28, 16, 8, 128, 6144, 151936, 0, 0, 0, true, 1e6f, 1e-6f, 40960},
    {"qwen2.5-0.5b", "qwen2", 896, 24, 14, 2, 64, 4864, 151936, 0, 0, 0, true, 1e6f, 1e-6f, 32768},
    {"llama-3.2-1b", "llama", 2048, 16, 32, 8, 64, 8192, 128256, 0, 0, 0, true, 5e5f, 1e-5f,
     131072},
    {"qwen3-30b-a3b", "qwen3moe", 2048, 48, 32, 4, 128, 6144, 151936, 128, 8, 768, false, 1e6f,
     1e-6f, 40960},
};

typedef struct gen {
    shape s;
    xllm_dtype type; /* base type */
    bool q4_k_m;     /* llama.cpp's Q4_K_M mix */
    uint64_t seed;
    xllm_gguf_writer *w;
    /* per declared tensor */
    int64_t n_t;
    xllm_dtype types[4096];
    int64_t ne[4096][3];
    bool is_norm[4096];
    xllm_threadpool *tp;
    int64_t done_bytes, total_bytes;
} gen;

static bool parse_type(const char *s, xllm_dtype *t, bool *mix) {
    *mix = false;
    if (!strcmp(s, "q4_k_m") || !strcmp(s, "q4_K_M")) {
        *t = XLLM_DTYPE_Q4_K;
        *mix = true;
        return true;
    }
    static const xllm_dtype all[] = {
        XLLM_DTYPE_F32,  XLLM_DTYPE_F16,  XLLM_DTYPE_BF16, XLLM_DTYPE_Q8_0, XLLM_DTYPE_Q4_0,
        XLLM_DTYPE_Q4_1, XLLM_DTYPE_Q5_0, XLLM_DTYPE_Q5_1, XLLM_DTYPE_Q2_K, XLLM_DTYPE_Q3_K,
        XLLM_DTYPE_Q4_K, XLLM_DTYPE_Q5_K, XLLM_DTYPE_Q6_K};
    for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++)
        if (!strcasecmp(s, xllm_dtype_name(all[i]))) {
            *t = all[i];
            return true;
        }
    return false;
}

/* llama.cpp's rule for the layers that get more bits in the _M mixes. */
static bool more_bits(int64_t i, int64_t n) {
    return i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2;
}

/* Type of a matrix with rows of n0 elements; falls back when rows do not fit the block. */
static xllm_dtype fit(xllm_dtype t, int64_t n0) {
    const xllm_dtype_traits *tr = xllm_dtype_get_traits(t);
    if (n0 % tr->block_size == 0) return t;
    return n0 % 32 == 0 ? XLLM_DTYPE_Q8_0 : XLLM_DTYPE_F16;
}

static void add(gen *g, const char *name, int n_dims, int64_t n0, int64_t n1, int64_t n2,
                xllm_dtype t) {
    const bool norm = n_dims == 1;
    if (norm) t = XLLM_DTYPE_F32;
    t = fit(t, n0);
    int64_t ne[3] = {n0, n1, n2};
    int64_t i = xllm_gguf_writer_tensor(g->w, name, t, n_dims, ne);
    g->types[i] = t;
    g->is_norm[i] = norm;
    memcpy(g->ne[i], ne, sizeof(ne));
    g->n_t = i + 1;
    g->total_bytes +=
        (int64_t)xllm_dtype_row_bytes(t, n0) * (n_dims > 1 ? n1 : 1) * (n_dims > 2 ? n2 : 1);
}

static uint64_t splitmix(uint64_t *s) {
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

typedef struct fill_task {
    gen *g;
    int64_t i;
    uint8_t *buf;
    int64_t rows, n0;
    size_t row_bytes;
    float *tmp; /* (n_threads, n0) */
} fill_task;

static void fill_worker(void *arg, int ith, int nth) {
    fill_task *f = arg;
    int64_t lo, hi;
    xllm_split_range(f->rows, ith, nth, &lo, &hi);
    float *x = f->tmp + (size_t)ith * (size_t)f->n0;
    for (int64_t r = lo; r < hi; r++) {
        uint64_t st = f->g->seed ^ ((uint64_t)f->i << 40) ^ (uint64_t)r * 0x9e3779b97f4a7c15ull;
        for (int64_t k = 0; k < f->n0; k++) {
            /* uniform in [-0.05, 0.05): std ~0.029, the scale of trained weights */
            float u = (float)(splitmix(&st) >> 40) * (1.0f / 16777216.0f);
            x[k] = f->g->is_norm[f->i] ? 0.9f + 0.2f * u : (u - 0.5f) * 0.1f;
        }
        xllm_quant_row_ref(f->g->types[f->i], x, f->buf + (size_t)r * f->row_bytes, f->n0);
    }
}

static bool fill(int64_t i, void *buf, uint64_t n_bytes, void *user) {
    gen *g = user;
    const int64_t n0 = g->ne[i][0];
    fill_task f = {g, i, buf, 0, n0, xllm_dtype_row_bytes(g->types[i], n0), NULL};
    f.rows = (int64_t)(n_bytes / f.row_bytes);
    f.tmp = malloc((size_t)xllm_threadpool_n_threads(g->tp) * (size_t)n0 * sizeof(float));
    if (!f.tmp) return false;
    xllm_threadpool_run(g->tp, fill_worker, &f);
    free(f.tmp);
    g->done_bytes += (int64_t)n_bytes;
    if (isatty(STDERR_FILENO)) /* a progress line only for a person watching */
        fprintf(stderr, "\rgen-model: %5.1f%%",
                100.0 * (double)g->done_bytes / (double)g->total_bytes);
    return true;
}

/* DIR/tokenizer_config.json's chat template (a string, or the "default" of a named list) as
 * tokenizer.chat_template; nothing when the folder has none. */
static void write_hf_template(xllm_gguf_writer *w, const char *dir) {
    char path[4200];
    snprintf(path, sizeof(path), "%s/tokenizer_config.json", dir);
    json_t *cfg = json_load_file(path, 0, NULL);
    const char *ct = xllm_cli_config_template(cfg);
    if (ct) xllm_gguf_writer_str(w, "tokenizer.chat_template", ct);
    json_decref(cfg);
}

static void usage(FILE *f) {
    fprintf(
        f,
        "usage: xllm gen-model -o OUT.gguf (--like NAME | --arch A --embd E --layers L --heads H\n"
        "                      --heads-kv HK --head-dim D --ff F --vocab V [--experts N\n"
        "                      --experts-used K --ff-exp F] [--untied])\n"
        "                      --tokenizer PATH [--layers N] [--type T] [--seed S] [-t N]\n"
        "  --like      qwen3-0.6b | qwen3-1.7b | qwen2.5-0.5b | llama-3.2-1b | qwen3-30b-a3b\n"
        "  --type      f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1 q2_K q3_K q4_K q5_K q6_K q4_K_M\n"
        "              (default q8_0; q4_K_M mixes Q6_K into output, attn_v, ffn_down as\n"
        "              llama.cpp does); norms are always f32\n"
        "  --tokenizer a GGUF (its tokenizer.* metadata is copied and sets the vocab size),\n"
        "              or Hugging Face tokenizer files: a folder with tokenizer.json, or\n"
        "              vocab.json + merges.txt (and tokenizer_config.json for the special\n"
        "              tokens and chat template); the vocab is padded with unused tokens up\n"
        "              to the shape's --vocab where that is larger\n");
}

int xllm_cmd_gen_model(int argc, char **argv) {
    const char *cmd = "gen-model", *out = NULL, *tok = NULL, *type_s = "q8_0";
    shape s = {0};
    bool have_like = false;
    int64_t layers = 0, threads = 0, seed = 1234;
    s.arch = "qwen3";
    s.theta = 1e6f;
    s.eps = 1e-6f;
    s.ctx = 4096;
    s.tied = true;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v;
        int64_t *dst = NULL;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "--untied")) {
            s.tied = false;
            continue;
        }
        if (!(v = xllm_cli_value(cmd, argc, argv, &i))) return 1;
        if (!strcmp(a, "-o")) {
            out = v;
        } else if (!strcmp(a, "--like")) {
            for (size_t k = 0; k < sizeof(k_shapes) / sizeof(k_shapes[0]); k++)
                if (!strcmp(v, k_shapes[k].like)) {
                    s = k_shapes[k];
                    have_like = true;
                }
            if (!have_like) {
                fprintf(stderr, "xllm gen-model: unknown model '%s'\n", v);
                return 1;
            }
        } else if (!strcmp(a, "--arch")) {
            s.arch = v;
        } else if (!strcmp(a, "--type")) {
            type_s = v;
        } else if (!strcmp(a, "--tokenizer")) {
            tok = v;
        } else if (!strcmp(a, "--layers")) {
            dst = &layers;
        } else if (!strcmp(a, "--seed")) {
            dst = &seed;
        } else if (!strcmp(a, "-t")) {
            dst = &threads;
        } else if (!strcmp(a, "--embd")) {
            dst = &s.embd;
        } else if (!strcmp(a, "--heads")) {
            dst = &s.heads;
        } else if (!strcmp(a, "--heads-kv")) {
            dst = &s.heads_kv;
        } else if (!strcmp(a, "--head-dim")) {
            dst = &s.head_dim;
        } else if (!strcmp(a, "--ff")) {
            dst = &s.ff;
        } else if (!strcmp(a, "--vocab")) {
            dst = &s.vocab;
        } else if (!strcmp(a, "--experts")) {
            dst = &s.experts;
        } else if (!strcmp(a, "--experts-used")) {
            dst = &s.experts_used;
        } else if (!strcmp(a, "--ff-exp")) {
            dst = &s.ff_exp;
        } else {
            fprintf(stderr, "xllm gen-model: unknown option '%s'\n", a);
            usage(stderr);
            return 1;
        }
        if (dst && !xllm_cli_int(cmd, a, v, 0, INT32_MAX, dst)) return 1;
    }
    if (layers > 0) s.layers = layers;
    if (!s.heads_kv) s.heads_kv = s.heads;
    if (!s.head_dim && s.heads) s.head_dim = s.embd / s.heads;
    if (!out || s.embd <= 0 || s.layers <= 0 || s.heads <= 0 || s.head_dim <= 0 ||
        (s.ff <= 0 && s.experts <= 0)) {
        fprintf(stderr, "xllm gen-model: need -o and --like or the dimensions\n");
        usage(stderr);
        return 1;
    }
    if (!tok) {
        fprintf(stderr, "xllm gen-model: need --tokenizer (a GGUF, or Hugging Face tokenizer "
                        "files): neither xllm nor llama.cpp loads a model without one\n");
        return 1;
    }
    gen *g = calloc(1, sizeof(gen));
    if (!g) return 1;
    g->s = s;
    g->seed = (uint64_t)seed;
    if (!parse_type(type_s, &g->type, &g->q4_k_m)) {
        fprintf(stderr, "xllm gen-model: unknown type '%s'\n", type_s);
        free(g);
        return 1;
    }
    xllm_gguf *src = NULL;
    xllm_tokenizer *hf = NULL;
    char err[512], hf_dir[4096];
    if (xllm_tokenizer_hf_dir(tok, hf_dir, sizeof(hf_dir))) {
        if (xllm_tokenizer_load(tok, &hf, err, sizeof(err)) != XLLM_OK) {
            fprintf(stderr, "xllm gen-model: %s\n", err);
            free(g);
            return 1;
        }
        /* the model's rows cover every token id; a shape's larger vocab (Qwen: 151936 rows
         * for 151669 tokens) is kept, as in the real files */
        const int64_t n_tok = xllm_tokenizer_n_vocab(hf);
        if (g->s.vocab < n_tok) g->s.vocab = n_tok;
    } else {
        if (xllm_gguf_open(tok, &src, err, sizeof(err)) != XLLM_OK) {
            fprintf(stderr, "xllm gen-model: %s\n", err);
            free(g);
            return 1;
        }
        const xllm_gguf_kv *toks =
            xllm_gguf_get_arr(src, "tokenizer.ggml.tokens", XLLM_GGUF_STRING);
        if (!toks) {
            fprintf(stderr, "xllm gen-model: %s: no tokenizer.ggml.tokens\n", tok);
            xllm_gguf_free(src);
            free(g);
            return 1;
        }
        g->s.vocab = (int64_t)toks->arr_n;
    }
    s = g->s;
    g->w = xllm_gguf_writer_new();
    xllm_gguf_writer *w = g->w;
    char key[160];
#define KEY(suffix) (snprintf(key, sizeof(key), "%s.%s", s.arch, suffix), key)
    xllm_gguf_writer_str(w, "general.architecture", s.arch);
    char name[128];
    snprintf(name, sizeof(name), "random %s %s", have_like ? s.like : s.arch, type_s);
    xllm_gguf_writer_str(w, "general.name", name);
    xllm_gguf_writer_u32(w, KEY("block_count"), (uint32_t)s.layers);
    xllm_gguf_writer_u32(w, KEY("context_length"), (uint32_t)s.ctx);
    xllm_gguf_writer_u32(w, KEY("embedding_length"), (uint32_t)s.embd);
    xllm_gguf_writer_u32(w, KEY("feed_forward_length"), (uint32_t)s.ff);
    xllm_gguf_writer_u32(w, KEY("attention.head_count"), (uint32_t)s.heads);
    xllm_gguf_writer_u32(w, KEY("attention.head_count_kv"), (uint32_t)s.heads_kv);
    xllm_gguf_writer_u32(w, KEY("attention.key_length"), (uint32_t)s.head_dim);
    xllm_gguf_writer_u32(w, KEY("attention.value_length"), (uint32_t)s.head_dim);
    xllm_gguf_writer_u32(w, KEY("rope.dimension_count"), (uint32_t)s.head_dim);
    xllm_gguf_writer_f32(w, KEY("rope.freq_base"), s.theta);
    xllm_gguf_writer_f32(w, KEY("attention.layer_norm_rms_epsilon"), s.eps);
    if (s.experts > 0) {
        xllm_gguf_writer_u32(w, KEY("expert_count"), (uint32_t)s.experts);
        xllm_gguf_writer_u32(w, KEY("expert_used_count"), (uint32_t)s.experts_used);
        xllm_gguf_writer_u32(w, KEY("expert_feed_forward_length"), (uint32_t)s.ff_exp);
    }
    if (src)
        for (uint64_t i = 0; i < src->n_kv; i++)
            if (!strncmp(src->kv[i].key, "tokenizer.", 10) &&
                !(src->kv[i].type == XLLM_GGUF_ARRAY && src->kv[i].arr_type == XLLM_GGUF_ARRAY))
                xllm_gguf_writer_copy(w, &src->kv[i]);
    if (hf) {
        if (xllm_tokenizer_write_gguf(hf, w, (int32_t)s.vocab, err, sizeof(err)) != XLLM_OK) {
            fprintf(stderr, "xllm gen-model: %s: %s\n", tok, err);
            xllm_tokenizer_free(hf);
            xllm_gguf_writer_free(w);
            free(g);
            return 1;
        }
        write_hf_template(w, hf_dir);
    }

    const xllm_dtype base = g->type, q6 = g->q4_k_m ? XLLM_DTYPE_Q6_K : base;
    const int64_t E = s.embd, D = s.head_dim, H = s.heads, HK = s.heads_kv, V = s.vocab;
    add(g, "token_embd.weight", 2, E, V, 1, s.tied ? q6 : base);
    add(g, "output_norm.weight", 1, E, 1, 1, base);
    if (!s.tied) add(g, "output.weight", 2, E, V, 1, q6);
    const bool moe = s.experts > 0;
    for (int64_t il = 0; il < s.layers; il++) {
        char n[128];
        const xllm_dtype more = more_bits(il, s.layers) ? q6 : base;
#define T(suffix) (snprintf(n, sizeof(n), "blk.%" PRId64 ".%s", il, suffix), n)
        add(g, T("attn_norm.weight"), 1, E, 1, 1, base);
        add(g, T("attn_q.weight"), 2, E, H * D, 1, base);
        add(g, T("attn_k.weight"), 2, E, HK * D, 1, base);
        add(g, T("attn_v.weight"), 2, E, HK * D, 1, more);
        add(g, T("attn_output.weight"), 2, H * D, E, 1, base);
        if (!strcmp(s.arch, "qwen2")) {
            add(g, T("attn_q.bias"), 1, H * D, 1, 1, base);
            add(g, T("attn_k.bias"), 1, HK * D, 1, 1, base);
            add(g, T("attn_v.bias"), 1, HK * D, 1, 1, base);
        }
        if (!strcmp(s.arch, "qwen3") || moe) {
            add(g, T("attn_q_norm.weight"), 1, D, 1, 1, base);
            add(g, T("attn_k_norm.weight"), 1, D, 1, 1, base);
        }
        add(g, T("ffn_norm.weight"), 1, E, 1, 1, base);
        if (moe) {
            add(g, T("ffn_gate_inp.weight"), 2, E, s.experts, 1, XLLM_DTYPE_F32);
            add(g, T("ffn_gate_exps.weight"), 3, E, s.ff_exp, s.experts, base);
            add(g, T("ffn_up_exps.weight"), 3, E, s.ff_exp, s.experts, base);
            add(g, T("ffn_down_exps.weight"), 3, s.ff_exp, E, s.experts, more);
        } else {
            add(g, T("ffn_gate.weight"), 2, E, s.ff, 1, base);
            add(g, T("ffn_up.weight"), 2, E, s.ff, 1, base);
            add(g, T("ffn_down.weight"), 2, s.ff, E, 1, more);
        }
#undef T
    }
#undef KEY
    g->tp = xllm_threadpool_new(threads > 0 ? (int)threads : xllm_cpu_count());
    xllm_status st =
        g->tp ? xllm_gguf_writer_write(w, out, fill, g, err, sizeof(err)) : XLLM_ERR_NOMEM;
    if (isatty(STDERR_FILENO)) fprintf(stderr, "\n");
    if (st != XLLM_OK)
        fprintf(stderr, "xllm gen-model: %s\n", g->tp ? err : "no threads");
    else
        fprintf(stderr, "gen-model: wrote %s (%" PRId64 " tensors, %.2f GB)\n", out, g->n_t,
                (double)g->total_bytes / 1e9);
    xllm_threadpool_free(g->tp);
    xllm_gguf_writer_free(w);
    xllm_gguf_free(src);
    xllm_tokenizer_free(hf);
    free(g);
    return st == XLLM_OK ? 0 : 1;
}
