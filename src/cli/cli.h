/* The xllm command: subcommands share this header. */
#ifndef XLLM_CLI_H
#define XLLM_CLI_H

int xllm_cmd_run(int argc, char **argv);
int xllm_cmd_logits(int argc, char **argv);
int xllm_cmd_info(int argc, char **argv);
int xllm_cmd_gen_model(int argc, char **argv);
int xllm_cmd_bench(int argc, char **argv);
int xllm_cmd_tokenize(int argc, char **argv);
int xllm_cmd_bench_tokenize(int argc, char **argv);
int xllm_cmd_chat_template(int argc, char **argv);
int xllm_cmd_bench_kv(int argc, char **argv);
int xllm_cmd_bench_pd(int argc, char **argv);
int xllm_cmd_serve(int argc, char **argv);
int xllm_cmd_engine(int argc, char **argv);
int xllm_cmd_service(int argc, char **argv);
int xllm_cmd_bench_serve(int argc, char **argv);

#endif
