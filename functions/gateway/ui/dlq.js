// Dead-letter triage on the dashboard: the DLQ grouped by cause (GET /v1/dlq/groups), one
// row per group -- stage, error code, how many entries and jobs, the message's shape, when
// it was last seen -- with a button that replays the whole group at once
// (POST /v1/dlq/groups/{group}:replay). app.js refreshes it with the entry list (same
// admin key, same cadence); a replay announces "jetcut:dlq-changed" so the list follows.

import { api } from "./api.js";

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "text") node.textContent = v;
    else if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, String(v));
  }
  node.append(...children);
  return node;
}

function ago(ts) {
  const s = Math.max(0, Date.now() / 1000 - ts);
  if (s < 45) return "just now";
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return new Date(ts * 1000).toLocaleString();
}

async function replayGroup(group, button) {
  button.disabled = true; // one click, one replay (the server makes a repeat a 404 anyway)
  const note = $("dlq-groups-note");
  try {
    const r = await api(`/v1/dlq/groups/${encodeURIComponent(group)}:replay`, { method: "POST" });
    note.textContent = `${group}: replayed ${r.replayed}, covered ${r.covered} (same job), kept ${r.kept}.`;
  } catch (err) {
    note.textContent = `Could not replay ${group}: ${err}`;
  }
  document.dispatchEvent(new CustomEvent("jetcut:dlq-changed"));
}

function groupRow(g) {
  const button = el("button", { type: "button", text: "Replay group",
    "aria-label": `Replay all ${g.count} dead letters of ${g.group}` });
  button.addEventListener("click", () => replayGroup(g.group, button));
  return el("tr", { "data-group": g.group },
    el("th", { scope: "row", text: g.function }),
    el("td", { text: g.code }),
    el("td", { class: "count", text: String(g.count) }),
    el("td", { text: String(g.jobs) }),
    el("td", { class: "error", text: g.shape, title: g.example.error.message }),
    el("td", { text: ago(g.last_seen), title: new Date(g.first_seen * 1000).toLocaleString() }),
    el("td", { class: "actions" }, button));
}

/** Fetch the groups and render them (rejects with the API's error, as app.js expects). */
export async function refreshDlqGroups() {
  const body = await api("/v1/dlq/groups");
  $("dlq-groups-body").replaceChildren(...body.groups.map(groupRow));
  $("dlq-groups-table").hidden = body.groups.length === 0;
  $("dlq-groups-empty").hidden = body.groups.length > 0;
}
