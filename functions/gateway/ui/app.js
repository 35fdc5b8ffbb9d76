// The jetcut dashboard. Live updates: the jobs list, queues and status are polled at a
// modest rate (one request each, whatever the number of jobs), and the job open in the
// detail view follows its server-sent events. One SSE stream per visible running job would
// hold a connection each (browsers allow six per origin over HTTP/1.1) and an ordered
// consumer each on the server; a poll of the list costs one request.

import {
  ApiError, TERMINAL, api, clearKey, download, fileURL, followEvents, getAny, hasKey, setKey,
  upload,
} from "./api.js";
import { renderDag } from "./dag.js";
import { refreshDlqGroups } from "./dlq.js";
import { createPlayer } from "./player.js";

const LIST_EVERY_MS = 3000;
const QUEUE_EVERY_MS = 5000;
const STATUS_EVERY_MS = 15000;
const DLQ_EVERY_MS = 15000;
const PAGE = 25;
const VIDEO_PREVIEW_MAX_BYTES = 200 * 1024 * 1024;
const MAX_PREVIEWS = 12; // a frames step may make hundreds: the rest get download links only

const $ = (id) => document.getElementById(id);
const player = createPlayer($("player-box"), $("player"), $("player-note"));

function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

// ---------- formatting ----------

function seconds(s) {
  if (s === null || s === undefined) return "—";
  if (s < 1) return `${Math.round(s * 1000)} ms`;
  if (s < 60) return `${s.toFixed(1)} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${Math.round(s % 60)} s`;
  return `${Math.floor(m / 60)} h ${m % 60} min`;
}

function ago(ts) {
  if (!ts) return "—";
  const s = Math.max(0, Date.now() / 1000 - ts);
  if (s < 45) return "just now";
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return new Date(ts * 1000).toLocaleString();
}

function when(ts) {
  return ts ? new Date(ts * 1000).toLocaleString() : "—";
}

function took(job) {
  if (!job.started_at) return "—";
  return seconds((job.finished_at || Date.now() / 1000) - job.started_at);
}

function statusBadge(status) {
  return h("span", { class: `status s-${status}`, text: status });
}

function progressBar(percent, label) {
  return h("span", { class: "bar" },
    h("progress", { max: 100, value: percent, "aria-label": label }),
    h("span", { class: "bar-text", text: `${Math.round(percent)}%` }));
}

// ---------- messages ----------

function showError(err, context) {
  const text = err instanceof ApiError ? err.toString() : String(err);
  $("alert-text").textContent = context ? `${context}: ${text}` : text;
  $("alert").hidden = false;
  if (err instanceof ApiError && err.status === 401) signedOut("Your key was refused; sign in again.");
}

$("alert-close").addEventListener("click", () => {
  $("alert").hidden = true;
});

// ---------- pollers (one timer each, never overlapping; paused while the tab is hidden) ----------

const pollers = [];

function poller(fn, every) {
  const p = { fn, every, timer: null, running: false, active: false };
  p.kick = async () => {
    clearTimeout(p.timer);
    if (!p.active || p.running) return;
    p.running = true;
    try {
      await p.fn();
    } catch (err) {
      if (!(err instanceof ApiError && err.code === "network")) showError(err);
    } finally {
      p.running = false;
      if (p.active) p.timer = setTimeout(p.kick, document.hidden ? every * 5 : every);
    }
  };
  pollers.push(p);
  return p;
}

function startPolling() {
  for (const p of pollers) {
    p.active = true;
    p.kick();
  }
}

function stopPolling() {
  for (const p of pollers) {
    p.active = false;
    clearTimeout(p.timer);
  }
}

document.addEventListener("visibilitychange", () => {
  if (!document.hidden) for (const p of pollers) p.kick();
});

// ---------- sign in ----------

function signedOut(message) {
  stopPolling();
  closeDetail();
  clearKey();
  $("main").hidden = true;
  $("login").hidden = false;
  $("logout").hidden = true;
  $("who").textContent = "";
  const error = $("login-error");
  error.hidden = !message;
  error.textContent = message || "";
  $("key").focus();
}

