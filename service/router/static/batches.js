// The "Batches" section: a .zip or .tar goes to POST /batches as its `archive` field; the batch
// shown is polled (GET /batches/{id}) for its request_counts until it ends, can be cancelled
// (POST /batches/{id}/cancel), and once done its results come from GET /batches/{id}/archive.
// The key's recent batches are listed from GET /batches. Every request carries the API key
// (apikey.js); a 401 opens the key form, any other refusal shows its problem+json detail.

import { askForKey, authHeaders } from "./apikey.js";
import { $, announce } from "./dom.js";

const POLL_MS = 1000;
const LIST_LIMIT = 10;
const ENDED = new Set(["completed", "failed", "expired", "cancelled"]);

let shown = null; // the batch object in "This batch"
let pollTimer = null;
let downloadUrl = null; // the blob: URL of the last downloaded archive

/** `{title, detail, status}` from a refused response's problem+json body (or its status line). */
async function problemOf(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  const retry = response.headers.get("Retry-After");
  return {
    title: (body && body.title) || `HTTP ${response.status}`,
    detail: ((body && body.detail) || response.statusText || "") +
      (retry ? ` (retry after ${retry} s)` : ""),
    status: response.status,
  };
}

/**
 * fetch with the key's headers; resolves to the Response if ok, else throws a problem. A 401
 * opens the key form only for what the person asked for (`ask`), not for the list on page load.
 */
async function call(path, init = {}, ask = true) {
  let response;
  try {
    response = await fetch(path, { ...init, headers: { ...authHeaders(), ...(init.headers || {}) } });
  } catch {
    throw { title: "Network error", detail: "Could not reach the service." };
  }
  if (response.ok) return response;
  const problem = await problemOf(response);
  if (response.status === 401) {
    if (ask) askForKey(problem.detail || "The batch API needs an API key.");
    problem.needsKey = true;
  }
  throw problem;
}

function showError(problem) {
  const error = $("batch-error");
  if (!problem) {
    error.hidden = true;
    error.textContent = "";
    return;
  }
  const head = `${problem.title}${problem.status ? ` (${problem.status})` : ""}`;
  error.textContent = problem.detail ? `${head}: ${problem.detail}` : head;
  error.hidden = false;
  announce(error.textContent);
}

function countsText(batch) {
  const c = batch.request_counts || { total: 0, completed: 0, failed: 0 };
  return `${c.completed + c.failed} of ${c.total} done` + (c.failed ? `, ${c.failed} failed` : "");
}

/** Bring "This batch" (status, progress bar, cancel, download) up to date with `batch`. */
function render(batch) {
  shown = batch;
  const c = batch.request_counts || { total: 0, completed: 0, failed: 0 };
  const ended = ENDED.has(batch.status);
  $("batch-current").hidden = false;
  $("batch-current").dataset.status = batch.status;
  $("batch-current").dataset.id = batch.id;
  $("batch-id").textContent = batch.id;
  $("batch-status").textContent = `${batch.status.replace("_", " ")} · ${countsText(batch)}`;
  const progress = $("batch-progress");
  progress.max = Math.max(1, c.total);
  progress.value = c.completed + c.failed;
  $("batch-cancel").hidden = ended || batch.status === "cancelling";
  const download = $("batch-download");
  download.hidden = !(batch.status === "completed" || (ended && c.completed > 0));
  download.href = `/batches/${encodeURIComponent(batch.id)}/archive`;
  download.setAttribute("download", `${batch.id}.zip`);
}

function stopPolling() {
  if (pollTimer !== null) clearTimeout(pollTimer);
  pollTimer = null;
}

