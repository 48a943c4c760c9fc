// The tierlm planner page. Every figure shown comes from POST /v1/plan (the same tierlm.plan as
// `tierlm plan`); this script only formats them, the way src/tierlm/plan/report.py does.
"use strict";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
const COLORS = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4d7c0f",
                "#b45309", "#475569", "#9333ea", "#0f766e", "#be123c", "#1d4ed8", "#65a30d", "#c2410c"];

let OPTS = null;          // GET /v1/plan/options
let REGISTRY = [];        // GET /v1/plan/models
let HARDWARE = [];        // GET /v1/plan/hardware
let chosen = [];          // registry ids (or names) in the order they were picked
let seq = 0;              // the latest computation; older answers are dropped
let timer = null;

// ------------------------------------------------------------------ formatting (as Python's)
function fixed(x, d) {
  // format(x, f",.{d}f"): correctly rounded, ties to even, thousands separated by commas
  let s = x.toFixed(d);
  const scaled = x * 10 ** d;
  if (Math.abs(scaled % 1) === 0.5 && scaled / 10 ** d === x) {        // an exact tie: toFixed rounds up
    const lo = Math.floor(scaled);
    s = ((lo % 2 === 0 ? lo : lo + 1) / 10 ** d).toFixed(d);
  }
  const neg = s.startsWith("-");
  if (neg) s = s.slice(1);
  const [int, frac] = s.split(".");
  const grouped = int.replace(/\B(?=(\d{3})+(?!\d))/g, ",");
  return (neg ? "-" : "") + grouped + (frac !== undefined ? "." + frac : "");
}
const int = (n) => fixed(Math.round(n), 0);

function fmtBytes(n, short) {
  // tierlm.units.fmt_bytes: both units, '9.62 GiB (10.33 GB)'
  let s;
  if (n < 2 ** 20) s = `${fixed(n / 2 ** 10, 1)} KiB (${fixed(n / 1e3, 1)} kB)`;
  else if (n < 2 ** 30) s = `${fixed(n / 2 ** 20, 2)} MiB (${fixed(n / 1e6, 2)} MB)`;
  else s = `${fixed(n / 2 ** 30, 2)} GiB (${fixed(n / 1e9, 2)} GB)`;
  return short ? s.split(" (")[0] : s;
}
const money = (x) => x === null || x === undefined ? "n/a" : x < 1 ? `$${fixed(x, 4)}` : `$${fixed(x, 2)}`;
const ctx = (x) => x === null || x === undefined ? "never" : int(x);
const reload = (r) => "note" in r ? "n/a" : `${ctx(r.break_even_context)} tok`;

function shortCtx(n) {
  if (n >= 1e6) return `${+(n / 1e6).toPrecision(3)}M`;
  if (n >= 1e3) return `${+(n / 1e3).toPrecision(3)}k`;
  return String(n);
}

