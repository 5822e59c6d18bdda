/* The instance RPC's message codec: the generate request body, the response lines, a bounded
 * line splitter and a reader that checks the order of a response (see rpc.h). Encoders and
 * parsers share one table of request fields, so what one writes the other reads back. */
#include <float.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <string.h>

#include <jansson.h>

#include "api/rpc.h"
#include "util/common.h"

#define FAIL(name, ...)                                                                            \
    do {                                                                                           \
        if (field) *field = (name);                                                                \
        xllm_set_err(err, err_size, __VA_ARGS__);                                                  \
        return false;                                                                              \
    } while (0)

/* ---------------------------------------------------------------------------------------- */
/* Request fields                                                                            */
/* ---------------------------------------------------------------------------------------- */

typedef enum ftype { F_I32, F_I64, F_F32, F_BOOL, F_U64 } ftype;

/* One scalar field of the body: where it lives in xllm_request_params and its bounds. */
typedef struct fdesc {
    const char *name;
    ftype type;
    size_t off;
    int64_t ilo, ihi; /* F_I32, F_I64 */
    double flo, fhi;  /* F_F32, compared as floats (what the engine receives) */
} fdesc;

#define RP(m) offsetof(xllm_request_params, m)

/* In body order. The float bounds are those the OpenAI front door accepts (src/api/request.c),
 * so that whatever it accepts travels. */
static const fdesc k_fields[] = {
    {"max_tokens", F_I32, RP(max_tokens), 0, INT32_MAX, 0, 0},
    {"temperature", F_F32, RP(sampling.temperature), 0, 0, 0, 100},
    {"top_k", F_I32, RP(sampling.top_k), 0, INT32_MAX, 0, 0},
    {"top_p", F_F32, RP(sampling.top_p), 0, 0, 0, 1},
    {"min_p", F_F32, RP(sampling.min_p), 0, 0, 0, 1},
    {"repeat_penalty", F_F32, RP(sampling.repeat_penalty), 0, 0, 1e-6, 100},
    {"penalty_last_n", F_I32, RP(sampling.penalty_last_n), -1, INT32_MAX, 0, 0},
    {"frequency_penalty", F_F32, RP(sampling.frequency_penalty), 0, 0, -2, 2},
    {"presence_penalty", F_F32, RP(sampling.presence_penalty), 0, 0, -2, 2},
    {"seed", F_U64, RP(sampling.seed), 0, 0, 0, 0},
    {"ignore_eos", F_BOOL, RP(ignore_eos), 0, 0, 0, 0},
    {"priority", F_I32, RP(priority), INT32_MIN, INT32_MAX, 0, 0},
    {"offline", F_BOOL, RP(offline), 0, 0, 0, 0},
    {"top_logprobs", F_I32, RP(top_logprobs), -1, XLLM_MAX_TOP_LOGPROBS, 0, 0},
    {"ttft_slo_ms", F_I64, RP(ttft_slo_ms), 0, INT64_MAX, 0, 0},
    {"tpot_slo_ms", F_I64, RP(tpot_slo_ms), 0, INT64_MAX, 0, 0},
};
#define N_FIELDS (sizeof(k_fields) / sizeof(k_fields[0]))

static size_t field_size(const fdesc *f) {
    switch (f->type) {
        case F_I32:
        case F_F32:
            return 4;
        case F_BOOL:
            return sizeof(bool);
        default:
            return 8;
    }
}

static void *at(xllm_request_params *rp, const fdesc *f) {
    return (char *)rp + f->off;
}

static const void *cat(const xllm_request_params *rp, const fdesc *f) {
    return (const char *)rp + f->off;
}

/* An integer field's value (F_I32 or F_I64), widened. */
static int64_t int_at(const xllm_request_params *rp, const fdesc *f) {
    if (f->type == F_I64) {
        int64_t x;
        memcpy(&x, cat(rp, f), sizeof(x));
        return x;
    }
    int32_t x;
    memcpy(&x, cat(rp, f), sizeof(x));
    return x;
}

/* Stores an integer that int_ok accepted (so it fits the field). */
static void set_int(xllm_request_params *rp, const fdesc *f, int64_t x) {
    if (f->type == F_I64) {
        memcpy(at(rp, f), &x, sizeof(x));
    } else {
        int32_t y = (int32_t)x;
        memcpy(at(rp, f), &y, sizeof(y));
    }
}

