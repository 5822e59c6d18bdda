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
               "  serve    OpenAI-compatible HTTP server (xllm serve -m MODEL --port 8080)\n"
               "  engine   cluster instance: serve + etcd registration (--role, --etcd)\n"
               "  service  cluster front door and global scheduler over engine instances\n"
               "  logits   write the logits of given token ids to a file\n"
               "  info     print a model's architecture, shapes, tensors and tokenizer\n"
               "  bench    measure prompt, generation and batched decode speed (like llama-bench)\n"
               "  gen-model  write a GGUF with random weights in a real model's shape\n"
               "  tokenize print the token ids of stdin (xllm tokenize -m MODEL_OR_DIR)\n"
               "  bench-tokenize  measure tokenizer encoding speed on files\n"
               "  chat-template  render a chat template for a request (prints the prompt)\n"
               "  bench-kv compare the KV memory layouts (xtensor, paged)\n"
               "  bench-pd time PD KV transfer through two engines (layer-wise vs after prefill)\n"
               "  bench-serve load-test an OpenAI-compatible server (TTFT, TPOT, throughput)\n"
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
    if (!strcmp(cmd, "serve")) return xllm_cmd_serve(argc - 1, argv + 1);
    if (!strcmp(cmd, "engine")) return xllm_cmd_engine(argc - 1, argv + 1);
    if (!strcmp(cmd, "service")) return xllm_cmd_service(argc - 1, argv + 1);
    if (!strcmp(cmd, "logits")) return xllm_cmd_logits(argc - 1, argv + 1);
    if (!strcmp(cmd, "info")) return xllm_cmd_info(argc - 1, argv + 1);
    if (!strcmp(cmd, "bench")) return xllm_cmd_bench(argc - 1, argv + 1);
    if (!strcmp(cmd, "gen-model")) return xllm_cmd_gen_model(argc - 1, argv + 1);
    if (!strcmp(cmd, "tokenize")) return xllm_cmd_tokenize(argc - 1, argv + 1);
    if (!strcmp(cmd, "bench-tokenize")) return xllm_cmd_bench_tokenize(argc - 1, argv + 1);
    if (!strcmp(cmd, "chat-template")) return xllm_cmd_chat_template(argc - 1, argv + 1);
    if (!strcmp(cmd, "bench-kv")) return xllm_cmd_bench_kv(argc - 1, argv + 1);
    if (!strcmp(cmd, "bench-pd")) return xllm_cmd_bench_pd(argc - 1, argv + 1);
    if (!strcmp(cmd, "bench-serve")) return xllm_cmd_bench_serve(argc - 1, argv + 1);
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