// ------------------------------------------------------------------ the table's rows
// [key, label, text(d), value(d) or null]; the first block is exactly `tierlm plan`'s table.
const sumTiers = (d, tiers) => Object.values(d.placement.items).reduce((a, r) => a + tiers.reduce((b, t) => b + r[t], 0), 0);
const CLI_ROWS = [
  ["kv_total", "KV cache total", (d) => fmtBytes(d.kv_cache.total_bytes), (d) => d.kv_cache.total_bytes],
  ["kv_attention", "  attention KV", (d) => fmtBytes(d.kv_cache.kv_bytes), (d) => d.kv_cache.kv_bytes],
  ["kv_indexer", "  indexer keys", (d) => fmtBytes(d.kv_cache.indexer_bytes), (d) => d.kv_cache.indexer_bytes],
  ["kv_state", "  fixed state", (d) => fmtBytes(d.kv_cache.state_bytes), (d) => d.kv_cache.state_bytes],
  ["kv_per_token", "  bytes / token", (d) => `${int(d.kv_cache.bytes_per_token)} B`, (d) => d.kv_cache.bytes_per_token],
  ["kv_read", "  read / decode step", (d) => fmtBytes(d.kv_cache.read_bytes_per_step), (d) => d.kv_cache.read_bytes_per_step],
  ["weights", "weights", (d) => fmtBytes(d.weights.total_bytes), (d) => d.weights.total_bytes],
  ["params", "  params total / active",
   (d) => `${fixed(d.weights.total_params / 1e9, 1)}B / ${fixed(d.weights.active_params / 1e9, 1)}B`, (d) => d.weights.total_params],
  ["hardware", "hardware", (d) => `${d.hardware.devices} x ${d.hardware.name}, ` + (d.hardware.parallelism === "dp-attention"
    ? `DP${d.hardware.devices} + EP${d.hardware.expert_parallel}` : `TP${d.hardware.devices}`), (d) => d.hardware.devices],
  ["per_device", "  per device: weights + KV", (d) => fmtBytes(d.weights.per_device_bytes + d.kv_cache.per_device_bytes),
   (d) => d.weights.per_device_bytes + d.kv_cache.per_device_bytes],
  ["fits", "  fits on device",
   (d) => d.placement.fits_on_device ? "yes" : d.placement.fits ? "spills to host/disk" : "NO", null],
  ["spilled", "  spilled per device", (d) => fmtBytes(sumTiers(d, ["host", "disk"])), (d) => sumTiers(d, ["host", "disk"])],
  ["max_context_device", "  max context on device", (d) => int(d.limits.max_context_on_device), (d) => d.limits.max_context_on_device],
  ["min_devices", "  min devices (all on device)", (d) => ctx(d.limits.min_devices), (d) => d.limits.min_devices],
  ["decode", "decode tok/s (all sequences)",
   (d) => "error" in d.decode ? "does not fit" : `${fixed(d.decode.tokens_per_s, 1)} (${d.decode.bound}-bound)`,
   (d) => "error" in d.decode ? null : d.decode.tokens_per_s],
  ["prefill", "prefill time", (d) => d.prefill.t_s === null ? "n/a" : `${fixed(d.prefill.t_s, 2)} s`, (d) => d.prefill.t_s],
  ["reload", "reload beats recompute from",
   (d) => ["host", "disk"].map((t) => `${t} ${reload(d.reload_vs_recompute[t])}`).join(" / "), null],
  ["cost", "$/Mtok output / input", (d) => `${money(d.cost.output_per_mtok)} / ${money(d.cost.input_per_mtok)}`,
   (d) => d.cost.output_per_mtok ?? null],
];

const ITEM_NAMES = {hot_weights: "hot weights", kv_cache: "KV cache", mtp: "MTP", routed_experts: "routed experts", engram: "Engram"};
const TIER_ROWS = [["device", "  on device"], ["host", "  in host memory"], ["disk", "  on disk"]].map(([t, label]) =>
  [`place_${t}`, label, (d) => fmtBytes(sumTiers(d, [t])), (d) => sumTiers(d, [t]),
   (d) => Object.entries(d.placement.items).filter(([, r]) => r[t]).map(([k, r]) => `${ITEM_NAMES[k] || k}: ${fmtBytes(r[t])}`).join("\n")]);