static bool int_ok(const fdesc *f, int64_t x, const char **field, char *err, size_t err_size) {
    if (x < f->ilo || x > f->ihi)
        FAIL(f->name, "%s: must be an integer in [%" PRId64 ", %" PRId64 "], got %" PRId64, f->name,
             f->ilo, f->ihi, x);
    return true;
}

static bool float_ok(const fdesc *f, double x, const char **field, char *err, size_t err_size) {
    float v = (float)x;
    if (!(isfinite(x) && v >= (float)f->flo && v <= (float)f->fhi))
        FAIL(f->name, "%s: must be a number in [%g, %g], got %g", f->name, f->flo, f->fhi, x);
    return true;
}

/* A decimal 64-bit unsigned integer: 1..20 digits, nothing else, no overflow. */
static bool parse_u64(const char *s, size_t n, uint64_t *out) {
    if (n == 0 || n > 20) return false;
    uint64_t x = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9') return false;
        unsigned d = (unsigned)(s[i] - '0');
        if (x > (UINT64_MAX - d) / 10) return false;
        x = x * 10 + d;
    }
    *out = x;
    return true;
}

static json_t *u64_str(uint64_t x) {
    char t[24];
    snprintf(t, sizeof(t), "%" PRIu64, x);
    return json_string(t);
}

/* A receiver address: 1..XLLM_RPC_MAX_ADDR printable ASCII bytes, no spaces. */
static bool addr_ok(const char *s, size_t n) {
    if (n == 0 || n > XLLM_RPC_MAX_ADDR) return false;
    for (size_t i = 0; i < n; i++)
        if (s[i] <= ' ' || s[i] > '~') return false;
    return true;
}

/* The checks on values the encoder and the parser share (beyond each field's bounds). */
static bool pd_ok(const xllm_request_params *rp, const char **field, char *err, size_t err_size) {
    if (rp->pd_export_id && rp->pd_import_id)
        FAIL("pd_import", "pd_import: a request cannot both export and import its KV");
    if (rp->pd_export_id &&
        !(rp->pd_export_to && addr_ok(rp->pd_export_to, strlen(rp->pd_export_to))))
        FAIL("pd_export.to",
             "pd_export.to: must be a host:port address of 1..%d printable bytes without spaces",
             XLLM_RPC_MAX_ADDR);
    return true;
}

/* ---------------------------------------------------------------------------------------- */
/* Encoding the request                                                                      */
/* ---------------------------------------------------------------------------------------- */

static bool encode_field(json_t *o, const fdesc *f, const xllm_request_params *rp,
                         const char **field, char *err, size_t err_size) {
    const void *p = cat(rp, f);
    json_t *v = NULL;
    switch (f->type) {
        case F_I32:
        case F_I64: {
            int64_t x = int_at(rp, f);
            if (!int_ok(f, x, field, err, err_size)) return false;
            v = json_integer((json_int_t)x);
            break;
        }
        case F_F32: {
            float x;
            memcpy(&x, p, sizeof(x));
            if (!float_ok(f, x, field, err, err_size)) return false;
            v = json_real(x);
            break;
        }
        case F_BOOL: {
            bool x;
            memcpy(&x, p, sizeof(x));
            v = json_boolean(x);
            break;
        }
        case F_U64: {
            uint64_t x;
            memcpy(&x, p, sizeof(x));
            v = u64_str(x);
            break;
        }
    }
    json_object_set_new(o, f->name, v);
    return true;
}

