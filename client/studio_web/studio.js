// mos-studio: compose a scene (global prompt + boxes), render it on the server, and give the
// mos-sample command or scene file that reproduces it. Boxes are fractions of the image.
"use strict";

const COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324"];
const $ = (id) => document.getElementById(id);
const state = { model: null, boxes: [], focused: null, drag: null, result: null, adapterImage: "", adapterName: "adapter" };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "class") node.className = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

async function api(path, body, raw) {
  const init = body === undefined ? {} : {
    method: "POST",
    body: raw ? body : JSON.stringify(body),
    headers: { "Content-Type": raw ? "application/octet-stream" : "application/json" },
  };
  const resp = await fetch(path, init);
  const data = await resp.json();
  if (!resp.ok || data.error) throw new Error(data.error || resp.statusText);
  return data;
}

function showError(err) { $("error").textContent = err ? String(err.message || err) : ""; }
const round3 = (v) => Math.round(v * 1000) / 1000;

// --- the model ------------------------------------------------------------------------------
function showModel(info) {
  state.model = info;
  $("federation-link").hidden = !info.federation;
  if (!info.model) return;
  $("model-path").value = info.model;
  $("model-line").textContent = `${info.model} - base ${info.base}, ${info.resolution} px, ${info.concepts.length} concepts`;
  $("width").value = info.resolution;
  $("height").value = info.resolution;
  const list = $("concepts");
  list.textContent = "";
  for (const c of info.concepts) {
    const words = c.trigger ? `trigger words "${c.trigger}"` : `class word "${c.class_word}"`;
    list.append(el("div", { class: "concept", "data-token": c.token },
      el("img", { src: c.thumbnail, alt: `a sample of ${c.token}` }),
      el("div", {}, el("code", { class: "chip token", title: "insert", onclick: () => insertToken(c.token) }, c.token),
        el("div", { class: "note" }, `${words}; ${c.method}`))));
  }
  if (!$("prompt").value && info.concepts.length) {
    $("prompt").value = info.concepts.map((c) => c.token).join(" and ");
  }
  resizeCanvas();
  renderBoxes();
}

function insertToken(token) {
  const target = state.focused || $("prompt");
  const at = target.selectionStart ?? target.value.length;
  target.value = target.value.slice(0, at) + token + target.value.slice(target.selectionEnd ?? at);
  target.dispatchEvent(new Event("input"));
  target.focus();
}

async function openModel() {
  showError();
  $("model-line").textContent = "opening...";
  try {
    showModel(await api("/api/open", { model: $("model-path").value, base_model: $("base-model").value }));
  } catch (err) {
    showError(err);
    $("model-line").textContent = state.model && state.model.model ? state.model.model : "no model open";
  }
}

// --- the scene ------------------------------------------------------------------------------
function numberOr(id, fallback) {
  const v = $(id).value.trim();
  return v === "" ? fallback : Number(v);
}

function scene() {
  const adapters = [];
  if ($("adapter-model").value.trim() || state.adapterImage) {
    adapters.push({ name: state.adapterName, model: $("adapter-model").value.trim(), image: state.adapterImage,
                    weight: numberOr("adapter-weight", 1.0) });
  }
  return {
    prompt: $("prompt").value,
    negative_prompt: $("negative").value,
    regions: state.boxes.map((b) => ({ prompt: b.prompt, negative_prompt: b.negative_prompt, box: b.box,
                                       adapter_weights: adapters.length ? (b.adapter_weights || {}) : {} })),
    adapters,
    seed: numberOr("seed", 0),
    steps: numberOr("steps", 25),
    guidance: numberOr("guidance", 7.5),
    width: numberOr("width", null),
    height: numberOr("height", null),
    native_views: $("native-views").checked,
    view_overlap: numberOr("view-overlap", 0.5),
    adapter_steps: numberOr("adapter-steps", 1.0),
  };
}