const MORE_ROWS = [
  ["decode_user", "decode tok/s per sequence", (d) => "error" in d.decode ? "does not fit" : fixed(d.decode.tokens_per_s_per_user, 1),
   (d) => "error" in d.decode ? null : d.decode.tokens_per_s_per_user],
  ["prefill_rate", "prefill tok/s", (d) => d.prefill.tokens_per_s === null ? "n/a" : fixed(d.prefill.tokens_per_s, 1),
   (d) => d.prefill.tokens_per_s],
  ["max_context_tiered", "max context with host / disk", (d) => int(d.limits.max_context_tiered), (d) => d.limits.max_context_tiered],
  ["max_batch", "max batch on device", (d) => int(d.limits.max_batch_on_device), (d) => d.limits.max_batch_on_device],
  ["price", "$/hour (all devices)", (d) => money(d.cost.price_per_hour), (d) => d.cost.price_per_hour],
  ["hit_cost", "$/Mtok cache-hit input device / host / disk",
   (d) => d.cost.cache_hit_input_per_mtok ? ["device", "host", "disk"].map((t) => money(d.cost.cache_hit_input_per_mtok[t])).join(" / ") : "n/a", null],
  ["hold_cost", "$/hour to hold one context device / host / disk",
   (d) => d.cost.hold_context_per_hour ? ["device", "host", "disk"].map((t) => money(d.cost.hold_context_per_hour[t])).join(" / ") : "n/a", null],
];

function kindOf(l) {
  let k = l.attention;
  if (l.compress_ratio) k += ` ratio ${l.compress_ratio}`;
  if (l.mtp) k += " (MTP)";
  return k;
}

function kindRows(plans) {
  // KV cache by layer kind: the per-layer figures of each plan, summed by attention kind
  const kinds = [];
  for (const p of plans) for (const l of p.kv_cache.layers) if (!kinds.includes(kindOf(l))) kinds.push(kindOf(l));
  return kinds.map((k) => {
    const sum = (d) => d.kv_cache.layers.filter((l) => kindOf(l) === k)
      .reduce((a, l) => a + l.kv_bytes + l.indexer_bytes + l.state_bytes, 0);
    const count = (d) => d.kv_cache.layers.filter((l) => kindOf(l) === k).length;
    return [`kind_${k}`, `  ${k}`, (d) => count(d) ? `${fmtBytes(sum(d))} · ${count(d)} layers` : "–", sum];
  });
}

// ------------------------------------------------------------------ the server
async function api(path, body) {
  const headers = {"Content-Type": "application/json"};
  const key = $("api-key").value.trim();
  if (key) headers.Authorization = `Bearer ${key}`;
  const r = await fetch(path, body === undefined ? {headers} : {method: "POST", headers, body: JSON.stringify(body)});
  let data = null;
  try { data = await r.json(); } catch (e) { /* not JSON */ }
  if (!r.ok) {
    if (r.status === 401) $("key-box").hidden = false;
    const msg = data && data.error ? data.error.message : `${r.status} ${r.statusText}`;
    const err = new Error(msg);
    err.status = r.status;
    throw err;
  }
  return data;
}

// ------------------------------------------------------------------ inputs <-> URL
const FIELDS = [    // [URL key, element id, kind]
  ["context", "context", "text"], ["batch", "batch", "text"], ["kv_dtype", "kv-dtype", "text"],
  ["indexer_dtype", "indexer-dtype", "text"], ["state_dtype", "state-dtype", "text"],
  ["weight_dtypes", "weight-dtypes", "text"], ["mtp", "mtp", "check"], ["hardware", "hardware", "text"],
  ["devices", "devices", "text"], ["layout", "layout", "text"], ["gpu_util", "gpu-util", "text"],
  ["allow_unknown_fields", "allow-unknown", "check"],
];

function configText() {
  const raw = $("config").value.trim();
  if (!raw) return "";
  try { return JSON.stringify(JSON.parse(raw)); } catch (e) { return raw; }
}

function inputsHash() {
  const q = new URLSearchParams();
  if (chosen.length) q.set("models", chosen.join(","));
  for (const [key, id, kind] of FIELDS) {
    const el = $(id);
    const v = kind === "check" ? (el.checked ? "1" : "") : el.value.trim();
    const def = OPTS ? OPTS.defaults[key] : undefined;
    if (v === "" || String(v) === String(def === false ? "" : def ?? "")) continue;
    q.set(key, v);
  }
  const cfg = configText();
  if (cfg) q.set("config", cfg);
  return q.toString();
}

