// sam4med annotate: the page. Plain JavaScript, no build step, nothing fetched from outside this server.
"use strict";

const COLOURS = ["#ff3b30", "#34c759", "#007aff", "#ffcc00", "#af52de", "#ff9500", "#5ac8fa", "#ff2d55"];
const $ = (id) => document.getElementById(id);

const state = {
  images: [], clicks: true, volume: false, index: -1, info: null,
  objects: [], selected: -1, nextObjectId: 0,
  tool: "box", undo: [], redo: [],
  view: { scale: 1, x: 0, y: 0 }, drag: null, spaceDown: false,
  windowTimer: null,
};

// --- talking to the server ----------------------------------------------------------------
async function api(path, body) {
  const response = await fetch(path, body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  const data = await response.json();
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

function status(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function guarded(action) {
  try { await action(); } catch (error) { status(`error: ${error.message}`, true); }
}

// --- masks as pixels -----------------------------------------------------------------------
function pngToMask(base64) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => {
      const canvas = document.createElement("canvas");
      canvas.width = img.width; canvas.height = img.height;
      const context = canvas.getContext("2d");
      context.drawImage(img, 0, 0);
      const rgba = context.getImageData(0, 0, img.width, img.height).data;
      const mask = new Uint8Array(img.width * img.height);
      for (let i = 0; i < mask.length; i++) mask[i] = rgba[4 * i] > 127 ? 1 : 0;
      resolve(mask);
    };
    img.onerror = () => reject(new Error("the server sent an unreadable mask"));
    img.src = "data:image/png;base64," + base64;
  });
}

function maskToPng(mask) {
  const { width, height } = state.info;
  const canvas = document.createElement("canvas");
  canvas.width = width; canvas.height = height;
  const context = canvas.getContext("2d");
  const pixels = context.createImageData(width, height);
  for (let i = 0; i < mask.length; i++) {
    const v = mask[i] ? 255 : 0;
    pixels.data[4 * i] = pixels.data[4 * i + 1] = pixels.data[4 * i + 2] = v;
    pixels.data[4 * i + 3] = 255;
  }
  context.putImageData(pixels, 0, 0);
  return canvas.toDataURL("image/png").split(",")[1];
}

const area = (mask) => mask.reduce((sum, v) => sum + v, 0);

// an object's bounds [x0, y0, x1, y1] (inclusive) or null: drawing visits only them, so a page of a hundred
// found nuclei draws in the time of one image, not of a hundred
function boundsOf(mask) {
  const { width } = state.info;
  let x0 = Infinity, y0 = Infinity, x1 = -1, y1 = -1;
  for (let i = 0; i < mask.length; i++) {
    if (!mask[i]) continue;
    const x = i % width, y = (i - x) / width;
    if (x < x0) x0 = x;
    if (x > x1) x1 = x;
    if (y < y0) y0 = y;
    y1 = y;
  }
  return x1 < 0 ? null : [x0, y0, x1, y1];
}

function setMask(object, mask) {
  object.mask = mask;
  object.bounds = boundsOf(mask);
}

// --- objects, undo and redo ----------------------------------------------------------------
function newObject(label, mask) {
  const id = state.nextObjectId++;
  const { width, height } = state.info;
  const object = {
    id, label: label || `object ${id + 1}`, colour: COLOURS[id % COLOURS.length],
    prompt: { box: null, points: [], labels: [] }, found: false,
  };
  setMask(object, mask || new Uint8Array(width * height));
  return object;
}

function snapshot() {
  return {
    selected: state.selected,
    objects: state.objects.map((o) => ({ ...o, mask: o.mask.slice(), prompt: JSON.parse(JSON.stringify(o.prompt)) })),
  };
}

function remember() {
  state.undo.push(snapshot());
  if (state.undo.length > 100) state.undo.shift();
  state.redo = [];
}