static bool encode_body(json_t *o, const xllm_request_params *rp, const char **field, char *err,
                        size_t err_size) {
    if (!rp->prompt || rp->n_prompt <= 0 || rp->n_prompt > XLLM_RPC_MAX_PROMPT)
        FAIL("prompt", "prompt: must hold 1..%d token ids, got %d", XLLM_RPC_MAX_PROMPT,
             rp->n_prompt);
    json_t *pr = json_array();
    json_object_set_new(o, "prompt", pr);
    for (int32_t i = 0; i < rp->n_prompt; i++) {
        if (rp->prompt[i] < 0) FAIL("prompt", "prompt[%d]: negative token id %d", i, rp->prompt[i]);
        json_array_append_new(pr, json_integer(rp->prompt[i]));
    }
    for (size_t i = 0; i < N_FIELDS; i++)
        if (!encode_field(o, &k_fields[i], rp, field, err, err_size)) return false;
    if (!pd_ok(rp, field, err, err_size)) return false;
    if (rp->pd_export_id)
        json_object_set_new(
            o, "pd_export",
            json_pack("{s:o,s:s}", "id", u64_str(rp->pd_export_id), "to", rp->pd_export_to));
    if (rp->pd_import_id)
        json_object_set_new(o, "pd_import", json_pack("{s:o}", "id", u64_str(rp->pd_import_id)));
    return true;
}

char *xllm_rpc_generate_encode(const xllm_request_params *rp, const char **field, char *err,
                               size_t err_size) {
    if (field) *field = NULL;
    json_t *o = json_pack("{s:s,s:i}", "magic", XLLM_RPC_MAGIC, "version", XLLM_RPC_VERSION);
    char *text = encode_body(o, rp, field, err, err_size) ? json_dumps(o, JSON_COMPACT) : NULL;
    json_decref(o);
    return text;
}

/* ---------------------------------------------------------------------------------------- */
/* Parsing the request                                                                       */
/* ---------------------------------------------------------------------------------------- */

static bool header_ok(json_t *o, const char **field, char *err, size_t err_size) {
    json_t *m = json_object_get(o, "magic"), *v = json_object_get(o, "version");
    if (!json_is_string(m) || strcmp(json_string_value(m), XLLM_RPC_MAGIC) != 0)
        FAIL("magic", "magic: must be \"%s\"", XLLM_RPC_MAGIC);
    if (!json_is_integer(v)) FAIL("version", "version: must be the integer %d", XLLM_RPC_VERSION);
    if (json_integer_value(v) != XLLM_RPC_VERSION)
        FAIL("version", "version: %" JSON_INTEGER_FORMAT " is not supported (this side speaks %d)",
             json_integer_value(v), XLLM_RPC_VERSION);
    return true;
}

/* A decimal u64 string field of object o (for the error: `name`). */
static bool get_u64(json_t *o, const char *key, const char *name, uint64_t *out, const char **field,
                    char *err, size_t err_size) {
    json_t *v = json_object_get(o, key);
    if (!json_is_string(v) || !parse_u64(json_string_value(v), json_string_length(v), out))
        FAIL(name, "%s: must be a string of a decimal 64-bit unsigned integer", name);
    return true;
}

static bool parse_field(json_t *o, const fdesc *f, xllm_request_params *rp, const char **field,
                        char *err, size_t err_size) {
    json_t *v = json_object_get(o, f->name);
    if (!v) return true; /* absent: the default */
    void *p = at(rp, f);
    switch (f->type) {
        case F_I32:
        case F_I64: {
            if (!json_is_integer(v)) FAIL(f->name, "%s: must be an integer", f->name);
            int64_t x = json_integer_value(v);
            if (!int_ok(f, x, field, err, err_size)) return false;
            set_int(rp, f, x);
            return true;
        }
        case F_F32: {
            if (!json_is_number(v)) FAIL(f->name, "%s: must be a number", f->name);
            if (!float_ok(f, json_number_value(v), field, err, err_size)) return false;
            float y = (float)json_number_value(v);
            memcpy(p, &y, sizeof(y));
            return true;
        }
        case F_BOOL: {
            if (!json_is_boolean(v)) FAIL(f->name, "%s: must be true or false", f->name);
            bool y = json_is_true(v);
            memcpy(p, &y, sizeof(y));
            return true;
        }
        case F_U64: {
            uint64_t y;
            if (!get_u64(o, f->name, f->name, &y, field, err, err_size)) return false;
            memcpy(p, &y, sizeof(y));
            return true;
        }
    }
    return true;
}

