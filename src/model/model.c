/* Model loading: reads hyperparameters from GGUF metadata (with the defaults the format implies),
 * binds weight views for the llama / qwen2 / qwen3 / qwen3moe families, checks every shape. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "compute/cpu/ops.h"
#include "compute/dtype.h"
#include "model/model-impl.h"
#include "tokenizer/tokenizer.h"
#include "util/common.h"

xllm_model_params xllm_model_default_params(void) {
    xllm_model_params p = {0};
    return p;
}

typedef struct loader {
    xllm_model *m;
    char *err;
    size_t err_size;
    bool failed;
} loader;

static const struct {
    const char *name;
    xllm_arch arch;
} k_arches[] = {
    {"llama", XLLM_ARCH_LLAMA},
    {"qwen2", XLLM_ARCH_QWEN2},
    {"qwen3", XLLM_ARCH_QWEN3},
    {"qwen3moe", XLLM_ARCH_QWEN3MOE},
};

/* ---------------------------------------------------------------------------------------- */
/* Hyperparameters                                                                           */
/* ---------------------------------------------------------------------------------------- */

static bool hp_u32(loader *L, const char *suffix, int32_t *out, int64_t dflt) {
    char key[128];
    snprintf(key, sizeof(key), "%s.%s", L->m->arch_name, suffix);
    uint32_t v;
    if (xllm_gguf_get_u32(L->m->gguf, key, &v)) {
        if (v > INT32_MAX) {
            xllm_set_err(L->err, L->err_size, "metadata %s = %u is out of range", key, v);
            return false;
        }
        *out = (int32_t)v;
        return true;
    }
    if (xllm_gguf_find(L->m->gguf, key)) {
        xllm_set_err(L->err, L->err_size, "metadata %s has the wrong type", key);
        return false;
    }
    if (dflt < 0) {
        xllm_set_err(L->err, L->err_size, "metadata %s is missing", key);
        return false;
    }
    *out = (int32_t)dflt;
    return true;
}

static bool hp_f32(loader *L, const char *suffix, float *out, float dflt) {
    char key[128];
    snprintf(key, sizeof(key), "%s.%s", L->m->arch_name, suffix);
    if (xllm_gguf_get_f32(L->m->gguf, key, out)) return true;
    if (xllm_gguf_find(L->m->gguf, key)) {
        xllm_set_err(L->err, L->err_size, "metadata %s has the wrong type", key);
        return false;
    }
    *out = dflt;
    return true;
}

