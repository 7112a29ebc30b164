// The chat page: conversations (kept by store.js), the composer, streaming answers from the server (api.js) and
// how the page behaves when the server is gone, loading, or says no. Model output is rendered by markdown.js
// into text nodes only.

import { ApiError, NetworkError, health, listModels, streamChat } from "./api.js";
import { copyButton, h, icon } from "./dom.js";
import { renderMarkdown } from "./markdown.js";
import * as store from "./store.js";

const $ = (id) => document.getElementById(id);
const ui = {
  app: $("app"),
  list: $("conversations"),
  newChat: $("new-chat"),
  theme: $("theme"),
  toggleSidebar: $("toggle-sidebar"),
  title: $("conv-title"),
  model: $("model"),
  toggleSettings: $("toggle-settings"),
  banner: $("banner"),
  bannerText: $("banner-text"),
  bannerRetry: $("banner-retry"),
  storageWarning: $("storage-warning"),
  settings: $("settings"),
  settingsForm: $("settings-form"),
  toolsError: $("tools-error"),
  forgetKey: $("forget-key"),
  resetSettings: $("reset-settings"),
  messages: $("messages"),
  empty: $("empty"),
  composer: $("composer"),
  attachments: $("attachments"),
  attach: $("attach"),
  file: $("file"),
  input: $("input"),
  send: $("send"),
  stop: $("stop"),
  keyDialog: $("key-dialog"),
  keyMessage: $("key-message"),
  keyInput: $("key-input"),
};

const UNTITLED = "New chat";
const SAMPLING = ["temperature", "top_p", "max_tokens", "seed", "tools"];

const state = {
  settings: store.loadSettings(),
  conv: null, // the conversation on screen
  live: new Map(), // id -> conversation with a request running or waiting (the object the request writes into)
  runs: new Map(), // id -> {controller, reply}
  waiting: new Set(), // ids of conversations whose request waits for the server to come back
  models: [],
  attachments: [], // data: URLs of images for the next message
  editing: null, // id of the message being edited
};

// Conversations ----------------------------------------------------------------------------------------------
function draftKey(conv) {
  return conv.messages.length ? conv.id : "new"; // an unsaved new chat keeps its draft under "new"
}

function persist(conv, touch = true) {
  if (conv.deleted) return;
  try {
    store.saveConversation(conv, touch);
    ui.storageWarning.hidden = true;
  } catch (error) {
    ui.storageWarning.textContent =
      error instanceof store.StorageFullError ? error.message : `Not saved: ${error.message}`;
    ui.storageWarning.hidden = false;
  }
  renderSidebar();
}

// While an answer streams it is saved about once a second, so that a reload keeps what had arrived.
const saveTimers = new Map(); // conversation id -> timer
function saveSoon(conv) {
  if (saveTimers.has(conv.id)) return;
  saveTimers.set(
    conv.id,
    setTimeout(() => {
      saveTimers.delete(conv.id);
      persist(conv);
    }, 1000),
  );
}

function saveDraft() {
  if (state.conv.deleted) return;
  try {
    store.setDraft(draftKey(state.conv), ui.input.value);
  } catch (error) {
    ui.storageWarning.textContent = error.message;
    ui.storageWarning.hidden = false;
  }
}

function openConversation(id) {
  if (state.conv) saveDraft();
  const conv = state.live.get(id) ?? store.loadConversation(id);
  if (conv) show(conv);
  else startNewConversation(); // gone (deleted in another tab) or unreadable
}

function startNewConversation() {
  if (state.conv) saveDraft();
  show(store.newConversation(state.settings.system));
}

function show(conv) {
  state.conv = conv;
  state.editing = null;
  ui.input.value = store.getDraft(draftKey(conv));
  autosize();
  fillSettingsForm();
  renderSidebar();
  renderMessages(true);
  if (window.matchMedia("(max-width: 800px)").matches) ui.app.classList.remove("show-sidebar");
  ui.input.focus();
}

function titleOf(text) {
  const line = text.trim().split("\n")[0] || "Image";
  return line.length > 48 ? `${line.slice(0, 47)}…` : line;
}