function restore(from, to) {
  if (!from.length) return;
  to.push(snapshot());
  const saved = from.pop();
  state.objects = saved.objects;
  state.selected = saved.selected;
  for (const o of state.objects) api(`/api/images/${state.index}/forget`, { object: o.id }).catch(() => {});
  render();
}

function selected() {
  if (state.selected < 0 || state.selected >= state.objects.length) {
    state.objects.push(newObject());
    state.selected = state.objects.length - 1;
  }
  return state.objects[state.selected];
}

// --- prompts to masks ----------------------------------------------------------------------
async function segment(object, refine) {
  const prompt = object.prompt;
  const body = { object: object.id, refine };
  if (prompt.box) body.box = prompt.box;
  if (prompt.points.length) { body.points = prompt.points; body.labels = prompt.labels; }
  status("segmenting…");
  const result = await api(`/api/images/${state.index}/segment`, body);
  setMask(object, await pngToMask(result.mask));
  object.found = false;  // a prompt of its own now: its box is drawn like any other
  render();
  status(`${object.label}: ${result.area} px, predicted IoU ${result.iou.toFixed(3)}, ${Math.round(result.seconds * 1000)} ms`);
}

// a click with the box tool that draws no box selects the object under it (the last drawn, on top)
function selectAt(x, y) {
  const i = Math.floor(y) * state.info.width + Math.floor(x);
  for (let k = state.objects.length - 1; k >= 0; k--) {
    if (state.objects[k].mask[i]) { state.selected = k; render(); return; }
  }
}

async function addBox(x0, y0, x1, y1) {
  if (Math.abs(x1 - x0) < 2 || Math.abs(y1 - y0) < 2) { selectAt(x0, y0); return; }
  remember();
  const object = selected();
  object.prompt = { box: [Math.min(x0, x1), Math.min(y0, y1), Math.max(x0, x1), Math.max(y0, y1)], points: [], labels: [] };
  await segment(object, false);
}

async function addClick(x, y, positive) {
  if (!state.clicks) {
    status("this model takes boxes only: clicks need a click-capable model (--model litemedsam-click)", true);
    return;
  }
  remember();
  const object = selected();
  object.prompt.points.push([x, y]);
  object.prompt.labels.push(positive ? 1 : 0);
  await segment(object, true);
}

function paint(x, y, value) {
  const object = selected();
  const { width, height } = state.info;
  const r = Number($("brush-size").value);
  const [left, top] = [Math.max(0, Math.floor(x - r)), Math.max(0, Math.floor(y - r))];
  const [right, bottom] = [Math.min(width - 1, Math.ceil(x + r)), Math.min(height - 1, Math.ceil(y + r))];
  for (let yy = top; yy <= bottom; yy++) {
    for (let xx = left; xx <= right; xx++) {
      if ((xx - x) ** 2 + (yy - y) ** 2 <= r * r) object.mask[yy * width + xx] = value;
    }
  }
  if (value) {  // the brush can only widen the bounds; the eraser leaves them as they were (still holding the mask)
    const b = object.bounds;
    object.bounds = b ? [Math.min(b[0], left), Math.min(b[1], top), Math.max(b[2], right), Math.max(b[3], bottom)]
                      : [left, top, right, bottom];
  }
  render();
}

// Everything on tiles and a propagation through a volume take minutes: until the answer comes, the status line
// counts the steps (tiles, slices) done, as the server reports them for this task on this image.
async function withProgress(task, index, describe, request) {
  let waiting = true;
  const poll = setInterval(async () => {
    const progress = await api("/api/progress").catch(() => null);
    if (waiting && progress && progress.task === task && progress.image === index && progress.total > 1)
      status(describe(progress.done, progress.total));
  }, 1000);
  try { return await request; } finally { waiting = false; clearInterval(poll); }
}

