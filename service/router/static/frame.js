// The comparison's elements and its frame: the output's size and output pixels per input pixel
// (network resolution squashes the input to 256x256; boxes are in input pixels).

import { $ } from "./dom.js";
import { state } from "./state.js";

export const beforeImg = $("before-img");
export const afterImg = $("after-img");
export const overlay = $("overlay");
export const stage = $("stage");

export function scales() {
  const r = state.selected.result;
  const width = afterImg.naturalWidth || (r.input_size ? r.input_size[0] : 1);
  const height = afterImg.naturalHeight || (r.input_size ? r.input_size[1] : 1);
  const input = r.input_size || [width, height];
  return { width, height, sx: width / input[0], sy: height / input[1], input };
}
