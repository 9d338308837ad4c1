// sdlab web UI: talks to this server's AUTOMATIC1111 API (/sdapi/v1) and /sdlab/v1/vae/roundtrip.
"use strict";

const POLL_MS = 300; // progress polling interval while a request runs
const $ = (id) => document.getElementById(id);
const png = (base64) => `data:image/png;base64,${base64}`;
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// ---------------------------------------------------------------------------------------------
// HTTP

async function request(method, path, body) {
  const options = { method, headers: body ? { "Content-Type": "application/json" } : {} };
  const response = await fetch(path, body ? { ...options, body: JSON.stringify(body) } : options);
  const data = await response.json().catch(() => null);
  if (!response.ok) throw new Error(errorText(response, data));
  return data;
}

const getJSON = (path) => request("GET", path);
const postJSON = (path, body) => request("POST", path, body);

function errorText(response, data) {
  const detail = data && data.detail;
  if (Array.isArray(detail)) return detail.map((d) => `${(d.loc || []).slice(1).join(".")}: ${d.msg}`).join("\n");
  return detail || `${response.status} ${response.statusText}`;
}

function showError(error) {
  $("error").textContent = error ? String(error.message || error) : "";
  $("error").hidden = !error;
}

// ---------------------------------------------------------------------------------------------
// start-up: tabs and the server's lists

function fillSelect(select, items, chosen) {
  select.replaceChildren(...items.map(([value, label]) => new Option(label, value, false, value === chosen)));
}

async function loadLists() {
  const lists = ["sd-models", "options", "samplers", "schedulers", "latent-upscale-modes", "upscalers"];
  const [models, options, samplers, schedulers, latentModes, upscalers] = await Promise.all(
    lists.map((name) => getJSON(`/sdapi/v1/${name}`)),
  );
  fillSelect($("model"), models.map((m) => [m.title, m.model_name]), options.sd_model_checkpoint);
  fillSelect($("sampler"), samplers.map((s) => [s.name, s.name]), "Euler a");
  fillSelect($("scheduler"), schedulers.map((s) => [s.name, s.label]), "automatic");
  const names = [...latentModes, ...upscalers].map((u) => [u.name, u.name]);
  fillSelect($("hr-upscaler"), names, "Latent");
  const [controlnets, modules] = await Promise.all(
    ["model_list", "module_list"].map((name) => getJSON(`/controlnet/${name}`)),
  );
  fillSelect($("cn-model"), controlnets.model_list.map((m) => [m, m]), controlnets.model_list[0]);
  const isIP = (m) => m.startsWith("ip-adapter"); // the extension's IP-Adapter preprocessors
  fillSelect($("cn-module"), modules.module_list.filter((m) => !isIP(m)).map((m) => [m, m]), "none");
  fillSelect($("ip-model"), controlnets.model_list.map((m) => [m, m]), controlnets.model_list[0]);
  fillSelect($("ip-module"), modules.module_list.filter(isIP).map((m) => [m, m]), "ip-adapter_clip_sd15");
}

function setupTabs() {
  const tabs = [...document.querySelectorAll('[role="tab"]')];
  const select = (tab) => {
    for (const t of tabs) {
      const chosen = t === tab;
      t.setAttribute("aria-selected", String(chosen));
      t.tabIndex = chosen ? 0 : -1;
      $(t.getAttribute("aria-controls")).hidden = !chosen;
    }
    tab.focus();
  };
  tabs.forEach((tab, i) => {
    tab.addEventListener("click", () => select(tab));
    tab.addEventListener("keydown", (e) => {
      const step = { ArrowRight: 1, ArrowLeft: -1 }[e.key];
      if (step) select(tabs[(i + step + tabs.length) % tabs.length]);
    });
  });
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function showImage(img, src) {
  img.src = src;
  await img.decode();
  return img;
}

// ---------------------------------------------------------------------------------------------
// the inpainting mask: a canvas over the init image, white strokes = repaint

const mask = { canvas: null, painted: false, last: null };

function setupMask() {
  const canvas = (mask.canvas = $("mask"));
  canvas.addEventListener("pointerdown", (e) => {
    canvas.setPointerCapture(e.pointerId);
    mask.last = canvasPoint(e);
    paint(mask.last, mask.last);
  });
  canvas.addEventListener("pointermove", (e) => {
    if (!mask.last) return;
    const point = canvasPoint(e);
    paint(mask.last, point);
    mask.last = point;
  });
  for (const end of ["pointerup", "pointercancel"]) canvas.addEventListener(end, () => (mask.last = null));
  $("mask-clear").addEventListener("click", clearMask);
}

function canvasPoint(e) {
  const box = mask.canvas.getBoundingClientRect();
  const scale = mask.canvas.width / box.width; // image pixels per screen pixel
  return { x: (e.clientX - box.left) * scale, y: (e.clientY - box.top) * scale, scale };
}

function paint(from, to) {
  const ctx = mask.canvas.getContext("2d");
  const width = Number($("brush").value) * to.scale;
  ctx.strokeStyle = ctx.fillStyle = "#fff";
  ctx.lineWidth = width;
  ctx.lineCap = "round";
  ctx.beginPath();
  ctx.moveTo(from.x, from.y);
  ctx.lineTo(to.x, to.y);
  ctx.stroke();
  ctx.beginPath();
  ctx.arc(to.x, to.y, width / 2, 0, 2 * Math.PI);
  ctx.fill();
  mask.painted = true;
}

function clearMask() {
  mask.canvas.getContext("2d").clearRect(0, 0, mask.canvas.width, mask.canvas.height);
  mask.painted = false;
}

function maskPNG() {
  const out = document.createElement("canvas");
  out.width = mask.canvas.width;
  out.height = mask.canvas.height;
  const ctx = out.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, out.width, out.height);
  ctx.drawImage(mask.canvas, 0, 0);
  return out.toDataURL("image/png");
}

