/* xllm bench-serve: a load generator for any OpenAI-compatible server. Streams every request
 * (SSE) from one curl-multi event loop and reports TTFT, TPOT, ITL, end-to-end latency,
 * throughput and goodput, for online and offline classes separately in tidal mode. */
#include <curl/curl.h>
#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "bench/bench.h"
#include "cli/bench_serve.h"
#include "cli/cli.h"
#include "cli/common.h"
#include "util/common.h"

#define CMD "bench-serve"

/* ---- options ------------------------------------------------------------------------------- */

typedef struct bs_opts {
    const char *url, *endpoint, *model, *dataset, *dataset_path, *api_key, *extra_body;
    int64_t num_prompts, random_input, random_output, max_tokens, concurrency, seed, max_input;
    double random_range, request_rate, timeout_s, slo_ttft_ms, slo_tpot_ms, temperature;
    bool ignore_eos, json, tidal, has_temperature, quiet;
    int64_t burst_size, bursts, online_priority, online_input, online_output;
    double burst_interval;
} bs_opts;

static void usage(FILE *f) {
    fprintf(f,
            "usage: xllm bench-serve [options]\n"
            "Load generator for an OpenAI-compatible server (xllm serve, llama-server, vLLM...).\n"
            "\n"
            "server:\n"
            "  --url URL              base URL (default http://127.0.0.1:8080)\n"
            "  --endpoint E           chat | completions (default completions)\n"
            "  --model NAME           model field (default: the first of GET /v1/models)\n"
            "  --api-key KEY          sent as 'Authorization: Bearer KEY'\n"
            "  --timeout-s S          per-request limit in seconds (default 600, 0: none)\n"
            "prompts:\n"
            "  --dataset D            sharegpt | random (default sharegpt)\n"
            "  --dataset-path P       ShareGPT JSON file or folder (default\n"
            "                         $XLLM_SHARED/data/sharegpt, else ../shared/data/sharegpt)\n"
            "  --max-input-tokens N   skip ShareGPT prompts longer than about N tokens\n"
            "  --random-input N       random prompts of about N tokens (default 200)\n"
            "  --random-output N      max_tokens of random prompts (default 128)\n"
            "  --random-range-ratio R lengths uniform in N*[1-R, 1+R] (default 0)\n"
            "  --num-prompts N        requests to send (default 100)\n"
            "  --seed S               prompt sampling and arrival times (default 0)\n"
            "request:\n"
            "  --max-tokens N         max_tokens of every request (default: the dataset's answer\n"
            "                         length, else 128)\n"
            "  --ignore-eos           send ignore_eos: true\n"
            "  --temperature T        send this temperature (default: not sent)\n"
            "  --extra-body JSON      fields merged into every request body\n"
            "load:\n"
            "  --request-rate R       Poisson arrivals at R requests/s (default inf: all at once)\n"
            "  --concurrency C        at most C requests in flight (default: no limit)\n"
            "  --tidal                bursts of online requests over the steady stream, which is\n"
            "                         sent as offline (\"offline\": true); classes reported apart\n"
            "  --burst-size N         online requests per burst (default 8)\n"
            "  --burst-interval S     seconds between bursts, first one after S (default 2)\n"
            "  --bursts N             number of bursts (default 3)\n"
            "  --online-priority P    \"priority\" of online requests (default 0)\n"
            "  --online-input N       online requests: random prompts of about N tokens (default:\n"
            "                         drawn like the steady stream's)\n"
            "  --online-output N      online requests: max_tokens N (default: as the steady ones)\n"
            "report:\n"
            "  --slo-ttft-ms X        goodput counts requests with TTFT <= X ms ...\n"
            "  --slo-tpot-ms Y        ... and TPOT <= Y ms\n"
            "  --json                 one JSON object on stdout instead of the table\n"
            "  -q, --quiet            no progress bar\n");
}

static bool parse_double(const char *opt, const char *s, double lo, bool allow_inf, double *out) {
    if (allow_inf && (!strcmp(s, "inf") || !strcmp(s, "0"))) {
        *out = INFINITY;
        return true;
    }
    char *end;
    double v = strtod(s, &end);
    if (end == s || *end || !isfinite(v) || v < lo) {
        fprintf(stderr, "xllm " CMD ": bad value '%s' for %s (expected a number >= %g)\n", s, opt,
                lo);
        return false;
    }
    *out = v;
    return true;
}

