// The images and their requests: each added file becomes an item, at most two are in flight at
// once, and an answer makes the item done, failed, or wait for an API key.

import { colorizeQuery, postImage, resultBlob } from "./api.js";
import { apiKey, askForKey } from "./apikey.js";
import { $, announce } from "./dom.js";
import { renderItem } from "./list.js";
import { readOptions } from "./options.js";
import { state } from "./state.js";
import { renderViewer, select } from "./viewer.js";

const CONCURRENT_UPLOADS = 2;

const items = []; // {id, file, name, beforeUrl, status, progress, result, resultUrl, boxes, request, error, li}
const waitingForKey = []; // callbacks that put a refused item back in the queue
let running = 0;
let nextId = 1;

export function addFiles(fileList) {
  const files = Array.from(fileList || []);
  for (const file of files) {
    const item = {
      id: nextId++,
      file,
      name: file.name || `image-${nextId}`,
      beforeUrl: URL.createObjectURL(file),
      status: "waiting",
      progress: 0,
      result: null,
      resultUrl: null,
      boxes: null, // [{box: [x1, y1, x2, y2], score: number | null (drawn)}]
      request: null, // what the next request sends: {boxes?}
      hints: [], // colour hints shown and sent with every request: [{x, y, color, size}]
      error: null,
    };
    items.push(item);
    renderItem(item);
  }
  $("queue-empty").hidden = items.length > 0;
  if (files.length) announce(`${files.length} image${files.length > 1 ? "s" : ""} added.`);
  pump();
}

/** Send the item again with what its `request` says (Retry keeps it). */
export function requeue(item) {
  item.status = "waiting";
  renderItem(item);
  pump();
}

/**
 * "Colorize again with these boxes" (`withBoxes`: exactly the listed boxes) or "Detect again";
 * nothing while the item is in flight.
 */
export function colorizeAgain(item, withBoxes) {
  if (!item || item.status === "uploading" || item.status === "colorizing") return;
  item.request = withBoxes
    ? { boxes: (item.boxes || []).map((b) => ({ box: b.box.slice(), score: b.score })) }
    : null;
  requeue(item);
}

/** A key was entered: the items refused for want of one go again. */
export function retryWaitingForKey() {
  const waiting = waitingForKey.splice(0);
  for (const retry of waiting) retry();
  pump();
}

function pump() {
  while (running < CONCURRENT_UPLOADS) {
    const next = items.find((item) => item.status === "waiting");
    if (!next) return;
    colorize(next);
  }
}

function colorize(item) {
  const options = readOptions();
  const boxes = item.request && item.request.boxes ? item.request.boxes : null;
  const params = colorizeQuery(options, boxes, state.instanceLimit, item.hints);

  item.status = "uploading";
  item.progress = 0;
  item.error = null;
  running += 1;
  renderItem(item);

  postImage(item.file, params, {
    progress(fraction) {
      item.progress = fraction;
      renderItem(item);
    },
    uploaded() {
      item.status = "colorizing";
      renderItem(item);
    },
    answered(answer) {
      running -= 1;
      finish(item, answer, options);
      pump();
    },
  });
}

function finish(item, answer, options) {
  if (answer.needsKey) {
    item.status = "needs-key";
    item.error = { title: "API key needed", detail: answer.detail };
    renderItem(item);
    waitingForKey.push(() => {
      item.status = "waiting";
      renderItem(item);
    });
    askForKey(apiKey()
      ? "The service refused this API key. Enter a valid key."
      : "This service asks for an API key. Enter it to colorize.");
    return;
  }
  if (answer.problem) {
    fail(item, answer.problem);
    return;
  }
  const body = answer.result;
  const drawn = new Set(
    (item.request && item.request.boxes ? item.request.boxes : [])
      .filter((b) => b.score === null)
      .map((b) => b.box.join(",")),
  );
  item.result = { ...body, options };
  item.boxes = body.boxes.map((box, i) => ({
    box,
    score: drawn.has(box.join(",")) ? null : body.scores[i],
  }));
  item.request = null;
  if (item.resultUrl) URL.revokeObjectURL(item.resultUrl);
  item.resultUrl = URL.createObjectURL(resultBlob(body));
  item.status = "done";
  renderItem(item);
  announce(`${item.name}: colorized with ${body.instances} instance box${body.instances === 1 ? "" : "es"}.`);
  if (state.selected === null || state.selected === item) select(item, state.selected === null);
}

function fail(item, error) {
  item.status = "failed";
  item.error = error;
  renderItem(item);
  announce(`${item.name}: ${error.title}. ${error.detail || ""}`);
  if (state.selected === item) renderViewer();
}
