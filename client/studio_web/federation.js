// The federation view: what a server's --state-dir says, refreshed every few seconds.
"use strict";

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c === null || c === undefined ? "" : c);
  return node;
}

const when = (t) => (t ? new Date(t * 1000).toLocaleString() : "");
const num = (v) => (typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toPrecision(4)) : (v ?? ""));

function table(columns, rows, cls) {
  if (!rows.length) return el("p", { class: "note" }, "none");
  return el("table", { class: cls || "" },
    el("thead", {}, el("tr", {}, ...columns.map(([title]) => el("th", {}, title)))),
    el("tbody", {}, ...rows.map((r) => el("tr", {}, ...columns.map(([, get]) => el("td", {}, String(get(r))))))));
}

function fill(id, node) { const box = $(id); box.textContent = ""; box.append(node); }

function show(data) {
  $("state-dir").textContent = data.state_dir;
  const s = data.status;
  const status = el("div");
  status.append(el("p", {}, "base ", el("code", {}, data.base.source), ` (${data.base.fingerprint.slice(0, 12)})`));
  if (s) {
    status.append(el("p", {}, "stage: ", el("span", { class: "stage", id: "stage" }, s.stage),
      s.round ? `, round ${s.round}` : "", s.version ? `, model v${s.version}` : "", ` (${when(s.time)})`));
    if (s.nodes) status.append(el("p", { id: "nodes" }, `connected nodes (${s.nodes.length}${s.min_clients ? ` of ${s.min_clients} needed` : ""}): ${s.nodes.join(", ") || "none"}`));
    if (s.reason) status.append(el("p", { class: "error" }, s.reason));
  } else {
    status.append(el("p", { class: "note" }, "no status written yet (a server from before status.json, or not started)"));
  }
  fill("status", status);

  fill("concepts", table([
    ["concept", (c) => c.token], ["sent by", (c) => c.origin || `node ${c.node_id}`], ["round", (c) => c.round],
    ["accepted", (c) => when(c.accepted_at)], ["steps", (c) => num((c.metrics || {}).steps)],
    ["final loss", (c) => num((c.metrics || {}).final_loss)],
  ], data.concepts, "concepts-table"));

  const models = el("div");
  if (!data.models.length) models.append(el("p", { class: "note" }, "none yet"));
  for (const m of [...data.models].reverse()) {
    const box = el("div", { class: "model", "data-version": m.version });
    box.append(el("h3", {}, `v${m.version}: ${m.strategy}, ${m.concepts.length} concepts (${when(m.created_at)})`));
    box.append(el("p", {}, "concepts: ", m.concepts.map((c) => `<${c}>`).join(", ")));
    if (m.report) {
      const cols = [["concept", (r) => r.concept], ["source", (r) => r.source],
                    ...m.report.columns.map((c) => [c, (r) => num(r[c])])];
      box.append(el("p", { class: "note" }, "fusion report: how far each concept's outputs moved in the fused model (lower keeps more)"));
      box.append(table(cols, m.report.rows, "report-table"));
    }
    const obj = Object.entries(m.objective || {});
    if (obj.length) box.append(el("p", { class: "note" }, "objective: " + obj.map(([k, v]) => `${k} ${num(v)}`).join("; ")));
    if (m.grid) box.append(el("img", { class: "grid-img", src: m.grid, alt: `fusion report grid of v${m.version}` }));
    models.append(box);
  }
  fill("models", models);

  fill("rounds", table([
    ["round", (r) => r.round], ["stage", (r) => r.stage], ["time", (r) => when(r.time)],
    ["accepted", (r) => (r.accepted || []).join(", ")], ["already known", (r) => (r.known || []).join(", ")],
    ["rejected", (r) => (r.rejected ? r.rejected.length : "")], ["no reply", (r) => (r.missing || []).join(", ")],
    ["clients", (r) => (r.clients || []).map((c) => `node ${c.node}` + (c.loss_ratio !== undefined ? ` (fused/own loss ${num(c.loss_ratio)})` : "")).join("; ")],
  ], data.rounds));

  fill("rejected", table([["round", (r) => r.round], ["node", (r) => r.node], ["reason", (r) => r.reason]], data.rejected));
}

async function refresh() {
  try {
    const resp = await fetch("/api/federation");
    const data = await resp.json();
    if (!resp.ok || data.error) throw new Error(data.error || resp.statusText);
    $("error").textContent = "";
    show(data);
    document.body.dataset.ready = "1";
  } catch (err) {
    $("error").textContent = String(err.message || err);
  }
}

refresh();
setInterval(refresh, 3000);