async function findEverything() {
  const { width, height } = state.info;
  const taken = new Uint8Array(width * height);
  for (const object of state.objects) for (let i = 0; i < taken.length; i++) taken[i] |= object.mask[i];
  status("finding every object (everything mode)…");
  const index = state.index;
  const result = await withProgress(
    "everything", index, (done, total) => `finding every object (everything mode): ${done} of ${total} tiles done…`,
    api(`/api/images/${index}/everything`, area(taken) ? { taken: maskToPng(taken) } : {}));
  if (state.index !== index) {  // another image was opened meanwhile: these objects are not its
    status(`everything mode's objects of ${state.images[index].id} were left out: another image is open`, true);
    return;
  }
  remember();
  for (const found of result.objects) {
    const object = newObject(null, await pngToMask(found.mask));
    object.prompt.box = found.box;  // a click on it corrects it as on the mask of this box
    object.found = true;
    state.objects.push(object);
  }
  render();
  status(`everything mode found ${result.objects.length} more object(s) in ${result.seconds.toFixed(1)} s` +
         (result.objects.length ? "; click one to correct it, × to drop it" : ""));
  $("stage").dataset.found = String(result.objects.length);
}

// --- drawing -------------------------------------------------------------------------------
function render() {
  if (!state.info) return;
  const { width, height } = state.info;
  const overlay = $("overlay");
  const context = overlay.getContext("2d");
  const pixels = context.createImageData(width, height);
  const alpha = Math.round(2.55 * Number($("opacity").value));
  for (const object of state.objects) {
    if (!object.bounds) continue;
    const [r, g, b] = [1, 3, 5].map((i) => parseInt(object.colour.slice(i, i + 2), 16));
    const [x0, y0, x1, y1] = object.bounds;
    for (let y = y0; y <= y1; y++) {
      for (let i = y * width + x0; i <= y * width + x1; i++) {
        if (object.mask[i]) {
          pixels.data[4 * i] = r; pixels.data[4 * i + 1] = g; pixels.data[4 * i + 2] = b; pixels.data[4 * i + 3] = alpha;
        }
      }
    }
  }
  context.putImageData(pixels, 0, 0);
  const line = Math.max(1, 1.5 / state.view.scale);
  for (const [k, object] of state.objects.entries()) {
    const p = object.prompt;
    context.strokeStyle = object.colour;
    context.lineWidth = k === state.selected ? 2 * line : line;
    if (p.box && (!object.found || k === state.selected)) context.strokeRect(p.box[0], p.box[1], p.box[2] - p.box[0], p.box[3] - p.box[1]);
    p.points.forEach(([x, y], i) => {
      context.beginPath();
      context.arc(x, y, 4 * line, 0, 2 * Math.PI);
      context.fillStyle = p.labels[i] ? "#34c759" : "#ff3b30";
      context.fill();
      context.strokeStyle = "#fff";
      context.stroke();
    });
  }
  if (state.drag && state.drag.kind === "box") {
    const d = state.drag;
    context.strokeStyle = "#fff";
    context.setLineDash([4 * line, 3 * line]);
    context.strokeRect(d.x0, d.y0, d.x - d.x0, d.y - d.y0);
    context.setLineDash([]);
  }
  renderObjects();
  $("undo").disabled = !state.undo.length;
  $("redo").disabled = !state.redo.length;
}

function renderObjects() {
  const list = $("objects");
  list.replaceChildren();
  state.objects.forEach((object, k) => {
    const item = document.createElement("li");
    item.classList.toggle("selected", k === state.selected);
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = object.colour;
    const name = document.createElement("input");
    name.value = object.label;
    name.setAttribute("aria-label", "object label");
    name.onchange = () => { remember(); object.label = name.value.trim() || object.label; };
    const pixels = document.createElement("span");
    pixels.className = "area";
    const count = area(object.mask);
    pixels.dataset.area = String(count);
    pixels.textContent = `${count} px`;
    const remove = document.createElement("button");
    remove.textContent = "×";
    remove.title = "delete object";
    remove.onclick = (event) => {
      event.stopPropagation();
      remember();
      api(`/api/images/${state.index}/forget`, { object: object.id }).catch(() => {});
      state.objects.splice(k, 1);
      state.selected = Math.min(state.selected, state.objects.length - 1);
      render();
    };
    item.append(swatch, name, pixels, remove);
    item.onclick = () => { state.selected = k; render(); };
    list.append(item);
    if (k === state.selected) item.scrollIntoView({ block: "nearest" });  // selected on the image, among many
  });
}

