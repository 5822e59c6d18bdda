/* GGUF reader (versions 2 and 3): metadata of every value type, tensor infos, alignment, and
 * tensor data mapped read-only. Every size, count, offset and string length is checked against
 * the file before use; a corrupt file gives an error naming the field. */
#ifndef XLLM_GGUF_H
#define XLLM_GGUF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "xllm/xllm.h"

#define XLLM_GGUF_MAGIC             0x46554747u /* "GGUF" little-endian */
#define XLLM_GGUF_DEFAULT_ALIGNMENT 32
#define XLLM_GGUF_MAX_DIMS          4

/* Value types: values are the file format's, append-only. */
typedef enum xllm_gguf_type {
    XLLM_GGUF_UINT8 = 0,
    XLLM_GGUF_INT8 = 1,
    XLLM_GGUF_UINT16 = 2,
    XLLM_GGUF_INT16 = 3,
    XLLM_GGUF_UINT32 = 4,
    XLLM_GGUF_INT32 = 5,
    XLLM_GGUF_FLOAT32 = 6,
    XLLM_GGUF_BOOL = 7,
    XLLM_GGUF_STRING = 8,
    XLLM_GGUF_ARRAY = 9,
    XLLM_GGUF_UINT64 = 10,
    XLLM_GGUF_INT64 = 11,
    XLLM_GGUF_FLOAT64 = 12,
    XLLM_GGUF_TYPE_COUNT
} xllm_gguf_type;

/* A string inside the file: not NUL-terminated. */
typedef struct xllm_gguf_str {
    const char *ptr;
    uint64_t len;
} xllm_gguf_str;

typedef struct xllm_gguf_kv {
    char *key; /* NUL-terminated copy */
    xllm_gguf_type type;
    union {
        uint64_t u; /* unsigned integer types and bool */
        int64_t i;  /* signed integer types */
        double f;   /* FLOAT32 / FLOAT64 */
    } v;
    char *str; /* STRING: NUL-terminated copy (strings with NUL bytes are cut there) */
    /* ARRAY: element type, count, first element in the file; strs[] for string arrays. */
    xllm_gguf_type arr_type;
    uint64_t arr_n;
    const void *arr_data;
    xllm_gguf_str *arr_strs;
} xllm_gguf_kv;

typedef struct xllm_gguf_tensor {
    char *name; /* NUL-terminated copy */
    uint32_t n_dims;
    int64_t ne[XLLM_GGUF_MAX_DIMS]; /* unused dims are 1 */
    xllm_dtype type;
    uint64_t offset;  /* from the start of the data section */
    uint64_t n_bytes; /* size of the data */
    const void *data; /* inside the mapping */
} xllm_gguf_tensor;

typedef struct xllm_gguf {
    const uint8_t *base; /* the whole file */
    size_t size;
    bool mapped; /* base is our mmap, unmapped by xllm_gguf_free */
    uint32_t version;
    uint64_t n_kv;
    xllm_gguf_kv *kv;
    uint64_t n_tensors;
    xllm_gguf_tensor *tensors;
    uint64_t alignment;
    uint64_t data_offset; /* start of tensor data in the file */
} xllm_gguf;

/* Maps a file read-only and parses it. On error returns a status, *out = NULL and a message. */
xllm_status xllm_gguf_open(const char *path, xllm_gguf **out, char *err, size_t err_size);
/* Parses a GGUF image held in memory (not copied: must outlive the result). */
xllm_status xllm_gguf_parse(const void *data, size_t size, xllm_gguf **out, char *err,
                            size_t err_size);
void xllm_gguf_free(xllm_gguf *g); /* accepts NULL */

const char *xllm_gguf_type_name(xllm_gguf_type t);
/* Bytes of one value of a scalar type; 0 for STRING, ARRAY and unknown types. */
size_t xllm_gguf_type_size(xllm_gguf_type t);

/* Lookups: NULL / -1 when absent. */
const xllm_gguf_kv *xllm_gguf_find(const xllm_gguf *g, const char *key);
const xllm_gguf_tensor *xllm_gguf_find_tensor(const xllm_gguf *g, const char *name);

/* Typed getters: true when the key exists and its value converts without loss (any integer
 * type for ints, float32/float64 for floats). */
bool xllm_gguf_get_u32(const xllm_gguf *g, const char *key, uint32_t *out);
bool xllm_gguf_get_i64(const xllm_gguf *g, const char *key, int64_t *out);
bool xllm_gguf_get_f32(const xllm_gguf *g, const char *key, float *out);
bool xllm_gguf_get_bool(const xllm_gguf *g, const char *key, bool *out);
const char *xllm_gguf_get_str(const xllm_gguf *g, const char *key); /* NULL if absent */
/* An array of the given element type; NULL when absent or of another type. */
const xllm_gguf_kv *xllm_gguf_get_arr(const xllm_gguf *g, const char *key,
                                      xllm_gguf_type elem_type);

/* Renders a value as text (arrays abbreviated); returns the length needed (like snprintf). */
int xllm_gguf_kv_to_string(const xllm_gguf_kv *kv, char *buf, size_t buf_size);

#endif
