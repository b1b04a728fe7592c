// The playground: this server's HTTP API, driven from the page (no build step, no dependencies).
// Every call goes through api() or stream(); every failure reaches the status line in plain words (plain()).
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "titans-api-key";  // sessionStorage: this tab only
const PIECE = 2048;  // characters a memorize call reads: progress between calls, and no body near the size limit

// text in pieces of at most PIECE characters, never splitting a character (an emoji is two UTF-16 units)
function pieces(text) {
  const characters = Array.from(text), out = [];
  for (let start = 0; start < characters.length; start += PIECE) out.push(characters.slice(start, start + PIECE).join(""));
  return out;
}
const page = { key: sessionStorage.getItem(KEY_STORE) || "", session: null, after: null, sessions: new Map(),
               maxSurprise: 1e-6 };

class ApiError extends Error {
  constructor(status, message, code, retryAfter) {
    super(message);
    Object.assign(this, { status, code, retryAfter });
  }
}

function plain(error) {
  if (!(error instanceof ApiError)) return `Could not reach the server (${error.message}).`;
  const wait = error.retryAfter ? ` Retry in ${error.retryAfter} s.` : "";
  switch (error.status) {
    case 401: return "The server wants an API key, or this one is not valid: enter it above.";
    case 404: return `Not found: ${error.message}`;
    case 409: return error.code === "session_busy"
      ? "This session is busy with another request: wait for it to finish, then try again."
      : `Conflict: ${error.message}`;
    case 413: return `Too large for this server: ${error.message}`;
    case 429: return `The server is at capacity or you are over a quota.${wait || " Try again shortly."} (${error.message})`;
    case 503: return `The session store or the engine is unavailable right now.${wait} (${error.message})`;
    default: return `${error.status}: ${error.message}`;
  }
}

function say(text, isError = false) {
  const status = $("status");
  status.textContent = text;
  status.className = isError ? "error" : "";
}

function headers(contentType = "application/json") {
  const h = {};
  if (contentType) h["Content-Type"] = contentType;
  if (page.key) h["Authorization"] = `Bearer ${page.key}`;
  return h;
}

async function failure(response) {
  let message = response.statusText, code = null;
  try {
    const body = await response.json();
    message = body.error?.message ?? message;
    code = body.error?.code ?? null;
  } catch { /* not JSON: keep the status text */ }
  return new ApiError(response.status, message, code, response.headers.get("Retry-After"));
}

async function api(method, path, body, { raw = false, contentType = "application/json" } = {}) {
  const init = { method, headers: headers(body === undefined ? null : contentType) };
  if (body !== undefined) init.body = contentType === "application/json" ? JSON.stringify(body) : body;
  const response = await fetch(path, init);
  if (!response.ok) throw await failure(response);
  return raw ? response : response.json();
}

// Server-sent events of a streaming completion: yields each chunk's JSON until [DONE].
async function* stream(path, body) {
  const response = await fetch(path, { method: "POST", headers: headers(),
                                       body: JSON.stringify({ ...body, stream: true }) });
  if (!response.ok) throw await failure(response);
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
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(chunk.error.status ?? 500, chunk.error.message, chunk.error.code, null);
        yield chunk;
      }
    }
  }
}

// Text of a chunk (chat delta or completion text), its surprise values and finish reason.
function parts(chunk) {
  const choice = chunk.choices?.[0];
  if (!choice) return { text: "", surprise: [], finish: null };
  return { text: choice.delta?.content ?? choice.text ?? "", surprise: choice.surprise ?? [],
           finish: choice.finish_reason ?? null };
}

// A token's span, shaded by its surprise against the largest seen so far; the value on hover.
function token(text, surprise) {
  const span = document.createElement("span");
  span.className = "tok";
  span.textContent = text;
  const values = surprise.filter((v) => v !== null && Number.isFinite(v));
  if (values.length) {
    const value = values.reduce((a, b) => a + b, 0) / values.length;
    page.maxSurprise = Math.max(page.maxSurprise, value);
    span.style.backgroundColor = `rgba(255, 140, 0, ${(0.6 * value / page.maxSurprise).toFixed(3)})`;
    span.title = `surprise ${value.toFixed(4)}`;
    span.dataset.surprise = value.toFixed(6);
  }
  return span;
}