static bool load_hparams(loader *L) {
    xllm_hparams *hp = &L->m->hp;
    if (!hp_u32(L, "embedding_length", &hp->n_embd, -1)) return false;
    if (!hp_u32(L, "block_count", &hp->n_layer, -1)) return false;
    if (!hp_u32(L, "context_length", &hp->n_ctx_train, 2048)) return false;
    if (!hp_u32(L, "attention.head_count", &hp->n_head, -1)) return false;
    if (!hp_u32(L, "attention.head_count_kv", &hp->n_head_kv, hp->n_head)) return false;
    if (hp->n_head <= 0 || hp->n_head_kv <= 0 || hp->n_head % hp->n_head_kv != 0) {
        xllm_set_err(L->err, L->err_size,
                     "metadata: head_count %d must be a positive multiple of head_count_kv %d",
                     hp->n_head, hp->n_head_kv);
        return false;
    }
    if (hp->n_embd <= 0 || hp->n_layer <= 0 || hp->n_layer > 4096) {
        xllm_set_err(L->err, L->err_size, "metadata: embedding_length %d / block_count %d invalid",
                     hp->n_embd, hp->n_layer);
        return false;
    }
    if (!hp_u32(L, "attention.key_length", &hp->head_dim, hp->n_embd / hp->n_head)) return false;
    if (!hp_u32(L, "attention.value_length", &hp->head_dim_v, hp->head_dim)) return false;
    if (!hp_u32(L, "rope.dimension_count", &hp->n_rot, hp->head_dim)) return false;
    if (hp->head_dim <= 0 || hp->head_dim > 1024 || hp->head_dim_v != hp->head_dim ||
        hp->n_rot <= 0 || hp->n_rot > hp->head_dim || hp->n_rot % 2 != 0) {
        xllm_set_err(L->err, L->err_size,
                     "metadata: head size %d / value size %d / rope dims %d not supported",
                     hp->head_dim, hp->head_dim_v, hp->n_rot);
        return false;
    }
    if (!hp_f32(L, "attention.layer_norm_rms_epsilon", &hp->norm_eps, 1e-5f)) return false;
    if (!hp_f32(L, "rope.freq_base", &hp->rope_freq_base, 10000.0f)) return false;
    float scale = 1.0f;
    if (!hp_f32(L, "rope.scaling.factor", &scale, 1.0f)) return false;
    char key[128];
    snprintf(key, sizeof(key), "%s.rope.scaling.type", L->m->arch_name);
    const char *stype = xllm_gguf_get_str(L->m->gguf, key);
    hp->rope_freq_scale = 1.0f;
    if (stype && !strcmp(stype, "linear") && scale > 0)
        hp->rope_freq_scale = 1.0f / scale;
    else if (stype && strcmp(stype, "none") && strcmp(stype, "linear")) {
        xllm_set_err(L->err, L->err_size, "metadata %s = '%s' is not supported", key, stype);
        return false;
    }
    hp->rope_type = L->m->arch == XLLM_ARCH_LLAMA ? XLLM_ROPE_NORM : XLLM_ROPE_NEOX;
    if (L->m->arch == XLLM_ARCH_QWEN3MOE) {
        if (!hp_u32(L, "expert_count", &hp->n_expert, -1)) return false;
        if (!hp_u32(L, "expert_used_count", &hp->n_expert_used, -1)) return false;
        if (!hp_u32(L, "expert_feed_forward_length", &hp->n_ff_exp, 0)) return false;
        if (hp->n_expert <= 0 || hp->n_expert > 1024 || hp->n_expert_used <= 0 ||
            hp->n_expert_used > hp->n_expert) {
            xllm_set_err(L->err, L->err_size, "metadata: expert_count %d / expert_used_count %d",
                         hp->n_expert, hp->n_expert_used);
            return false;
        }
        hp->norm_topk_prob = true;
        if (!hp_u32(L, "feed_forward_length", &hp->n_ff, 0)) return false;
    } else {
        if (!hp_u32(L, "feed_forward_length", &hp->n_ff, -1)) return false;
    }
    return true;
}

/* ---------------------------------------------------------------------------------------- */
/* Weights                                                                                   */
/* ---------------------------------------------------------------------------------------- */

/* Binds a tensor and checks its shape: ne0/ne1/ne2 = expected sizes (0 = any). */
static void bind(loader *L, xllm_weight *w, const char *name, bool required, int64_t ne0,
                 int64_t ne1, int64_t ne2) {
    if (L->failed) return;
    memset(w, 0, sizeof(*w));
    const xllm_gguf_tensor *t = xllm_gguf_find_tensor(L->m->gguf, name);
    if (!t) {
        if (required) {
            xllm_set_err(L->err, L->err_size, "tensor '%s' is missing", name);
            L->failed = true;
        }
        return;
    }
    int64_t want[3] = {ne0, ne1, ne2};
    for (int d = 0; d < 3; d++) {
        int64_t have = t->ne[d];
        if (want[d] > 0 && have != want[d]) {
            xllm_set_err(L->err, L->err_size,
                         "tensor '%s' has shape [%" PRId64 ", %" PRId64 ", %" PRId64
                         "], expected [%" PRId64 ", %" PRId64 ", %" PRId64 "]",
                         name, t->ne[0], t->ne[1], t->ne[2], ne0, ne1, ne2);
            L->failed = true;
            return;
        }
    }
    if (t->ne[3] != 1) {
        xllm_set_err(L->err, L->err_size, "tensor '%s' has 4 dimensions", name);
        L->failed = true;
        return;
    }
    if (t->type == XLLM_DTYPE_Q8_1 || t->type == XLLM_DTYPE_Q8_K) {
        xllm_set_err(L->err, L->err_size, "tensor '%s' has type %s, not supported for weights",
                     name, xllm_dtype_name(t->type));
        L->failed = true;
        return;
    }
    w->data = t->data;
    if (L->m->data_copy)
        w->data = (const uint8_t *)L->m->data_copy +
                  ((const uint8_t *)t->data - (L->m->gguf->base + L->m->gguf->data_offset));
    w->type = t->type;
    for (int d = 0; d < 4; d++) w->ne[d] = t->ne[d];
    w->row_bytes = xllm_dtype_row_bytes(t->type, t->ne[0]);
    w->name = t->name;
}

