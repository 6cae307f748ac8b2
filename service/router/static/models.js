// The model picker and the side-by-side view of several models: GET /models fills the "Model"
// select (what every request asks for) and one checkbox per loaded model; "Compare these models"
// sends the photo in the viewer to POST /colorize?model=NAME once per checked model and shows
// the results next to each other, each captioned with its model, version and time.

import { colorizeQuery, fetchModels, postImage, resultBlob } from "./api.js";
import { $ } from "./dom.js";
import { readOptions, showTemperatureField } from "./options.js";
import { showSamplingFields } from "./samples.js";
import { state } from "./state.js";

let loaded = [];
const shown = []; // object URLs of the grid's images, revoked when the grid is redrawn

export async function loadModels() {
  try {
    const answer = await fetchModels();
    loaded = answer.models.filter((m) => m.loaded);
    const select = $("opt-model");
    select.replaceChildren();
    for (const model of answer.models) {
      const option = document.createElement("option");
      option.value = model.name;
      const traits = [model.uses_boxes ? "uses boxes" : "", model.takes_hints ? "follows hints" : "",
        model.max_samples > 1 ? `up to ${model.max_samples} samples` : ""].filter(Boolean);
      option.textContent = traits.length ? `${model.name} (${traits.join(", ")})` : model.name;
      option.dataset.takesHints = String(Boolean(model.takes_hints));
      option.dataset.maxSamples = String(model.max_samples || 1);
      option.dataset.temperature = model.temperature == null ? "" : String(model.temperature);
      option.disabled = !model.loaded;
      option.selected = model.name === answer.default;
      select.append(option);
    }
    showSamplingFields();
    showTemperatureField();
    const boxes = $("zoo-models");
    for (const old of boxes.querySelectorAll("label")) old.remove();
    for (const model of loaded) {
      const label = document.createElement("label");
      const input = document.createElement("input");
      input.type = "checkbox";
      input.name = "compare-model";
      input.value = model.name;
      input.checked = true;
      label.append(input, ` ${model.name}`);
      boxes.append(label);
    }
  } catch (error) {
    $("models-status").textContent = `Could not read /models (${error.message}).`;
  }
}

function checkedModels() {
  return [...document.querySelectorAll('input[name="compare-model"]:checked')].map((i) => i.value);
}

function figure(model) {
  const item = document.createElement("figure");
  item.dataset.model = model;
  const caption = document.createElement("figcaption");
  caption.textContent = `${model}: colorizing…`;
  item.append(caption);
  return item;
}

function show(item, model, answer) {
  const caption = item.querySelector("figcaption");
  if (!answer.result) {
    const problem = answer.problem || { title: "API key needed", detail: answer.detail || "" };
    caption.textContent = `${model}: ${problem.title}. ${problem.detail}`;
    caption.classList.add("problem");
    return;
  }
  const result = answer.result;
  const url = URL.createObjectURL(resultBlob(result));
  shown.push(url);
  const img = document.createElement("img");
  img.src = url;
  img.alt = `The photo colorized by ${model}`;
  const total = result.timings_ms && result.timings_ms.total;
  caption.textContent = `${result.model} · ${result.model_version}` +
    (Number.isFinite(total) ? ` · ${Math.round(total)} ms` : "");
  item.insertBefore(img, caption);
}

/** Colorize the viewer's photo with each checked model, all at once; one figure per model. */
export function compareModels() {
  const item = state.selected;
  const models = checkedModels();
  if (!item || !item.file) {
    $("models-status").textContent = "Pick an image first.";
    return;
  }
  if (!models.length) {
    $("models-status").textContent = "Check at least one model.";
    return;
  }
  while (shown.length) URL.revokeObjectURL(shown.pop());
  const grid = $("model-grid");
  grid.replaceChildren();
  $("models-status").textContent = `Colorizing ${item.name} with ${models.join(", ")}…`;
  let pending = models.length;
  for (const model of models) {
    const cell = figure(model);
    grid.append(cell);
    const params = colorizeQuery({ ...readOptions(), model, samples: 1, seed: null }, null, state.instanceLimit);
    postImage(item.file, params, {
      progress() {},
      uploaded() {},
      answered(answer) {
        show(cell, model, answer);
        pending -= 1;
        if (!pending) $("models-status").textContent = `${models.length} models done.`;
      },
    });
  }
}

export function installModelCompare() {
  $("compare-models").addEventListener("click", compareModels);
}