async function streamInto(target, path, body) {
  let finish = null;
  for await (const chunk of stream(path, body)) {
    const { text, surprise, finish: reason } = parts(chunk);
    if (text) target.append(token(text, surprise));
    finish = reason ?? finish;
  }
  return finish;
}

// --- sessions -----------------------------------------------------------------------------------------------

function describe(session) {
  return `${session.name || "session"} · ${session.id.slice(0, 8)} · v${session.version}`;
}

function renderSessions() {
  const list = $("session-list");
  list.replaceChildren();
  for (const session of page.sessions.values()) {
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = describe(session);
    button.dataset.id = session.id;
    button.setAttribute("aria-current", String(session.id === page.session?.id));
    button.addEventListener("click", () => run(() => select(session.id)));
    item.append(button);
    list.append(item);
  }
  for (const side of ["compare-left", "compare-right"]) {
    const select = $(side), chosen = select.value;
    select.replaceChildren(new Option("fresh memory (no session)", ""));
    for (const session of page.sessions.values()) select.append(new Option(describe(session), session.id));
    select.value = [...select.options].some((o) => o.value === chosen) ? chosen : "";
  }
}

async function loadSessions(more = false) {
  const query = new URLSearchParams({ limit: "20" });
  if (more && page.after) query.set("after", page.after);
  const listing = await api("GET", `/v1/sessions?${query}`);
  if (!more) page.sessions.clear();
  for (const session of listing.data) page.sessions.set(session.id, session);
  page.after = listing.last_id;
  $("more-sessions").hidden = !listing.has_more;
  renderSessions();
}

function show(session) {
  page.session = session;
  page.sessions.set(session.id, session);
  $("session-detail").hidden = false;
  $("d-id").textContent = session.id;
  $("d-version").textContent = session.version;
  $("d-tokens").textContent = session.tokens_seen;
  $("d-bytes").textContent = `${session.snapshot_bytes} bytes`;
  $("d-parent").textContent = session.parent_id ?? "none";
  $("chat-session").textContent = `· ${describe(session)}`;
  const versions = $("rollback-version");
  versions.replaceChildren(...session.history.map((v) => new Option(`version ${v}`, v)));
  $("rollback").disabled = session.history.length === 0;
  renderSessions();
}

async function select(id) {
  show(await api("GET", `/v1/sessions/${id}`));
}

function needSession() {
  if (!page.session) throw new Error("create or choose a session first");
  return page.session.id;
}

async function createSession(name = "playground") {
  const session = await api("POST", "/v1/sessions", { name });
  page.sessions.set(session.id, session);
  return session;
}

async function download(id) {
  const response = await api("GET", `/v1/sessions/${id}/snapshot`, undefined, { raw: true });
  const url = URL.createObjectURL(await response.blob());
  const link = Object.assign(document.createElement("a"), { href: url, download: `${id}.safetensors` });
  document.body.append(link);
  link.click();
  link.remove();
  URL.revokeObjectURL(url);
}

// --- chat, memorize, side by side ---------------------------------------------------------------------------

function turn(who) {
  const block = document.createElement("div");
  block.className = "turn";
  const label = document.createElement("span");
  label.className = "who";
  label.textContent = `${who}: `;
  const body = document.createElement("span");
  block.append(label, body);
  $("transcript").append(block);
  return body;
}

