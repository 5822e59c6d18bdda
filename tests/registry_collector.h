/* An event collector for the registry tests (filled on the registry's watch thread): records
 * watch events and leader changes, and waits for a given event. Shared by test_registry_mem and
 * test_registry_etcd; functions are static inline so that a test may use only some of them. */
#ifndef XLLM_TEST_REGISTRY_COLLECTOR_H
#define XLLM_TEST_REGISTRY_COLLECTOR_H

#include <pthread.h>
#include <stdbool.h>
#include <string.h>

#include "service/registry-impl.h"
#include "service/registry.h"

typedef struct rec_event {
    xllm_registry_event_type type;
    xllm_instance inst;
} rec_event;

typedef struct collector {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    rec_event evs[256];
    size_t n;
    int leader_changes;
    bool leader;
} collector;

static inline void col_init(collector *c) {
    memset(c, 0, sizeof(*c));
    pthread_mutex_init(&c->mu, NULL);
    xllm_registry_cond_init(&c->cv);
}

static inline void col_destroy(collector *c) {
    for (size_t i = 0; i < c->n; i++) xllm_instance_clear(&c->evs[i].inst);
    pthread_cond_destroy(&c->cv);
    pthread_mutex_destroy(&c->mu);
}

static inline void on_event(const xllm_registry_event *ev, void *user) {
    collector *c = user;
    pthread_mutex_lock(&c->mu);
    if (c->n < 256) {
        c->evs[c->n].type = ev->type;
        xllm_instance_copy(&c->evs[c->n].inst, ev->inst);
        c->n++;
    }
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
}

static inline void on_leader(bool leader, void *user) {
    collector *c = user;
    pthread_mutex_lock(&c->mu);
    c->leader = leader;
    c->leader_changes++;
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
}

/* Waits up to timeout_ms for an event of type about name (and incarnation, when nonzero) at or
 * after *cursor; returns its index and moves the cursor past it, or -1. */
static inline long col_wait(collector *c, size_t *cursor, xllm_registry_event_type type,
                            const char *name, uint64_t inc, int timeout_ms) {
    int64_t deadline = xllm_registry_now_ns() + (int64_t)timeout_ms * 1000000;
    pthread_mutex_lock(&c->mu);
    for (;;) {
        for (size_t i = *cursor; i < c->n; i++) {
            if (c->evs[i].type == type && strcmp(c->evs[i].inst.name, name) == 0 &&
                (!inc || c->evs[i].inst.incarnation == inc)) {
                *cursor = i + 1;
                pthread_mutex_unlock(&c->mu);
                return (long)i;
            }
        }
        if (xllm_registry_now_ns() >= deadline) break;
        xllm_registry_cond_wait_until(&c->cv, &c->mu, deadline);
    }
    pthread_mutex_unlock(&c->mu);
    return -1;
}

static inline size_t col_count(collector *c) {
    pthread_mutex_lock(&c->mu);
    size_t n = c->n;
    pthread_mutex_unlock(&c->mu);
    return n;
}

#endif