function removeConversation(id) {
  const entry = store.listConversations().find((c) => c.id === id);
  if (!window.confirm(`Delete the conversation "${entry ? entry.title : id}"? This cannot be undone.`)) return;
  const live = state.live.get(id);
  if (live) live.deleted = true;
  state.runs.get(id)?.controller.abort();
  state.waiting.delete(id);
  state.live.delete(id);
  store.deleteConversation(id);
  if (state.conv?.id === id) {
    state.conv.deleted = true;
    const next = store.listConversations()[0];
    if (next) openConversation(next.id);
    else startNewConversation();
  } else {
    renderSidebar();
  }
}

function renderSidebar() {
  const entries = store.listConversations();
  const items = entries.map((entry) => {
    const active = state.conv && entry.id === state.conv.id;
    const item = h("li", { class: active ? "active" : "", dataset: { id: entry.id } });
    const open = h(
      "button",
      { type: "button", class: "open", title: entry.title, onclick: () => openConversation(entry.id) },
      h("span", { class: "conv-name" }, entry.title),
      state.runs.has(entry.id) ? h("span", { class: "busy", title: "answering" }) : null,
      h("small", {}, when(entry.updated)),
    );
    const rename = h(
      "button",
      { type: "button", class: "ghost icon-only rename", title: "Rename", "aria-label": "Rename" },
      icon("pencil"),
    );
    const remove = h(
      "button",
      { type: "button", class: "ghost icon-only delete", title: "Delete", "aria-label": "Delete" },
      icon("trash"),
    );
    rename.addEventListener("click", () => startRename(item, entry));
    remove.addEventListener("click", () => removeConversation(entry.id));
    item.append(open, rename, remove);
    return item;
  });
  ui.list.replaceChildren(...items);
  const title = state.conv ? state.conv.title : UNTITLED;
  ui.title.textContent = title;
  document.title = `${title} · llamaforge`;
}

function startRename(item, entry) {
  const input = h("input", { type: "text", class: "rename-input", "aria-label": "New name" });
  input.value = entry.title;
  let done = false;
  const finish = (save) => {
    if (done) return;
    done = true;
    const name = input.value.trim();
    if (save && name && name !== entry.title) {
      const conv =
        state.live.get(entry.id) ?? (state.conv?.id === entry.id ? state.conv : store.loadConversation(entry.id));
      if (conv) {
        conv.title = name;
        persist(conv, false);
      }
    }
    renderSidebar();
  };
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter") finish(true);
    if (event.key === "Escape") finish(false);
  });
  input.addEventListener("blur", () => finish(true));
  item.replaceChildren(input);
  input.focus();
  input.select();
}

function when(ms) {
  const date = new Date(ms);
  const today = new Date().toDateString() === date.toDateString();
  return today
    ? date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
    : date.toLocaleDateString([], { month: "short", day: "numeric" });
}

// Messages -----------------------------------------------------------------------------------------------------
const views = new Map(); // message id -> {root, body, meta}

function nearBottom() {
  const el = ui.messages;
  return el.scrollHeight - el.scrollTop - el.clientHeight < 80;
}

function scrollToBottom() {
  ui.messages.scrollTop = ui.messages.scrollHeight;
}

function renderMessages(forceScroll = false) {
  const stick = forceScroll || nearBottom();
  views.clear();
  const conv = state.conv;
  const nodes = conv.messages.map((msg, index) => messageView(conv, msg, index));
  ui.empty.hidden = conv.messages.length > 0;
  ui.messages.replaceChildren(ui.empty, ...nodes);
  const form = toolResultForm(conv);
  if (form) ui.messages.append(form);
  updateComposer();
  if (stick) scrollToBottom();
}

/** Re-render `conv` if it is on screen. */
function refresh(conv) {
  renderSidebar();
  if (conv === state.conv) renderMessages();
}

