// The official openai npm client (pinned in package.json) against xllm serve: a chat and a
// streamed chat on a model with a chat template. Env: XLLM_URL (http://127.0.0.1:PORT), XLLM_KEY.
import OpenAI from "openai";

const client = new OpenAI({
  baseURL: `${process.env.XLLM_URL}/v1`,
  apiKey: process.env.XLLM_KEY || "none",
  maxRetries: 0,
  timeout: 120000,
});
let fails = 0;
function ok(cond, what, detail) {
  console.log(`${cond ? "ok" : "FAIL"} - ${what}${cond ? "" : ": " + JSON.stringify(detail)}`);
  if (!cond) fails++;
}

const messages = [
  { role: "system", content: "You are a poet." },
  { role: "user", content: "Write a haiku about the sea, in Chinese: 大海" },
];

const models = await client.models.list();
const model = models.data[0].id;
ok(model === "qwen3-qwentok-f16", "models.list", models.data);

const chat = await client.chat.completions.create({
  model, messages, max_completion_tokens: 16, temperature: 0,
});
const text = chat.choices[0].message.content;
ok(chat.object === "chat.completion" && typeof text === "string" &&
   chat.choices[0].message.role === "assistant" && chat.usage.completion_tokens >= 1 &&
   ["stop", "length"].includes(chat.choices[0].finish_reason), "chat.completions.create", chat);

const stream = await client.chat.completions.create({
  model, messages, max_completion_tokens: 16, temperature: 0, stream: true,
  stream_options: { include_usage: true },
});
let streamed = "", finish = null, usage = null, chunks = 0;
for await (const chunk of stream) {
  chunks++;
  for (const c of chunk.choices) {
    streamed += c.delta?.content ?? "";
    if (c.finish_reason) finish = c.finish_reason;
  }
  if (chunk.usage) usage = chunk.usage;
}
ok(chunks > 2 && streamed === text && finish === chat.choices[0].finish_reason &&
   usage && usage.completion_tokens === chat.usage.completion_tokens,
   "streamed chat equals the chat", { streamed, text, finish, usage });

// errors surface as the client's typed errors
try {
  await client.chat.completions.create({ model, messages, temperature: "hot" });
  ok(false, "bad request raises");
} catch (e) {
  ok(e instanceof OpenAI.BadRequestError && e.status === 400, "bad request raises BadRequestError",
     String(e));
}
const bad = new OpenAI({ baseURL: `${process.env.XLLM_URL}/v1`, apiKey: "wrong", maxRetries: 0 });
try {
  await bad.models.list();
  ok(!process.env.XLLM_KEY, "no key configured");
} catch (e) {
  ok(e instanceof OpenAI.AuthenticationError && e.status === 401, "wrong key raises 401",
     String(e));
}
console.log(fails ? `${fails} failed` : "all passed");
process.exit(fails ? 1 : 0);