/* Returns 1 on success, 0 for --help, -1 on error (message printed). */
static int parse_opts(int argc, char **argv, bs_opts *o) {
    static char default_path[4096];
    const char *shared = getenv("XLLM_SHARED");
    snprintf(default_path, sizeof(default_path), "%s/data/sharegpt",
             shared && shared[0] ? shared : "../shared");
    *o = (bs_opts){.url = "http://127.0.0.1:8080",
                   .endpoint = "completions",
                   .dataset = "sharegpt",
                   .dataset_path = default_path,
                   .num_prompts = 100,
                   .random_input = 200,
                   .random_output = 128,
                   .request_rate = INFINITY,
                   .timeout_s = 600,
                   .burst_size = 8,
                   .bursts = 3,
                   .burst_interval = 2.0};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = NULL;
#define VAL()                                                                                      \
    do {                                                                                           \
        if (!(v = xllm_cli_value(CMD, argc, argv, &i))) return -1;                                 \
    } while (0)
#define INT(field, lo, hi)                                                                         \
    do {                                                                                           \
        VAL();                                                                                     \
        if (!xllm_cli_int(CMD, a, v, lo, hi, &o->field)) return -1;                                \
    } while (0)
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "--url")) {
            VAL();
            o->url = v;
        } else if (!strcmp(a, "--endpoint")) {
            VAL();
            if (strcmp(v, "chat") && strcmp(v, "completions")) {
                fprintf(stderr, "xllm " CMD ": bad endpoint '%s' (expected chat or completions)\n",
                        v);
                return -1;
            }
            o->endpoint = v;
        } else if (!strcmp(a, "--model")) {
            VAL();
            o->model = v;
        } else if (!strcmp(a, "--api-key")) {
            VAL();
            o->api_key = v;
        } else if (!strcmp(a, "--dataset")) {
            VAL();
            if (strcmp(v, "sharegpt") && strcmp(v, "random")) {
                fprintf(stderr, "xllm " CMD ": bad dataset '%s' (expected sharegpt or random)\n",
                        v);
                return -1;
            }
            o->dataset = v;
        } else if (!strcmp(a, "--dataset-path")) {
            VAL();
            o->dataset_path = v;
        } else if (!strcmp(a, "--extra-body")) {
            VAL();
            o->extra_body = v;
        } else if (!strcmp(a, "--max-input-tokens")) {
            INT(max_input, 1, INT32_MAX);
        } else if (!strcmp(a, "--random-input")) {
            INT(random_input, 1, 10000000);
        } else if (!strcmp(a, "--random-output")) {
            INT(random_output, 1, 10000000);
        } else if (!strcmp(a, "--num-prompts")) {
            INT(num_prompts, 1, 10000000);
        } else if (!strcmp(a, "--seed")) {
            INT(seed, 0, INT64_MAX);
        } else if (!strcmp(a, "--max-tokens")) {
            INT(max_tokens, 1, 10000000);
        } else if (!strcmp(a, "--concurrency")) {
            INT(concurrency, 1, 1000000);
        } else if (!strcmp(a, "--burst-size")) {
            INT(burst_size, 1, 1000000);
        } else if (!strcmp(a, "--bursts")) {
            INT(bursts, 0, 1000000);
        } else if (!strcmp(a, "--online-priority")) {
            INT(online_priority, INT32_MIN, INT32_MAX);
        } else if (!strcmp(a, "--online-input")) {
            INT(online_input, 1, 10000000);
        } else if (!strcmp(a, "--online-output")) {
            INT(online_output, 1, 10000000);
        } else if (!strcmp(a, "--random-range-ratio")) {
            VAL();
            if (!parse_double(a, v, 0, false, &o->random_range)) return -1;
            if (o->random_range >= 1) {
                fprintf(stderr, "xllm " CMD ": --random-range-ratio must be below 1\n");
                return -1;
            }
        } else if (!strcmp(a, "--request-rate")) {
            VAL();
            if (!parse_double(a, v, 0, true, &o->request_rate)) return -1;
        } else if (!strcmp(a, "--timeout-s")) {
            VAL();
            if (!parse_double(a, v, 0, false, &o->timeout_s)) return -1;
        } else if (!strcmp(a, "--burst-interval")) {
            VAL();
            if (!parse_double(a, v, 0, false, &o->burst_interval)) return -1;
        } else if (!strcmp(a, "--slo-ttft-ms")) {
            VAL();
            if (!parse_double(a, v, 0, false, &o->slo_ttft_ms)) return -1;
        } else if (!strcmp(a, "--slo-tpot-ms")) {
            VAL();
            if (!parse_double(a, v, 0, false, &o->slo_tpot_ms)) return -1;
        } else if (!strcmp(a, "--temperature")) {
            VAL();
            if (!parse_double(a, v, 0, false, &o->temperature)) return -1;
            o->has_temperature = true;
        } else if (!strcmp(a, "--ignore-eos")) {
            o->ignore_eos = true;
        } else if (!strcmp(a, "--json")) {
            o->json = true;
        } else if (!strcmp(a, "--tidal")) {
            o->tidal = true;
        } else if (!strcmp(a, "-q") || !strcmp(a, "--quiet")) {
            o->quiet = true;
        } else {
            fprintf(stderr, "xllm " CMD ": unknown option '%s' (see --help)\n", a);
            return -1;
        }
#undef VAL
#undef INT
    }
    if (strlen(o->url) > 2000) {
        fprintf(stderr, "xllm " CMD ": --url is too long\n");
        return -1;
    }
    if (strncmp(o->url, "http://", 7) && strncmp(o->url, "https://", 8)) {
        fprintf(stderr, "xllm " CMD ": --url must start with http:// or https:// (got '%s')\n",
                o->url);
        return -1;
    }
    return 1;
}

/* ---- one request --------------------------------------------------------------------------- */

#define BS_ERR_BODY_MAX 2048

/* Why a request failed; counted per kind in the report. */
typedef enum bs_err_kind {
    BS_E_NONE,
    BS_E_CONNECT,   /* no connection to the server */
    BS_E_HTTP,      /* an answer other than 200 */
    BS_E_CUT,       /* the stream stopped before [DONE] / finish_reason */
    BS_E_MALFORMED, /* an SSE event that is not a JSON object */
    BS_E_SERVER,    /* an error object inside the stream */
    BS_E_TIMEOUT,   /* --timeout-s ran out */
    BS_E_OTHER,
    BS_E_COUNT
} bs_err_kind;

static const char *const BS_ERR_NAMES[BS_E_COUNT] = {
    "none", "connect", "http", "stream_cut", "malformed_sse", "error_event", "timeout", "other"};

