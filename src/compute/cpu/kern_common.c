/* Portable pieces shared by every ISA level: unpacking quantized rows into the common panel
 * form (u8 value, per-group scale and offset), the scalar 8-bit activation quantizer, and the
 * scalar kernel table (the reference the fast paths are tested against). */
#include <math.h>
#include <string.h>

#include "compute/cpu/kernels.h"
#include "compute/dtype.h"
#include "util/common.h"

static float h2f(const uint8_t *p) {
    return xllm_fp16_to_fp32((uint16_t)(p[0] | (p[1] << 8)));
}

static uint32_t rd32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

/* 6-bit scale / min j of Q4_K and Q5_K (layout as in quant_ref.c). */
static void k4_sm(int j, const uint8_t *s, int *sc, int *mn) {
    if (j < 4) {
        *sc = s[j] & 63;
        *mn = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4);
        *mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

static int q3k_sc(int i, const uint8_t *s) {
    int lo = i < 8 ? (s[i] & 0x0f) : (s[i - 8] >> 4);
    int hi = (s[8 + (i & 3)] >> (2 * (i >> 2))) & 3;
    return (lo | (hi << 4)) - 32;
}

bool xllm_unpack_row_q(xllm_dtype t, const void *row, int64_t n, uint8_t *q, float *s, float *m) {
    const xllm_dtype_traits *tr = xllm_dtype_get_traits(t);
    if (!tr || !tr->quantized) return false;
    const uint8_t *b = row;
    const int64_t nb = n / tr->block_size;
    for (int64_t ib = 0; ib < nb; ib++, b += tr->block_bytes) {
        uint8_t *o = q + ib * tr->block_size;
        switch (t) {
            case XLLM_DTYPE_Q4_0:
            case XLLM_DTYPE_Q4_1: {
                const bool one = t == XLLM_DTYPE_Q4_1;
                const uint8_t *qs = b + (one ? 4 : 2);
                for (int j = 0; j < 16; j++) {
                    o[j] = qs[j] & 0x0f;
                    o[j + 16] = qs[j] >> 4;
                }
                s[ib] = h2f(b);
                m[ib] = one ? h2f(b + 2) : -8.0f * s[ib];
                break;
            }
            case XLLM_DTYPE_Q5_0:
            case XLLM_DTYPE_Q5_1: {
                const bool one = t == XLLM_DTYPE_Q5_1;
                const uint32_t qh = rd32(b + (one ? 4 : 2));
                const uint8_t *qs = b + (one ? 8 : 6);
                for (int j = 0; j < 16; j++) {
                    o[j] = (uint8_t)((qs[j] & 0x0f) | (((qh >> j) & 1u) << 4));
                    o[j + 16] = (uint8_t)((qs[j] >> 4) | (((qh >> (j + 16)) & 1u) << 4));
                }
                s[ib] = h2f(b);
                m[ib] = one ? h2f(b + 2) : -16.0f * s[ib];
                break;
            }
            case XLLM_DTYPE_Q8_0:
                for (int j = 0; j < 32; j++) o[j] = (uint8_t)(b[2 + j] ^ 0x80);
                s[ib] = h2f(b);
                m[ib] = -128.0f * s[ib];
                break;
            case XLLM_DTYPE_Q2_K: {
                const float d = h2f(b + 80), dmin = h2f(b + 82);
                for (int e = 0; e < XLLM_QK_K; e++)
                    o[e] = (b[16 + 32 * (e >> 7) + (e & 31)] >> (2 * ((e >> 5) & 3))) & 3;
                for (int g = 0; g < 16; g++) {
                    s[ib * 16 + g] = d * (float)(b[g] & 0x0f);
                    m[ib * 16 + g] = -(dmin * (float)(b[g] >> 4));
                }
                break;
            }
            case XLLM_DTYPE_Q3_K: {
                const float d = h2f(b + 108);
                for (int e = 0; e < XLLM_QK_K; e++) {
                    int h = e >> 7, k = (e >> 5) & 3, l = e & 31;
                    o[e] = (uint8_t)(((b[32 + 32 * h + l] >> (2 * k)) & 3) |
                                     (((b[l] >> (4 * h + k)) & 1) << 2));
                }
                for (int g = 0; g < 16; g++) {
                    s[ib * 16 + g] = d * (float)q3k_sc(g, b + 96);
                    m[ib * 16 + g] = -4.0f * s[ib * 16 + g];
                }
                break;
            }
            case XLLM_DTYPE_Q4_K:
            case XLLM_DTYPE_Q5_K: {
                const bool five = t == XLLM_DTYPE_Q5_K;
                const float d = h2f(b), dmin = h2f(b + 2);
                const uint8_t *qh = b + 16, *qs = b + (five ? 48 : 16);
                for (int c = 0; c < 4; c++)
                    for (int l = 0; l < 32; l++) {
                        int v0 = qs[32 * c + l] & 0x0f, v1 = qs[32 * c + l] >> 4;
                        if (five) {
                            v0 |= ((qh[l] >> (2 * c)) & 1) << 4;
                            v1 |= ((qh[l] >> (2 * c + 1)) & 1) << 4;
                        }
                        o[64 * c + l] = (uint8_t)v0;
                        o[64 * c + 32 + l] = (uint8_t)v1;
                    }
                for (int j = 0; j < 8; j++) {
                    int sc, mn;
                    k4_sm(j, b + 4, &sc, &mn);
                    s[ib * 8 + j] = d * (float)sc;
                    m[ib * 8 + j] = -(dmin * (float)mn);
                }
                break;
            }
            case XLLM_DTYPE_Q6_K: {
                const float d = h2f(b + 208);
                for (int e = 0; e < XLLM_QK_K; e++) {
                    int h = e >> 7, k = (e >> 5) & 3, l = e & 31;
                    int lo = (b[64 * h + 32 * (k & 1) + l] >> (4 * (k >> 1))) & 0x0f;
                    int hi = (b[128 + 32 * h + l] >> (2 * k)) & 3;
                    o[e] = (uint8_t)(lo | (hi << 4));
                }
                for (int g = 0; g < 16; g++) {
                    s[ib * 16 + g] = d * (float)(int8_t)b[192 + g];
                    m[ib * 16 + g] = -32.0f * s[ib * 16 + g];
                }
                break;
            }
            default:
                return false;
        }
    }
    return true;
}

size_t xllm_dpanel_bytes(xllm_dtype t, int64_t K) {
    const int lb = xllm_dp_leg_bytes(t);
    if (lb) return K % 32 ? 0 : (size_t)(K / 32) * (size_t)lb;
    if (K % XLLM_QK_K) return 0;
    const int64_t nsb = K / XLLM_QK_K;
    switch (t) {
        case XLLM_DTYPE_Q2_K:
            return (size_t)nsb * XLLM_DP_Q2K_SB;
        case XLLM_DTYPE_Q3_K:
            return (size_t)nsb * XLLM_DP_Q3K_SB;
        case XLLM_DTYPE_Q4_K:
            return (size_t)nsb * XLLM_DP_Q4K_SB;
        case XLLM_DTYPE_Q5_K:
            return (size_t)nsb * XLLM_DP_Q5K_SB;
        case XLLM_DTYPE_Q6_K:
            return (size_t)nsb * XLLM_DP_Q6K_SB;
        default:
            return 0;
    }
}

/* Steps of low nibbles (4 per group of 32 elements qq) of row r, from o. */
static void dp_nibbles(const uint8_t *qq, int ngroups, int r, uint8_t *o) {
    for (int st = 0; st < 4 * ngroups; st++)
        for (int j = 0; j < 4; j++)
            o[64 * st + 4 * r + j] =
                (uint8_t)((qq[8 * st + j] & 15) | ((qq[8 * st + 4 + j] & 15) << 4));
}

/* The fifth bits of one group of 32 elements qq, row r. */
static void dp_fifth(const uint8_t *qq, int r, uint8_t *o) {
    for (int j = 0; j < 4; j++) {
        int v = 0;
        for (int st = 0; st < 4; st++)
            v |= ((qq[8 * st + j] >> 4) & 1) << (2 * st) | ((qq[8 * st + 4 + j] >> 4) & 1)
                                                               << (2 * st + 1);
        o[4 * r + j] = (uint8_t)v;
    }
}

/* The low 2 bits of one sub-block of 16 elements qq, row r. */
static void dp_pairs(const uint8_t *qq, int r, uint8_t *o) {
    for (int j = 0; j < 4; j++) {
        int v = 0;
        for (int i = 0; i < 4; i++) v |= (qq[4 * i + j] & 3) << (2 * i);
        o[4 * r + j] = (uint8_t)v;
    }
}

void xllm_pack_dpanel(const xllm_mat *w, int64_t r0, int nr, uint8_t *out) {
    const xllm_dtype t = w->type;
    const int64_t K = w->n_cols;
    const xllm_dtype_traits *tr = xllm_dtype_get_traits(t);
    const int64_t nb = K / tr->block_size;
    const size_t bb = xllm_dpanel_bytes(t, K) / (size_t)nb; /* bytes a block */
    uint8_t *q = xllm_xmalloc((size_t)K);
    float *fs = xllm_xmalloc((size_t)(K / 16) * sizeof(float));
    float *fm = xllm_xmalloc((size_t)(K / 16) * sizeof(float));
    memset(out, 0, bb * (size_t)nb);
    for (int r = 0; r < nr; r++) {
        const uint8_t *row = (const uint8_t *)w->data + (size_t)(r0 + r) * w->row_bytes;
        xllm_unpack_row_q(t, row, K, q, fs, fm);
        for (int64_t ib = 0; ib < nb; ib++) {
            uint8_t *o = out + (size_t)ib * bb;
            const uint8_t *b = row + (size_t)ib * tr->block_bytes;
            const uint8_t *qq = q + ib * tr->block_size;
            switch (t) {
                case XLLM_DTYPE_Q4_0:
                case XLLM_DTYPE_Q4_1:
                case XLLM_DTYPE_Q5_0:
                case XLLM_DTYPE_Q5_1: {
                    bool five, one;
                    xllm_dp_leg_form(t, &five, &one);
                    const int doff = xllm_dp_leg_doff(five);
                    dp_nibbles(qq, 1, r, o);
                    if (five) dp_fifth(qq, r, o + 256);
                    memcpy(o + doff + 2 * r, b, 2);
                    if (one) memcpy(o + doff + 32 + 2 * r, b + 2, 2);
                    break;
                }
                case XLLM_DTYPE_Q2_K:
                    for (int u = 0; u < 16; u++) {
                        o[16 * u + r] = b[u];
                        dp_pairs(qq + 16 * u, r, o + 320 + 64 * u);
                    }
                    memcpy(o + 256 + 2 * r, b + 80, 2);
                    memcpy(o + 288 + 2 * r, b + 82, 2);
                    break;
                case XLLM_DTYPE_Q3_K:
                    for (int u = 0; u < 16; u++) {
                        o[16 * u + r] = (uint8_t)(int8_t)q3k_sc(u, b + 96);
                        uint8_t *ou = o + 288 + 96 * u;
                        dp_pairs(qq + 16 * u, r, ou);
                        for (int i = 0; i < 4; i++)
                            for (int j = 0; j < 4; j++)
                                if (qq[16 * u + 4 * i + j] & 4)
                                    ou[64 + 8 * i + (4 * r + j) / 8] |=
                                        (uint8_t)(1u << ((4 * r + j) % 8));
                    }
                    memcpy(o + 256 + 2 * r, b + 108, 2);
                    break;
                case XLLM_DTYPE_Q4_K:
                case XLLM_DTYPE_Q5_K:
                    for (int g = 0; g < 8; g++) {
                        int sc, mn;
                        k4_sm(g, b + 4, &sc, &mn);
                        o[16 * g + r] = (uint8_t)sc;
                        o[128 + 16 * g + r] = (uint8_t)mn;
                        if (t == XLLM_DTYPE_Q5_K) {
                            dp_nibbles(qq + 32 * g, 1, r, o + 320 + 320 * g);
                            dp_fifth(qq + 32 * g, r, o + 320 + 320 * g + 256);
                        }
                    }
                    memcpy(o + 256 + 2 * r, b, 2);
                    memcpy(o + 288 + 2 * r, b + 2, 2);
                    if (t == XLLM_DTYPE_Q4_K) dp_nibbles(qq, 8, r, o + 320);
                    break;
                case XLLM_DTYPE_Q6_K:
                    /* sub-block u of 16 at 320 + 192 u: low nibbles of steps 2u, 2u + 1 (8
                     * elements each: byte j of row r = e 8s+j | e 8s+4+j << 4), then the high
                     * bit pairs (bits 2i of byte j = e 16u+4i+j) */
                    for (int u = 0; u < 16; u++) {
                        uint8_t *ob = o + 320 + 192 * u;
                        const uint8_t *qu = qq + 16 * u;
                        for (int j = 0; j < 4; j++) {
                            ob[4 * r + j] = (uint8_t)((qu[j] & 15) | ((qu[4 + j] & 15) << 4));
                            ob[64 + 4 * r + j] =
                                (uint8_t)((qu[8 + j] & 15) | ((qu[12 + j] & 15) << 4));
                            int v = 0;
                            for (int i = 0; i < 4; i++) v |= (qu[4 * i + j] >> 4) << (2 * i);
                            ob[128 + 4 * r + j] = (uint8_t)v;
                        }
                    }
                    for (int g = 0; g < 16; g++) o[16 * g + r] = b[192 + g];
                    memcpy(o + 256 + 2 * r, b + 208, 2);
                    break;
                default:
                    XLLM_ASSERT(!"no decode panel for this type");
            }
        }
    }
    free(q);
    free(fs);
    free(fm);
}

/* Element e's 4 bits in a run of steps o (64 bytes a step of 8 elements), row r. */
static int dp_nib(const uint8_t *o, int r, int e) {
    const uint8_t b = o[64 * (e / 8) + 4 * r + e % 4];
    return e % 8 < 4 ? b & 15 : b >> 4;
}

/* Element e's fifth bit (e < 32) in a group's fifth-bit vector o, row r, at bit 4. */
static int dp_bit5(const uint8_t *o, int r, int e) {
    return ((o[4 * r + e % 4] >> (2 * (e / 8) + (e % 8 >= 4))) & 1) << 4;
}

void xllm_dpanel_row(xllm_dtype t, const uint8_t *panel, int64_t K, int r, float *out) {
    const xllm_dtype_traits *tr = xllm_dtype_get_traits(t);
    const int64_t nb = K / tr->block_size;
    const size_t bb = xllm_dpanel_bytes(t, K) / (size_t)nb;
    for (int64_t ib = 0; ib < nb; ib++) {
        const uint8_t *o = panel + (size_t)ib * bb;
        float *y = out + ib * tr->block_size;
        switch (t) {
            case XLLM_DTYPE_Q4_0:
            case XLLM_DTYPE_Q4_1:
            case XLLM_DTYPE_Q5_0:
            case XLLM_DTYPE_Q5_1: {
                bool five, one;
                xllm_dp_leg_form(t, &five, &one);
                const int doff = xllm_dp_leg_doff(five);
                const float d = h2f(o + doff + 2 * r), m = one ? h2f(o + doff + 32 + 2 * r) : 0.0f;
                const int sym = xllm_panel_sym(t);
                for (int e = 0; e < 32; e++) {
                    const int q = dp_nib(o, r, e) | (five ? dp_bit5(o + 256, r, e) : 0);
                    y[e] = one ? d * (float)q + m : d * (float)(q - sym);
                }
                break;
            }
            case XLLM_DTYPE_Q2_K:
            case XLLM_DTYPE_Q3_K: {
                const bool three = t == XLLM_DTYPE_Q3_K;
                const float d = h2f(o + 256 + 2 * r), dmin = three ? 0.0f : h2f(o + 288 + 2 * r);
                for (int e = 0; e < XLLM_QK_K; e++) {
                    const int u = e / 16, i = (e % 16) / 4, j = e % 4;
                    const uint8_t *ou = three ? o + 288 + 96 * u : o + 320 + 64 * u;
                    int q = (ou[4 * r + j] >> (2 * i)) & 3;
                    if (three) {
                        q |= ((ou[64 + 8 * i + (4 * r + j) / 8] >> ((4 * r + j) % 8)) & 1) << 2;
                        y[e] = d * (float)(int8_t)o[16 * u + r] * (float)(q - 4);
                    } else {
                        y[e] = d * (float)(o[16 * u + r] & 15) * (float)q -
                               dmin * (float)(o[16 * u + r] >> 4);
                    }
                }
                break;
            }
            case XLLM_DTYPE_Q4_K:
            case XLLM_DTYPE_Q5_K: {
                const bool five = t == XLLM_DTYPE_Q5_K;
                const float d = h2f(o + 256 + 2 * r), dmin = h2f(o + 288 + 2 * r);
                for (int e = 0; e < XLLM_QK_K; e++) {
                    const int g = e / 32;
                    const int q = five ? dp_nib(o + 320 + 320 * g, r, e % 32) |
                                             dp_bit5(o + 320 + 320 * g + 256, r, e % 32)
                                       : dp_nib(o + 320, r, e);
                    y[e] = d * (float)o[16 * g + r] * (float)q - dmin * (float)o[128 + 16 * g + r];
                }
                break;
            }
            case XLLM_DTYPE_Q6_K: {
                const float d = h2f(o + 256 + 2 * r);
                for (int e = 0; e < XLLM_QK_K; e++) {
                    const int u = e / 16, ee = e % 16;
                    const uint8_t *ou = o + 320 + 192 * u;
                    const int lo = dp_nib(ou, r, ee);
                    const int hi = (ou[128 + 4 * r + ee % 4] >> (2 * (ee / 4))) & 3;
                    y[e] = d * (float)(int8_t)o[16 * u + r] * (float)((lo | hi << 4) - 32);
                }
                break;
            }
            default:
                XLLM_ASSERT(!"no decode panel for this type");
        }
    }
}

int xllm_panel_sym(xllm_dtype t) {
    switch (t) {
        case XLLM_DTYPE_Q8_0:
            return 128;
        case XLLM_DTYPE_Q6_K:
            return 32;
        case XLLM_DTYPE_Q5_0:
            return 16;
        case XLLM_DTYPE_Q4_0:
            return 8;
        case XLLM_DTYPE_Q3_K:
            return 4;
        default:
            return 0;
    }
}

bool xllm_unpack_panel(const xllm_mat *w, int64_t r0, int nr, uint8_t *stage, xllm_qpanel *p) {
    const int64_t K = w->n_cols, Kp = (K + 63) / 64 * 64;
    if (!xllm_act_block(w->type)) return false;
    const int G = xllm_panel_group(w->type);
    const int64_t ng = K / G;
    const xllm_dtype_traits *tr = xllm_dtype_get_traits(w->type);
    float sr[1024 / 16], mr[1024 / 16]; /* one chunk's groups */
    p->G = G;
    p->sym = xllm_panel_sym(w->type);
    for (int r = 0; r < XLLM_PANEL; r++) {
        uint8_t *qr = stage + (size_t)r * Kp;
        memset(qr, 0, (size_t)Kp);
        if (r >= nr) {
            for (int64_t g = 0; g < ng; g++) p->s[g * 16 + r] = p->m[g * 16 + r] = 0.0f;
            continue;
        }
        const uint8_t *row = (const uint8_t *)w->data + (size_t)(r0 + r) * w->row_bytes;
        for (int64_t e = 0; e < K; e += 1024) { /* chunks of whole blocks (1024 = 4 x 256) */
            const int64_t len = K - e < 1024 ? K - e : 1024;
            xllm_unpack_row_q(w->type, row + (size_t)(e / tr->block_size) * tr->block_bytes, len,
                              qr + e, sr, mr);
            for (int64_t g = 0; g < len / G; g++) {
                p->s[(e / G + g) * 16 + r] = sr[g];
                p->m[(e / G + g) * 16 + r] = mr[g];
            }
        }
    }
    return true;
}

bool xllm_pack_q_portable(const xllm_mat *w, int64_t r0, int nr, uint8_t *stage, xllm_qpanel *p) {
    if (!xllm_unpack_panel(w, r0, nr, stage, p)) return false;
    /* [k / 4][row][4]: 4 consecutive elements of each of the 16 rows per 64 bytes */
    const int64_t Kp = (w->n_cols + 63) / 64 * 64;
    for (int64_t k4 = 0; k4 < Kp / 4; k4++)
        for (int r = 0; r < XLLM_PANEL; r++)
            memcpy(p->q + k4 * 64 + r * 4, stage + (size_t)r * Kp + 4 * k4, 4);
    return true;
}

void xllm_quant_row_q8_scalar(const float *x, int64_t n, int B, int8_t *q, float *d, int16_t *s16) {
    for (int64_t j = 0; j < n / B; j++) {
        const float *xb = x + j * B;
        float amax = 0.0f;
        for (int i = 0; i < B; i++) amax = fmaxf(amax, fabsf(xb[i]));
        const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
        d[j] = amax / 127.0f;
        for (int i = 0; i < B; i++) q[j * B + i] = (int8_t)lrintf(xb[i] * id);
    }
    for (int64_t g = 0; g < n / 16; g++) {
        int sum = 0;
        for (int i = 0; i < 16; i++) sum += q[g * 16 + i];
        s16[g] = (int16_t)sum;
    }
}

static void to_f16_scalar(const float *x, uint16_t *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = xllm_fp32_to_fp16(x[i]);
}

void xllm_cpu_to_f16(const xllm_cpu_kernels *k, const float *x, uint16_t *y, int64_t n) {
    (k->to_f16 ? k->to_f16 : to_f16_scalar)(x, y, n);
}

static const xllm_cpu_kernels k_scalar = {
    .level = XLLM_CPU_SCALAR,
    .quant_row = xllm_quant_row_q8_scalar,
    .dot_f32 = xllm_op_dot_f32,
    .rmsnorm = xllm_op_rmsnorm,
    .swiglu = xllm_op_swiglu,
    .attention = xllm_op_attention_group,
};

const xllm_cpu_kernels *xllm_cpu_kernels_scalar(void) {
    return &k_scalar;
}

const xllm_cpu_kernels *xllm_cpu_kernels_get(xllm_cpu_level level) {
    const xllm_cpu_level have = xllm_cpu_detect();
    if (level > have) level = have;
#if defined(__x86_64__)
    if (level == XLLM_CPU_AVX512) return xllm_cpu_kernels_avx512();
    if (level == XLLM_CPU_AVX2) return xllm_cpu_kernels_avx2();
#endif
    return &k_scalar;
}

void xllm_cpu_rmsnorm(const xllm_cpu_kernels *k, float *out, const float *x, const float *w,
                      int64_t n, float eps) {
    k->rmsnorm(out, x, w, n, eps);
}

void xllm_cpu_swiglu(const xllm_cpu_kernels *k, float *out, const float *g, const float *u,
                     int64_t n) {
    k->swiglu(out, g, u, n);
}

float xllm_cpu_dot_f32(const xllm_cpu_kernels *k, const float *a, const float *b, int64_t n) {
    return k->dot_f32(a, b, n);
}

void xllm_cpu_attention(const xllm_cpu_kernels *k, const xllm_attn_args *a) {
    if (a->head_dim > 256 || (a->n_kv > 1 ? a->n_kv : 1) * a->n_tok * a->group > XLLM_ATTN_MAX_Q)
        xllm_op_attention_group(a);
    else
        k->attention(a);
}
