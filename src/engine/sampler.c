/* Token sampler: repetition/frequency/presence penalties, greedy argmax, top-k, temperature,
 * top-p, min-p and a seeded xoshiro256** draw, with all work buffers allocated up front. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "util/common.h"
#include "xllm/xllm.h"

struct xllm_sampler {
    xllm_sampler_params p;
    int32_t n_vocab;
    uint64_t rng[4];

    /* Penalty history: counts of the tokens in the window, the distinct tokens among them (with
     * each one's position in that list), and a ring of the last penalty_last_n tokens. */
    int32_t *count;
    int32_t *distinct;
    int32_t *distinct_pos;
    int32_t n_distinct;
    int32_t *ring;
    int32_t ring_cap, ring_len, ring_head;

    /* Work buffers, n_vocab each. */
    float *logit;
    float *prob;
    int32_t *ids;
};

/* ---------------------------------------------------------------------------------------- */
/* RNG: xoshiro256** seeded through splitmix64                                               */
/* ---------------------------------------------------------------------------------------- */

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static uint64_t rotl(uint64_t x, int k) {
    return (x << k) | (x >> (64 - k));
}

static uint64_t rng_next(uint64_t s[4]) {
    uint64_t r = rotl(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return r;
}

static void rng_seed(uint64_t s[4], uint64_t seed) {
    uint64_t x = seed;
    for (int i = 0; i < 4; i++) s[i] = splitmix64(&x);
}

/* Uniform in [0, 1). */
static double rng_uniform(uint64_t s[4]) {
    return (double)(rng_next(s) >> 11) * (1.0 / 9007199254740992.0);
}

/* ---------------------------------------------------------------------------------------- */
/* Creation and history                                                                      */
/* ---------------------------------------------------------------------------------------- */

xllm_sampler_params xllm_sampler_default_params(void) {
    xllm_sampler_params p;
    memset(&p, 0, sizeof(p));
    p.temperature = 0.8f;
    p.top_k = 40;
    p.top_p = 0.95f;
    p.min_p = 0.05f;
    p.repeat_penalty = 1.0f;
    p.penalty_last_n = 64;
    p.frequency_penalty = 0.0f;
    p.presence_penalty = 0.0f;
    p.seed = 0xFFFFFFFFu;
    return p;
}

xllm_sampler *xllm_sampler_new(const xllm_sampler_params *params, int32_t n_vocab) {
    xllm_sampler_params p = params ? *params : xllm_sampler_default_params();
    if (n_vocab <= 0 || p.penalty_last_n < -1 || isnan(p.temperature) || isnan(p.top_p) ||
        isnan(p.min_p) || !isfinite(p.repeat_penalty) || p.repeat_penalty <= 0.0f ||
        !isfinite(p.frequency_penalty) || !isfinite(p.presence_penalty))
        return NULL;
    xllm_sampler *s = xllm_xcalloc(1, sizeof(*s));
    s->p = p;
    s->n_vocab = n_vocab;
    size_t n = (size_t)n_vocab;
    s->count = xllm_xcalloc(n, sizeof(int32_t));
    s->distinct = xllm_xmalloc(n * sizeof(int32_t));
    s->distinct_pos = xllm_xmalloc(n * sizeof(int32_t));
    if (p.penalty_last_n > 0) {
        s->ring_cap = p.penalty_last_n;
        s->ring = xllm_xmalloc((size_t)s->ring_cap * sizeof(int32_t));
    }
    s->logit = xllm_xmalloc(n * sizeof(float));
    s->prob = xllm_xmalloc(n * sizeof(float));
    s->ids = xllm_xmalloc(n * sizeof(int32_t));
    xllm_sampler_reset(s);
    return s;
}

void xllm_sampler_free(xllm_sampler *s) {
    if (!s) return;
    free(s->count);
    free(s->distinct);
    free(s->distinct_pos);
    free(s->ring);
    free(s->logit);
    free(s->prob);
    free(s->ids);
    free(s);
}

void xllm_sampler_reset(xllm_sampler *s) {
    if (!s) return;
    for (int32_t i = 0; i < s->n_distinct; i++) s->count[s->distinct[i]] = 0;
    s->n_distinct = 0;
    s->ring_len = 0;
    s->ring_head = 0;
    rng_seed(s->rng, s->p.seed);
}

static void count_add(xllm_sampler *s, int32_t t) {
    if (s->count[t]++ == 0) {
        s->distinct_pos[t] = s->n_distinct;
        s->distinct[s->n_distinct++] = t;
    }
}

static void count_remove(xllm_sampler *s, int32_t t) {
    if (--s->count[t] == 0) {
        int32_t i = s->distinct_pos[t];
        int32_t last = s->distinct[--s->n_distinct];
        s->distinct[i] = last;
        s->distinct_pos[last] = i;
    }
}

void xllm_sampler_accept(xllm_sampler *s, int32_t token) {
    if (!s || token < 0 || token >= s->n_vocab || s->p.penalty_last_n == 0) return;
    if (s->p.penalty_last_n < 0) { /* every token counts */
        if (s->count[token] < INT32_MAX) count_add(s, token);
        return;
    }
    if (s->ring_len == s->ring_cap) { /* evict the oldest */
        count_remove(s, s->ring[s->ring_head]);
        s->ring[s->ring_head] = token;
        s->ring_head = (s->ring_head + 1) % s->ring_cap;
    } else {
        s->ring[(s->ring_head + s->ring_len) % s->ring_cap] = token;
        s->ring_len++;
    }
    count_add(s, token);
}

/* ---------------------------------------------------------------------------------------- */
/* Ordering helpers: by key descending, ties by lower id; no allocation                      */
/* ---------------------------------------------------------------------------------------- */

static inline bool before(const float *key, int32_t a, int32_t b) {
    return key[a] > key[b] || (key[a] == key[b] && a < b);
}

static inline void swap_ids(int32_t *ids, int32_t i, int32_t j) {
    int32_t t = ids[i];
    ids[i] = ids[j];
    ids[j] = t;
}

/* Rearranges ids[0..n) so that ids[0..k) are the k best (in no particular order). */
static void select_top(int32_t *ids, int32_t n, int32_t k, const float *key) {
    int32_t lo = 0, hi = n - 1;
    while (lo < hi) {
        /* median of three as pivot, moved to hi */
        int32_t mid = lo + (hi - lo) / 2;
        if (before(key, ids[mid], ids[lo])) swap_ids(ids, mid, lo);
        if (before(key, ids[hi], ids[lo])) swap_ids(ids, hi, lo);
        if (before(key, ids[mid], ids[hi])) swap_ids(ids, mid, hi);
        int32_t pivot = ids[hi];
        int32_t store = lo;
        for (int32_t i = lo; i < hi; i++) {
            if (before(key, ids[i], pivot)) swap_ids(ids, i, store++);
        }
        swap_ids(ids, store, hi);
        if (store == k - 1 || store == k) return;
        if (store < k)
            lo = store + 1;
        else
            hi = store - 1;
    }
}

static void sift_down(int32_t *ids, int32_t i, int32_t n, const float *key) {
    for (;;) {
        int32_t c = 2 * i + 1;
        if (c >= n) return;
        /* min-heap by "before": the worst element at the root */
        if (c + 1 < n && before(key, ids[c], ids[c + 1])) c++;
        if (!before(key, ids[i], ids[c])) return;
        swap_ids(ids, i, c);
        i = c;
    }
}

/* Sorts ids[0..n) best first (heap sort). */
static void sort_ids(int32_t *ids, int32_t n, const float *key) {
    for (int32_t i = n / 2 - 1; i >= 0; i--) sift_down(ids, i, n, key);
    for (int32_t end = n - 1; end > 0; end--) {
        swap_ids(ids, 0, end);
        sift_down(ids, 0, end, key);
    }
}

/* ---------------------------------------------------------------------------------------- */
/* Sampling                                                                                  */
/* ---------------------------------------------------------------------------------------- */

static void apply_penalties(xllm_sampler *s, float *l) {
    const xllm_sampler_params *p = &s->p;
    bool rep = p->repeat_penalty != 1.0f;
    if (!rep && p->frequency_penalty == 0.0f && p->presence_penalty == 0.0f) return;
    for (int32_t i = 0; i < s->n_distinct; i++) {
        int32_t t = s->distinct[i];
        int32_t c = s->count[t];
        if (rep) l[t] = l[t] > 0.0f ? l[t] / p->repeat_penalty : l[t] * p->repeat_penalty;
        l[t] -= (float)c * p->frequency_penalty + (c > 0 ? p->presence_penalty : 0.0f);
    }
}

static int32_t argmax(const float *l, int32_t n) {
    int32_t best = 0;
    for (int32_t i = 1; i < n; i++) {
        if (l[i] > l[best]) best = i;
    }
    return best;
}

int32_t xllm_sampler_sample(xllm_sampler *s, const float *logits) {
    if (!s || !logits) return -1;
    const xllm_sampler_params *p = &s->p;
    int32_t n = s->n_vocab;
    float *l = s->logit;
    memcpy(l, logits, (size_t)n * sizeof(float));
    for (int32_t i = 0; i < n; i++) {
        if (isnan(l[i])) l[i] = -INFINITY;
    }
    apply_penalties(s, l);
    if (!(p->temperature > 0.0f)) return argmax(l, n);

    /* top-k */
    int32_t *ids = s->ids;
    for (int32_t i = 0; i < n; i++) ids[i] = i;
    int32_t m = n;
    if (p->top_k > 0 && p->top_k < n) {
        select_top(ids, n, p->top_k, l);
        m = p->top_k;
    }
    if (m == 1) return ids[0];

    /* temperature and softmax (unnormalized: the best token gets 1) */
    float mx = -INFINITY;
    for (int32_t j = 0; j < m; j++) mx = fmaxf(mx, l[ids[j]]);
    if (mx == -INFINITY) return argmax(l, n); /* nothing finite: fall back to greedy */
    float *prob = s->prob;
    double sum = 0.0;
    for (int32_t j = 0; j < m; j++) {
        float e = expf((l[ids[j]] - mx) / p->temperature);
        prob[ids[j]] = e;
        sum += e;
    }

    /* min-p: drop tokens below min_p times the best probability (the best is 1 here). Both
     * min-p and top-p keep a best-first prefix of the same order, so they commute. */
    if (p->min_p > 0.0f) {
        int32_t k = 0;
        for (int32_t j = 0; j < m; j++) {
            if (prob[ids[j]] >= p->min_p) ids[k++] = ids[j];
        }
        if (k == 0) { /* cannot happen (the best has 1), but keep at least one */
            select_top(ids, m, 1, prob);
            k = 1;
        }
        m = k;
    }

    /* top-p: the smallest best-first prefix whose probability reaches top_p, sorting only as
     * much of the candidates as needed. */
    if (p->top_p < 1.0f && m > 1) {
        double target = (double)p->top_p * sum, cum = 0.0;
        int32_t done = 0, chunk = 64, keep = m;
        while (done < m) {
            int32_t k = m - done <= chunk ? m - done : chunk;
            if (k < m - done) select_top(ids + done, m - done, k, prob);
            sort_ids(ids + done, k, prob);
            int32_t j = done;
            for (; j < done + k; j++) {
                cum += prob[ids[j]];
                if (cum >= target) break;
            }
            if (j < done + k) {
                keep = j + 1;
                break;
            }
            done += k;
            chunk *= 4;
        }
        m = keep;
    }

    /* draw from what is left */
    double total = 0.0;
    for (int32_t j = 0; j < m; j++) total += prob[ids[j]];
    double r = rng_uniform(s->rng) * total, acc = 0.0;
    for (int32_t j = 0; j < m; j++) {
        acc += prob[ids[j]];
        if (r < acc) return ids[j];
    }
    return ids[m - 1];
}
