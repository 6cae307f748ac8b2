// The result panel: model version, sizes, instances, colour strength, request ID, and the time of
// each stage in pipeline order.

import { $ } from "./dom.js";
import { afterImg } from "./frame.js";

const STAGE_ORDER = ["decode", "queue", "detect", "instance", "fusion", "merge", "encode", "total"];

export function renderFacts(item) {
  const r = item.result;
  const facts = [
    ["Model", r.model || "instcolor"],
    ["Model version", r.model_version],
    ["Output", `${afterImg.naturalWidth || "?"}×${afterImg.naturalHeight || "?"} ${r.media_type}`],
    ["Input", r.input_size ? `${r.input_size[0]}×${r.input_size[1]}` : "?"],
    ["Instances", String(r.instances)],
    ["Colour strength", Number(r.saturation).toFixed(2)],
    ["Request ID", r.request_id],
  ];
  if (r.cached) facts.push(["Cache", "hit"]);
  if (r.samples && r.samples.length > 1) {
    facts.push(["Sample", `${(r.picked || 0) + 1} of ${r.samples.length}`]);
  }
  if (r.seed !== null && r.seed !== undefined) {
    // the seed as typed when one was sent (JSON numbers above 2^53 lose digits), else the drawn one
    facts.push(["Seed", (r.options && r.options.seed) || String(r.seed)]);
  }
  const dl = $("result-facts");
  dl.replaceChildren();
  for (const [term, value] of facts) {
    const dt = document.createElement("dt");
    dt.textContent = term;
    const dd = document.createElement("dd");
    dd.textContent = value;
    dd.dataset.fact = term;
    dl.append(dt, dd);
  }
  const body = $("timings").tBodies[0];
  body.replaceChildren();
  const stages = Object.keys(r.timings_ms).sort((a, b) => rank(a) - rank(b));
  for (const stageName of stages) {
    const row = body.insertRow();
    row.dataset.stage = stageName;
    const th = document.createElement("th");
    th.scope = "row";
    th.textContent = stageName;
    row.append(th);
    row.insertCell().textContent = r.timings_ms[stageName].toFixed(1);
  }
}

function rank(stageName) {
  const i = STAGE_ORDER.indexOf(stageName);
  return i < 0 ? STAGE_ORDER.length : i;
}
