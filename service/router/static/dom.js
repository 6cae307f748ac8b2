// Page helpers every module uses: element look-up by id and the screen-reader announcer.

export const $ = (id) => document.getElementById(id);

/** Say `text` to a screen reader (the polite live region at the end of the page). */
export function announce(text) {
  $("announcer").textContent = text;
}
