// The header line: model version, detector, device, precision and service version from /info;
// it also takes the server's instance limit into the options.

import { fetchInfo } from "./api.js";
import { $ } from "./dom.js";
import { setInstanceLimit } from "./options.js";

export async function loadInfo() {
  try {
    const answer = await fetchInfo();
    if (answer.needsKey) {
      $("model-info").textContent = "The service needs an API key (asked for on upload).";
      return;
    }
    const info = answer.info;
    const model = info.model || {};
    const limit = info.limits && info.limits.instance_limit;
    if (Number.isInteger(limit)) setInstanceLimit(limit);
    const parts = [
      `Model ${model.model_version || "?"}`,
      model.detector ? `detector ${model.detector}` : "no detector",
      model.device ? `${model.device} ${model.precision || ""}`.trim() : null,
      `service ${info.service_version}`,
    ].filter(Boolean);
    $("model-info").textContent = parts.join(" · ");
  } catch (error) {
    $("model-info").textContent = `Could not read /info (${error.message}).`;
  }
}