typedef struct bs_req {
    int32_t id;
    bool online;
    const xllm_bserve_prompt *prompt;
    int32_t max_tokens;
    char *body;
    CURL *easy;
    xllm_bench_sse sse;
    double t_arrive;        /* scheduled send time, s from the start */
    double t_start, t_end;  /* monotonic s */
    double t_first, t_last; /* first and latest content chunk (0: none yet) */
    double t_now;           /* time of the data being parsed */
    double *itl;            /* gaps between content chunks, s */
    size_t n_itl, cap_itl;
    int64_t n_chunks, usage_out, usage_in; /* usage_*: -1 until the server reports them */
    bool done_seen, finish_seen, started, finished, ok;
    long http;
    char *err_body; /* body of a non-200 answer (first BS_ERR_BODY_MAX bytes) */
    size_t err_len;
    char err[320];
    bs_err_kind err_kind;
    char curl_err[CURL_ERROR_SIZE];
} bs_req;

static void req_set_err(bs_req *r, bs_err_kind kind, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void req_set_err(bs_req *r, bs_err_kind kind, const char *fmt, ...) {
    if (r->err[0]) return; /* keep the first cause */
    r->err_kind = kind;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(r->err, sizeof(r->err), fmt, ap);
    va_end(ap);
}

/* Text of a chunk's first choice: chat delta content (or reasoning), or completion text. */
static const char *chunk_text(json_t *choice) {
    json_t *delta = json_object_get(choice, "delta");
    const char *keys[] = {"content", "reasoning_content", "reasoning"};
    if (json_is_object(delta)) {
        for (size_t k = 0; k < 3; k++) {
            const char *s = json_string_value(json_object_get(delta, keys[k]));
            if (s && s[0]) return s;
        }
    }
    const char *t = json_string_value(json_object_get(choice, "text"));
    return t && t[0] ? t : NULL;
}

static void snippet(const char *s, size_t n, char *out, size_t out_size) {
    size_t j = 0;
    for (size_t i = 0; i < n && j + 4 < out_size; i++) {
        unsigned char c = (unsigned char)s[i];
        out[j++] = c < 0x20 ? ' ' : (char)c;
    }
    if (j + 4 >= out_size && n > j) {
        memcpy(out + j, "...", 3);
        j += 3;
    }
    out[j] = '\0';
}

/* Message of an OpenAI-style error object or string. */
static const char *error_message(json_t *e) {
    if (json_is_string(e)) return json_string_value(e);
    const char *m = json_string_value(json_object_get(e, "message"));
    return m ? m : NULL;
}

static int on_event(void *user, const char *data, size_t len) {
    bs_req *r = user;
    if (len == 6 && !memcmp(data, "[DONE]", 6)) {
        r->done_seen = true;
        return 0;
    }
    json_error_t je;
    json_t *root = json_loadb(data, len, JSON_ALLOW_NUL, &je);
    if (!json_is_object(root)) {
        char s[96];
        snippet(data, len, s, sizeof(s));
        req_set_err(r, BS_E_MALFORMED, "malformed SSE event after %lld chunks: '%s'",
                    (long long)r->n_chunks, s);
        json_decref(root);
        return 1;
    }
    json_t *e = json_object_get(root, "error");
    if (e) {
        const char *m = error_message(e);
        req_set_err(r, BS_E_SERVER, "error event in stream: %s", m ? m : "(no message)");
        json_decref(root);
        return 1;
    }
    json_t *choices = json_object_get(root, "choices");
    size_t i;
    json_t *c;
    json_array_foreach(choices, i, c) {
        if (chunk_text(c)) {
            if (r->t_first == 0) {
                r->t_first = r->t_now;
            } else {
                if (r->n_itl == r->cap_itl) {
                    r->cap_itl = r->cap_itl ? r->cap_itl * 2 : 64;
                    r->itl = xllm_xrealloc(r->itl, r->cap_itl * sizeof(double));
                }
                r->itl[r->n_itl++] = r->t_now - r->t_last;
            }
            r->t_last = r->t_now;
            r->n_chunks++;
        }
        if (json_is_string(json_object_get(c, "finish_reason"))) r->finish_seen = true;
    }
    json_t *usage = json_object_get(root, "usage");
    if (json_is_object(usage)) {
        json_t *ct = json_object_get(usage, "completion_tokens");
        json_t *pt = json_object_get(usage, "prompt_tokens");
        if (json_is_integer(ct)) r->usage_out = json_integer_value(ct);
        if (json_is_integer(pt)) r->usage_in = json_integer_value(pt);
    }
    json_decref(root);
    return 0;
}

static size_t on_write(char *ptr, size_t size, size_t nmemb, void *user) {
    bs_req *r = user;
    size_t n = size * nmemb;
    r->t_now = xllm_cli_now();
    if (r->http == 0) curl_easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &r->http);
    if (r->http != 200) {
        size_t room = BS_ERR_BODY_MAX - r->err_len;
        size_t k = n < room ? n : room;
        if (!r->err_body) r->err_body = xllm_xmalloc(BS_ERR_BODY_MAX + 1);
        memcpy(r->err_body + r->err_len, ptr, k);
        r->err_len += k;
        r->err_body[r->err_len] = '\0';
        return n;
    }
    int rc = xllm_bench_sse_feed(&r->sse, ptr, n, on_event, r);
    if (rc == XLLM_ERR_FORMAT)
        req_set_err(r, BS_E_MALFORMED, "malformed SSE: an event over 16 MiB");
    return rc ? 0 : n; /* 0 aborts the transfer */
}