async function signIn() {
  // Any tenant-scoped call tells whether the key works; the recipes also fill the form.
  const { recipes } = await api("/v1/recipes");
  fillRecipes(recipes);
  $("login").hidden = true;
  $("main").hidden = false;
  $("logout").hidden = !hasKey();
  $("who").textContent = hasKey() ? "signed in with an API key" : "open access (no key needed)";
  startPolling();
  route();
}

$("login-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  setKey($("key").value, $("remember").checked);
  $("key").value = "";
  try {
    await signIn();
  } catch (err) {
    signedOut(err instanceof ApiError && err.status === 401
      ? "That key was not accepted (unknown, malformed or revoked)." : String(err));
  }
});

$("logout").addEventListener("click", () => signedOut(""));

// ---------- submit form ----------

let recipesByName = new Map();

function fillRecipes(recipes) {
  recipesByName = new Map(recipes.map((r) => [r.name, r]));
  const select = $("recipe");
  const previous = select.value || "web";
  select.replaceChildren(...recipes.map((r) => h("option", { value: r.name, text: `${r.name} — ${r.summary}` })));
  if (recipesByName.has(previous)) select.value = previous;
  describeRecipe();
}

function describeRecipe() {
  const recipe = recipesByName.get($("recipe").value);
  if (!recipe) return;
  const inputs = recipe.inputs === null ? "inputs set by its params" : `${recipe.inputs} input${recipe.inputs > 1 ? "s" : ""}`;
  const steps = recipe.steps.length ? `; steps: ${recipe.steps.join(", ")}` : "";
  $("recipe-doc").textContent = `${recipe.doc} (${inputs}${steps})`;
}

$("recipe").addEventListener("change", describeRecipe);

function setBusy(busy, message) {
  $("submit-button").disabled = busy;
  $("submit-status").textContent = message;
}

$("job-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const files = [...$("file").files, ...$("extra").files];
  if (!$("file").files.length) {
    setBusy(false, "Choose an input file first.");
    $("file").focus();
    return;
  }
  let params;
  try {
    params = JSON.parse($("params").value.trim() || "{}");
    if (typeof params !== "object" || params === null || Array.isArray(params)) throw new Error("not an object");
  } catch (err) {
    setBusy(false, `Params must be a JSON object (${err.message}).`);
    $("params").focus();
    return;
  }
  const row = $("upload-row");
  const bar = $("upload-progress");
  try {
    const ids = [];
    row.hidden = false;
    for (const [i, file] of files.entries()) {
      setBusy(true, `Uploading ${file.name} (${i + 1} of ${files.length})…`);
      bar.value = 0;
      const done = await upload(file, (f) => {
        bar.value = f;
      });
      ids.push(done.upload_id);
    }
    setBusy(true, "Submitting…");
    const body = { recipe: $("recipe").value, params };
    if (ids.length === 1) body.input = ids[0];
    else body.inputs = ids;
    const job = await api("/v1/jobs", { method: "POST", body });
    setBusy(false, `Submitted job ${job.job_id}.`);
    const recipe = $("recipe").value;
    $("job-form").reset(); // clears the files; the recipe stays as chosen
    $("recipe").value = recipe;
    $("params").value = "{}";
    describeRecipe();
    upsertRows([job], true);
    location.hash = `#job/${job.job_id}`;
    listPoller.kick();
  } catch (err) {
    setBusy(false, `Not submitted: ${err instanceof ApiError ? err.toString() : err}`);
    if (err instanceof ApiError && err.status === 401) showError(err);
  } finally {
    row.hidden = true;
  }
});

// ---------- jobs table ----------

let nextCursor = null;
let olderJobs = []; // pages loaded with "Load older jobs", kept until the filter changes

function rowFor(job) {
  let tr = document.querySelector(`#jobs-body tr[data-job-id="${CSS.escape(job.job_id)}"]`);
  if (!tr) {
    tr = h("tr", { "data-job-id": job.job_id },
      h("td", {}, h("a", { href: `#job/${job.job_id}`, class: "mono", text: job.job_id.slice(0, 12),
        title: job.job_id, "aria-label": `Job ${job.job_id}` })),
      h("td", { class: "recipe" }), h("td", { class: "status-cell" }), h("td", { class: "progress-cell" }),
      h("td", { class: "created" }), h("td", { class: "took" }));
  }
  return tr;
}