function applyHash() {
  const q = new URLSearchParams(location.hash.slice(1));
  chosen = (q.get("models") || "").split(",").map((s) => s.trim()).filter(Boolean);
  for (const [key, id, kind] of FIELDS) {
    const el = $(id);
    const def = OPTS.defaults[key];
    if (kind === "check") el.checked = q.get(key) === "1" || q.get(key) === "true";
    else el.value = q.has(key) ? q.get(key) : def === null || def === undefined ? "" : String(def);
  }
  const cfg = q.get("config") || "";
  let pretty = cfg;
  try { if (cfg) pretty = JSON.stringify(JSON.parse(cfg), null, 2); } catch (e) { /* keep as given */ }
  $("config").value = pretty;
  if (cfg) $("config-box").open = true;
  syncModels();
}

function updateUrl() {
  const h = inputsHash();
  if (location.hash.slice(1) !== h) history.replaceState(null, "", h ? `#${h}` : location.pathname);
  $("share-link").href = location.href;
  return h;
}

// ------------------------------------------------------------------ the request
function weightDtypes(text) {
  // as `--weight-dtype`: "DTYPE" for all components, or "COMPONENT=DTYPE"
  const out = {};
  for (const part of text.split(",").map((s) => s.trim()).filter(Boolean)) {
    const i = part.indexOf("=");
    if (i < 0) out["*"] = part;
    else out[part.slice(0, i).trim()] = part.slice(i + 1).trim();
  }
  return Object.keys(out).length ? out : null;
}

function pastedConfig() {
  const raw = $("config").value.trim();
  const box = $("config-error");
  box.hidden = true;
  if (!raw) return null;
  let cfg;
  try { cfg = JSON.parse(raw); } catch (e) {
    box.textContent = `config.json is not valid JSON: ${e.message}`;
    box.hidden = false;
    throw e;
  }
  if (typeof cfg !== "object" || cfg === null || Array.isArray(cfg)) {
    box.textContent = "config.json must be a JSON object";
    box.hidden = false;
    throw new Error(box.textContent);
  }
  return cfg;
}

function planBody(contexts) {
  const cfg = pastedConfig();
  const num = (id) => $(id).value.trim();
  const body = {
    models: [...chosen, ...(cfg ? [cfg] : [])],
    context: contexts ?? num("context"),
    batch: Number(num("batch") || 1),
    kv_dtype: $("kv-dtype").value, indexer_dtype: $("indexer-dtype").value, state_dtype: $("state-dtype").value,
    mtp: $("mtp").checked, hardware: $("hardware").value, layout: $("layout").value,
    devices: num("devices") ? Number(num("devices")) : null,
    weight_dtypes: weightDtypes(num("weight-dtypes")),
    gpu_util: Number(num("gpu-util") || OPTS.defaults.gpu_util),
    allow_unknown_fields: $("allow-unknown").checked,
  };
  return body;
}

function schedule(ms) {
  // the URL follows the inputs once they rest (browsers throttle history.replaceState per keystroke)
  // until then the figures on show are not for the inputs on show: say so at once
  clearTimeout(timer);
  $("results").dataset.state = $("chart").dataset.state = "pending";
  timer = setTimeout(() => compute(updateUrl()), ms);
}

function setState(el, state, key) {
  el.dataset.state = state;
  if (key !== undefined) el.dataset.inputs = key;
}