/* Classifies a finished transfer: success, or one error message. */
static void req_finish(bs_req *r, CURLcode code) {
    r->t_end = xllm_cli_now();
    r->finished = true;
    curl_easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &r->http);
    if (code == CURLE_OK && r->http == 200 && !r->err[0]) {
        r->t_now = r->t_end;
        if (xllm_bench_sse_finish(&r->sse, on_event, r) == XLLM_ERR_FORMAT)
            req_set_err(r, BS_E_MALFORMED, "malformed SSE: an event over 16 MiB");
    }
    if (r->err[0]) return; /* set while parsing */
    if (code != CURLE_OK && (r->http == 0 || r->http == 200)) {
        const char *detail = r->curl_err[0] ? r->curl_err : curl_easy_strerror(code);
        if (code == CURLE_COULDNT_CONNECT || code == CURLE_COULDNT_RESOLVE_HOST)
            req_set_err(r, BS_E_CONNECT, "cannot connect: %s", detail);
        else if (code == CURLE_OPERATION_TIMEDOUT)
            req_set_err(r, BS_E_TIMEOUT, "timeout after %lld chunks: %s", (long long)r->n_chunks,
                        detail);
        else if (r->http == 200)
            req_set_err(r, BS_E_CUT, "stream cut after %lld chunks: %s", (long long)r->n_chunks,
                        detail);
        else
            req_set_err(r, BS_E_OTHER, "transfer failed: %s", detail);
        return;
    }
    if (r->http != 200) {
        const char *msg = NULL;
        json_t *root = r->err_body ? json_loadb(r->err_body, r->err_len, 0, NULL) : NULL;
        if (root) msg = error_message(json_object_get(root, "error"));
        if (!msg && root) msg = json_string_value(json_object_get(root, "detail"));
        char s[200];
        if (msg)
            snprintf(s, sizeof(s), "%s", msg);
        else
            snippet(r->err_body ? r->err_body : "", r->err_len, s, sizeof(s));
        req_set_err(r, BS_E_HTTP, "HTTP %ld: %s", r->http, s[0] ? s : "(empty body)");
        json_decref(root);
        return;
    }
    if (!r->done_seen && !r->finish_seen) {
        req_set_err(r, BS_E_CUT, "stream ended after %lld chunks without [DONE] or finish_reason",
                    (long long)r->n_chunks);
        return;
    }
    r->ok = true;
}

static int64_t req_out_tokens(const bs_req *r) {
    return r->usage_out >= 0 ? r->usage_out : r->n_chunks;
}

static int64_t req_in_tokens(const bs_req *r) {
    return r->usage_in >= 0 ? r->usage_in : r->prompt->input_tokens;
}

/* ---- request bodies ------------------------------------------------------------------------ */

/* Returns a malloc'd JSON body. */
static char *make_body(const bs_opts *o, const char *model, json_t *extra, const bs_req *r) {
    json_t *b = json_object();
    if (model) json_object_set_new(b, "model", json_string(model));
    json_t *text = json_string(r->prompt->text);
    if (!text) text = json_string("(invalid UTF-8 prompt)");
    if (!strcmp(o->endpoint, "chat")) {
        json_t *msg = json_pack("{s:s, s:o}", "role", "user", "content", text);
        json_object_set_new(b, "messages", json_pack("[o]", msg));
    } else {
        json_object_set_new(b, "prompt", text);
    }
    json_object_set_new(b, "max_tokens", json_integer(r->max_tokens));
    json_object_set_new(b, "stream", json_true());
    json_object_set_new(b, "stream_options", json_pack("{s:b}", "include_usage", 1));
    if (o->ignore_eos) json_object_set_new(b, "ignore_eos", json_true());
    if (o->has_temperature) json_object_set_new(b, "temperature", json_real(o->temperature));
    if (o->tidal) {
        if (r->online)
            json_object_set_new(b, "priority", json_integer(o->online_priority));
        else
            json_object_set_new(b, "offline", json_true());
    }
    if (extra) json_object_update(b, extra);
    char *s = json_dumps(b, JSON_COMPACT);
    json_decref(b);
    XLLM_ASSERT(s);
    return s;
}

/* ---- the event loop ------------------------------------------------------------------------ */

typedef struct bs_run {
    const bs_opts *o;
    char url[2112];
    struct curl_slist *headers;
    CURLM *multi;
    bs_req *reqs; /* offline/steady requests first (n_steady), then online ones */
    size_t n, n_steady;
    size_t next_steady, next_online, in_flight_steady, in_flight, n_done, n_failed;
    double t0, t_end;
    bool progress;
    double last_draw;
} bs_run;

static bool start_req(bs_run *b, bs_req *r) {
    CURL *e = curl_easy_init();
    if (!e) {
        req_set_err(r, BS_E_OTHER, "curl_easy_init failed");
        return false;
    }
    r->easy = e;
    r->usage_in = r->usage_out = -1;
    xllm_bench_sse_init(&r->sse);
    curl_easy_setopt(e, CURLOPT_URL, b->url);
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, b->headers);
    curl_easy_setopt(e, CURLOPT_POSTFIELDS, r->body);
    curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)strlen(r->body));
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_write);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, r);
    curl_easy_setopt(e, CURLOPT_PRIVATE, r);
    curl_easy_setopt(e, CURLOPT_ERRORBUFFER, r->curl_err);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_1_1);
    curl_easy_setopt(e, CURLOPT_NOPROXY, "127.0.0.1,localhost,::1");
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, 30000L);
    if (b->o->timeout_s > 0)
        curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, (long)(b->o->timeout_s * 1000.0));
    r->t_start = xllm_cli_now();
    r->started = true;
    if (curl_multi_add_handle(b->multi, e) != CURLM_OK) {
        req_set_err(r, BS_E_OTHER, "curl_multi_add_handle failed");
        return false;
    }
    b->in_flight++;
    if (!r->online) b->in_flight_steady++;
    return true;
}

static void done_req(bs_run *b, bs_req *r) {
    if (r->easy) {
        curl_multi_remove_handle(b->multi, r->easy);
        curl_easy_cleanup(r->easy);
        r->easy = NULL;
        b->in_flight--;
        if (!r->online) b->in_flight_steady--;
    }
    if (!r->finished) {
        r->t_end = xllm_cli_now();
        r->finished = true;
    }
    xllm_bench_sse_free(&r->sse);
    free(r->err_body);
    r->err_body = NULL;
    free(r->body);
    r->body = NULL;
    b->n_done++;
    if (!r->ok) b->n_failed++;
}

