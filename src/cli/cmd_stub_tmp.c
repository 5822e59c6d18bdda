/* Temporary until the commands land in this session. */
#include <stdio.h>

#include "cli/cli.h"

int xllm_cmd_run(int argc, char **argv) {
    fprintf(stderr, "xllm run: not built yet\n");
    return 1;
}
int xllm_cmd_logits(int argc, char **argv) {
    fprintf(stderr, "xllm logits: not built yet\n");
    return 1;
}
int xllm_cmd_info(int argc, char **argv) {
    fprintf(stderr, "xllm info: not built yet\n");
    return 1;
}