async function chat(text) {
  const id = needSession();
  turn("you").textContent = text;
  const reply = turn("titans");
  reply.classList.add("reply");
  const maxTokens = Number($("max-tokens").value) || 64;
  const temperature = Number($("temperature").value);
  const body = { messages: [{ role: "user", content: text }], session_id: id, max_tokens: maxTokens,
                 temperature: Number.isFinite(temperature) ? temperature : 0.7, return_surprise: true };
  if ($("discard").checked) body.memory = "discard";
  const finish = await streamInto(reply, "/v1/chat/completions", body);
  if (finish === "length") {
    const note = document.createElement("div");
    note.className = "note";
    note.textContent = `cut at ${maxTokens} tokens`;
    reply.parentElement.append(note);
  }
  $("transcript").scrollTop = $("transcript").scrollHeight;
  await select(id);
}

async function memorize(text) {
  const id = needSession();
  const progress = $("memorize-progress");
  progress.hidden = false;
  progress.value = 0;
  let tokens = 0, weighted = 0;
  const parts = pieces(text);
  for (const [i, part] of parts.entries()) {
    const answer = await api("POST", `/v1/sessions/${id}/memorize`, { text: part });
    tokens += answer.tokens;
    weighted += (answer.mean_surprise ?? 0) * answer.tokens;
    progress.value = (i + 1) / parts.length;
    show(answer.session);
  }
  $("memorize-result").textContent = `read ${tokens} tokens, mean surprise ${(weighted / Math.max(tokens, 1)).toFixed(4)}`;
}

async function compare(prompt) {
  const runs = ["left", "right"].map((side) => {
    const id = $(`compare-${side}`).value;
    const out = $(`compare-${side}-out`);
    out.replaceChildren();
    $(`compare-${side}-title`).textContent = id ? describe(page.sessions.get(id)) : "fresh memory";
    const body = { prompt, max_tokens: 32, temperature: 0, return_surprise: true, memory: "discard" };
    if (id) body.session_id = id;
    return streamInto(out, "/v1/completions", body);
  });
  await Promise.all(runs);
  say("both answered; neither remembers the prompt");
}

// --- the recall demo ------------------------------------------------------------------------------------------

// A seeded generator (mulberry32), so a demo can be run again as it was; no seed: Math.random.
function generator(seed) {
  if (!seed) return Math.random;
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6D2B79F5) >>> 0;
    let t = Math.imul(s ^ (s >>> 15), 1 | s);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const LETTERS = "abcdefghijklmnopqrstuvwxyz";

function randomWords(random, bytes) {
  let text = "";
  while (text.length < bytes) {
    const length = 2 + Math.floor(random() * 7);
    for (let i = 0; i < length; i++) text += LETTERS[Math.floor(random() * 26)];
    text += " ";
  }
  return text.slice(0, bytes);
}

function randomFact(random) {
  let key = "", value = "";
  for (let i = 0; i < 4; i++) key += LETTERS[Math.floor(random() * 26)];
  for (let i = 0; i < 4; i++) value += String(Math.floor(random() * 10));
  return { key, value };
}

async function answer(id, key) {
  const done = await api("POST", "/v1/completions", { prompt: `#${key}=`, max_tokens: 4, temperature: 0,
                                                      session_id: id, memory: "discard" });
  return done.choices[0].text;
}

