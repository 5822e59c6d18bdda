/* Helpers shared by the subcommands: option parsing, model loading with a progress bar. */
#ifndef XLLM_CLI_COMMON_H
#define XLLM_CLI_COMMON_H

#define XLLM_CLI_MIN(a, b) ((a) < (b) ? (a) : (b))

#include <stdbool.h>
#include <stdint.h>

#include <jansson.h>

#include "xllm/xllm.h"

/* Parses a number option value; prints "xllm CMD: bad value for OPT" and returns false. */
bool xllm_cli_int(const char *cmd, const char *opt, const char *s, int64_t lo, int64_t hi,
                  int64_t *out);
bool xllm_cli_float(const char *cmd, const char *opt, const char *s, float *out);
/* Returns argv[*i + 1] and advances, or prints an error and returns NULL. */
const char *xllm_cli_value(const char *cmd, int argc, char **argv, int *i);

/* Loads a model, drawing a progress bar on stderr when it is a terminal and the model large
 * (no_mmap: weights copied to anonymous memory, see xllm_model_params). Prints the error and
 * returns NULL on failure. */
xllm_model *xllm_cli_load_model(const char *cmd, const char *path, bool quiet, bool no_mmap,
                                bool low_memory);

/* Says on stderr when the loader lowered the weights' layout for lack of memory (the layout
 * asked for, what its panels would take, the memory available; see xllm_model_layout). */
void xllm_cli_report_layout(const char *cmd, const xllm_model *m);

/* KV options shared by run / logits / bench: --kv-type, --kv-layout, --kv-memory,
 * --kv-block-tokens. Returns 1 when argv[*i] was one of them (value consumed), 0 when it is not,
 * -1 on a bad value (message printed). */
int xllm_cli_kv_option(const char *cmd, int argc, char **argv, int *i, xllm_context_params *cp);

/* Parses "f32" / "f16". */
bool xllm_cli_kv_type(const char *cmd, const char *s, xllm_dtype *out);

double xllm_cli_now(void); /* monotonic seconds */

/* A tokenizer_config.json's chat template: its "chat_template" string, or the "default" entry
 * of a named list; NULL when it has none. The string belongs to cfg. */
const char *xllm_cli_config_template(json_t *cfg);

#endif
