// The image viewer: canvas with zoom and pan, server-side display windowing, the model's
// prediction drawn over the image, and the tools of the task's kind (gate, classifier,
// detector). Boxes are [x_min, y_min, x_max, y_max] in image pixels, x_max/y_max exclusive.
"use strict";

const TIER = document.body.dataset.tier;
const IMAGE_ID = document.body.dataset.imageId;
const TASK_PATH = `/api/tasks/${encodeURIComponent(TIER)}/${encodeURIComponent(IMAGE_ID)}`;
const HANDLE_PX = 7; // grab distance of a box corner, in screen pixels
const MIN_BOX_PX = 2; // smaller drags are treated as clicks, not boxes

const canvas = document.getElementById("view");
const g = canvas.getContext("2d");

const V = {
  task: null,
  image: new Image(),
  loaded: false,
  zoom: 1,
  panX: 0,
  panY: 0,
  boxes: [], // {x_min, y_min, x_max, y_max, label, score, state: predicted|accepted|rejected|drawn}
  selected: -1,
  mode: "select", // or "draw"
  drag: null,
  gate: null, // "clear" | "unclear" | null
  labels: new Set(),
  saved: false,
  readOnly: false,
};

// -- geometry ------------------------------------------------------------------------------
function toImage(event) {
  const rect = canvas.getBoundingClientRect();
  const sx = event.clientX - rect.left;
  const sy = event.clientY - rect.top;
  return { sx, sy, x: (sx - V.panX) / V.zoom, y: (sy - V.panY) / V.zoom };
}

function imageSize() {
  return V.task ? V.task.image : { width: 1, height: 1 };
}

function normalise(box) {
  const { width, height } = imageSize();
  const clamp = (v, hi) => Math.min(Math.max(Math.round(v), 0), hi);
  const x0 = clamp(Math.min(box.x_min, box.x_max), width);
  const x1 = clamp(Math.max(box.x_min, box.x_max), width);
  const y0 = clamp(Math.min(box.y_min, box.y_max), height);
  const y1 = clamp(Math.max(box.y_min, box.y_max), height);
  box.x_min = x0;
  box.x_max = Math.max(x1, Math.min(x0 + 1, width));
  box.y_min = y0;
  box.y_max = Math.max(y1, Math.min(y0 + 1, height));
  if (box.x_max <= box.x_min) box.x_min = box.x_max - 1;
  if (box.y_max <= box.y_min) box.y_min = box.y_max - 1;
}

const CORNERS = [
  ["x_min", "y_min"],
  ["x_max", "y_min"],
  ["x_min", "y_max"],
  ["x_max", "y_max"],
];

function hitCorner(box, p) {
  for (const [kx, ky] of CORNERS) {
    const dx = (box[kx] - p.x) * V.zoom;
    const dy = (box[ky] - p.y) * V.zoom;
    if (Math.hypot(dx, dy) <= HANDLE_PX) return [kx, ky];
  }
  return null;
}

function hitBox(p) {
  for (let i = V.boxes.length - 1; i >= 0; i--) {
    const b = V.boxes[i];
    if (b.state === "rejected") continue;
    if (p.x >= b.x_min && p.x < b.x_max && p.y >= b.y_min && p.y < b.y_max) return i;
  }
  return -1;
}

function fit() {
  const { width, height } = imageSize();
  const cw = canvas.clientWidth;
  const ch = canvas.clientHeight;
  V.zoom = Math.min(cw / width, ch / height);
  V.panX = (cw - width * V.zoom) / 2;
  V.panY = (ch - height * V.zoom) / 2;
  draw();
}

function zoomAt(sx, sy, factor) {
  const zoom = Math.min(Math.max(V.zoom * factor, 0.02), 64);
  V.panX = sx - ((sx - V.panX) * zoom) / V.zoom;
  V.panY = sy - ((sy - V.panY) * zoom) / V.zoom;
  V.zoom = zoom;
  draw();
}

// -- drawing -------------------------------------------------------------------------------
const STYLE = {
  predicted: { colour: "#ff00c8", dash: [6, 4] },
  accepted: { colour: "#39e639", dash: [] },
  drawn: { colour: "#ffd400", dash: [] },
  rejected: { colour: "#888888", dash: [2, 4] },
};

