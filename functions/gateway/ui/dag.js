// A job's step graph as a layered SVG: one column per layer (inputs first), edges from each
// step to the steps that use it, nodes coloured by status. Layout comes from the server
// (GET /v1/jobs/{id}/graph gives every node its layer), so this only places boxes.

const SVG = "http://www.w3.org/2000/svg";
const W = 136;
const H = 44;
const GAP_X = 44;
const GAP_Y = 12;
const PAD = 8;

function el(name, attrs = {}, text) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

function clip(text, max) {
  return text.length > max ? `${text.slice(0, max - 1)}…` : text;
}

/** Render `graph` ({nodes, edges, layers}) into `container`, replacing what was there. */
export function renderDag(container, graph) {
  container.replaceChildren();
  if (!graph || !graph.nodes.length) return;
  const columns = [];
  for (const node of graph.nodes) (columns[node.layer] ||= []).push(node);
  const rows = Math.max(...columns.map((c) => (c ? c.length : 0)));
  const width = PAD * 2 + columns.length * W + (columns.length - 1) * GAP_X;
  const height = PAD * 2 + rows * H + (rows - 1) * GAP_Y;
  const place = new Map();
  columns.forEach((column, layer) => {
    if (!column) return;
    const offset = ((rows - column.length) * (H + GAP_Y)) / 2;
    column.forEach((node, i) => {
      place.set(node.id, { x: PAD + layer * (W + GAP_X), y: PAD + offset + i * (H + GAP_Y) });
    });
  });

  const steps = graph.nodes.filter((n) => n.kind === "step");
  const done = steps.filter((n) => n.status === "done").length;
  const svg = el("svg", {
    viewBox: `0 0 ${width} ${height}`,
    width,
    height,
    role: "img",
    "aria-label": `Step graph: ${steps.length} steps, ${done} done`,
    class: "dag-svg",
  });
  const defs = el("defs");
  const marker = el("marker", {
    id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7, markerHeight: 7,
    orient: "auto-start-reverse",
  });
  marker.append(el("path", { d: "M 0 0 L 10 5 L 0 10 z", class: "dag-arrow" }));
  defs.append(marker);
  svg.append(defs);

  for (const [from, to] of graph.edges) {
    const a = place.get(from);
    const b = place.get(to);
    if (!a || !b) continue;
    const x1 = a.x + W;
    const y1 = a.y + H / 2;
    const x2 = b.x - 2;
    const y2 = b.y + H / 2;
    const mid = (x1 + x2) / 2;
    svg.append(el("path", {
      d: `M ${x1} ${y1} C ${mid} ${y1}, ${mid} ${y2}, ${x2} ${y2}`,
      class: "dag-edge",
      "marker-end": "url(#arrow)",
    }));
  }

  for (const node of graph.nodes) {
    const at = place.get(node.id);
    const status = node.kind === "input" ? "input" : node.status;
    const g = el("g", { class: `dag-node s-${status}`, transform: `translate(${at.x} ${at.y})` });
    g.append(el("title", {}, node.kind === "input"
      ? `input ${node.id}: ${node.label}`
      : `${node.id} (${node.label}): ${node.status}`));
    g.append(el("rect", { width: W, height: H, rx: 7 }));
    g.append(el("text", { x: 10, y: 18, class: "dag-name" },
      clip(node.kind === "input" ? node.label : node.id, 18)));
    g.append(el("text", { x: 10, y: 34, class: "dag-sub" },
      node.kind === "input" ? "input" : `${node.label} · ${node.status}`));
    svg.append(g);
  }
  container.append(svg);
}