static void bind_layer(loader *L, int il, xllm_layer *ly) {
    const xllm_hparams *hp = &L->m->hp;
    const int64_t E = hp->n_embd, D = hp->head_dim, H = hp->n_head, HK = hp->n_head_kv;
    const bool moe = L->m->arch == XLLM_ARCH_QWEN3MOE;
    const bool qk_norm = L->m->arch == XLLM_ARCH_QWEN3 || moe;
    char n[128];
#define NAME(s) (snprintf(n, sizeof(n), "blk.%d.%s", il, s), n)
    bind(L, &ly->attn_norm, NAME("attn_norm.weight"), true, E, 1, 1);
    bind(L, &ly->wq, NAME("attn_q.weight"), true, E, H * D, 1);
    bind(L, &ly->wk, NAME("attn_k.weight"), true, E, HK * D, 1);
    bind(L, &ly->wv, NAME("attn_v.weight"), true, E, HK * D, 1);
    bind(L, &ly->wo, NAME("attn_output.weight"), true, H * D, E, 1);
    bind(L, &ly->bq, NAME("attn_q.bias"), L->m->arch == XLLM_ARCH_QWEN2, H * D, 1, 1);
    bind(L, &ly->bk, NAME("attn_k.bias"), L->m->arch == XLLM_ARCH_QWEN2, HK * D, 1, 1);
    bind(L, &ly->bv, NAME("attn_v.bias"), L->m->arch == XLLM_ARCH_QWEN2, HK * D, 1, 1);
    bind(L, &ly->q_norm, NAME("attn_q_norm.weight"), qk_norm, D, 1, 1);
    bind(L, &ly->k_norm, NAME("attn_k_norm.weight"), qk_norm, D, 1, 1);
    bind(L, &ly->ffn_norm, NAME("ffn_norm.weight"), true, E, 1, 1);
    if (moe) {
        bind(L, &ly->ffn_gate_inp, NAME("ffn_gate_inp.weight"), true, E, hp->n_expert, 1);
        /* expert FFN size from the tensor when metadata lacks it */
        if (!L->failed && L->m->hp.n_ff_exp == 0) {
            const xllm_gguf_tensor *t =
                xllm_gguf_find_tensor(L->m->gguf, NAME("ffn_up_exps.weight"));
            if (t) L->m->hp.n_ff_exp = (int32_t)t->ne[1];
        }
        const int64_t F = L->m->hp.n_ff_exp;
        bind(L, &ly->gate_exps, NAME("ffn_gate_exps.weight"), true, E, F, hp->n_expert);
        bind(L, &ly->up_exps, NAME("ffn_up_exps.weight"), true, E, F, hp->n_expert);
        bind(L, &ly->down_exps, NAME("ffn_down_exps.weight"), true, F, E, hp->n_expert);
    } else {
        bind(L, &ly->ffn_gate, NAME("ffn_gate.weight"), true, E, hp->n_ff, 1);
        bind(L, &ly->ffn_up, NAME("ffn_up.weight"), true, E, hp->n_ff, 1);
        bind(L, &ly->ffn_down, NAME("ffn_down.weight"), true, hp->n_ff, E, 1);
    }
#undef NAME
    /* Norm vectors and biases are read as f32 by the forward pass. */
    xllm_weight *vecs[] = {&ly->attn_norm, &ly->ffn_norm, &ly->q_norm, &ly->k_norm,
                           &ly->bq,        &ly->bk,       &ly->bv};
    for (size_t i = 0; i < sizeof(vecs) / sizeof(vecs[0]) && !L->failed; i++) {
        if (vecs[i]->data && vecs[i]->type != XLLM_DTYPE_F32) {
            xllm_set_err(L->err, L->err_size, "tensor '%s' must be f32, is %s", vecs[i]->name,
                         xllm_dtype_name(vecs[i]->type));
            L->failed = true;
        }
    }
}

