// The chat page: keeps the conversation, streams replies from /v1/chat/completions, shows TTFT and tokens/s.
"use strict";

const $ = (id) => document.getElementById(id);
const ui = {
  messages: $("messages"),
  empty: $("empty"),
  composer: $("composer"),
  prompt: $("prompt"),
  send: $("send"),
  stop: $("stop"),
  newChat: $("new-chat"),
  systemPrompt: $("system-prompt"),
  temperature: $("temperature"),
  temperatureValue: $("temperature-value"),
  topP: $("top-p"),
  topPValue: $("top-p-value"),
  maxTokens: $("max-tokens"),
  apiKey: $("api-key"),
  modelName: $("model-name"),
};

const API_KEY_STORAGE = "pagedllm.apiKey";
const conversation = []; // {role, content} of finished turns
let inFlight = null; // the AbortController of the reply being streamed

function headers() {
  const result = { "Content-Type": "application/json" };
  const key = ui.apiKey.value.trim();
  if (key) result.Authorization = `Bearer ${key}`;
  return result;
}

function addMessage(role, text) {
  ui.empty.hidden = true;
  const message = document.createElement("div");
  message.className = `message ${role}`;
  const bubble = document.createElement("div");
  bubble.className = "bubble";
  bubble.textContent = text;
  message.appendChild(bubble);
  ui.messages.appendChild(message);
  scrollToEnd();
  return message;
}

function setStats(message, text) {
  let stats = message.querySelector(".stats");
  if (!stats) {
    stats = document.createElement("div");
    stats.className = "stats";
    message.appendChild(stats);
  }
  stats.textContent = text;
}

function scrollToEnd() {
  ui.messages.scrollTop = ui.messages.scrollHeight;
}

function setBusy(busy) {
  ui.send.hidden = busy;
  ui.stop.hidden = !busy;
  ui.prompt.disabled = busy;
  if (!busy) ui.prompt.focus();
}

function requestBody() {
  const messages = [];
  const system = ui.systemPrompt.value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...conversation);
  const body = {
    messages,
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number(ui.temperature.value),
    top_p: Number(ui.topP.value),
  };
  const maxTokens = parseInt(ui.maxTokens.value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;
  return body;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body.error && body.error.message) return `${response.status}: ${body.error.message}`;
  } catch (_) { /* not JSON */ }
  return `${response.status} ${response.statusText}`;
}

// Yields the JSON payload of each `data:` event of an SSE body until `[DONE]`.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let boundary;
    while ((boundary = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, boundary);
      buffer = buffer.slice(boundary + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

function formatStats({ ttft, tokens, seconds, finish }) {
  const parts = [];
  if (ttft !== null) parts.push(`TTFT ${(ttft / 1000).toFixed(2)} s`);
  if (tokens > 1 && seconds > 0) parts.push(`${((tokens - 1) / seconds).toFixed(1)} tok/s`);
  parts.push(`${tokens} token${tokens === 1 ? "" : "s"}`);
  if (finish) parts.push(finish);
  return parts.join(" · ");
}

async function sendMessage(text) {
  conversation.push({ role: "user", content: text });
  addMessage("user", text);
  const reply = addMessage("assistant", "");
  reply.classList.add("streaming");
  const bubble = reply.querySelector(".bubble");
  const controller = new AbortController();
  inFlight = controller;
  setBusy(true);

  const started = performance.now();
  let firstTokenAt = null;
  let lastTokenAt = null;
  let tokens = 0;
  let finish = null;
  let content = "";
  const show = () => setStats(reply, formatStats({
    ttft: firstTokenAt === null ? null : firstTokenAt - started,
    tokens,
    seconds: firstTokenAt === null ? 0 : (lastTokenAt - firstTokenAt) / 1000,
    finish,
  }));

  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody()), signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) tokens = chunk.usage.completion_tokens;
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) continue;
      if (choice.delta && choice.delta.content) {
        const now = performance.now();
        if (firstTokenAt === null) firstTokenAt = now;
        lastTokenAt = now;
        content += choice.delta.content;
        bubble.textContent = content;
        tokens += 1;
        scrollToEnd();
      }
      if (choice.finish_reason) finish = choice.finish_reason;
      show();
    }
  } catch (error) {
    if (error.name === "AbortError") {
      finish = "stopped";
    } else {
      addMessage("error", String(error.message || error));
    }
  } finally {
    reply.classList.remove("streaming");
    if (content) {
      conversation.push({ role: "assistant", content });
    } else if (finish !== "stopped") {
      reply.remove();
    }
    if (reply.isConnected) show();
    inFlight = null;
    setBusy(false);
  }
}

async function loadModelName() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (!response.ok) {
      ui.modelName.textContent = response.status === 401 ? "needs an API key" : `unavailable (${response.status})`;
      return;
    }
    const body = await response.json();
    ui.modelName.textContent = body.data.map((model) => model.id).join(", ");
  } catch (_) {
    ui.modelName.textContent = "server unreachable";
  }
}

function bindSlider(input, output) {
  const update = () => { output.textContent = Number(input.value).toFixed(2); };
  input.addEventListener("input", update);
  update();
}

function autoGrow() {
  ui.prompt.style.height = "auto";
  ui.prompt.style.height = `${Math.min(ui.prompt.scrollHeight, 200)}px`;
}

ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = ui.prompt.value.trim();
  if (!text || inFlight) return;
  ui.prompt.value = "";
  autoGrow();
  sendMessage(text);
});

ui.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.composer.requestSubmit();
  }
});
ui.prompt.addEventListener("input", autoGrow);

ui.stop.addEventListener("click", () => { if (inFlight) inFlight.abort(); });

ui.newChat.addEventListener("click", () => {
  if (inFlight) inFlight.abort();
  conversation.length = 0;
  for (const message of [...ui.messages.querySelectorAll(".message")]) message.remove();
  ui.empty.hidden = false;
  ui.prompt.focus();
});

ui.apiKey.value = localStorage.getItem(API_KEY_STORAGE) || "";
ui.apiKey.addEventListener("change", () => {
  localStorage.setItem(API_KEY_STORAGE, ui.apiKey.value.trim());
  loadModelName();
});

bindSlider(ui.temperature, ui.temperatureValue);
bindSlider(ui.topP, ui.topPValue);
loadModelName();
ui.prompt.focus();
