/* The kernel table of one ISA level and the data forms its kernels share: 8-bit activations,
 * interleaved weight panels. The matmul driver (matmul.c) picks a table once per context. */
#ifndef XLLM_COMPUTE_CPU_KERNELS_H
#define XLLM_COMPUTE_CPU_KERNELS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "compute/cpu/cpu.h"
#include "compute/cpu/ops.h"

/* Rows of weights in one panel of the batched (GEMM) path. */
#define XLLM_PANEL 16
/* Largest token count the direct (GEMV) kernels take; bigger batches pack panels. */
#define XLLM_GEMV_MAX_T 4

/* 8-bit form of T activation rows of n floats (n a multiple of 32, or of 256 when B = 256):
 * row t is x[t] ~ d[t][j] * q[t][i] for i in block j of B elements. */
typedef struct xllm_q8act {
    int8_t *q;    /* (T, n) int8, row t at q + t * n */
    float *d;     /* (T, n / B) scales */
    int16_t *s16; /* (T, n / 16) sums of q over each 16 elements */
    float *g;     /* (T, n / G, 2) per group of G: (d, d * sum q) for the packed GEMM */
    int B;        /* 32 or 256 */
    int G;        /* group size of g: 32 or 16 (0 while g is not made) */
} xllm_q8act;

/* A panel of XLLM_PANEL weight rows of K elements in the common 8-bit form: row r, element e
 * of group g = e / G is s[g * sgs + r] * q + m[g * sgs + r], with q (u8) at
 * q[g * qgs + ((e % G) / 4) * 64 + r * 4 + e % 4]. Packers write the contiguous form (qgs = 0:
 * 16 * G, sgs = 0: 16); panels packed ahead of time interleave each group's q with its scales
 * (and offsets) in one stream, which one-token decode reads at the speed of a plain read. */
typedef struct xllm_qpanel {
    uint8_t *q;
    float *s;
    float *m;
    int G;       /* 16 or 32 */
    int sym;     /* > 0: a symmetric type, m = -sym * s (the offset is taken in int32) */
    int64_t qgs; /* bytes from one group's q to the next (0: 16 * G) */
    int64_t sgs; /* floats from one group's s (and m) to the next (0: 16) */
    /* Groups in pairs with f16 scales (symmetric types whose scale is the block's f16 d: Q8_0,
     * Q4_0, Q5_0; s and m unused): pair i at q + i * qgs holds group 2i's q, group 2i+1's q,
     * then their 2 x 16 scales as f16, 16 * G + 16 * G + 64 bytes: the dense size for Q8_0. */
    int h16;
    /* Bytes the GEMM prefetches into L2 while it works on this panel (NULL / 0: none): in the
     * packed-ahead form, the pair after next, which the thread takes next but one. With
     * several token tiles a panel comes from memory in the first tile and from cache in the
     * others, memory idle meanwhile; prefetching keeps it busy (16 tokens, 3072 x 1024 Q8_0
     * matrices from memory: 2 threads ~235 GMAC/s against ~195, one thread 155 against 105, in
     * cache 312 / 166; into L1 instead: 225 / 135, held by its few miss buffers). */
    const uint8_t *pf;
    int64_t pf_bytes;
} xllm_qpanel;

/* Group g's q bytes, and its 16 scales, of a panel. */
static inline const uint8_t *xllm_qpanel_q(const xllm_qpanel *p, int64_t g, int64_t qgs) {
    return p->h16 ? p->q + (g >> 1) * qgs + (g & 1) * 16 * p->G : p->q + g * qgs;
}

static inline const uint16_t *xllm_qpanel_sh(const xllm_qpanel *p, int64_t g, int64_t qgs) {
    return (const uint16_t *)(p->q + (g >> 1) * qgs + 32 * p->G) + (g & 1) * 16;
}

static inline int64_t xllm_qpanel_qgs(const xllm_qpanel *p) {
    return p->qgs ? p->qgs : 16 * (int64_t)p->G;
}

