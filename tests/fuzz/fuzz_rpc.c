/* libFuzzer target for the instance RPC codec (src/api/rpc.c). The first byte picks what the
 * rest is: 0 a generate body, 1 one response line, 2 a response stream (two more control bytes:
 * the line limit and how the stream is cut). Whatever parses must encode, parse back to the
 * same values and encode to the same bytes; the splitter and the reader must give the same
 * lines, events and verdict however the stream is cut. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "api/rpc.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define N_VOCAB 50000
#define CHECK(c)                                                                                   \
    do {                                                                                           \
        if (!(c)) __builtin_trap();                                                                \
    } while (0)

static void fuzz_request(const char *p, size_t n) {
    xllm_rpc_request r;
    const char *field = "unset";
    char err[512] = "";
    if (xllm_rpc_generate_parse(p, n, N_VOCAB, &r, &field, err, sizeof(err)) != XLLM_OK) {
        CHECK(err[0] && !r.ids && !r.pd_to && (!field || strstr(err, field)));
        return;
    }
    CHECK(r.rp.n_prompt >= 1 && r.rp.n_prompt <= XLLM_RPC_MAX_PROMPT && r.rp.prompt == r.ids);
    char *text = xllm_rpc_generate_encode(&r.rp, &field, err, sizeof(err));
    CHECK(text);
    xllm_rpc_request back;
    CHECK(xllm_rpc_generate_parse(text, strlen(text), N_VOCAB, &back, &field, err, sizeof(err)) ==
          XLLM_OK);
    CHECK(xllm_rpc_params_equal(&r.rp, &back.rp));
    char *again = xllm_rpc_generate_encode(&back.rp, &field, err, sizeof(err));
    CHECK(again && !strcmp(text, again));
    free(again);
    free(text);
    xllm_rpc_request_clear(&back);
    xllm_rpc_request_clear(&r);
}

/* Parses one line; what parses goes round. Returns the parse status. */
static xllm_status line_round(const char *p, size_t n) {
    xllm_rpc_line l, back;
    char err[512] = "";
    xllm_status st = xllm_rpc_line_parse(p, n, N_VOCAB, &l, err, sizeof(err));
    if (st != XLLM_OK) {
        CHECK(err[0]);
        return st;
    }
    size_t len = 0;
    char *text = xllm_rpc_line_encode(&l, &len, err, sizeof(err));
    CHECK(text && len == strlen(text) && len >= 2 && text[len - 1] == '\n');
    CHECK(!memchr(text, '\n', len - 1));
    CHECK(xllm_rpc_line_parse(text, len - 1, N_VOCAB, &back, err, sizeof(err)) == XLLM_OK);
    CHECK(xllm_rpc_line_equal(&l, &back));
    char *again = xllm_rpc_line_encode(&back, NULL, err, sizeof(err));
    CHECK(again && !strcmp(text, again));
    free(again);
    free(text);
    return st;
}

/* What the splitter delivered: each line's length and a hash of its bytes. */
typedef struct seen {
    uint64_t *v;
    size_t n, cap;
} seen;

static xllm_status on_line(void *user, const char *p, size_t n, char *err, size_t err_size) {
    seen *s = user;
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i++) h = (h ^ (uint8_t)p[i]) * 1099511628211ULL;
    if (s->n + 2 > s->cap) {
        s->cap = s->cap ? 2 * s->cap : 64;
        s->v = realloc(s->v, s->cap * sizeof(uint64_t));
        CHECK(s->v);
    }
    s->v[s->n++] = n;
    s->v[s->n++] = h;
    line_round(p, n);
    return XLLM_OK;
}

/* The size of the next piece of a stream with `left` bytes to go: all of it when cut is 0,
 * else 1..97 bytes from a generator seeded by cut (state in *x). */
