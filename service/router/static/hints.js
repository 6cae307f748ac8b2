// Colour hints: points a person places on the picture, each with a colour, for the models that
// follow them (zhang-siggraph17, GET /models `takes_hints`). Click the picture to drop a point
// (in "Place hints" mode), drag a point to move it, pick its colour from the palette, the colour
// input or the current result ("Pick from result"), remove it from the list (or Delete). The
// points are drawn over both the before and the after view, in input pixels; the next request
// of the image sends exactly these points (queue.js reads `item.hints`).

import { $, announce } from "./dom.js";
import { afterImg, scales } from "./frame.js";
import { state } from "./state.js";

const SVG = "http://www.w3.org/2000/svg";
export const PALETTE = ["#3a7bd5", "#87ceeb", "#2e8b57", "#9acd32", "#b86a48", "#d2a679",
  "#c0392b", "#f1c40f", "#8e44ad", "#f5deb3"];
const MAX_HINTS = 64; // service/core/hints.py MAX_HINTS

let placing = false;
let sampling = false;
let drag = null; // {index, pointerId, moved}
let selectedIndex = -1;
let listedItem = null; // the item whose hints the list shows (a new item: nothing selected)

const layers = () => [...document.querySelectorAll(".hint-overlay")];

function hintsOf(item) {
  if (!item.hints) item.hints = [];
  return item.hints;
}

/** Size both hint layers as the comparison's images and draw the selected image's points. */
export function renderHints() {
  const item = state.selected;
  if (!item || !item.result) return;
  const { width, height, sx, sy } = scales();
  const r = 7 / state.zoom;
  for (const layer of layers()) {
    const img = layer.parentElement.querySelector("img");
    layer.setAttribute("viewBox", `0 0 ${width} ${height}`);
    layer.style.width = img.style.width;
    layer.style.height = img.style.height;
    layer.classList.toggle("placing", placing || sampling);
    layer.replaceChildren();
    hintsOf(item).forEach((hint, i) => {
      const mark = document.createElementNS(SVG, "circle");
      mark.classList.add("hint-mark");
      if (i === selectedIndex) mark.classList.add("selected");
      mark.dataset.index = String(i);
      mark.setAttribute("cx", (hint.x + 0.5) * sx);
      mark.setAttribute("cy", (hint.y + 0.5) * sy);
      mark.setAttribute("r", r);
      mark.setAttribute("fill", hint.color);
      mark.setAttribute("stroke-width", (i === selectedIndex ? 3 : 2) / state.zoom);
      layer.append(mark);
    });
  }
}

/** The list under "Colour hints" (and the marks). */
export function renderHintList() {
  const item = state.selected;
  if (!item) return;
  if (item !== listedItem) {
    listedItem = item;
    selectedIndex = -1;
  }
  const list = $("hint-list");
  list.replaceChildren();
  const hints = hintsOf(item);
  if (selectedIndex >= hints.length) selectedIndex = hints.length - 1;
  if (!hints.length) {
    const li = document.createElement("li");
    li.className = "hint";
    li.textContent = "No hints: the model chooses every colour.";
    list.append(li);
  }
  hints.forEach((hint, i) => {
    const li = document.createElement("li");
    li.className = "hint-item";
    li.dataset.index = String(i);
    if (i === selectedIndex) li.classList.add("selected");
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = hint.color;
    const text = document.createElement("button");
    text.type = "button";
    text.className = "link";
    text.textContent = `Hint ${i + 1} · (${hint.x}, ${hint.y}) · ${hint.color} · size ${hint.size}`;
    text.addEventListener("click", () => selectHint(i));
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "button small";
    remove.textContent = "Remove";
    remove.setAttribute("aria-label", `Remove hint ${i + 1}`);
    remove.addEventListener("click", () => removeHint(i));
    li.append(swatch, text, remove);
    list.append(li);
  });
  const model = item.result ? item.result.model : null;
  const option = model ? document.querySelector(`#opt-model option[value="${model}"]`) : null;
  const follows = option ? option.dataset.takesHints === "true" : null;
  $("hint-model-note").textContent = follows === false
    ? `${model} takes no hints: choose a model marked "follows hints" (zhang-siggraph17) above.`
    : "";
  renderHints();
}

function selectHint(index) {
  selectedIndex = index;
  const hint = hintsOf(state.selected)[index];
  if (hint) {
    $("hint-color").value = hint.color;
    $("hint-size").value = String(hint.size);
  }
  renderHintList();
}

function removeHint(index) {
  const hints = hintsOf(state.selected);
  hints.splice(index, 1);
  selectedIndex = Math.min(selectedIndex, hints.length - 1);
  renderHintList();
  announce(`Hint ${index + 1} removed; ${hints.length} left. Colorize again to apply.`);
}

/** Set the colour of the next point and of the selected one. */
function useColor(color) {
  $("hint-color").value = color;
  const hint = hintsOf(state.selected)[selectedIndex];
  if (hint) {
    hint.color = color;
    renderHintList();
  }
}