static inline int64_t xllm_qpanel_sgs(const xllm_qpanel *p) {
    return p->sgs ? p->sgs : 16;
}

/* Lines of a panel's stream one group stands for (pairs: half the pair, rounded up, so that the
 * two groups' prefetches cover the pair's scales too). */
static inline int xllm_qpanel_group_lines(const xllm_qpanel *p, int64_t qgs) {
    return (int)(((p->h16 ? qgs / 2 : qgs) + 63) / 64);
}

/* The panel kernels that stream their weights (one-token decode) prefetch each line they will
 * read XLLM_DECODE_PF bytes ahead of it into L1: a thread's stream then keeps more lines in
 * flight than the hardware prefetchers and the kernel's out-of-order window do alone. They do
 * little work a line (Q8_0: 8 dot products a 512-byte group), yet without it one thread
 * streamed their panels at ~60% of a plain read (Qwen3-0.6B shape, one process, blocks of steps
 * alternating, AVX-512: Q8_0 one thread 37.5 -> 56.9 tokens/s, two 66 -> 94; Q4_K_M 79 -> 87,
 * 126 -> 136; AVX2: Q8_0 44.8 -> 50.6 / 59.8 -> 64.6, Q4_K_M 51.9 -> 54.6 / 87.8 -> 93.6; 2 KB
 * and 8 KB ahead did less for Q8_0). BF16's panels gained nothing (one vdpbf16ps a line: it
 * streams at a plain read's pace without it). */
#define XLLM_DECODE_PF 4096
static inline __attribute__((always_inline)) void xllm_pf_lines(const void *p, const int n) {
    for (int j = 0; j < n; j++) __builtin_prefetch((const char *)p + XLLM_DECODE_PF + 64 * j, 0, 3);
}

/* Calls FN(p, np, G, SYM, K, a, T, nr, y, y_stride, acc) with the panels' group size G and
 * symmetric offset SYM as constants (both panels of a call come from one matrix), so that each
 * ISA's gemm_q instantiates its kernel for every form the packers make. */
#define XLLM_GEMM_Q_BY_FORM(FN, p, np, K, a, T, nr, y, y_stride, acc)                              \
    do {                                                                                           \
        if ((p)[0].G == 32) {                                                                      \
            if ((p)[0].sym == 128)                                                                 \
                FN(p, np, 32, 128, K, a, T, nr, y, y_stride, acc);                                 \
            else if ((p)[0].sym == 8)                                                              \
                FN(p, np, 32, 8, K, a, T, nr, y, y_stride, acc);                                   \
            else if ((p)[0].sym == 16)                                                             \
                FN(p, np, 32, 16, K, a, T, nr, y, y_stride, acc);                                  \
            else                                                                                   \
                FN(p, np, 32, 0, K, a, T, nr, y, y_stride, acc);                                   \
        } else {                                                                                   \
            if ((p)[0].sym == 32)                                                                  \
                FN(p, np, 16, 32, K, a, T, nr, y, y_stride, acc);                                  \
            else if ((p)[0].sym == 4)                                                              \
                FN(p, np, 16, 4, K, a, T, nr, y, y_stride, acc);                                   \
            else                                                                                   \
                FN(p, np, 16, 0, K, a, T, nr, y, y_stride, acc);                                   \
        }                                                                                          \
    } while (0)

/* Activation form a weight type wants: block size of its 8-bit activations, 0 for float. */
static inline int xllm_act_block(xllm_dtype t) {
    switch (t) {
        case XLLM_DTYPE_Q4_0:
        case XLLM_DTYPE_Q4_1:
        case XLLM_DTYPE_Q5_0:
        case XLLM_DTYPE_Q5_1:
        case XLLM_DTYPE_Q8_0:
            return 32;
        case XLLM_DTYPE_Q2_K:
        case XLLM_DTYPE_Q3_K:
        case XLLM_DTYPE_Q4_K:
        case XLLM_DTYPE_Q5_K:
        case XLLM_DTYPE_Q6_K:
            return 256;
        default:
            return 0;
    }
}