const snap = (n) => Math.min(2048, Math.max(64, Math.round(n / 8) * 8));

async function setInit(src) {
  const img = await showImage($("init-image"), src);
  mask.canvas.width = img.naturalWidth;
  mask.canvas.height = img.naturalHeight;
  clearMask();
  $("width").value = snap(img.naturalWidth);
  $("height").value = snap(img.naturalHeight);
  $("init-box").hidden = false;
}

function removeInit() {
  $("init-image").removeAttribute("src");
  $("init-file").value = "";
  $("init-box").hidden = true;
  clearMask();
}

function setupInit() {
  $("init-file").addEventListener("change", async (e) => {
    const file = e.target.files[0];
    if (file) await setInit(await readFile(file)).catch(showError);
  });
  $("init-remove").addEventListener("click", removeInit);
  $("strength").addEventListener("input", (e) => ($("strength-value").value = e.target.value));
}

// ---------------------------------------------------------------------------------------------
// generation: one A1111 request, progress polled while it runs, results into the gallery

const number = (id) => Number($(id).value);

function generationBody() {
  const body = {
    prompt: $("prompt").value,
    negative_prompt: $("negative").value,
    width: number("width"),
    height: number("height"),
    steps: number("steps"),
    cfg_scale: number("cfg"),
    sampler_name: $("sampler").value,
    scheduler: $("scheduler").value,
    seed: number("seed"),
    batch_size: number("batch-size"),
    n_iter: number("batch-count"),
    override_settings: { sd_model_checkpoint: $("model").value },
  };
  const units = [$("cn-enable").checked && controlNetUnit(), $("ip-enable").checked && ipAdapterUnit()];
  if (units.some(Boolean)) body.alwayson_scripts = { controlnet: { args: units.filter(Boolean) } };
  if ($("init-box").hidden) return ["txt2img", $("hires").checked ? { ...body, ...hiresFields() } : body];
  body.init_images = [$("init-image").src];
  body.denoising_strength = number("strength");
  if (mask.painted) Object.assign(body, { mask: maskPNG(), ...inpaintFields() });
  return ["img2img", body];
}

// A1111's inpainting settings, sent in full: its API's defaults (only masked, fill) are not its UI's
function inpaintFields() {
  return {
    inpaint_full_res: $("inpaint-area").value === "masked",
    inpainting_fill: number("masked-content"),
    mask_blur: number("mask-blur"),
    inpaint_full_res_padding: number("inpaint-padding"),
  };
}

function hiresFields() {
  return {
    enable_hr: true,
    hr_upscaler: $("hr-upscaler").value,
    hr_scale: number("hr-scale"),
    hr_second_pass_steps: number("hr-steps"),
    denoising_strength: number("hr-denoise"),
  };
}

// ---------------------------------------------------------------------------------------------
// ControlNet: one unit in sd-webui-controlnet's API format; the preprocessor runs at the image's size

function controlNetUnit() {
  const image = $("cn-image");
  if (!image.src) throw new Error("ControlNet: choose a control image (or untick Enable ControlNet)");
  return {
    enabled: true,
    model: $("cn-model").value,
    module: $("cn-module").value,
    image: image.src,
    weight: number("cn-weight"),
    guidance_start: number("cn-start"),
    guidance_end: number("cn-end"),
    control_mode: $("cn-mode").value,
    resize_mode: $("cn-resize").value,
    processor_res: Math.min(image.naturalWidth, image.naturalHeight),
  };
}