async function demo(count, fillerBytes, seed) {
  const random = generator(seed);
  const progress = $("demo-progress"), rows = $("demo-table").tBodies[0];
  progress.hidden = false;
  progress.value = 0;
  rows.replaceChildren();
  $("demo-table").hidden = true;
  $("demo-summary").textContent = "";
  const memory = await createSession("recall demo"), control = await createSession("recall demo: reset control");
  const facts = Array.from({ length: count }, () => randomFact(random));
  await api("POST", `/v1/sessions/${memory.id}/memorize`, { text: facts.map((f) => `#${f.key}=${f.value};`).join("") });
  const filler = randomWords(random, fillerBytes), parts = pieces(filler);
  const steps = parts.length + count;
  let step = 0, sent = 0;
  for (const part of parts) {
    await Promise.all([memory.id, control.id].map((id) => api("POST", `/v1/sessions/${id}/memorize`, { text: part })));
    progress.value = ++step / steps;
    sent += part.length;
    say(`the demo streamed ${sent} of ${filler.length} bytes of other text`);
  }
  $("demo-table").hidden = false;
  let right = 0, controlRight = 0;
  for (const fact of facts) {
    const [fromMemory, fromControl] = await Promise.all([answer(memory.id, fact.key), answer(control.id, fact.key)]);
    right += fromMemory === fact.value;
    controlRight += fromControl === fact.value;
    const row = rows.insertRow();
    for (const [text, ok] of [[`#${fact.key}=`, null], [fact.value, null], [fromMemory, fromMemory === fact.value],
                              [fromControl, fromControl === fact.value]]) {
      const cell = row.insertCell();
      cell.textContent = text;
      if (ok !== null) cell.className = ok ? "right" : "wrong";
    }
    progress.value = ++step / steps;
  }
  const summary = $("demo-summary");
  summary.textContent = `memory: ${right} of ${count} recalled after ${filler.length} bytes of other text; ` +
    `reset control: ${controlRight} of ${count}`;
  summary.dataset.memory = right;
  summary.dataset.control = controlRight;
  say("the recall demo finished");
  await loadSessions();
}

// --- wiring ---------------------------------------------------------------------------------------------------

async function run(action) {
  try {
    await action();
  } catch (error) {
    say(error instanceof ApiError || error instanceof TypeError ? plain(error) : error.message, true);
  }
}

function on(id, event, action) {
  $(id).addEventListener(event, (e) => {
    if (event === "submit") e.preventDefault();
    run(() => action(e));
  });
}

function start() {
  $("api-key").value = page.key;
  on("key-form", "submit", async () => {
    page.key = $("api-key").value.trim();
    sessionStorage.setItem(KEY_STORE, page.key);
    await loadSessions();
    say(page.key ? "using the API key" : "no API key");
  });
  on("new-session", "click", async () => show(await createSession()));
  on("more-sessions", "click", () => loadSessions(true));
  on("import-file", "change", async (e) => {
    const file = e.target.files[0];
    if (!file) return;
    const session = await api("POST", "/v1/sessions/import", await file.arrayBuffer(),
                              { contentType: "application/octet-stream" });
    e.target.value = "";
    show(session);
    say(`imported ${file.name} as a new session`);
  });
  on("fork", "click", async () => {
    show(await api("POST", `/v1/sessions/${needSession()}/fork`, { name: `${page.session.name || "session"} (fork)` }));
    say("forked: now in the fork");
  });
  on("reset", "click", async () => { show(await api("POST", `/v1/sessions/${needSession()}/reset`)); say("memory reset"); });
  on("rollback", "click", async () => {
    const version = Number($("rollback-version").value);
    show(await api("POST", `/v1/sessions/${needSession()}/rollback`, { version }));
    say(`rolled back to version ${version}'s memory`);
  });
  on("export", "click", () => download(needSession()));
  on("delete", "click", async () => {
    const id = needSession();
    if (!confirm(`Delete session ${id}?`)) return;
    await api("DELETE", `/v1/sessions/${id}`);
    page.sessions.delete(id);
    page.session = null;
    $("session-detail").hidden = true;
    $("chat-session").textContent = "";
    renderSessions();
    say("session deleted");
  });
  on("chat-form", "submit", async () => {
    const text = $("chat-input").value;
    if (!text.trim()) return;
    $("chat-input").value = "";
    await chat(text);
  });
  on("memorize-form", "submit", async () => {
    const text = $("memorize-input").value;
    if (text) await memorize(text);
  });
  on("compare-form", "submit", () => compare($("compare-prompt").value || "#"));
  on("demo-form", "submit", () => demo(Number($("demo-facts").value), Number($("demo-filler").value),
                                       Number($("demo-seed").value)));
  run(loadSessions);
}

document.addEventListener("DOMContentLoaded", start);