function setScene(s) {
  $("prompt").value = s.prompt || "";
  $("negative").value = s.negative_prompt || "";
  for (const [id, key] of [["seed", "seed"], ["steps", "steps"], ["guidance", "guidance"], ["width", "width"],
                           ["height", "height"], ["view-overlap", "view_overlap"], ["adapter-steps", "adapter_steps"]]) {
    if (s[key] !== null && s[key] !== undefined) $(id).value = s[key];
    else if (key === "width" || key === "height") $(id).value = state.model ? state.model.resolution : "";
  }
  $("native-views").checked = !!s.native_views;
  state.boxes = (s.regions || []).map((r) => ({ box: r.box.map(Number), prompt: r.prompt,
                                                negative_prompt: r.negative_prompt || "",
                                                adapter_weights: r.adapter_weights || {} }));
  const a = (s.adapters || [])[0];
  $("adapter-model").value = a ? a.model : "";
  $("adapter-weight").value = a ? a.weight : 1.0;
  state.adapterImage = a ? a.image : "";
  state.adapterName = a ? a.name : "adapter";
  if ((s.adapters || []).length > 1) {
    showError(`this scene has ${s.adapters.length} adapters; the studio keeps the first (${a.name}): render the others with mos-sample --scene`);
  }
  $("adapter-image-path").textContent = state.adapterImage;
  resizeCanvas();
  renderBoxes();
}

// --- boxes ----------------------------------------------------------------------------------
function renderBoxes() {
  const list = $("boxes");
  list.textContent = "";
  state.boxes.forEach((b, i) => {
    const color = COLORS[i % COLORS.length];
    const prompt = el("input", { type: "text", class: "box-prompt", "data-index": i, value: b.prompt,
                                 placeholder: "what goes in this box, e.g. a <dog1>" });
    prompt.addEventListener("input", () => { b.prompt = prompt.value; });
    prompt.addEventListener("focus", () => { state.focused = prompt; });
    const negative = el("input", { type: "text", class: "box-negative", value: b.negative_prompt,
                                   placeholder: "negative prompt (optional)" });
    negative.addEventListener("input", () => { b.negative_prompt = negative.value; });
    negative.addEventListener("focus", () => { state.focused = negative; });
    const coords = el("div", { class: "coords" });
    ["x0", "y0", "x1", "y1"].forEach((name, k) => {
      const input = el("input", { type: "number", step: "0.01", class: `box-${name}`, value: b.box[k], title: name });
      input.addEventListener("change", () => { b.box[k] = Number(input.value); drawCanvas(); });
      coords.append(input);
    });
    const aw = el("input", { type: "number", step: "0.1", class: "box-adapter-weight",
                             placeholder: "adapter weight in this box (default: its weight)",
                             value: b.adapter_weights && state.adapterName in b.adapter_weights ? b.adapter_weights[state.adapterName] : "" });
    aw.addEventListener("change", () => {
      b.adapter_weights = aw.value.trim() === "" ? {} : { [state.adapterName]: Number(aw.value) };
    });
    const chips = el("div", { class: "chips" });
    for (const c of (state.model ? state.model.concepts : [])) {
      chips.append(el("span", { class: "chip", onclick: () => { state.focused = prompt; insertToken(c.token); } }, c.token));
    }
    list.append(el("div", { class: "box", style: `border-color:${color}` },
      el("div", { class: "row" }, el("b", {}, `box ${i + 1}`),
        el("button", { class: "delete-box", onclick: () => { state.boxes.splice(i, 1); renderBoxes(); } }, "remove")),
      prompt, chips, negative, el("label", {}, "x0, y0, x1, y1 (fractions)"), coords, aw));
  });
  drawCanvas();
}

function resizeCanvas() {
  const w = Number($("width").value) || 1, h = Number($("height").value) || 1;
  const c = $("canvas");
  const size = 512;
  c.width = w >= h ? size : Math.round(size * w / h);
  c.height = w >= h ? Math.round(size * h / w) : size;
  drawCanvas();
}