function renderList() {
  const list = $("image-list");
  list.replaceChildren();
  const onlyOpen = $("only-unannotated").checked;
  for (const image of state.images) {
    if (onlyOpen && image.annotated && image.index !== state.index) continue;
    const item = document.createElement("li");
    item.textContent = image.id;
    item.classList.toggle("annotated", image.annotated);
    item.classList.toggle("current", image.index === state.index);
    item.onclick = () => guarded(() => openImage(image.index));
    list.append(item);
  }
  const done = state.images.filter((i) => i.annotated).length;
  $("progress-text").textContent = `${done} / ${state.images.length} annotated`;
  $("progress-bar").max = Math.max(1, state.images.length);
  $("progress-bar").value = done;
}

function applyView() {
  const v = state.view;
  $("view").style.transform = `translate(${v.x}px, ${v.y}px) scale(${v.scale})`;
}

function fit() {
  if (!state.info) return;
  const stage = $("stage").getBoundingClientRect();
  const scale = Math.min(stage.width / state.info.width, stage.height / state.info.height) * 0.98;
  state.view = { scale, x: (stage.width - state.info.width * scale) / 2, y: (stage.height - state.info.height * scale) / 2 };
  applyView();
  render();
}

// --- images --------------------------------------------------------------------------------
function loadPixels(low, high) {
  const query = low === undefined ? "" : `?low=${low}&high=${high}`;
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => {
      const canvas = $("image");
      canvas.width = img.width; canvas.height = img.height;
      canvas.getContext("2d").drawImage(img, 0, 0);
      resolve();
    };
    img.onerror = () => reject(new Error("cannot show this image"));
    img.src = `/api/images/${state.index}/pixels${query}`;
  });
}

async function openImage(index) {
  if (index < 0 || index >= state.images.length) return;
  state.index = index;
  state.info = await api(`/api/images/${index}`);
  $("image-name").textContent = `${state.info.id} (${index + 1} / ${state.images.length})`;
  for (const canvas of [$("image"), $("overlay")]) { canvas.width = state.info.width; canvas.height = state.info.height; }
  const windowed = state.info.gray || state.info.dtype !== "uint8";
  $("window-controls").hidden = !windowed;
  if (windowed) {
    for (const [id, value] of [["window-low", state.info.window[0]], ["window-high", state.info.window[1]]]) {
      const slider = $(id);
      slider.min = state.info.range[0]; slider.max = state.info.range[1];
      slider.step = (state.info.range[1] - state.info.range[0]) / 500 || 1;
      slider.value = value;
    }
  }
  await loadPixels();
  state.nextObjectId = 0;
  const saved = await api(`/api/images/${index}/objects`);
  state.objects = [];
  for (const o of saved.objects) state.objects.push(newObject(o.label, await pngToMask(o.mask)));
  state.selected = state.objects.length ? 0 : -1;
  state.undo = []; state.redo = [];
  renderList();
  fit();
  status(`${state.info.id}: computing the embedding…`);
  const opened = await api(`/api/images/${index}/open`, {});
  status(`${state.info.id}: ready in ${Math.round(opened.seconds * 1000)} ms` +
         (saved.objects.length ? `; ${saved.objects.length} saved object(s)` : ""));
  $("stage").dataset.ready = String(index);
}