static bool parse_prompt(json_t *o, int32_t n_vocab, xllm_rpc_request *r, const char **field,
                         char *err, size_t err_size) {
    json_t *pr = json_object_get(o, "prompt");
    if (!json_is_array(pr)) FAIL("prompt", "prompt: an array of token ids is required");
    size_t n = json_array_size(pr);
    if (n == 0 || n > XLLM_RPC_MAX_PROMPT)
        FAIL("prompt", "prompt: must hold 1..%d token ids, got %zu", XLLM_RPC_MAX_PROMPT, n);
    r->ids = xllm_xmalloc(n * sizeof(int32_t));
    for (size_t i = 0; i < n; i++) {
        json_t *t = json_array_get(pr, i);
        if (!json_is_integer(t)) FAIL("prompt", "prompt[%zu]: a token id must be an integer", i);
        json_int_t x = json_integer_value(t);
        if (x < 0 || x >= n_vocab)
            FAIL("prompt", "prompt[%zu]: token id %" JSON_INTEGER_FORMAT " is outside [0, %d)", i,
                 x, n_vocab);
        r->ids[i] = (int32_t)x;
    }
    r->rp.prompt = r->ids;
    r->rp.n_prompt = (int32_t)n;
    return true;
}

/* PD: {"pd_export": {"id": "N", "to": "host:port"}} on the prefill leg, {"pd_import": {"id":
 * "N"}} on the decode leg; ids are nonzero decimal strings (64 bits do not fit a double). */
static bool parse_pd(json_t *o, xllm_rpc_request *r, const char **field, char *err,
                     size_t err_size) {
    json_t *ex = json_object_get(o, "pd_export"), *im = json_object_get(o, "pd_import");
    if (ex) {
        if (!json_is_object(ex)) FAIL("pd_export", "pd_export: must be an object {id, to}");
        if (!get_u64(ex, "id", "pd_export.id", &r->rp.pd_export_id, field, err, err_size))
            return false;
        if (!r->rp.pd_export_id) FAIL("pd_export.id", "pd_export.id: must not be 0");
        json_t *to = json_object_get(ex, "to");
        if (!json_is_string(to) || !addr_ok(json_string_value(to), json_string_length(to)))
            FAIL("pd_export.to",
                 "pd_export.to: must be a host:port address of 1..%d printable bytes without "
                 "spaces",
                 XLLM_RPC_MAX_ADDR);
        r->pd_to = xllm_xstrdup(json_string_value(to));
        r->rp.pd_export_to = r->pd_to;
    }
    if (im) {
        if (!json_is_object(im)) FAIL("pd_import", "pd_import: must be an object {id}");
        if (!get_u64(im, "id", "pd_import.id", &r->rp.pd_import_id, field, err, err_size))
            return false;
        if (!r->rp.pd_import_id) FAIL("pd_import.id", "pd_import.id: must not be 0");
    }
    return pd_ok(&r->rp, field, err, err_size);
}

static bool parse_body(const char *body, size_t len, int32_t n_vocab, xllm_rpc_request *r,
                       const char **field, char *err, size_t err_size) {
    json_error_t je;
    json_t *o = json_loadb(body, len, JSON_REJECT_DUPLICATES, &je);
    if (!json_is_object(o)) {
        json_decref(o);
        if (!o) FAIL(NULL, "body: not JSON (%s at byte %d)", je.text, je.position);
        FAIL(NULL, "body: must be a JSON object");
    }
    bool ok =
        header_ok(o, field, err, err_size) && parse_prompt(o, n_vocab, r, field, err, err_size);
    for (size_t i = 0; ok && i < N_FIELDS; i++)
        ok = parse_field(o, &k_fields[i], &r->rp, field, err, err_size);
    ok = ok && parse_pd(o, r, field, err, err_size);
    json_decref(o);
    return ok;
}

xllm_status xllm_rpc_generate_parse(const char *body, size_t len, int32_t n_vocab,
                                    xllm_rpc_request *out, const char **field, char *err,
                                    size_t err_size) {
    memset(out, 0, sizeof(*out));
    out->rp = xllm_request_default_params();
    if (field) *field = NULL;
    if (!parse_body(body, len, n_vocab, out, field, err, err_size)) {
        xllm_rpc_request_clear(out);
        return XLLM_ERR_INVALID_ARG;
    }
    return XLLM_OK;
}