function draw() {
  const dpr = window.devicePixelRatio || 1;
  const cw = canvas.clientWidth;
  const ch = canvas.clientHeight;
  if (canvas.width !== Math.round(cw * dpr) || canvas.height !== Math.round(ch * dpr)) {
    canvas.width = Math.round(cw * dpr);
    canvas.height = Math.round(ch * dpr);
  }
  g.setTransform(1, 0, 0, 1, 0, 0);
  g.fillStyle = "#151515";
  g.fillRect(0, 0, canvas.width, canvas.height);
  if (!V.loaded) return;
  g.setTransform(dpr * V.zoom, 0, 0, dpr * V.zoom, dpr * V.panX, dpr * V.panY);
  g.imageSmoothingEnabled = V.zoom < 2;
  g.drawImage(V.image, 0, 0);

  // Boxes and their labels in screen space, so lines and text keep their size at any zoom.
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.font = "13px sans-serif";
  g.textBaseline = "bottom";
  V.boxes.forEach((b, i) => {
    const style = STYLE[b.state];
    const x = V.panX + b.x_min * V.zoom;
    const y = V.panY + b.y_min * V.zoom;
    const w = (b.x_max - b.x_min) * V.zoom;
    const h = (b.y_max - b.y_min) * V.zoom;
    g.setLineDash(style.dash);
    g.lineWidth = i === V.selected ? 3 : 2;
    g.strokeStyle = style.colour;
    g.strokeRect(x, y, w, h);
    g.setLineDash([]);
    const text = b.state === "predicted" || b.state === "rejected" ? `${b.label} ${b.score.toFixed(2)}` : b.label;
    const tw = g.measureText(text).width;
    g.fillStyle = "rgba(0,0,0,0.65)";
    g.fillRect(x, y - 16, tw + 6, 16);
    g.fillStyle = style.colour;
    g.fillText(text, x + 3, y - 1);
    if (i === V.selected) {
      g.fillStyle = style.colour;
      for (const [kx, ky] of CORNERS) {
        g.fillRect(V.panX + b[kx] * V.zoom - 4, V.panY + b[ky] * V.zoom - 4, 8, 8);
      }
    }
  });

  // Image-level prediction (gate, classifier) in the top-left corner, like the overlay.
  if (V.task.kind !== "detector") {
    const lines = Object.entries(V.task.scores)
      .sort((a, b) => b[1] - a[1])
      .map(([label, score]) => `${label} ${score.toFixed(2)}`);
    lines.unshift(`${V.task.tier} · ${V.task.model_version}`);
    g.font = "14px sans-serif";
    g.textBaseline = "top";
    lines.forEach((line, i) => {
      const tw = g.measureText(line).width;
      g.fillStyle = "rgba(0,0,0,0.7)";
      g.fillRect(6, 6 + i * 19, tw + 8, 18);
      g.fillStyle = "#00c8ff";
      g.fillText(line, 10, 8 + i * 19);
    });
  }
  canvas.dataset.zoom = String(V.zoom);
  canvas.dataset.panX = String(V.panX);
  canvas.dataset.panY = String(V.panY);
  canvas.classList.toggle("drawing", V.mode === "draw");
}

// -- panel ---------------------------------------------------------------------------------
function renderMeta() {
  const t = V.task;
  const rows = [
    ["tier", `${t.tier} (${t.kind})`],
    ["study", t.study || "—"],
    ["model", `${t.model_name} ${t.model_version}`],
    ["priority", t.priority.toFixed(3)],
    ["image", `${t.image.width}×${t.image.height} ${t.image.dtype} ×${t.image.channels}`],
    ["source", t.uri || "inline bytes"],
  ];
  const meta = document.getElementById("meta");
  meta.replaceChildren(...rows.flatMap(([k, v]) => [PC.el("dt", {}, k), PC.el("dd", {}, v)]));
  const scores = document.getElementById("scores");
  scores.replaceChildren(
    ...Object.entries(t.scores)
      .sort((a, b) => b[1] - a[1])
      .map(([label, score]) => PC.el("li", {}, PC.el("span", {}, label), PC.el("meter", { min: 0, max: 1, value: score }), score.toFixed(3))),
  );
}

function renderGate() {
  document.getElementById("gate-clear").classList.toggle("on", V.gate === "clear");
  document.getElementById("gate-unclear").classList.toggle("on", V.gate === "unclear");
}

// A label the tier decided itself (per-label routing): shown with the model's answer, not asked.
function decided(label) {
  const ask = V.task.ask || [];
  return V.task.kind === "classifier" && ask.length > 0 && !ask.includes(label);
}