/** Show batch `id` and poll it until it ends (then refresh the list once). */
async function follow(id) {
  stopPolling();
  try {
    const batch = await (await call(`/batches/${encodeURIComponent(id)}`)).json();
    if (shown && shown.id !== id) return; // another batch was picked meanwhile
    render(batch);
    if (ENDED.has(batch.status)) {
      announce(`Batch ${batch.status}: ${countsText(batch)}.`);
      loadBatches();
      return;
    }
  } catch (problem) {
    showError(problem);
    if (problem.needsKey || problem.status === 404) return;
  }
  pollTimer = setTimeout(() => follow(id), POLL_MS);
}

function pick(batch) {
  showError(null);
  shown = batch;
  render(batch);
  follow(batch.id);
}

/** GET /batches: the key's newest batches, each with a button that shows it above. */
export async function loadBatches() {
  let page;
  try {
    page = await (await call(`/batches?limit=${LIST_LIMIT}`, {}, false)).json();
  } catch (problem) {
    const empty = $("batch-list-empty");
    empty.hidden = false;
    empty.textContent = problem.needsKey
      ? "The batch API needs an API key (asked for when you start a batch)."
      : `Could not list the batches: ${problem.title}${problem.detail ? `: ${problem.detail}` : ""}`;
    return;
  }
  const list = $("batch-list");
  list.replaceChildren();
  $("batch-list-empty").hidden = page.data.length > 0;
  $("batch-list-empty").textContent = "No batches yet.";
  for (const batch of page.data) {
    const li = document.createElement("li");
    li.className = "batch-item";
    li.dataset.id = batch.id;
    li.dataset.status = batch.status;
    const button = document.createElement("button");
    button.type = "button";
    button.className = "link";
    button.textContent = batch.id;
    button.setAttribute("aria-label", `Show batch ${batch.id}`);
    button.addEventListener("click", () => pick(batch));
    const when = new Date(batch.created_at * 1000).toLocaleString();
    const text = document.createElement("span");
    text.textContent = ` ${batch.status.replace("_", " ")} · ${countsText(batch)} · ${when}`;
    li.append(button, text);
    list.append(li);
  }
}

async function submit(event) {
  event.preventDefault();
  const file = $("batch-file").files[0];
  if (!file) return;
  showError(null);
  const form = new FormData();
  form.append("archive", file, file.name);
  const button = $("batch-submit");
  button.disabled = true;
  $("batch-upload-status").textContent = `Uploading ${file.name}…`;
  try {
    const batch = await (await call("/batches", { method: "POST", body: form })).json();
    $("batch-file").value = "";
    announce(`Batch ${batch.id} started with ${batch.request_counts.total} images.`);
    pick(batch);
    loadBatches();
  } catch (problem) {
    showError(problem);
  } finally {
    button.disabled = false;
    $("batch-upload-status").textContent = "";
  }
}

async function cancel() {
  if (!shown) return;
  showError(null);
  try {
    const batch = await (await call(`/batches/${encodeURIComponent(shown.id)}/cancel`,
      { method: "POST" })).json();
    render(batch);
    follow(batch.id);
  } catch (problem) {
    showError(problem);
  }
}

/**
 * With an API key the archive is fetched with its header and saved from a blob: URL (a plain
 * link cannot send the header); without one the link downloads it directly (streamed).
 */
async function download(event) {
  if (!authHeaders()["X-API-Key"]) return;
  event.preventDefault();
  const link = event.currentTarget;
  try {
    const blob = await (await call(link.getAttribute("href"))).blob();
    if (downloadUrl) URL.revokeObjectURL(downloadUrl);
    downloadUrl = URL.createObjectURL(blob);
    const save = document.createElement("a");
    save.href = downloadUrl;
    save.download = link.getAttribute("download");
    document.body.append(save);
    save.click();
    save.remove();
  } catch (problem) {
    showError(problem);
  }
}

export function installBatches() {
  $("batch-form").addEventListener("submit", submit);
  $("batch-cancel").addEventListener("click", cancel);
  $("batch-download").addEventListener("click", download);
  $("batch-refresh").addEventListener("click", loadBatches);
}