function messageView(conv, msg, index) {
  const root = h("article", { class: `msg ${msg.role}`, dataset: { id: msg.id, role: msg.role } });
  const label = { user: "You", assistant: "Assistant", tool: "Tool" }[msg.role] ?? msg.role;
  const body = h("div", { class: "body" });
  const meta = h("div", { class: "meta" });
  root.append(h("div", { class: "who" }, label), body, meta);
  views.set(msg.id, { root, body, meta });
  if (state.editing === msg.id) {
    body.append(editor(conv, msg, index));
  } else {
    fillBody(body, conv, msg);
    fillMeta(meta, conv, msg, index);
  }
  if (msg.error) {
    const retry =
      index === conv.messages.length - 1 && msg.role !== "assistant" && !busy(conv)
        ? h("button", { type: "button", class: "ghost", onclick: () => generate(conv) }, icon("retry"), "Retry")
        : null;
    root.append(h("div", { class: "error", role: "alert" }, h("span", {}, msg.error), retry));
  } else if (msg.role !== "assistant" && index === conv.messages.length - 1 && state.waiting.has(conv.id)) {
    root.append(h("div", { class: "notice" }, "Not sent yet: waiting for the server to come back. It is sent then."));
  }
  return root;
}

function busy(conv) {
  return state.runs.has(conv.id) || state.waiting.has(conv.id);
}

function fillBody(body, conv, msg) {
  body.replaceChildren();
  if (msg.role === "user") {
    const images = (msg.images ?? []).filter((src) => typeof src === "string" && src.startsWith("data:image/"));
    if (images.length)
      body.append(
        h(
          "div",
          { class: "images" },
          images.map((src) => h("img", { src, alt: "attached image" })),
        ),
      );
    if (msg.content) body.append(h("div", { class: "text" }, msg.content));
  } else if (msg.role === "tool") {
    body.append(
      h(
        "details",
        { class: "tool-result" },
        h("summary", {}, h("span", { class: "tag" }, "tool result"), ` ${msg.name ?? ""}`),
        h("pre", {}, msg.content),
      ),
    );
  } else {
    if (msg.content) body.append(renderMarkdown(msg.content));
    for (const call of msg.tool_calls ?? []) body.append(toolCallView(call));
    if (!msg.content && !msg.tool_calls?.length) {
      const running = state.runs.get(conv.id)?.reply === msg;
      body.append(
        running
          ? h("span", { class: "thinking", "aria-label": "waiting for the answer" }, "…")
          : h("span", { class: "muted" }, "(an empty answer)"),
      );
    }
  }
}

function toolCallView(call) {
  const fn = call.function ?? {};
  let args = fn.arguments ?? "";
  try {
    args = JSON.stringify(JSON.parse(args), null, 2);
  } catch {
    // still streaming, or not JSON: show it as it came
  }
  return h(
    "details",
    { class: "tool-call" },
    h("summary", {}, h("span", { class: "tag" }, "tool call"), ` ${fn.name || "(no name yet)"}`),
    h("pre", {}, args || "(no arguments)"),
  );
}

function fillMeta(meta, conv, msg, index) {
  meta.replaceChildren();
  const last = index === conv.messages.length - 1;
  const running = state.runs.get(conv.id)?.reply === msg;
  if (msg.role === "assistant") {
    const stats = statsText(msg.stats);
    if (stats) meta.append(h("span", { class: "stats" }, stats));
    if (running) return;
    meta.append(copyButton(() => msg.content ?? ""));
  }
  if (busy(conv) || msg.role === "tool") return;
  meta.append(
    h("button", { type: "button", class: "ghost edit", onclick: () => startEdit(msg) }, icon("pencil"), "Edit"),
  );
  if (msg.role === "assistant" && last) {
    meta.append(
      h(
        "button",
        { type: "button", class: "ghost regenerate", onclick: () => regenerate(conv, index) },
        icon("retry"),
        "Regenerate",
      ),
    );
  }
  if (msg.role === "user" && last && !msg.error) {
    meta.append(
      h("button", { type: "button", class: "ghost", onclick: () => generate(conv) }, icon("send"), "Get an answer"),
    );
  }
}

function statsText(stats) {
  if (!stats) return "";
  const parts = [];
  if (stats.completion_tokens != null) parts.push(`${stats.completion_tokens} tokens`);
  if (stats.tps != null) parts.push(`${stats.tps.toFixed(1)} tok/s`);
  if (stats.prompt_tokens != null) parts.push(`prompt ${stats.prompt_tokens} tokens`);
  if (stats.ttft != null) parts.push(`first token after ${stats.ttft.toFixed(2)} s`);
  if (stats.finish === "length") parts.push("cut off at the token limit");
  if (stats.stopped) parts.push(`stopped after ${stats.seconds.toFixed(1)} s`);
  return parts.join(" · ");
}

