// The PPD web page: plain JavaScript over the public HTTP API (/ui/settings, /v1/example-pairs, /v1/users,
// /v1/generate). No framework and no build step: this file is what the browser runs, served by the ingress.
"use strict";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "ppd-api-token";
const GRID_IMAGES = 4; // seeds per row (capped by the server's max_images)
const LIVE_DELAY_MS = 250; // sliders regenerate once the hand rests this long, not on every pixel of a drag
const SMALL_IMAGE_PX = 256; // images narrower than this are shown scaled up with hard pixel edges

const state = {
  settings: null,
  // sessionStorage: the token lives as long as the tab, never on disk beyond it.
  token: sessionStorage.getItem(TOKEN_KEY) || "",
  exampleSeed: 0,
  pairs: [], // [{caption, images: [data URI | null, data URI | null], preferred: null | 0 | 1}]
  captions: [], // example captions, for the caption box
  users: [], // [{name, handle, profile, modelId}]
  serial: { base: 0, user: 0, mix: 0 }, // newest request per row: older answers are dropped
};

class ApiError extends Error {
  constructor(status, message, field) {
    super(message);
    this.status = status;
    this.field = field || null;
  }
}

// --- the API -----------------------------------------------------------------------------------------------------

async function api(path, { method = "GET", body } = {}) {
  const headers = {};
  if (state.token) headers.Authorization = `Bearer ${state.token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (err) {
    throw new ApiError(0, `Could not reach the server (${err.message}).`);
  }
  const text = await response.text();
  let payload = null;
  try {
    payload = text ? JSON.parse(text) : null;
  } catch {
    payload = null;
  }
  if (!response.ok) {
    // The API's errors are {error, field, message}: show its message as it is, it names the field at fault.
    const message = payload && payload.message ? payload.message : `HTTP ${response.status} ${response.statusText}`;
    throw new ApiError(response.status, message, payload && payload.field);
  }
  return payload;
}

function base64Of(dataUri) {
  return dataUri.slice(dataUri.indexOf(",") + 1);
}

// --- messages ----------------------------------------------------------------------------------------------------

function showError(err) {
  const box = $("error");
  box.textContent = err.message || String(err);
  box.hidden = false;
  if (err.status === 401 && state.settings && state.settings.auth_required) {
    $("auth").hidden = false;
    $("token").focus();
  }
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function setStatus(text) {
  $("status").textContent = text;
}

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key.startsWith("data-") || key.startsWith("aria-") || key === "role") node.setAttribute(key, value);
    else node[key] = value;
  }
  node.append(...children);
  return node;
}

function image(src, alt) {
  const img = el("img", { src, alt, decoding: "async" });
  img.addEventListener("load", () => img.classList.toggle("pixelated", img.naturalWidth < SMALL_IMAGE_PX));
  // An upload the browser cannot decode: say so in place (the server will name the field if it is sent).
  img.addEventListener("error", () => img.replaceWith(el("span", { className: "empty", textContent: `${alt}: not an image this browser can show` })));
  return img;
}

// --- 1. pairs ----------------------------------------------------------------------------------------------------

function emptyPair() {
  return { caption: "", images: [null, null], preferred: null };
}

async function loadExamples() {
  const shots = state.settings.shots;
  setStatus("Loading example pairs...");
  try {
    const result = await api(`/v1/example-pairs?count=${shots}&seed=${state.exampleSeed}`);
    state.pairs = result.pairs.map((p) => ({ caption: p.caption, images: [p.image_0, p.image_1], preferred: null }));
    for (const pair of result.pairs) if (!state.captions.includes(pair.caption)) state.captions.push(pair.caption);
    $("examples-note").textContent = `${result.pairs.length} pairs drawn from ${result.available} in "${result.split}".`;
    $("examples-note").classList.remove("warning");
    $("auth").hidden = !state.settings.auth_required;
    clearError();
    setStatus("");
  } catch (err) {
    setStatus("");
    if (err.status === 404) {
      // No served world here (e.g. `make demo` has not run): the page still works with uploaded pairs.
      $("examples-note").textContent = `${err.message}`;
      $("examples-note").classList.add("warning");
    } else {
      showError(err);
    }
  }
  while (state.pairs.length < shots) state.pairs.push(emptyPair());
  renderPairs();
  renderCaptionExamples();
}

function renderPairs() {
  $("pairs").replaceChildren(...state.pairs.map(pairCard));
}

function pairCard(pair, index) {
  const id = `pair-${index}-caption`;
  const caption = el("input", { id, className: "pair-caption", value: pair.caption, autocomplete: "off" });
  caption.maxLength = state.settings.max_caption_chars;
  caption.addEventListener("input", () => {
    pair.caption = caption.value;
  });
  const choices = el("div", { className: "choices", role: "group", "aria-label": `Pair ${index + 1}: which image do you prefer?` });
  choices.append(choiceView(pair, index, 0), choiceView(pair, index, 1));
  return el(
    "li",
    { className: "pair", "data-index": String(index) },
    el("label", { htmlFor: id, className: "pair-title", textContent: `Pair ${index + 1}: caption` }),
    caption,
    choices,
  );
}

function choiceView(pair, index, side) {
  const letter = "AB"[side];
  const chosen = pair.preferred === side;
  const pick = el("button", {
    type: "button",
    className: chosen ? "pick chosen" : "pick",
    "data-side": String(side),
    "aria-pressed": String(chosen),
    "aria-label": `Pair ${index + 1}: I prefer image ${letter}`,
  });
  if (pair.images[side]) {
    pick.append(image(pair.images[side], `Pair ${index + 1}, image ${letter}${pair.caption ? `: ${pair.caption}` : ""}`));
  } else {
    pick.append(el("span", { className: "empty", textContent: `No image ${letter} yet: upload one` }));
    pick.disabled = true;
  }
  pick.addEventListener("click", () => choose(index, side));

  const file = el("input", { type: "file", accept: "image/png,image/jpeg,image/webp,image/gif", className: "file", hidden: true });
  file.setAttribute("data-side", String(side));
  file.addEventListener("change", () => upload(index, side, file));
  const uploadButton = el("button", {
    type: "button",
    className: "upload",
    textContent: "Upload...",
    "aria-label": `Upload your own image ${letter} for pair ${index + 1}`,
    "data-side": String(side),
  });
  uploadButton.addEventListener("click", () => file.click());
  const label = el("span", { className: "choice-label", textContent: chosen ? `${letter}: preferred` : `Image ${letter}` });
  return el("figure", { className: "choice" }, pick, el("figcaption", {}, label, uploadButton, file));
}

function choose(index, side) {
  state.pairs[index].preferred = side;
  // Update in place: re-rendering the card would move the keyboard focus away from the button just pressed.
  const card = $("pairs").children[index];
  for (const pick of card.querySelectorAll(".pick")) {
    const chosen = Number(pick.dataset.side) === side;
    pick.classList.toggle("chosen", chosen);
    pick.setAttribute("aria-pressed", String(chosen));
    const letter = "AB"[Number(pick.dataset.side)];
    pick.closest("figure").querySelector(".choice-label").textContent = chosen ? `${letter}: preferred` : `Image ${letter}`;
  }
}

async function upload(index, side, input) {
  const file = input.files && input.files[0];
  if (!file) return;
  try {
    state.pairs[index].images[side] = await readImage(file);
  } catch (err) {
    showError(err);
    return;
  }
  renderPairs();
  $("pairs").children[index].querySelector(`.upload[data-side="${side}"]`).focus();
}

function readImage(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onerror = () => reject(new Error(`${file.name}: the file could not be read.`));
    reader.onload = () => resolve(fitImage(reader.result, file.size));
    reader.readAsDataURL(file);
  });
}

async function fitImage(dataUri, bytes) {
  // A phone photo is megabytes: scale it down here to what the API accepts, rather than have it refused.
  const img = new Image();
  const loaded = await new Promise((resolve) => {
    img.onload = () => resolve(true);
    img.onerror = () => resolve(false);
    img.src = dataUri;
  });
  if (!loaded) return dataUri; // not an image this browser reads: send it anyway, the server says what is wrong
  const { max_image_bytes: maxBytes, max_image_pixels: maxPixels } = state.settings;
  const pixels = img.naturalWidth * img.naturalHeight;
  if (bytes <= maxBytes && pixels <= maxPixels) return dataUri;
  let scale = Math.min(1, Math.sqrt(maxPixels / pixels));
  const canvas = document.createElement("canvas");
  for (;;) {
    canvas.width = Math.max(1, Math.floor(img.naturalWidth * scale));
    canvas.height = Math.max(1, Math.floor(img.naturalHeight * scale));
    canvas.getContext("2d").drawImage(img, 0, 0, canvas.width, canvas.height);
    const scaled = canvas.toDataURL("image/jpeg", 0.9);
    if ((base64Of(scaled).length * 3) / 4 <= maxBytes || canvas.width === 1) return scaled;
    scale *= 0.75;
  }
}

function pairProblem(pair, index) {
  if (!pair.caption.trim()) return `Pair ${index + 1}: write a caption.`;
  if (!pair.images[0] || !pair.images[1]) return `Pair ${index + 1}: upload both images.`;
  if (pair.preferred === null) return `Pair ${index + 1}: click the image you prefer.`;
  return null;
}

async function personalise() {
  const problem = state.pairs.map(pairProblem).find(Boolean);
  if (problem) {
    showError(new Error(problem));
    return;
  }
  const pairs = state.pairs.map((pair) => ({
    caption: pair.caption.trim(),
    image_0: base64Of(pair.images[0]),
    image_1: base64Of(pair.images[1]),
    preferred: pair.preferred,
  }));
  const button = $("personalise");
  button.disabled = true;
  setStatus("Reading your taste from the pairs...");
  try {
    const created = await api("/v1/users", { method: "POST", body: { pairs } });
    const user = { name: `User ${state.users.length + 1}`, handle: created.handle, profile: created.profile, modelId: created.model_id };
    state.users.push(user);
    for (const pair of state.pairs) if (!state.captions.includes(pair.caption.trim())) state.captions.push(pair.caption.trim());
    clearError();
    setStatus(`${user.name} is registered.`);
    renderUsers();
    renderCaptionExamples();
    $("user-select").value = user.handle;
    if (!$("caption").value.trim()) $("caption").value = state.captions[0] || "";
    $("generate-section").hidden = false;
    await generateAll();
  } catch (err) {
    setStatus("");
    showError(err);
  } finally {
    button.disabled = false;
  }
}

// --- 2. users ----------------------------------------------------------------------------------------------------

function renderUsers() {
  $("users-section").hidden = state.users.length === 0;
  $("users").replaceChildren(
    ...state.users.map((user) => {
      const profile = user.profile
        ? el("p", { className: "profile" }, el("strong", { textContent: "Profile: " }), user.profile)
        : el("p", { className: "profile note", textContent: `No profile text: this server's embedder (${user.modelId}) writes none.` });
      return el(
        "li",
        { className: "user" },
        el("strong", { textContent: user.name }),
        " ",
        el("span", { className: "note", textContent: "handle " }),
        el("code", { className: "handle", textContent: user.handle }),
        profile,
      );
    }),
  );
  for (const [id, fallback] of [["user-select", 0], ["mix-a", 0], ["mix-b", 1]]) {
    const select = $(id);
    const previous = select.value;
    select.replaceChildren(...state.users.map((user) => el("option", { value: user.handle, textContent: user.name })));
    const keep = state.users.some((user) => user.handle === previous);
    select.value = keep ? previous : state.users[Math.min(fallback, state.users.length - 1)].handle;
  }
  if (state.users.length >= 2 && $("mix-a").value === $("mix-b").value) {
    $("mix-a").value = state.users[state.users.length - 2].handle;
    $("mix-b").value = state.users[state.users.length - 1].handle;
  }
  $("mix-section").hidden = state.users.length < 2;
}

