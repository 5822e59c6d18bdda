/* The xllm command: subcommands share this header. */
#ifndef XLLM_CLI_H
#define XLLM_CLI_H

int xllm_cmd_run(int argc, char **argv);
int xllm_cmd_logits(int argc, char **argv);
int xllm_cmd_info(int argc, char **argv);
int xllm_cmd_gen_model(int argc, char **argv);
int xllm_cmd_bench(int argc, char **argv);

#endif
