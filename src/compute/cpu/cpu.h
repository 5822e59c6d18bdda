/* CPU feature levels for run-time kernel dispatch: what the processor supports (cpuid) and the
 * level a caller asks for (XLLM_CPU=scalar|avx2|avx512 or a context parameter). */
#ifndef XLLM_COMPUTE_CPU_CPU_H
#define XLLM_COMPUTE_CPU_CPU_H

#include <stdbool.h>

typedef enum xllm_cpu_level {
    XLLM_CPU_SCALAR = 0, /* portable C, the reference the fast paths are tested against */
    XLLM_CPU_AVX2 = 1,   /* AVX2 + FMA + F16C */
    XLLM_CPU_AVX512 = 2, /* AVX-512 F/BW/VL + VNNI (+ BF16 when the CPU has it) */
} xllm_cpu_level;

/* The best level this CPU (and OS) supports. Reads cpuid on every call: cheap, no cache. */
xllm_cpu_level xllm_cpu_detect(void);
/* Whether the CPU has AVX512_BF16 (vdpbf16ps); only meaningful at XLLM_CPU_AVX512. */
bool xllm_cpu_has_bf16(void);
/* "scalar" / "avx2" / "avx512". */
const char *xllm_cpu_level_name(xllm_cpu_level l);
/* Parses a level name; false when unknown. */
bool xllm_cpu_level_parse(const char *s, xllm_cpu_level *out);
/* The level to use: the detected one, lowered to the one named by the XLLM_CPU environment
 * variable when it is set (never raised above what the CPU supports). */
xllm_cpu_level xllm_cpu_level_default(void);
/* Number of physical cores available to this process (SMT siblings counted once). */
int xllm_cpu_physical_cores(void);

#endif
