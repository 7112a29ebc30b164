// What the page keeps in the browser's localStorage: conversations (an index plus one record each, so that saving
// a streaming answer rewrites one conversation only), settings, unsent drafts and the API key. Nothing here is
// sent anywhere except as part of the requests the user makes.

const PREFIX = "llamaforge.";
const INDEX = PREFIX + "conversations";
const SETTINGS = PREFIX + "settings";
const DRAFTS = PREFIX + "drafts";
const API_KEY = PREFIX + "apiKey";
const record = (id) => `${PREFIX}conversation.${id}`;

export const DEFAULT_SETTINGS = {
  temperature: "0.7",
  top_p: "",
  max_tokens: "",
  seed: "",
  tools: "",
  system: "", // the system prompt a new conversation starts with (the last one used)
  theme: "auto",
  model: "",
};

export class StorageFullError extends Error {
  constructor() {
    super("The browser's storage is full, so the latest changes are not saved: delete old conversations.");
  }
}

function read(key, fallback) {
  const raw = localStorage.getItem(key);
  if (raw == null) return fallback;
  try {
    return JSON.parse(raw);
  } catch {
    console.warn(`llamaforge: ${key} in the browser's storage is not valid JSON; ignored`);
    return fallback;
  }
}

function write(key, value) {
  try {
    localStorage.setItem(key, JSON.stringify(value));
  } catch (error) {
    if (error instanceof DOMException && error.name === "QuotaExceededError") throw new StorageFullError();
    throw error;
  }
}

export function newId() {
  // crypto.randomUUID exists only in secure contexts (not on http://192.168.x.y).
  if (window.isSecureContext && crypto.randomUUID) return crypto.randomUUID();
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** Index entries {id, title, updated}, most recently updated first. */
export function listConversations() {
  const index = read(INDEX, []);
  return (Array.isArray(index) ? index : [])
    .filter((c) => c && typeof c.id === "string")
    .sort((a, b) => b.updated - a.updated);
}

export function loadConversation(id) {
  const conv = read(record(id), null);
  if (!conv || !Array.isArray(conv.messages)) return null;
  return conv;
}

export function newConversation(system = "") {
  const now = Date.now();
  return { id: newId(), title: "New chat", created: now, updated: now, system, messages: [] };
}

/** Write the conversation and its index entry; `touch` moves it to the top of the list. */
export function saveConversation(conv, touch = true) {
  if (touch) conv.updated = Date.now();
  const { id, title, updated } = conv;
  write(record(id), conv);
  const index = listConversations().filter((c) => c.id !== id);
  index.push({ id, title, updated });
  write(INDEX, index);
}

export function deleteConversation(id) {
  localStorage.removeItem(record(id));
  write(
    INDEX,
    listConversations().filter((c) => c.id !== id),
  );
  setDraft(id, "");
}

export function loadSettings() {
  const saved = read(SETTINGS, {});
  return { ...DEFAULT_SETTINGS, ...(saved && typeof saved === "object" ? saved : {}) };
}

export function saveSettings(settings) {
  write(SETTINGS, settings);
}

export function getDraft(id) {
  return read(DRAFTS, {})[id] || "";
}

export function setDraft(id, text) {
  const drafts = read(DRAFTS, {});
  if (text) drafts[id] = text;
  else delete drafts[id];
  write(DRAFTS, drafts);
}

export function getApiKey() {
  return localStorage.getItem(API_KEY) || "";
}

export function setApiKey(key) {
  if (key) localStorage.setItem(API_KEY, key);
  else localStorage.removeItem(API_KEY);
}

export const STORAGE_KEYS = { INDEX, PREFIX };
