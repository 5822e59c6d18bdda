/* GGUF v3 writer: collects metadata and tensor infos, then streams the file with each tensor's
 * data produced by a callback (so a multi-GB model never has to sit in memory at once). */
#ifndef XLLM_GGUF_WRITE_H
#define XLLM_GGUF_WRITE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "gguf/gguf.h"

typedef struct xllm_gguf_writer xllm_gguf_writer;

xllm_gguf_writer *xllm_gguf_writer_new(void);
void xllm_gguf_writer_free(xllm_gguf_writer *w); /* accepts NULL */

/* Metadata, written in the order added. Keys and strings are copied. */
void xllm_gguf_writer_u32(xllm_gguf_writer *w, const char *key, uint32_t v);
void xllm_gguf_writer_f32(xllm_gguf_writer *w, const char *key, float v);
void xllm_gguf_writer_bool(xllm_gguf_writer *w, const char *key, bool v);
void xllm_gguf_writer_str(xllm_gguf_writer *w, const char *key, const char *v);
/* Arrays: n strings (s[i] of len[i] bytes), int32 or float32 values. */
void xllm_gguf_writer_arr_str(xllm_gguf_writer *w, const char *key, const char *const *s,
                              const size_t *len, uint64_t n);
void xllm_gguf_writer_arr_i32(xllm_gguf_writer *w, const char *key, const int32_t *v, uint64_t n);
void xllm_gguf_writer_arr_f32(xllm_gguf_writer *w, const char *key, const float *v, uint64_t n);
/* Copies a key/value (any type, arrays included) from a parsed file; the source must outlive
 * the writer. */
void xllm_gguf_writer_copy(xllm_gguf_writer *w, const xllm_gguf_kv *kv);

/* Declares a tensor: ne[0] is the row length. Returns its index. */
int64_t xllm_gguf_writer_tensor(xllm_gguf_writer *w, const char *name, xllm_dtype type, int n_dims,
                                const int64_t *ne);

/* Fills the n_bytes of tensor i into buf. Returns false to abort. */
typedef bool (*xllm_gguf_fill_fn)(int64_t i, void *buf, uint64_t n_bytes, void *user);

/* Writes the file (alignment 32). Progress is reported by the fill callback's caller. */
xllm_status xllm_gguf_writer_write(xllm_gguf_writer *w, const char *path, xllm_gguf_fill_fn fill,
                                   void *user, char *err, size_t err_size);

#endif
