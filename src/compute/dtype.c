/* Tensor type traits (block sizes of the GGUF/ggml types), type names, and IEEE half / bfloat16
 * conversions with round-to-nearest-even. */
#include "compute/dtype.h"

#include <string.h>

static const xllm_dtype_traits k_traits[XLLM_DTYPE_COUNT] = {
    [XLLM_DTYPE_F32] = {"f32", 1, 4, false},
    [XLLM_DTYPE_F16] = {"f16", 1, 2, false},
    [XLLM_DTYPE_Q4_0] = {"q4_0", 32, 2 + 16, true},
    [XLLM_DTYPE_Q4_1] = {"q4_1", 32, 2 + 2 + 16, true},
    [XLLM_DTYPE_Q5_0] = {"q5_0", 32, 2 + 4 + 16, true},
    [XLLM_DTYPE_Q5_1] = {"q5_1", 32, 2 + 2 + 4 + 16, true},
    [XLLM_DTYPE_Q8_0] = {"q8_0", 32, 2 + 32, true},
    [XLLM_DTYPE_Q8_1] = {"q8_1", 32, 2 + 2 + 32, true},
    [XLLM_DTYPE_Q2_K] = {"q2_K", XLLM_QK_K, 16 + 64 + 2 + 2, true},
    [XLLM_DTYPE_Q3_K] = {"q3_K", XLLM_QK_K, 32 + 64 + 12 + 2, true},
    [XLLM_DTYPE_Q4_K] = {"q4_K", XLLM_QK_K, 2 + 2 + 12 + 128, true},
    [XLLM_DTYPE_Q5_K] = {"q5_K", XLLM_QK_K, 2 + 2 + 12 + 32 + 128, true},
    [XLLM_DTYPE_Q6_K] = {"q6_K", XLLM_QK_K, 128 + 64 + 16 + 2, true},
    [XLLM_DTYPE_Q8_K] = {"q8_K", XLLM_QK_K, 4 + 256 + 2 * 16, true},
    [XLLM_DTYPE_BF16] = {"bf16", 1, 2, false},
};

const xllm_dtype_traits *xllm_dtype_get_traits(xllm_dtype t) {
    if ((int)t < 0 || (int)t >= XLLM_DTYPE_COUNT) return NULL;
    const xllm_dtype_traits *tr = &k_traits[t];
    return tr->name ? tr : NULL;
}

const char *xllm_dtype_name(xllm_dtype t) {
    const xllm_dtype_traits *tr = xllm_dtype_get_traits(t);
    return tr ? tr->name : NULL;
}

size_t xllm_dtype_row_bytes(xllm_dtype t, int64_t n) {
    const xllm_dtype_traits *tr = xllm_dtype_get_traits(t);
    if (!tr || n < 0 || n % tr->block_size != 0) return 0;
    return (size_t)(n / tr->block_size) * tr->block_bytes;
}

static uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof(u));
    return u;
}

static float bits_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof(f));
    return f;
}

float xllm_fp16_to_fp32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    if (exp == 0x1f) return bits_f32(sign | 0x7f800000u | (man << 13)); /* inf / NaN */
    if (exp != 0) return bits_f32(sign | ((exp + 112u) << 23) | (man << 13));
    if (man == 0) return bits_f32(sign);
    /* Subnormal: normalise the mantissa into a float32 normal. */
    exp = 113;
    while (!(man & 0x400u)) {
        man <<= 1;
        exp--;
    }
    return bits_f32(sign | (exp << 23) | ((man & 0x3ffu) << 13));
}

uint16_t xllm_fp32_to_fp16(float f) {
    uint32_t x = f32_bits(f);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    x &= 0x7fffffffu;
    if (x > 0x7f800000u) return sign | 0x7e00u | (uint16_t)((x >> 13) & 0x3ffu); /* quiet NaN */
    if (x >= 0x477ff000u) return sign | 0x7c00u; /* inf, or rounds past 65504 */
    if (x >= 0x38800000u) {                      /* normal half */
        uint32_t h = (x - 0x38000000u) >> 13;    /* rebias the exponent 127 -> 15 */
        uint32_t rem = x & 0x1fffu;
        if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h++;
        return sign | (uint16_t)h;
    }
    /* Subnormal half (or zero): value = man * 2^(e-150); in units of 2^-24 that is
     * man >> (126 - e). */
    uint32_t e = x >> 23;
    uint32_t shift = 126u - e;
    if (shift > 24) return sign; /* below half the smallest subnormal */
    uint32_t man = (x & 0x7fffffu) | 0x800000u;
    uint32_t q = man >> shift;
    uint32_t rem = man & ((1u << shift) - 1u);
    uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (q & 1u))) q++;
    return sign | (uint16_t)q;
}

float xllm_bf16_to_fp32(uint16_t h) {
    return bits_f32((uint32_t)h << 16);
}

uint16_t xllm_fp32_to_bf16(float f) {
    uint32_t x = f32_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u); /* quiet NaN */
    x += 0x7fffu + ((x >> 16) & 1u);
    return (uint16_t)(x >> 16);
}