function userName(handle) {
  const user = state.users.find((u) => u.handle === handle);
  return user ? user.name : handle;
}

// --- 3. and 4. generation -----------------------------------------------------------------------------------------

function renderCaptionExamples() {
  const examples = state.captions.slice(0, 8);
  $("caption-examples").replaceChildren(...examples.map((caption) => el("option", { value: caption })));
  $("caption-chips").replaceChildren(
    ...examples.map((caption) => {
      const chip = el("button", { type: "button", className: "chip", textContent: caption });
      chip.addEventListener("click", () => {
        $("caption").value = caption;
        generateAll();
      });
      return chip;
    }),
  );
}

function seeds() {
  return Math.min(GRID_IMAGES, state.settings.max_images);
}

function baseRequest() {
  return {
    caption: $("caption").value.trim(),
    seed: Math.max(0, Math.floor(Number($("seed").value) || 0)),
    num_images: seeds(),
  };
}

function scale() {
  return Number($("scale").value);
}

function mixWeight() {
  return Number($("mix").value);
}

async function generateAll() {
  if (!$("caption").value.trim()) {
    showError(new Error("caption: write what to draw (or click an example caption)."));
    $("caption").focus();
    return;
  }
  await Promise.all([generateBase(), generateUser(), generateMix()]);
}

