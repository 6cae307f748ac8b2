// The API key: kept in this tab's sessionStorage, sent as X-API-Key, asked for after a 401.

import { $, announce } from "./dom.js";

const KEY_STORAGE = "instcolor.apiKey";

export function apiKey() {
  try {
    return sessionStorage.getItem(KEY_STORAGE) || "";
  } catch {
    return "";
  }
}

/** The headers that carry the stored key (none without one). */
export function authHeaders() {
  const key = apiKey();
  return key ? { "X-API-Key": key } : {};
}

/** Show "Using an API key · Forget it" while a key is stored. */
export function showKeyState() {
  $("key-status").hidden = !apiKey();
}

/** Show the key form with `message` and move the focus to its field. */
export function askForKey(message) {
  const form = $("key-form");
  $("key-message").textContent = message;
  form.hidden = false;
  $("api-key").focus();
}

/** The key form stores the key and then calls `onSaved`; "Forget it" deletes it. */
export function installKeyForm(onSaved) {
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("api-key").value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY_STORAGE, key);
    $("api-key").value = "";
    $("key-form").hidden = true;
    showKeyState();
    announce("API key saved for this tab; retrying.");
    onSaved();
  });

  $("forget-key").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORAGE);
    showKeyState();
    announce("API key forgotten.");
  });
}
