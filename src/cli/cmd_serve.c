/* xllm serve: the OpenAI-compatible HTTP server over one in-process engine. The main thread
 * parses options, starts listening (503 while the model loads), loads, then waits for SIGINT /
 * SIGTERM: the first drains (new requests get 503, requests in flight finish), a second stops. */
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>

#include "cli/cli.h"
#include "cli/common.h"
#include "service/registry.h"
#include "xllm/api.h"

static void usage(FILE *f) {
    fprintf(
        f, "usage: xllm serve -m MODEL [options]\n"
           "  -m, --model FILE          GGUF model\n"
           "  --host ADDR               address to listen on (default 127.0.0.1)\n"
           "  --port N                  TCP port (default 8080; 0 = any free port)\n"
           "  --api-key KEY             require 'Authorization: Bearer KEY' on /v1/*, /tokenize,\n"
           "                            /detokenize (default: none)\n"
           "  --served-model-name NAME  the model's id in /v1/models and responses\n"
           "                            (default: the file name without .gguf)\n"
           "  --chat-template FILE      a Jinja chat template instead of the model's own\n"
           "  --max-seqs N              requests running at once (default 16)\n"
           "  --max-batch-tokens N      token budget of one engine step (default 512)\n"
           "  --max-queue N             waiting requests before 429 (default 1024, 0 = no limit)\n"
           "  --max-body BYTES          request body limit before 413 (default 4M)\n"
           "  --max-connections N       open connections at once (default 1024)\n"
           "  -c, --ctx-size N          context per request (default: the model's, max 4096)\n"
           "  -t, --threads N           compute threads (default: all cores)\n"
           "  --kv-type f16|f32         KV cache type (default f16)\n"
           "  --kv-layout L             xtensor (default) or paged\n"
           "  --kv-memory BYTES         KV page pool, e.g. 512M (default: max-seqs full contexts)\n"
           "  --kv-block-tokens N       tokens per KV page / prefix block (default: automatic)\n"
           "  --no-prefix-cache         do not keep prompt blocks for reuse\n"
           "  --low-memory              weights copied to memory, sub-8-bit matrices (Q4_K...)\n"
           "                            as decode panels only: about the file size in memory\n"
           "                            (default: the file mapped, and 8-bit panels for\n"
           "                            prompts: up to ~15%% faster prompts)\n"
           "  --drain-timeout SECONDS   on SIGINT/SIGTERM, wait this long for requests in\n"
           "                            flight (default 30; a second signal stops at once)\n"
           "  -v, --log-requests        one line per request on stderr\n");
}

static void usage_engine(FILE *f) {
    fprintf(f, "usage: xllm engine -m MODEL --etcd URL [options]\n"
               "A cluster instance: `xllm serve` plus registration in etcd and the instance RPC\n"
               "(/v1/instance/generate, /v1/instance/load, /v1/instance/role) for xllm service.\n"
               "  --etcd URL                etcd endpoint (http://host:port), required\n"
               "  --role R                  mixed (default), prefill or decode\n"
               "  --name N                  instance name (default engine-<pid>)\n"
               "  --cluster C               cluster name (default 'default')\n"
               "  --lease-ttl-ms MS         lease TTL: a dead instance leaves routing within it\n"
               "                            (default 10000; etcd grants at least its minimum)\n"
               "  --advertise HOST          host others reach this instance at (default: --host)\n"
               "  --kv-port P               port of the KV receiver for PD transfers (default:\n"
               "                            any free port; published as kv_addr in the registry)\n"
               "and every option of xllm serve (see xllm serve --help).\n");
}

/* The registry session of `xllm engine`: role switches from POST /v1/instance/role. */
typedef struct engine_reg {
    pthread_mutex_t mu; /* reg: set by main, used by HTTP threads */
    xllm_registry *reg;
    const char *name;
} engine_reg;

static xllm_status on_role(const char *role, void *user, char *err, size_t err_size) {
    engine_reg *er = user;
    xllm_role r;
    if (xllm_role_parse(role, &r) != XLLM_OK) {
        snprintf(err, err_size, "unknown role '%s' (mixed, prefill or decode)", role);
        return XLLM_ERR_INVALID_ARG;
    }
    pthread_mutex_lock(&er->mu);
    xllm_status st = XLLM_ERR_INVALID_ARG;
    if (er->reg)
        st = xllm_registry_update(er->reg, er->name, r, NULL, err, err_size);
    else
        snprintf(err, err_size, "not registered");
    pthread_mutex_unlock(&er->mu);
    if (st == XLLM_OK) fprintf(stderr, "xllm engine: %s: role is now %s\n", er->name, role);
    return st;
}

