// Inspection console: sends the chosen images to the service's own API and draws what comes back.
// No framework and no external resources: the page must work on an offline factory network.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const SVG = "http://www.w3.org/2000/svg";
  const COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
    "#9a6324", "#800000"];
  const MES = ["station_id", "part_id", "meas_id", "recipe_id"];
  const KEY_STORE = "s2amnet-api-key";
  const state = { files: [], results: [], current: 0, models: [], seq: 0, timer: null, lastCount: null,
    iouMoved: false };

  // ------------------------------------------------------------------ request options

  const keyInput = $("api-key");
  keyInput.value = sessionStorage.getItem(KEY_STORE) || "";
  keyInput.addEventListener("input", () => {
    sessionStorage.setItem(KEY_STORE, keyInput.value);
    loadModels();
  });

  function authHeaders() {
    const key = keyInput.value.trim();
    return key ? { "X-API-Key": key } : {};
  }

  function query() {
    const task = $("task").value;
    const p = new URLSearchParams();
    if ($("model").value) p.set("model", $("model").value);
    p.set("conf", Number($("conf").value).toFixed(2));
    if (task === "detect" && state.iouMoved) p.set("iou", Number($("iou").value).toFixed(2));
    if (task === "segment") p.set("mask_format", "rle");
    return p;
  }

  function mesFields() {
    return MES.map((name) => [name, $(name).value.trim()]).filter(([, v]) => v);
  }

  async function loadModels() {
    let r;
    try {
      r = await fetch("models", { headers: authHeaders() });
    } catch (e) {
      showError({ status: 0, title: "The service cannot be reached", detail: String(e) });
      return;
    }
    if (!r.ok) {
      showProblem(r, await r.text());
      return;
    }
    state.models = (await r.json()).models || [];
    fillModels();
    renderStatusModels();
  }

  function fillModels() {
    const task = $("task").value;
    const select = $("model");
    const keep = select.value;
    select.replaceChildren();
    for (const m of state.models.filter((x) => x.task === task)) {
      const opt = document.createElement("option");
      opt.value = m.name;
      opt.textContent = `${m.name} ${m.version}`;
      opt.selected = keep ? m.name === keep : m.default;
      select.appendChild(opt);
    }
    $("iou").disabled = task !== "detect";
    showModelIou();
  }

  // the IoU slider starts at the chosen model's own NMS threshold, until it is moved
  function showModelIou() {
    const m = state.models.find((x) => x.name === $("model").value);
    if (state.iouMoved || !m || m.nms_iou == null) return;
    $("iou").value = m.nms_iou;
    $("iou-value").textContent = Number(m.nms_iou).toFixed(2);
  }

  // ------------------------------------------------------------------ images in

  function setFiles(list) {
    const files = [...list].filter((f) => f && f.size > 0);
    if (!files.length) return;
    state.files = files;
    state.current = 0;
    run();
  }

  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    setFiles(e.dataTransfer.files);
  });
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("files").click(); }
  });
  $("files").addEventListener("change", (e) => setFiles(e.target.files));
  document.addEventListener("paste", (e) => {
    const files = [...(e.clipboardData ? e.clipboardData.files : [])];
    if (files.length) setFiles(files);
  });

  function rerunSoon() {
    clearTimeout(state.timer);
    state.timer = setTimeout(run, 200);
  }
  for (const id of ["conf", "iou"]) {
    $(id).addEventListener("input", () => {
      $(`${id}-value`).textContent = Number($(id).value).toFixed(2);
      if (id === "iou") state.iouMoved = true;
      rerunSoon();
    });
  }
  $("task").addEventListener("change", () => { fillModels(); run(); });
  $("model").addEventListener("change", () => { showModelIou(); run(); });
  for (const name of MES) $(name).addEventListener("change", run);
  $("fit").addEventListener("change", () => $("stage").classList.toggle("fit", $("fit").checked));

  // ------------------------------------------------------------------ request and answer

  async function run() {
    if (!state.files.length) return;
    const seq = ++state.seq;
    const task = $("task").value;
    const form = new FormData();
    for (const f of state.files) form.append("file", f, f.name || "pasted.png");
    for (const [k, v] of mesFields()) form.append(k, v);
    const url = `${task}?${query()}`;
    $("curl").textContent = curlFor(url);
    document.body.dataset.busy = "true";
    let r;
    let text;
    try {
      r = await fetch(url, { method: "POST", body: form, headers: authHeaders() });
      text = await r.text();
    } catch (e) {
      if (seq === state.seq) showError({ status: 0, title: "The service cannot be reached", detail: String(e) });
      return;
    } finally {
      if (seq === state.seq) delete document.body.dataset.busy;
    }
    if (seq !== state.seq) return; // a newer request has been sent meanwhile
    if (!r.ok) {
      showProblem(r, text);
      return;
    }
    const body = JSON.parse(text);
    clearError();
    state.results = Array.isArray(body) ? body : [body];
    $("json").textContent = JSON.stringify(body, null, 2);
    renderThumbs();
    show(Math.min(state.current, state.results.length - 1));
  }

  function curlFor(url) {
    const parts = ["curl"];
    for (const f of state.files) parts.push(`-F file=@${shellQuote(f.name || "image.png")}`);
    for (const [k, v] of mesFields()) parts.push(`-F ${shellQuote(`${k}=${v}`)}`);
    if (keyInput.value.trim()) parts.push('-H "X-API-Key: $S2AMNET_API_KEY"');
    parts.push(shellQuote(new URL(url, document.baseURI).href));
    return parts.join(" ");
  }

  function shellQuote(s) {
    return /^[\w@%+=:,./-]+$/.test(s) ? s : `'${s.replace(/'/g, "'\\''")}'`;
  }

  function showProblem(r, text) {
    let body = null;
    try { body = JSON.parse(text); } catch { /* not JSON: show the text */ }
    let title = (body && body.title) || r.statusText || "Error";
    let detail = (body && body.detail) || text || "";
    if (r.status === 401) {
      title = "API key needed";
      detail = `${detail} Enter a valid key in the "API key" field (it is kept for this browser tab only).`;
    }
    const retry = r.headers.get("Retry-After");
    if (retry) detail = `${detail} Retry after ${retry} s.`;
    showError({ status: r.status, title, detail, code: body && body.code });
  }

  function showError({ status, title, detail, code }) {
    const box = $("error");
    box.replaceChildren();
    const head = document.createElement("strong");
    head.textContent = status ? `${status} ${title}` : title;
    const text = document.createElement("span");
    text.textContent = detail;
    box.append(head, text);
    box.dataset.status = String(status);
    if (code) box.dataset.code = code;
    box.hidden = false;
    $("verdict").hidden = true;
    $("defects").hidden = true;
    $("overlay").replaceChildren();
  }

  function clearError() {
    $("error").hidden = true;
    delete $("error").dataset.status;
  }

  // ------------------------------------------------------------------ drawing

  function renderThumbs() {
    const box = $("thumbs");
    box.replaceChildren();
    if (state.results.length < 2) return;
    state.results.forEach((res, i) => {
      const b = document.createElement("button");
      b.type = "button";
      b.className = res.verdict;
      b.textContent = `${state.files[i].name || `image ${i}`}: ${res.verdict}`;
      b.setAttribute("aria-pressed", String(i === state.current));
      b.addEventListener("click", () => show(i));
      box.appendChild(b);
    });
  }

  function show(i) {
    state.current = i;
    [...$("thumbs").children].forEach((b, k) => b.setAttribute("aria-pressed", String(k === i)));
    const res = state.results[i];
    const photo = $("photo");
    if (photo.dataset.url) URL.revokeObjectURL(photo.dataset.url);
    photo.dataset.url = URL.createObjectURL(state.files[i]);
    photo.onload = () => draw(res);
    photo.src = photo.dataset.url;
  }

  function el(name, attrs) {
    const node = document.createElementNS(SVG, name);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
    return node;
  }

  function draw(res) {
    const W = res.image.width;
    const H = res.image.height;
    const svg = $("overlay");
    svg.replaceChildren();
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    svg.setAttribute("preserveAspectRatio", "none");
    svg.dataset.width = W;
    svg.dataset.height = H;
    svg.dataset.resultId = res.result_id;

    const verdict = $("verdict");
    verdict.textContent = res.verdict;
    verdict.className = `verdict ${res.verdict}`;
    verdict.dataset.verdict = res.verdict;
    verdict.title = res.recipe ? `decided by recipe ${res.recipe.id}, version ${res.recipe.version}`
      : res.decided_by && res.decided_by !== "model" ? `failed without inspection: ${res.decided_by}`
        : "decided by the model's own rule";
    verdict.hidden = false;

    const fontSize = Math.max(W, H) / 28; // in image pixels: labels keep their size relative to the image
    const tbody = $("defects").querySelector("tbody");
    tbody.replaceChildren();
    res.defects.forEach((d, k) => {
      const color = COLORS[d.class_id % COLORS.length];
      const g = el("g", { "data-index": k, "data-label": d.label });
      if (d.mask && d.mask.counts !== undefined) {
        const href = maskImage(d.mask, color);
        g.appendChild(el("image", { href, x: 0, y: 0, width: W, height: H, preserveAspectRatio: "none",
          class: "mask", "data-index": k }));
      }
      if (d.box) {
        const b = d.box;
        g.appendChild(el("rect", { x: b.x1, y: b.y1, width: b.x2 - b.x1, height: b.y2 - b.y1, stroke: color,
          "data-index": k, "data-box": [b.x1, b.y1, b.x2, b.y2].join(",") }));
        const label = el("text", { x: b.x1 + 1, y: b.y1 > fontSize * 1.2 ? b.y1 - fontSize * 0.25 : b.y1 + fontSize,
          "font-size": fontSize });
        label.textContent = `${d.label} ${d.score.toFixed(2)}`;
        g.appendChild(label);
      }
      svg.appendChild(g);

      const row = document.createElement("tr");
      row.dataset.index = k;
      row.tabIndex = 0;
      const box = d.box ? [d.box.x1, d.box.y1, d.box.x2, d.box.y2].map((v) => v.toFixed(1)).join(", ") : "–";
      for (const cell of [k, d.label, d.score.toFixed(3), box, d.area !== undefined ? d.area.toFixed(0) : "–"]) {
        const td = document.createElement("td");
        td.textContent = String(cell);
        row.appendChild(td);
      }
      const on = () => highlight(k, true);
      const off = () => highlight(k, false);
      row.addEventListener("mouseenter", on);
      row.addEventListener("mouseleave", off);
      row.addEventListener("focus", on);
      row.addEventListener("blur", off);
      tbody.appendChild(row);
    });
    $("defects").hidden = res.defects.length === 0;
    if (res.top_k) {
      $("timing").textContent = `top: ${res.top_k.map((t) => `${t.label} ${t.score.toFixed(3)}`).join(", ")} · `;
    } else {
      $("timing").textContent = "";
    }
    const t = res.timing_ms;
    $("timing").textContent += `${res.model.name} ${res.model.version} · ${W}×${H} px · queue ${t.queue.toFixed(1)} ms,`
      + ` inference ${t.inference.toFixed(1)} ms, total ${t.total.toFixed(1)} ms`;
    document.body.dataset.drawn = res.result_id;
  }

  function highlight(k, on) {
    for (const node of $("overlay").querySelectorAll(`[data-index="${k}"]`)) node.classList.toggle("hl", on);
    const row = $("defects").querySelector(`tr[data-index="${k}"]`);
    if (row) row.classList.toggle("hl", on);
  }

  // COCO compressed RLE (column-major runs, alternating background / foreground) → counts
  function rleCounts(s) {
    const counts = [];
    let p = 0;
    while (p < s.length) {
      let x = 0;
      let k = 0;
      let c;
      do {
        c = s.charCodeAt(p++) - 48;
        x += (c & 0x1f) * 2 ** (5 * k);
        k += 1;
      } while (c & 0x20);
      if (c & 0x10) x -= 2 ** (5 * k); // the last character's bit 0x10 marks a negative number
      if (counts.length > 2) x += counts[counts.length - 2];
      counts.push(x);
    }
    return counts;
  }

  // a mask as a translucent PNG in the defect's colour, at the image's size
  function maskImage(mask, color) {
    const [h, w] = mask.size;
    const counts = rleCounts(mask.counts);
    const canvas = document.createElement("canvas");
    canvas.width = w;
    canvas.height = h;
    const ctx = canvas.getContext("2d");
    const img = ctx.createImageData(w, h);
    const rgb = [1, 3, 5].map((i) => parseInt(color.slice(i, i + 2), 16));
    let pos = 0;
    counts.forEach((n, i) => {
      if (i % 2 === 1) {
        for (let q = pos; q < pos + n; q++) {
          const o = ((q % h) * w + Math.floor(q / h)) * 4;
          img.data[o] = rgb[0]; img.data[o + 1] = rgb[1]; img.data[o + 2] = rgb[2]; img.data[o + 3] = 140;
        }
      }
      pos += n;
    });
    ctx.putImageData(img, 0, 0);
    return canvas.toDataURL("image/png");
  }

  // ------------------------------------------------------------------ copy buttons

  for (const [button, source] of [["copy-json", "json"], ["copy-curl", "curl"]]) {
    $(button).addEventListener("click", async () => {
      const text = $(source).textContent;
      try {
        await navigator.clipboard.writeText(text);
      } catch {
        const range = document.createRange();
        range.selectNodeContents($(source));
        getSelection().removeAllRanges();
        getSelection().addRange(range);
        document.execCommand("copy");
      }
      $(button).textContent = "Copied";
      setTimeout(() => { $(button).textContent = "Copy"; }, 1500);
    });
  }

  // ------------------------------------------------------------------ status strip

  function renderStatusModels() {
    $("status-models").textContent = state.models.map((m) => `${m.name} ${m.version}`).join(" · ");
  }

  function metricSum(text, name) {
    let sum = 0;
    let seen = false;
    for (const line of text.split("\n")) {
      if (line.startsWith(`${name}{`) || line.startsWith(`${name} `)) {
        sum += Number(line.slice(line.lastIndexOf(" ") + 1));
        seen = true;
      }
    }
    return seen ? sum : null;
  }

  async function refreshStatus() {
    const pill = $("status-ready");
    try {
      const r = await fetch("readyz");
      pill.textContent = r.ok ? "ready" : "not ready";
      pill.className = `pill ${r.ok ? "ok" : "bad"}`;
      const m = await fetch("metrics");
      if (m.ok) {
        const text = await m.text();
        const depth = metricSum(text, "s2amnet_queue_depth");
        const count = metricSum(text, "s2amnet_images_total");
        $("status-queue").textContent = depth === null ? "" : `queue ${depth}`;
        const now = Date.now();
        if (count !== null && state.lastCount) {
          const rate = (count - state.lastCount.count) / ((now - state.lastCount.at) / 1000);
          $("status-rate").textContent = `${rate.toFixed(1)} images/s`;
        }
        if (count !== null) state.lastCount = { count, at: now };
      }
    } catch {
      pill.textContent = "unreachable";
      pill.className = "pill bad";
    }
  }

  loadModels();
  refreshStatus();
  setInterval(refreshStatus, 5000);
})();
