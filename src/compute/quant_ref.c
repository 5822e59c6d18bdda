/* Scalar reference dequantize / quantize / dot product for every GGUF block type xllm supports.
 * Blocks are read and written byte by byte in GGUF's little-endian layout. */
#include <math.h>
#include <string.h>

#include "compute/dtype.h"
#include "util/common.h"

/* ---- byte helpers ------------------------------------------------------------------------- */

static float rd_f16(const uint8_t *p) {
    return xllm_fp16_to_fp32((uint16_t)(p[0] | (p[1] << 8)));
}

static void wr_f16(uint8_t *p, float v) {
    uint16_t h = xllm_fp32_to_fp16(v);
    p[0] = (uint8_t)(h & 0xff);
    p[1] = (uint8_t)(h >> 8);
}

/* Stores v as fp16 and returns the value the fp16 holds, so quantizers work with what a reader
 * will see. */
static float wr_f16_ret(uint8_t *p, float v) {
    wr_f16(p, v);
    return rd_f16(p);
}

static uint32_t rd_u32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static void wr_u32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}

static float rd_f32(const uint8_t *p) {
    uint32_t u = rd_u32(p);
    float f;
    memcpy(&f, &u, sizeof(f));
    return f;
}

static void wr_f32(uint8_t *p, float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof(u));
    wr_u32(p, u);
}

static int nearest(float x) {
    return (int)lrintf(x);
}

static int clampi(int v, int lo, int hi) {
    return v < lo ? lo : (v > hi ? hi : v);
}

/* Quantizes x/scale to the nearest integer in [lo, hi]; 0 (clamped) when scale is 0. */
static int qround(float x, float scale, int lo, int hi) {
    if (scale == 0.0f) return clampi(0, lo, hi);
    return clampi(nearest(x / scale), lo, hi);
}

/* The element with the largest magnitude, keeping its sign. */
static float signed_absmax(const float *x, int n) {
    float best = 0.0f, amax = 0.0f;
    for (int i = 0; i < n; i++) {
        float a = fabsf(x[i]);
        if (a > amax) {
            amax = a;
            best = x[i];
        }
    }
    return best;
}

static void min_max(const float *x, int n, float *mn, float *mx) {
    float lo = x[0], hi = x[0];
    for (int i = 1; i < n; i++) {
        if (x[i] < lo) lo = x[i];
        if (x[i] > hi) hi = x[i];
    }
    *mn = lo;
    *mx = hi;
}

/* 6-bit scale j and min j of the 12-byte packed scales of Q4_K / Q5_K: entries 0..3 sit in the low
 * 6 bits of bytes 0..3 (scales) and 4..7 (mins); entries 4..7 keep their low 4 bits in the
 * nibbles of bytes 8..11 and their top 2 bits in the top bits of bytes 0..3 / 4..7. */