// IP-Adapter: a unit whose module is one of the extension's IP-Adapter preprocessors (the image encoder)
function ipAdapterUnit() {
  const image = $("ip-image");
  if (!image.src) throw new Error("IP-Adapter: choose an image prompt (or untick Enable IP-Adapter)");
  return {
    enabled: true,
    model: $("ip-model").value,
    module: $("ip-module").value,
    image: image.src,
    weight: number("ip-weight"),
  };
}

async function previewControl() {
  showError(null);
  try {
    const unit = controlNetUnit();
    const body = {
      controlnet_module: unit.module,
      controlnet_input_images: [unit.image],
      controlnet_processor_res: unit.processor_res,
    };
    const result = await postJSON("/controlnet/detect", body);
    await showImage($("cn-detected"), png(result.images[0]));
    $("cn-detected").hidden = false;
  } catch (error) {
    showError(error);
  }
}

function setupControlNet() {
  $("cn-file").addEventListener("change", async (e) => {
    const file = e.target.files[0];
    if (!file) return;
    try {
      await showImage($("cn-image"), await readFile(file));
      $("cn-image").hidden = false;
      $("cn-detected").hidden = true;
      $("cn-preview").disabled = false;
      $("cn-enable").checked = true;
    } catch (error) {
      showError(error);
    }
  });
  $("cn-preview").addEventListener("click", previewControl);
  $("ip-file").addEventListener("change", async (e) => {
    const file = e.target.files[0];
    if (!file) return;
    try {
      await showImage($("ip-image"), await readFile(file));
      $("ip-image").hidden = false;
      $("ip-enable").checked = true;
    } catch (error) {
      showError(error);
    }
  });
}

async function pollProgress(run) {
  while (run.active) {
    const p = await getJSON("/sdapi/v1/progress?skip_current_image=false").catch(() => null);
    if (run.active && p) showProgress(p);
    await sleep(POLL_MS);
  }
}

function showProgress(p) {
  const s = p.state;
  if (!s.job) {
    $("progress-text").textContent = "Waiting for the worker…";
    return;
  }
  $("progress").value = p.progress;
  const batch = s.job_count > 1 ? ` · batch ${s.job_no + 1}/${s.job_count}` : "";
  const eta = p.eta_relative > 0 ? ` · about ${p.eta_relative.toFixed(1)} s left` : "";
  $("progress-text").textContent = `Step ${s.sampling_step}/${s.sampling_steps}${batch}${eta}`;
  if (p.current_image) {
    $("preview").src = png(p.current_image);
    $("preview").hidden = false;
  }
}

function setBusy(busy) {
  $("generate").disabled = busy;
  $("interrupt").disabled = !busy;
  $("preview").hidden = true;
}

let currentRun = null; // the generation in progress, marked when the user interrupts it

async function generate(e) {
  e.preventDefault();
  showError(null);
  let mode, body;
  try {
    [mode, body] = generationBody();
  } catch (error) {
    showError(error);
    return;
  }
  const run = { active: true, interrupted: false };
  currentRun = run;
  const started = performance.now();
  setBusy(true);
  $("progress").value = 0;
  $("progress-text").textContent = "Queued…";
  pollProgress(run);
  try {
    const result = await postJSON(`/sdapi/v1/${mode}`, body);
    const info = JSON.parse(result.info);
    result.images.forEach((image, i) => addToGallery(image, info.infotexts[i], info.all_seeds[i]));
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    const n = result.images.length;
    const made = `${n} image${n === 1 ? "" : "s"}`;
    // A1111 returns an interrupted image as far as it got
    const sofar = `${made} as far as ${n === 1 ? "it" : "they"} got`;
    const prefix = run.interrupted ? `Interrupted: ${n ? sofar : "no images"}` : made;
    $("progress-text").textContent = `${prefix} in ${seconds} s.`;
    $("progress").value = 1;
  } catch (error) {
    showError(error);
    $("progress-text").textContent = "Failed.";
  } finally {
    run.active = false;
    setBusy(false);
  }
}

function button(label, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = "secondary";
  b.textContent = label;
  b.addEventListener("click", onClick);
  return b;
}