/** A pointer event's position in input pixels (integers inside the image). */
function toInput(event, layer) {
  const rect = layer.getBoundingClientRect();
  const { input } = scales();
  const fx = (event.clientX - rect.left) / rect.width;
  const fy = (event.clientY - rect.top) / rect.height;
  return {
    x: Math.min(input[0] - 1, Math.max(0, Math.floor(fx * input[0]))),
    y: Math.min(input[1] - 1, Math.max(0, Math.floor(fy * input[1]))),
  };
}

/** The result's colour at input pixel `p` (the after image, read through a canvas). */
function sampleResult(p) {
  const { sx, sy, width, height } = scales();
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  const context = canvas.getContext("2d", { willReadFrequently: true });
  context.drawImage(afterImg, 0, 0, width, height);
  const [r, g, b] = context.getImageData(Math.floor((p.x + 0.5) * sx),
    Math.floor((p.y + 0.5) * sy), 1, 1).data;
  return `#${[r, g, b].map((v) => v.toString(16).padStart(2, "0")).join("")}`;
}

function setPlacing(on) {
  placing = on;
  if (on) setSampling(false);
  $("hint-place").setAttribute("aria-pressed", String(on));
  $("hint-place").textContent = on ? "Placing: click the picture (Esc stops)" : "Place hints";
  renderHints();
}

function setSampling(on) {
  sampling = on;
  if (on && placing) setPlacing(false);
  $("hint-sample").setAttribute("aria-pressed", String(on));
  renderHints();
}

function onPointerDown(event) {
  if (!(placing || sampling) || !state.selected || !state.selected.result) return;
  const layer = event.currentTarget;
  event.preventDefault();
  const p = toInput(event, layer);
  if (sampling) {
    useColor(sampleResult(p));
    setSampling(false);
    announce(`Colour ${$("hint-color").value} picked from the result.`);
    return;
  }
  const hints = hintsOf(state.selected);
  const target = event.target.closest ? event.target.closest(".hint-mark") : null;
  let index = target ? Number(target.dataset.index) : -1;
  if (index < 0) {
    if (hints.length >= MAX_HINTS) {
      announce(`At most ${MAX_HINTS} hints; remove one first.`);
      return;
    }
    hints.push({ x: p.x, y: p.y, color: $("hint-color").value,
      size: Number($("hint-size").value) });
    index = hints.length - 1;
    announce(`Hint ${index + 1} placed at (${p.x}, ${p.y}). Colorize again to apply.`);
  }
  selectedIndex = index;
  layer.setPointerCapture(event.pointerId);
  drag = { index, pointerId: event.pointerId };
  renderHintList();
}

function onPointerMove(event) {
  if (!drag || event.pointerId !== drag.pointerId) return;
  const hint = hintsOf(state.selected)[drag.index];
  const p = toInput(event, event.currentTarget);
  if (hint && (hint.x !== p.x || hint.y !== p.y)) {
    hint.x = p.x;
    hint.y = p.y;
    renderHints();
  }
}

function onPointerUp(event) {
  if (!drag || event.pointerId !== drag.pointerId) return;
  drag = null;
  renderHintList();
}

export function installHints() {
  const palette = $("hint-palette");
  for (const color of PALETTE) {
    const swatch = document.createElement("button");
    swatch.type = "button";
    swatch.className = "swatch-button";
    swatch.style.background = color;
    swatch.dataset.color = color;
    swatch.setAttribute("aria-label", `Colour ${color}`);
    swatch.addEventListener("click", () => useColor(color));
    palette.append(swatch);
  }
  $("hint-color").addEventListener("input", () => useColor($("hint-color").value));
  $("hint-size").addEventListener("change", () => {
    const hint = hintsOf(state.selected)[selectedIndex];
    if (hint) {
      hint.size = Number($("hint-size").value);
      renderHintList();
    }
  });
  $("hint-place").addEventListener("click", () => setPlacing(!placing));
  $("hint-sample").addEventListener("click", () => setSampling(!sampling));
  $("hint-clear").addEventListener("click", () => {
    if (!state.selected) return;
    state.selected.hints = [];
    selectedIndex = -1;
    renderHintList();
    announce("All hints removed. Colorize again to apply.");
  });
  for (const layer of layers()) {
    layer.addEventListener("pointerdown", onPointerDown);
    layer.addEventListener("pointermove", onPointerMove);
    layer.addEventListener("pointerup", onPointerUp);
    layer.addEventListener("pointercancel", onPointerUp);
  }
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape") {
      if (placing) setPlacing(false);
      if (sampling) setSampling(false);
    }
    const typing = event.target instanceof HTMLInputElement || event.target instanceof HTMLSelectElement;
    const deleting = event.key === "Delete" || event.key === "Backspace";
    if (deleting && placing && !typing && state.selected && selectedIndex >= 0) {
      removeHint(selectedIndex);
    }
  });
}