function renderClasses() {
  const holder = document.getElementById("classes");
  holder.replaceChildren(
    ...V.task.classes.map((label, i) => {
      const fixed = decided(label);
      const box = PC.el("input", { type: "checkbox", value: label, checked: V.labels.has(label), "data-label": label, disabled: fixed });
      box.addEventListener("change", () => {
        if (box.checked) V.labels.add(label);
        else V.labels.delete(label);
      });
      const score = V.task.scores[label];
      const note = fixed ? " decided by the model" : "";
      return PC.el("label", { class: fixed ? "class decided" : "class asked", "data-asked": String(!fixed) }, box, ` ${i < 9 ? i + 1 + " · " : ""}${label}`, PC.el("small", {}, (score === undefined ? "" : ` ${score.toFixed(2)}`) + note));
    }),
  );
}

function renderBoxes() {
  const list = document.getElementById("box-list");
  list.replaceChildren(
    ...V.boxes.map((b, i) => {
      const select = PC.el("select", { "aria-label": "box label" }, ...V.task.classes.map((c) => PC.el("option", { value: c, selected: c === b.label }, c)));
      select.addEventListener("change", () => {
        b.label = select.value;
        if (b.state === "predicted") b.state = "accepted";
        renderBoxes();
        draw();
      });
      const buttons = [];
      if (b.state === "predicted" || b.state === "rejected") buttons.push(button("Accept", () => setState(i, "accepted")));
      if (b.state !== "rejected" && b.state !== "drawn") buttons.push(button("Reject", () => setState(i, "rejected")));
      if (b.state === "drawn") buttons.push(button("Delete", () => removeBox(i)));
      const coords = `${b.x_min},${b.y_min} – ${b.x_max},${b.y_max}`;
      const item = PC.el(
        "li",
        { class: `box ${b.state}${i === V.selected ? " selected" : ""}`, "data-state": b.state, "data-coords": coords },
        PC.el("span", { class: "state" }, b.state),
        select,
        PC.el("span", { class: "coords" }, coords),
        b.state === "predicted" || b.state === "rejected" ? PC.el("small", {}, ` p=${b.score.toFixed(2)}`) : "",
        ...buttons,
      );
      item.addEventListener("click", (event) => {
        if (event.target.closest("button, select")) return;
        V.selected = i;
        renderBoxes();
        draw();
      });
      return item;
    }),
  );
}

function button(text, onClick) {
  const node = PC.el("button", { type: "button" }, text);
  node.addEventListener("click", (event) => {
    event.stopPropagation();
    onClick();
  });
  return node;
}

function setState(i, state) {
  if (i < 0 || i >= V.boxes.length) return;
  V.boxes[i].state = state;
  renderBoxes();
  draw();
}

function removeBox(i) {
  if (i < 0 || i >= V.boxes.length) return;
  if (V.boxes[i].state === "drawn") {
    V.boxes.splice(i, 1);
    V.selected = -1;
  } else {
    V.boxes[i].state = "rejected";
  }
  renderBoxes();
  draw();
}

// -- windowing -----------------------------------------------------------------------------
let windowTimer = null;

function windowValues() {
  const low = Number(document.getElementById("w-low").value);
  const high = Number(document.getElementById("w-high").value);
  return [Math.min(low, high - 1), Math.max(high, low + 1)];
}

function loadImage() {
  const [low, high] = windowValues();
  document.getElementById("w-range").textContent = `${low} – ${high}`;
  V.image.src = `${TASK_PATH}/image?low=${low}&high=${high}`;
}

function setupWindow(info) {
  const low = document.getElementById("w-low");
  const high = document.getElementById("w-high");
  // 8-bit sliders span the whole range; 16-bit ones the data's range, where the signal is.
  const eightBit = info.dtype === "uint8";
  const bottom = eightBit ? 0 : Math.min(info.data_min, Math.floor(info.window_low));
  const top = eightBit ? info.max_value : Math.max(info.data_max, Math.ceil(info.window_high), bottom + 1);
  for (const input of [low, high]) {
    input.min = String(bottom);
    input.max = String(top);
    input.step = "1";
  }
  low.value = String(Math.floor(info.window_low));
  high.value = String(Math.ceil(info.window_high));
  const changed = () => {
    clearTimeout(windowTimer);
    windowTimer = setTimeout(loadImage, 120);
  };
  low.addEventListener("input", changed);
  high.addEventListener("input", changed);
  document.getElementById("w-auto").addEventListener("click", () => {
    low.value = String(Math.floor(info.window_low));
    high.value = String(Math.ceil(info.window_high));
    loadImage();
  });
}

// -- actions -------------------------------------------------------------------------------
function choose(gate) {
  if (V.task.kind !== "gate" || V.readOnly) return;
  V.gate = gate;
  renderGate();
  PC.status(`${gate} — press Enter to save`);
}

