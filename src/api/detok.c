/* Byte-safe incremental detokenization for the API: UTF-8 repair (U+FFFD for ill-formed bytes),
 * incomplete characters held back across tokens, stop strings never emitted even when they
 * arrive split across tokens. Runs on HTTP threads, off the engine's critical path. */
#include <stdarg.h>
#include <string.h>

#include "api/api-impl.h"
#include "util/common.h"

/* ---------------------------------------------------------------------------------------- */
/* Buffers                                                                                   */
/* ---------------------------------------------------------------------------------------- */

static void buf_reserve(xllm_api_buf *b, size_t extra) {
    if (b->len + extra + 1 <= b->cap) return;
    size_t cap = b->cap ? b->cap : 64;
    while (cap < b->len + extra + 1) cap *= 2;
    b->p = xllm_xrealloc(b->p, cap);
    b->cap = cap;
}

void xllm_api_buf_add(xllm_api_buf *b, const char *s, size_t n) {
    buf_reserve(b, n);
    if (n) memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = 0;
}

void xllm_api_buf_printf(xllm_api_buf *b, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    char tmp[256];
    int k = vsnprintf(tmp, sizeof(tmp), fmt, ap);
    va_end(ap);
    if (k < 0) return;
    if ((size_t)k < sizeof(tmp)) {
        xllm_api_buf_add(b, tmp, (size_t)k);
        return;
    }
    buf_reserve(b, (size_t)k);
    va_start(ap, fmt);
    vsnprintf(b->p + b->len, (size_t)k + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)k;
}

void xllm_api_buf_free(xllm_api_buf *b) {
    free(b->p);
    memset(b, 0, sizeof(*b));
}

/* ---------------------------------------------------------------------------------------- */
/* UTF-8 repair                                                                              */
/* ---------------------------------------------------------------------------------------- */

static const char k_fffd[3] = {(char)0xEF, (char)0xBF, (char)0xBD};

size_t xllm_api_utf8_repair(const char *in, size_t n, bool final, xllm_api_buf *out) {
    const unsigned char *s = (const unsigned char *)in;
    size_t i = 0, run = 0; /* run: start of pending valid ASCII/complete bytes */
    buf_reserve(out, n);
    while (i < n) {
        unsigned c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        int need;
        unsigned lo = 0x80, hi = 0xBF;
        if (c >= 0xC2 && c <= 0xDF)
            need = 2;
        else if (c == 0xE0)
            need = 3, lo = 0xA0;
        else if (c >= 0xE1 && c <= 0xEF)
            need = 3, hi = c == 0xED ? 0x9F : 0xBF;
        else if (c == 0xF0)
            need = 4, lo = 0x90;
        else if (c >= 0xF1 && c <= 0xF3)
            need = 4;
        else if (c == 0xF4)
            need = 4, hi = 0x8F;
        else
            need = 0; /* a continuation byte or a byte that never starts a character */
        size_t j = i + 1;
        bool bad = need == 0;
        for (int k = 1; !bad && k < need; k++, j++) {
            if (j >= n) {
                if (!final) {
                    /* an incomplete character at the end: leave it for the next call */
                    xllm_api_buf_add(out, in + run, i - run);
                    return i;
                }
                bad = true;
                break;
            }
            unsigned b = s[j];
            if (b < (k == 1 ? lo : 0x80) || b > (k == 1 ? hi : 0xBF)) {
                bad = true;
                break;
            }
        }
        if (bad) {
            /* the maximal subpart in[i..j) becomes one replacement character */
            xllm_api_buf_add(out, in + run, i - run);
            xllm_api_buf_add(out, k_fffd, 3);
            i = j;
            run = i;
        } else {
            i = j;
        }
    }
    xllm_api_buf_add(out, in + run, n - run);
    return n;
}

/* ---------------------------------------------------------------------------------------- */
/* Detokenizer                                                                               */
/* ---------------------------------------------------------------------------------------- */

void xllm_api_detok_init(xllm_api_detok *d, const xllm_tokenizer *tok, bool strip_space,
                         const char *const *stop, const size_t *stop_len, int32_t n_stop) {
    memset(d, 0, sizeof(*d));
    d->tok = tok;
    d->strip_space = strip_space;
    d->stop = stop;
    d->stop_len = stop_len;
    d->n_stop = n_stop;
    for (int32_t i = 0; i < n_stop; i++) d->max_stop = XLLM_MAX(d->max_stop, stop_len[i]);
    xllm_api_buf_add(&d->text, "", 0);
}