void xllm_rpc_request_clear(xllm_rpc_request *r) {
    free(r->ids);
    free(r->pd_to);
    memset(r, 0, sizeof(*r));
}

bool xllm_rpc_params_equal(const xllm_request_params *a, const xllm_request_params *b) {
    if (a->n_prompt != b->n_prompt ||
        (a->n_prompt > 0 && memcmp(a->prompt, b->prompt, sizeof(int32_t) * (size_t)a->n_prompt)))
        return false;
    for (size_t i = 0; i < N_FIELDS; i++) {
        const fdesc *f = &k_fields[i];
        if (f->type == F_F32) {
            float x, y;
            memcpy(&x, cat(a, f), 4);
            memcpy(&y, cat(b, f), 4);
            if (x != y) return false; /* -0 equals 0: both read back the same */
        } else if (memcmp(cat(a, f), cat(b, f), field_size(f)) != 0) {
            return false;
        }
    }
    if (a->pd_export_id != b->pd_export_id || a->pd_import_id != b->pd_import_id) return false;
    if (!a->pd_export_id) return true; /* the address travels only with an export */
    return a->pd_export_to && b->pd_export_to && !strcmp(a->pd_export_to, b->pd_export_to);
}

/* ---------------------------------------------------------------------------------------- */
/* Response lines                                                                            */
/* ---------------------------------------------------------------------------------------- */

static const char *const k_finish[] = {
    [XLLM_FINISH_STOP] = "stop",
    [XLLM_FINISH_LENGTH] = "length",
    [XLLM_FINISH_CANCEL] = "cancel",
    [XLLM_FINISH_ABORT] = "abort",
};

const char *xllm_rpc_finish_name(xllm_finish_reason f) {
    return f >= XLLM_FINISH_STOP && f <= XLLM_FINISH_ABORT ? k_finish[f] : "none";
}

/* A logprob: a number, or null for one that is not finite (-inf: a token the model ruled out). */
static json_t *lp_json(float x) {
    return isfinite(x) ? json_real(x) : json_null();
}

static bool ms_ok(double x) {
    return isfinite(x) && x >= 0;
}

#undef FAIL
#define FAIL(...)                                                                                  \
    do {                                                                                           \
        xllm_set_err(err, err_size, __VA_ARGS__);                                                  \
        return false;                                                                              \
    } while (0)

static bool line_json(const xllm_rpc_line *l, json_t *o, char *err, size_t err_size) {
    switch (l->kind) {
        case XLLM_RPC_LINE_HEADER:
            json_object_set_new(o, "magic", json_string(XLLM_RPC_MAGIC));
            json_object_set_new(o, "version", json_integer(XLLM_RPC_VERSION));
            return true;
        case XLLM_RPC_LINE_TOKEN: {
            const xllm_token_event *ev = &l->ev;
            if (ev->token < 0) FAIL("t: negative token id %d", ev->token);
            if (ev->n_top < 0 || ev->n_top > XLLM_MAX_TOP_LOGPROBS)
                FAIL("top: %d alternatives, at most %d travel", ev->n_top, XLLM_MAX_TOP_LOGPROBS);
            json_object_set_new(o, "t", json_integer(ev->token));
            json_object_set_new(o, "lp", lp_json(ev->logprob));
            if (ev->n_top == 0) return true;
            json_t *top = json_array();
            json_object_set_new(o, "top", top);
            for (int32_t k = 0; k < ev->n_top; k++) {
                if (ev->top_ids[k] < 0) FAIL("top[%d]: negative token id %d", k, ev->top_ids[k]);
                json_t *e = json_array();
                json_array_append_new(e, json_integer(ev->top_ids[k]));
                json_array_append_new(e, lp_json(ev->top_logprobs[k]));
                json_array_append_new(top, e);
            }
            return true;
        }
        case XLLM_RPC_LINE_FINISH:
            if (l->finish < XLLM_FINISH_STOP || l->finish > XLLM_FINISH_ABORT)
                FAIL("finish: %d is not a finish reason", (int)l->finish);
            if (l->n_cached < 0 || l->n_preempted < 0)
                FAIL("n_cached, n_preempted: must not be negative");
            if (!ms_ok(l->t_queue_ms) || !ms_ok(l->t_first_ms))
                FAIL("t_queue_ms, t_first_ms: must be finite and not negative");
            json_object_set_new(o, "finish", json_string(k_finish[l->finish]));
            json_object_set_new(o, "n_cached", json_integer(l->n_cached));
            json_object_set_new(o, "n_preempted", json_integer(l->n_preempted));
            json_object_set_new(o, "t_queue_ms", json_real(l->t_queue_ms));
            json_object_set_new(o, "t_first_ms", json_real(l->t_first_ms));
            return true;
    }
    FAIL("line: %d is not a line kind", (int)l->kind);
}