function fillRow(tr, job) {
  tr.dataset.status = job.status;
  tr.querySelector(".recipe").textContent = job.recipe || "inline";
  const cell = tr.querySelector(".status-cell");
  if (cell.textContent !== job.status) cell.replaceChildren(statusBadge(job.status));
  const percent = job.percent ?? job.progress * 100;
  const progress = tr.querySelector(".progress-cell");
  const bar = progress.querySelector("progress");
  if (bar) {
    bar.value = percent;
    progress.querySelector(".bar-text").textContent = `${Math.round(percent)}%`;
  } else {
    progress.replaceChildren(progressBar(percent, `Progress of job ${job.job_id}`));
  }
  const created = tr.querySelector(".created");
  created.textContent = ago(job.created_at);
  created.title = when(job.created_at);
  tr.querySelector(".took").textContent = took(job);
  tr.classList.toggle("selected", job.job_id === selectedId);
}

/** Update rows in place (focus and scroll stay put); `prepend` adds unknown jobs on top. */
function upsertRows(jobs, prepend = false) {
  const body = $("jobs-body");
  for (const job of jobs) {
    const tr = rowFor(job);
    fillRow(tr, job);
    if (!tr.isConnected) prepend ? body.prepend(tr) : body.append(tr);
  }
  $("jobs-empty").hidden = body.children.length > 0;
}

function renderJobs(jobs) {
  const body = $("jobs-body");
  const keep = new Set(jobs.map((j) => j.job_id));
  for (const tr of [...body.children]) if (!keep.has(tr.dataset.jobId)) tr.remove();
  jobs.forEach((job, i) => {
    const tr = rowFor(job);
    fillRow(tr, job);
    if (body.children[i] !== tr) body.insertBefore(tr, body.children[i] || null);
  });
  $("jobs-empty").hidden = jobs.length > 0;
}

function listQuery(cursor) {
  const q = new URLSearchParams({ limit: String(PAGE) });
  const status = $("status-filter").value;
  if (status) q.set("status", status);
  if (cursor) q.set("cursor", cursor);
  return `/v1/jobs?${q}`;
}

const listPoller = poller(async () => {
  const page = await api(listQuery(null));
  if (!olderJobs.length) nextCursor = page.next_cursor;
  const seen = new Set(page.jobs.map((j) => j.job_id));
  renderJobs([...page.jobs, ...olderJobs.filter((j) => !seen.has(j.job_id))]);
  $("jobs-more").hidden = !nextCursor;
}, LIST_EVERY_MS);

$("jobs-more").addEventListener("click", async () => {
  try {
    const page = await api(listQuery(nextCursor));
    olderJobs = [...olderJobs, ...page.jobs];
    nextCursor = page.next_cursor;
    upsertRows(page.jobs);
    $("jobs-more").hidden = !nextCursor;
  } catch (err) {
    showError(err, "Could not load older jobs");
  }
});

$("status-filter").addEventListener("change", () => {
  olderJobs = [];
  nextCursor = null;
  $("jobs-body").replaceChildren();
  listPoller.kick();
});

// ---------- job detail ----------

let selectedId = null;
let stopEvents = null;
let blobURLs = [];
let outputsShown = "";
let refreshTimer = null;
let refreshing = false;
let refreshAgain = false;
let graphShown = ""; // the step statuses the drawn graph shows
let outputsSeen = ""; // the outputs the outputs list was fetched for

function closeDetail() {
  if (stopEvents) stopEvents();
  stopEvents = null;
  selectedId = null;
  clearTimeout(refreshTimer);
  refreshTimer = null;
  for (const url of blobURLs) URL.revokeObjectURL(url);
  blobURLs = [];
  outputsShown = "";
  graphShown = "";
  outputsSeen = "";
  refreshAgain = false;
  $("detail").hidden = true;
  player.close();
  for (const tr of document.querySelectorAll("#jobs-body tr.selected")) tr.classList.remove("selected");
}