function startEdit(msg) {
  state.editing = msg.id;
  renderMessages();
  views.get(msg.id)?.root.querySelector("textarea")?.focus();
}

function editor(conv, msg, index) {
  const area = h("textarea", {
    class: "edit-area",
    rows: Math.min(12, (msg.content ?? "").split("\n").length + 1),
    "aria-label": "Edit the message",
  });
  area.value = msg.content ?? "";
  const cancel = () => {
    state.editing = null;
    renderMessages();
  };
  const save = () => {
    state.editing = null;
    msg.content = area.value;
    delete msg.error;
    if (msg.role === "user") {
      conv.messages.splice(index + 1); // the answers to the old text go
      persist(conv);
      renderMessages();
      generate(conv);
    } else {
      persist(conv);
      renderMessages();
    }
  };
  area.addEventListener("keydown", (event) => {
    if (event.key === "Escape") cancel();
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) save();
  });
  return h(
    "div",
    { class: "editor" },
    area,
    h(
      "div",
      { class: "row" },
      h("button", { type: "button", class: "ghost", onclick: cancel }, "Cancel"),
      h("button", { type: "button", class: "primary", onclick: save }, msg.role === "user" ? "Save and send" : "Save"),
    ),
  );
}

function regenerate(conv, index) {
  conv.messages.splice(index);
  persist(conv);
  renderMessages();
  generate(conv);
}

// After an answer that calls tools: one field per call for its result, sent back as role "tool" messages.
function toolResultForm(conv) {
  const last = conv.messages.at(-1);
  if (!last || last.role !== "assistant" || !last.tool_calls?.length || busy(conv)) return null;
  const fields = last.tool_calls.map((call) => {
    const area = h("textarea", { rows: 2, placeholder: "the tool's result (text or JSON)" });
    return { call, area, label: h("label", {}, `Result of ${call.function?.name || "the tool"}`, area) };
  });
  const send = () => {
    for (const { call, area } of fields) {
      conv.messages.push({
        id: store.newId(),
        role: "tool",
        tool_call_id: call.id,
        name: call.function?.name,
        content: area.value,
      });
    }
    persist(conv);
    renderMessages();
    generate(conv);
  };
  return h(
    "div",
    { class: "tool-results" },
    fields.map((f) => f.label),
    h("button", { type: "button", class: "primary", onclick: send }, "Send the tool results"),
  );
}

// Live updates of the answer being streamed, at most once per frame.
const pending = new Map();
function scheduleRender(conv, reply) {
  if (conv !== state.conv || pending.has(reply.id)) return;
  pending.set(
    reply.id,
    requestAnimationFrame(() => {
      pending.delete(reply.id);
      const view = views.get(reply.id);
      if (!view || conv !== state.conv) return;
      const stick = nearBottom();
      fillBody(view.body, conv, reply);
      if (stick) scrollToBottom();
    }),
  );
}

// Talking to the server ----------------------------------------------------------------------------------------
function numberSetting(name, integer) {
  const raw = String(state.settings[name] ?? "").trim();
  if (!raw) return undefined;
  const value = Number(raw);
  if (!Number.isFinite(value) || (integer && !Number.isInteger(value))) {
    throw new Error(`Settings: ${name} must be ${integer ? "a whole number" : "a number"}, got "${raw}".`);
  }
  return value;
}

function toolsSetting() {
  const raw = String(state.settings.tools ?? "").trim();
  if (!raw) return undefined;
  let tools;
  try {
    tools = JSON.parse(raw);
  } catch (error) {
    throw new Error(`Settings: tools is not valid JSON (${error.message}).`);
  }
  if (!Array.isArray(tools)) throw new Error("Settings: tools must be a JSON list of tool definitions.");
  return tools;
}