/* Releases the whole pages inside [p, p + n) of a mapping (anonymous: their bytes read as zeros
 * afterwards; of a file: they are read again from it). Pages shared with bytes outside stay. */
static void release_pages(const void *p, size_t n) {
    const uintptr_t pg = (uintptr_t)sysconf(_SC_PAGESIZE);
    const uintptr_t a = ((uintptr_t)p + pg - 1) & ~(pg - 1), b = ((uintptr_t)p + n) & ~(pg - 1);
    if (b > a) madvise((void *)a, b - a, MADV_DONTNEED);
}

/* Touches every page of the weights so that the first forward pass does not fault them in,
 * reporting progress. With no_mmap, copies the data into anonymous memory instead. */
static xllm_status fault_in(loader *L, const xllm_model_params *p) {
    const xllm_gguf *g = L->m->gguf;
    const uint8_t *src = g->base + g->data_offset;
    size_t n = g->size > g->data_offset ? g->size - g->data_offset : 0;
    if (p->no_mmap && n > 0) {
        L->m->data_copy = xllm_map_huge(n);
        if (!L->m->data_copy) {
            xllm_set_err(L->err, L->err_size, "cannot allocate %zu bytes for the weights", n);
            return XLLM_ERR_NOMEM;
        }
    } else if (n > 0) {
        madvise((void *)((uintptr_t)src & ~(uintptr_t)4095), n + ((uintptr_t)src & 4095),
                MADV_WILLNEED);
    }
    const size_t chunk = 64u << 20;
    volatile uint8_t sink = 0;
    for (size_t off = 0; off < n; off += chunk) {
        size_t len = XLLM_MIN(chunk, n - off);
        if (L->m->data_copy) {
            memcpy((uint8_t *)L->m->data_copy + off, src + off, len);
        } else {
            for (size_t i = 0; i < len; i += 4096) sink ^= src[off + i];
        }
        if (p->progress) p->progress((float)(off + len) / (float)n, p->progress_user);
    }
    (void)sink;
    if (L->m->data_copy) {
        mprotect(L->m->data_copy, n, PROT_READ);
        /* the file's pages of the tensor data are not read again: drop them from the process
         * (they stay in the page cache, which the kernel may reclaim) */
        release_pages(src, n);
    }
    return XLLM_OK;
}

/* The memory the system can still give, in bytes: XLLM_MEM_AVAILABLE when set (a cap the
 * user chooses, or what a test pretends), else MemAvailable of /proc/meminfo; 0 when unknown. */
static uint64_t mem_available(void) {
    const char *env = getenv("XLLM_MEM_AVAILABLE");
    if (env && *env) {
        char *end;
        unsigned long long v = strtoull(env, &end, 10);
        if (*end == '\0') return v;
    }
    FILE *f = fopen("/proc/meminfo", "r");
    if (!f) return 0;
    char line[256];
    unsigned long long kb = 0;
    while (fgets(line, sizeof(line), f))
        if (sscanf(line, "MemAvailable: %llu kB", &kb) == 1) break;
    fclose(f);
    return (uint64_t)kb * 1024;
}

/* The dense quantized matrices (and the output), one at a time, each layer in turn. */
static int model_mats(const xllm_model *m, xllm_mat *out, int cap) {
    const xllm_hparams *hp = &m->hp;
    int n = 0;
    for (int il = 0; il <= hp->n_layer; il++) {
        const xllm_layer *ly = il < hp->n_layer ? &m->layers[il] : NULL;
        const xllm_weight *ws[] = {ly ? &ly->wq : &m->output, ly ? &ly->wk : NULL,
                                   ly ? &ly->wv : NULL,       ly ? &ly->wo : NULL,
                                   ly ? &ly->ffn_gate : NULL, ly ? &ly->ffn_up : NULL,
                                   ly ? &ly->ffn_down : NULL};
        for (size_t i = 0; i < sizeof(ws) / sizeof(ws[0]); i++) {
            if (!ws[i] || !ws[i]->data) continue;
            if (out && n < cap)
                out[n] = (xllm_mat){ws[i]->data, ws[i]->type, ws[i]->ne[1], ws[i]->ne[0],
                                    ws[i]->row_bytes};
            n++;
        }
    }
    return n;
}

