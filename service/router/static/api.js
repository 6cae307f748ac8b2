// The service's HTTP API as the page uses it: GET /info and POST /colorize with
// Accept: application/json, the API key header, upload progress, and what an answer means
// (a result, a request for a key, or the problem+json body of a refusal).

import { authHeaders } from "./apikey.js";

const NETWORK_PROBLEM = { title: "Network error", detail: "Could not reach the service." };

/** GET /info: `{info}`, or `{needsKey: true}` on a 401. Throws on any other failure. */
export async function fetchInfo() {
  const response = await fetch("/info", { headers: authHeaders() });
  if (response.status === 401) return { needsKey: true };
  if (!response.ok) throw new Error(`HTTP ${response.status}`);
  return { info: await response.json() };
}

/** GET /models: `{default, models: [{name, loaded, uses_boxes, input_size, files, ...}]}`. */
export async function fetchModels() {
  const response = await fetch("/models", { headers: authHeaders() });
  if (!response.ok) throw new Error(`HTTP ${response.status}`);
  return response.json();
}

/**
 * The query of one POST /colorize. With `boxes` ([{box, score | null}]) the request sends exactly
 * those boxes (drawn ones with score 1) and never asks for fewer slots than boxes, up to
 * `instanceLimit`. With `hints` ([{x, y, color, size}], input pixels) it sends exactly those colour
 * hints (?hints=, docs/hints.md).
 */
export function colorizeQuery(options, boxes, instanceLimit, hints) {
  const params = new URLSearchParams();
  params.set("resolution", options.resolution);
  if (options.format) params.set("format", options.format);
  params.set("score_threshold", String(options.score_threshold));
  params.set("saturation", String(options.saturation));
  if (options.model) params.set("model", options.model);
  if (options.samples > 1) params.set("samples", String(options.samples));
  if (options.seed !== null && options.seed !== undefined) params.set("seed", options.seed);
  if (options.temperature !== null && options.temperature !== undefined) {
    params.set("temperature", String(options.temperature));
  }
  let maxInstances = options.max_instances;
  if (boxes) {
    maxInstances = Math.min(instanceLimit, Math.max(maxInstances, boxes.length));
    params.set("boxes", JSON.stringify({
      boxes: boxes.map((b) => b.box),
      scores: boxes.map((b) => (b.score === null ? 1 : b.score)),
    }));
  }
  params.set("max_instances", String(maxInstances));
  if (hints && hints.length) {
    params.set("hints", JSON.stringify(hints.map((h) => ({ x: h.x, y: h.y, color: h.color, size: h.size }))));
  }
  return params;
}

/**
 * POST /colorize?`params` with `file` as the body. Calls `on.progress(fraction)` while uploading,
 * `on.uploaded()` once the body is sent and `on.answered(answer)` at the end (see readAnswer; a
 * network failure is answered as a problem too). XMLHttpRequest, because fetch reports no upload
 * progress.
 */
export function postImage(file, params, on) {
  const xhr = new XMLHttpRequest();
  xhr.open("POST", `/colorize?${params}`);
  xhr.setRequestHeader("Accept", "application/json");
  xhr.setRequestHeader("Content-Type", file.type || "application/octet-stream");
  for (const [name, value] of Object.entries(authHeaders())) xhr.setRequestHeader(name, value);
  xhr.upload.addEventListener("progress", (event) => {
    if (event.lengthComputable) on.progress(event.loaded / event.total);
  });
  xhr.upload.addEventListener("load", () => on.uploaded());
  xhr.addEventListener("load", () => on.answered(readAnswer(xhr)));
  xhr.addEventListener("error", () => on.answered({ problem: { ...NETWORK_PROBLEM } }));
  xhr.send(file);
}

function parseBody(xhr) {
  try {
    return JSON.parse(xhr.responseText);
  } catch {
    return null;
  }
}

/**
 * `{result}` (the JSON answer) for a colorized image; `{needsKey: true, detail}` for a 401;
 * otherwise `{problem: {title, detail, status, requestId}}` from the problem+json body, falling
 * back to the status line.
 */
function readAnswer(xhr) {
  const body = parseBody(xhr);
  if (xhr.status === 401) return { needsKey: true, detail: (body && body.detail) || "" };
  if (xhr.status !== 200 || !body || !body.image_base64) {
    const retry = xhr.getResponseHeader("Retry-After");
    return {
      problem: {
        title: (body && body.title) || `HTTP ${xhr.status}`,
        detail: ((body && body.detail) || xhr.statusText || "") +
          (retry ? ` (retry after ${retry} s)` : ""),
        status: xhr.status,
        requestId: (body && body.request_id) || xhr.getResponseHeader("X-Request-ID"),
      },
    };
  }
  return { result: body };
}

/** The answer's image as a Blob (its `image_base64` decoded, typed `media_type`). */
export function resultBlob(result) {
  const bytes = Uint8Array.from(atob(result.image_base64), (c) => c.charCodeAt(0));
  return new Blob([bytes], { type: result.media_type });
}