function fact(term, value) {
  return [h("div", {}, h("dt", { text: term }), h("dd", {}, value))];
}

function errorText(error) {
  return error ? `${error.code}: ${error.message}` : "";
}

// Output checks (shared/media/verify.py) of a step (an expanded step: of every part):
// "6/6 passed · VMAF 95.2" (the mean quality score, and the worst one when there are several).
function checksText(s) {
  const all = s.checks || [];
  if (!all.length) return "";
  let text = `${all.filter((c) => c.passed).length}/${all.length} passed`;
  const scored = all.filter((c) => c.check === "quality" && c.measured && typeof c.measured.score === "number");
  if (scored.length) {
    const metric = String(scored[0].measured.metric || "").toUpperCase();
    const digits = metric === "SSIM" ? 3 : 1;
    const mean = scored.reduce((sum, c) => sum + c.measured.score, 0) / scored.length;
    const worst = Math.min(...scored.map((c) => c.measured.worst_window ?? c.measured.score));
    text += ` · ${metric} ${mean.toFixed(digits)}`;
    if (scored.length > 1) text += ` (worst ${worst.toFixed(digits)})`;
  }
  return text;
}

function renderJob(job) {
  $("detail-title").textContent = `Job ${job.job_id}`;
  const facts = [
    ...fact("Status", statusBadge(job.status)),
    ...fact("Recipe", job.recipe || "inline steps"),
    ...fact("Created", when(job.created_at)),
    ...fact("Started", when(job.started_at)),
    ...fact("Finished", when(job.finished_at)),
    ...fact("Took", took(job)),
  ];
  if (job.queue) {
    const ahead = `${job.queue.capped ? "at least " : ""}${job.queue.ahead}`;
    facts.push(...fact("Queue", `waiting in ${job.queue.stage}: ${ahead} ahead`));
  }
  if (typeof job.eta_s === "number") {
    // The cost model's prediction (docs/design.md amendment 16), not a promise.
    facts.push(...fact("ETA", `about ${Math.max(1, Math.round(job.eta_s))} s left`));
  }
  $("detail-facts").replaceChildren(...facts);
  $("detail").dataset.status = job.status;
  const percent = job.percent ?? job.progress * 100;
  $("detail-progress").value = percent;
  $("detail-percent").textContent = `${percent.toFixed(1)}%`;
  const box = $("detail-error");
  box.hidden = !job.error;
  box.textContent = job.error ? `Failed — ${errorText(job.error)}` : "";
  $("detail-cancel").hidden = TERMINAL.has(job.status) || job.status === "cancelling";
  $("detail-retry").hidden = !["failed", "cancelled"].includes(job.status);

  const rows = Object.entries(job.steps).map(([name, s]) => h("tr", { "data-step": name, "data-status": s.status },
    h("th", { scope: "row", text: name }),
    h("td", { text: s.stage }),
    h("td", {}, statusBadge(s.status)),
    h("td", { text: String(s.attempt) }),
    h("td", { text: String(s.deliveries) }),
    h("td", { text: seconds(s.waited_s) }),
    h("td", { text: seconds(s.elapsed_s) }),
    h("td", {}, progressBar(s.status === "done" ? 100 : s.progress * 100, `Progress of step ${name}`)),
    h("td", { class: "checks", text: checksText(s) }),
    s.error || s.last_error
      ? h("td", { class: "error", text: s.error ? errorText(s.error) : `retrying after ${errorText(s.last_error)}` })
      : h("td", { class: "note", text: s.skipped ? `skipped: ${s.skipped}` : "" })));
  $("steps-body").replaceChildren(...rows);
  const row = document.querySelector(`#jobs-body tr[data-job-id="${CSS.escape(job.job_id)}"]`);
  if (row) fillRow(row, job);
}

const IMAGE = /\.(jpe?g|png|webp|gif)$/i;
const VIDEO = /\.(mp4|m4v|webm|mov)$/i;
const AUDIO = /\.(m4a|aac|mp3|opus|ogg|oga|wav|flac)$/i;