function requestBody(conv) {
  const messages = [];
  if (conv.system?.trim()) messages.push({ role: "system", content: conv.system });
  for (const m of conv.messages) {
    if (m.role === "user") {
      const images = m.images ?? [];
      const content = images.length
        ? [{ type: "text", text: m.content ?? "" }, ...images.map((url) => ({ type: "image_url", image_url: { url } }))]
        : (m.content ?? "");
      messages.push({ role: "user", content });
    } else if (m.role === "assistant") {
      const out = { role: "assistant", content: m.content ?? "" };
      if (m.tool_calls?.length) {
        out.tool_calls = m.tool_calls.map((c) => ({
          id: c.id,
          type: c.type || "function",
          function: { name: c.function?.name ?? "", arguments: c.function?.arguments ?? "" },
        }));
      }
      messages.push(out);
    } else if (m.role === "tool") {
      messages.push({ role: "tool", tool_call_id: m.tool_call_id, content: m.content ?? "" });
    }
  }
  const body = { messages, stream: true, stream_options: { include_usage: true } };
  const model = currentModel();
  if (model) body.model = model;
  const sampling = {
    temperature: numberSetting("temperature", false),
    top_p: numberSetting("top_p", false),
    max_tokens: numberSetting("max_tokens", true),
    seed: numberSetting("seed", true),
    tools: toolsSetting(),
  };
  for (const [key, value] of Object.entries(sampling)) if (value !== undefined) body[key] = value;
  return body;
}

function mergeToolCalls(reply, deltas) {
  reply.tool_calls ??= [];
  for (const delta of deltas) {
    const index = Number.isInteger(delta.index) ? delta.index : reply.tool_calls.length;
    const call = (reply.tool_calls[index] ??= { id: "", type: "function", function: { name: "", arguments: "" } });
    if (delta.id) call.id = delta.id;
    if (delta.type) call.type = delta.type;
    if (delta.function?.name) call.function.name += delta.function.name;
    if (delta.function?.arguments) call.function.arguments += delta.function.arguments;
  }
}

function describe(error) {
  if (error instanceof ApiError) return `The server answered ${error.status}: ${error.message}`;
  return error.message || String(error);
}

