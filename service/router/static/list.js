// The list under "Images": one row per image with its thumbnail, status, progress, error and
// Retry button. What a row's buttons do is set once by the entry module (onRowActions).

import { $ } from "./dom.js";
import { state } from "./state.js";

const STATUS_TEXT = {
  waiting: "Waiting",
  uploading: "Uploading",
  colorizing: "Colorizing…",
  done: "Done",
  failed: "Failed",
  "needs-key": "Needs an API key",
};

const actions = { select: () => {}, retry: () => {} };

/** `select(item, focus)` when a row is picked, `retry(item)` when its Retry button is pressed. */
export function onRowActions({ select, retry }) {
  actions.select = select;
  actions.retry = retry;
}

/** Create the item's row on first call, then bring it up to date with the item. */
export function renderItem(item) {
  if (!item.li) {
    item.li = document.createElement("li");
    item.li.className = "queue-item";
    item.li.dataset.id = String(item.id);
    item.li.innerHTML = `
      <button type="button" class="item-select">
        <img class="thumb" alt="">
        <span class="item-text">
          <span class="item-name"></span>
          <span class="item-status" role="status"></span>
        </span>
      </button>
      <progress class="item-progress" max="1"></progress>
      <p class="item-error" hidden></p>
      <button type="button" class="button small item-retry" hidden>Retry</button>`;
    const thumb = item.li.querySelector(".thumb");
    thumb.addEventListener("error", () => thumb.classList.add("no-preview"), { once: true });
    thumb.src = item.beforeUrl;
    item.li.querySelector(".item-name").textContent = item.name;
    item.li.querySelector(".item-select").addEventListener("click", () => actions.select(item, true));
    item.li.querySelector(".item-retry").addEventListener("click", () => actions.retry(item));
    $("queue").append(item.li);
  }
  item.li.dataset.status = item.status;
  item.li.classList.toggle("selected", state.selected === item);
  item.li.querySelector(".item-select").setAttribute("aria-current", String(state.selected === item));
  let text = STATUS_TEXT[item.status];
  if (item.status === "uploading") text += ` ${Math.round(item.progress * 100)}%`;
  if (item.status === "done" && item.result) {
    text += ` · ${item.result.instances} box${item.result.instances === 1 ? "" : "es"} · ` +
      `${Math.round(item.result.timings_ms.total || 0)} ms`;
  }
  item.li.querySelector(".item-status").textContent = text;
  const progress = item.li.querySelector(".item-progress");
  progress.hidden = !["uploading", "colorizing", "waiting"].includes(item.status);
  if (item.status === "uploading") progress.value = item.progress;
  else progress.removeAttribute("value"); // indeterminate while the model works
  const retry = item.li.querySelector(".item-retry");
  retry.hidden = item.status !== "failed";
  retry.setAttribute("aria-label", `Retry ${item.name}`);
  const error = item.li.querySelector(".item-error");
  error.hidden = !item.error;
  if (item.error) {
    const parts = [`${item.error.title}${item.error.status ? ` (${item.error.status})` : ""}`];
    if (item.error.detail) parts.push(item.error.detail);
    if (item.error.requestId) parts.push(`request ${item.error.requestId}`);
    error.textContent = parts.join(": ");
  }
}