function toggleClass(index) {
  const label = V.task.classes[index];
  if (label === undefined || decided(label)) return;
  if (V.task.kind === "classifier") {
    if (V.labels.has(label)) V.labels.delete(label);
    else V.labels.add(label);
    renderClasses();
  } else if (V.task.kind === "detector") {
    document.getElementById("box-label").value = label;
    if (V.selected >= 0) {
      V.boxes[V.selected].label = label;
      if (V.boxes[V.selected].state === "predicted") V.boxes[V.selected].state = "accepted";
      renderBoxes();
      draw();
    }
  }
}

function annotationBody() {
  const body = { image_id: IMAGE_ID, tier: TIER, labels: [], boxes: [] };
  if (V.task.kind === "gate") body.labels = V.gate === "clear" ? [V.task.classes[0]] : [];
  else if (V.task.kind === "classifier") body.labels = [...V.labels].sort();
  else {
    body.boxes = V.boxes
      .filter((b) => b.state === "accepted" || b.state === "drawn")
      .map((b) => ({ x_min: b.x_min, y_min: b.y_min, x_max: b.x_max, y_max: b.y_max, label: b.label }));
  }
  return body;
}

async function save() {
  if (!V.task || V.saved || V.readOnly) return;
  if (V.task.kind === "gate" && V.gate === null) {
    PC.status("Choose clear (c) or unclear (u) first.", "error");
    return;
  }
  PC.status("Saving…");
  try {
    const result = await PC.api("POST", "/api/annotations", annotationBody());
    V.saved = true;
    document.body.classList.add("saved");
    PC.status(`Saved ${result.annotation_id}` + (result.reentered ? " — the image re-enters the cascade." : ".") + " Press n for the next task.", "ok");
  } catch (error) {
    PC.status(`Not saved: ${error.message}`, "error");
  }
}

async function next() {
  const filters = new URLSearchParams(location.search);
  const q = new URLSearchParams(filters);
  q.set("limit", "5");
  const data = await PC.api("GET", "/api/tasks?" + q.toString());
  const task = data.tasks.find((t) => !(t.tier === TIER && t.image_id === IMAGE_ID));
  if (!task) {
    PC.status("No other task waits for these filters.", "ok");
    return;
  }
  const suffix = filters.toString() ? "?" + filters.toString() : "";
  location.href = `/tasks/${encodeURIComponent(task.tier)}/${encodeURIComponent(task.image_id)}${suffix}`;
}

function startDraw() {
  if (V.task.kind !== "detector" || V.readOnly) return;
  V.mode = "draw";
  PC.status("Drag on the image to draw a box (Esc cancels).");
  draw();
}

// -- mouse ---------------------------------------------------------------------------------
canvas.addEventListener("mousedown", (event) => {
  if (!V.loaded || event.button !== 0) return;
  canvas.focus();
  const p = toImage(event);
  const editable = V.task.kind === "detector" && !V.readOnly;
  if (editable && V.mode === "draw") {
    const label = document.getElementById("box-label").value;
    V.boxes.push({ x_min: p.x, y_min: p.y, x_max: p.x, y_max: p.y, label, score: 1, state: "drawn" });
    V.selected = V.boxes.length - 1;
    V.drag = { type: "new", start: p };
    return;
  }
  if (editable && V.selected >= 0) {
    const corner = hitCorner(V.boxes[V.selected], p);
    if (corner) {
      V.drag = { type: "resize", corner };
      return;
    }
  }
  const hit = editable ? hitBox(p) : -1;
  if (hit >= 0) {
    V.selected = hit;
    const b = V.boxes[hit];
    V.drag = { type: "move", start: p, orig: { ...b } };
    renderBoxes();
    draw();
    return;
  }
  if (editable && V.selected >= 0) {
    V.selected = -1;
    renderBoxes();
  }
  V.drag = { type: "pan", sx: p.sx, sy: p.sy, panX: V.panX, panY: V.panY };
  draw();
});

window.addEventListener("mousemove", (event) => {
  if (!V.drag) return;
  const p = toImage(event);
  const d = V.drag;
  if (d.type === "pan") {
    V.panX = d.panX + (p.sx - d.sx);
    V.panY = d.panY + (p.sy - d.sy);
  } else if (d.type === "new") {
    const b = V.boxes[V.selected];
    b.x_min = d.start.x;
    b.y_min = d.start.y;
    b.x_max = p.x;
    b.y_max = p.y;
  } else if (d.type === "move") {
    const b = V.boxes[V.selected];
    const { width, height } = imageSize();
    const w = d.orig.x_max - d.orig.x_min;
    const h = d.orig.y_max - d.orig.y_min;
    b.x_min = Math.min(Math.max(d.orig.x_min + p.x - d.start.x, 0), width - w);
    b.y_min = Math.min(Math.max(d.orig.y_min + p.y - d.start.y, 0), height - h);
    b.x_max = b.x_min + w;
    b.y_max = b.y_min + h;
  } else if (d.type === "resize") {
    const b = V.boxes[V.selected];
    b[d.corner[0]] = p.x;
    b[d.corner[1]] = p.y;
  }
  draw();
});

