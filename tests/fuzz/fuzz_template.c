/* libFuzzer target for the chat-template interpreter: the input is a template, optionally
 * followed by "\n@@@@\n" and a request JSON; it is parsed and rendered with a fixed
 * conversation (and the given request) under tight step, output, memory and depth limits. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "xllm/chat.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const char REQUEST[] =
    "{\"messages\": ["
    "{\"role\": \"system\", \"content\": \"Be brief.\"},"
    "{\"role\": \"user\", \"content\": \"Weather in Paris? \\u00e9 \\ud83d\\ude00\"},"
    "{\"role\": \"assistant\", \"content\": null, \"tool_calls\": [{\"id\": \"call12345\", "
    "\"type\": \"function\", \"function\": {\"name\": \"get_weather\", "
    "\"arguments\": {\"city\": \"Paris\", \"days\": 2}}}]},"
    "{\"role\": \"tool\", \"tool_call_id\": \"call12345\", \"content\": \"sunny\"},"
    "{\"role\": \"assistant\", \"content\": \"<think>\\nok\\n</think>\\n\\nSunny.\"},"
    "{\"role\": \"user\", \"content\": \"Thanks\"}],"
    "\"tools\": [{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", "
    "\"description\": \"Get weather\", \"parameters\": {\"type\": \"object\", \"properties\": "
    "{\"city\": {\"type\": \"string\", \"description\": \"City\"}, \"days\": {\"type\": "
    "[\"integer\", \"null\"], \"enum\": [1, 2]}}, \"required\": [\"city\"]}}}],"
    "\"chat_template_kwargs\": {\"enable_thinking\": false, \"date_string\": \"26 Jul 2024\"}}";

static void render(const xllm_chat_template *t, const char *req, size_t n) {
    char err[256];
    char *out = NULL;
    size_t out_n = 0;
    xllm_status st =
        xllm_chat_template_render(t, req, n, "<s>", "</s>", &out, &out_n, err, sizeof(err));
    if (st == XLLM_OK) {
        if (!out || strlen(out) > out_n) __builtin_trap();
    } else if (out) {
        __builtin_trap();
    }
    free(out);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const char *src = (const char *)data;
    size_t tn = size;
    const char *req = NULL;
    size_t rn = 0;
    const char *sep = memmem(data, size, "\n@@@@\n", 6);
    if (sep) {
        tn = (size_t)(sep - src);
        req = sep + 6;
        rn = size - tn - 6;
    }
    xllm_chat_params p = xllm_chat_default_params();
    p.max_steps = 200000;
    p.max_output = 1 << 20;
    p.max_memory = 64 << 20;
    p.max_depth = 100;
    p.now = 1721995200;
    char err[256];
    xllm_chat_template *t = NULL;
    if (xllm_chat_template_new(src, tn, &p, &t, err, sizeof(err)) != XLLM_OK) {
        if (t || !err[0]) __builtin_trap();
        return 0;
    }
    render(t, REQUEST, sizeof(REQUEST) - 1);
    if (req) render(t, req, rn);
    xllm_chat_template_free(t);
    return 0;
}
