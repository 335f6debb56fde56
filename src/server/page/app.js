// The page served at `/`: pick or drop an image, POST it to /classify as a raw body, show the
// top 5 as bars with the server's timing headers. No framework, nothing from the network but
// this server.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY = "diracnet-api-key";
// The last file sent, and whether the server asked for a key for it (sent again once one is
// typed).
let last = { file: null, needsKey: false };
// Which request is the latest: the answer of an earlier one (a file dropped meanwhile) is
// ignored.
let latest = 0;

function setStatus(text, error = false) {
  const s = $("status");
  s.textContent = text;
  s.classList.toggle("error", error);
}

// The served models (/info), polled until the server is ready.
async function loadModels() {
  let info;
  try {
    const r = await fetch("/info");
    info = await r.json();
  } catch (e) {
    setStatus("The server cannot be reached: " + e.message, true);
    return;
  }
  $("server").textContent = `diracnet ${info.version}` + (info.device ? ` on ${info.device}` : "");
  if (!info.ready || info.models.length === 0) {
    setStatus("The models are loading…");
    setTimeout(loadModels, 1000);
    return;
  }
  const select = $("model");
  select.replaceChildren();
  for (const m of info.models) {
    const option = document.createElement("option");
    option.value = m.name;
    const published = m.published ? `, ${(100 - m.published.top1_error).toFixed(1)} % top-1` : "";
    option.textContent = `${m.name} (DiracNet-${m.depth}, ${m.dtype}${published})`;
    select.append(option);
  }
  $("model-row").hidden = info.models.length < 2;
  if ($("status").textContent.startsWith("The models are loading")) setStatus("");
}

// Raw body with the file's own type: what /classify takes from any HTTP client.
async function classify(file) {
  const mine = ++latest;
  last = { file, needsKey: false };
  const preview = $("preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  $("drop-text").hidden = true;
  $("results").replaceChildren();
  $("timing").textContent = "";
  setStatus(`Classifying ${file.name}…`);

  // No top_k: the server answers min(5, the model's classes).
  const params = new URLSearchParams();
  if ($("model").value) params.set("model", $("model").value);
  const type = file.type && file.type.startsWith("image/") ? file.type : "application/octet-stream";
  const headers = { "Content-Type": type };
  const key = $("key").value.trim();
  if (key) headers.Authorization = "Bearer " + key;

  const started = performance.now();
  let response, body;
  try {
    response = await fetch("/classify?" + params, { method: "POST", headers, body: file });
    body = await response.json().catch(() => null);
  } catch (e) {
    if (mine === latest) setStatus("The request failed: " + e.message, true);
    return;
  }
  if (mine !== latest) return;
  const total = performance.now() - started;
  if (!response.ok) {
    const why = body && body.error ? body.error : response.statusText;
    last.needsKey = response.status === 401;
    const hint = last.needsKey ? " Enter the server's API key above." : "";
    setStatus(`${response.status}: ${why}.${hint}`, true);
    return;
  }
  setStatus(`${file.name}: ${body.model}`);
  showPredictions(body.predictions);
  showTiming(response.headers, total);
}

function showPredictions(predictions) {
  const list = $("results");
  for (const p of predictions) {
    const item = document.createElement("li");
    item.className = "prediction";
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = p.label ?? `class ${p.index}`;
    label.title = `class ${p.index}`;
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = (100 * p.score).toFixed(1) + " %";
    const bar = document.createElement("div");
    bar.className = "bar";
    const fill = document.createElement("div");
    fill.style.width = Math.max(0, Math.min(100, 100 * p.score)).toFixed(2) + "%";
    bar.append(fill);
    item.append(label, score, bar);
    list.append(item);
  }
}

function showTiming(headers, total) {
  const ms = (name) => {
    const v = parseFloat(headers.get(name));
    return Number.isFinite(v) ? v.toFixed(1) + " ms" : "–";
  };
  $("timing").textContent =
    `preprocess ${ms("x-preprocess-time-ms")} · queue ${ms("x-queue-time-ms")} · ` +
    `inference ${ms("x-inference-time-ms")} · round trip ${total.toFixed(1)} ms`;
}

function setUp() {
  const key = $("key");
  key.value = sessionStorage.getItem(KEY) ?? "";
  key.addEventListener("change", () => {
    sessionStorage.setItem(KEY, key.value.trim());
    if (last.needsKey && key.value.trim()) classify(last.file);
  });

  $("file").addEventListener("change", (e) => {
    const file = e.target.files[0];
    // Cleared, so that choosing the same file again is a new choice.
    e.target.value = "";
    if (file) classify(file);
  });
  const drop = $("drop");
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("file").click(); }
  });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const file = e.dataTransfer.files[0];
    if (file) classify(file);
  });
  loadModels();
}

setUp();