function drawCanvas() {
  const c = $("canvas"), ctx = c.getContext("2d");
  ctx.clearRect(0, 0, c.width, c.height);
  if (state.result && state.result.complete && state.result.naturalWidth && state.resultSingle) {
    ctx.globalAlpha = 0.55;
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(state.result, 0, 0, c.width, c.height);
    ctx.globalAlpha = 1;
  }
  const boxes = state.drag && state.drag.kind === "new" ? [...state.boxes, { box: state.drag.box, prompt: "" }] : state.boxes;
  boxes.forEach((b, i) => {
    const [x0, y0, x1, y1] = b.box;
    ctx.strokeStyle = COLORS[i % COLORS.length];
    ctx.lineWidth = 2;
    ctx.strokeRect(x0 * c.width, y0 * c.height, (x1 - x0) * c.width, (y1 - y0) * c.height);
    ctx.fillStyle = ctx.strokeStyle;
    ctx.font = "13px system-ui";
    ctx.fillText(`${i + 1} ${b.prompt || ""}`.slice(0, 40), x0 * c.width + 4, y0 * c.height + 15);
    ctx.fillRect(x1 * c.width - 6, y1 * c.height - 6, 6, 6);
  });
}

function canvasPoint(ev) {
  const r = $("canvas").getBoundingClientRect();
  return [Math.min(1, Math.max(0, (ev.clientX - r.left) / r.width)),
          Math.min(1, Math.max(0, (ev.clientY - r.top) / r.height))];
}

function onDown(ev) {
  const [x, y] = canvasPoint(ev);
  const c = $("canvas"), near = 8 / c.width;
  for (let i = state.boxes.length - 1; i >= 0; i--) {
    const [x0, y0, x1, y1] = state.boxes[i].box;
    if (Math.abs(x - x1) < near && Math.abs(y - y1) < near) {
      state.drag = { kind: "resize", index: i, start: [x, y], orig: [...state.boxes[i].box] };
      return;
    }
    if (x > x0 && x < x1 && y > y0 && y < y1) {
      state.drag = { kind: "move", index: i, start: [x, y], orig: [...state.boxes[i].box] };
      return;
    }
  }
  state.drag = { kind: "new", start: [x, y], box: [x, y, x, y] };
}

function onMove(ev) {
  const d = state.drag;
  if (!d) return;
  const [x, y] = canvasPoint(ev);
  if (d.kind === "new") {
    d.box = [Math.min(d.start[0], x), Math.min(d.start[1], y), Math.max(d.start[0], x), Math.max(d.start[1], y)];
  } else {
    const b = state.boxes[d.index];
    const [dx, dy] = [x - d.start[0], y - d.start[1]];
    const [x0, y0, x1, y1] = d.orig;
    if (d.kind === "move") {
      const mx = Math.min(Math.max(dx, -x0), 1 - x1), my = Math.min(Math.max(dy, -y0), 1 - y1);
      b.box = [x0 + mx, y0 + my, x1 + mx, y1 + my];
    } else {
      b.box = [x0, y0, Math.max(x0 + 0.02, Math.min(1, x1 + dx)), Math.max(y0 + 0.02, Math.min(1, y1 + dy))];
    }
  }
  drawCanvas();
}

function onUp(ev) {
  const d = state.drag;
  if (!d) return;
  onMove(ev);
  state.drag = null;
  if (d.kind === "new") {
    const [x0, y0, x1, y1] = d.box;
    if (x1 - x0 > 0.02 && y1 - y0 > 0.02) {
      const token = state.model && state.model.concepts[state.boxes.length % Math.max(1, state.model.concepts.length)];
      state.boxes.push({ box: d.box.map(round3), prompt: token ? `a ${token.token}` : "", negative_prompt: "", adapter_weights: {} });
    }
  } else {
    const b = state.boxes[d.index];
    b.box = b.box.map(round3);
  }
  renderBoxes();
}

