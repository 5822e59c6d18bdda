/* Unit tests of src/api/rpc.c, the instance RPC codec: random requests and response lines go
 * through encode -> parse unchanged; malformed bodies and lines are refused with a message that
 * names the field; the splitter gives the same lines however the stream is cut and bounds a
 * line; the reader refuses a response whose lines come out of order. */
#include <math.h>
#include <string.h>

#include "api/rpc.h"
#include "testutil.h"
#include "util/common.h"

#define N_VOCAB 1000

static uint64_t rng = 0x5eed5eed1234ULL;

static int64_t rand_in(int64_t lo, int64_t hi) {
    uint64_t span = (uint64_t)(hi - lo) + 1;
    return lo + (int64_t)(span ? xllm_test_rand_u64(&rng) % span : xllm_test_rand_u64(&rng));
}

/* A float in [lo, hi]: the bounds themselves now and then, else uniform. */
static float rand_float(float lo, float hi) {
    switch (xllm_test_rand_u64(&rng) % 8) {
        case 0:
            return lo;
        case 1:
            return hi;
        default:
            return lo + (hi - lo) * (0.5f + 0.5f * xllm_test_rand_f(&rng));
    }
}

/* ---------------------------------------------------------------------------------------- */
/* Requests                                                                                  */
/* ---------------------------------------------------------------------------------------- */

static void rand_params(xllm_request_params *rp, int32_t *ids, char *addr, size_t addr_size) {
    *rp = xllm_request_default_params();
    rp->n_prompt = (int32_t)rand_in(1, 300);
    for (int32_t i = 0; i < rp->n_prompt; i++) ids[i] = (int32_t)rand_in(0, N_VOCAB - 1);
    rp->prompt = ids;
    rp->max_tokens = (int32_t)rand_in(0, INT32_MAX);
    xllm_sampler_params *sp = &rp->sampling;
    sp->temperature = rand_float(0, 100);
    sp->top_k = (int32_t)rand_in(0, INT32_MAX);
    sp->top_p = rand_float(0, 1);
    sp->min_p = rand_float(0, 1);
    sp->repeat_penalty = rand_float(1e-6f, 100);
    sp->penalty_last_n = (int32_t)rand_in(-1, INT32_MAX);
    sp->frequency_penalty = rand_float(-2, 2);
    sp->presence_penalty = rand_float(-2, 2);
    sp->seed = xllm_test_rand_u64(&rng);
    rp->ignore_eos = xllm_test_rand_u64(&rng) & 1;
    rp->priority = (int32_t)rand_in(INT32_MIN, INT32_MAX);
    rp->offline = xllm_test_rand_u64(&rng) & 1;
    rp->top_logprobs = (int32_t)rand_in(-1, XLLM_MAX_TOP_LOGPROBS);
    rp->ttft_slo_ms = rand_in(0, INT64_MAX);
    rp->tpot_slo_ms = rand_in(0, INT64_MAX);
    switch (xllm_test_rand_u64(&rng) % 3) {
        case 0:
            break;
        case 1:
            rp->pd_export_id = xllm_test_rand_u64(&rng) | 1;
            snprintf(addr, addr_size, "10.0.%d.%d:%d", (int)rand_in(0, 255), (int)rand_in(0, 255),
                     (int)rand_in(1, 65535));
            rp->pd_export_to = addr;
            break;
        default:
            rp->pd_import_id = xllm_test_rand_u64(&rng) | 1;
            break;
    }
}

static void test_request_roundtrip(void **state) {
    (void)state;
    int32_t ids[300];
    char addr[64];
    for (int it = 0; it < 500; it++) {
        xllm_request_params rp;
        rand_params(&rp, ids, addr, sizeof(addr));
        char err[256];
        const char *field = "unset";
        char *body = xllm_rpc_generate_encode(&rp, &field, err, sizeof(err));
        if (!body) fail_msg("encode #%d: %s", it, err);
        assert_null(field);
        xllm_rpc_request in;
        if (xllm_rpc_generate_parse(body, strlen(body), N_VOCAB, &in, &field, err, sizeof(err)) !=
            XLLM_OK)
            fail_msg("parse #%d: %s\n%s", it, err, body);
        assert_true(xllm_rpc_params_equal(&rp, &in.rp));
        assert_ptr_equal(in.rp.prompt, in.ids);
        if (rp.pd_export_id) assert_ptr_equal(in.rp.pd_export_to, in.pd_to);
        /* and one changed field is noticed by the comparison */
        in.rp.sampling.seed ^= 1;
        assert_false(xllm_rpc_params_equal(&rp, &in.rp));
        xllm_rpc_request_clear(&in);
        free(body);
    }
}