static void draw_progress(bs_run *b, bool final) {
    double now = xllm_cli_now();
    if (!b->progress || (!final && now - b->last_draw < 0.1)) return;
    b->last_draw = now;
    const int width = 30;
    int fill = b->n ? (int)((double)b->n_done / (double)b->n * width) : width;
    char bar[64];
    for (int i = 0; i < width; i++) bar[i] = i < fill ? '=' : ' ';
    bar[width] = '\0';
    fprintf(stderr, "\r[%s] %zu/%zu  failed %zu  in flight %zu  %.1f s ", bar, b->n_done, b->n,
            b->n_failed, b->in_flight, now - b->t0);
    if (final) fputc('\n', stderr);
    fflush(stderr);
}

/* Starts every request whose time has come; returns seconds until the next arrival (or a
 * large value when none is waiting on time). */
static double launch_due(bs_run *b) {
    double now = xllm_cli_now() - b->t0, wait = 1e9;
    int64_t conc = b->o->concurrency;
    while (b->next_steady < b->n_steady) {
        bs_req *r = &b->reqs[b->next_steady];
        if (r->t_arrive > now) {
            wait = r->t_arrive - now;
            break;
        }
        if (conc > 0 && b->in_flight_steady >= (size_t)conc) break;
        b->next_steady++;
        if (!start_req(b, r)) done_req(b, r);
    }
    while (b->n_steady + b->next_online < b->n) {
        bs_req *r = &b->reqs[b->n_steady + b->next_online];
        if (r->t_arrive > now) {
            if (r->t_arrive - now < wait) wait = r->t_arrive - now;
            break;
        }
        b->next_online++;
        if (!start_req(b, r)) done_req(b, r);
    }
    return wait;
}

static int run_loop(bs_run *b) {
    b->t0 = xllm_cli_now();
    while (b->n_done < b->n) {
        double wait = launch_due(b);
        int running = 0;
        if (curl_multi_perform(b->multi, &running) != CURLM_OK) return -1;
        CURLMsg *m;
        int left;
        while ((m = curl_multi_info_read(b->multi, &left))) {
            if (m->msg != CURLMSG_DONE) continue;
            bs_req *r = NULL;
            curl_easy_getinfo(m->easy_handle, CURLINFO_PRIVATE, (char **)&r);
            req_finish(r, m->data.result);
            done_req(b, r);
        }
        draw_progress(b, false);
        if (b->n_done >= b->n) break;
        double t = wait < 0.1 ? wait : 0.1;
        int ms = (int)(t * 1000.0);
        if (t > 0 && ms == 0) ms = 1;
        if (ms > 0 || b->in_flight > 0) curl_multi_poll(b->multi, NULL, 0, ms, NULL);
    }
    b->t_end = xllm_cli_now();
    draw_progress(b, true);
    return 0;
}

/* ---- model discovery ----------------------------------------------------------------------- */

typedef struct membuf {
    char *p;
    size_t n;
} membuf;

static size_t on_mem(char *ptr, size_t size, size_t nmemb, void *user) {
    membuf *m = user;
    size_t n = size * nmemb;
    if (m->n + n > (1u << 20)) return 0;
    m->p = xllm_xrealloc(m->p, m->n + n + 1);
    memcpy(m->p + m->n, ptr, n);
    m->n += n;
    m->p[m->n] = '\0';
    return n;
}

/* GET base/v1/models; returns the first model id (malloc'd) or NULL with a reason in err. */
static char *discover_model(const char *base, struct curl_slist *headers, char *err,
                            size_t err_size) {
    char url[2200];
    snprintf(url, sizeof(url), "%s/models", base);
    CURL *e = curl_easy_init();
    if (!e) return NULL;
    membuf m = {0};
    char cerr[CURL_ERROR_SIZE] = "";
    curl_easy_setopt(e, CURLOPT_URL, url);
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, headers);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_mem);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, &m);
    curl_easy_setopt(e, CURLOPT_ERRORBUFFER, cerr);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_NOPROXY, "127.0.0.1,localhost,::1");
    curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, 10000L);
    CURLcode c = curl_easy_perform(e);
    long http = 0;
    curl_easy_getinfo(e, CURLINFO_RESPONSE_CODE, &http);
    curl_easy_cleanup(e);
    char *id = NULL;
    if (c != CURLE_OK) {
        xllm_set_err(err, err_size, "%s", cerr[0] ? cerr : curl_easy_strerror(c));
    } else if (http != 200) {
        xllm_set_err(err, err_size, "GET %s answered HTTP %ld", url, http);
    } else {
        json_t *root = m.p ? json_loadb(m.p, m.n, 0, NULL) : NULL;
        const char *s = json_string_value(
            json_object_get(json_array_get(json_object_get(root, "data"), 0), "id"));
        if (s)
            id = xllm_xstrdup(s);
        else
            xllm_set_err(err, err_size, "GET %s: no data[0].id in the answer", url);
        json_decref(root);
    }
    free(m.p);
    return id;
}

/* ---- report -------------------------------------------------------------------------------- */

typedef struct bs_class {
    const char *name;
    size_t n, completed, failed, good, no_tokens;
    int64_t in_tokens, out_tokens;
    xllm_bench_summary ttft, tpot, itl, e2e; /* ms */
    const char *first_error;
    int32_t first_error_id;
    size_t by_kind[BS_E_COUNT]; /* failures per bs_err_kind */
} bs_class;

