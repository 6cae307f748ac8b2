// InstColor web page, the entry module: plain JavaScript ES modules, no dependencies, no build
// step, talking only to this origin. Each image goes to POST /colorize (Accept: application/json);
// the answer carries the image, the boxes used with their scores, the input size (the boxes'
// frame), timings and model version. This module only wires the others together.

import { installKeyForm, showKeyState } from "./apikey.js";
import { installBatches, loadBatches } from "./batches.js";
import { installBoxes } from "./boxes.js";
import { installCompare } from "./compare.js";
import { installHints } from "./hints.js";
import { $ } from "./dom.js";
import { loadInfo } from "./info.js";
import { onRowActions } from "./list.js";
import { installModelCompare, loadModels } from "./models.js";
import { installOptions } from "./options.js";
import { addFiles, colorizeAgain, requeue, retryWaitingForKey } from "./queue.js";
import { installSamples } from "./samples.js";
import { state } from "./state.js";
import { installUpload } from "./upload.js";
import { renderViewer, select } from "./viewer.js";

installKeyForm(() => {
  loadInfo();
  loadModels();
  retryWaitingForKey();
  loadBatches();
});
installOptions();
installUpload(addFiles);
onRowActions({ select, retry: requeue });
installCompare();
installBoxes();
installHints();
installModelCompare();
installBatches();
installSamples(renderViewer);
$("recolorize").addEventListener("click", () => colorizeAgain(state.selected, true));
$("recolorize-hints").addEventListener("click", () => colorizeAgain(state.selected, true));
$("use-detector").addEventListener("click", () => colorizeAgain(state.selected, false));

showKeyState();
loadInfo();
loadModels();
loadBatches();
