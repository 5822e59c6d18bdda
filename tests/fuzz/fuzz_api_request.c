/* libFuzzer target for the API's request handling: the first byte picks the endpoint
 * (completions or chat), the rest is the JSON body. It is parsed and validated; a valid chat
 * body is rendered through a ChatML template as the server does; the request's stop strings
 * run through the incremental detokenizer over the prompt bytes cut into random pieces, which
 * must give valid UTF-8 free of stop strings, the same text however it is cut. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "api/api-impl.h"
#include "xllm/chat.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const char CHATML[] =
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

static bool valid_utf8(const char *s, size_t n) {
    xllm_api_buf b = {0};
    xllm_api_utf8_repair(s, n, true, &b);
    bool same = b.len == n && (n == 0 || !memcmp(b.p, s, n));
    xllm_api_buf_free(&b);
    return same;
}

/* Feeds bytes in pieces whose sizes come from `cuts`; returns the text handed out. */
static void detok_run(const xllm_api_request *r, const char *bytes, size_t n, const uint8_t *cuts,
                      size_t n_cuts, xllm_api_buf *out) {
    xllm_api_detok d;
    xllm_api_detok_init(&d, NULL, false, r->stop, r->stop_len, r->n_stop);
    size_t i = 0, k = 0;
    bool stopped = false;
    while (i < n && !stopped) {
        size_t piece = n_cuts ? 1 + cuts[k++ % n_cuts] % 7 : n;
        if (piece > n - i) piece = n - i;
        stopped = xllm_api_detok_push_bytes(&d, bytes + i, piece);
        i += piece;
        const char *t;
        size_t m = xllm_api_detok_take(&d, &t);
        xllm_api_buf_add(out, t, m);
    }
    xllm_api_detok_finish(&d);
    const char *t;
    size_t m = xllm_api_detok_take(&d, &t);
    xllm_api_buf_add(out, t, m);
    if (out->len != d.text.len || (out->len && memcmp(out->p, d.text.p, out->len)))
        __builtin_trap(); /* what was handed out is exactly the text */
    xllm_api_detok_free(&d);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    static xllm_chat_template *tmpl;
    if (!tmpl && xllm_chat_template_new(CHATML, strlen(CHATML), NULL, &tmpl, NULL, 0) != XLLM_OK)
        __builtin_trap();
    xllm_api_kind kind = data[0] & 1 ? XLLM_API_CHAT : XLLM_API_COMPLETION;
    xllm_api_request r;
    const char *param = NULL;
    char err[512];
    xllm_status st = xllm_api_request_parse((const char *)data + 1, size - 1, kind, &r, &param, err,
                                            sizeof(err));
    if (st != XLLM_OK) {
        if (r.body || r.chat || !err[0]) __builtin_trap();
        return 0;
    }
    if (r.n < 1 || r.n > XLLM_API_MAX_N || r.n_stop > XLLM_API_MAX_STOP || r.logprobs > 20)
        __builtin_trap();
    const char *bytes = NULL;
    size_t n = 0;
    char *rendered = NULL;
    if (kind == XLLM_API_CHAT) {
        if (!r.chat) __builtin_trap();
        char *in = json_dumps(r.chat, JSON_COMPACT);
        size_t len = 0;
        if (in && xllm_chat_template_render(tmpl, in, strlen(in), "<s>", "</s>", &rendered, &len,
                                            err, sizeof(err)) == XLLM_OK) {
            bytes = rendered;
            n = len;
        }
        free(in);
    } else {
        if (r.n_prompts < 1 || r.n_prompts > XLLM_API_MAX_PROMPTS) __builtin_trap();
        bytes = r.prompts[0].text;
        n = r.prompts[0].len;
    }
    if (bytes) {
        /* the body's own bytes (raw, maybe invalid UTF-8) decide the cuts */
        xllm_api_buf a = {0}, b = {0};
        detok_run(&r, bytes, n, data + 1, size - 1, &a);
        detok_run(&r, bytes, n, NULL, 0, &b);
        if (!valid_utf8(a.p ? a.p : "", a.len)) __builtin_trap();
        if (a.len != b.len || (a.len && memcmp(a.p, b.p, a.len))) __builtin_trap();
        for (int32_t i = 0; i < r.n_stop; i++)
            if (a.len && memmem(a.p, a.len, r.stop[i], r.stop_len[i])) __builtin_trap();
        xllm_api_buf_free(&a);
        xllm_api_buf_free(&b);
    }
    free(rendered);
    xllm_api_request_clear(&r);
    return 0;
}
