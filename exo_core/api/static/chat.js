// exo web chat: plain JavaScript, no build step, talks to this node's OpenAI-compatible API.
"use strict";

const $ = (id) => document.getElementById(id);
const ui = {
  model: $("model"), messages: $("messages"), empty: $("empty"), input: $("input"),
  send: $("send"), stop: $("stop"), stats: $("stats"), nodes: $("nodes"),
  planError: $("plan-error"), apiKey: $("api-key"), keyBox: $("key-box"), composer: $("composer"),
  newChat: $("new-chat"), chat: $("chat"), temperature: $("temperature"),
  downloads: $("downloads"), downloadsBox: $("downloads-box"),
};

const state = {
  history: [],        // [{role, content}] sent with every request (multi-turn)
  controller: null,   // AbortController of the answer being streamed
};

ui.apiKey.value = localStorage.getItem("exo-api-key") || "";
ui.temperature.value = localStorage.getItem("exo-temperature") || ui.temperature.value;
ui.temperature.addEventListener("change", () => localStorage.setItem("exo-temperature", ui.temperature.value));

function temperature() {
  const value = Number.parseFloat(ui.temperature.value);
  return Number.isFinite(value) ? Math.min(Math.max(value, 0), 2) : 0.7;
}
ui.apiKey.addEventListener("change", () => {
  localStorage.setItem("exo-api-key", ui.apiKey.value.trim());
  refresh();
});

function headers(extra = {}) {
  const key = ui.apiKey.value.trim();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (_) { /* not JSON */ }
  return `${response.status} ${response.statusText}`;
}

async function getJSON(path) {
  const response = await fetch(path, { headers: headers() });
  if (response.status === 401) ui.keyBox.open = true;
  if (!response.ok) throw new Error(await errorText(response));
  return response.json();
}

// ---- models and cluster ----------------------------------------------------------------------

async function loadModels() {
  const { data } = await getJSON("/v1/models");
  const previous = ui.model.value || localStorage.getItem("exo-model");
  ui.model.replaceChildren(...data.map((m) => {
    const option = document.createElement("option");
    option.value = m.id;
    const notes = [m.loaded ? "loaded" : null, m.downloaded ? null : "not downloaded"].filter(Boolean);
    option.textContent = notes.length ? `${m.name} (${notes.join(", ")})` : m.name;
    return option;
  }));
  if (data.some((m) => m.id === previous)) ui.model.value = previous;
}

async function loadTopology() {
  const model = ui.model.value;
  const topo = await getJSON(`/v1/topology${model ? `?model=${encodeURIComponent(model)}` : ""}`);
  ui.nodes.replaceChildren(...topo.nodes.map(renderNode));
  ui.planError.hidden = !topo.error;
  ui.planError.textContent = topo.error || "";
}

function renderNode(node) {
  const li = document.createElement("li");
  li.className = "node";
  const id = document.createElement("div");
  id.className = "id";
  id.textContent = node.node_id;
  if (node.self) {
    const self = document.createElement("span");
    self.className = "self";
    self.textContent = " (this node)";
    id.append(self);
  }
  const caps = node.capabilities || {};
  const detail = document.createElement("div");
  detail.className = "detail";
  const memory = caps.memory ? `${(caps.memory / 1024).toFixed(1)} GB` : "? GB";
  detail.textContent = `${node.engine || "?"} · ${caps.chip || "?"} · ${memory} · ${node.active_requests} active`;
  li.append(id, detail);
  const shard = node.shard;
  const layers = document.createElement("div");
  layers.className = "detail";
  if (shard) {
    layers.textContent = `layers ${shard.start_layer}–${shard.end_layer} of ${shard.n_layers}`;
    const bar = document.createElement("div");
    bar.className = "layers";
    const fill = document.createElement("span");
    fill.style.left = `${(100 * shard.start_layer) / shard.n_layers}%`;
    fill.style.width = `${(100 * (shard.end_layer - shard.start_layer + 1)) / shard.n_layers}%`;
    bar.append(fill);
    li.append(layers, bar);
  } else {
    layers.textContent = "no layers of this model";
    li.append(layers);
  }
  return li;
}

async function refresh() {
  try {
    await loadModels();
    await loadTopology();
  } catch (err) {
    ui.planError.hidden = false;
    ui.planError.textContent = String(err.message || err);
  }
}

ui.model.addEventListener("change", () => {
  localStorage.setItem("exo-model", ui.model.value);
  loadTopology().catch(() => {});
});

// ---- downloads --------------------------------------------------------------------------------