/* Group size of a quantized type's scales in the panel form. */
static inline int xllm_panel_group(xllm_dtype t) {
    return (t == XLLM_DTYPE_Q2_K || t == XLLM_DTYPE_Q3_K || t == XLLM_DTYPE_Q6_K) ? 16 : 32;
}

/* The 8 six-bit scales and mins of a Q4_K / Q5_K super-block (its 12 scale bytes at s), one
 * per byte of *sc / *mn, sub-block j in byte j. */
static inline void xllm_k4_scales(const uint8_t *s, uint64_t *sc, uint64_t *mn) {
    uint32_t u0, u1, u2;
    memcpy(&u0, s, 4);
    memcpy(&u1, s + 4, 4);
    memcpy(&u2, s + 8, 4);
    *sc = (uint64_t)(u0 & 0x3f3f3f3fu) |
          ((uint64_t)((u2 & 0x0f0f0f0fu) | (((u0 >> 6) & 0x03030303u) << 4)) << 32);
    *mn = (uint64_t)(u1 & 0x3f3f3f3fu) |
          ((uint64_t)(((u2 >> 4) & 0x0f0f0f0fu) | (((u1 >> 6) & 0x03030303u) << 4)) << 32);
}

/* Decode panels of the sub-8-bit types: 16 rows in about the type's own bits, interleaved so
 * that one 64-byte vector holds 4 consecutive elements of each row, each block's scales beside
 * its values; one-token decode reads them front to back, one stream, at about the dense size.
 * A "step" of 8 elements is 64 bytes where byte 4 r + j holds e = 8 s + j (low nibble) and
 * e = 8 s + 4 + j (high nibble), e counted in the block; the fifth bits of a group of 32 (4
 * steps) are one 64-byte vector, byte 4 r + j holding e = 8 s + j in bit 2 s and e = 8 s + 4 + j
 * in bit 2 s + 1. 2-bit values of a sub-block u of 16: one 64-byte vector, byte 4 r + j holding
 * e = 16 u + 4 i + j in bits 2 i, 2 i + 1. Per panel and block (row r):
 *   Q4_0 / Q4_1 / Q5_0 / Q5_1 (32 elements; 288 / 320 / 352 / 384 bytes, the dense sizes):
 *         [0, 256) 4 steps of low 4 bits, for Q5 [256, 320) the fifth bits, then d f16 (at
 *         2 r), for Q4_1 / Q5_1 then m f16: w = d (q - 8), d q + m, d (q - 16), d q + m;
 *   Q2_K (256 elements, 1344 bytes, the dense size): [0, 256) scale | min << 4 (sub-block u of
 *         16 at 16 u + r), [256, 288) d f16, [288, 320) dmin f16, [320, 1344) the 2-bit
 *         values of the 16 sub-blocks: w = d sc q - dmin mn;
 *   Q3_K (1824 bytes): [0, 256) scales int8 (sc - 32, at 16 u + r), [256, 288) d f16, then
 *         sub-block u at 288 + 96 u: its low 2 bits (as above), and 4 masks of 64 bits, mask i
 *         holding the third bit of e = 16 u + 4 i + j at bit 4 r + j: w = d sc (q - 4);
 *   Q4_K (2368 bytes): [0, 128) 6-bit scales u8 (sub-block g of 32 at 16 g + r), [128, 256)
 *         6-bit mins, [256, 288) d f16 (at 2 r), [288, 320) dmin f16, [320, 2368) the low 4
 *         bits in 32 steps: w = d sc q - dmin mn;
 *   Q5_K (2880 bytes): Q4_K's scales, mins, d and dmin, then group g of 32 at 320 + 320 g: its
 *         4 steps of low 4 bits and its fifth bits;
 *   Q6_K (3392 bytes): [0, 256) scales int8 (sub-block g of 16 at 16 g + r), [256, 288) d f16,
 *         then sub-block u at 320 + 192 u: steps 2u and 2u + 1 of the low 4 bits, and 64 bytes
 *         of high bit pairs (bits 2 i of byte 4 r + j: e = 16 u + 4 i + j): w = d sc (q - 32). */