async function mediaURL(output, maxBytes) {
  if (output.expires_at !== null && output.expires_at !== undefined) return output.url; // presigned S3
  const url = await fileURL(gatewayPath(output), maxBytes);
  if (url && url.startsWith("blob:")) blobURLs.push(url);
  return url;
}

function gatewayPath(output) {
  // Built from the job id, step and name rather than taken from `url`, whose host is the
  // gateway's configured base URL (which may not be how this browser reaches it).
  return `/v1/jobs/${encodeURIComponent(selectedId)}/outputs/${encodeURIComponent(output.step)}/${encodeURIComponent(output.name)}`;
}

function downloadControl(output, filename) {
  if (output.expires_at !== null && output.expires_at !== undefined) {
    return h("a", { href: output.url, download: filename, text: `Download ${filename}` });
  }
  if (!hasKey()) return h("a", { href: gatewayPath(output), download: filename, text: `Download ${filename}` });
  return h("button", {
    type: "button", class: "link", text: `Download ${filename}`,
    onclick: () => download(gatewayPath(output), filename).catch((err) => showError(err, "Download failed")),
  });
}

async function previewFor(output, filename) {
  if (IMAGE.test(filename)) {
    const src = await mediaURL(output);
    return h("img", { src, alt: `${output.step}/${output.name} (${filename})`, class: "preview", loading: "lazy" });
  }
  if (VIDEO.test(filename)) {
    const src = await mediaURL(output, VIDEO_PREVIEW_MAX_BYTES);
    if (!src) return h("p", { class: "hint", text: "Too large to preview here; download it." });
    return h("video", { src, controls: true, preload: "metadata", class: "preview", "aria-label": `${output.step}/${output.name}` });
  }
  if (AUDIO.test(filename)) {
    const src = await mediaURL(output, VIDEO_PREVIEW_MAX_BYTES);
    return src ? h("audio", { src, controls: true, preload: "metadata", "aria-label": `${output.step}/${output.name}` }) : null;
  }
  if (/\.m3u8$/i.test(filename)) {
    const presigned = output.expires_at !== null && output.expires_at !== undefined;
    const href = presigned ? output.url : new URL(gatewayPath(output), location.href).href;
    return h("p", { class: "hint" }, "HLS playlist: ", h("a", { href, text: href, class: "mono" }),
      presigned || !hasKey() ? " — open it in any HLS player (Safari plays it natively)."
        : " — players must send the API key, or use presigned outputs (JETCUT_PRESIGN_OUTPUTS).");
  }
  return null;
}

async function renderOutputs(list) {
  const signature = list.outputs.map((o) => o.key).join("|");
  if (signature === outputsShown) return;
  outputsShown = signature;
  for (const url of blobURLs) URL.revokeObjectURL(url);
  blobURLs = [];
  const items = [];
  for (const [i, output] of list.outputs.entries()) {
    const filename = output.key.split("/").pop();
    let preview = null;
    try {
      if (i < MAX_PREVIEWS) preview = await previewFor(output, filename);
    } catch (err) {
      preview = h("p", { class: "error", text: `Preview failed: ${err}` });
    }
    items.push(h("li", { "data-output": `${output.step}/${output.name}` },
      h("div", { class: "output-name" }, h("strong", { text: `${output.step}/${output.name}` }), " ", h("span", { class: "hint", text: filename })),
      preview,
      downloadControl(output, filename)));
  }
  if (list.job_id !== selectedId) return;
  $("outputs").replaceChildren(...items);
  $("outputs-empty").hidden = items.length > 0;
}

