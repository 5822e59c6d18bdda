/* Tensor element types as stored in GGUF: block layouts, fp16/bf16 conversion, and the scalar
 * reference dequantize / quantize / dot product for every type. */
#ifndef XLLM_COMPUTE_DTYPE_H
#define XLLM_COMPUTE_DTYPE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "xllm/xllm.h"

/* Elements per super-block of the k-quants. */
#define XLLM_QK_K 256

typedef struct xllm_dtype_traits {
    const char *name;   /* as llama.cpp prints it: "f32", "q4_K", ... */
    int32_t block_size; /* elements per block (1 for f32/f16/bf16) */
    size_t block_bytes; /* bytes per block */
    bool quantized;
} xllm_dtype_traits;

/* Traits of a type, or NULL for an id that is not one of xllm's supported types. */
const xllm_dtype_traits *xllm_dtype_get_traits(xllm_dtype t);

/* Bytes of a row of n elements; n must be a multiple of the block size. Returns 0 for an
 * unsupported type or a bad n. */
size_t xllm_dtype_row_bytes(xllm_dtype t, int64_t n);

/* IEEE half and bfloat16 conversions (round to nearest even; NaN stays NaN). */
float xllm_fp16_to_fp32(uint16_t h);
uint16_t xllm_fp32_to_fp16(float f);
float xllm_bf16_to_fp32(uint16_t h);
uint16_t xllm_fp32_to_bf16(float f);

/* Scalar reference implementations. n is a multiple of the type's block size.
 * src/dst/w are rows laid out exactly as in GGUF. These define correctness: every fast path is
 * tested against them. */
void xllm_dequant_row_ref(xllm_dtype t, const void *src, float *dst, int64_t n);
/* Quantizes n floats into blocks of type t (a plain round-to-nearest quantizer for every type;
 * used by tests, the model generator and activation quantization). */
void xllm_quant_row_ref(xllm_dtype t, const float *src, void *dst, int64_t n);
/* sum_i dequant(w)[i] * x[i], accumulated in double and returned as float. */
float xllm_vec_dot_ref(xllm_dtype t, const void *w, const float *x, int64_t n);

#endif
