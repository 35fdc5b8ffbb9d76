// Talking to the jetcut HTTP API: the key, errors in the API's one shape, uploads with
// progress, and server-sent events read with fetch (EventSource cannot send a header, and
// an API key must never travel in a URL).

const STORE_KEY = "jetcut.apiKey";
export const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

let apiKey = sessionStorage.getItem(STORE_KEY) || localStorage.getItem(STORE_KEY) || "";

export function hasKey() {
  return apiKey !== "";
}

export function setKey(key, remember) {
  apiKey = key.trim();
  sessionStorage.setItem(STORE_KEY, apiKey);
  if (remember) localStorage.setItem(STORE_KEY, apiKey);
}

export function clearKey() {
  apiKey = "";
  sessionStorage.removeItem(STORE_KEY);
  localStorage.removeItem(STORE_KEY);
}

/** An error answered by the API: `{error: {code, message, details}}`, or a network failure. */
export class ApiError extends Error {
  constructor(status, code, message, details = {}) {
    super(message);
    this.status = status;
    this.code = code;
    this.details = details || {};
  }

  toString() {
    return `${this.message} (${this.code}${this.status ? `, HTTP ${this.status}` : ""})`;
  }
}

// The Authorization header's value for the key in use, or null (open access): for
// requests the page cannot make with `api` (the player's, made by hls.js).
export function authorization() {
  return apiKey ? `Bearer ${apiKey}` : null;
}

function headers(extra = {}) {
  const h = new Headers(extra);
  if (apiKey) h.set("Authorization", `Bearer ${apiKey}`);
  return h;
}

function errorFrom(status, statusText, text) {
  try {
    const body = JSON.parse(text);
    if (body && body.error && body.error.code) {
      return new ApiError(status, body.error.code, body.error.message, body.error.details);
    }
  } catch {
    // not the API's error shape (a proxy page, say): fall through
  }
  return new ApiError(status, `http_${status}`, statusText || "the request failed");
}

async function toError(response) {
  return errorFrom(response.status, response.statusText, await response.text());
}

function networkError(err) {
  return new ApiError(0, "network", `the gateway did not answer (${err.message})`);
}

/** Call the API; resolves to the JSON body (null for 204), rejects with ApiError. */
export async function api(path, { method = "GET", body, accept } = {}) {
  const h = headers(accept ? { Accept: accept } : {});
  let payload;
  if (body !== undefined) {
    h.set("Content-Type", "application/json");
    payload = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, { method, headers: h, body: payload });
  } catch (err) {
    throw networkError(err);
  }
  if (response.status === 204) return null;
  if (!response.ok) throw await toError(response);
  return response.json();
}

/** GET that also hands back the body of a non-2xx answer that is not an error (503 status). */
export async function getAny(path) {
  let response;
  try {
    response = await fetch(path, { headers: headers() });
  } catch (err) {
    throw networkError(err);
  }
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    if (!body.error) return { status: response.status, body };
  } catch {
    // fall through
  }
  throw errorFrom(response.status, response.statusText, text);
}

/** POST a file to /v1/uploads with upload progress (fetch reports none: XHR does). */
export function upload(file, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", `/v1/uploads?filename=${encodeURIComponent(file.name)}`);
    if (apiKey) xhr.setRequestHeader("Authorization", `Bearer ${apiKey}`);
    xhr.setRequestHeader("Content-Type", "application/octet-stream");
    xhr.upload.onprogress = (e) => {
      if (e.lengthComputable) onProgress(e.loaded / e.total);
    };
    xhr.onload = () => {
      if (xhr.status === 201) resolve(JSON.parse(xhr.responseText));
      else reject(errorFrom(xhr.status, xhr.statusText, xhr.responseText));
    };
    xhr.onerror = () => reject(new ApiError(0, "network", "the upload was interrupted"));
    xhr.send(file);
  });
}

/**
 * A URL the page can put in src/href for a gateway download. Without a key the gateway's
 * own path does (the browser streams it); with one, the bytes are fetched with the key into
 * a blob URL — up to `maxBytes`, beyond which null is returned (offer the link instead).
 */
export async function fileURL(path, maxBytes = Infinity) {
  if (!apiKey) return path;
  const controller = new AbortController();
  let response;
  try {
    response = await fetch(path, { headers: headers(), signal: controller.signal });
  } catch (err) {
    throw networkError(err);
  }
  if (!response.ok) throw await toError(response);
  const size = Number(response.headers.get("content-length") || "0");
  if (size > maxBytes) {
    controller.abort();
    return null;
  }
  return URL.createObjectURL(await response.blob());
}

/** Save a gateway download to disk, sending the key. */
export async function download(path, filename) {
  const url = await fileURL(path);
  const a = document.createElement("a");
  a.href = url;
  a.download = filename;
  document.body.append(a);
  a.click();
  a.remove();
  if (url.startsWith("blob:")) setTimeout(() => URL.revokeObjectURL(url), 60_000);
}

function parseBlock(block) {
  const event = { event: "message", data: [], id: null };
  for (const line of block.split("\n")) {
    if (line === "" || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") event.event = value;
    else if (field === "data") event.data.push(value);
    else if (field === "id") event.id = value;
  }
  return event.data.length || event.id !== null ? event : null;
}

/**
 * Follow a job's server-sent events until it finishes, resuming with Last-Event-ID after a
 * dropped connection (with backoff). Calls onEvent(kind, data) per event and onEnd(error?)
 * once. Returns a function that stops following.
 */
export function followEvents(jobId, { onEvent, onEnd, onState = () => {} }) {
  const controller = new AbortController();
  let stopped = false;
  let lastId = null;
  let delay = 500;

  async function once() {
    const h = headers({ Accept: "text/event-stream" });
    if (lastId !== null) h.set("Last-Event-ID", lastId);
    const response = await fetch(`/v1/jobs/${encodeURIComponent(jobId)}/events`, {
      headers: h,
      signal: controller.signal,
      cache: "no-store",
    });
    if (response.status === 204) return true; // resumed past the end: it is over
    if (!response.ok) throw await toError(response);
    onState("live");
    delay = 500;
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return false;
      buffer += value;
      // Lines may end in \r\n, \n or \r; a trailing \r may be half of a \r\n still to come.
      const held = buffer.endsWith("\r") ? "\r" : "";
      let text = (held ? buffer.slice(0, -1) : buffer).replace(/\r\n?/g, "\n");
      let cut;
      while ((cut = text.indexOf("\n\n")) >= 0) {
        const event = parseBlock(text.slice(0, cut));
        text = text.slice(cut + 2);
        if (!event) continue;
        if (event.id !== null) lastId = event.id;
        if (!event.data.length) continue;
        let data;
        try {
          data = JSON.parse(event.data.join("\n"));
        } catch {
          continue;
        }
        onEvent(event.event, data);
        if (event.event === "status" && TERMINAL.has(data.status)) return true;
      }
      buffer = text + held;
    }
  }

  (async () => {
    let failure = null;
    while (!stopped) {
      try {
        if (await once()) break;
      } catch (err) {
        if (stopped || err.name === "AbortError") break;
        if (err instanceof ApiError && err.status >= 400 && err.status < 500 && err.status !== 429) {
          failure = err;
          break;
        }
      }
      if (stopped) break;
      onState("reconnecting");
      await new Promise((resolve) => setTimeout(resolve, delay));
      delay = Math.min(delay * 2, 10_000);
    }
    if (!stopped) onEnd(failure);
  })();

  return () => {
    stopped = true;
    controller.abort();
  };
}