async function refreshDetail() {
  // One refresh at a time; one asked for meanwhile runs right after (never lost: the last
  // one after a job finishes must see its final state).
  if (!selectedId) return;
  if (refreshing) {
    refreshAgain = true;
    return;
  }
  refreshing = true;
  const id = selectedId;
  const path = `/v1/jobs/${encodeURIComponent(id)}`;
  try {
    const job = await api(path);
    if (id !== selectedId) return;
    renderJob(job);
    player.update(job);
    // The graph and the outputs list change only with step statuses and new outputs: fetch
    // them then, not on every progress tick.
    const shape = Object.entries(job.steps).map(([n, s]) => `${n}:${s.status}`).join("|") || "unplanned";
    if (shape !== graphShown) {
      const graph = await api(`${path}/graph`);
      if (id !== selectedId) return;
      renderDag($("dag"), graph);
      graphShown = shape;
    }
    const outputs = Object.entries(job.steps)
      .flatMap(([n, s]) => Object.keys(s.outputs).map((k) => `${n}/${k}`)).join("|");
    if (outputs && outputs !== outputsSeen) {
      await renderOutputs(await api(`${path}/outputs`));
      outputsSeen = outputs;
    }
  } catch (err) {
    if (id === selectedId) showError(err, `Could not load job ${id}`);
  } finally {
    refreshing = false;
    if (refreshAgain) {
      refreshAgain = false;
      refreshDetail(); // for whichever job is open now
    }
  }
}

function scheduleRefresh(delay) {
  // Progress events can come many times a second: coalesce them into one refresh.
  if (refreshTimer) return;
  refreshTimer = setTimeout(async () => {
    refreshTimer = null;
    await refreshDetail();
  }, delay);
}

async function openDetail(jobId) {
  if (selectedId === jobId) return;
  closeDetail();
  selectedId = jobId;
  $("detail").hidden = false;
  $("outputs").replaceChildren();
  $("outputs-empty").hidden = false;
  $("steps-body").replaceChildren();
  $("dag").replaceChildren();
  $("detail-live").textContent = "";
  for (const tr of document.querySelectorAll("#jobs-body tr")) tr.classList.toggle("selected", tr.dataset.jobId === jobId);
  await refreshDetail();
  $("detail").focus();
  if (selectedId !== jobId) return;
  stopEvents = followEvents(jobId, {
    onState: (state) => {
      $("detail-live").textContent = state === "live" ? "Live: following this job's events." : "Connection lost; reconnecting…";
    },
    onEvent: (kind, data) => {
      if (selectedId !== jobId) return;
      if (kind === "progress" && typeof data.progress === "number" && !data.step) {
        $("detail-progress").value = data.progress * 100;
        $("detail-percent").textContent = `${(data.progress * 100).toFixed(1)}%`;
      }
      scheduleRefresh(kind === "progress" ? 1000 : 0);
    },
    onEnd: (error) => {
      if (selectedId !== jobId) return;
      $("detail-live").textContent = error ? `Stopped following: ${error}` : "Finished.";
      stopEvents = null;
      clearTimeout(refreshTimer);
      refreshTimer = null;
      refreshDetail();
      listPoller.kick();
    },
  });
}

$("detail-close").addEventListener("click", () => {
  location.hash = "#jobs";
});

$("detail-cancel").addEventListener("click", async () => {
  try {
    await api(`/v1/jobs/${encodeURIComponent(selectedId)}`, { method: "DELETE" });
    $("detail-live").textContent = "Cancelling…";
    scheduleRefresh(0);
  } catch (err) {
    showError(err, "Could not cancel");
  }
});

$("detail-retry").addEventListener("click", async () => {
  const id = selectedId;
  try {
    await api(`/v1/jobs/${encodeURIComponent(id)}:retry`, { method: "POST" });
    closeDetail();
    await openDetail(id); // follow its events again
    listPoller.kick();
  } catch (err) {
    showError(err, "Could not retry");
  }
});

