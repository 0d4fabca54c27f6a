// The chat page of `phiforge serve`: talks to this server's /v1/chat/completions, streaming replies as
// server-sent events. No libraries and nothing fetched from elsewhere, so it works offline.
"use strict";

const $ = (id) => document.getElementById(id);
const conversation = [];  // the turns so far: {role, content}
let model = null;
let controller = null;  // aborts the reply being streamed (the server then stops generating it)

function apiKey() { return sessionStorage.getItem("phiforge-api-key") || ""; }

function headers() {
  const h = { "Content-Type": "application/json" };
  if (apiKey()) h["Authorization"] = "Bearer " + apiKey();
  return h;
}

function status(text) { $("status").textContent = text; }

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;  // never innerHTML: the model's text is not markup
  $("log").appendChild(div);
  $("log").scrollTop = $("log").scrollHeight;
  return div;
}

function needKey(message) {
  $("key-box").hidden = false;
  $("api-key").focus();
  status(message || "This server needs an API key.");
}

async function loadModel() {
  const r = await fetch("/v1/models", { headers: headers() });
  if (r.status === 401) { needKey(); return; }
  const body = await r.json();
  model = body.data[0].id;
  $("model").textContent = model;
  $("key-box").hidden = !apiKey();
  status("");
}

function settings() {
  const req = {
    model, stream: true, stream_options: { include_usage: true },
    temperature: parseFloat($("temperature").value), top_p: parseFloat($("top-p").value),
  };
  const maxTokens = $("max-tokens").value.trim();  // empty: the server's default, what the context leaves
  if (maxTokens !== "") req.max_tokens = parseInt(maxTokens, 10);
  const seed = $("seed").value.trim();
  if (seed !== "") req.seed = parseInt(seed, 10);
  return req;
}

function messages() {
  const system = $("system").value.trim();
  return (system ? [{ role: "system", content: system }] : []).concat(conversation);
}

// Reads "data: {...}\n\n" events from a fetch response body; calls onEvent(parsed JSON) for each.
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onEvent(JSON.parse(data));
      }
    }
  }
}

async function send(text) {
  if (!model) await loadModel();
  if (!model) return;
  conversation.push({ role: "user", content: text });
  bubble("user", text);
  const reply = bubble("assistant", "");
  reply.classList.add("streaming");
  controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  status("generating…");
  let answer = "";
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify({ ...settings(), messages: messages() }),
    });
    if (!r.ok) {
      const err = await r.json().catch(() => ({ error: { message: r.statusText } }));
      if (r.status === 401) needKey(err.error.message);
      throw new Error(err.error.message);
    }
    let finish = null, usage = null;
    await readEvents(r, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        if (choice.delta && choice.delta.content) {
          answer += choice.delta.content;
          reply.textContent = answer;
          $("log").scrollTop = $("log").scrollHeight;
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    });
    conversation.push({ role: "assistant", content: answer });
    status(usage ? `${usage.completion_tokens} tokens (${finish})` : (finish || ""));
  } catch (e) {
    if (e.name === "AbortError") {
      conversation.push({ role: "assistant", content: answer });
      status("stopped");
    } else {
      conversation.pop();  // the user's turn got no answer: let them send it again
      bubble("error", e.message);
      status("");
    }
  } finally {
    reply.classList.remove("streaming");
    reply.dataset.done = "1";
    controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("message").value.trim();
  if (!text || controller) return;
  $("message").value = "";
  send(text);
});
$("message").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", () => { if (controller) controller.abort(); });
$("clear").addEventListener("click", () => { conversation.length = 0; $("log").textContent = ""; status(""); });
$("key-save").addEventListener("click", () => {
  sessionStorage.setItem("phiforge-api-key", $("api-key").value.trim());
  loadModel();
});
for (const [input, out] of [["temperature", "temperature-value"], ["top-p", "top-p-value"]]) {
  $(input).addEventListener("input", () => { $(out).textContent = $(input).value; });
}
loadModel().catch((e) => status("cannot reach the server: " + e.message));