function generateBase() {
  return fillRow($("grid"), "base", "Base model", baseRequest());
}

function generateUser() {
  const handle = $("user-select").value;
  if (!handle) return Promise.resolve();
  const label = `${userName(handle)} (user scale ${scale().toFixed(1)})`;
  return fillRow($("grid"), "user", label, { ...baseRequest(), user: handle, user_scale: scale() });
}

function generateMix() {
  if (state.users.length < 2 || !$("caption").value.trim()) return Promise.resolve();
  const [a, b] = [$("mix-a").value, $("mix-b").value];
  if (a === b) {
    showError(new Error("mix: choose two different users."));
    return Promise.resolve();
  }
  const w = mixWeight();
  const label = `${Math.round((1 - w) * 100)}% ${userName(a)} + ${Math.round(w * 100)}% ${userName(b)}`;
  const mix = [{ user: a, weight: 1 - w }, { user: b, weight: w }];
  return fillRow($("mix-grid"), "mix", label, { ...baseRequest(), mix, user_scale: scale() });
}

function gridRow(container, key) {
  let row = container.querySelector(`[data-row="${key}"]`);
  if (!row) {
    row = el("div", { className: "grid-row", "data-row": key, "data-version": "0" }, el("h3", { className: "row-label" }), el("div", { className: "cells" }));
    // Rows keep a fixed order (base above personalised) whichever answer comes first.
    const order = ["base", "user", "mix"];
    const next = [...container.children].find((other) => order.indexOf(other.dataset.row) > order.indexOf(key));
    container.insertBefore(row, next || null);
  }
  return row;
}

