// Several colourings of one photo, for the models that sample (zhao-pixelated, GET /models
// `max_samples` > 1): the options form offers "Samples" (1 to max_samples) and "Seed" while such a
// model is chosen; the request then asks for `samples=N` (and `seed=S` when given) with
// Accept: application/json, and the answer's `samples: [{index, image_base64}, ...]` are shown
// side by side under "Samples". The one picked becomes the result shown and downloaded (sample 0
// until another is picked).

import { resultBlob } from "./api.js";
import { $, announce } from "./dom.js";

let onPick = () => {};
let shownFor = null; // the result whose samples the grid shows
const shownUrls = []; // object URLs of the grid's images, revoked when the grid is redrawn

/** The most samples model `name` takes (1 for a model that does not sample, or none chosen). */
export function maxSamples(name) {
  const option = name ? document.querySelector(`#opt-model option[value="${name}"]`) : null;
  return option ? Number(option.dataset.maxSamples || 1) : 1;
}

/**
 * What the next request of model `name` asks for: `{samples, seed}` (seed the field's text, or
 * null when it is empty: the server draws one; a seed it refuses comes back as its 422 detail).
 * A model that does not sample gets `{samples: 1, seed: null}`.
 */
export function readSampling(name) {
  const limit = maxSamples(name);
  if (limit <= 1) return { samples: 1, seed: null };
  const count = Number.parseInt($("opt-samples").value, 10);
  const samples = Number.isFinite(count) ? Math.min(limit, Math.max(1, count)) : 1;
  const seed = $("opt-seed").value.trim();
  return { samples, seed: seed || null };
}

/** Show the samples and seed fields while the chosen model samples; bound them by its limit. */
export function showSamplingFields() {
  const limit = maxSamples($("opt-model").value);
  $("sampling-fields").hidden = limit <= 1;
  const input = $("opt-samples");
  input.max = String(Math.max(1, limit));
  if (Number(input.value) > limit) input.value = String(Math.max(1, limit));
}

function sampleBlob(result, sample) {
  return resultBlob({ image_base64: sample.image_base64, media_type: result.media_type });
}

/** Make sample `index` of `item` its result: what the viewer shows and the download saves. */
export function pickSample(item, index) {
  const result = item.result;
  const sample = result && result.samples ? result.samples[index] : null;
  if (!sample) return;
  result.picked = index;
  result.image_base64 = sample.image_base64;
  if (item.resultUrl) URL.revokeObjectURL(item.resultUrl);
  item.resultUrl = URL.createObjectURL(sampleBlob(result, sample));
  announce(`${item.name}: sample ${index + 1} of ${result.samples.length} picked.`);
  onPick(item);
}

/** The "Samples" grid of the viewer's item: one button per sample, the picked one pressed. */
export function renderSamples(item) {
  const panel = $("samples-panel");
  const result = item && item.result;
  const samples = result && Array.isArray(result.samples) ? result.samples : [];
  panel.hidden = samples.length <= 1;
  if (samples.length <= 1) return;
  const grid = $("sample-grid");
  if (shownFor !== result) {
    shownFor = result;
    while (shownUrls.length) URL.revokeObjectURL(shownUrls.pop());
    grid.replaceChildren();
    for (const sample of samples) {
      const url = URL.createObjectURL(sampleBlob(result, sample));
      shownUrls.push(url);
      const button = document.createElement("button");
      button.type = "button";
      button.className = "sample";
      button.dataset.index = String(sample.index);
      button.setAttribute("aria-label", `Pick sample ${sample.index + 1}`);
      const img = document.createElement("img");
      img.src = url;
      img.alt = `Sample ${sample.index + 1}`;
      const caption = document.createElement("span");
      caption.textContent = `Sample ${sample.index + 1}`;
      button.append(img, caption);
      button.addEventListener("click", () => pickSample(item, sample.index));
      grid.append(button);
    }
  }
  const picked = result.picked || 0;
  for (const button of grid.querySelectorAll("button.sample")) {
    button.setAttribute("aria-pressed", String(Number(button.dataset.index) === picked));
  }
  $("samples-seed").textContent = `Seed ${result.seed}: the same seed and options give the ` +
    "same samples again.";
}

/** `picked(item)` re-renders the viewer after a pick (app.js passes viewer.js's renderViewer). */
export function installSamples(picked) {
  onPick = picked;
  $("opt-model").addEventListener("change", showSamplingFields);
  showSamplingFields();
}