function bytes(n) {
  if (n >= 1e9) return `${(n / 1e9).toFixed(2)} GB`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(1)} MB`;
  return `${(n / 1e3).toFixed(0)} kB`;
}

async function loadDownloads() {
  // Every node's downloads (the API gathers them from the peers), newest first.
  const body = await getJSON("/v1/downloads");
  const nodes = body.nodes || [{ node_id: body.node_id, data: body.data }];
  const data = nodes.flatMap((n) => n.data.map((d) => ({ ...d, nodeId: n.node_id })));
  data.sort((a, b) => b.started - a.started);
  ui.downloadsBox.hidden = data.length === 0;
  ui.downloads.replaceChildren(...data.slice(0, 8).map((d) => {
    const li = document.createElement("li");
    li.className = `download ${d.status}`;
    const name = document.createElement("div");
    name.className = "id";
    name.textContent = d.file + (d.layers ? ` · layers ${d.layers}` : "");
    const detail = document.createElement("div");
    detail.className = "detail";
    const rate = d.status === "downloading" ? ` · ${bytes(d.bytes_per_second)}/s` : "";
    detail.textContent =
      `${d.nodeId} ← ${d.source} · ${bytes(d.done)} of ${bytes(d.total)}${rate} · ${d.status}`;
    const bar = document.createElement("div");
    bar.className = "progress";
    const fill = document.createElement("span");
    fill.style.width = `${(100 * d.fraction).toFixed(1)}%`;
    bar.append(fill);
    li.append(name, detail, bar);
    if (d.error) {
      const error = document.createElement("div");
      error.className = "error-text";
      error.textContent = d.error;
      li.append(error);
    }
    return li;
  }));
  return data.some((d) => d.status === "downloading");
}

// ---- conversation ----------------------------------------------------------------------------

// Answers are Markdown: parsed by marked, then sanitised by DOMPurify before they touch the
// DOM (both bundled under /static/vendor, nothing fetched at run time). Links open elsewhere.
if (window.DOMPurify) {
  DOMPurify.addHook("afterSanitizeAttributes", (node) => {
    if (node.tagName === "A") {
      node.setAttribute("target", "_blank");
      node.setAttribute("rel", "noopener noreferrer");
    }
  });
}

function renderAnswer(element, text) {
  if (!window.marked || !window.DOMPurify) {
    element.textContent = text;
    return;
  }
  element.innerHTML = DOMPurify.sanitize(marked.parse(text, { gfm: true, breaks: false }));
}
window.exoRenderAnswer = renderAnswer; // for the page's tests

function addMessage(role, text) {
  ui.empty.hidden = true;
  const div = document.createElement("div");
  div.className = `message ${role}`;
  div.textContent = text;
  ui.messages.append(div);
  scrollDown();
  return div;
}

function scrollDown() {
  ui.chat.scrollTop = ui.chat.scrollHeight;
}

function setBusy(busy) {
  ui.send.hidden = busy;
  ui.stop.hidden = !busy;
  ui.input.disabled = busy;
  ui.model.disabled = busy;
}

function showStats(tokens, firstAt, startedAt, now, done) {
  if (firstAt === null) {
    ui.stats.textContent = "waiting for the first token…";
    return;
  }
  const ttft = (firstAt - startedAt) / 1000;
  const decode = (now - firstAt) / 1000;
  const rate = tokens > 1 && decode > 0 ? (tokens - 1) / decode : 0;
  ui.stats.textContent =
    `${rate.toFixed(1)} tokens/s · ${tokens} tokens · first token ${ttft.toFixed(2)} s${done ? "" : " …"}`;
}

// Server-sent events from a fetch body: yields each `data:` payload as a string.
async function* sseData(response, signal) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart());
        if (data.length) yield data.join("\n");
      }
    }
  } finally {
    if (signal.aborted) reader.cancel().catch(() => {});
  }
}

async function send(text) {
  state.history.push({ role: "user", content: text });
  addMessage("user", text);
  const bubble = addMessage("assistant", "");
  bubble.classList.add("streaming");
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  const startedAt = performance.now();
  let firstAt = null;
  let tokens = 0;
  let answer = "";
  let finish = null;
  let usage = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify({
        model: ui.model.value,
        messages: state.history,
        stream: true,
        stream_options: { include_usage: true },
        temperature: temperature(),
      }),
      signal: controller.signal,
    });
    if (response.status === 401) ui.keyBox.open = true;
    if (!response.ok) throw new Error(await errorText(response));
    showStats(0, null, startedAt, startedAt, false);
    for await (const data of sseData(response, controller.signal)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const piece = choice.delta && choice.delta.content;
        if (piece) {
          if (firstAt === null) firstAt = performance.now();
          tokens += 1; // approximate until usage arrives: a chunk is usually one token
          answer += piece;
          renderAnswer(bubble, answer);
          scrollDown();
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
      showStats(tokens, firstAt, startedAt, performance.now(), false);
    }
    if (usage) tokens = usage.completion_tokens;
    showStats(tokens, firstAt, startedAt, performance.now(), true);
    if (finish === "length") note(bubble, "stopped: the length limit was reached");
  } catch (err) {
    if (controller.signal.aborted) {
      note(bubble, "stopped");
      showStats(tokens, firstAt, startedAt, performance.now(), true);
    } else {
      addMessage("error", String(err.message || err));
    }
  } finally {
    bubble.classList.remove("streaming");
    if (answer) {
      state.history.push({ role: "assistant", content: answer });
    } else {
      state.history.pop(); // nothing came back: let the user retry the same question
      if (!bubble.textContent) bubble.remove();
    }
    state.controller = null;
    setBusy(false);
    ui.input.focus();
    loadTopology().catch(() => {});
  }
}

function note(bubble, text) {
  const span = document.createElement("span");
  span.className = "note";
  span.textContent = text;
  bubble.append(span);
}

ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = ui.input.value.trim();
  if (!text || state.controller) return;
  ui.input.value = "";
  send(text);
});

ui.input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.composer.requestSubmit();
  }
});

ui.stop.addEventListener("click", () => {
  if (state.controller) state.controller.abort();
});

ui.newChat.addEventListener("click", () => {
  if (state.controller) state.controller.abort();
  state.history = [];
  ui.messages.replaceChildren();
  ui.empty.hidden = false;
  ui.stats.textContent = "";
  ui.input.focus();
});

refresh();
setInterval(() => { if (!document.hidden) loadTopology().catch(() => {}); }, 5000);

// Downloads: every second while one runs, else every 5 s.
async function pollDownloads() {
  let active = false;
  try {
    if (!document.hidden) active = await loadDownloads();
  } catch (_) { /* shown by the cluster panel's error */ }
  setTimeout(pollDownloads, active ? 1000 : 5000);
}
pollDownloads();
ui.input.focus();