/* The most bytes of panels a matrix may take in a layout: low memory keeps none wider than
 * 9/8 of the dense rows; BF16 panels only in place of an anonymous copy (beside mapped file
 * pages they would double the memory, for no more than the per-call packing they save). */
static size_t pack_max(const xllm_model *m, const xllm_mat *w, xllm_weight_layout layout) {
    const size_t dense = (size_t)w->n_rows * w->row_bytes;
    if (w->type == XLLM_DTYPE_BF16 && !m->data_copy) return 0;
    return layout == XLLM_LAYOUT_LOW_MEMORY ? dense + dense / 8 : SIZE_MAX;
}

/* Packs the dense quantized matrices (and the output) once into the panel form, for every
 * context of the model (XLLM_PREPACK=0: not). Panels about the size of the dense rows (8-bit
 * types: Q8_0 is 34 bytes per 32 weights both ways) serve every batch size, decode included;
 * when the weights are an anonymous copy they replace the dense rows, whose pages are
 * released, so the model takes its weight size in memory rather than twice. Sub-8-bit types
 * get 8-bit panels for batches (8 bits a weight) and decode panels in their own bits (about
 * the dense size), which together replace an anonymous copy's dense rows; the low-memory
 * layout does not make their 8-bit panels (prompts then read the decode panels too, which
 * alone replace the dense rows: the model takes about its file size).
 * BF16 matrices get their bf16 pair panels (the dense size) when the weights are an
 * anonymous copy, which they then replace.
 * The layout asked for is lowered (to low memory, then to the dense rows alone) when what it
 * adds to the process (the panels, less the dense rows they release) would leave less than an
 * eighth of the available memory free: a model must load wherever its file fits. */
static void make_packs(xllm_model *m, bool low_memory) {
    const char *env = getenv("XLLM_PREPACK");
    m->layout_asked = m->layout = XLLM_LAYOUT_DENSE;
    if (env && strcmp(env, "0") == 0) return;
    const xllm_hparams *hp = &m->hp;
    int64_t mc = XLLM_MAX((int64_t)hp->n_embd, (int64_t)hp->n_head * hp->head_dim);
    mc = XLLM_MAX(mc, (int64_t)hp->n_ff);
    xllm_threadpool *tp = xllm_threadpool_new(1);
    if (!tp) return;
    xllm_mm *mm = xllm_mm_new(tp, xllm_cpu_level_default(), 1, mc);
    const int n = model_mats(m, NULL, 0);
    xllm_mat *mats = xllm_xcalloc((size_t)XLLM_MAX(n, 1), sizeof(xllm_mat));
    model_mats(m, mats, n);

    xllm_weight_layout asked = low_memory ? XLLM_LAYOUT_LOW_MEMORY : XLLM_LAYOUT_PANELS;
    const uint64_t avail = mem_available();
    xllm_weight_layout layout = asked;
    for (; layout != XLLM_LAYOUT_DENSE; layout++) {
        uint64_t add = 0, freed = 0;
        for (int i = 0; i < n; i++) {
            const size_t b = xllm_mm_pack_bytes(mm, &mats[i], pack_max(m, &mats[i], layout));
            add += b;
            if (b && m->data_copy) freed += (uint64_t)mats[i].n_rows * mats[i].row_bytes;
        }
        const uint64_t grow = add > freed ? add - freed : 0;
        if (layout == asked) m->layout_wanted = add;
        if (add == 0 && layout == asked) { /* nothing has panels (type, CPU level) */
            asked = layout = XLLM_LAYOUT_DENSE;
            break;
        }
        if (avail == 0 || grow <= avail - avail / 8) break;
    }
    m->layout_asked = asked;
    m->layout = layout;
    m->layout_available = avail;
    if (layout != XLLM_LAYOUT_DENSE) {
        m->packs = xllm_mm_packs_new();
        for (int i = 0; i < n; i++) {
            const xllm_mat *w = &mats[i];
            const size_t packed = xllm_mm_pack(mm, m->packs, w, pack_max(m, w, layout));
            m->layout_bytes += packed;
            if (packed && m->data_copy && xllm_mm_packs_replace_dense(m->packs, w)) {
                xllm_mm_packs_drop_dense(m->packs, w);
                release_pages(w->data, (size_t)w->n_rows * w->row_bytes);
            }
        }
    }
    free(mats);
    xllm_mm_free(mm);
    xllm_threadpool_free(tp);
}

