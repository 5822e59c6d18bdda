/* The cluster service (`xllm service`): the OpenAI front door of src/api over a remote backend
 * that routes each request to engine instances found in the registry, relays their token
 * streams, retries requests that have not streamed yet when an instance fails, and takes part
 * in the master election. src/service/service.c. */
#ifndef XLLM_SERVICE_SERVICE_H
#define XLLM_SERVICE_SERVICE_H

#include "service/pdctl.h"
#include "service/registry.h"
#include "service/router.h"
#include "xllm/api.h"

typedef struct xllm_service_params {
    xllm_api_params api;       /* listen address, model (tokenizer + chat template), limits */
    const char *etcd;          /* etcd endpoint; NULL = use `store` */
    xllm_registry_store store; /* used when etcd is NULL (embedded store in tests) */
    const char *cluster;       /* registry cluster name; NULL = "default" */
    int64_t ttl_ms;            /* lease TTL; 0 = registry default */
    const char *id;            /* id in the master election; NULL = "service-<pid>-<port>" */
    xllm_router_params router; /* policy and thresholds */
    int32_t max_attempts;      /* instances tried per request before it fails; 0 = 3 */
    bool dynamic_pd;           /* run the PD controller (it acts while this service is master) */
    xllm_pdctl_params pdctl;
} xllm_service_params;

xllm_service_params xllm_service_default_params(void);

typedef struct xllm_service xllm_service;

/* Binds, loads the tokenizer, opens the registry session (watch + candidacy). Main thread. */
xllm_status xllm_service_start(const xllm_service_params *p, xllm_service **out, char *err,
                               size_t err_size);
int32_t xllm_service_port(const xllm_service *s);
bool xllm_service_is_leader(xllm_service *s);
/* Drains like xllm_api_server_drain. */
int32_t xllm_service_drain(xllm_service *s, int32_t timeout_ms);
/* Ends every relayed stream (abort), stops HTTP, leaves the registry. Accepts NULL. */
void xllm_service_free(xllm_service *s);

#endif
