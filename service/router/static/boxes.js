// The boxes: drawn on the result with their number and score, listed under "Boxes used", removed,
// added from typed coordinates or drawn with the mouse (all in input pixels).

import { $, announce } from "./dom.js";
import { overlay, scales } from "./frame.js";
import { state } from "./state.js";

const SVG = "http://www.w3.org/2000/svg";

let drawing = false;
let dragStart = null;

/** Draw the selected item's boxes on the result; `preview` is a rectangle being dragged. */
export function renderOverlay(preview) {
  overlay.replaceChildren();
  const item = state.selected;
  if (!item || !item.boxes) return;
  overlay.classList.toggle("hidden-boxes", !$("show-boxes").checked);
  const { sx, sy } = scales();
  const stroke = 2 / state.zoom; // in output pixels: 2 and 13 screen pixels at any zoom
  const font = 13 / state.zoom;
  item.boxes.forEach((entry, i) => {
    const [x1, y1, x2, y2] = entry.box;
    const group = document.createElementNS(SVG, "g");
    group.classList.add("box", entry.score === null ? "drawn" : "detected");
    group.dataset.index = String(i);
    const rect = document.createElementNS(SVG, "rect");
    rect.setAttribute("x", x1 * sx);
    rect.setAttribute("y", y1 * sy);
    rect.setAttribute("width", (x2 - x1) * sx);
    rect.setAttribute("height", (y2 - y1) * sy);
    rect.setAttribute("stroke-width", stroke);
    const label = document.createElementNS(SVG, "text");
    label.setAttribute("x", x1 * sx + stroke * 2);
    label.setAttribute("y", y1 * sy + font + stroke);
    label.setAttribute("font-size", font);
    label.style.strokeWidth = String(3 / state.zoom);
    label.textContent = `${i + 1}: ${boxScore(entry)}`;
    group.append(rect, label);
    overlay.append(group);
  });
  if (preview) {
    const rect = document.createElementNS(SVG, "rect");
    rect.classList.add("preview");
    rect.setAttribute("x", Math.min(preview.x1, preview.x2));
    rect.setAttribute("y", Math.min(preview.y1, preview.y2));
    rect.setAttribute("width", Math.abs(preview.x2 - preview.x1));
    rect.setAttribute("height", Math.abs(preview.y2 - preview.y1));
    rect.setAttribute("stroke-width", stroke);
    overlay.append(rect);
  }
}

function boxScore(entry) {
  return entry.score === null ? "drawn" : entry.score.toFixed(2);
}

/** The list under "Boxes used" (and the overlay); adding is off once the instance limit is met. */
export function renderBoxes() {
  const item = state.selected;
  const list = $("box-list");
  list.replaceChildren();
  const boxes = item.boxes || [];
  if (!boxes.length) {
    const li = document.createElement("li");
    li.className = "hint";
    li.textContent = "No boxes: the whole image is colorized at once.";
    list.append(li);
  }
  boxes.forEach((entry, i) => {
    const li = document.createElement("li");
    li.className = "box-item";
    const text = document.createElement("span");
    text.textContent = `Box ${i + 1} · score ${boxScore(entry)} · [${entry.box.join(", ")}]`;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "button small";
    remove.textContent = "Remove";
    remove.setAttribute("aria-label", `Remove box ${i + 1}`);
    remove.addEventListener("click", () => removeBox(i));
    li.addEventListener("mouseenter", () => highlight(i, true));
    li.addEventListener("mouseleave", () => highlight(i, false));
    remove.addEventListener("focus", () => highlight(i, true));
    remove.addEventListener("blur", () => highlight(i, false));
    li.append(text, remove);
    list.append(li);
  });
  const full = boxes.length >= state.instanceLimit;
  $("draw-toggle").disabled = full;
  $("add-box-form").querySelector("button").disabled = full;
  renderOverlay();
}

function highlight(index, on) {
  const group = overlay.querySelector(`g[data-index="${index}"]`);
  if (group) group.classList.toggle("highlight", on);
}

function removeBox(index) {
  const item = state.selected;
  item.boxes.splice(index, 1);
  renderBoxes();
  announce(`Box ${index + 1} removed; ${item.boxes.length} left. Colorize again to apply.`);
  const buttons = $("box-list").querySelectorAll("button");
  (buttons[Math.min(index, buttons.length - 1)] || $("recolorize")).focus();
}

/** Add a box given in input pixels, clipped to the input; false (and said why) if too small. */
function addBox(box) {
  const item = state.selected;
  const [w, h] = scales().input;
  const clipped = [
    Math.max(0, Math.min(w, Math.round(Math.min(box[0], box[2])))),
    Math.max(0, Math.min(h, Math.round(Math.min(box[1], box[3])))),
    Math.max(0, Math.min(w, Math.round(Math.max(box[0], box[2])))),
    Math.max(0, Math.min(h, Math.round(Math.max(box[1], box[3])))),
  ];
  if (clipped[2] - clipped[0] < 2 || clipped[3] - clipped[1] < 2) {
    announce("That box is too small; draw a larger one.");
    return false;
  }
  item.boxes.push({ box: clipped, score: null });
  renderBoxes();
  announce(`Box ${item.boxes.length} added. Colorize again to apply.`);
  return true;
}

function setDrawing(on) {
  drawing = on;
  $("draw-toggle").setAttribute("aria-pressed", String(on));
  $("draw-toggle").textContent = on ? "Drawing: drag on the image (Esc stops)" : "Draw a box";
  overlay.classList.toggle("drawing", on);
}

/** A pointer event's position in output pixels, clamped to the image. */
function toOutput(event) {
  const rect = overlay.getBoundingClientRect();
  const { width, height } = scales();
  return {
    x: Math.min(width, Math.max(0, ((event.clientX - rect.left) / rect.width) * width)),
    y: Math.min(height, Math.max(0, ((event.clientY - rect.top) / rect.height) * height)),
  };
}

export function installBoxes() {
  $("show-boxes").addEventListener("change", () => renderOverlay());

  $("add-box-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const form = event.target;
    const box = ["x1", "y1", "x2", "y2"].map((name) => Number(form.elements[name].value));
    if (addBox(box)) form.reset();
  });

  $("draw-toggle").addEventListener("click", () => setDrawing(!drawing));
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && drawing) setDrawing(false);
  });

  overlay.addEventListener("pointerdown", (event) => {
    if (!drawing) return;
    event.preventDefault();
    overlay.setPointerCapture(event.pointerId);
    dragStart = toOutput(event);
  });
  overlay.addEventListener("pointermove", (event) => {
    if (!dragStart) return;
    const p = toOutput(event);
    renderOverlay({ x1: dragStart.x, y1: dragStart.y, x2: p.x, y2: p.y });
  });
  overlay.addEventListener("pointerup", (event) => {
    if (!dragStart) return;
    const p = toOutput(event);
    const { sx, sy } = scales();
    const start = dragStart;
    dragStart = null;
    if (!addBox([start.x / sx, start.y / sy, p.x / sx, p.y / sy])) renderOverlay();
    else setDrawing(false);
  });
}