char *xllm_rpc_line_encode(const xllm_rpc_line *l, size_t *len, char *err, size_t err_size) {
    json_t *o = json_object();
    char *text = line_json(l, o, err, err_size) ? json_dumps(o, JSON_COMPACT) : NULL;
    json_decref(o);
    if (!text) return NULL;
    size_t n = strlen(text);
    text = xllm_xrealloc(text, n + 2);
    text[n] = '\n';
    text[n + 1] = 0;
    if (len) *len = n + 1;
    return text;
}

/* A token id in [0, n_vocab). */
static bool get_id(json_t *v, int32_t n_vocab, const char *name, int32_t *out, char *err,
                   size_t err_size) {
    if (!json_is_integer(v)) FAIL("%s: a token id must be an integer", name);
    json_int_t x = json_integer_value(v);
    if (x < 0 || x >= n_vocab)
        FAIL("%s: token id %" JSON_INTEGER_FORMAT " is outside [0, %d)", name, x, n_vocab);
    *out = (int32_t)x;
    return true;
}

static bool get_lp(json_t *v, const char *name, float *out, char *err, size_t err_size) {
    if (json_is_null(v)) {
        *out = -INFINITY;
        return true;
    }
    if (!json_is_number(v)) FAIL("%s: a logprob must be a number or null", name);
    double x = json_number_value(v);
    if (!(x >= -FLT_MAX && x <= FLT_MAX)) FAIL("%s: a logprob must be a float, got %g", name, x);
    *out = (float)x;
    return true;
}

static bool parse_token(json_t *o, int32_t n_vocab, xllm_token_event *ev, char *err,
                        size_t err_size) {
    if (!get_id(json_object_get(o, "t"), n_vocab, "t", &ev->token, err, err_size)) return false;
    json_t *lp = json_object_get(o, "lp");
    if (!lp) FAIL("lp: missing");
    if (!get_lp(lp, "lp", &ev->logprob, err, err_size)) return false;
    json_t *top = json_object_get(o, "top");
    if (!top) return true;
    if (!json_is_array(top)) FAIL("top: must be an array of [id, logprob]");
    if (json_array_size(top) > XLLM_MAX_TOP_LOGPROBS)
        FAIL("top: %zu alternatives, at most %d", json_array_size(top), XLLM_MAX_TOP_LOGPROBS);
    for (size_t k = 0; k < json_array_size(top); k++) {
        json_t *e = json_array_get(top, k);
        char name[32];
        snprintf(name, sizeof(name), "top[%zu]", k);
        if (!json_is_array(e) || json_array_size(e) != 2)
            FAIL("%s: must be an array [id, logprob]", name);
        if (!get_id(json_array_get(e, 0), n_vocab, name, &ev->top_ids[k], err, err_size) ||
            !get_lp(json_array_get(e, 1), name, &ev->top_logprobs[k], err, err_size))
            return false;
    }
    ev->n_top = (int32_t)json_array_size(top);
    return true;
}

static bool get_count(json_t *o, const char *key, int32_t *out, char *err, size_t err_size) {
    json_t *v = json_object_get(o, key);
    if (!v) return true;
    if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > INT32_MAX)
        FAIL("%s: must be an integer in [0, %d]", key, INT32_MAX);
    *out = (int32_t)json_integer_value(v);
    return true;
}

static bool get_ms(json_t *o, const char *key, double *out, char *err, size_t err_size) {
    json_t *v = json_object_get(o, key);
    if (!v) return true;
    if (!json_is_number(v) || !ms_ok(json_number_value(v)))
        FAIL("%s: must be a number of milliseconds, not negative", key);
    *out = json_number_value(v);
    return true;
}