async function fillRow(container, key, label, request) {
  const serial = ++state.serial[key];
  const row = gridRow(container, key);
  row.setAttribute("aria-busy", "true");
  try {
    const result = await api("/v1/generate", { method: "POST", body: request });
    if (serial !== state.serial[key]) return; // a newer request for this row has been sent
    row.querySelector(".row-label").textContent = label;
    row.querySelector(".cells").replaceChildren(...result.images.map((img) => cell(key, label, result.caption, img)));
    row.dataset.version = String(serial);
    clearError();
  } catch (err) {
    if (serial === state.serial[key]) showError(err);
  } finally {
    if (serial === state.serial[key]) row.removeAttribute("aria-busy");
  }
}

function cell(key, label, caption, generated) {
  const src = `data:image/png;base64,${generated.png_base64}`;
  const download = el("a", {
    href: src,
    download: `ppd-${key}-seed${generated.seed}.png`,
    className: "download",
    textContent: "Download",
    "aria-label": `Download: ${label}, seed ${generated.seed}`,
  });
  return el(
    "figure",
    { className: "cell" },
    image(src, `${label}, seed ${generated.seed}: ${caption}`),
    el("figcaption", {}, el("span", { textContent: `seed ${generated.seed}` }), " ", download),
  );
}

function debounce(fn) {
  let timer = null;
  return () => {
    clearTimeout(timer);
    timer = setTimeout(fn, LIVE_DELAY_MS);
  };
}

// --- start -------------------------------------------------------------------------------------------------------

function bindControls() {
  $("auth-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.token = $("token").value.trim();
    sessionStorage.setItem(TOKEN_KEY, state.token);
    clearError();
    loadExamples();
  });
  $("other-examples").addEventListener("click", () => {
    state.exampleSeed += 1;
    state.pairs = [];
    loadExamples();
  });
  $("personalise").addEventListener("click", personalise);
  $("generate-form").addEventListener("submit", (event) => {
    event.preventDefault();
    generateAll();
  });
  $("user-select").addEventListener("change", generateUser);
  const liveScale = debounce(() => Promise.all([generateUser(), generateMix()]));
  $("scale").addEventListener("input", () => {
    $("scale-value").textContent = scale().toFixed(1);
    liveScale();
  });
  const liveMix = debounce(generateMix);
  $("mix").addEventListener("input", () => {
    $("mix-value").textContent = mixWeight().toFixed(1);
    liveMix();
  });
  $("mix-a").addEventListener("change", generateMix);
  $("mix-b").addEventListener("change", generateMix);
}

async function start() {
  bindControls();
  try {
    state.settings = await api("/ui/settings");
  } catch (err) {
    showError(err);
    return;
  }
  const { settings } = state;
  $("scale").max = String(settings.max_user_scale);
  $("scale").value = String(settings.default_user_scale);
  $("scale-value").textContent = scale().toFixed(1);
  $("mix-value").textContent = mixWeight().toFixed(1);
  $("caption").maxLength = settings.max_caption_chars;
  state.pairs = Array.from({ length: settings.shots }, emptyPair);
  renderPairs();
  if (settings.auth_required) {
    $("auth").hidden = false;
    $("token").value = state.token;
    if (!state.token) {
      setStatus("Enter the API token to start.");
      $("token").focus();
      return;
    }
  }
  await loadExamples();
}

document.addEventListener("DOMContentLoaded", start);