static void k4_scale_min(int j, const uint8_t *s, int *sc, int *mn) {
    if (j < 4) {
        *sc = s[j] & 63;
        *mn = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4);
        *mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

static void k4_pack_scales(const int sc[8], const int mn[8], uint8_t s[12]) {
    memset(s, 0, 12);
    for (int j = 0; j < 4; j++) {
        s[j] = (uint8_t)(sc[j] & 63);
        s[j + 4] = (uint8_t)(mn[j] & 63);
    }
    for (int j = 4; j < 8; j++) {
        s[j + 4] = (uint8_t)((sc[j] & 0x0f) | ((mn[j] & 0x0f) << 4));
        s[j - 4] |= (uint8_t)((sc[j] >> 4) << 6);
        s[j] |= (uint8_t)((mn[j] >> 4) << 6);
    }
}

/* Signed 6-bit scale i (already minus 32) of Q3_K's 12 packed bytes: low 4 bits in the nibbles of
 * bytes 0..7 (low nibbles for 0..7, high nibbles for 8..15), top 2 bits in bytes 8..11. */
static int q3k_scale(int i, const uint8_t *s) {
    int lo = i < 8 ? (s[i] & 0x0f) : (s[i - 8] >> 4);
    int hi = (s[8 + (i & 3)] >> (2 * (i >> 2))) & 3;
    return (lo | (hi << 4)) - 32;
}

/* ---- dequantization, one block ------------------------------------------------------------ */

static void dq_q4_0(const uint8_t *b, float *y) {
    float d = rd_f16(b);
    const uint8_t *qs = b + 2;
    for (int j = 0; j < 16; j++) {
        y[j] = d * (float)((qs[j] & 0x0f) - 8);
        y[j + 16] = d * (float)((qs[j] >> 4) - 8);
    }
}

static void dq_q4_1(const uint8_t *b, float *y) {
    float d = rd_f16(b), m = rd_f16(b + 2);
    const uint8_t *qs = b + 4;
    for (int j = 0; j < 16; j++) {
        y[j] = d * (float)(qs[j] & 0x0f) + m;
        y[j + 16] = d * (float)(qs[j] >> 4) + m;
    }
}

static void dq_q5_0(const uint8_t *b, float *y) {
    float d = rd_f16(b);
    uint32_t qh = rd_u32(b + 2);
    const uint8_t *qs = b + 6;
    for (int j = 0; j < 16; j++) {
        int h0 = (int)((qh >> j) & 1u) << 4;
        int h1 = (int)((qh >> (j + 16)) & 1u) << 4;
        y[j] = d * (float)(((qs[j] & 0x0f) | h0) - 16);
        y[j + 16] = d * (float)(((qs[j] >> 4) | h1) - 16);
    }
}

static void dq_q5_1(const uint8_t *b, float *y) {
    float d = rd_f16(b), m = rd_f16(b + 2);
    uint32_t qh = rd_u32(b + 4);
    const uint8_t *qs = b + 8;
    for (int j = 0; j < 16; j++) {
        int h0 = (int)((qh >> j) & 1u) << 4;
        int h1 = (int)((qh >> (j + 16)) & 1u) << 4;
        y[j] = d * (float)((qs[j] & 0x0f) | h0) + m;
        y[j + 16] = d * (float)((qs[j] >> 4) | h1) + m;
    }
}

static void dq_q8_0(const uint8_t *b, float *y) {
    float d = rd_f16(b);
    const int8_t *qs = (const int8_t *)(b + 2);
    for (int j = 0; j < 32; j++) y[j] = d * (float)qs[j];
}

static void dq_q8_1(const uint8_t *b, float *y) {
    float d = rd_f16(b);
    const int8_t *qs = (const int8_t *)(b + 4);
    for (int j = 0; j < 32; j++) y[j] = d * (float)qs[j];
}

/* Q2_K: scales[16] (low nibble scale, high nibble min), qs[64], d, dmin. Element
 * 128h + 32k + l lives in bits 2k..2k+1 of qs[32h + l]; sub-block of 16 = element / 16. */
static void dq_q2_k(const uint8_t *b, float *y) {
    const uint8_t *sc = b;
    const uint8_t *qs = b + 16;
    float d = rd_f16(b + 80), dmin = rd_f16(b + 82);
    for (int e = 0; e < XLLM_QK_K; e += 16) {
        int h = e >> 7, k = (e >> 5) & 3, l0 = e & 31;
        float dl = d * (float)(sc[e >> 4] & 0x0f);
        float ml = dmin * (float)(sc[e >> 4] >> 4);
        const uint8_t *q = qs + 32 * h + l0;
        for (int l = 0; l < 16; l++) y[e + l] = dl * (float)((q[l] >> (2 * k)) & 3) - ml;
    }
}

/* Q3_K: hmask[32], qs[64], scales[12], d. Element 128h + 32k + l: low 2 bits in bits 2k..2k+1
 * of qs[32h + l], third bit in bit 4h + k of hmask[l] (set = no -4 offset). */
static void dq_q3_k(const uint8_t *b, float *y) {
    const uint8_t *hm = b;
    const uint8_t *qs = b + 32;
    const uint8_t *sc = b + 96;
    float d = rd_f16(b + 108);
    for (int e = 0; e < XLLM_QK_K; e += 16) {
        int h = e >> 7, k = (e >> 5) & 3, l0 = e & 31;
        float dl = d * (float)q3k_scale(e >> 4, sc);
        const uint8_t *q = qs + 32 * h + l0;
        const uint8_t *m = hm + l0;
        int hb = 4 * h + k;
        for (int l = 0; l < 16; l++) {
            int v = ((q[l] >> (2 * k)) & 3) | (((m[l] >> hb) & 1) << 2);
            y[e + l] = dl * (float)(v - 4);
        }
    }
}

/* Q4_K: d, dmin, scales[12], qs[128]. Chunk c of 64 elements uses qs[32c..32c+31]: low nibbles
 * are sub-block 2c, high nibbles sub-block 2c+1. */
static void dq_q4_k(const uint8_t *b, float *y) {
    float d = rd_f16(b), dmin = rd_f16(b + 2);
    const uint8_t *s = b + 4;
    const uint8_t *qs = b + 16;
    for (int c = 0; c < 4; c++) {
        int sc0, m0, sc1, m1;
        k4_scale_min(2 * c, s, &sc0, &m0);
        k4_scale_min(2 * c + 1, s, &sc1, &m1);
        float d0 = d * (float)sc0, n0 = dmin * (float)m0;
        float d1 = d * (float)sc1, n1 = dmin * (float)m1;
        const uint8_t *q = qs + 32 * c;
        float *o = y + 64 * c;
        for (int l = 0; l < 32; l++) {
            o[l] = d0 * (float)(q[l] & 0x0f) - n0;
            o[l + 32] = d1 * (float)(q[l] >> 4) - n1;
        }
    }
}

/* Q5_K: d, dmin, scales[12], qh[32], qs[128]. As Q4_K, plus a fifth bit: bit 2c of qh[l] for
 * low-nibble element l of chunk c, bit 2c+1 for the high-nibble element. */
static void dq_q5_k(const uint8_t *b, float *y) {
    float d = rd_f16(b), dmin = rd_f16(b + 2);
    const uint8_t *s = b + 4;
    const uint8_t *qh = b + 16;
    const uint8_t *qs = b + 48;
    for (int c = 0; c < 4; c++) {
        int sc0, m0, sc1, m1;
        k4_scale_min(2 * c, s, &sc0, &m0);
        k4_scale_min(2 * c + 1, s, &sc1, &m1);
        float d0 = d * (float)sc0, n0 = dmin * (float)m0;
        float d1 = d * (float)sc1, n1 = dmin * (float)m1;
        const uint8_t *q = qs + 32 * c;
        float *o = y + 64 * c;
        for (int l = 0; l < 32; l++) {
            int v0 = (q[l] & 0x0f) | (((qh[l] >> (2 * c)) & 1) << 4);
            int v1 = (q[l] >> 4) | (((qh[l] >> (2 * c + 1)) & 1) << 4);
            o[l] = d0 * (float)v0 - n0;
            o[l + 32] = d1 * (float)v1 - n1;
        }
    }
}

/* Q6_K: ql[128], qh[64], int8 scales[16], d. In half h, element 128h + 32k + l (l < 32) takes its
 * low 4 bits from ql[64h + 32(k&1) + l] (low nibble for k < 2, high nibble for k >= 2) and its
 * top 2 bits from bits 2k..2k+1 of qh[32h + l]; value minus 32. */
static void dq_q6_k(const uint8_t *b, float *y) {
    const uint8_t *ql = b;
    const uint8_t *qh = b + 128;
    const int8_t *sc = (const int8_t *)(b + 192);
    float d = rd_f16(b + 208);
    for (int e = 0; e < XLLM_QK_K; e += 16) {
        int h = e >> 7, k = (e >> 5) & 3, l0 = e & 31;
        float dl = d * (float)sc[e >> 4];
        const uint8_t *lo = ql + 64 * h + 32 * (k & 1) + l0;
        const uint8_t *hi = qh + 32 * h + l0;
        int lshift = (k >> 1) * 4;
        for (int l = 0; l < 16; l++) {
            int v = ((lo[l] >> lshift) & 0x0f) | (((hi[l] >> (2 * k)) & 3) << 4);
            y[e + l] = dl * (float)(v - 32);
        }
    }
}

static void dq_q8_k(const uint8_t *b, float *y) {
    float d = rd_f32(b);
    const int8_t *qs = (const int8_t *)(b + 4);
    for (int j = 0; j < XLLM_QK_K; j++) y[j] = d * (float)qs[j];
}

/* ---- quantization, one block -------------------------------------------------------------- */

/* The 32-element types follow llama.cpp's reference conventions (scale computed in fp32 and
 * applied as a reciprocal, halves rounded up), so for the same input they write the same bytes as
 * llama.cpp's quantizer. */

static float recip(float d) {
    return d != 0.0f ? 1.0f / d : 0.0f;
}

/* floor(v) clamped to [0, hi]; callers pass value + offset + 0.5 (non-negative) to round. */
static int floor_clamp(float v, int hi) {
    return clampi((int)floorf(v), 0, hi);
}

static void q_q4_0(const float *x, uint8_t *b) {
    float d = signed_absmax(x, 32) / -8.0f, id = recip(d);
    wr_f16(b, d);
    uint8_t *qs = b + 2;
    for (int j = 0; j < 16; j++) {
        int q0 = floor_clamp(x[j] * id + 8.5f, 15);
        int q1 = floor_clamp(x[j + 16] * id + 8.5f, 15);
        qs[j] = (uint8_t)(q0 | (q1 << 4));
    }
}

static void q_q4_1(const float *x, uint8_t *b) {
    float mn, mx;
    min_max(x, 32, &mn, &mx);
    float d = (mx - mn) / 15.0f, id = recip(d);
    wr_f16(b, d);
    wr_f16(b + 2, mn);
    uint8_t *qs = b + 4;
    for (int j = 0; j < 16; j++) {
        int q0 = floor_clamp((x[j] - mn) * id + 0.5f, 15);
        int q1 = floor_clamp((x[j + 16] - mn) * id + 0.5f, 15);
        qs[j] = (uint8_t)(q0 | (q1 << 4));
    }
}

static void q_q5_0(const float *x, uint8_t *b) {
    float d = signed_absmax(x, 32) / -16.0f, id = recip(d);
    wr_f16(b, d);
    uint8_t *qs = b + 6;
    uint32_t qh = 0;
    for (int j = 0; j < 16; j++) {
        int q0 = floor_clamp(x[j] * id + 16.5f, 31);
        int q1 = floor_clamp(x[j + 16] * id + 16.5f, 31);
        qs[j] = (uint8_t)((q0 & 0x0f) | ((q1 & 0x0f) << 4));
        qh |= (uint32_t)(q0 >> 4) << j;
        qh |= (uint32_t)(q1 >> 4) << (j + 16);
    }
    wr_u32(b + 2, qh);
}

static void q_q5_1(const float *x, uint8_t *b) {
    float mn, mx;
    min_max(x, 32, &mn, &mx);
    float d = (mx - mn) / 31.0f, id = recip(d);
    wr_f16(b, d);
    wr_f16(b + 2, mn);
    uint8_t *qs = b + 8;
    uint32_t qh = 0;
    for (int j = 0; j < 16; j++) {
        int q0 = floor_clamp((x[j] - mn) * id + 0.5f, 31);
        int q1 = floor_clamp((x[j + 16] - mn) * id + 0.5f, 31);
        qs[j] = (uint8_t)((q0 & 0x0f) | ((q1 & 0x0f) << 4));
        qh |= (uint32_t)(q0 >> 4) << j;
        qh |= (uint32_t)(q1 >> 4) << (j + 16);
    }
    wr_u32(b + 4, qh);
}

/* Symmetric 8-bit: d = amax / 127, q = round-half-away(x / d). Returns the sum of the quants. */
static int q8_block(const float *x, uint8_t *dp, int8_t *qs) {
    float d = fabsf(signed_absmax(x, 32)) / 127.0f, id = recip(d);
    wr_f16(dp, d);
    int sum = 0;
    for (int j = 0; j < 32; j++) {
        qs[j] = (int8_t)clampi((int)roundf(x[j] * id), -127, 127);
        sum += qs[j];
    }
    return sum;
}

static void q_q8_0(const float *x, uint8_t *b) {
    q8_block(x, b, (int8_t *)(b + 2));
}

static void q_q8_1(const float *x, uint8_t *b) {
    int sum = q8_block(x, b, (int8_t *)(b + 4));
    float d = fabsf(signed_absmax(x, 32)) / 127.0f;
    wr_f16(b + 2, (float)sum * d);
}

/* Asymmetric sub-block fit used by Q2_K / Q4_K / Q5_K: x ~ scale * q - min with q in [0, qmax]
 * and min >= 0 (the formats store the min subtracted, so the range always includes 0). */
static void fit_scale_min(const float *x, int n, int qmax, float *scale, float *min) {
    float lo, hi;
    min_max(x, n, &lo, &hi);
    if (lo > 0.0f) lo = 0.0f;
    *scale = (hi - lo) / (float)qmax;
    *min = -lo;
}

static float max_of(const float *v, int n) {
    float m = 0.0f;
    for (int i = 0; i < n; i++)
        if (v[i] > m) m = v[i];
    return m;
}

static void q_q2_k(const float *x, uint8_t *b) {
    float scale[16], mins[16];
    for (int i = 0; i < 16; i++) fit_scale_min(x + 16 * i, 16, 3, &scale[i], &mins[i]);
    float d = wr_f16_ret(b + 80, max_of(scale, 16) / 15.0f);
    float dmin = wr_f16_ret(b + 82, max_of(mins, 16) / 15.0f);
    uint8_t *sc = b;
    uint8_t *qs = b + 16;
    memset(qs, 0, 64);
    for (int i = 0; i < 16; i++) {
        int s = qround(scale[i], d, 0, 15);
        int m = qround(mins[i], dmin, 0, 15);
        sc[i] = (uint8_t)(s | (m << 4));
        float dl = d * (float)s, ml = dmin * (float)m;
        for (int l = 0; l < 16; l++) {
            int e = 16 * i + l;
            int q = qround(x[e] + ml, dl, 0, 3);
            qs[32 * (e >> 7) + (e & 31)] |= (uint8_t)(q << (2 * ((e >> 5) & 3)));
        }
    }
}

static void q_q3_k(const float *x, uint8_t *b) {
    float scale[16];
    for (int i = 0; i < 16; i++) scale[i] = signed_absmax(x + 16 * i, 16) / -4.0f;
    float d = wr_f16_ret(b + 108, signed_absmax(scale, 16) / -32.0f);
    uint8_t *hm = b;
    uint8_t *qs = b + 32;
    uint8_t *sc = b + 96;
    memset(b, 0, 108);
    for (int i = 0; i < 16; i++) {
        int s = qround(scale[i], d, -32, 31);
        int u = s + 32;
        if (i < 8)
            sc[i] |= (uint8_t)(u & 0x0f);
        else
            sc[i - 8] |= (uint8_t)((u & 0x0f) << 4);
        sc[8 + (i & 3)] |= (uint8_t)((u >> 4) << (2 * (i >> 2)));
        float dl = d * (float)s;
        for (int l = 0; l < 16; l++) {
            int e = 16 * i + l;
            int v = qround(x[e], dl, -4, 3) + 4;
            int h = e >> 7, k = (e >> 5) & 3, j = e & 31;
            qs[32 * h + j] |= (uint8_t)((v & 3) << (2 * k));
            hm[j] |= (uint8_t)((v >> 2) << (4 * h + k));
        }
    }
}

/* Q4_K (qbits 4) and Q5_K (qbits 5): 8 sub-blocks of 32 with 6-bit scales and mins. */
static void q_q45_k(const float *x, uint8_t *b, int qbits) {
    int qmax = (1 << qbits) - 1;
    float scale[8], mins[8];
    for (int i = 0; i < 8; i++) fit_scale_min(x + 32 * i, 32, qmax, &scale[i], &mins[i]);
    float d = wr_f16_ret(b, max_of(scale, 8) / 63.0f);
    float dmin = wr_f16_ret(b + 2, max_of(mins, 8) / 63.0f);
    int sc[8], mn[8];
    for (int i = 0; i < 8; i++) {
        sc[i] = qround(scale[i], d, 0, 63);
        mn[i] = qround(mins[i], dmin, 0, 63);
    }
    k4_pack_scales(sc, mn, b + 4);
    uint8_t *qh = qbits == 5 ? b + 16 : NULL;
    uint8_t *qs = qbits == 5 ? b + 48 : b + 16;
    memset(qs, 0, 128);
    if (qh) memset(qh, 0, 32);
    for (int i = 0; i < 8; i++) {
        float dl = d * (float)sc[i], ml = dmin * (float)mn[i];
        int c = i >> 1, hi = i & 1;
        for (int l = 0; l < 32; l++) {
            int q = qround(x[32 * i + l] + ml, dl, 0, qmax);
            qs[32 * c + l] |= (uint8_t)((q & 0x0f) << (4 * hi));
            if (qh) qh[l] |= (uint8_t)((q >> 4) << (2 * c + hi));
        }
    }
}

static void q_q6_k(const float *x, uint8_t *b) {
    float scale[16];
    for (int i = 0; i < 16; i++) scale[i] = signed_absmax(x + 16 * i, 16) / -32.0f;
    float d = wr_f16_ret(b + 208, signed_absmax(scale, 16) / -128.0f);
    uint8_t *ql = b;
    uint8_t *qh = b + 128;
    int8_t *sc = (int8_t *)(b + 192);
    memset(b, 0, 192);
    for (int i = 0; i < 16; i++) {
        int s = qround(scale[i], d, -128, 127);
        sc[i] = (int8_t)s;
        float dl = d * (float)s;
        for (int l = 0; l < 16; l++) {
            int e = 16 * i + l;
            int v = qround(x[e], dl, -32, 31) + 32;
            int h = e >> 7, k = (e >> 5) & 3, j = e & 31;
            ql[64 * h + 32 * (k & 1) + j] |= (uint8_t)((v & 0x0f) << (4 * (k >> 1)));
            qh[32 * h + j] |= (uint8_t)((v >> 4) << (2 * k));
        }
    }
}

static void q_q8_k(const float *x, uint8_t *b) {
    float mx = signed_absmax(x, XLLM_QK_K);
    int8_t *qs = (int8_t *)(b + 4);
    if (mx == 0.0f) {
        memset(b, 0, 292);
        return;
    }
    float iscale = -127.0f / mx;
    for (int j = 0; j < XLLM_QK_K; j++) qs[j] = (int8_t)clampi(nearest(iscale * x[j]), -127, 127);
    wr_f32(b, 1.0f / iscale);
    for (int g = 0; g < 16; g++) {
        int sum = 0;
        for (int l = 0; l < 16; l++) sum += qs[16 * g + l];
        b[260 + 2 * g] = (uint8_t)((uint16_t)(int16_t)sum & 0xff);
        b[261 + 2 * g] = (uint8_t)((uint16_t)(int16_t)sum >> 8);
    }
}

static void q_q4_k(const float *x, uint8_t *b) {
    q_q45_k(x, b, 4);
}

static void q_q5_k(const float *x, uint8_t *b) {
    q_q45_k(x, b, 5);
}

/* ---- dispatch ----------------------------------------------------------------------------- */

typedef void (*dq_fn)(const uint8_t *b, float *y);
typedef void (*q_fn)(const float *x, uint8_t *b);

static dq_fn dq_for(xllm_dtype t) {
    switch (t) {
        case XLLM_DTYPE_Q4_0:
            return dq_q4_0;
        case XLLM_DTYPE_Q4_1:
            return dq_q4_1;
        case XLLM_DTYPE_Q5_0:
            return dq_q5_0;
        case XLLM_DTYPE_Q5_1:
            return dq_q5_1;
        case XLLM_DTYPE_Q8_0:
            return dq_q8_0;
        case XLLM_DTYPE_Q8_1:
            return dq_q8_1;
        case XLLM_DTYPE_Q2_K:
            return dq_q2_k;
        case XLLM_DTYPE_Q3_K:
            return dq_q3_k;
        case XLLM_DTYPE_Q4_K:
            return dq_q4_k;
        case XLLM_DTYPE_Q5_K:
            return dq_q5_k;
        case XLLM_DTYPE_Q6_K:
            return dq_q6_k;
        case XLLM_DTYPE_Q8_K:
            return dq_q8_k;
        default:
            return NULL;
    }
}

static q_fn q_for(xllm_dtype t) {
    switch (t) {
        case XLLM_DTYPE_Q4_0:
            return q_q4_0;
        case XLLM_DTYPE_Q4_1:
            return q_q4_1;
        case XLLM_DTYPE_Q5_0:
            return q_q5_0;
        case XLLM_DTYPE_Q5_1:
            return q_q5_1;
        case XLLM_DTYPE_Q8_0:
            return q_q8_0;
        case XLLM_DTYPE_Q8_1:
            return q_q8_1;
        case XLLM_DTYPE_Q2_K:
            return q_q2_k;
        case XLLM_DTYPE_Q3_K:
            return q_q3_k;
        case XLLM_DTYPE_Q4_K:
            return q_q4_k;
        case XLLM_DTYPE_Q5_K:
            return q_q5_k;
        case XLLM_DTYPE_Q6_K:
            return q_q6_k;
        case XLLM_DTYPE_Q8_K:
            return q_q8_k;
        default:
            return NULL;
    }
}

void xllm_dequant_row_ref(xllm_dtype t, const void *src, float *dst, int64_t n) {
    const xllm_dtype_traits *tr = xllm_dtype_get_traits(t);
    XLLM_ASSERT(tr && n >= 0 && n % tr->block_size == 0);
    const uint8_t *s = src;
    switch (t) {
        case XLLM_DTYPE_F32:
            memcpy(dst, src, (size_t)n * sizeof(float));
            return;
        case XLLM_DTYPE_F16:
            for (int64_t i = 0; i < n; i++) dst[i] = rd_f16(s + 2 * i);
            return;
        case XLLM_DTYPE_BF16:
            for (int64_t i = 0; i < n; i++)
                dst[i] = xllm_bf16_to_fp32((uint16_t)(s[2 * i] | (s[2 * i + 1] << 8)));
            return;
        default:
            break;
    }
    dq_fn f = dq_for(t);
    XLLM_ASSERT(f);
    int64_t nb = n / tr->block_size;
    for (int64_t i = 0; i < nb; i++) f(s + i * (int64_t)tr->block_bytes, dst + i * tr->block_size);
}

void xllm_quant_row_ref(xllm_dtype t, const float *src, void *dst, int64_t n) {
    const xllm_dtype_traits *tr = xllm_dtype_get_traits(t);
    XLLM_ASSERT(tr && n >= 0 && n % tr->block_size == 0);
    uint8_t *d = dst;
    switch (t) {
        case XLLM_DTYPE_F32:
            memcpy(dst, src, (size_t)n * sizeof(float));
            return;
        case XLLM_DTYPE_F16:
            for (int64_t i = 0; i < n; i++) wr_f16(d + 2 * i, src[i]);
            return;
        case XLLM_DTYPE_BF16:
            for (int64_t i = 0; i < n; i++) {
                uint16_t h = xllm_fp32_to_bf16(src[i]);
                d[2 * i] = (uint8_t)(h & 0xff);
                d[2 * i + 1] = (uint8_t)(h >> 8);
            }
            return;
        default:
            break;
    }
    q_fn f = q_for(t);
    XLLM_ASSERT(f);
    int64_t nb = n / tr->block_size;
    for (int64_t i = 0; i < nb; i++) f(src + i * tr->block_size, d + i * (int64_t)tr->block_bytes);
}

float xllm_vec_dot_ref(xllm_dtype t, const void *w, const float *x, int64_t n) {
    const xllm_dtype_traits *tr = xllm_dtype_get_traits(t);
    XLLM_ASSERT(tr && n >= 0 && n % tr->block_size == 0);
    /* Dequantize a chunk at a time (a whole number of blocks) and accumulate in double. */
    enum { CHUNK = XLLM_QK_K };
    float buf[CHUNK];
    int64_t step = tr->block_size == 1 ? CHUNK : tr->block_size;
    const uint8_t *p = w;
    double sum = 0.0;
    for (int64_t i = 0; i < n; i += step) {
        int64_t m = n - i < step ? n - i : step;
        xllm_dequant_row_ref(t, p + (size_t)(i / tr->block_size) * tr->block_bytes, buf, m);
        for (int64_t j = 0; j < m; j++) sum += (double)buf[j] * (double)x[i + j];
    }
    return (float)sum;
}
