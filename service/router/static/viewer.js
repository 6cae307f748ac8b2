// "Compare and edit": which image is shown, and everything about it (images, download link,
// result panel, boxes), or why it cannot be shown yet.

import { renderBoxes } from "./boxes.js";
import { layout } from "./compare.js";
import { $ } from "./dom.js";
import { renderFacts } from "./facts.js";
import { afterImg, beforeImg } from "./frame.js";
import { renderHintList } from "./hints.js";
import { renderItem } from "./list.js";
import { renderSamples } from "./samples.js";
import { state } from "./state.js";

/** Show `item` in the viewer (a newly picked image is fitted); `focus` moves the focus there. */
export function select(item, focus) {
  const previous = state.selected;
  state.selected = item;
  if (previous && previous !== item) renderItem(previous);
  if (previous !== item) state.fitOnLoad = true;
  renderItem(item);
  renderViewer();
  if (focus && item.result) $("viewer").focus({ preventScroll: true });
}

export function renderViewer() {
  const item = state.selected;
  const ready = Boolean(item && item.result);
  $("viewer-body").hidden = !ready;
  $("viewer-empty").hidden = ready;
  if (!ready) {
    $("viewer-empty").textContent = item && item.error
      ? `${item.name} failed: ${item.error.title}. ${item.error.detail || ""}`
      : item ? `${item.name} is being colorized…` : "Pick an image on the left to see it here.";
    return;
  }
  if (afterImg.dataset.src !== item.resultUrl) {
    afterImg.dataset.src = item.resultUrl;
    afterImg.src = item.resultUrl;
  }
  if (beforeImg.dataset.src !== item.beforeUrl) {
    beforeImg.dataset.src = item.beforeUrl;
    beforeImg.classList.remove("fallback");
    beforeImg.src = item.beforeUrl;
  }
  const download = $("download");
  download.href = item.resultUrl;
  download.download = downloadName(item);
  renderFacts(item);
  renderBoxes();
  renderHintList();
  renderSamples(item);
  layout();
}

function downloadName(item) {
  const ext = { "image/jpeg": "jpg", "image/png": "png", "image/webp": "webp" }[item.result.media_type] || "img";
  const stem = item.name.replace(/\.[^.]+$/, "") || "image";
  const samples = item.result.samples || [];
  const picked = samples.length > 1 ? `-s${item.result.picked || 0}` : "";
  return `${stem}-colorized${picked}.${ext}`;
}