window.addEventListener("mouseup", () => {
  const d = V.drag;
  if (!d) return;
  V.drag = null;
  if (d.type === "pan") return;
  const b = V.boxes[V.selected];
  const tooSmall = Math.abs(b.x_max - b.x_min) * V.zoom < MIN_BOX_PX || Math.abs(b.y_max - b.y_min) * V.zoom < MIN_BOX_PX;
  if (d.type === "new") {
    V.mode = "select";
    if (tooSmall) {
      V.boxes.splice(V.selected, 1);
      V.selected = -1;
      PC.status("Box too small: drag further.", "error");
    } else {
      normalise(b);
      PC.status(`Drew a ${b.label} box.`);
    }
  } else {
    const moved = ["x_min", "y_min", "x_max", "y_max"].some((k) => d.orig && d.orig[k] !== b[k]);
    normalise(b);
    if ((d.type === "resize" || moved) && b.state === "predicted") b.state = "accepted";
  }
  renderBoxes();
  draw();
});

canvas.addEventListener(
  "wheel",
  (event) => {
    if (!V.loaded) return;
    event.preventDefault();
    const p = toImage(event);
    zoomAt(p.sx, p.sy, Math.exp(-event.deltaY * 0.0015));
  },
  { passive: false },
);

// -- keys ----------------------------------------------------------------------------------
document.addEventListener("keydown", (event) => {
  if (!V.task || event.ctrlKey || event.metaKey || event.altKey) return;
  if (event.target.closest("input[type=text], input:not([type]), input[type=number], select, textarea")) return;
  const key = event.key;
  if (key === "c") choose("clear");
  else if (key === "u") choose("unclear");
  else if (key === "b") startDraw();
  else if (key === "a") setState(V.selected, "accepted");
  else if (key === "r") setState(V.selected, "rejected");
  else if (key === "Delete" || key === "Backspace") removeBox(V.selected);
  else if (key === "Enter") save();
  else if (key === "n") next();
  else if (key === "+" || key === "=") zoomAt(canvas.clientWidth / 2, canvas.clientHeight / 2, 1.25);
  else if (key === "-") zoomAt(canvas.clientWidth / 2, canvas.clientHeight / 2, 0.8);
  else if (key === "0") fit();
  else if (key === "Escape") {
    V.mode = "select";
    V.selected = -1;
    if (V.task.kind === "detector") renderBoxes();
    draw();
  } else if (/^[1-9]$/.test(key)) toggleClass(Number(key) - 1);
  else return;
  event.preventDefault();
});

// -- start ---------------------------------------------------------------------------------
async function start() {
  try {
    await PC.api("POST", `${TASK_PATH}/claim`);
  } catch (error) {
    V.readOnly = true;
    document.body.classList.add("read-only");
    PC.status(`Read only: ${error.message}`, "error");
  }
  try {
    V.task = await PC.api("GET", TASK_PATH);
  } catch (error) {
    PC.status(error.message, "error");
    return;
  }
  const t = V.task;
  document.getElementById(`tool-${t.kind}`).hidden = false;
  if (t.kind === "classifier") {
    for (const [label, score] of Object.entries(t.scores)) if (score >= 0.5) V.labels.add(label);
    renderClasses();
  } else if (t.kind === "detector") {
    V.boxes = t.boxes.map((b) => ({ ...b, state: "predicted" }));
    const select = document.getElementById("box-label");
    select.replaceChildren(...t.classes.map((c) => PC.el("option", { value: c }, c)));
    renderBoxes();
  }
  renderMeta();
  setupWindow(t.image);
  V.image.addEventListener("load", () => {
    const first = !V.loaded;
    V.loaded = true;
    if (first) fit();
    else draw();
    canvas.dataset.ready = "1";
  });
  V.image.addEventListener("error", () => PC.status("The image could not be loaded.", "error"));
  loadImage();
}

document.getElementById("gate-clear").addEventListener("click", () => choose("clear"));
document.getElementById("gate-unclear").addEventListener("click", () => choose("unclear"));
document.getElementById("new-box").addEventListener("click", startDraw);
document.getElementById("save").addEventListener("click", save);
document.getElementById("next").addEventListener("click", next);
document.getElementById("fit").addEventListener("click", fit);
window.addEventListener("resize", () => V.loaded && draw());
start();
