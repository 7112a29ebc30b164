// The server, as any OpenAI client sees it: GET /v1/models, POST /v1/chat/completions (streamed as server-sent
// events) and GET /health (up, loading, or gone). The API key, when the user gave one, goes in the Authorization
// header; a 401 tells the page to ask for it.

import { getApiKey } from "./store.js";

/** The server answered with an error (OpenAI's {"error": {"message", "type", "param", "code"}}). */
export class ApiError extends Error {
  constructor(status, message, error = {}) {
    super(message);
    this.status = status;
    this.code = error.code ?? null;
    this.param = error.param ?? null;
    this.type = error.type ?? null;
  }
}

/** The server could not be reached (down, restarting, or the connection broke); `reason` says what the browser saw. */
export class NetworkError extends Error {
  constructor(message, reason = message) {
    super(message);
    this.reason = reason;
  }
}

function headers(json = false) {
  const out = {};
  if (json) out["Content-Type"] = "application/json";
  const key = getApiKey();
  if (key) out.Authorization = `Bearer ${key}`;
  return out;
}

async function errorFrom(response) {
  const text = await response.text().catch(() => "");
  let error = {};
  try {
    error = JSON.parse(text).error ?? {};
  } catch {
    // not JSON (a proxy's error page, say): keep its text
  }
  const message = typeof error.message === "string" && error.message ? error.message : text.trim().slice(0, 500);
  return new ApiError(response.status, message || response.statusText || `HTTP ${response.status}`, error);
}

async function call(path, options = {}) {
  let response;
  try {
    response = await fetch(path, { cache: "no-store", ...options });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new NetworkError(`Cannot reach the server (${error.message}).`, error.message);
  }
  if (!response.ok) throw await errorFrom(response);
  return response;
}

export async function listModels() {
  const response = await call("/v1/models", { headers: headers() });
  const body = await response.json();
  return Array.isArray(body.data) ? body.data : [];
}

/** {state: "ok" | "loading" | "failed" | "down", message} */
export async function health() {
  try {
    await call("/health");
    return { state: "ok", message: "" };
  } catch (error) {
    if (error instanceof ApiError) {
      if (error.code === "model_loading") return { state: "loading", message: error.message };
      if (error.code === "load_failed") return { state: "failed", message: error.message };
      if (error.code === "shutting_down") return { state: "down", message: "it is shutting down" };
      return { state: "down", message: `it answered ${error.status}: ${error.message}` };
    }
    return { state: "down", message: error.reason ?? error.message };
  }
}

/** Yield the chunks of a streamed chat completion; ends at [DONE]. Abort with `signal` to stop it. */
export async function* streamChat(body, signal) {
  const response = await call("/v1/chat/completions", {
    method: "POST",
    headers: headers(true),
    body: JSON.stringify({ ...body, stream: true }),
    signal,
  });
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      let chunk;
      try {
        chunk = await reader.read();
      } catch (error) {
        if (error.name === "AbortError" || signal?.aborted) throw error;
        const reason = error.message;
        throw new NetworkError(`The connection to the server broke while the answer streamed (${reason}).`, reason);
      }
      if (chunk.done) break;
      buffer += decoder.decode(chunk.value, { stream: true });
      let end;
      while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
        const data = event
          .split(/\r?\n/)
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, ""))
          .join("\n");
        if (!data) continue;
        if (data === "[DONE]") return;
        let payload;
        try {
          payload = JSON.parse(data);
        } catch {
          throw new ApiError(502, `The server sent a stream event that is not JSON: ${data.slice(0, 200)}`);
        }
        if (payload.error) {
          const error = payload.error;
          throw new ApiError(error.type === "invalid_request_error" ? 400 : 500, error.message || "error", error);
        }
        yield payload;
      }
    }
    throw new NetworkError("The server closed the stream before the answer was complete.", "stream cut off");
  } finally {
    reader.cancel().catch(() => {});
  }
}