#define XLLM_DP_Q2K_SB 1344
#define XLLM_DP_Q3K_SB 1824
#define XLLM_DP_Q4K_SB 2368
#define XLLM_DP_Q5K_SB 2880
#define XLLM_DP_Q6K_SB 3392

/* A legacy type's decode block (32 elements x 16 rows): whether t is one (Q4_0 .. Q5_1), with
 * fifth bits (Q5_*) and an offset m (Q*_1). */
static inline bool xllm_dp_leg_form(xllm_dtype t, bool *five, bool *one) {
    *five = t == XLLM_DTYPE_Q5_0 || t == XLLM_DTYPE_Q5_1;
    *one = t == XLLM_DTYPE_Q4_1 || t == XLLM_DTYPE_Q5_1;
    return *five || *one || t == XLLM_DTYPE_Q4_0;
}

/* Where its d starts (after 4 steps of nibbles and the fifth bits), and its bytes (d, then m:
 * 16 f16 each). */
static inline int xllm_dp_leg_doff(int five) {
    return 256 + 64 * five;
}

static inline int xllm_dp_leg_size(int five, int one) {
    return xllm_dp_leg_doff(five) + 32 + 32 * one;
}

/* Bytes of one legacy-type decode block, 0 for another type. */
static inline int xllm_dp_leg_bytes(xllm_dtype t) {
    bool five, one;
    return xllm_dp_leg_form(t, &five, &one) ? xllm_dp_leg_size(five, one) : 0;
}

/* The types with decode panels: X(type) for each (a level's gemv_dp dispatch). */
#define XLLM_DP_TYPES(X)                                                                           \
    X(XLLM_DTYPE_Q4_0);                                                                            \
    X(XLLM_DTYPE_Q4_1);                                                                            \
    X(XLLM_DTYPE_Q5_0);                                                                            \
    X(XLLM_DTYPE_Q5_1);                                                                            \
    X(XLLM_DTYPE_Q2_K);                                                                            \
    X(XLLM_DTYPE_Q3_K);                                                                            \
    X(XLLM_DTYPE_Q4_K);                                                                            \
    X(XLLM_DTYPE_Q5_K);                                                                            \
    X(XLLM_DTYPE_Q6_K)

/* Defines a level's gemv_dp (its kernel table's entry) over its four decode-panel kernel
 * families, named alike at every level: gemv_dp_leg_t (five, one), gemv_dp_q23k_t (three),
 * gemv_dp_q4k_t (five), gemv_dp_q6k_t; each instantiated per type and token count. */