static size_t next_piece(uint32_t *x, uint8_t cut, size_t left) {
    if (!cut) return left;
    *x = *x * 1103515245u + 12345u;
    size_t piece = 1 + (*x >> 16) % 97;
    return piece < left ? piece : left;
}

/* Splits p[0..n) in pieces (cut == 0: at once), recording the lines. */
static xllm_status split(const char *p, size_t n, size_t max_line, uint8_t cut, seen *out,
                         size_t *held) {
    xllm_rpc_splitter sp = {.max_line = max_line};
    char err[256] = "";
    xllm_status st = XLLM_OK;
    uint32_t x = cut;
    for (size_t i = 0; i < n && st == XLLM_OK;) {
        size_t piece = next_piece(&x, cut, n - i);
        st = xllm_rpc_splitter_feed(&sp, p + i, piece, on_line, out, err, sizeof(err));
        i += piece;
    }
    CHECK(st == XLLM_OK || err[0]);
    CHECK(sp.cap <= (max_line ? max_line : XLLM_RPC_MAX_LINE));
    *held = sp.len;
    xllm_rpc_splitter_free(&sp);
    return st;
}

typedef struct verdict {
    xllm_status feed, end;
    int32_t n_tokens;
    bool finished;
    uint64_t hash; /* of the token events */
} verdict;

static xllm_status on_token(void *user, const xllm_token_event *ev, char *err, size_t err_size) {
    verdict *v = user;
    v->hash = (v->hash ^ (uint64_t)(uint32_t)ev->token) * 1099511628211ULL;
    v->hash = (v->hash ^ (uint64_t)(uint32_t)ev->n_top) * 1099511628211ULL;
    return XLLM_OK;
}

static verdict read_all(const char *p, size_t n, size_t max_line, uint8_t cut) {
    verdict v = {.hash = 1};
    xllm_rpc_reader r = {.n_vocab = N_VOCAB, .on_token = on_token, .user = &v};
    r.split.max_line = max_line;
    char err[256];
    uint32_t x = cut;
    for (size_t i = 0; i < n && v.feed == XLLM_OK;) {
        size_t piece = next_piece(&x, cut, n - i);
        v.feed = xllm_rpc_reader_feed(&r, p + i, piece, err, sizeof(err));
        i += piece;
    }
    v.end = xllm_rpc_reader_end(&r, err, sizeof(err));
    CHECK(v.feed == XLLM_OK || v.end != XLLM_OK); /* a failed stream never ends well */
    CHECK(!r.finished || r.header);
    v.n_tokens = r.n_tokens;
    v.finished = r.finished;
    xllm_rpc_reader_free(&r);
    return v;
}

static void fuzz_stream(const uint8_t *data, size_t size) {
    if (size < 2) return;
    const size_t max_line = data[0] ? 16 * (size_t)data[0] : 0;
    const uint8_t cut = data[1] ? data[1] : 1;
    const char *p = (const char *)data + 2;
    const size_t n = size - 2;
    seen a = {0}, b = {0};
    size_t held_a, held_b;
    xllm_status sa = split(p, n, max_line, 0, &a, &held_a);
    xllm_status sb = split(p, n, max_line, cut, &b, &held_b);
    CHECK(sa == sb && a.n == b.n && (!a.n || !memcmp(a.v, b.v, a.n * sizeof(uint64_t))));
    CHECK(sa != XLLM_OK || held_a == held_b);
    free(a.v);
    free(b.v);
    verdict va = read_all(p, n, max_line, 0), vb = read_all(p, n, max_line, cut);
    CHECK(va.feed == vb.feed && va.end == vb.end && va.n_tokens == vb.n_tokens &&
          va.finished == vb.finished && va.hash == vb.hash);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    const char *p = (const char *)data + 1;
    switch (data[0] % 3) {
        case 0:
            fuzz_request(p, size - 1);
            break;
        case 1:
            line_round(p, size - 1);
            break;
        default:
            fuzz_stream(data + 1, size - 1);
            break;
    }
    return 0;
}
