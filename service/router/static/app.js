// InstColor web page: plain JavaScript, no dependencies, talks only to this origin.
// Each image goes to POST /colorize (Accept: application/json); the answer carries the image,
// the boxes used with their scores, the input size (the boxes' frame), timings and model version.
"use strict";

(() => {
  const KEY_STORAGE = "instcolor.apiKey";
  const CONCURRENT_UPLOADS = 2;
  const STAGE_ORDER = ["decode", "queue", "detect", "instance", "fusion", "merge", "encode", "total"];
  const $ = (id) => document.getElementById(id);

  const state = {
    items: [], // {id, file, name, beforeUrl, status, progress, result, boxes, error, li}
    selected: null,
    running: 0,
    nextId: 1,
    instanceLimit: 8,
    zoom: 1,
    fitOnLoad: true,
    drawing: false,
    waitingForKey: [],
  };

  // -- API key ---------------------------------------------------------------------------------

  function apiKey() {
    try {
      return sessionStorage.getItem(KEY_STORAGE) || "";
    } catch {
      return "";
    }
  }

  function showKeyState() {
    $("key-status").hidden = !apiKey();
  }

  function askForKey(message) {
    const form = $("key-form");
    $("key-message").textContent = message;
    form.hidden = false;
    $("api-key").focus();
  }

  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("api-key").value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY_STORAGE, key);
    $("api-key").value = "";
    $("key-form").hidden = true;
    showKeyState();
    announce("API key saved for this tab; retrying.");
    loadInfo();
    const waiting = state.waitingForKey.splice(0);
    for (const retry of waiting) retry();
    pump();
  });

  $("forget-key").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORAGE);
    showKeyState();
    announce("API key forgotten.");
  });

  function authHeaders() {
    const key = apiKey();
    return key ? { "X-API-Key": key } : {};
  }

  // -- service info ----------------------------------------------------------------------------

  async function loadInfo() {
    try {
      const response = await fetch("/info", { headers: authHeaders() });
      if (response.status === 401) {
        $("model-info").textContent = "The service needs an API key (asked for on upload).";
        return;
      }
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const info = await response.json();
      const model = info.model || {};
      const limit = info.limits && info.limits.instance_limit;
      if (Number.isInteger(limit)) {
        state.instanceLimit = limit;
        const input = $("opt-max-instances");
        input.max = String(limit);
        if (Number(input.value) > limit) input.value = String(limit);
      }
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

  // -- options ---------------------------------------------------------------------------------

  function readOptions() {
    return {
      resolution: $("opt-resolution").value,
      format: $("opt-format").value,
      max_instances: clampInt($("opt-max-instances").value, 0, state.instanceLimit, 8),
      score_threshold: clampNumber($("opt-score-threshold").value, 0, 1, 0.7),
      saturation: clampNumber($("opt-saturation").value, 0, 2, 1),
    };
  }

  function clampInt(text, low, high, fallback) {
    const value = Number.parseInt(text, 10);
    return Number.isFinite(value) ? Math.min(high, Math.max(low, value)) : fallback;
  }

  function clampNumber(text, low, high, fallback) {
    const value = Number.parseFloat(text);
    return Number.isFinite(value) ? Math.min(high, Math.max(low, value)) : fallback;
  }

  $("opt-saturation").addEventListener("input", () => {
    $("saturation-value").textContent = Number($("opt-saturation").value).toFixed(2);
  });

  // -- adding images ---------------------------------------------------------------------------

  $("file-input").addEventListener("change", (event) => {
    addFiles(event.target.files);
    event.target.value = "";
  });

  const dropZone = $("drop-zone");
  for (const type of ["dragenter", "dragover"]) {
    dropZone.addEventListener(type, (event) => {
      event.preventDefault();
      dropZone.classList.add("dragging");
    });
  }
  for (const type of ["dragleave", "drop"]) {
    dropZone.addEventListener(type, () => dropZone.classList.remove("dragging"));
  }
  dropZone.addEventListener("drop", (event) => {
    event.preventDefault();
    addFiles(event.dataTransfer.files);
  });
  // A drop anywhere else must not navigate away from the page.
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());

  function addFiles(fileList) {
    const files = Array.from(fileList || []);
    for (const file of files) {
      const item = {
        id: state.nextId++,
        file,
        name: file.name || `image-${state.nextId}`,
        beforeUrl: URL.createObjectURL(file),
        status: "waiting",
        progress: 0,
        result: null,
        resultUrl: null,
        boxes: null, // [{box: [x1, y1, x2, y2], score: number | null (drawn)}]
        request: null, // what the next request sends: {boxes?}
        error: null,
      };
      state.items.push(item);
      renderItem(item);
    }
    $("queue-empty").hidden = state.items.length > 0;
    if (files.length) announce(`${files.length} image${files.length > 1 ? "s" : ""} added.`);
    pump();
  }

  function pump() {
    while (state.running < CONCURRENT_UPLOADS) {
      const next = state.items.find((item) => item.status === "waiting");
      if (!next) return;
      colorize(next);
    }
  }

  // -- one request -----------------------------------------------------------------------------

  function colorize(item) {
    const options = readOptions();
    const params = new URLSearchParams();
    params.set("resolution", options.resolution);
    if (options.format) params.set("format", options.format);
    params.set("score_threshold", String(options.score_threshold));
    params.set("saturation", String(options.saturation));
    let maxInstances = options.max_instances;
    if (item.request && item.request.boxes) {
      const boxes = item.request.boxes;
      // Exactly these boxes: never fewer slots than boxes (up to the instance limit).
      maxInstances = Math.min(state.instanceLimit, Math.max(maxInstances, boxes.length));
      params.set("boxes", JSON.stringify({
        boxes: boxes.map((b) => b.box),
        scores: boxes.map((b) => (b.score === null ? 1 : b.score)),
      }));
    }
    params.set("max_instances", String(maxInstances));

    item.status = "uploading";
    item.progress = 0;
    item.error = null;
    state.running += 1;
    renderItem(item);

    const xhr = new XMLHttpRequest();
    xhr.open("POST", `/colorize?${params}`);
    xhr.setRequestHeader("Accept", "application/json");
    xhr.setRequestHeader("Content-Type", item.file.type || "application/octet-stream");
    for (const [name, value] of Object.entries(authHeaders())) xhr.setRequestHeader(name, value);
    xhr.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable) {
        item.progress = event.loaded / event.total;
        renderItem(item);
      }
    });
    xhr.upload.addEventListener("load", () => {
      item.status = "colorizing";
      renderItem(item);
    });
    xhr.addEventListener("load", () => {
      state.running -= 1;
      finish(item, xhr, options);
      pump();
    });
    xhr.addEventListener("error", () => {
      state.running -= 1;
      fail(item, { title: "Network error", detail: "Could not reach the service." });
      pump();
    });
    xhr.send(item.file);
  }

  function parseBody(xhr) {
    try {
      return JSON.parse(xhr.responseText);
    } catch {
      return null;
    }
  }

  function finish(item, xhr, options) {
    const body = parseBody(xhr);
    if (xhr.status === 401) {
      item.status = "needs-key";
      item.error = { title: "API key needed", detail: (body && body.detail) || "" };
      renderItem(item);
      state.waitingForKey.push(() => {
        item.status = "waiting";
        renderItem(item);
      });
      askForKey(apiKey()
        ? "The service refused this API key. Enter a valid key."
        : "This service asks for an API key. Enter it to colorize.");
      return;
    }
    if (xhr.status !== 200 || !body || !body.image_base64) {
      const retry = xhr.getResponseHeader("Retry-After");
      fail(item, {
        title: (body && body.title) || `HTTP ${xhr.status}`,
        detail: ((body && body.detail) || xhr.statusText || "") +
          (retry ? ` (retry after ${retry} s)` : ""),
        status: xhr.status,
        requestId: (body && body.request_id) || xhr.getResponseHeader("X-Request-ID"),
      });
      return;
    }
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
    item.resultUrl = URL.createObjectURL(base64ToBlob(body.image_base64, body.media_type));
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

  function base64ToBlob(text, type) {
    const bytes = Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
    return new Blob([bytes], { type });
  }

  // -- the list of images ----------------------------------------------------------------------

  const STATUS_TEXT = {
    waiting: "Waiting",
    uploading: "Uploading",
    colorizing: "Colorizing…",
    done: "Done",
    failed: "Failed",
    "needs-key": "Needs an API key",
  };

  function renderItem(item) {
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
      item.li.querySelector(".item-select").addEventListener("click", () => select(item, true));
      item.li.querySelector(".item-retry").addEventListener("click", () => {
        item.status = "waiting";
        renderItem(item);
        pump();
      });
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

  // -- the viewer ------------------------------------------------------------------------------

  const beforeImg = $("before-img");
  const afterImg = $("after-img");
  const overlay = $("overlay");
  const stage = $("stage");

  function select(item, focus) {
    const previous = state.selected;
    state.selected = item;
    if (previous && previous !== item) renderItem(previous);
    if (previous !== item) state.fitOnLoad = true;
    renderItem(item);
    renderViewer();
    if (focus && item.result) $("viewer").focus({ preventScroll: true });
  }

  function renderViewer() {
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
    layout();
  }

  beforeImg.addEventListener("error", () => {
    // The browser cannot show this format (e.g. TIFF): show the result's lightness instead.
    const item = state.selected;
    if (item && item.resultUrl && beforeImg.src !== item.resultUrl) {
      beforeImg.classList.add("fallback");
      beforeImg.src = item.resultUrl;
    }
  });
  afterImg.addEventListener("load", () => layout());

  function downloadName(item) {
    const ext = { "image/jpeg": "jpg", "image/png": "png", "image/webp": "webp" }[item.result.media_type] || "img";
    const stem = item.name.replace(/\.[^.]+$/, "") || "image";
    return `${stem}-colorized.${ext}`;
  }

  function renderFacts(item) {
    const r = item.result;
    const facts = [
      ["Model version", r.model_version],
      ["Output", `${afterImg.naturalWidth || "?"}×${afterImg.naturalHeight || "?"} ${r.media_type}`],
      ["Input", r.input_size ? `${r.input_size[0]}×${r.input_size[1]}` : "?"],
      ["Instances", String(r.instances)],
      ["Colour strength", Number(r.saturation).toFixed(2)],
      ["Request ID", r.request_id],
    ];
    if (r.cached) facts.push(["Cache", "hit"]);
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
    const stages = Object.keys(r.timings_ms).sort(
      (a, b) => rank(a) - rank(b),
    );
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

  // Output pixels per input pixel (network resolution squashes the input to 256x256).
  function scales() {
    const r = state.selected.result;
    const width = afterImg.naturalWidth || (r.input_size ? r.input_size[0] : 1);
    const height = afterImg.naturalHeight || (r.input_size ? r.input_size[1] : 1);
    const input = r.input_size || [width, height];
    return { width, height, sx: width / input[0], sy: height / input[1], input };
  }

  function layout() {
    const item = state.selected;
    if (!item || !item.result || !afterImg.naturalWidth) return;
    const { width, height } = scales();
    if (state.fitOnLoad) {
      state.fitOnLoad = false;
      fitZoom();
      return;
    }
    const w = Math.round(width * state.zoom);
    const h = Math.round(height * state.zoom);
    const side = stage.classList.contains("mode-side");
    stage.style.width = side ? `${2 * w + 16}px` : `${w}px`;
    stage.style.height = `${h}px`;
    for (const img of [beforeImg, afterImg]) {
      img.style.width = `${w}px`;
      img.style.height = `${h}px`;
    }
    overlay.setAttribute("viewBox", `0 0 ${width} ${height}`);
    overlay.style.width = `${w}px`;
    overlay.style.height = `${h}px`;
    $("zoom").value = String(Math.round(state.zoom * 100));
    $("zoom-value").textContent = `${Math.round(state.zoom * 100)}%`;
    applySplit();
    renderOverlay();
    renderFacts(item);
  }

  // The largest zoom at which the whole comparison is visible without scrolling.
  function fitZoom() {
    const { width, height } = scales();
    const side = stage.classList.contains("mode-side");
    const scroll = $("stage-scroll");
    const room = scroll.clientWidth - 4;
    const across = (side ? (room - 16) / 2 : room) / width;
    const down = (Number.parseFloat(getComputedStyle(scroll).maxHeight) - 4) / height;
    setZoom(Math.min(across, Number.isFinite(down) ? down : across));
  }

  function setZoom(value) {
    state.zoom = Math.min(4, Math.max(0.1, value));
    layout();
  }

  $("zoom").addEventListener("input", () => setZoom(Number($("zoom").value) / 100));
  $("zoom-fit").addEventListener("click", fitZoom);
  $("zoom-actual").addEventListener("click", () => setZoom(1));
  $("stage-scroll").addEventListener("wheel", (event) => {
    if (!event.ctrlKey) return; // ctrl + wheel zooms the image, a plain wheel scrolls
    event.preventDefault();
    setZoom(state.zoom * (event.deltaY < 0 ? 1.1 : 1 / 1.1));
  }, { passive: false });

  for (const radio of document.querySelectorAll('input[name="mode"]')) {
    radio.addEventListener("change", () => {
      const side = radio.value === "side" && radio.checked;
      stage.classList.toggle("mode-side", side);
      stage.classList.toggle("mode-slider", !side);
      $("split-row").hidden = side;
      fitZoom();
    });
  }

  function applySplit() {
    const split = Number($("split").value);
    stage.style.setProperty("--split", `${split}%`);
  }
  $("split").addEventListener("input", applySplit);

  $("show-boxes").addEventListener("change", renderOverlay);

  // -- boxes -----------------------------------------------------------------------------------

  const SVG = "http://www.w3.org/2000/svg";

  function renderOverlay(preview) {
    overlay.replaceChildren();
    const item = state.selected;
    if (!item || !item.boxes) return;
    overlay.classList.toggle("hidden-boxes", !$("show-boxes").checked);
    const { sx, sy } = scales();
    const stroke = 2 / state.zoom; // in output pixels: 2 and 13 screen pixels at any zoom
    const font = 13 / state.zoom;
    item.boxes.forEach((entry, i) => {
      const [x1, y1, x2, y2] = entry.box;
      const group = document.createElementNS(SVG, "g");
      group.classList.add("box", entry.score === null ? "drawn" : "detected");
      group.dataset.index = String(i);
      const rect = document.createElementNS(SVG, "rect");
      rect.setAttribute("x", x1 * sx);
      rect.setAttribute("y", y1 * sy);
      rect.setAttribute("width", (x2 - x1) * sx);
      rect.setAttribute("height", (y2 - y1) * sy);
      rect.setAttribute("stroke-width", stroke);
      const label = document.createElementNS(SVG, "text");
      label.setAttribute("x", x1 * sx + stroke * 2);
      label.setAttribute("y", y1 * sy + font + stroke);
      label.setAttribute("font-size", font);
      label.style.strokeWidth = String(3 / state.zoom);
      label.textContent = `${i + 1}: ${boxScore(entry)}`;
      group.append(rect, label);
      overlay.append(group);
    });
    if (preview) {
      const rect = document.createElementNS(SVG, "rect");
      rect.classList.add("preview");
      rect.setAttribute("x", Math.min(preview.x1, preview.x2));
      rect.setAttribute("y", Math.min(preview.y1, preview.y2));
      rect.setAttribute("width", Math.abs(preview.x2 - preview.x1));
      rect.setAttribute("height", Math.abs(preview.y2 - preview.y1));
      rect.setAttribute("stroke-width", stroke);
      overlay.append(rect);
    }
  }

  function boxScore(entry) {
    return entry.score === null ? "drawn" : entry.score.toFixed(2);
  }

  function renderBoxes() {
    const item = state.selected;
    const list = $("box-list");
    list.replaceChildren();
    const boxes = item.boxes || [];
    if (!boxes.length) {
      const li = document.createElement("li");
      li.className = "hint";
      li.textContent = "No boxes: the whole image is colorized at once.";
      list.append(li);
    }
    boxes.forEach((entry, i) => {
      const li = document.createElement("li");
      li.className = "box-item";
      const text = document.createElement("span");
      text.textContent = `Box ${i + 1} · score ${boxScore(entry)} · [${entry.box.join(", ")}]`;
      const remove = document.createElement("button");
      remove.type = "button";
      remove.className = "button small";
      remove.textContent = "Remove";
      remove.setAttribute("aria-label", `Remove box ${i + 1}`);
      remove.addEventListener("click", () => removeBox(i));
      li.addEventListener("mouseenter", () => highlight(i, true));
      li.addEventListener("mouseleave", () => highlight(i, false));
      remove.addEventListener("focus", () => highlight(i, true));
      remove.addEventListener("blur", () => highlight(i, false));
      li.append(text, remove);
      list.append(li);
    });
    const full = boxes.length >= state.instanceLimit;
    $("draw-toggle").disabled = full;
    $("add-box-form").querySelector("button").disabled = full;
    renderOverlay();
  }

  function highlight(index, on) {
    const group = overlay.querySelector(`g[data-index="${index}"]`);
    if (group) group.classList.toggle("highlight", on);
  }

  function removeBox(index) {
    const item = state.selected;
    item.boxes.splice(index, 1);
    renderBoxes();
    announce(`Box ${index + 1} removed; ${item.boxes.length} left. Colorize again to apply.`);
    const buttons = $("box-list").querySelectorAll("button");
    (buttons[Math.min(index, buttons.length - 1)] || $("recolorize")).focus();
  }

  function addBox(box) {
    const item = state.selected;
    const [w, h] = scales().input;
    const clipped = [
      Math.max(0, Math.min(w, Math.round(Math.min(box[0], box[2])))),
      Math.max(0, Math.min(h, Math.round(Math.min(box[1], box[3])))),
      Math.max(0, Math.min(w, Math.round(Math.max(box[0], box[2])))),
      Math.max(0, Math.min(h, Math.round(Math.max(box[1], box[3])))),
    ];
    if (clipped[2] - clipped[0] < 2 || clipped[3] - clipped[1] < 2) {
      announce("That box is too small; draw a larger one.");
      return false;
    }
    item.boxes.push({ box: clipped, score: null });
    renderBoxes();
    announce(`Box ${item.boxes.length} added. Colorize again to apply.`);
    return true;
  }

  $("add-box-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const form = event.target;
    const box = ["x1", "y1", "x2", "y2"].map((name) => Number(form.elements[name].value));
    if (addBox(box)) form.reset();
  });

  function setDrawing(on) {
    state.drawing = on;
    $("draw-toggle").setAttribute("aria-pressed", String(on));
    $("draw-toggle").textContent = on ? "Drawing: drag on the image (Esc stops)" : "Draw a box";
    overlay.classList.toggle("drawing", on);
  }

  $("draw-toggle").addEventListener("click", () => setDrawing(!state.drawing));
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && state.drawing) setDrawing(false);
  });

  let dragStart = null;
  function toOutput(event) {
    const rect = overlay.getBoundingClientRect();
    const { width, height } = scales();
    return {
      x: Math.min(width, Math.max(0, ((event.clientX - rect.left) / rect.width) * width)),
      y: Math.min(height, Math.max(0, ((event.clientY - rect.top) / rect.height) * height)),
    };
  }
  overlay.addEventListener("pointerdown", (event) => {
    if (!state.drawing) return;
    event.preventDefault();
    overlay.setPointerCapture(event.pointerId);
    dragStart = toOutput(event);
  });
  overlay.addEventListener("pointermove", (event) => {
    if (!dragStart) return;
    const p = toOutput(event);
    renderOverlay({ x1: dragStart.x, y1: dragStart.y, x2: p.x, y2: p.y });
  });
  overlay.addEventListener("pointerup", (event) => {
    if (!dragStart) return;
    const p = toOutput(event);
    const { sx, sy } = scales();
    const start = dragStart;
    dragStart = null;
    if (!addBox([start.x / sx, start.y / sy, p.x / sx, p.y / sy])) renderOverlay();
    else setDrawing(false);
  });

  $("recolorize").addEventListener("click", () => {
    const item = state.selected;
    if (!item || item.status === "uploading" || item.status === "colorizing") return;
    item.request = { boxes: (item.boxes || []).map((b) => ({ box: b.box.slice(), score: b.score })) };
    item.status = "waiting";
    renderItem(item);
    pump();
  });

  $("use-detector").addEventListener("click", () => {
    const item = state.selected;
    if (!item || item.status === "uploading" || item.status === "colorizing") return;
    item.request = null;
    item.status = "waiting";
    renderItem(item);
    pump();
  });

  // -- misc ------------------------------------------------------------------------------------

  function announce(text) {
    $("announcer").textContent = text;
  }

  window.addEventListener("resize", () => {
    if (state.selected && state.selected.result) layout();
  });

  showKeyState();
  loadInfo();
})();