#define XLLM_DEFINE_GEMV_DP                                                                        \
    static inline __attribute__((always_inline)) void gemv_dp_one(                                 \
        const xllm_dtype TY, const uint8_t *panel, int64_t K, const xllm_q8act *a, const int NT,   \
        int nr, float *y, int64_t y_stride, bool acc) {                                            \
        bool five, one;                                                                            \
        if (xllm_dp_leg_form(TY, &five, &one))                                                     \
            gemv_dp_leg_t(five, one, panel, K, a, NT, nr, y, y_stride, acc);                       \
        else if (TY == XLLM_DTYPE_Q2_K || TY == XLLM_DTYPE_Q3_K)                                   \
            gemv_dp_q23k_t(TY == XLLM_DTYPE_Q3_K, panel, K, a, NT, nr, y, y_stride, acc);          \
        else if (TY == XLLM_DTYPE_Q4_K || TY == XLLM_DTYPE_Q5_K)                                   \
            gemv_dp_q4k_t(TY == XLLM_DTYPE_Q5_K, panel, K, a, NT, nr, y, y_stride, acc);           \
        else                                                                                       \
            gemv_dp_q6k_t(panel, K, a, NT, nr, y, y_stride, acc);                                  \
    }                                                                                              \
    static inline __attribute__((always_inline)) void gemv_dp_by_t(                                \
        const xllm_dtype TY, const uint8_t *panel, int64_t K, const xllm_q8act *a, int64_t T,      \
        int nr, float *y, int64_t y_stride, bool acc) {                                            \
        if (T == 1)                                                                                \
            gemv_dp_one(TY, panel, K, a, 1, nr, y, y_stride, acc);                                 \
        else if (T == 2)                                                                           \
            gemv_dp_one(TY, panel, K, a, 2, nr, y, y_stride, acc);                                 \
        else if (T == 3)                                                                           \
            gemv_dp_one(TY, panel, K, a, 3, nr, y, y_stride, acc);                                 \
        else                                                                                       \
            gemv_dp_one(TY, panel, K, a, 4, nr, y, y_stride, acc);                                 \
    }                                                                                              \
    static void gemv_dp(xllm_dtype t, const uint8_t *panel, int64_t K, const xllm_q8act *a,        \
                        int64_t T, int nr, float *y, int64_t y_stride, bool acc) {                 \
        XLLM_DP_TYPES(XLLM_DP_IF_);                                                                \
        XLLM_ASSERT(!"no decode panel kernel for this type");                                      \
    }
#define XLLM_DP_IF_(TY)                                                                            \
    if (t == TY) return gemv_dp_by_t(TY, panel, K, a, T, nr, y, y_stride, acc)

/* Bytes of one 16-row decode panel of K elements; 0 for a type without the form. */
size_t xllm_dpanel_bytes(xllm_dtype t, int64_t K);
/* Packs rows [r0, r0 + nr) (nr <= 16; the others are zero) of w into a decode panel. */
void xllm_pack_dpanel(const xllm_mat *w, int64_t r0, int nr, uint8_t *out);
/* Row r (< 16) of a decode panel of type t as K floats (the reference dequantization). */
void xllm_dpanel_row(xllm_dtype t, const uint8_t *panel, int64_t K, int r, float *out);