void xllm_api_detok_free(xllm_api_detok *d) {
    xllm_api_buf_free(&d->raw);
    xllm_api_buf_free(&d->text);
}

/* Looks for stop strings that end in the text added since the last search and cuts the text
 * before the one that completes first (ties: the longest), as a token-by-token check would;
 * so the result does not depend on how the text was cut into tokens. */
static bool find_stop(xllm_api_detok *d) {
    size_t best = SIZE_MAX, best_end = SIZE_MAX;
    for (int32_t i = 0; i < d->n_stop; i++) {
        size_t L = d->stop_len[i];
        if (L == 0 || L > d->text.len) continue;
        size_t from = d->checked >= L - 1 ? d->checked - (L - 1) : 0;
        const char *hit = memmem(d->text.p + from, d->text.len - from, d->stop[i], L);
        if (!hit) continue;
        size_t pos = (size_t)(hit - d->text.p);
        if (pos + L < best_end || (pos + L == best_end && pos < best)) {
            best = pos;
            best_end = pos + L;
        }
    }
    d->checked = d->text.len;
    if (best == SIZE_MAX) return false;
    if (best < d->sent) best = d->sent; /* cannot happen: a partial match is held back */
    d->text.len = best;
    d->text.p[best] = 0;
    d->stopped = true;
    return true;
}

bool xllm_api_detok_push_bytes(xllm_api_detok *d, const char *s, size_t n) {
    if (d->stopped) return false;
    if (n && d->strip_space) {
        if (s[0] == ' ') {
            s++;
            n--;
        }
        d->strip_space = false;
    }
    xllm_api_buf_add(&d->raw, s, n);
    size_t used = xllm_api_utf8_repair(d->raw.p, d->raw.len, false, &d->text);
    memmove(d->raw.p, d->raw.p + used, d->raw.len - used);
    d->raw.len -= used;
    return d->n_stop > 0 && d->text.len > d->checked && find_stop(d);
}

bool xllm_api_detok_push(xllm_api_detok *d, int32_t token) {
    char tmp[256];
    int32_t k = xllm_token_to_piece(d->tok, token, tmp, (int32_t)sizeof(tmp), false);
    if (k >= 0) return xllm_api_detok_push_bytes(d, tmp, (size_t)k);
    if (k == INT32_MIN) return false;
    char *big = xllm_xmalloc((size_t)-k);
    int32_t k2 = xllm_token_to_piece(d->tok, token, big, -k, false);
    bool hit = k2 > 0 && xllm_api_detok_push_bytes(d, big, (size_t)k2);
    free(big);
    return hit;
}

void xllm_api_detok_finish(xllm_api_detok *d) {
    if (!d->stopped && d->raw.len) {
        xllm_api_utf8_repair(d->raw.p, d->raw.len, true, &d->text);
        if (d->n_stop > 0) find_stop(d);
    }
    d->raw.len = 0;
    d->n_stop = 0; /* nothing is held back any more */
}

size_t xllm_api_detok_take(xllm_api_detok *d, const char **out) {
    size_t end = d->text.len;
    if (!d->stopped) {
        /* hold back the longest suffix that is a proper prefix of a stop string */
        size_t held = 0;
        for (int32_t i = 0; i < d->n_stop; i++) {
            size_t L = d->stop_len[i];
            size_t k = XLLM_MIN(L ? L - 1 : 0, d->text.len);
            for (; k > held; k--)
                if (!memcmp(d->text.p + d->text.len - k, d->stop[i], k)) break;
            held = XLLM_MAX(held, k);
        }
        end -= held;
    }
    if (end < d->sent) end = d->sent;
    *out = d->text.p + d->sent;
    size_t n = end - d->sent;
    d->sent = end;
    return n;
}

void xllm_api_token_text(const xllm_tokenizer *tok, int32_t id, xllm_api_buf *out,
                         xllm_api_buf *raw) {
    out->len = 0;
    xllm_api_buf_add(out, "", 0);
    char tmp[256];
    int32_t k = xllm_token_to_piece(tok, id, tmp, (int32_t)sizeof(tmp), true);
    const char *p = tmp;
    char *big = NULL;
    if (k < 0 && k != INT32_MIN) {
        big = xllm_xmalloc((size_t)-k);
        k = xllm_token_to_piece(tok, id, big, -k, true);
        p = big;
    }
    if (k > 0) {
        xllm_api_utf8_repair(p, (size_t)k, true, out);
        if (raw) {
            raw->len = 0;
            xllm_api_buf_add(raw, p, (size_t)k);
        }
    } else if (raw) {
        raw->len = 0;
    }
    free(big);
}