/** Ask for an answer to the conversation's last message and stream it in. */
async function generate(conv) {
  if (state.runs.has(conv.id) || conv.deleted) return;
  const cause = conv.messages.at(-1);
  if (!cause || cause.role === "assistant") return;
  delete cause.error;
  state.waiting.delete(conv.id);
  state.live.set(conv.id, conv);
  if (!state.models.length && connection.state === "ok") await loadModels(false); // a 401 is handled below
  let body;
  try {
    body = requestBody(conv);
  } catch (error) {
    cause.error = error.message;
    finishRun(conv);
    return;
  }
  const controller = new AbortController();
  const reply = { id: store.newId(), role: "assistant", content: "" };
  conv.messages.push(reply);
  state.runs.set(conv.id, { controller, reply });
  refresh(conv);
  const started = performance.now();
  let first = null;
  let usage = null;
  let finish = null;
  let failure = null;
  try {
    for await (const chunk of streamChat(body, controller.signal)) {
      if (chunk.usage) usage = chunk.usage;
      const choice = chunk.choices?.[0];
      if (!choice) continue;
      const delta = choice.delta ?? {};
      let grew = false;
      if (typeof delta.content === "string" && delta.content) {
        reply.content += delta.content;
        grew = true;
      }
      if (Array.isArray(delta.tool_calls) && delta.tool_calls.length) {
        mergeToolCalls(reply, delta.tool_calls);
        grew = true;
      }
      if (grew) {
        first ??= performance.now();
        scheduleRender(conv, reply);
        saveSoon(conv);
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
  } catch (error) {
    failure = error;
  }
  const seconds = (performance.now() - started) / 1000;
  state.runs.delete(conv.id);
  const stopped = controller.signal.aborted;
  if (!reply.content && !reply.tool_calls?.length && (failure || stopped)) {
    conv.messages.pop(); // nothing came: the message that asked carries the outcome
    if (!stopped) handleFailure(conv, cause, failure);
  } else {
    const n = usage?.completion_tokens;
    const decode = first != null ? seconds - (first - started) / 1000 : 0;
    reply.stats = {
      completion_tokens: n ?? null,
      prompt_tokens: usage?.prompt_tokens ?? null,
      tps: n > 1 && decode >= 0.005 ? (n - 1) / decode : null, // tokens that arrived in one burst have no rate
      ttft: first != null ? (first - started) / 1000 : null,
      seconds,
      finish,
      stopped,
    };
    if (failure && !stopped) {
      reply.error = `${describe(failure)} The answer is incomplete.`;
      if (failure instanceof NetworkError) connection.check();
    }
  }
  finishRun(conv);
}

function finishRun(conv) {
  clearTimeout(saveTimers.get(conv.id));
  saveTimers.delete(conv.id);
  if (!state.waiting.has(conv.id)) state.live.delete(conv.id);
  persist(conv);
  refresh(conv);
}

function handleFailure(conv, cause, error) {
  if (error instanceof ApiError && error.status === 401) {
    cause.error = `The server needs an API key: ${error.message}`;
    askKey(
      store.getApiKey() ? `The server did not accept the saved key: ${error.message}` : "This server needs an API key.",
    ).then((ok) => ok && generate(conv));
  } else if (error instanceof NetworkError || (error instanceof ApiError && [502, 503, 504].includes(error.status))) {
    state.waiting.add(conv.id); // sent again when /health says the server is back
    state.live.set(conv.id, conv);
    connection.check();
  } else {
    cause.error = describe(error);
  }
}

function stop() {
  state.runs.get(state.conv.id)?.controller.abort();
}

function currentModel() {
  const ids = state.models.map((m) => m.id);
  return ids.includes(state.settings.model) ? state.settings.model : ids[0];
}

async function loadModels(askForKey = true) {
  try {
    state.models = await listModels();
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) {
      if (!askForKey) return;
      const message = store.getApiKey()
        ? `The server did not accept the saved key: ${error.message}`
        : "This server needs an API key (the one it was started with, --api-key or LLAMAFORGE_API_KEY).";
      if (await askKey(message)) return loadModels();
      ui.model.textContent = "no API key";
    } else if (error instanceof NetworkError || (error instanceof ApiError && error.status >= 500)) {
      connection.check();
    } else {
      ui.model.textContent = describe(error);
    }
    return;
  }
  renderModel();
}

function renderModel() {
  const model = currentModel();
  if (state.models.length > 1) {
    const select = h(
      "select",
      { "aria-label": "Model", onchange: (event) => saveSetting("model", event.target.value) },
      state.models.map((m) => h("option", { value: m.id, selected: m.id === model }, m.id)),
    );
    ui.model.replaceChildren(select);
  } else {
    const card = state.models[0];
    ui.model.textContent = card ? `${card.id}${card.max_model_len ? ` · context ${card.max_model_len}` : ""}` : "";
  }
}

let keyRequest = null;
/** Show the API key dialog; resolves true once a key was saved. */
function askKey(message) {
  if (keyRequest) return keyRequest;
  keyRequest = new Promise((resolve) => {
    ui.keyMessage.textContent = message;
    ui.keyInput.value = "";
    ui.keyDialog.returnValue = "";
    ui.keyDialog.addEventListener(
      "close",
      () => {
        keyRequest = null;
        const key = ui.keyInput.value.trim();
        if (ui.keyDialog.returnValue === "save" && key) {
          store.setApiKey(key);
          resolve(true);
        } else {
          resolve(false);
        }
      },
      { once: true },
    );
    ui.keyDialog.showModal();
    ui.keyInput.focus();
  });
  return keyRequest;
}

// Whether the server is up: checked at start and whenever a request could not reach it; while it is down,
// loading or restarting, the banner says so and the check repeats (1 s, 2 s, 4 s, then every 8 s).
const connection = {
  state: "unknown",
  timer: null,
  ticker: null,
  delay: 1000,
  retryAt: 0,
  message: "",
  checking: false,

  async check() {
    if (this.checking) return;
    this.checking = true;
    clearTimeout(this.timer);
    const result = await health();
    this.checking = false;
    this.state = result.state;
    this.message = result.message;
    if (result.state === "ok") {
      this.delay = 1000;
      clearInterval(this.ticker);
      this.ticker = null;
      ui.banner.hidden = true;
      if (!state.models.length) await loadModels();
      for (const id of [...state.waiting]) {
        const conv = state.live.get(id);
        state.waiting.delete(id);
        if (conv) generate(conv);
      }
      return;
    }
    this.retryAt = Date.now() + this.delay;
    this.timer = setTimeout(() => this.check(), this.delay);
    this.delay = Math.min(this.delay * 2, 8000);
    this.ticker ??= setInterval(() => this.showBanner(), 500);
    this.showBanner();
    if (state.conv) refresh(state.conv);
  },

  showBanner() {
    const seconds = Math.max(0, Math.ceil((this.retryAt - Date.now()) / 1000));
    const again = seconds ? `Trying again in ${seconds} s.` : "Trying again now.";
    const waiting = state.waiting.size ? " Your message is kept and sent when it is back." : "";
    const text = {
      down: `Cannot reach the server (${this.message}): it may be down or restarting. ${again}${waiting}`,
      loading: `The server is loading its model. ${again}${waiting}`,
      failed: `The server cannot answer: ${this.message}. ${again}`,
    }[this.state];
    ui.bannerText.textContent = text ?? "";
    ui.banner.dataset.state = this.state;
    ui.banner.hidden = !text;
  },
};

// The composer ---------------------------------------------------------------------------------------------------
function autosize() {
  ui.input.style.height = "auto";
  ui.input.style.height = `${Math.min(ui.input.scrollHeight, 240)}px`;
}

function updateComposer() {
  const running = state.conv && state.runs.has(state.conv.id);
  ui.send.hidden = !!running;
  ui.stop.hidden = !running;
}

function send() {
  const conv = state.conv;
  const text = ui.input.value;
  if ((!text.trim() && !state.attachments.length) || state.runs.has(conv.id)) return;
  const wasNew = !conv.messages.length;
  const message = { id: store.newId(), role: "user", content: text };
  if (state.attachments.length) message.images = state.attachments.splice(0);
  conv.messages.push(message);
  if (wasNew || conv.title === UNTITLED) conv.title = titleOf(text);
  ui.input.value = "";
  autosize();
  try {
    store.setDraft(wasNew ? "new" : conv.id, "");
  } catch {
    // the draft stays; the message itself is saved below (or the warning says why not)
  }
  persist(conv);
  renderAttachments();
  renderMessages(true);
  generate(conv);
}

function addImages(files) {
  for (const file of files) {
    if (!file.type.startsWith("image/")) continue;
    const reader = new FileReader();
    reader.addEventListener("load", () => {
      if (typeof reader.result === "string" && reader.result.startsWith("data:image/")) {
        state.attachments.push(reader.result);
        renderAttachments();
      }
    });
    reader.readAsDataURL(file);
  }
}

function renderAttachments() {
  ui.attachments.hidden = !state.attachments.length;
  ui.attachments.replaceChildren(
    ...state.attachments.map((src, i) =>
      h(
        "div",
        { class: "attachment" },
        h("img", { src, alt: "image to send" }),
        h(
          "button",
          {
            type: "button",
            class: "remove",
            title: "Remove",
            "aria-label": "Remove the image",
            onclick: () => {
              state.attachments.splice(i, 1);
              renderAttachments();
            },
          },
          icon("close"),
        ),
      ),
    ),
  );
}

// Settings ---------------------------------------------------------------------------------------------------------
function fillSettingsForm() {
  const form = ui.settingsForm.elements;
  for (const name of SAMPLING) form[name].value = state.settings[name] ?? "";
  form.system.value = state.conv?.system ?? state.settings.system;
  checkTools();
}

function saveSetting(name, value) {
  state.settings[name] = value;
  try {
    store.saveSettings(state.settings);
  } catch (error) {
    ui.storageWarning.textContent = error.message;
    ui.storageWarning.hidden = false;
  }
}

function checkTools() {
  try {
    toolsSetting();
    ui.toolsError.hidden = true;
  } catch (error) {
    ui.toolsError.textContent = error.message.replace(/^Settings: /, "");
    ui.toolsError.hidden = false;
  }
}

function applyTheme() {
  const theme = state.settings.theme;
  if (theme === "light" || theme === "dark") document.documentElement.dataset.theme = theme;
  else delete document.documentElement.dataset.theme;
  ui.theme.replaceChildren(icon("theme"), ` Theme: ${theme === "light" || theme === "dark" ? theme : "auto"}`);
}

// Wiring -------------------------------------------------------------------------------------------------------------
function wire() {
  ui.toggleSidebar.append(icon("menu"));
  ui.attach.append(icon("image"));
  ui.newChat.prepend(icon("plus"));
  ui.send.prepend(icon("send"));
  ui.stop.prepend(icon("stop"));
  ui.toggleSettings.prepend(icon("settings"));

  ui.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  ui.input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    } else if (event.key === "Escape") {
      stop();
    }
  });
  ui.input.addEventListener("input", () => {
    autosize();
    saveDraft();
  });
  ui.input.addEventListener("paste", (event) => {
    const files = [...(event.clipboardData?.files ?? [])].filter((f) => f.type.startsWith("image/"));
    if (files.length) {
      event.preventDefault();
      addImages(files);
    }
  });
  ui.composer.addEventListener("dragover", (event) => event.preventDefault());
  ui.composer.addEventListener("drop", (event) => {
    event.preventDefault();
    addImages(event.dataTransfer?.files ?? []);
  });
  ui.attach.addEventListener("click", () => ui.file.click());
  ui.file.addEventListener("change", () => {
    addImages(ui.file.files);
    ui.file.value = "";
  });
  ui.stop.addEventListener("click", stop);
  ui.newChat.addEventListener("click", startNewConversation);
  ui.bannerRetry.addEventListener("click", () => {
    connection.delay = 1000;
    connection.check();
  });
  document.querySelector("main").addEventListener("click", (event) => {
    // On a narrow screen the list lies over the chat: a click beside it closes it.
    if (ui.app.classList.contains("show-sidebar") && !ui.toggleSidebar.contains(event.target)) {
      ui.app.classList.remove("show-sidebar");
    }
  });
  ui.toggleSidebar.addEventListener("click", () => {
    const narrow = window.matchMedia("(max-width: 800px)").matches;
    ui.app.classList.toggle(narrow ? "show-sidebar" : "hide-sidebar");
  });
  ui.toggleSettings.addEventListener("click", () => {
    ui.settings.hidden = !ui.settings.hidden;
    ui.toggleSettings.setAttribute("aria-expanded", String(!ui.settings.hidden));
    if (!ui.settings.hidden) fillSettingsForm();
  });
  ui.settingsForm.addEventListener("submit", (event) => event.preventDefault());
  ui.settingsForm.addEventListener("input", (event) => {
    const { name, value } = event.target;
    if (name === "system") {
      saveSetting("system", value);
      state.conv.system = value;
      if (state.conv.messages.length) persist(state.conv, false);
    } else if (SAMPLING.includes(name)) {
      saveSetting(name, value);
      if (name === "tools") checkTools();
    }
  });
  ui.resetSettings.addEventListener("click", () => {
    for (const name of SAMPLING) saveSetting(name, store.DEFAULT_SETTINGS[name]);
    fillSettingsForm();
  });
  ui.forgetKey.addEventListener("click", () => {
    store.setApiKey("");
    ui.forgetKey.textContent = "API key forgotten";
    setTimeout(() => (ui.forgetKey.textContent = "Forget the API key"), 1500);
  });
  ui.theme.addEventListener("click", () => {
    const order = ["auto", "light", "dark"];
    saveSetting("theme", order[(order.indexOf(state.settings.theme) + 1) % order.length]);
    applyTheme();
  });
  ui.keyDialog.addEventListener("cancel", () => (ui.keyDialog.returnValue = "cancel"));
  window.addEventListener("storage", (event) => {
    if (event.key === store.STORAGE_KEYS.INDEX) renderSidebar(); // another tab changed the list
  });
  window.addEventListener("online", () => connection.check());
}

function start() {
  wire();
  applyTheme();
  const recent = store.listConversations()[0];
  if (recent && !store.getDraft("new")) openConversation(recent.id);
  else startNewConversation();
  connection.check();
}

start();