async function compute(key) {
  const mine = ++seq;
  const results = $("results");
  const chart = $("chart");
  $("error").hidden = true;
  let body;
  try { body = planBody(); } catch (e) {
    setState(results, "error", key);
    setState(chart, "error", key);
    return;
  }
  if (!body.models.length) {
    $("plan-table").replaceChildren();
    $("notes").replaceChildren();
    chart.replaceChildren();
    $("status").textContent = "Choose one or more models, or paste a config.json.";
    setState(results, "idle", key);
    setState(chart, "idle", key);
    return;
  }
  setState(results, "loading");
  setState(chart, "loading");
  $("status").textContent = "planning…";
  let plans;
  try {
    plans = (await api("/v1/plan", body)).plans;
  } catch (e) {
    if (mine !== seq) return;
    $("status").textContent = "";
    $("error").textContent = e.message;
    $("error").hidden = false;
    $("plan-table").replaceChildren();
    $("notes").replaceChildren();
    chart.replaceChildren();
    setState(results, "error", key);
    setState(chart, "error", key);
    return;
  }
  if (mine !== seq) return;
  renderTable(plans);
  $("status").textContent = `${plans.length} plan${plans.length === 1 ? "" : "s"} from POST /v1/plan`;
  setState(results, "ready", key);

  const contexts = [...new Set(plans.map((p) => p.context))].sort((a, b) => a - b);
  const grid = contextGrid(contexts);
  let curve;
  try {
    curve = (await api("/v1/plan", planBody(grid))).plans;
  } catch (e) {
    if (mine !== seq) return;
    chart.textContent = `chart: ${e.message}`;
    setState(chart, "error", key);
    return;
  }
  if (mine !== seq) return;
  renderChart(curve, body.models.length, grid, contexts);
  setState(chart, "ready", key);
}

function contextGrid(contexts) {
  const hi = contexts[contexts.length - 1];
  const lo = Math.min(1000, contexts[0]);
  const grid = new Set(contexts);
  grid.add(lo);
  for (let c = 2000; c < hi; c *= 2) if (c > lo && !contexts.some((x) => Math.abs(x / c - 1) < 0.1)) grid.add(c);
  return [...grid].sort((a, b) => a - b);
}

// ------------------------------------------------------------------ rendering
function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined) continue;
    if (k === "class") e.className = v; else e.setAttribute(k, v);
  }
  for (const k of kids) e.append(k);
  return e;
}

function renderTable(plans) {
  const table = $("plan-table");
  const head = el("tr", {}, el("th", {}, ""));
  plans.forEach((d, i) => head.append(el("th", {"data-model": d.model, "data-context": d.context, "data-col": i},
    el("span", {class: "dot", style: `background:${COLORS[i % COLORS.length]}`}),
    el("div", {class: "mname", title: d.model}, d.model.split("/").pop()),
    el("div", {class: "mctx"}, `@ ${int(d.context)} tok x ${d.batch}`))));
  const rows = [el("thead", {}, head)];
  const section = (title, defs, cls) => {
    const body = el("tbody", {class: cls});
    body.append(el("tr", {class: "section"}, el("th", {colspan: plans.length + 1}, title)));
    for (const [key, label, text, value, tip] of defs) {
      const cls = (label.startsWith("  ") ? "sub" : "top") + (key.endsWith("_cost") ? " wrap" : "");
      const tr = el("tr", {"data-row": key, class: cls}, el("th", {}, label.trim()));
      plans.forEach((d, i) => {
        const v = value ? value(d) : null;
        tr.append(el("td", {"data-col": i, "data-value": v === null || v === undefined ? null : String(v),
                            title: tip ? tip(d) || null : null}, text(d)));
      });
      body.append(tr);
    }
    rows.push(body);
  };
  section("As tierlm plan prints it", CLI_ROWS, "cli");
  section("KV cache by layer kind (all layers of a kind, batch included)", kindRows(plans), "kinds");
  section("Placement per device (hover for the items)", TIER_ROWS, "tiers");
  section("More", MORE_ROWS, "more");
  table.replaceChildren(...rows);

  const notes = $("notes");
  notes.replaceChildren();
  for (const d of plans) for (const n of d.notes) notes.append(el("p", {class: "note"}, el("b", {}, `${d.model}: `), n));
}

function niceStep(max, n) {
  const raw = max / n;
  const p = 10 ** Math.floor(Math.log10(raw));
  return [1, 2, 2.5, 5, 10].map((m) => m * p).find((s) => s >= raw);
}