function addToGallery(image, infotext, seed) {
  const card = document.createElement("li");
  card.className = "card";
  const img = new Image();
  img.src = png(image);
  img.alt = `Generated image, seed ${seed}`;
  const params = document.createElement("pre");
  params.className = "params";
  params.textContent = infotext;
  params.setAttribute("aria-label", "Parameters");
  const download = document.createElement("a");
  download.href = img.src;
  download.download = `sdlab-${seed}.png`;
  download.textContent = "Save";
  download.setAttribute("aria-label", `Save image, seed ${seed}`);
  const actions = document.createElement("div");
  actions.className = "buttons";
  actions.append(
    button("Reuse seed", () => ($("seed").value = seed)),
    button("To img2img", () => setInit(img.src).catch(showError)),
    download,
  );
  card.append(img, params, actions);
  $("gallery").prepend(card);
  $("gallery-empty").hidden = true;
}

function setupGenerate() {
  const form = $("gen-form");
  form.addEventListener("submit", generate);
  form.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) form.requestSubmit();
  });
  $("interrupt").addEventListener("click", () => {
    if (currentRun) currentRun.interrupted = true;
    postJSON("/sdapi/v1/interrupt").catch(showError);
  });
  $("seed-random").addEventListener("click", () => ($("seed").value = -1));
}

// ---------------------------------------------------------------------------------------------
// the VAE page: an image, its reconstruction, the difference and the latent's channels

async function vaeRoundTrip(e) {
  e?.preventDefault();
  showError(null);
  $("vae-run").disabled = true;
  $("vae-stats").textContent = "Encoding and decoding…";
  try {
    const body = { image: $("vae-original").src, model: $("model").value };
    await showRoundTrip(await postJSON("/sdlab/v1/vae/roundtrip", body));
  } catch (error) {
    showError(error);
    $("vae-stats").textContent = "";
  } finally {
    $("vae-run").disabled = false;
  }
}

async function showRoundTrip(r) {
  const [w, h] = r.size;
  const count = (shape) => `${shape.join("×")} = ${shape.reduce((a, b) => a * b, 1).toLocaleString("en")} numbers`;
  $("vae-stats").replaceChildren(
    stat("Image", count([w, h, 3])),
    stat("Latent", count(r.latent_shape)),
    stat("Compression", `${r.compression_ratio.toFixed(1)}× fewer numbers`),
    stat("PSNR", r.psnr_db === null ? "∞ (lossless)" : `${r.psnr_db.toFixed(2)} dB`),
  );
  $("vae-note").textContent = r.note || "";
  $("vae-note").hidden = !r.note;
  $("vae-channels").replaceChildren(...r.channels.map((c, i) => channelFigure(c, i, r.channel_ranges[i])));
  const reconstruction = await showImage($("vae-reconstruction"), png(r.reconstruction));
  drawDifference($("vae-original"), reconstruction);
  $("vae-results").hidden = false;
}

function stat(label, value) {
  const item = document.createElement("div");
  item.className = "stat";
  const name = document.createElement("span");
  name.textContent = label;
  const amount = document.createElement("strong");
  amount.textContent = value;
  item.append(name, amount);
  return item;
}

function channelFigure(image, i, [low, high]) {
  const figure = document.createElement("figure");
  const img = new Image();
  img.src = png(image);
  img.alt = `Latent channel ${i}`;
  const caption = document.createElement("figcaption");
  caption.textContent = `Channel ${i}: ${low.toFixed(2)} … ${high.toFixed(2)}`;
  figure.append(img, caption);
  return figure;
}

function pixels(img, w, h) {
  const ctx = Object.assign(document.createElement("canvas"), { width: w, height: h }).getContext("2d");
  ctx.drawImage(img, 0, 0); // the original is cropped at the right and bottom, as the VAE crops it
  return ctx.getImageData(0, 0, w, h);
}

function drawDifference(original, reconstruction) {
  const [w, h] = [reconstruction.naturalWidth, reconstruction.naturalHeight];
  const a = pixels(original, w, h);
  const b = pixels(reconstruction, w, h).data;
  for (let i = 0; i < a.data.length; i += 4) {
    for (let c = 0; c < 3; c++) a.data[i + c] = Math.min(255, 4 * Math.abs(a.data[i + c] - b[i + c]));
  }
  const canvas = $("vae-difference");
  Object.assign(canvas, { width: w, height: h });
  canvas.getContext("2d").putImageData(a, 0, 0);
}

function setupVae() {
  $("vae-form").addEventListener("submit", vaeRoundTrip);
  $("vae-file").addEventListener("change", async (e) => {
    const file = e.target.files[0];
    if (!file) return;
    try {
      await showImage($("vae-original"), await readFile(file));
      await vaeRoundTrip();
    } catch (error) {
      showError(error);
    }
  });
}

// ---------------------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  setupTabs();
  setupMask();
  setupInit();
  setupGenerate();
  setupControlNet();
  setupVae();
  loadLists().catch(showError);
});