xllm_status xllm_model_load(const char *path, const xllm_model_params *params, xllm_model **out,
                            char *err, size_t err_size) {
    *out = NULL;
    xllm_model_params dp = xllm_model_default_params();
    if (!params) params = &dp;
    xllm_model *m = xllm_xcalloc(1, sizeof(*m));
    char msg[512] = {0};
    loader L = {.m = m, .err = msg, .err_size = sizeof(msg)};
    xllm_status st = xllm_gguf_open(path, &m->gguf, err, err_size);
    if (st != XLLM_OK) {
        free(m);
        return st;
    }
    const char *arch = xllm_gguf_get_str(m->gguf, "general.architecture");
    if (!arch) {
        xllm_set_err(msg, sizeof(msg), "metadata general.architecture is missing");
        st = XLLM_ERR_FORMAT;
        goto fail;
    }
    m->arch_name = xllm_xstrdup(arch);
    const char *name = xllm_gguf_get_str(m->gguf, "general.name");
    m->name = xllm_xstrdup(name ? name : "");
    size_t ia = 0;
    for (; ia < sizeof(k_arches) / sizeof(k_arches[0]); ia++)
        if (!strcmp(k_arches[ia].name, arch)) break;
    if (ia == sizeof(k_arches) / sizeof(k_arches[0])) {
        xllm_set_err(
            msg, sizeof(msg),
            "architecture '%s' is not supported (supported: llama, qwen2, qwen3, qwen3moe)", arch);
        st = XLLM_ERR_UNSUPPORTED;
        goto fail;
    }
    m->arch = k_arches[ia].arch;
    if (!load_hparams(&L)) {
        st = XLLM_ERR_FORMAT;
        goto fail;
    }

    st = xllm_tokenizer_from_gguf(m->gguf, &m->tokenizer, msg, sizeof(msg));
    if (st != XLLM_OK) goto fail;
    m->hp.n_vocab = xllm_tokenizer_n_vocab(m->tokenizer);

    st = fault_in(&L, params);
    if (st != XLLM_OK) goto fail;

    const xllm_hparams *hp = &m->hp;
    bind(&L, &m->tok_embd, "token_embd.weight", true, hp->n_embd, hp->n_vocab, 1);
    bind(&L, &m->output_norm, "output_norm.weight", true, hp->n_embd, 1, 1);
    bind(&L, &m->output, "output.weight", false, hp->n_embd, hp->n_vocab, 1);
    bind(&L, &m->rope_freqs, "rope_freqs.weight", false, hp->n_rot / 2, 1, 1);
    if (!L.failed && !m->output.data) m->output = m->tok_embd; /* tied embeddings */
    if (!L.failed && m->output_norm.type != XLLM_DTYPE_F32) {
        xllm_set_err(msg, sizeof(msg), "tensor 'output_norm.weight' must be f32");
        L.failed = true;
    }
    if (!L.failed && m->rope_freqs.data && m->rope_freqs.type != XLLM_DTYPE_F32) {
        xllm_set_err(msg, sizeof(msg), "tensor 'rope_freqs.weight' must be f32");
        L.failed = true;
    }
    m->layers = xllm_xcalloc((size_t)hp->n_layer, sizeof(xllm_layer));
    for (int il = 0; il < hp->n_layer && !L.failed; il++) bind_layer(&L, il, &m->layers[il]);
    if (L.failed) {
        st = XLLM_ERR_FORMAT;
        goto fail;
    }
    for (uint64_t i = 0; i < m->gguf->n_tensors; i++) {
        const xllm_gguf_tensor *t = &m->gguf->tensors[i];
        m->n_params += (uint64_t)(t->ne[0] * t->ne[1] * t->ne[2] * t->ne[3]);
        m->n_bytes += t->n_bytes;
    }
    make_packs(m, params->low_memory);
    *out = m;
    return XLLM_OK;

fail:
    xllm_set_err(err, err_size, "%s: %s", path, msg);
    xllm_model_free(m);
    return st;
}