function neighbour(step) {
  const onlyOpen = $("only-unannotated").checked;
  for (let i = state.index + step; i >= 0 && i < state.images.length; i += step) {
    if (!onlyOpen || !state.images[i].annotated) return i;
  }
  return -1;
}

async function save() {
  const objects = state.objects.filter((o) => area(o.mask) > 0).map((o) => ({ label: o.label, mask: maskToPng(o.mask) }));
  const result = await api(`/api/images/${state.index}/save`, { objects });
  state.images[state.index].annotated = true;
  renderList();
  const hidden = result.hidden.length ? `; not kept, wholly under a later object: ${result.hidden.join(", ")}` : "";
  status(`saved ${result.saved} (${objects.length} object(s); ${result.versions} earlier version(s) kept)${hidden}`);
  $("stage").dataset.saved = String(state.index);
}

async function propagateObject() {
  if (state.selected < 0 || !area(state.objects[state.selected].mask)) {
    status("select an object with a mask on this slice first", true);
    return;
  }
  const object = state.objects[state.selected];
  status(`${object.label}: propagating through the volume…`);
  const result = await withProgress(
    "propagate", state.index, (done, total) => `${object.label}: propagating, ${done} of at most ${total} slices…`,
    api(`/api/images/${state.index}/propagate`, {
      label: object.label, mask: maskToPng(object.mask),
      first: Number($("first-slice").value), last: Number($("last-slice").value),
    }));
  state.images = result.images;
  renderList();
  status(`${object.label}: carried to slices ${result.first}–${result.last} (${result.slices} slices) and saved`);
  $("stage").dataset.propagated = String(state.index);
}

// --- input -----------------------------------------------------------------------------------
function imagePoint(event) {
  const rect = $("overlay").getBoundingClientRect();
  const x = (event.clientX - rect.left) / rect.width * state.info.width;
  const y = (event.clientY - rect.top) / rect.height * state.info.height;
  return [Math.min(state.info.width - 1, Math.max(0, x)), Math.min(state.info.height - 1, Math.max(0, y))];
}

function setTool(tool) {
  state.tool = tool;
  document.querySelectorAll("[data-tool]").forEach((b) => b.classList.toggle("active", b.dataset.tool === tool));
}

