/* xllm: the command-line entry point; dispatches to subcommands. */
#include <stdio.h>
#include <string.h>

#include "cli/cli.h"
#include "xllm/xllm.h"

static void usage(FILE *f) {
    fprintf(f, "usage: xllm <command> [options]\n"
               "\n"
               "commands:\n"
               "  run      generate text from a prompt (xllm run -m MODEL -p PROMPT)\n"
               "  logits   write the logits of given token ids to a file\n"
               "  info     print a model's architecture, shapes, tensors and tokenizer\n"
               "  bench    measure prompt, generation and batched decode speed (like llama-bench)\n"
               "  gen-model  write a GGUF with random weights in a real model's shape\n"
               "  version  print the version\n"
               "\n"
               "Run 'xllm <command> --help' for a command's options.\n");
}

int main(int argc, char **argv) {
    if (argc < 2) {
        usage(stderr);
        return 1;
    }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "run")) return xllm_cmd_run(argc - 1, argv + 1);
    if (!strcmp(cmd, "logits")) return xllm_cmd_logits(argc - 1, argv + 1);
    if (!strcmp(cmd, "info")) return xllm_cmd_info(argc - 1, argv + 1);
    if (!strcmp(cmd, "bench")) return xllm_cmd_bench(argc - 1, argv + 1);
    if (!strcmp(cmd, "gen-model")) return xllm_cmd_gen_model(argc - 1, argv + 1);
    if (!strcmp(cmd, "version") || !strcmp(cmd, "--version")) {
        printf("xllm %s\n", xllm_version());
        return 0;
    }
    if (!strcmp(cmd, "help") || !strcmp(cmd, "--help") || !strcmp(cmd, "-h")) {
        usage(stdout);
        return 0;
    }
    fprintf(stderr, "xllm: unknown command '%s'\n", cmd);
    usage(stderr);
    return 1;
}
