#!/usr/bin/env python3
"""Generates the expected chat-template renders under tests/data/chat/expected/.

Run once (outputs are committed): scripts/gen-template-refs.py [SHARED_DIR]
Needs Debian's python3-jinja2 (3.1.x). The environment is configured as Hugging Face
transformers configures it in chat_template_utils.py (_compile_jinja_template):
ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]),
a tojson filter that is json.dumps(x, ensure_ascii=False, indent=None, separators=None,
sort_keys=False), and the globals raise_exception (raises TemplateError) and strftime_now.
strftime_now is pinned to NOW (UTC) so renders are reproducible; the C test passes the same
time. Variables are what apply_chat_template passes: messages, tools (None when absent),
documents (None when absent), add_generation_prompt (default True here, as in an OpenAI
request), bos_token / eos_token when the tokenizer has them, then chat_template_kwargs.

For every template T (tests/data/chat/templates.json) and conversation C
(tests/data/chat/*.json) it writes expected/T__C.txt (the exact render) or expected/T__C.err
(the exception jinja2 raised: first line its type, second its message).
"""
import datetime
import glob
import json
import os
import sys

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

NOW = 1721995200  # 2024-07-26 12:00:00 UTC

# name -> (path under the shared folder, bos_token, eos_token); for a tokenizer_config.json
# the template and tokens come from the file (tokens given here are ignored).
TEMPLATES = {
    "command-r-plus-tool_use": ("models/templates/CohereForAI-c4ai-command-r-plus-tool_use.jinja", "<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>"),
    "command-r7b-tool_use": ("models/templates/CohereForAI-c4ai-command-r7b-12-2024-tool_use.jinja", "<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>"),
    "hermes-2-pro-tool_use": ("models/templates/NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use.jinja", "<|begin_of_text|>", "<|im_end|>"),
    "hermes-3-tool_use": ("models/templates/NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja", "<|begin_of_text|>", "<|im_end|>"),
    "qwen2.5-instruct": ("models/templates/Qwen-Qwen2.5-7B-Instruct.jinja", None, "<|im_end|>"),
    "deepseek-r1-distill-llama": ("models/templates/deepseek-ai-DeepSeek-R1-Distill-Llama-8B.jinja", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    "deepseek-r1-distill-qwen": ("models/templates/deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    "firefunction-v2": ("models/templates/fireworks-ai-llama-3-firefunction-v2.jinja", "<|begin_of_text|>", "<|eot_id|>"),
    "gemma-2": ("models/templates/google-gemma-2-2b-it.jinja", "<bos>", "<eos>"),
    "llama-cpp-deepseek-r1": ("models/templates/llama-cpp-deepseek-r1.jinja", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    "functionary-v3.1": ("models/templates/meetkai-functionary-medium-v3.1.jinja", "<|begin_of_text|>", "<|eot_id|>"),
    "functionary-v3.2": ("models/templates/meetkai-functionary-medium-v3.2.jinja", "<|begin_of_text|>", "<|eot_id|>"),
    "llama-3.1": ("models/templates/meta-llama-Llama-3.1-8B-Instruct.jinja", "<|begin_of_text|>", "<|eot_id|>"),
    "llama-3.2": ("models/templates/meta-llama-Llama-3.2-3B-Instruct.jinja", "<|begin_of_text|>", "<|eot_id|>"),
    "llama-3.3": ("models/templates/meta-llama-Llama-3.3-70B-Instruct.jinja", "<|begin_of_text|>", "<|eot_id|>"),
    "phi-3.5": ("models/templates/microsoft-Phi-3.5-mini-instruct.jinja", "<s>", "<|endoftext|>"),
    "mistral-nemo": ("models/templates/mistralai-Mistral-Nemo-Instruct-2407.jinja", "<s>", "</s>"),
    "qwen3": ("models/tokenizers/qwen3/tokenizer_config.json", None, None),
}


def token(cfg, key):
    v = cfg.get(key)
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


def load_template(shared, rel, bos, eos):
    path = os.path.join(shared, rel)
    if rel.endswith(".json"):
        cfg = json.load(open(path, encoding="utf-8"))
        ct = cfg["chat_template"]
        if isinstance(ct, list):
            ct = next(e["template"] for e in ct if e.get("name") == "default")
        return ct, token(cfg, "bos_token"), token(cfg, "eos_token")
    with open(path, encoding="utf-8", newline="") as f:
        return f.read(), bos, eos


def make_env():
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.datetime.fromtimestamp(NOW, datetime.timezone.utc).strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def variables(req, bos, eos):
    v = {
        "messages": req["messages"],
        "tools": req.get("tools"),
        "documents": req.get("documents"),
        "add_generation_prompt": req.get("add_generation_prompt", True),
    }
    if bos is not None:
        v["bos_token"] = bos
    if eos is not None:
        v["eos_token"] = eos
    v.update(req.get("chat_template_kwargs") or {})
    return v


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shared = sys.argv[1] if len(sys.argv) > 1 else os.path.join(root, "..", "shared")
    data = os.path.join(root, "tests", "data", "chat")
    out_dir = os.path.join(data, "expected")
    os.makedirs(out_dir, exist_ok=True)
    for f in glob.glob(os.path.join(out_dir, "*")):
        os.remove(f)
    env = make_env()
    manifest = []
    convs = sorted(glob.glob(os.path.join(data, "*.json")))
    convs = [c for c in convs if not c.endswith("templates.json")]
    counts = {"txt": 0, "err": 0}
    for name, (rel, bos, eos) in TEMPLATES.items():
        src, bos, eos = load_template(shared, rel, bos, eos)
        manifest.append({"name": name, "path": rel, "bos_token": bos, "eos_token": eos})
        tmpl = env.from_string(src)
        for c in convs:
            cname = os.path.basename(c)[:-5]
            req = json.load(open(c, encoding="utf-8"))
            base = os.path.join(out_dir, f"{name}__{cname}")
            try:
                text = tmpl.render(**variables(req, bos, eos))
                with open(base + ".txt", "w", encoding="utf-8", newline="") as f:
                    f.write(text)
                counts["txt"] += 1
            except Exception as e:  # what jinja2 raised: the C side must fail too
                with open(base + ".err", "w", encoding="utf-8", newline="") as f:
                    f.write(f"{type(e).__name__}\n{e}\n")
                counts["err"] += 1
    with open(os.path.join(data, "templates.json"), "w", encoding="utf-8") as f:
        json.dump({"now": NOW, "jinja2": jinja2.__version__, "templates": manifest}, f,
                  ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"{len(manifest)} templates x {len(convs)} conversations: "
          f"{counts['txt']} renders, {counts['err']} raises")


if __name__ == "__main__":
    main()