function bind() {
  const stage = $("stage");
  stage.addEventListener("contextmenu", (event) => event.preventDefault());
  stage.addEventListener("wheel", (event) => {
    event.preventDefault();
    const rect = stage.getBoundingClientRect();
    const factor = Math.exp(-event.deltaY / 500);
    const v = state.view;
    const px = event.clientX - rect.left, py = event.clientY - rect.top;
    v.x = px - (px - v.x) * factor; v.y = py - (py - v.y) * factor; v.scale *= factor;
    applyView();
  }, { passive: false });
  stage.addEventListener("mousedown", (event) => {
    if (!state.info) return;
    if (event.button === 1 || state.spaceDown) {
      state.drag = { kind: "pan", x: event.clientX, y: event.clientY, vx: state.view.x, vy: state.view.y };
      return;
    }
    const [x, y] = imagePoint(event);
    if (event.button === 2) { guarded(() => addClick(x, y, false)); return; }
    if (state.tool === "box") state.drag = { kind: "box", x0: x, y0: y, x, y };
    else if (state.tool === "positive" || state.tool === "negative") guarded(() => addClick(x, y, state.tool === "positive"));
    else { remember(); state.drag = { kind: "paint" }; paint(x, y, state.tool === "brush" ? 1 : 0); }
  });
  window.addEventListener("mousemove", (event) => {
    const d = state.drag;
    if (!d) return;
    if (d.kind === "pan") {
      state.view.x = d.vx + event.clientX - d.x; state.view.y = d.vy + event.clientY - d.y;
      applyView();
      return;
    }
    const [x, y] = imagePoint(event);
    if (d.kind === "box") { d.x = x; d.y = y; render(); } else paint(x, y, state.tool === "brush" ? 1 : 0);
  });
  window.addEventListener("mouseup", () => {
    const d = state.drag;
    state.drag = null;
    if (d && d.kind === "box") guarded(() => addBox(d.x0, d.y0, d.x, d.y));
  });
  document.querySelectorAll("[data-tool]").forEach((b) => { b.onclick = () => setTool(b.dataset.tool); });
  $("prev").onclick = () => guarded(() => openImage(neighbour(-1)));
  $("next").onclick = () => guarded(() => openImage(neighbour(1)));
  $("undo").onclick = () => restore(state.undo, state.redo);
  $("redo").onclick = () => restore(state.redo, state.undo);
  $("clear").onclick = () => {
    if (state.selected < 0) return;
    remember();
    const object = state.objects[state.selected];
    setMask(object, new Uint8Array(object.mask.length));
    object.prompt = { box: null, points: [], labels: [] };
    api(`/api/images/${state.index}/forget`, { object: object.id }).catch(() => {});
    render();
  };
  $("save").onclick = () => guarded(save);
  $("propagate").onclick = () => guarded(propagateObject);
  $("everything").onclick = () => guarded(findEverything);
  $("accept").onclick = () => guarded(async () => { await save(); const next = neighbour(1); if (next >= 0) await openImage(next); });
  $("add-object").onclick = () => { remember(); state.objects.push(newObject()); state.selected = state.objects.length - 1; render(); };
  $("fit").onclick = fit;
  $("opacity").oninput = render;
  $("only-unannotated").onchange = renderList;
  for (const id of ["window-low", "window-high"]) {
    $(id).oninput = () => {
      clearTimeout(state.windowTimer);
      state.windowTimer = setTimeout(() => {
        const low = Number($("window-low").value), high = Number($("window-high").value);
        if (high > low) guarded(() => loadPixels(low, high));
      }, 120);
    };
  }
  window.addEventListener("resize", fit);
  window.addEventListener("keyup", (event) => { if (event.key === " ") state.spaceDown = false; });
  window.addEventListener("keydown", (event) => {
    if (event.target instanceof HTMLInputElement && ["text", "number"].includes(event.target.type)) return;
    const key = event.key.toLowerCase();
    if ((event.ctrlKey || event.metaKey) && key === "z") { event.preventDefault(); restore(state.undo, state.redo); return; }
    if ((event.ctrlKey || event.metaKey) && key === "y") { event.preventDefault(); restore(state.redo, state.undo); return; }
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    const actions = {
      b: () => setTool("box"), p: () => setTool("positive"), n: () => setTool("negative"),
      r: () => setTool("brush"), e: () => setTool("eraser"), o: () => $("add-object").click(), c: () => $("clear").click(),
      a: () => $("everything").click(), s: () => $("save").click(), enter: () => $("accept").click(), f: fit,
      v: () => { if (state.volume) $("propagate").click(); },
      arrowleft: () => $("prev").click(), arrowright: () => $("next").click(),
      " ": () => { state.spaceDown = true; },
    };
    if (actions[key]) { event.preventDefault(); actions[key](); }
  });
}

async function start() {
  bind();
  setTool("box");
  const info = await api("/api/state");
  state.images = info.images;
  state.clicks = info.clicks;
  state.volume = info.volume;
  $("volume-controls").hidden = !info.volume;
  for (const [id, value] of [["first-slice", 0], ["last-slice", info.total - 1]]) {
    $(id).max = info.total - 1;
    $(id).value = value;
  }
  $("folder").textContent = `${info.folder} · ${info.model}`;
  if (!info.clicks) {
    document.querySelectorAll('[data-tool="positive"], [data-tool="negative"]').forEach((b) => { b.disabled = true; });
    $("click-note").textContent = `${info.model} takes boxes only; clicks need a click-capable model (--model litemedsam-click).`;
    $("click-note").hidden = false;
  }
  renderList();
  await openImage(0);
}

guarded(start);