/* Parses a byte size with an optional K/M/G suffix (powers of 1024). */
static bool parse_bytes(const char *s, size_t *out) {
    char *end;
    double v = strtod(s, &end);
    if (end == s || v < 0) return false;
    double mul = 1;
    if (*end == 'K' || *end == 'k')
        mul = 1024, end++;
    else if (*end == 'M' || *end == 'm')
        mul = 1024.0 * 1024, end++;
    else if (*end == 'G' || *end == 'g')
        mul = 1024.0 * 1024 * 1024, end++;
    if (*end == 'B' || *end == 'b') end++;
    if (*end) return false;
    *out = (size_t)(v * mul);
    return true;
}

static int serve_main(int argc, char **argv, bool engine) {
    const char *cmd = engine ? "engine" : "serve";
    const char *etcd = NULL, *role_s = "mixed", *name = NULL, *cluster = NULL, *advertise = NULL;
    int64_t ttl_ms = 0;
    engine_reg er = {.mu = PTHREAD_MUTEX_INITIALIZER};
    xllm_api_params p = xllm_api_default_params();
    xllm_context_params cp = xllm_context_default_params();
    int64_t port = 8080, max_seqs = 0, max_batch = 0, max_queue = 1024, n_ctx = 0, threads = 0;
    int64_t max_conn = 0, drain_s = 30;
    bool no_prefix = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v;
        int kvo = xllm_cli_kv_option(cmd, argc, argv, &i, &cp);
        if (kvo < 0) return 1;
        if (kvo > 0) continue;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            if (engine) usage_engine(stdout);
            usage(stdout);
            return 0;
        }
        if (engine && (!strcmp(a, "--etcd") || !strcmp(a, "--role") || !strcmp(a, "--name") ||
                       !strcmp(a, "--cluster") || !strcmp(a, "--lease-ttl-ms") ||
                       !strcmp(a, "--advertise") || !strcmp(a, "--kv-port"))) {
            if (!(v = xllm_cli_value(cmd, argc, argv, &i))) return 1;
            if (!strcmp(a, "--etcd"))
                etcd = v;
            else if (!strcmp(a, "--role"))
                role_s = v;
            else if (!strcmp(a, "--name"))
                name = v;
            else if (!strcmp(a, "--cluster"))
                cluster = v;
            else if (!strcmp(a, "--advertise"))
                advertise = v;
            else if (!strcmp(a, "--kv-port")) {
                int64_t kp;
                if (!xllm_cli_int(cmd, a, v, 0, 65535, &kp)) return 1;
                p.engine.kv_receiver = true;
                p.engine.kv_port = (int)kp;
            } else if (!xllm_cli_int(cmd, a, v, 100, 3600000, &ttl_ms))
                return 1;
            continue;
        }
        if (!strcmp(a, "--no-prefix-cache")) {
            no_prefix = true;
            continue;
        }
        if (!strcmp(a, "--low-memory")) {
            p.low_memory = true;
            continue;
        }
        if (!strcmp(a, "-v") || !strcmp(a, "--log-requests")) {
            p.log_requests = true;
            continue;
        }
        static const char *const k_valued[] = {"-m",
                                               "--model",
                                               "--host",
                                               "--port",
                                               "--api-key",
                                               "--served-model-name",
                                               "--chat-template",
                                               "--max-seqs",
                                               "--max-batch-tokens",
                                               "--max-queue",
                                               "--max-body",
                                               "--max-connections",
                                               "-c",
                                               "--ctx-size",
                                               "-t",
                                               "--threads",
                                               "--drain-timeout"};
        bool known = false;
        for (size_t k = 0; k < sizeof(k_valued) / sizeof(k_valued[0]); k++)
            known |= !strcmp(a, k_valued[k]);
        if (!known) {
            fprintf(stderr, "xllm %s: unknown option '%s' (see xllm %s --help)\n", cmd, a, cmd);
            return 1;
        }
        if (!(v = xllm_cli_value(cmd, argc, argv, &i))) return 1;
        bool ok = true;
        if (!strcmp(a, "-m") || !strcmp(a, "--model"))
            p.model_path = v;
        else if (!strcmp(a, "--host"))
            p.host = v;
        else if (!strcmp(a, "--port"))
            ok = xllm_cli_int(cmd, a, v, 0, 65535, &port);
        else if (!strcmp(a, "--api-key"))
            p.api_key = v;
        else if (!strcmp(a, "--served-model-name"))
            p.served_model_name = v;
        else if (!strcmp(a, "--chat-template"))
            p.chat_template_file = v;
        else if (!strcmp(a, "--max-seqs"))
            ok = xllm_cli_int(cmd, a, v, 1, 1024, &max_seqs);
        else if (!strcmp(a, "--max-batch-tokens"))
            ok = xllm_cli_int(cmd, a, v, 1, 1 << 20, &max_batch);
        else if (!strcmp(a, "--max-queue"))
            ok = xllm_cli_int(cmd, a, v, 0, 1 << 30, &max_queue);
        else if (!strcmp(a, "--max-connections"))
            ok = xllm_cli_int(cmd, a, v, 1, 1 << 20, &max_conn);
        else if (!strcmp(a, "--max-body")) {
            ok = parse_bytes(v, &p.max_body) && p.max_body > 0;
            if (!ok) fprintf(stderr, "xllm serve: bad value '%s' for --max-body\n", v);
        } else if (!strcmp(a, "-c") || !strcmp(a, "--ctx-size"))
            ok = xllm_cli_int(cmd, a, v, 1, 1 << 24, &n_ctx);
        else if (!strcmp(a, "-t") || !strcmp(a, "--threads"))
            ok = xllm_cli_int(cmd, a, v, 1, 1024, &threads);
        else if (!strcmp(a, "--drain-timeout"))
            ok = xllm_cli_int(cmd, a, v, 0, 86400, &drain_s);
        if (!ok) return 1;
    }
    if (!p.model_path) {
        fprintf(stderr, "xllm %s: -m MODEL is required\n", cmd);
        usage(stderr);
        return 1;
    }
    xllm_role role = XLLM_ROLE_MIXED;
    if (engine) {
        if (!etcd) {
            fprintf(stderr, "xllm engine: --etcd URL is required\n");
            return 1;
        }
        if (xllm_role_parse(role_s, &role) != XLLM_OK) {
            fprintf(stderr, "xllm engine: unknown role '%s' (mixed, prefill or decode)\n", role_s);
            return 1;
        }
        p.on_role = on_role;
        p.on_role_user = &er;
    }
    p.port = (int32_t)port;
    p.max_connections = (int32_t)max_conn;
    p.engine.max_seqs = (int32_t)max_seqs;
    p.engine.max_batch_tokens = (int32_t)max_batch;
    p.engine.max_queue = (int32_t)max_queue;
    p.engine.n_ctx = (int32_t)n_ctx;
    p.engine.n_threads = (int32_t)threads;
    p.engine.kv_type = cp.kv_type;
    p.engine.kv_layout = cp.kv_layout;
    p.engine.kv_memory = cp.kv_memory;
    p.engine.kv_block_tokens = cp.kv_block_tokens;
    p.engine.no_prefix_cache = no_prefix;

    /* every thread started from here on inherits the blocked signals; main waits for them */
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);
    signal(SIGPIPE, SIG_IGN);

    if (engine) { /* every instance can take transferred KV: roles change at run time */
        p.engine.kv_receiver = true;
        p.engine.kv_host = p.host ? p.host : "127.0.0.1";
    }
    char err[1024];
    xllm_api_server *s = NULL;
    if (xllm_api_server_start(&p, &s, err, sizeof(err)) != XLLM_OK) {
        fprintf(stderr, "xllm %s: %s\n", cmd, err);
        return 1;
    }
    const char *host = p.host ? p.host : "127.0.0.1";
    const bool v6 = strchr(host, ':') != NULL;
    char url[300];
    snprintf(url, sizeof(url), "http://%s%s%s:%d", v6 ? "[" : "", host, v6 ? "]" : "",
             xllm_api_server_port(s));
    fprintf(stderr, "xllm %s: listening on %s (loading %s)\n", cmd, url, p.model_path);
    /* test hook: keep the server in its loading state for a while (503s) */
    const char *delay = getenv("XLLM_SERVE_LOAD_DELAY_MS");
    if (delay && atoi(delay) > 0) usleep((useconds_t)atoi(delay) * 1000);
    double t0 = xllm_cli_now();
    if (xllm_api_server_load(s, err, sizeof(err)) != XLLM_OK) {
        fprintf(stderr, "xllm %s: %s\n", cmd, err);
        xllm_api_server_free(s);
        return 1;
    }
    const xllm_model *served = xllm_api_server_model(s);
    xllm_model_layout_info li = {.layout = XLLM_LAYOUT_DENSE};
    if (served) {
        xllm_cli_report_layout(cmd, served);
        xllm_model_layout(served, &li);
    }
    if (p.low_memory && li.layout == XLLM_LAYOUT_LOW_MEMORY)
        fprintf(stderr,
                "xllm %s: model loaded in low memory (weights copied, sub-8-bit matrices "
                "as decode panels only)\n",
                cmd);
    char self_name[64];
    if (engine) {
        /* register only once ready: a service routes to an instance as soon as it appears */
        xllm_registry_params rp = xllm_registry_default_params();
        if (xllm_registry_etcd_store(etcd, 0, &rp.store, err, sizeof(err)) != XLLM_OK) {
            fprintf(stderr, "xllm engine: %s\n", err);
            xllm_api_server_free(s);
            return 1;
        }
        if (cluster) rp.cluster = cluster;
        if (ttl_ms) rp.ttl_ms = ttl_ms;
        xllm_registry *reg = NULL;
        if (xllm_registry_new(&rp, &reg, err, sizeof(err)) != XLLM_OK) {
            fprintf(stderr, "xllm engine: %s\n", err);
            xllm_api_server_free(s);
            return 1;
        }
        snprintf(self_name, sizeof(self_name), "%s", name ? name : "");
        if (!name) snprintf(self_name, sizeof(self_name), "engine-%d", (int)getpid());
        er.name = self_name;
        char addr[200], kv_addr[200];
        const char *adv = advertise ? advertise : host;
        const char *lb = strchr(adv, ':') ? "[" : "", *rb = strchr(adv, ':') ? "]" : "";
        snprintf(addr, sizeof(addr), "%s%s%s:%d", lb, adv, rb, xllm_api_server_port(s));
        int kv_port = xllm_api_server_kv_port(s);
        /* kv_block_tokens: the granularity of the prefix-cache events a service indexes; the
         * JSON is built by jansson, so any model name is escaped */
        json_t *ao =
            json_pack("{s:s,s:i}", "model", p.served_model_name ? p.served_model_name : "model",
                      "kv_block_tokens", (int)xllm_api_server_kv_block_tokens(s));
        if (kv_port > 0) {
            snprintf(kv_addr, sizeof(kv_addr), "%s%s%s:%d", lb, adv, rb, kv_port);
            json_object_set_new(ao, "kv_addr", json_string(kv_addr));
        }
        char *attrs = json_dumps(ao, JSON_COMPACT);
        json_decref(ao);
        xllm_instance inst = {.name = self_name,
                              .incarnation = xllm_instance_new_incarnation(),
                              .role = role,
                              .addr = addr,
                              .attrs = attrs};
        xllm_status rs = xllm_registry_register(reg, &inst, err, sizeof(err));
        free(attrs);
        if (rs != XLLM_OK) {
            fprintf(stderr, "xllm engine: %s\n", err);
            xllm_registry_free(reg);
            xllm_api_server_free(s);
            return 1;
        }
        pthread_mutex_lock(&er.mu);
        er.reg = reg;
        pthread_mutex_unlock(&er.mu);
        fprintf(stderr, "xllm engine: registered %s (%s, incarnation %016llx) at %s\n", self_name,
                xllm_role_name(role), (unsigned long long)inst.incarnation, addr);
    }
    fprintf(stderr, "xllm %s: ready in %.0f ms: %s\n", cmd, (xllm_cli_now() - t0) * 1e3, url);
    fprintf(stderr,
            "  try: curl %s/v1/completions -H 'Content-Type: application/json'%s%s%s "
            "-d '{\"prompt\": \"Once upon a time\", \"max_tokens\": 64}'\n",
            url, p.api_key ? " -H 'Authorization: Bearer " : "", p.api_key ? p.api_key : "",
            p.api_key ? "'" : "");
    fflush(stderr);

    int sig = 0;
    sigwait(&sigs, &sig);
    /* leave routing first, so that no new request comes while the rest drains */
    pthread_mutex_lock(&er.mu);
    xllm_registry_free(er.reg);
    er.reg = NULL;
    pthread_mutex_unlock(&er.mu);
    fprintf(stderr, "xllm %s: %s: draining (%d requests in flight; a second signal stops)\n", cmd,
            sig == SIGINT ? "SIGINT" : "SIGTERM", xllm_api_server_drain(s, 0));
    double until = xllm_cli_now() + (double)drain_s;
    while (xllm_api_server_drain(s, 0) > 0 && xllm_cli_now() < until) {
        struct timespec ts = {0, 50 * 1000000L};
        if (sigtimedwait(&sigs, NULL, &ts) > 0) break;
    }
    int left = xllm_api_server_drain(s, 0);
    if (left) fprintf(stderr, "xllm serve: stopping %d requests still in flight\n", left);
    xllm_api_server_free(s);
    fprintf(stderr, "xllm %s: stopped\n", cmd);
    return 0;
}

int xllm_cmd_serve(int argc, char **argv) {
    return serve_main(argc, argv, false);
}

int xllm_cmd_engine(int argc, char **argv) {
    return serve_main(argc, argv, true);
}
