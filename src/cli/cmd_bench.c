int xllm_cmd_bench(int argc, char **argv);
int xllm_cmd_bench(int argc, char **argv) {
    (void)argc;
    (void)argv;
    return 1;
}