void xllm_model_free(xllm_model *m) {
    if (!m) return;
    xllm_mm_packs_free(m->packs);
    if (m->data_copy) munmap(m->data_copy, m->gguf->size - m->gguf->data_offset);
    xllm_tokenizer_free(m->tokenizer);
    free(m->layers);
    free(m->arch_name);
    free(m->name);
    xllm_gguf_free(m->gguf);
    free(m);
}

/* ---------------------------------------------------------------------------------------- */
/* Accessors                                                                                 */
/* ---------------------------------------------------------------------------------------- */

const char *xllm_model_arch(const xllm_model *m) {
    return m->arch_name;
}
const char *xllm_model_name(const xllm_model *m) {
    return m->name;
}
int32_t xllm_model_n_vocab(const xllm_model *m) {
    return m->hp.n_vocab;
}
int32_t xllm_model_n_ctx_train(const xllm_model *m) {
    return m->hp.n_ctx_train;
}
int32_t xllm_model_n_embd(const xllm_model *m) {
    return m->hp.n_embd;
}
int32_t xllm_model_n_layer(const xllm_model *m) {
    return m->hp.n_layer;
}
int32_t xllm_model_n_head(const xllm_model *m) {
    return m->hp.n_head;
}
int32_t xllm_model_n_head_kv(const xllm_model *m) {
    return m->hp.n_head_kv;
}
int32_t xllm_model_head_dim(const xllm_model *m) {
    return m->hp.head_dim;
}
int32_t xllm_model_n_ff(const xllm_model *m) {
    return m->arch == XLLM_ARCH_QWEN3MOE ? m->hp.n_ff_exp : m->hp.n_ff;
}
int32_t xllm_model_n_expert(const xllm_model *m) {
    return m->hp.n_expert;
}
int32_t xllm_model_n_expert_used(const xllm_model *m) {
    return m->hp.n_expert_used;
}
float xllm_model_rope_freq_base(const xllm_model *m) {
    return m->hp.rope_freq_base;
}
float xllm_model_norm_eps(const xllm_model *m) {
    return m->hp.norm_eps;
}
uint64_t xllm_model_n_params(const xllm_model *m) {
    return m->n_params;
}
void xllm_model_layout(const xllm_model *m, xllm_model_layout_info *out) {
    *out = (xllm_model_layout_info){.layout = m->layout,
                                    .asked = m->layout_asked,
                                    .panel_bytes = m->layout_bytes,
                                    .wanted_bytes = m->layout_wanted,
                                    .available_bytes = m->layout_available};
}

uint64_t xllm_model_size_bytes(const xllm_model *m) {
    return m->n_bytes;
}

int64_t xllm_model_n_tensors(const xllm_model *m) {
    return (int64_t)m->gguf->n_tensors;
}

xllm_status xllm_model_tensor(const xllm_model *m, int64_t i, xllm_tensor_info *info) {
    if (i < 0 || (uint64_t)i >= m->gguf->n_tensors) return XLLM_ERR_INVALID_ARG;
    const xllm_gguf_tensor *t = &m->gguf->tensors[i];
    info->name = t->name;
    info->type = t->type;
    info->n_dims = (int32_t)t->n_dims;
    for (int d = 0; d < 4; d++) info->ne[d] = t->ne[d];
    info->n_bytes = t->n_bytes;
    return XLLM_OK;
}

int64_t xllm_model_meta_count(const xllm_model *m) {
    return (int64_t)m->gguf->n_kv;
}

const char *xllm_model_meta_key(const xllm_model *m, int64_t i) {
    if (i < 0 || (uint64_t)i >= m->gguf->n_kv) return NULL;
    return m->gguf->kv[i].key;
}

int xllm_model_meta_value(const xllm_model *m, int64_t i, char *buf, size_t buf_size) {
    if (i < 0 || (uint64_t)i >= m->gguf->n_kv) return -1;
    return xllm_gguf_kv_to_string(&m->gguf->kv[i], buf, buf_size);
}

const char *xllm_model_meta_str(const xllm_model *m, const char *key) {
    return xllm_gguf_get_str(m->gguf, key);
}

const char *xllm_model_chat_template(const xllm_model *m) {
    return xllm_gguf_get_str(m->gguf, "tokenizer.chat_template");
}

const xllm_tokenizer *xllm_model_tokenizer(const xllm_model *m) {
    return m->tokenizer;
}
