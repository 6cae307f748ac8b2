// The options form: what the next request asks for, clamped to the allowed ranges.

import { $ } from "./dom.js";
import { readSampling } from "./samples.js";
import { state } from "./state.js";

export function readOptions() {
  return {
    resolution: $("opt-resolution").value,
    format: $("opt-format").value,
    max_instances: clampInt($("opt-max-instances").value, 0, state.instanceLimit, 8),
    score_threshold: clampNumber($("opt-score-threshold").value, 0, 1, 0.7),
    saturation: clampNumber($("opt-saturation").value, 0, 2, 1),
    model: $("opt-model").value,
    ...readSampling($("opt-model").value), // {samples, seed}
    temperature: readTemperature(),
  };
}

/** The chosen model's default temperature ("" for a model without the annealed mean). */
function defaultTemperature() {
  const name = $("opt-model").value;
  const option = name ? document.querySelector(`#opt-model option[value="${name}"]`) : null;
  return option ? option.dataset.temperature || "" : "";
}

/** ?temperature= for a model that decodes by the annealed mean when the field is filled in;
 * null otherwise (the model's default; a value it refuses comes back as its 422 detail). */
function readTemperature() {
  if (!defaultTemperature()) return null;
  const text = $("opt-temperature").value.trim();
  return text ? clampNumber(text, 0.01, 1, null) : null;
}

/** Show the temperature field while the chosen model decodes by the annealed mean. */
export function showTemperatureField() {
  const fallback = defaultTemperature();
  $("temperature-field").hidden = !fallback;
  $("opt-temperature").placeholder = fallback ? `model default ${fallback}` : "";
}

function clampInt(text, low, high, fallback) {
  const value = Number.parseInt(text, 10);
  return Number.isFinite(value) ? Math.min(high, Math.max(low, value)) : fallback;
}

function clampNumber(text, low, high, fallback) {
  const value = Number.parseFloat(text);
  return Number.isFinite(value) ? Math.min(high, Math.max(low, value)) : fallback;
}

/** The server's COLORIZE_INSTANCE_LIMIT bounds the "Max instances" field. */
export function setInstanceLimit(limit) {
  state.instanceLimit = limit;
  const input = $("opt-max-instances");
  input.max = String(limit);
  if (Number(input.value) > limit) input.value = String(limit);
}

/** The colour-strength slider shows its value next to it. */
export function installOptions() {
  $("opt-model").addEventListener("change", showTemperatureField);
  showTemperatureField();
  $("opt-saturation").addEventListener("input", () => {
    $("saturation-value").textContent = Number($("opt-saturation").value).toFixed(2);
  });
}