static bool is_good(const bs_opts *o, const bs_req *r) {
    if (!r->ok) return false;
    double ttft = r->t_first > 0 ? (r->t_first - r->t_start) * 1e3 : INFINITY;
    int64_t out = req_out_tokens(r);
    double tpot = out > 1 && r->t_first > 0 ? (r->t_end - r->t_first) * 1e3 / (double)(out - 1) : 0;
    if (o->slo_ttft_ms > 0 && !(ttft <= o->slo_ttft_ms)) return false;
    if (o->slo_tpot_ms > 0 && tpot > o->slo_tpot_ms) return false;
    return true;
}

/* Summarizes the requests of one class: which = 0 all, 1 online, 2 offline. */
static bs_class summarize_class(const bs_run *b, int which, const char *name) {
    bs_class c = {.name = name};
    size_t n_itl = 0;
    for (size_t i = 0; i < b->n; i++) n_itl += b->reqs[i].n_itl;
    double *ttft = xllm_xcalloc(b->n + 1, sizeof(double));
    double *tpot = xllm_xcalloc(b->n + 1, sizeof(double));
    double *e2e = xllm_xcalloc(b->n + 1, sizeof(double));
    double *itl = xllm_xcalloc(n_itl + 1, sizeof(double));
    size_t nt = 0, np = 0, ne = 0, ni = 0;
    for (size_t i = 0; i < b->n; i++) {
        const bs_req *r = &b->reqs[i];
        if ((which == 1 && !r->online) || (which == 2 && r->online)) continue;
        c.n++;
        if (!r->ok) {
            c.failed++;
            c.by_kind[r->err_kind]++;
            if (!c.first_error) {
                c.first_error = r->err;
                c.first_error_id = r->id;
            }
            continue;
        }
        c.completed++;
        if (is_good(b->o, r)) c.good++;
        int64_t out = req_out_tokens(r);
        c.out_tokens += out;
        c.in_tokens += req_in_tokens(r);
        e2e[ne++] = (r->t_end - r->t_start) * 1e3;
        if (r->t_first == 0) {
            c.no_tokens++;
            continue;
        }
        ttft[nt++] = (r->t_first - r->t_start) * 1e3;
        if (out > 1) tpot[np++] = (r->t_end - r->t_first) * 1e3 / (double)(out - 1);
        for (size_t k = 0; k < r->n_itl; k++) itl[ni++] = r->itl[k] * 1e3;
    }
    c.ttft = xllm_bench_summarize(ttft, nt);
    c.tpot = xllm_bench_summarize(tpot, np);
    c.itl = xllm_bench_summarize(itl, ni);
    c.e2e = xllm_bench_summarize(e2e, ne);
    free(ttft);
    free(tpot);
    free(e2e);
    free(itl);
    return c;
}

static json_t *summary_json(const xllm_bench_summary *s) {
    return json_pack("{s:I, s:f, s:f, s:f, s:f, s:f, s:f}", "n", (json_int_t)s->n, "mean", s->mean,
                     "p50", s->p50, "p90", s->p90, "p99", s->p99, "min", s->min, "max", s->max);
}

static void class_json(json_t *o, const bs_class *c, double dur) {
    json_object_set_new(o, "requests", json_integer((json_int_t)c->n));
    json_object_set_new(o, "completed", json_integer((json_int_t)c->completed));
    json_object_set_new(o, "failed", json_integer((json_int_t)c->failed));
    json_object_set_new(o, "first_error",
                        c->first_error ? json_string(c->first_error) : json_null());
    json_t *kinds = json_object();
    for (int k = 1; k < BS_E_COUNT; k++)
        if (c->by_kind[k])
            json_object_set_new(kinds, BS_ERR_NAMES[k], json_integer((json_int_t)c->by_kind[k]));
    json_object_set_new(o, "errors", kinds);
    json_object_set_new(o, "completed_without_tokens", json_integer((json_int_t)c->no_tokens));
    json_object_set_new(o, "total_input_tokens", json_integer(c->in_tokens));
    json_object_set_new(o, "total_output_tokens", json_integer(c->out_tokens));
    json_object_set_new(o, "request_throughput", json_real((double)c->completed / dur));
    json_object_set_new(o, "output_throughput", json_real((double)c->out_tokens / dur));
    json_object_set_new(o, "total_token_throughput",
                        json_real((double)(c->in_tokens + c->out_tokens) / dur));
    json_object_set_new(o, "good_requests", json_integer((json_int_t)c->good));
    json_object_set_new(o, "request_goodput", json_real((double)c->good / dur));
    json_object_set_new(o, "ttft_ms", summary_json(&c->ttft));
    json_object_set_new(o, "tpot_ms", summary_json(&c->tpot));
    json_object_set_new(o, "itl_ms", summary_json(&c->itl));
    json_object_set_new(o, "e2e_ms", summary_json(&c->e2e));
}