static bool parse_finish(json_t *o, xllm_rpc_line *l, char *err, size_t err_size) {
    const char *f = json_string_value(json_object_get(o, "finish"));
    for (int i = XLLM_FINISH_STOP; f && i <= XLLM_FINISH_ABORT; i++)
        if (!strcmp(f, k_finish[i])) l->finish = (xllm_finish_reason)i;
    if (l->finish == XLLM_FINISH_NONE) FAIL("finish: must be one of stop, length, cancel, abort");
    return get_count(o, "n_cached", &l->n_cached, err, err_size) &&
           get_count(o, "n_preempted", &l->n_preempted, err, err_size) &&
           get_ms(o, "t_queue_ms", &l->t_queue_ms, err, err_size) &&
           get_ms(o, "t_first_ms", &l->t_first_ms, err, err_size);
}

static bool parse_line(const char *p, size_t n, int32_t n_vocab, xllm_rpc_line *l, char *err,
                       size_t err_size) {
    json_error_t je;
    json_t *o = json_loadb(p, n, JSON_REJECT_DUPLICATES, &je);
    if (!json_is_object(o)) {
        json_decref(o);
        if (!o) FAIL("line: not JSON (%s at byte %d)", je.text, je.position);
        FAIL("line: must be a JSON object");
    }
    bool is_h = json_object_get(o, "magic") != NULL, is_t = json_object_get(o, "t") != NULL,
         is_f = json_object_get(o, "finish") != NULL;
    bool ok = false;
    if (is_h + is_t + is_f != 1) {
        xllm_set_err(err, err_size, "line: must have exactly one of magic, t, finish");
    } else if (is_h) {
        l->kind = XLLM_RPC_LINE_HEADER;
        ok = header_ok(o, NULL, err, err_size);
    } else if (is_t) {
        l->kind = XLLM_RPC_LINE_TOKEN;
        ok = parse_token(o, n_vocab, &l->ev, err, err_size);
    } else {
        l->kind = XLLM_RPC_LINE_FINISH;
        ok = parse_finish(o, l, err, err_size);
    }
    json_decref(o);
    return ok;
}

xllm_status xllm_rpc_line_parse(const char *p, size_t n, int32_t n_vocab, xllm_rpc_line *out,
                                char *err, size_t err_size) {
    memset(out, 0, sizeof(*out));
    if (parse_line(p, n, n_vocab, out, err, err_size)) return XLLM_OK;
    memset(out, 0, sizeof(*out));
    return XLLM_ERR_INVALID_ARG;
}

bool xllm_rpc_line_equal(const xllm_rpc_line *a, const xllm_rpc_line *b) {
    if (a->kind != b->kind) return false;
    switch (a->kind) {
        case XLLM_RPC_LINE_TOKEN:
            if (a->ev.token != b->ev.token || a->ev.logprob != b->ev.logprob ||
                a->ev.n_top != b->ev.n_top)
                return false;
            for (int32_t k = 0; k < a->ev.n_top; k++)
                if (a->ev.top_ids[k] != b->ev.top_ids[k] ||
                    a->ev.top_logprobs[k] != b->ev.top_logprobs[k])
                    return false;
            return true;
        case XLLM_RPC_LINE_FINISH:
            return a->finish == b->finish && a->n_cached == b->n_cached &&
                   a->n_preempted == b->n_preempted && a->t_queue_ms == b->t_queue_ms &&
                   a->t_first_ms == b->t_first_ms;
        default:
            return true;
    }
}

/* ---------------------------------------------------------------------------------------- */
/* Line splitter                                                                             */
/* ---------------------------------------------------------------------------------------- */

/* Appends to the held line; the caller checked that it stays within max bytes. */
static void held_add(xllm_rpc_splitter *s, const char *p, size_t n, size_t max) {
    if (s->len + n > s->cap) {
        s->cap = XLLM_MIN(max, XLLM_MAX(s->len + n, XLLM_MAX(2 * s->cap, (size_t)256)));
        s->buf = xllm_xrealloc(s->buf, s->cap);
    }
    memcpy(s->buf + s->len, p, n);
    s->len += n;
}

