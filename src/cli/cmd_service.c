/* xllm service: the cluster front door (OpenAI API) and global scheduler over engine instances
 * registered in etcd. The main thread parses options, starts the service, waits for a signal. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli/cli.h"
#include "cli/common.h"
#include "service/service.h"

static void usage(FILE *f) {
    fprintf(f,
            "usage: xllm service -m MODEL --etcd URL [options]\n"
            "  -m, --model FILE          GGUF model: its tokenizer and chat template (the\n"
            "                            instances serve the same model)\n"
            "  --etcd URL                etcd endpoint (http://host:port), required\n"
            "  --host ADDR, --port N     where to listen (default 127.0.0.1:8000; 0 = free)\n"
            "  --policy P                round-robin (default), least-load, prefix, slo\n"
            "  --no-pd                   never pair prefill and decode instances\n"
            "  --prefix-max-gap N        prefix policy: skip instances with more than N requests\n"
            "                            over the least loaded (default 4)\n"
            "  --prefix-load-weight W    prefix policy: load penalty in the score (default 0.25)\n"
            "  --ttft-slo-ms MS          slo policy: default TTFT target (default 1000)\n"
            "  --tpot-slo-ms MS          slo policy: default TPOT target (default 100)\n"
            "  --max-attempts N          instances tried per request (default 3)\n"
            "  --dynamic-pd              the master switches instances between prefill and\n"
            "                            decode as TTFT / inter-token latency exceed targets\n"
            "  --pd-ttft-ms MS           dynamic PD: TTFT target of prefill instances (default:\n"
            "                            --ttft-slo-ms)\n"
            "  --pd-tpot-ms MS           dynamic PD: inter-token target of decode instances\n"
            "                            (default: --tpot-slo-ms)\n"
            "  --pd-interval-ms MS       dynamic PD: the judging window (default 1000)\n"
            "  --pd-cooldown-ms MS       dynamic PD: least time between switches (default 3000)\n"
            "  --offline-idle-online N   offline requests go only where fewer than N online\n"
            "                            requests run, else wait in the service (default 1)\n"
            "  --offline-max-inflight N  and where fewer than N offline ones run (default 16)\n"
            "  --cluster C               cluster name (default 'default')\n"
            "  --lease-ttl-ms MS         this service's lease (master key) TTL\n"
            "  --id ID                   id in the master election (default service-<pid>-<port>)\n"
            "  --api-key KEY, --served-model-name NAME, --chat-template FILE, -c N, -v\n"
            "                            as in xllm serve\n");
}

int xllm_cmd_service(int argc, char **argv) {
    const char *cmd = "service";
    xllm_service_params p = xllm_service_default_params();
    int64_t port = 8000, n_ctx = 0, attempts = 0, gap = 0, ttft = 0, tpot = 0, ttl = 0;
    int64_t pd_ttft = 0, pd_tpot = 0, pd_interval = 0, pd_cooldown = 0, off_on = 0, off_max = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return 0;
        }
        if (!strcmp(a, "--no-pd")) {
            p.router.pd = false;
            continue;
        }
        if (!strcmp(a, "--dynamic-pd")) {
            p.dynamic_pd = true;
            continue;
        }
        if (!strcmp(a, "-v") || !strcmp(a, "--log-requests")) {
            p.api.log_requests = true;
            continue;
        }
        static const char *const k_valued[] = {"-m",
                                               "--model",
                                               "--etcd",
                                               "--host",
                                               "--port",
                                               "--policy",
                                               "--prefix-max-gap",
                                               "--prefix-load-weight",
                                               "--ttft-slo-ms",
                                               "--tpot-slo-ms",
                                               "--max-attempts",
                                               "--pd-ttft-ms",
                                               "--pd-tpot-ms",
                                               "--pd-interval-ms",
                                               "--pd-cooldown-ms",
                                               "--offline-idle-online",
                                               "--offline-max-inflight",
                                               "--cluster",
                                               "--lease-ttl-ms",
                                               "--id",
                                               "--api-key",
                                               "--served-model-name",
                                               "--chat-template",
                                               "-c",
                                               "--ctx-size"};
        bool known = false;
        for (size_t k = 0; k < sizeof(k_valued) / sizeof(k_valued[0]); k++)
            known |= !strcmp(a, k_valued[k]);
        if (!known) {
            fprintf(stderr, "xllm service: unknown option '%s' (see xllm service --help)\n", a);
            return 1;
        }
        if (!(v = xllm_cli_value(cmd, argc, argv, &i))) return 1;
        bool ok = true;
        if (!strcmp(a, "-m") || !strcmp(a, "--model"))
            p.api.model_path = v;
        else if (!strcmp(a, "--etcd"))
            p.etcd = v;
        else if (!strcmp(a, "--host"))
            p.api.host = v;
        else if (!strcmp(a, "--port"))
            ok = xllm_cli_int(cmd, a, v, 0, 65535, &port);
        else if (!strcmp(a, "--policy")) {
            ok = xllm_policy_parse(v, &p.router.policy) == XLLM_OK;
            if (!ok)
                fprintf(stderr,
                        "xllm service: unknown policy '%s' (round-robin, least-load, "
                        "prefix, slo)\n",
                        v);
        } else if (!strcmp(a, "--prefix-max-gap"))
            ok = xllm_cli_int(cmd, a, v, 1, 1 << 20, &gap);
        else if (!strcmp(a, "--prefix-load-weight"))
            p.router.prefix_load_weight = strtod(v, NULL);
        else if (!strcmp(a, "--ttft-slo-ms"))
            ok = xllm_cli_int(cmd, a, v, 1, 1 << 30, &ttft);
        else if (!strcmp(a, "--tpot-slo-ms"))
            ok = xllm_cli_int(cmd, a, v, 1, 1 << 30, &tpot);
        else if (!strcmp(a, "--pd-ttft-ms"))
            ok = xllm_cli_int(cmd, a, v, 1, 1 << 30, &pd_ttft);
        else if (!strcmp(a, "--pd-tpot-ms"))
            ok = xllm_cli_int(cmd, a, v, 1, 1 << 30, &pd_tpot);
        else if (!strcmp(a, "--pd-interval-ms"))
            ok = xllm_cli_int(cmd, a, v, 50, 3600000, &pd_interval);
        else if (!strcmp(a, "--pd-cooldown-ms"))
            ok = xllm_cli_int(cmd, a, v, 1, 3600000, &pd_cooldown);
        else if (!strcmp(a, "--offline-idle-online"))
            ok = xllm_cli_int(cmd, a, v, 1, 1 << 20, &off_on);
        else if (!strcmp(a, "--offline-max-inflight"))
            ok = xllm_cli_int(cmd, a, v, 1, 1 << 20, &off_max);
        else if (!strcmp(a, "--max-attempts"))
            ok = xllm_cli_int(cmd, a, v, 1, 8, &attempts);
        else if (!strcmp(a, "--cluster"))
            p.cluster = v;
        else if (!strcmp(a, "--lease-ttl-ms"))
            ok = xllm_cli_int(cmd, a, v, 100, 3600000, &ttl);
        else if (!strcmp(a, "--id"))
            p.id = v;
        else if (!strcmp(a, "--api-key"))
            p.api.api_key = v;
        else if (!strcmp(a, "--served-model-name"))
            p.api.served_model_name = v;
        else if (!strcmp(a, "--chat-template"))
            p.api.chat_template_file = v;
        else if (!strcmp(a, "-c") || !strcmp(a, "--ctx-size"))
            ok = xllm_cli_int(cmd, a, v, 1, 1 << 24, &n_ctx);
        if (!ok) return 1;
    }
    if (!p.api.model_path || !p.etcd) {
        fprintf(stderr, "xllm service: -m MODEL and --etcd URL are required\n");
        usage(stderr);
        return 1;
    }
    p.api.port = (int32_t)port;
    p.api.engine.n_ctx = (int32_t)n_ctx;
    p.max_attempts = (int32_t)attempts;
    p.router.prefix_max_gap = (double)gap;
    p.router.ttft_slo_ms = ttft;
    p.router.tpot_slo_ms = tpot;
    p.router.offline_idle_online = (int32_t)off_on;
    p.router.offline_max_inflight = (int32_t)off_max;
    p.pdctl.ttft_target_ms = (double)(pd_ttft ? pd_ttft : ttft);
    p.pdctl.tpot_target_ms = (double)(pd_tpot ? pd_tpot : tpot);
    p.pdctl.interval_ms = (int32_t)pd_interval;
    p.pdctl.cooldown_ms = (int32_t)pd_cooldown;
    p.ttl_ms = ttl;

    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);
    signal(SIGPIPE, SIG_IGN);

    char err[1024];
    xllm_service *s = NULL;
    if (xllm_service_start(&p, &s, err, sizeof(err)) != XLLM_OK) {
        fprintf(stderr, "xllm service: %s\n", err);
        return 1;
    }
    const char *host = p.api.host ? p.api.host : "127.0.0.1";
    fprintf(stderr, "xllm service: listening on http://%s:%d (policy %s, master: %s)\n", host,
            xllm_service_port(s), xllm_policy_name(p.router.policy),
            xllm_service_is_leader(s) ? "yes" : "no");
    fflush(stderr);
    int sig = 0;
    sigwait(&sigs, &sig);
    fprintf(stderr, "xllm service: %s: draining\n", sig == SIGINT ? "SIGINT" : "SIGTERM");
    double until = xllm_cli_now() + 30;
    while (xllm_service_drain(s, 0) > 0 && xllm_cli_now() < until) {
        struct timespec ts = {0, 50 * 1000000L};
        if (sigtimedwait(&sigs, NULL, &ts) > 0) break;
    }
    xllm_service_free(s);
    fprintf(stderr, "xllm service: stopped\n");
    return 0;
}