static void print_class(const bs_opts *o, const bs_class *c, double dur) {
    printf("%-36s %zu\n", "Successful requests:", c->completed);
    printf("%-36s %zu", "Failed requests:", c->failed);
    const char *sep = "  (";
    for (int k = 1; k < BS_E_COUNT; k++)
        if (c->by_kind[k]) {
            printf("%s%s %zu", sep, BS_ERR_NAMES[k], c->by_kind[k]);
            sep = ", ";
        }
    printf("%s\n", c->failed ? ")" : "");
    if (c->first_error)
        printf("%-36s request %d: %s\n", "First error:", c->first_error_id, c->first_error);
    if (c->no_tokens) printf("%-36s %zu\n", "Completed without tokens:", c->no_tokens);
    printf("%-36s %lld\n", "Total input tokens:", (long long)c->in_tokens);
    printf("%-36s %lld\n", "Total generated tokens:", (long long)c->out_tokens);
    printf("%-36s %.2f\n", "Request throughput (req/s):", (double)c->completed / dur);
    printf("%-36s %.2f\n", "Output token throughput (tok/s):", (double)c->out_tokens / dur);
    printf("%-36s %.2f\n",
           "Total token throughput (tok/s):", (double)(c->in_tokens + c->out_tokens) / dur);
    if (o->slo_ttft_ms > 0 || o->slo_tpot_ms > 0) {
        printf("%-36s %.2f  (%zu requests met", "Goodput (req/s):", (double)c->good / dur, c->good);
        if (o->slo_ttft_ms > 0) printf(" TTFT <= %g ms", o->slo_ttft_ms);
        if (o->slo_ttft_ms > 0 && o->slo_tpot_ms > 0) printf(" and");
        if (o->slo_tpot_ms > 0) printf(" TPOT <= %g ms", o->slo_tpot_ms);
        printf(")\n");
    }
    printf("%-12s %10s %10s %10s %10s %10s\n", "(ms)", "mean", "p50", "p90", "p99", "max");
    const struct {
        const char *name;
        const xllm_bench_summary *s;
    } rows[] = {{"TTFT", &c->ttft}, {"TPOT", &c->tpot}, {"ITL", &c->itl}, {"E2E", &c->e2e}};
    for (size_t i = 0; i < 4; i++) {
        const xllm_bench_summary *s = rows[i].s;
        if (!s->n) {
            printf("%-12s %10s\n", rows[i].name, "-");
            continue;
        }
        printf("%-12s %10.2f %10.2f %10.2f %10.2f %10.2f\n", rows[i].name, s->mean, s->p50, s->p90,
               s->p99, s->max);
    }
}

static void report(const bs_run *b, const char *model) {
    const bs_opts *o = b->o;
    double dur = b->t_end - b->t0;
    if (dur <= 0) dur = 1e-9;
    bs_class all = summarize_class(b, 0, "all");
    bs_class on = {0}, off = {0};
    if (o->tidal) {
        on = summarize_class(b, 1, "online");
        off = summarize_class(b, 2, "offline");
    }
    if (o->json) {
        json_t *j = json_object();
        json_object_set_new(j, "url", json_string(b->url));
        json_object_set_new(j, "endpoint", json_string(o->endpoint));
        json_object_set_new(j, "model", model ? json_string(model) : json_null());
        json_object_set_new(j, "dataset", json_string(o->dataset));
        json_object_set_new(j, "request_rate",
                            isinf(o->request_rate) ? json_string("inf")
                                                   : json_real(o->request_rate));
        json_object_set_new(j, "concurrency", json_integer(o->concurrency));
        json_object_set_new(j, "tidal", json_boolean(o->tidal));
        json_object_set_new(j, "slo_ttft_ms",
                            o->slo_ttft_ms > 0 ? json_real(o->slo_ttft_ms) : json_null());
        json_object_set_new(j, "slo_tpot_ms",
                            o->slo_tpot_ms > 0 ? json_real(o->slo_tpot_ms) : json_null());
        json_object_set_new(j, "duration_s", json_real(dur));
        class_json(j, &all, dur);
        if (o->tidal) {
            json_t *jo = json_object(), *jf = json_object();
            class_json(jo, &on, dur);
            class_json(jf, &off, dur);
            json_object_set_new(j, "online", jo);
            json_object_set_new(j, "offline", jf);
        }
        char *s = json_dumps(j, JSON_INDENT(2) | JSON_REAL_PRECISION(10));
        if (s) printf("%s\n", s);
        free(s);
        json_decref(j);
        return;
    }
    printf("============ Serving Benchmark Result ============\n");
    printf("%-36s %s\n", "URL:", b->url);
    printf("%-36s %s\n", "Model:", model ? model : "(not sent)");
    if (isinf(o->request_rate))
        printf("%-36s %s\n", "Request rate (req/s):", "inf");
    else
        printf("%-36s %.2f\n", "Request rate (req/s):", o->request_rate);
    if (o->concurrency > 0) printf("%-36s %lld\n", "Max concurrency:", (long long)o->concurrency);
    printf("%-36s %.2f\n", "Benchmark duration (s):", dur);
    print_class(o, &all, dur);
    if (o->tidal) {
        printf("------------- online (bursts) -------------------\n");
        print_class(o, &on, dur);
        printf("------------- offline (steady) ------------------\n");
        print_class(o, &off, dur);
    }
    printf("==================================================\n");
}

/* ---- the command --------------------------------------------------------------------------- */

/* Base URL ending in /v1 (no trailing slash), from --url with or without it. */
static void base_url(const char *url, char *out, size_t out_size) {
    size_t n = strlen(url);
    while (n > 0 && url[n - 1] == '/') n--;
    if (n >= 3 && !strncmp(url + n - 3, "/v1", 3))
        snprintf(out, out_size, "%.*s", (int)n, url);
    else
        snprintf(out, out_size, "%.*s/v1", (int)n, url);
}