xllm_status xllm_rpc_splitter_feed(xllm_rpc_splitter *s, const char *p, size_t n,
                                   xllm_rpc_line_fn on_line, void *user, char *err,
                                   size_t err_size) {
    const size_t max = s->max_line ? s->max_line : XLLM_RPC_MAX_LINE;
    if (s->status != XLLM_OK) {
        xllm_set_err(err, err_size, "the stream already failed");
        return s->status;
    }
    while (n > 0) {
        const char *nl = memchr(p, '\n', n);
        size_t take = nl ? (size_t)(nl - p) : n;
        if (take > max - s->len) {
            xllm_set_err(err, err_size, "line: longer than %zu bytes", max);
            s->status = XLLM_ERR_FORMAT;
            return s->status;
        }
        if (!nl) {
            held_add(s, p, take, max);
            break;
        }
        const char *line = p; /* a whole line in this piece goes out without a copy */
        if (s->len) {
            held_add(s, p, take, max);
            line = s->buf;
            take = s->len;
        }
        xllm_status st = on_line(user, line, take, err, err_size);
        if (st != XLLM_OK) {
            s->status = st;
            return st;
        }
        size_t used = (size_t)(nl - p) + 1;
        s->len = 0;
        p += used;
        n -= used;
    }
    return XLLM_OK;
}

void xllm_rpc_splitter_free(xllm_rpc_splitter *s) {
    free(s->buf);
    s->buf = NULL;
    s->len = s->cap = 0;
}

/* ---------------------------------------------------------------------------------------- */
/* Reading a whole response                                                                  */
/* ---------------------------------------------------------------------------------------- */

static xllm_status reader_line(void *user, const char *p, size_t n, char *err, size_t err_size) {
    xllm_rpc_reader *r = user;
    xllm_rpc_line l;
    const int32_t at_line = r->header + r->n_tokens + r->finished + 1;
    char why[400];
    if (xllm_rpc_line_parse(p, n, r->n_vocab, &l, why, sizeof(why)) != XLLM_OK) {
        xllm_set_err(err, err_size, "line %d: %s", at_line, why);
        return XLLM_ERR_INVALID_ARG;
    }
    const char *order = NULL;
    if (r->finished)
        order = "a line after the finish line";
    else if (!r->header && l.kind != XLLM_RPC_LINE_HEADER)
        order = "the first line is not the header";
    else if (r->header && l.kind == XLLM_RPC_LINE_HEADER)
        order = "a second header";
    if (order) {
        xllm_set_err(err, err_size, "line %d: %s", at_line, order);
        return XLLM_ERR_INVALID_ARG;
    }
    switch (l.kind) {
        case XLLM_RPC_LINE_HEADER:
            r->header = true;
            return XLLM_OK;
        case XLLM_RPC_LINE_TOKEN:
            r->n_tokens++;
            return r->on_token ? r->on_token(r->user, &l.ev, err, err_size) : XLLM_OK;
        case XLLM_RPC_LINE_FINISH:
            r->finished = true;
            r->last = l;
            return XLLM_OK;
    }
    return XLLM_ERR_INTERNAL;
}

xllm_status xllm_rpc_reader_feed(xllm_rpc_reader *r, const char *p, size_t n, char *err,
                                 size_t err_size) {
    return xllm_rpc_splitter_feed(&r->split, p, n, reader_line, r, err, err_size);
}

xllm_status xllm_rpc_reader_end(const xllm_rpc_reader *r, char *err, size_t err_size) {
    if (r->split.status != XLLM_OK) {
        xllm_set_err(err, err_size, "the stream failed");
        return r->split.status;
    }
    if (r->split.len) {
        xllm_set_err(err, err_size, "the stream was cut in the middle of line %d",
                     r->header + r->n_tokens + r->finished + 1);
        return XLLM_ERR_FORMAT;
    }
    if (!r->finished) {
        xllm_set_err(err, err_size, "the stream ended without a finish line (%s, %d tokens)",
                     r->header ? "after the header" : "no header", r->n_tokens);
        return XLLM_ERR_FORMAT;
    }
    return XLLM_OK;
}

void xllm_rpc_reader_free(xllm_rpc_reader *r) {
    xllm_rpc_splitter_free(&r->split);
}
