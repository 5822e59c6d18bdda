/* CPU feature detection (cpuid through the compiler's builtins, which also check that the OS
 * saves the vector state) and the physical core count from sysfs. */
#include "compute/cpu/cpu.h"

#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "compute/threadpool.h"

#if defined(__x86_64__)
#include <cpuid.h>

/* F16C from cpuid leaf 1 (ECX bit 29): clang 14's __builtin_cpu_supports does not know it. */
static bool has_f16c(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return false;
    return (c >> 29) & 1u;
}
#endif

xllm_cpu_level xllm_cpu_detect(void) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
        __builtin_cpu_supports("fma") && has_f16c())
        return XLLM_CPU_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && has_f16c())
        return XLLM_CPU_AVX2;
#endif
    return XLLM_CPU_SCALAR;
}

bool xllm_cpu_has_bf16(void) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16");
#else
    return false;
#endif
}

const char *xllm_cpu_level_name(xllm_cpu_level l) {
    switch (l) {
        case XLLM_CPU_AVX512:
            return "avx512";
        case XLLM_CPU_AVX2:
            return "avx2";
        default:
            return "scalar";
    }
}

bool xllm_cpu_level_parse(const char *s, xllm_cpu_level *out) {
    static const xllm_cpu_level levels[] = {XLLM_CPU_SCALAR, XLLM_CPU_AVX2, XLLM_CPU_AVX512};
    for (size_t i = 0; i < sizeof(levels) / sizeof(levels[0]); i++)
        if (s && !strcmp(s, xllm_cpu_level_name(levels[i]))) {
            *out = levels[i];
            return true;
        }
    return false;
}

xllm_cpu_level xllm_cpu_level_default(void) {
    xllm_cpu_level l = xllm_cpu_detect(), want;
    const char *env = getenv("XLLM_CPU");
    if (env && *env && xllm_cpu_level_parse(env, &want) && want < l) l = want;
    return l;
}

int xllm_cpu_physical_cores(void) {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) != 0) return xllm_cpu_count();
    /* Count CPUs whose first thread sibling is themselves (or unknown). */
    int n = 0;
    for (int c = 0; c < CPU_SETSIZE; c++) {
        if (!CPU_ISSET(c, &set)) continue;
        char path[128];
        snprintf(path, sizeof(path), "/sys/devices/system/cpu/cpu%d/topology/thread_siblings_list",
                 c);
        FILE *f = fopen(path, "r");
        int first = c;
        if (f) {
            if (fscanf(f, "%d", &first) != 1) first = c;
            fclose(f);
        }
        if (first == c || !CPU_ISSET(first, &set)) n++;
    }
    return n > 0 ? n : xllm_cpu_count();
}