function route() {
  const match = location.hash.match(/^#job\/([A-Za-z0-9_-]{1,64})$/);
  if (match) openDetail(match[1]);
  else if (selectedId) closeDetail();
}

window.addEventListener("hashchange", () => {
  if (!$("main").hidden) route();
});

// ---------- queues ----------

function queueRow(q, label) {
  return h("tr", { "data-stage": q.stage },
    h("th", { scope: "row", text: label || q.stage }),
    h("td", { text: String(q.pending) }),
    h("td", { text: String(q.in_flight) }),
    h("td", { text: q.consumer === null ? "no worker yet" : String(q.waiting_pulls) }),
    h("td", { text: q.oldest_pending_age_s === null ? "—" : seconds(q.oldest_pending_age_s) }));
}

poller(async () => {
  const view = await api("/v1/queue");
  const rows = [];
  if (view.submit) rows.push(queueRow(view.submit, "submitted (planning)"));
  for (const q of view.stages) rows.push(queueRow(q));
  $("queue-body").replaceChildren(...rows);
  const by = Object.entries(view.dlq.by_function).map(([f, n]) => `${f}: ${n}`).join(", ");
  $("queue-dlq").textContent = `Dead letters: ${view.dlq.entries}${by ? ` (${by})` : ""}`;
}, QUEUE_EVERY_MS);

// ---------- dead letters (admin keys only) ----------

async function dlqAction(seq, action) {
  const path = action === "replay" ? `/v1/dlq/${seq}:replay` : `/v1/dlq/${seq}`;
  try {
    const result = await api(path, { method: action === "replay" ? "POST" : "DELETE" });
    $("dlq-note").textContent = action === "replay" ? `#${seq}: ${result.message}` : `#${seq} purged.`;
  } catch (err) {
    showError(err, `Could not ${action} #${seq}`);
  }
  dlqPoller.kick();
}

let dlqForbidden = false; // a non-admin key: ask again only when Refresh is pressed

const dlqPoller = poller(async () => {
  if (dlqForbidden) return;
  let page;
  try {
    page = await api("/v1/dlq?limit=50");
  } catch (err) {
    if (err instanceof ApiError && err.status === 403) {
      dlqForbidden = true;
      $("dlq-note").textContent = "Dead letters hold every tenant's messages: they need an admin key (jetcut keys create --admin).";
      $("dlq-body").replaceChildren();
      $("dlq-table").hidden = true;
      return;
    }
    throw err;
  }
  $("dlq-table").hidden = false;
  const rows = page.entries.map((e) => h("tr", { "data-seq": e.seq },
    h("td", { text: String(e.seq) }),
    h("td", { text: e.function }),
    h("td", {}, e.job_id ? h("a", { href: `#job/${e.job_id}`, class: "mono", text: e.job_id.slice(0, 12) }) : "—"),
    h("td", { class: "error", text: errorText(e.error) }),
    h("td", { text: String(e.num_delivered) }),
    h("td", { text: ago(e.at), title: when(e.at) }),
    h("td", { class: "actions" },
      h("button", { type: "button", text: "Replay", "aria-label": `Replay dead letter ${e.seq}`, onclick: () => dlqAction(e.seq, "replay") }),
      h("button", { type: "button", class: "danger", text: "Purge", "aria-label": `Purge dead letter ${e.seq}`,
        onclick: () => {
          if (confirm(`Purge dead letter #${e.seq}? It cannot be replayed afterwards.`)) dlqAction(e.seq, "purge");
        } }))));
  $("dlq-body").replaceChildren(...rows);
  if (!rows.length) $("dlq-note").textContent = "No dead letters.";
  await refreshDlqGroups();
}, DLQ_EVERY_MS);

document.addEventListener("jetcut:dlq-changed", () => dlqPoller.kick());

$("dlq-refresh").addEventListener("click", () => {
  dlqForbidden = false;
  dlqPoller.kick();
});

// ---------- system status ----------

poller(async () => {
  const badge = $("health");
  try {
    const { body } = await getAny("/v1/status");
    badge.textContent = body.status;
    badge.className = `badge h-${body.status}`;
    badge.title = Object.entries(body.checks).map(([name, c]) => `${name}: ${c.status} — ${c.detail}`).join("\n");
  } catch (err) {
    badge.textContent = "unreachable";
    badge.className = "badge h-unhealthy";
    badge.title = String(err);
    if (!(err instanceof ApiError && err.code === "network")) throw err;
  }
}, STATUS_EVERY_MS);

// ---------- start ----------

signIn().catch((err) => {
  if (err instanceof ApiError && err.status === 401) signedOut(hasKey() ? "Your saved key was not accepted." : "");
  else showError(err, "The gateway did not answer");
});
