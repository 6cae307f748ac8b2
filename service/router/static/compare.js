// The before/after comparison: slider or side by side, the split, and the zoom (Fit, 1:1, the
// Zoom slider, Ctrl + wheel). Both images are laid out at the output's resolution times the zoom.

import { renderOverlay } from "./boxes.js";
import { $ } from "./dom.js";
import { renderFacts } from "./facts.js";
import { renderHints } from "./hints.js";
import { afterImg, beforeImg, overlay, scales, stage } from "./frame.js";
import { state } from "./state.js";

/** Size the stage, both images and the overlay for the selected result at the current zoom. */
export function layout() {
  const item = state.selected;
  if (!item || !item.result || !afterImg.naturalWidth) return;
  const { width, height } = scales();
  if (state.fitOnLoad) {
    state.fitOnLoad = false;
    fitZoom();
    return;
  }
  const w = Math.round(width * state.zoom);
  const h = Math.round(height * state.zoom);
  const side = stage.classList.contains("mode-side");
  stage.style.width = side ? `${2 * w + 16}px` : `${w}px`;
  stage.style.height = `${h}px`;
  for (const img of [beforeImg, afterImg]) {
    img.style.width = `${w}px`;
    img.style.height = `${h}px`;
  }
  overlay.setAttribute("viewBox", `0 0 ${width} ${height}`);
  overlay.style.width = `${w}px`;
  overlay.style.height = `${h}px`;
  $("zoom").value = String(Math.round(state.zoom * 100));
  $("zoom-value").textContent = `${Math.round(state.zoom * 100)}%`;
  applySplit();
  renderOverlay();
  renderHints();
  renderFacts(item);
}

// The largest zoom at which the whole comparison is visible without scrolling.
function fitZoom() {
  const { width, height } = scales();
  const side = stage.classList.contains("mode-side");
  const scroll = $("stage-scroll");
  const room = scroll.clientWidth - 4;
  const across = (side ? (room - 16) / 2 : room) / width;
  const down = (Number.parseFloat(getComputedStyle(scroll).maxHeight) - 4) / height;
  setZoom(Math.min(across, Number.isFinite(down) ? down : across));
}

function setZoom(value) {
  state.zoom = Math.min(4, Math.max(0.1, value));
  layout();
}

function applySplit() {
  const split = Number($("split").value);
  stage.style.setProperty("--split", `${split}%`);
}

export function installCompare() {
  beforeImg.addEventListener("error", () => {
    // The browser cannot show this format (e.g. TIFF): show the result's lightness instead.
    const item = state.selected;
    if (item && item.resultUrl && beforeImg.src !== item.resultUrl) {
      beforeImg.classList.add("fallback");
      beforeImg.src = item.resultUrl;
    }
  });
  afterImg.addEventListener("load", () => layout());

  $("zoom").addEventListener("input", () => setZoom(Number($("zoom").value) / 100));
  $("zoom-fit").addEventListener("click", fitZoom);
  $("zoom-actual").addEventListener("click", () => setZoom(1));
  $("stage-scroll").addEventListener("wheel", (event) => {
    if (!event.ctrlKey) return; // ctrl + wheel zooms the image, a plain wheel scrolls
    event.preventDefault();
    setZoom(state.zoom * (event.deltaY < 0 ? 1.1 : 1 / 1.1));
  }, { passive: false });

  for (const radio of document.querySelectorAll('input[name="mode"]')) {
    radio.addEventListener("change", () => {
      const side = radio.value === "side" && radio.checked;
      stage.classList.toggle("mode-side", side);
      stage.classList.toggle("mode-slider", !side);
      $("split-row").hidden = side;
      fitZoom();
    });
  }

  $("split").addEventListener("input", applySplit);

  window.addEventListener("resize", () => {
    if (state.selected && state.selected.result) layout();
  });
}