typedef struct xllm_cpu_kernels {
    xllm_cpu_level level;
    bool bf16_dot; /* gemm_bf16 available (AVX512_BF16) */
    /* One row of n floats to the 8-bit form (q: n, d: n / B, s16: n / 16). */
    void (*quant_row)(const float *x, int64_t n, int B, int8_t *q, float *d, int16_t *s16);
    /* Direct decode kernels over rows [r0, r1) of w for T <= XLLM_GEMV_MAX_T tokens;
     * y[t * y_stride + r] = (or +=, when acc) row r . x_t. Return false for a type they do
     * not handle (the driver then packs panels). x: float rows; a: the 8-bit form. */
    bool (*gemv)(const xllm_mat *w, int64_t r0, int64_t r1, const float *x, int64_t x_stride,
                 const xllm_q8act *a, int64_t T, float *y, int64_t y_stride, bool acc);
    /* Packs nr <= 16 rows starting at r0 of a quantized w into p (buffers sized by the
     * driver); stage: 16 * K bytes of scratch. False for a type it does not handle. */
    bool (*pack_q)(const xllm_mat *w, int64_t r0, int nr, uint8_t *stage, xllm_qpanel *p);
    /* y (T, nr) (+)= panels . a for tokens [0, T): np (1 or 2) panels p[0..np) of 16 rows
     * each, nr <= 16 * np rows in all. */
    void (*gemm_q)(const xllm_qpanel *p, int np, int64_t K, const xllm_q8act *a, int64_t T, int nr,
                   float *y, int64_t y_stride, bool acc);
    /* Float panels: nr rows of w (F32/F16/BF16) as (K, 16) floats. */
    void (*pack_f)(const xllm_mat *w, int64_t r0, int nr, float *panel);
    void (*gemm_f)(const float *panel, int64_t K, const float *x, int64_t x_stride, int64_t T,
                   int nr, float *y, int64_t y_stride, bool acc);
    /* BF16 panels (K / 2, 16, 2) and activations as bf16 (T, K) (optional: NULL). */
    void (*pack_bf16)(const xllm_mat *w, int64_t r0, int nr, uint16_t *panel);
    /* np (1 or 2) consecutive panels, K * 16 values apart */
    void (*gemm_bf16)(const uint16_t *panel, int np, int64_t K, const uint16_t *xb, int64_t T,
                      int nr, float *y, int64_t y_stride, bool acc);
    /* Direct decode kernel for BF16 rows [r0, r1) against T <= XLLM_GEMV_MAX_T tokens in bf16
     * (xb (T, K), K = w->n_cols, a multiple of 32), as gemv (optional: NULL). */
    void (*gemv_bf16)(const xllm_mat *w, int64_t r0, int64_t r1, const uint16_t *xb, int64_t T,
                      float *y, int64_t y_stride, bool acc);
    /* Decode kernel for one BF16 panel (pack_bf16's form, nr <= 16 rows) against T <=
     * XLLM_GEMV_MAX_T tokens in bf16, as gemv_dp (optional: NULL). */
    void (*gemv_bf16p)(const uint16_t *panel, int64_t K, const uint16_t *xb, int64_t T, int nr,
                       float *y, int64_t y_stride, bool acc);
    void (*to_bf16)(const float *x, uint16_t *y, int64_t n);
    /* One decode panel (xllm_dpanel_bytes) of type t, K elements, against T <= XLLM_GEMV_MAX_T
     * tokens in the type's 8-bit form (xllm_act_block): y[t * y_stride + r] (+)= row r . x_t
     * for r < nr (optional: NULL). */
    void (*gemv_dp)(xllm_dtype t, const uint8_t *panel, int64_t K, const xllm_q8act *a, int64_t T,
                    int nr, float *y, int64_t y_stride, bool acc);
    /* fp32 -> IEEE half, round to nearest even (KV stores) */
    void (*to_f16)(const float *x, uint16_t *y, int64_t n);
    /* Elementwise and small ops. */
    float (*dot_f32)(const float *a, const float *b, int64_t n);
    void (*rmsnorm)(float *out, const float *x, const float *w, int64_t n, float eps);
    void (*swiglu)(float *out, const float *g, const float *u, int64_t n);
    /* Attention of `group` query heads sharing one KV head (see xllm_op_attention_group). */
    void (*attention)(const xllm_attn_args *a);
} xllm_cpu_kernels;

const xllm_cpu_kernels *xllm_cpu_kernels_scalar(void);
const xllm_cpu_kernels *xllm_cpu_kernels_avx2(void);
const xllm_cpu_kernels *xllm_cpu_kernels_avx512(void);

/* Portable helpers shared by the ISA files (kern_common.c). */
/* Unpacks one quantized row (n elements) to u8 q (n) and per-G scale/offset (n / G each) in
 * the panel form; false for a type without a panel form. */
bool xllm_unpack_row_q(xllm_dtype t, const void *row, int64_t n, uint8_t *q, float *s, float *m);
void xllm_quant_row_q8_scalar(const float *x, int64_t n, int B, int8_t *q, float *d, int16_t *s16);
/* The offset a symmetric type's panel values carry (m = -sym * s), 0 for the others. */
int xllm_panel_sym(xllm_dtype t);
/* The first half of pack_q: rows [r0, r0 + nr) unpacked to stage (16 rows of K rounded up to
 * 64 bytes, zero tail and zero rows past nr), their scales / offsets into p, and p's G and
 * sym; the caller interleaves stage into p->q. False for a type without a panel form. */
bool xllm_unpack_panel(const xllm_mat *w, int64_t r0, int nr, uint8_t *stage, xllm_qpanel *p);
/* pack_q in portable C (the same panels as the AVX-512 packers), for levels without their own. */
bool xllm_pack_q_portable(const xllm_mat *w, int64_t r0, int nr, uint8_t *stage, xllm_qpanel *p);

#endif