// --- actions --------------------------------------------------------------------------------
async function render() {
  showError();
  $("render").disabled = true;
  $("progress").value = 0;
  $("status").textContent = "rendering...";
  try {
    let job = await api("/api/render", { scene: scene(), grid: numberOr("grid", 1) });
    while (job.state === "running") {
      await new Promise((r) => setTimeout(r, 150));
      job = await api(`/api/job/${job.id}`);
      $("progress").max = job.total || 1;
      $("progress").value = job.done;
      $("status").textContent = `step ${job.done} of ${job.total}`;
    }
    if (job.state === "failed") throw new Error(job.error);
    $("progress").value = $("progress").max;
    $("status").textContent = `rendered in ${job.seconds} s`;
    await showCommand();
    const img = $("result");
    state.resultSingle = numberOr("grid", 1) === 1;  // a single image lies under the boxes
    img.onload = () => { state.result = img; drawCanvas(); };
    img.src = job.image;
    img.dataset.job = job.id;
    $("download").href = job.image;
    $("download").hidden = false;
  } catch (err) {
    showError(err);
    $("status").textContent = "";
  } finally {
    $("render").disabled = false;
  }
}

async function showCommand() {
  const data = await api("/api/command", { scene: scene(), grid: numberOr("grid", 1) });
  $("command").value = data.command;
  return data;
}

async function copyCommand() {
  showError();
  try {
    const data = await showCommand();
    $("command").select();
    if (navigator.clipboard) await navigator.clipboard.writeText(data.command).catch(() => {});
    $("status").textContent = "command copied" + (data.command.includes("--scene") ? " (save the scene as scene.json beside it)" : "");
  } catch (err) { showError(err); }
}

async function saveScene() {
  showError();
  try {
    const data = await api("/api/scene", { scene: scene() });
    const blob = new Blob([JSON.stringify(data.scene, null, 2)], { type: "application/json" });
    const a = el("a", { href: URL.createObjectURL(blob), download: "scene.json" });
    document.body.append(a);
    a.click();
    a.remove();
    $("status").textContent = "scene saved";
  } catch (err) { showError(err); }
}

async function openScene(ev) {
  showError();
  const file = ev.target.files[0];
  if (!file) return;
  try {
    const data = await api("/api/read-scene", await file.arrayBuffer(), true);
    setScene(data.scene);
    $("status").textContent = `scene from ${file.name}`;
  } catch (err) { showError(err); }
  ev.target.value = "";
}

async function uploadCondition(ev) {
  showError();
  const file = ev.target.files[0];
  if (!file) return;
  try {
    state.adapterImage = (await api("/api/condition", await file.arrayBuffer(), true)).path;
    $("adapter-image-path").textContent = state.adapterImage;
  } catch (err) { showError(err); }
}

window.addEventListener("DOMContentLoaded", async () => {
  const c = $("canvas");
  c.addEventListener("pointerdown", (ev) => { c.setPointerCapture(ev.pointerId); onDown(ev); });
  c.addEventListener("pointermove", onMove);
  c.addEventListener("pointerup", onUp);
  $("open-model").addEventListener("click", openModel);
  $("render").addEventListener("click", render);
  $("copy-command").addEventListener("click", copyCommand);
  $("save-scene").addEventListener("click", saveScene);
  $("open-scene").addEventListener("change", openScene);
  $("adapter-image").addEventListener("change", uploadCondition);
  $("width").addEventListener("change", resizeCanvas);
  $("height").addEventListener("change", resizeCanvas);
  for (const id of ["prompt", "negative"]) $(id).addEventListener("focus", () => { state.focused = $(id); });
  try {
    showModel(await api("/api/model"));
    document.body.dataset.ready = "1";
  } catch (err) { showError(err); }
});