static void raise_fd_limit(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

int xllm_cmd_bench_serve(int argc, char **argv) {
    bs_opts o;
    int pr = parse_opts(argc, argv, &o);
    if (pr <= 0) return pr == 0 ? 0 : 1;

    json_t *extra = NULL;
    if (o.extra_body) {
        json_error_t je;
        extra = json_loads(o.extra_body, 0, &je);
        if (!json_is_object(extra)) {
            fprintf(stderr, "xllm " CMD ": --extra-body must be a JSON object (%s)\n",
                    extra ? "not an object" : je.text);
            json_decref(extra);
            return 1;
        }
    }

    /* Prompts: the steady stream, then the online bursts of tidal mode. */
    size_t n_online = o.tidal ? (size_t)(o.burst_size * o.bursts) : 0;
    size_t n_total = (size_t)o.num_prompts + n_online;
    xllm_bserve_dataset ds = {0};
    char err[512];
    if (!strcmp(o.dataset, "random")) {
        xllm_bserve_make_random((uint64_t)o.seed, n_total, (int32_t)o.random_input,
                                (int32_t)o.random_output, o.random_range, &ds);
    } else if (xllm_bserve_load_sharegpt(o.dataset_path, (int32_t)o.max_input, &ds, err,
                                         sizeof(err))) {
        fprintf(stderr, "xllm " CMD ": %s\n", err);
        json_decref(extra);
        return 1;
    }

    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
        fprintf(stderr, "xllm " CMD ": curl_global_init failed\n");
        xllm_bserve_dataset_free(&ds);
        json_decref(extra);
        return 1;
    }
    raise_fd_limit();
    bs_run b = {.o = &o, .n = n_total, .n_steady = (size_t)o.num_prompts};
    char base[2048];
    base_url(o.url, base, sizeof(base));
    snprintf(b.url, sizeof(b.url), "%s/%s", base,
             !strcmp(o.endpoint, "chat") ? "chat/completions" : "completions");
    b.headers = curl_slist_append(NULL, "Content-Type: application/json");
    b.headers = curl_slist_append(b.headers, "Accept: text/event-stream");
    b.headers = curl_slist_append(b.headers, "Expect:"); /* no 100-continue round trip */
    if (o.api_key) {
        char h[1024];
        snprintf(h, sizeof(h), "Authorization: Bearer %s", o.api_key);
        b.headers = curl_slist_append(b.headers, h);
    }

    char *model = o.model ? xllm_xstrdup(o.model) : NULL;
    if (!model) {
        model = discover_model(base, b.headers, err, sizeof(err));
        if (!model)
            fprintf(stderr, "xllm " CMD ": warning: no model name (%s); sending none\n", err);
    }

    /* Requests: prompts drawn by a seeded shuffle (cycled when more are asked for than the
     * dataset has), arrival times from a Poisson process or all at once. */
    uint64_t rs = (uint64_t)o.seed * 0x9E3779B97F4A7C15ull + 0x1234567ull;
    /* tidal mode may give the online class prompts of its own length (a shift in the mix) */
    xllm_bserve_dataset ds_on = {0};
    if (n_online && o.online_input > 0)
        xllm_bserve_make_random((uint64_t)o.seed + 1, n_online, (int32_t)o.online_input,
                                (int32_t)(o.online_output > 0 ? o.online_output : o.random_output),
                                o.random_range, &ds_on);
    size_t *order = xllm_xmalloc(ds.n * sizeof(size_t));
    for (size_t i = 0; i < ds.n; i++) order[i] = i;
    if (strcmp(o.dataset, "random"))
        for (size_t i = ds.n; i > 1; i--) {
            size_t j = xllm_bserve_rand(&rs) % i, t = order[i - 1];
            order[i - 1] = order[j];
            order[j] = t;
        }
    b.reqs = xllm_xcalloc(n_total, sizeof(bs_req));
    double t = 0;
    for (size_t i = 0; i < n_total; i++) {
        bs_req *r = &b.reqs[i];
        r->id = (int32_t)i;
        r->online = i >= b.n_steady;
        r->prompt = r->online && ds_on.n ? &ds_on.v[i - b.n_steady] : &ds.v[order[i % ds.n]];
        r->max_tokens = r->online && o.online_output > 0 ? (int32_t)o.online_output
                        : o.max_tokens > 0               ? (int32_t)o.max_tokens
                        : r->prompt->output_tokens > 0   ? r->prompt->output_tokens
                                                         : 128;
        if (!r->online) {
            if (!isinf(o.request_rate)) {
                t += -log(1.0 - xllm_bserve_rand_unit(&rs)) / o.request_rate;
                r->t_arrive = t;
            }
        } else {
            size_t k = i - b.n_steady;
            r->t_arrive = o.burst_interval * (double)(k / (size_t)o.burst_size + 1);
        }
        r->body = make_body(&o, model, extra, r);
    }
    free(order);

    b.multi = curl_multi_init();
    int rc = 0;
    if (!b.multi) {
        fprintf(stderr, "xllm " CMD ": curl_multi_init failed\n");
        rc = 1;
    } else {
        curl_multi_setopt(b.multi, CURLMOPT_MAXCONNECTS, (long)(n_total < 10000 ? n_total : 10000));
        curl_multi_setopt(b.multi, CURLMOPT_PIPELINING, (long)CURLPIPE_NOTHING);
        b.progress = !o.quiet && isatty(STDERR_FILENO);
        if (run_loop(&b)) {
            fprintf(stderr, "xllm " CMD ": curl_multi_perform failed\n");
            rc = 1;
        } else {
            report(&b, model);
            if (b.n_failed == b.n) {
                const char *e = b.n ? b.reqs[0].err : "";
                fprintf(stderr, "xllm " CMD ": all %zu requests failed (first: %s)\n", b.n, e);
                rc = 1;
            }
        }
    }

    for (size_t i = 0; i < n_total; i++) {
        bs_req *r = &b.reqs[i];
        if (r->easy) {
            curl_multi_remove_handle(b.multi, r->easy);
            curl_easy_cleanup(r->easy);
        }
        xllm_bench_sse_free(&r->sse);
        free(r->itl);
        free(r->body);
        free(r->err_body);
    }
    free(b.reqs);
    if (b.multi) curl_multi_cleanup(b.multi);
    curl_slist_free_all(b.headers);
    curl_global_cleanup();
    free(model);
    xllm_bserve_dataset_free(&ds);
    xllm_bserve_dataset_free(&ds_on);
    json_decref(extra);
    return rc;
}