function svg(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function renderChart(plans, nModels, grid, marks) {
  const W = 880, H = 360, L = 78, R = 16, T = 16, B = 44;
  const byModel = [];
  for (let m = 0; m < nModels; m++) byModel.push(plans.slice(m * grid.length, (m + 1) * grid.length));
  const maxY = Math.max(1, ...plans.map((p) => p.kv_cache.total_bytes));
  const unit = maxY >= 2 ** 30 ? [2 ** 30, "GiB"] : maxY >= 2 ** 20 ? [2 ** 20, "MiB"] : [2 ** 10, "KiB"];
  const step = niceStep(maxY / unit[0], 5);
  const top = Math.ceil(maxY / unit[0] / step) * step;
  const x0 = Math.log(grid[0]), x1 = Math.log(grid[grid.length - 1]);
  const X = (c) => L + (x1 === x0 ? 0.5 : (Math.log(c) - x0) / (x1 - x0)) * (W - L - R);
  const Y = (b) => T + (1 - b / unit[0] / top) * (H - T - B);
  const root = svg("svg", {viewBox: `0 0 ${W} ${H}`, width: "100%", role: "img",
                           "aria-label": "cache bytes vs context"});
  for (let v = 0; v <= top + 1e-9; v += step) {
    root.append(svg("line", {x1: L, x2: W - R, y1: Y(v * unit[0]), y2: Y(v * unit[0]), class: "grid"}));
    root.append(svg("text", {x: L - 6, y: Y(v * unit[0]) + 4, "text-anchor": "end", class: "tick"},
                    `${+v.toFixed(2)} ${unit[1]}`));
  }
  for (let e = Math.ceil(Math.log10(grid[0])); 10 ** e <= grid[grid.length - 1]; e++) {
    const c = 10 ** e;
    root.append(svg("line", {x1: X(c), x2: X(c), y1: T, y2: H - B, class: "grid"}));
    root.append(svg("text", {x: X(c), y: H - B + 16, "text-anchor": "middle", class: "tick"}, shortCtx(c)));
  }
  for (const c of marks) {
    root.append(svg("line", {x1: X(c), x2: X(c), y1: T, y2: H - B, class: "mark"}));
    root.append(svg("text", {x: X(c), y: T + 10, "text-anchor": "end", class: "mark-label", dx: -3}, shortCtx(c)));
  }
  root.append(svg("text", {x: (L + W - R) / 2, y: H - 6, "text-anchor": "middle", class: "axis"},
                  "context (tokens, log scale)"));
  byModel.forEach((pts, i) => {
    const color = COLORS[i % COLORS.length];
    const d = pts.map((p, j) => `${j ? "L" : "M"}${X(p.context).toFixed(1)},${Y(p.kv_cache.total_bytes).toFixed(1)}`).join("");
    root.append(svg("path", {d, class: "series", stroke: color, "data-model": pts[0].model}));
    for (const p of pts) {
      const c = svg("circle", {cx: X(p.context), cy: Y(p.kv_cache.total_bytes), r: marks.includes(p.context) ? 4 : 2.5,
                               fill: color, "data-model": p.model, "data-context": p.context,
                               "data-value": p.kv_cache.total_bytes});
      c.append(svg("title", {}, `${p.model} @ ${int(p.context)} tokens: ${fmtBytes(p.kv_cache.total_bytes)}`));
      root.append(c);
    }
  });
  const legend = el("div", {class: "legend"});
  byModel.forEach((pts, i) => legend.append(el("span", {},
    el("span", {class: "dot", style: `background:${COLORS[i % COLORS.length]}`}), pts[0].model)));
  $("chart").replaceChildren(root, legend);
}

// ------------------------------------------------------------------ the model picker
function syncModels() {
  for (const box of document.querySelectorAll("#model-list input[type=checkbox]")) box.checked = chosen.includes(box.value);
  const chips = $("model-chosen");
  chips.replaceChildren(...chosen.map((id) => {
    const x = el("button", {type: "button", class: "chip", "data-model": id, title: "remove"}, `${id} ×`);
    x.addEventListener("click", () => { chosen = chosen.filter((m) => m !== id); syncModels(); schedule(0); });
    return x;
  }));
}

function renderModelList() {
  const list = $("model-list");
  const filter = $("model-filter").value.trim().toLowerCase();
  list.replaceChildren();
  for (const m of REGISTRY) {
    const hay = [m.id, ...m.aliases, m.model_type || ""].join(" ").toLowerCase();
    const label = el("label", {class: "model", title: m.aliases.length ? `aliases: ${m.aliases.join(", ")}` : null,
                               hidden: filter && !hay.includes(filter) ? "" : null},
      el("input", {type: "checkbox", value: m.id}), m.id + (m.served ? " (served here)" : ""));
    list.append(label);
  }
  list.dataset.state = "ready";
  syncModels();
}

function fillSelect(id, values, labels) {
  $(id).replaceChildren(...values.map((v, i) => el("option", {value: v, title: labels ? labels[i][1] : null},
                                                   labels ? labels[i][0] : v)));
}

// ------------------------------------------------------------------ start
async function init() {
  try {
    [OPTS, REGISTRY, HARDWARE] = await Promise.all([api("/v1/plan/options"), api("/v1/plan/models").then((r) => r.data),
                                                    api("/v1/plan/hardware").then((r) => r.data)]);
  } catch (e) {
    $("status").textContent = "";
    $("error").textContent = e.status === 401 ? "This server needs its API key (Server box, left)." : e.message;
    $("error").hidden = false;
    return;
  }
  fillSelect("kv-dtype", OPTS.kv_dtypes);
  fillSelect("indexer-dtype", OPTS.indexer_dtypes);
  fillSelect("state-dtype", OPTS.state_dtypes);
  fillSelect("layout", OPTS.layouts);
  fillSelect("hardware", HARDWARE.map((h) => h.name), HARDWARE.map((h) => [
    `${h.label}${h.unofficial ? " (unofficial)" : ""} · ${fixed(h.memory_bytes / 1e9, 0)} GB` +
    (h.devices_per_node > 1 ? ` · ${h.devices_per_node}/node` : "") +
    (h.price_per_hour === null ? "" : ` · $${fixed(h.price_per_hour, 2)}/h`), h.description]));
  $("weight-dtypes").title += `; components: ${OPTS.weight_components.join(", ")}; dtypes: ${OPTS.weight_dtypes.join(", ")}`;
  renderModelList();
  applyHash();
  document.body.dataset.ready = "1";
  schedule(0);
}

$("model-filter").addEventListener("input", renderModelList);
$("model-list").addEventListener("change", (e) => {
  const box = e.target;
  if (!box.matches("input[type=checkbox]")) return;
  chosen = box.checked ? [...chosen.filter((m) => m !== box.value), box.value] : chosen.filter((m) => m !== box.value);
  syncModels();
  schedule(0);
});
function changed(e) {
  if (e.target.id === "model-filter" || e.target.id === "api-key" || e.target.closest("#model-list")) return;
  if (OPTS) schedule(e.target.tagName === "SELECT" || e.target.type === "checkbox" ? 0 : 300);
}
$("inputs").addEventListener("input", changed);
$("inputs").addEventListener("change", changed);
$("api-key").addEventListener("change", () => { if (OPTS) schedule(0); else init(); });
window.addEventListener("hashchange", () => {
  if (OPTS && location.hash.slice(1) !== inputsHash()) { applyHash(); schedule(0); }
});
$("copy-link").addEventListener("click", async () => {
  updateUrl();
  try { await navigator.clipboard.writeText(location.href); $("copy-link").textContent = "Copied"; }
  catch (e) { $("copy-link").textContent = "Copy the link below"; }
  setTimeout(() => { $("copy-link").textContent = "Copy link"; }, 1500);
});
init();