static void test_request_defaults(void **state) {
    (void)state;
    const char *body = "{\"magic\":\"xllm-rpc\",\"version\":1,\"prompt\":[3,1,4]}";
    xllm_rpc_request in;
    char err[256];
    assert_int_equal(
        xllm_rpc_generate_parse(body, strlen(body), N_VOCAB, &in, NULL, err, sizeof(err)), XLLM_OK);
    xllm_request_params want = xllm_request_default_params();
    const int32_t ids[] = {3, 1, 4};
    want.prompt = ids;
    want.n_prompt = 3;
    assert_true(xllm_rpc_params_equal(&want, &in.rp));
    assert_null(in.rp.pd_export_to);
    xllm_rpc_request_clear(&in);
}

#define HDR "{\"magic\":\"xllm-rpc\",\"version\":1,"
#define PR  "\"prompt\":[1,2]"

static void test_request_malformed(void **state) {
    (void)state;
    static const struct {
        const char *body;
        const char *field; /* NULL: the body as a whole */
        const char *says;
    } cases[] = {
        {"{", NULL, "body: not JSON"},
        {"[1]", NULL, "body: must be a JSON object"},
        {HDR PR ",\"seed\":\"1\",\"seed\":\"2\"}", NULL, "duplicate"},
        {"{\"version\":1," PR "}", "magic", "magic: must be"},
        {"{\"magic\":\"xllm-rpx\",\"version\":1," PR "}", "magic", "magic: must be"},
        {"{\"magic\":\"xllm-rpc\",\"version\":2," PR "}", "version", "version: 2 is not supported"},
        {"{\"magic\":\"xllm-rpc\",\"version\":\"1\"," PR "}", "version", "version: must be"},
        {HDR "\"max_tokens\":1}", "prompt", "prompt: an array"},
        {HDR "\"prompt\":[]}", "prompt", "prompt: must hold 1.."},
        {HDR "\"prompt\":\"hi\"}", "prompt", "prompt: an array"},
        {HDR "\"prompt\":[1,2.5]}", "prompt", "prompt[1]: a token id must be an integer"},
        {HDR "\"prompt\":[\"1\"]}", "prompt", "prompt[0]: a token id must be an integer"},
        {HDR "\"prompt\":[-1]}", "prompt", "prompt[0]: token id -1 is outside [0, 1000)"},
        {HDR "\"prompt\":[5,1000]}", "prompt", "prompt[1]: token id 1000 is outside"},
        {HDR "\"prompt\":[99999999999999999999]}", NULL, "body: not JSON"},
        {HDR PR ",\"max_tokens\":-1}", "max_tokens", "max_tokens: must be an integer in [0,"},
        {HDR PR ",\"max_tokens\":2147483648}", "max_tokens", "max_tokens: must be an integer"},
        {HDR PR ",\"max_tokens\":4.0}", "max_tokens", "max_tokens: must be an integer"},
        {HDR PR ",\"temperature\":\"hot\"}", "temperature", "temperature: must be a number"},
        {HDR PR ",\"temperature\":101}", "temperature",
         "temperature: must be a number in [0, 100]"},
        {HDR PR ",\"temperature\":null}", "temperature", "temperature: must be a number"},
        {HDR PR ",\"top_p\":1.5}", "top_p", "top_p: must be a number in [0, 1]"},
        {HDR PR ",\"min_p\":-0.1}", "min_p", "min_p:"},
        {HDR PR ",\"repeat_penalty\":0}", "repeat_penalty", "repeat_penalty:"},
        {HDR PR ",\"frequency_penalty\":2.5}", "frequency_penalty", "frequency_penalty:"},
        {HDR PR ",\"presence_penalty\":-3}", "presence_penalty", "presence_penalty:"},
        {HDR PR ",\"top_k\":-1}", "top_k", "top_k: must be an integer in [0,"},
        {HDR PR ",\"penalty_last_n\":-2}", "penalty_last_n", "penalty_last_n:"},
        {HDR PR ",\"top_logprobs\":21}", "top_logprobs",
         "top_logprobs: must be an integer in [-1, 20]"},
        {HDR PR ",\"priority\":2147483648}", "priority", "priority:"},
        {HDR PR ",\"ttft_slo_ms\":-5}", "ttft_slo_ms", "ttft_slo_ms:"},
        {HDR PR ",\"tpot_slo_ms\":true}", "tpot_slo_ms", "tpot_slo_ms: must be an integer"},
        {HDR PR ",\"ignore_eos\":1}", "ignore_eos", "ignore_eos: must be true or false"},
        {HDR PR ",\"offline\":\"yes\"}", "offline", "offline: must be true or false"},
        {HDR PR ",\"seed\":7}", "seed", "seed: must be a string of a decimal 64-bit"},
        {HDR PR ",\"seed\":\"\"}", "seed", "seed: must be a string"},
        {HDR PR ",\"seed\":\"-1\"}", "seed", "seed: must be a string"},
        {HDR PR ",\"seed\":\" 1\"}", "seed", "seed: must be a string"},
        {HDR PR ",\"seed\":\"12a\"}", "seed", "seed: must be a string"},
        {HDR PR ",\"seed\":\"0x10\"}", "seed", "seed: must be a string"},
        {HDR PR ",\"seed\":\"18446744073709551616\"}", "seed", "seed: must be a string"},
        {HDR PR ",\"seed\":\"1\\u00002\"}", NULL, "is not allowed"}, /* NUL in a string */
        {HDR PR ",\"pd_export\":\"x\"}", "pd_export", "pd_export: must be an object"},
        {HDR PR ",\"pd_export\":{\"to\":\"a:1\"}}", "pd_export.id", "pd_export.id: must be"},
        {HDR PR ",\"pd_export\":{\"id\":5,\"to\":\"a:1\"}}", "pd_export.id", "pd_export.id:"},
        {HDR PR ",\"pd_export\":{\"id\":\"0\",\"to\":\"a:1\"}}", "pd_export.id",
         "pd_export.id: must not be 0"},
        {HDR PR ",\"pd_export\":{\"id\":\"5\"}}", "pd_export.to", "pd_export.to: must be"},
        {HDR PR ",\"pd_export\":{\"id\":\"5\",\"to\":\"\"}}", "pd_export.to", "pd_export.to:"},
        {HDR PR ",\"pd_export\":{\"id\":\"5\",\"to\":\"a b:1\"}}", "pd_export.to", "pd_export.to:"},
        {HDR PR ",\"pd_export\":{\"id\":\"5\",\"to\":\"a\\u0000:1\"}}", NULL, "is not allowed"},
        {HDR PR ",\"pd_import\":[]}", "pd_import", "pd_import: must be an object"},
        {HDR PR ",\"pd_import\":{\"id\":\"x\"}}", "pd_import.id", "pd_import.id: must be"},
        {HDR PR ",\"pd_import\":{\"id\":\"0\"}}", "pd_import.id", "pd_import.id: must not be 0"},
        {HDR PR ",\"pd_import\":{\"id\":\"1\"},\"pd_export\":{\"id\":\"2\",\"to\":\"a:1\"}}",
         "pd_import", "pd_import: a request cannot both"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        xllm_rpc_request in;
        char err[256] = "";
        const char *field = "unset";
        xllm_status st = xllm_rpc_generate_parse(cases[i].body, strlen(cases[i].body), N_VOCAB, &in,
                                                 &field, err, sizeof(err));
        if (st != XLLM_ERR_INVALID_ARG) fail_msg("case %zu accepted: %s", i, cases[i].body);
        if (!strstr(err, cases[i].says))
            fail_msg("case %zu: '%s' does not say '%s'", i, err, cases[i].says);
        if (cases[i].field) {
            if (!field || strcmp(field, cases[i].field))
                fail_msg("case %zu: field %s, want %s", i, field ? field : "NULL", cases[i].field);
        } else {
            assert_null(field);
        }
        assert_null(in.ids); /* nothing is left to free */
        assert_null(in.pd_to);
    }
}

static void test_request_sizes(void **state) {
    (void)state;
    /* a prompt one id over the limit, and one at it */
    for (int32_t n = XLLM_RPC_MAX_PROMPT; n <= XLLM_RPC_MAX_PROMPT + 1; n++) {
        size_t cap = (size_t)n * 2 + 64, len = 0;
        char *body = xllm_xmalloc(cap);
        len += (size_t)snprintf(body, cap, HDR "\"prompt\":[");
        for (int32_t i = 0; i < n; i++) {
            body[len++] = '7';
            body[len++] = i + 1 < n ? ',' : ']';
        }
        body[len++] = '}';
        xllm_rpc_request in;
        char err[256];
        const char *field;
        xllm_status st = xllm_rpc_generate_parse(body, len, N_VOCAB, &in, &field, err, sizeof(err));
        if (n == XLLM_RPC_MAX_PROMPT) {
            assert_int_equal(st, XLLM_OK);
            assert_int_equal(in.rp.n_prompt, n);
        } else {
            assert_int_equal(st, XLLM_ERR_INVALID_ARG);
            assert_string_equal(field, "prompt");
            assert_non_null(strstr(err, "prompt: must hold 1..1048576 token ids, got 1048577"));
        }
        xllm_rpc_request_clear(&in);
        free(body);
    }
    /* a receiver address of XLLM_RPC_MAX_ADDR bytes travels, one more byte does not */
    for (int extra = 0; extra <= 1; extra++) {
        char to[XLLM_RPC_MAX_ADDR + 2];
        memset(to, 'a', sizeof(to));
        to[XLLM_RPC_MAX_ADDR + extra] = 0;
        char body[512];
        snprintf(body, sizeof(body), HDR PR ",\"pd_export\":{\"id\":\"9\",\"to\":\"%s\"}}", to);
        xllm_rpc_request in;
        char err[256];
        const char *field;
        xllm_status st =
            xllm_rpc_generate_parse(body, strlen(body), N_VOCAB, &in, &field, err, sizeof(err));
        assert_int_equal(st, extra ? XLLM_ERR_INVALID_ARG : XLLM_OK);
        if (extra) assert_string_equal(field, "pd_export.to");
        xllm_rpc_request_clear(&in);
    }
}

/* The encoder refuses what the parser would refuse, naming the field. */
static void test_encode_refuses(void **state) {
    (void)state;
    int32_t ids[300];
    char addr[64], long_addr[200];
    memset(long_addr, 'x', sizeof(long_addr) - 1);
    long_addr[sizeof(long_addr) - 1] = 0;
    for (int c = 0; c < 8; c++) {
        xllm_request_params rp;
        rand_params(&rp, ids, addr, sizeof(addr));
        rp.pd_export_id = rp.pd_import_id = 0;
        const char *want = NULL;
        switch (c) {
            case 0:
                rp.n_prompt = 0, want = "prompt";
                break;
            case 1:
                ids[0] = -3, want = "prompt";
                break;
            case 2:
                rp.sampling.temperature = NAN, want = "temperature";
                break;
            case 3:
                rp.sampling.top_p = INFINITY, want = "top_p";
                break;
            case 4:
                rp.top_logprobs = 21, want = "top_logprobs";
                break;
            case 5:
                rp.pd_export_id = 3, rp.pd_export_to = NULL, want = "pd_export.to";
                break;
            case 6:
                rp.pd_export_id = 3, rp.pd_export_to = long_addr, want = "pd_export.to";
                break;
            default:
                rp.pd_export_id = 3, rp.pd_export_to = "a:1", rp.pd_import_id = 4;
                want = "pd_import";
                break;
        }
        char err[256] = "";
        const char *field = NULL;
        char *body = xllm_rpc_generate_encode(&rp, &field, err, sizeof(err));
        if (body) fail_msg("case %d encoded: %s", c, body);
        assert_non_null(field);
        assert_string_equal(field, want);
        assert_non_null(strstr(err, want));
    }
}

/* ---------------------------------------------------------------------------------------- */
/* Response lines                                                                            */
/* ---------------------------------------------------------------------------------------- */

static float rand_lp(void) {
    return xllm_test_rand_u64(&rng) % 16 == 0 ? -INFINITY
                                              : -30.0f * (0.5f + 0.5f * xllm_test_rand_f(&rng));
}

static void rand_line(xllm_rpc_line *l) {
    memset(l, 0, sizeof(*l));
    l->kind = (xllm_rpc_line_kind)rand_in(XLLM_RPC_LINE_HEADER, XLLM_RPC_LINE_FINISH);
    if (l->kind == XLLM_RPC_LINE_TOKEN) {
        l->ev.token = (int32_t)rand_in(0, N_VOCAB - 1);
        l->ev.logprob = rand_lp();
        l->ev.n_top = (int32_t)rand_in(0, XLLM_MAX_TOP_LOGPROBS);
        for (int32_t k = 0; k < l->ev.n_top; k++) {
            l->ev.top_ids[k] = (int32_t)rand_in(0, N_VOCAB - 1);
            l->ev.top_logprobs[k] = rand_lp();
        }
    } else if (l->kind == XLLM_RPC_LINE_FINISH) {
        l->finish = (xllm_finish_reason)rand_in(XLLM_FINISH_STOP, XLLM_FINISH_ABORT);
        l->n_cached = (int32_t)rand_in(0, INT32_MAX);
        l->n_preempted = (int32_t)rand_in(0, 100);
        l->t_queue_ms = 1e4 * (1 + xllm_test_rand_f(&rng));
        l->t_first_ms = rand_in(0, 1) ? 0 : 1e-3 * (double)xllm_test_rand_u64(&rng);
    }
}

static void test_line_roundtrip(void **state) {
    (void)state;
    int seen[4] = {0};
    for (int it = 0; it < 2000; it++) {
        xllm_rpc_line l, back;
        rand_line(&l);
        seen[l.kind]++;
        char err[256];
        size_t n = 0;
        char *t = xllm_rpc_line_encode(&l, &n, err, sizeof(err));
        if (!t) fail_msg("encode #%d: %s", it, err);
        assert_int_equal(n, strlen(t));
        assert_true(n >= 2 && t[n - 1] == '\n');
        assert_null(memchr(t, '\n', n - 1)); /* one line */
        if (xllm_rpc_line_parse(t, n - 1, N_VOCAB, &back, err, sizeof(err)) != XLLM_OK)
            fail_msg("parse #%d: %s\n%s", it, err, t);
        assert_true(xllm_rpc_line_equal(&l, &back));
        free(t);
    }
    assert_true(seen[1] > 0 && seen[2] > 0 && seen[3] > 0);
}

static void test_line_malformed(void **state) {
    (void)state;
    static const struct {
        const char *line;
        const char *says;
    } cases[] = {
        {"", "line: not JSON"},
        {"   ", "line: not JSON"},
        {"{\"t\":1,\"lp\":0}{", "line: not JSON"},
        {"[]", "line: must be a JSON object"},
        {"{}", "line: must have exactly one of magic, t, finish"},
        {"{\"t\":1,\"lp\":0,\"finish\":\"stop\"}", "exactly one"},
        {"{\"magic\":\"xllm-rpc\",\"version\":2}", "version: 2 is not supported"},
        {"{\"magic\":\"xllm-rpc\"}", "version: must be"},
        {"{\"magic\":\"other\",\"version\":1}", "magic: must be"},
        {"{\"t\":-1,\"lp\":0}", "t: token id -1 is outside [0, 1000)"},
        {"{\"t\":1000,\"lp\":0}", "t: token id 1000 is outside"},
        {"{\"t\":1.5,\"lp\":0}", "t: a token id must be an integer"},
        {"{\"t\":\"1\",\"lp\":0}", "t: a token id must be an integer"},
        {"{\"t\":1}", "lp: missing"},
        {"{\"t\":1,\"lp\":\"x\"}", "lp: a logprob must be a number or null"},
        {"{\"t\":1,\"lp\":1e39}", "lp: a logprob must be a float"},
        {"{\"t\":1,\"lp\":0,\"top\":{}}", "top: must be an array"},
        {"{\"t\":1,\"lp\":0,\"top\":[[1]]}", "top[0]: must be an array [id, logprob]"},
        {"{\"t\":1,\"lp\":0,\"top\":[[1,0],[1,0,2]]}", "top[1]: must be an array"},
        {"{\"t\":1,\"lp\":0,\"top\":[[1000,0]]}", "top[0]: token id 1000 is outside"},
        {"{\"t\":1,\"lp\":0,\"top\":[[1,true]]}", "top[0]: a logprob must be"},
        {"{\"t\":1,\"lp\":0,\"top\":[[1,0],[1,0],[1,0],[1,0],[1,0],[1,0],[1,0],[1,0],[1,0],[1,0],"
         "[1,0],[1,0],[1,0],[1,0],[1,0],[1,0],[1,0],[1,0],[1,0],[1,0],[1,0]]}",
         "top: 21 alternatives, at most 20"},
        {"{\"finish\":\"done\"}", "finish: must be one of stop, length, cancel, abort"},
        {"{\"finish\":1}", "finish: must be one of"},
        {"{\"finish\":\"stop\",\"n_cached\":-1}", "n_cached: must be an integer in [0,"},
        {"{\"finish\":\"stop\",\"n_preempted\":2147483648}", "n_preempted: must be an integer"},
        {"{\"finish\":\"stop\",\"t_queue_ms\":-1}", "t_queue_ms: must be a number"},
        {"{\"finish\":\"stop\",\"t_first_ms\":\"1\"}", "t_first_ms: must be a number"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        xllm_rpc_line l;
        char err[256] = "";
        xllm_status st = xllm_rpc_line_parse(cases[i].line, strlen(cases[i].line), N_VOCAB, &l, err,
                                             sizeof(err));
        if (st != XLLM_ERR_INVALID_ARG) fail_msg("case %zu accepted: %s", i, cases[i].line);
        if (!strstr(err, cases[i].says))
            fail_msg("case %zu: '%s' does not say '%s'", i, err, cases[i].says);
    }
    /* a null logprob is -inf (a token the model ruled out) */
    xllm_rpc_line l;
    const char *ok = "{\"t\":3,\"lp\":null,\"top\":[[3,null],[4,-1.5]]}";
    assert_int_equal(xllm_rpc_line_parse(ok, strlen(ok), N_VOCAB, &l, NULL, 0), XLLM_OK);
    assert_true(isinf(l.ev.logprob) && l.ev.logprob < 0);
    assert_int_equal(l.ev.n_top, 2);
    assert_true(l.ev.top_logprobs[1] == -1.5f);
    /* the encoder refuses what no reader accepts */
    xllm_rpc_line bad = {.kind = XLLM_RPC_LINE_TOKEN, .ev = {.token = -1}};
    char err[256];
    assert_null(xllm_rpc_line_encode(&bad, NULL, err, sizeof(err)));
    assert_non_null(strstr(err, "t: negative"));
    bad = (xllm_rpc_line){.kind = XLLM_RPC_LINE_FINISH, .finish = XLLM_FINISH_NONE};
    assert_null(xllm_rpc_line_encode(&bad, NULL, err, sizeof(err)));
    assert_non_null(strstr(err, "finish:"));
    bad = (xllm_rpc_line){
        .kind = XLLM_RPC_LINE_FINISH, .finish = XLLM_FINISH_STOP, .t_first_ms = NAN};
    assert_null(xllm_rpc_line_encode(&bad, NULL, err, sizeof(err)));
    assert_non_null(strstr(err, "t_first_ms"));
}

/* ---------------------------------------------------------------------------------------- */
/* Splitter and reader                                                                       */
/* ---------------------------------------------------------------------------------------- */

typedef struct collected {
    char text[1 << 16]; /* lines joined with '|' */
    size_t len;
    int n;
    int fail_at; /* the callback fails on this line (0 = never) */
} collected;

static xllm_status collect(void *user, const char *p, size_t n, char *err, size_t err_size) {
    collected *c = user;
    if (++c->n == c->fail_at) {
        snprintf(err, err_size, "stop here");
        return XLLM_ERR_INVALID_ARG;
    }
    assert_true(c->len + n + 1 <= sizeof(c->text));
    memcpy(c->text + c->len, p, n);
    c->len += n;
    c->text[c->len++] = '|';
    return XLLM_OK;
}

/* Feeds s in pieces of 1..max_piece bytes (0: all at once). */
static xllm_status feed(xllm_rpc_splitter *sp, const char *s, size_t n, size_t max_piece,
                        collected *c, char *err, size_t err_size) {
    xllm_status st = XLLM_OK;
    for (size_t i = 0; i < n && st == XLLM_OK;) {
        size_t piece = max_piece ? 1 + xllm_test_rand_u64(&rng) % max_piece : n;
        if (piece > n - i) piece = n - i;
        st = xllm_rpc_splitter_feed(sp, s + i, piece, collect, c, err, err_size);
        i += piece;
    }
    return st;
}

static void test_splitter(void **state) {
    (void)state;
    const char stream[] = "a\nbb\n\nccc\r\nd\0e\nfff";
    const char want[] = "a|bb||ccc\r|d\0e|";
    for (size_t max_piece = 0; max_piece <= 8; max_piece++) {
        for (int rep = 0; rep < 20; rep++) {
            xllm_rpc_splitter sp = {0};
            collected *c = calloc(1, sizeof(*c));
            char err[128];
            assert_int_equal(feed(&sp, stream, sizeof(stream) - 1, max_piece, c, err, sizeof(err)),
                             XLLM_OK);
            assert_int_equal(c->len, sizeof(want) - 1);
            assert_memory_equal(c->text, want, c->len);
            assert_int_equal(sp.len, 3); /* "fff" waits for its '\n' */
            xllm_rpc_splitter_free(&sp);
            free(c);
        }
    }
    /* a line over max_line is an error however it arrives; memory stays within the bound */
    char big[300];
    memset(big, 'x', sizeof(big));
    big[40] = '\n';  /* a 40-byte line: fine */
    big[105] = '\n'; /* a 64-byte line: exactly the limit */
    for (size_t max_piece = 0; max_piece <= 64; max_piece += 8) {
        xllm_rpc_splitter sp = {.max_line = 64};
        collected *c = calloc(1, sizeof(*c));
        char err[128] = "";
        assert_int_equal(feed(&sp, big, sizeof(big), max_piece, c, err, sizeof(err)),
                         XLLM_ERR_FORMAT);
        assert_string_equal(err, "line: longer than 64 bytes");
        assert_int_equal(c->n, 2);
        assert_true(sp.cap <= 64);
        /* stopped: later bytes, even good ones, call nothing */
        assert_int_equal(xllm_rpc_splitter_feed(&sp, "ok\n", 3, collect, c, err, sizeof(err)),
                         XLLM_ERR_FORMAT);
        assert_int_equal(c->n, 2);
        xllm_rpc_splitter_free(&sp);
        free(c);
    }
    /* the callback's error stops the splitter */
    xllm_rpc_splitter sp = {0};
    collected *c = calloc(1, sizeof(*c));
    c->fail_at = 2;
    char err[128];
    assert_int_equal(xllm_rpc_splitter_feed(&sp, "a\nb\nc\n", 6, collect, c, err, sizeof(err)),
                     XLLM_ERR_INVALID_ARG);
    assert_string_equal(err, "stop here");
    assert_int_equal(c->n, 2);
    xllm_rpc_splitter_free(&sp);
    free(c);
}

typedef struct got {
    xllm_token_event ev[64];
    int n;
} got;

static xllm_status on_token(void *user, const xllm_token_event *ev, char *err, size_t err_size) {
    got *g = user;
    assert_true(g->n < 64);
    g->ev[g->n++] = *ev;
    return XLLM_OK;
}

/* Appends the encoding of l to s. */
static void put(char *s, size_t size, const xllm_rpc_line *l) {
    char *t = xllm_rpc_line_encode(l, NULL, NULL, 0);
    assert_non_null(t);
    assert_true(strlen(s) + strlen(t) < size);
    strcat(s, t);
    free(t);
}

static void test_reader(void **state) {
    (void)state;
    /* a valid response, cut anywhere: the same events, then a clean end */
    char s[16384] = "";
    xllm_rpc_line l = {.kind = XLLM_RPC_LINE_HEADER};
    put(s, sizeof(s), &l);
    xllm_token_event sent[10];
    for (int i = 0; i < 10; i++) {
        do rand_line(&l);
        while (l.kind != XLLM_RPC_LINE_TOKEN);
        sent[i] = l.ev;
        put(s, sizeof(s), &l);
    }
    l = (xllm_rpc_line){.kind = XLLM_RPC_LINE_FINISH,
                        .finish = XLLM_FINISH_LENGTH,
                        .n_cached = 16,
                        .t_queue_ms = 1.5,
                        .t_first_ms = 20.25};
    put(s, sizeof(s), &l);
    for (int rep = 0; rep < 50; rep++) {
        got g = {0};
        xllm_rpc_reader r = {.n_vocab = N_VOCAB, .on_token = on_token, .user = &g};
        char err[256];
        for (size_t i = 0, n = strlen(s); i < n;) {
            size_t piece = 1 + xllm_test_rand_u64(&rng) % (rep + 1);
            if (piece > n - i) piece = n - i;
            assert_int_equal(xllm_rpc_reader_feed(&r, s + i, piece, err, sizeof(err)), XLLM_OK);
            i += piece;
        }
        assert_int_equal(xllm_rpc_reader_end(&r, err, sizeof(err)), XLLM_OK);
        assert_int_equal(g.n, 10);
        assert_int_equal(r.n_tokens, 10);
        for (int i = 0; i < 10; i++) {
            xllm_rpc_line a = {.kind = XLLM_RPC_LINE_TOKEN, .ev = sent[i]};
            xllm_rpc_line b = {.kind = XLLM_RPC_LINE_TOKEN, .ev = g.ev[i]};
            assert_true(xllm_rpc_line_equal(&a, &b));
        }
        assert_true(r.finished && xllm_rpc_line_equal(&r.last, &l));
        xllm_rpc_reader_free(&r);
    }
    /* responses that break the RPC: stopped at the bad line, or refused at the end */
#define H "{\"magic\":\"xllm-rpc\",\"version\":1}\n"
#define T "{\"t\":5,\"lp\":-0.5}\n"
#define F "{\"finish\":\"stop\"}\n"
    static const struct {
        const char *body;
        bool at_feed; /* the error comes while feeding (else at the end) */
        int tokens;   /* token events delivered before it */
        const char *says;
    } cases[] = {
        {T H F, true, 0, "line 1: the first line is not the header"},
        {"{\"magic\":\"xllm-rpc\",\"version\":3}\n" T F, true, 0, "line 1: version: 3"},
        {"{\"magic\":\"xllm\",\"version\":1}\n" T F, true, 0, "line 1: magic: must be"},
        {"garbage\n" H T F, true, 0, "line 1: line: not JSON"},
        {"\n" H T F, true, 0, "line 1: line: not JSON"},
        {H T H F, true, 1, "line 3: a second header"},
        {H T "{\"t\":5000,\"lp\":0}\n" F, true, 1, "line 3: t: token id 5000 is outside"},
        {H T F T, true, 1, "line 4: a line after the finish line"},
        {H T F F, true, 1, "line 4: a line after the finish line"},
        {H T T, false, 2, "the stream ended without a finish line (after the header, 2 tokens)"},
        {"", false, 0, "the stream ended without a finish line (no header, 0 tokens)"},
        {H T "{\"finish\":\"st", false, 1, "the stream was cut in the middle of line 3"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        got g = {0};
        xllm_rpc_reader r = {.n_vocab = N_VOCAB, .on_token = on_token, .user = &g};
        char err[256] = "";
        xllm_status st =
            xllm_rpc_reader_feed(&r, cases[i].body, strlen(cases[i].body), err, sizeof(err));
        if (!cases[i].at_feed) {
            assert_int_equal(st, XLLM_OK);
            st = xllm_rpc_reader_end(&r, err, sizeof(err));
        } else {
            /* and the end is refused too */
            char err2[256];
            assert_int_not_equal(xllm_rpc_reader_end(&r, err2, sizeof(err2)), XLLM_OK);
        }
        if (st == XLLM_OK) fail_msg("case %zu accepted", i);
        if (!strstr(err, cases[i].says))
            fail_msg("case %zu: '%s' does not say '%s'", i, err, cases[i].says);
        assert_int_equal(g.n, cases[i].tokens);
        xllm_rpc_reader_free(&r);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_request_roundtrip),
        cmocka_unit_test(test_request_defaults),
        cmocka_unit_test(test_request_malformed),
        cmocka_unit_test(test_request_sizes),
        cmocka_unit_test(test_encode_refuses),
        cmocka_unit_test(test_line_roundtrip),
        cmocka_unit_test(test_line_malformed),
        cmocka_unit_test(test_splitter),
        cmocka_unit_test(test_reader),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
