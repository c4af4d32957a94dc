// sftune dashboard: a hash-routed page over the JSON API. Charts are drawn by plotly.js (served from the
// plotly Python package). Text from runs is always inserted as text, never as HTML.
"use strict";

const view = document.getElementById("view");
let timers = [];  // polling of the current view, cleared on navigation

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat(Infinity)) if (c !== null && c !== undefined) node.append(c instanceof Node ? c : String(c));
  return node;
}

function put(node, ...children) {  // replaceChildren, flattening nested arrays
  node.replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false));
}

async function api(path, options) {
  const res = await fetch(path, options);
  if (!res.ok) {
    let detail = res.statusText;
    try { detail = (await res.json()).detail || detail; } catch (e) { /* not JSON */ }
    throw new Error(detail);
  }
  return res.json();
}

const fmt = (v, digits = 4) => v === null || v === undefined ? "–" : typeof v === "number" ? (Number.isInteger(v) ? v.toLocaleString() : v.toFixed(digits)) : String(v);
const when = (t) => t ? new Date(t * 1000).toLocaleString() : "–";
const runLink = (name) => "#/run/" + encodeURIComponent(name);
const q = (name) => "name=" + encodeURIComponent(name);
const badge = (state) => el("span", {class: "state " + state, "data-state": state}, state);
const every = (ms, fn) => timers.push(setInterval(fn, ms));

function table(rows, header) {
  return el("table", {}, header ? el("tr", {}, header.map((h) => el("th", {}, h))) : null,
    rows.map((r) => el("tr", {}, r.map((c) => el("td", {class: typeof c === "number" ? "num" : ""}, c instanceof Node ? c : fmt(c))))));
}

function kvTable(obj) {
  const skip = new Set(["time", "step", "final", "label"]);
  return table(Object.entries(obj || {}).filter(([k, v]) => !skip.has(k) && (typeof v !== "object" || v === null)).map(([k, v]) => [k, v]));
}

// ------------------------------------------------------------------ charts (plotly)

// Each chart's title and controls sit in an HTML caption above it, clear of plotly's mode bar.
const CHARTS = [
  {id: "loss", title: "Loss", log: true, series: [["train loss", "loss", (r) => "loss" in r && "step" in r], ["eval loss", "eval_loss", (r) => "eval_loss" in r && !r.final],
    // a loss spike (sftune.spikes): a red cross at its step and loss, its rule and action on hover
    ["loss spike", "spike_loss", (r) => r.spike === true, {mode: "markers", marker: {size: 11, symbol: "x", color: "#d62728"},
      text: (r) => `${r.spike_why}: ${r.spike_action}`}]]},
  {id: "lr", title: "Learning rate", yaxis: {exponentformat: "e", rangemode: "tozero"}, series: [["lr", "lr", (r) => "lr" in r]]},
  {id: "tps", title: "Throughput (tokens/s)", series: [["tokens/s", "tokens_per_s", (r) => "tokens_per_s" in r]]},
];

const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"];

// Remembered across views and reloads: the loss on a log axis, the compare charts' x axis.
const prefs = {
  get logLoss() { return localStorage.getItem("sftune.logLoss") === "1"; },
  set logLoss(on) { localStorage.setItem("sftune.logLoss", on ? "1" : "0"); },
};

// The x axes a chart can take. Compare needs a shared one for runs of different length: a run of 3
// steps is a dot at 0 next to one of 2,000 on a step axis, but spans the chart as a fraction of its run.
const AXES = {
  step: {title: "optimizer step", label: "step"},
  fraction: {title: "fraction of the run (step / total steps)", label: "fraction of the run"},
  tokens: {title: "trained tokens seen", label: "trained tokens seen"},
};

function xOf(axis, run) {  // run: {records, total_steps}; a record's position on the axis
  if (axis === "fraction") {
    const total = run.total_steps || Math.max(1, ...run.records.map((r) => r.step || 0));
    return (r) => r.step / total;
  }
  if (axis === "tokens") {  // cumulative loss_tokens of the train records up to the record's step
    const seen = [];
    let sum = 0;
    for (const r of run.records) if ("loss" in r && "step" in r) { sum += r.loss_tokens || 0; seen.push([r.step, sum]); }
    return (r) => { let t = 0; for (const [s, v] of seen) { if (s > r.step) break; t = v; } return t; };
  }
  return (r) => r.step;
}

function traces(chart, records, prefix, index, x = (r) => r.step) {
  return chart.series.map(([label, key, keep, style], i) => {
    const rs = records.filter(keep);
    const color = COLORS[(index === undefined ? i : index) % COLORS.length];
    const trace = {x: rs.map(x), y: rs.map((r) => r[key]), name: prefix ? `${prefix} ${label}` : label, type: "scatter",
            mode: "lines+markers", marker: {size: 4, color}, line: {color, dash: i > 0 && index !== undefined ? "dash" : "solid"}};
    return style ? {...trace, ...style, text: style.text ? rs.map(style.text) : undefined} : trace;
  }).filter((t, i) => !chart.series[i][3] || t.x.length);  // a marker series only when it has points
}

function drawChart(div, chart, data, axis = "step") {
  const yaxis = {...(chart.yaxis || {}), type: chart.log && prefs.logLoss ? "log" : "linear"};
  Plotly.react(div, data, {margin: {l: 60, r: 10, t: 30, b: 40}, yaxis, xaxis: {title: {text: AXES[axis].title, standoff: 4}},
    legend: {orientation: "h", y: -0.3, yanchor: "top"}, showlegend: data.length > 1}, {displaylogo: false, responsive: true});
}

function chartGrid(prefix, redraw) {
  return el("div", {class: "charts"}, CHARTS.map((c) => el("figure", {class: "chart-box"},
    el("figcaption", {}, el("span", {class: "chart-title"}, c.title),
      c.log ? el("label", {class: "toggle"}, el("input", {type: "checkbox", id: `${prefix}-${c.id}-log`, checked: prefs.logLoss,
        onchange: (e) => { prefs.logLoss = e.target.checked; redraw(); }}), "log scale") : null),
    el("div", {class: "chart", id: `${prefix}-${c.id}`}))));
}

// ------------------------------------------------------------------ runs

async function runsView() {
  const box = el("div");
  const compare = el("button", {onclick: () => {
    const names = [...box.querySelectorAll("input:checked")].map((i) => i.value);
    if (names.length >= 2) location.hash = "#/compare/" + names.map(encodeURIComponent).join("|");
  }}, "Compare selected");
  put(view, el("h1", {}, "Runs"), el("p", {class: "muted", id: "root"}), box, el("p", {}, compare));
  async function refresh() {
    const data = await api("/api/runs");
    const checked = new Set([...box.querySelectorAll("input:checked")].map((i) => i.value));
    document.getElementById("root").textContent = `under ${data.root}`;
    put(box, data.runs.length ? table(data.runs.map((r) => [
      el("input", {type: "checkbox", value: r.name, checked: checked.has(r.name)}),
      el("a", {href: runLink(r.name), class: "run-link"}, r.name), badge(r.state), r.recipe || "–",
      r.max_steps ? `${r.step} / ${r.max_steps}` : r.step, r.loss, r.eval_loss, r.tokens_per_s === null ? null : Math.round(r.tokens_per_s), when(r.start_time),
      r.chat ? el("a", {href: "#/chat/" + encodeURIComponent(r.name)}, "chat") : "–",
    ]), ["", "run", "state", "recipe", "step", "loss", "eval loss", "tokens/s", "started", ""])
      : el("p", {}, "No runs yet. Train one: sftune train quickstart train.max_steps=200 train.output_dir=" + data.root + "/quickstart"));
  }
  await refresh();
  every(3000, refresh);
}

// ------------------------------------------------------------------ one run

function reportRows(d) {
  if (!d) return [];
  const p = d.length_percentiles || {};
  return [["source", `${d.source} [${d.split}] as ${d.format}`], ["rows", `${d.rows_read} read, ${d.rows_used} used, ${d.kept} kept`],
    ["skipped", Object.entries(d.skipped || {}).map(([k, n]) => `${n} ${k}`).join(", ") || "0"],
    ["truncated", `${d.truncated} (max_length ${d.max_length})`],
    ["tokens / example", `p50 ${p.p50}, p90 ${p.p90}, p99 ${p.p99}, max ${p.max}`],
    ["tokens with loss", `${fmt(d.loss_tokens)} of ${fmt(d.total_tokens)} (${(100 * d.loss_fraction).toFixed(1)}%)`],
    ["EOS trained everywhere", d.eos_trained_everywhere ? "yes" : "no"],
    [d.packing ? "packing" : "padding", d.packing ? `${(100 * d.fill).toFixed(1)}% real tokens` : `${(100 * (1 - d.fill)).toFixed(1)}% padding`],
    ...(d.sources || []).map((s) => [`source ${s.label}`, `target ${(100 * s.target_share).toFixed(1)}%, achieved ` +
      `${(100 * (s.achieved_share ?? s.share_per_epoch)).toFixed(1)}%; ${s.rows_read} read, ${s.kept} kept, ` +
      `${Object.values(s.skipped || {}).reduce((a, n) => a + n, 0)} skipped, ${s.truncated} truncated; ` +
      `${fmt(s.examples_trained ?? 0)} examples / ${fmt(s.tokens_trained ?? 0)} tokens trained; passes ${s.passes ?? 0}`])];
}

function samplesBlock(records) {
  const recs = records.filter((r) => r.samples);
  if (!recs.length) return el("p", {class: "muted"}, "No sample generations yet (logged at each evaluation).");
  return recs.map((r, i) => el("details", {open: i === recs.length - 1, class: "samples"},
    el("summary", {}, r.label || `step ${r.step}`),
    table(r.samples.map((s) => {
      const ok = s.reference !== undefined && s.reference !== null ? (s.generated.trim() === String(s.reference).trim()) : null;
      return [el("span", {class: "pre"}, s.prompt), el("span", {class: "pre " + (ok === null ? "" : ok ? "ok" : "bad")}, JSON.stringify(s.generated)),
        el("span", {class: "pre"}, s.reference ?? "–")];
    }), ["prompt", "generated", "expected"])));
}

async function runView(name) {
  const d = await api("/api/run?" + q(name));
  const head = el("h1", {}, name, " ", badge(d.state));
  const steps = el("span", {id: "steps"});
  const samples = el("div", {id: "samples"});
  const finalBox = el("div", {id: "final"});
  put(view, head,
    el("p", {}, "recipe ", el("b", {}, d.recipe || "–"), " · model ", d.model || "–", " · started ", when(d.start_time), " · ", steps,
      d.chat ? el("span", {}, " · ", el("a", {href: "#/chat/" + encodeURIComponent(name)}, "chat with this run")) : null),
    chartGrid("chart", () => render()),
    el("h2", {}, "Final metrics"), finalBox,
    el("h2", {}, "Sample generations, evaluation by evaluation"), samples,
    el("h2", {}, "Training data"), d.data_report ? table(reportRows(d.data_report)) : el("p", {class: "muted"}, "no data_report.json"),
    el("h2", {}, "Checkpoints"), d.checkpoints.length ? table(d.checkpoints.map((c) => [c.name, c.step])) : el("p", {class: "muted"}, "none"),
    el("h2", {}, "Files"), el("p", {}, d.files.map((f) => [el("a", {href: `/api/file?${q(name)}&path=${encodeURIComponent(f)}`, target: "_blank"}, f), " "])),
    el("h2", {}, "Resolved config"), el("pre", {}, d.config_yaml || "(none)"));
  let records = [], next = 0, state = d.state;
  function render() {
    for (const c of CHARTS) drawChart(`chart-${c.id}`, c, traces(c, records));
    const last = records.filter((r) => "step" in r).pop();
    const aged = records.filter((r) => "checkpoint_age_s" in r).pop();  // the work a preemption would lose
    steps.textContent = `step ${last ? last.step : 0}${d.max_steps ? " / " + d.max_steps : ""}` +
      (aged && state === "running" ? ` · last checkpoint ${Math.round(aged.checkpoint_age_s / 60)} min before step ${aged.step}` : "");
    put(samples, samplesBlock(records));
    const fin = records.find((r) => r.final);
    put(finalBox, fin || d.final_metrics ? kvTable(d.final_metrics || fin) : el("p", {class: "muted"}, "not finished"));
  }
  let busy = false;
  async function poll() {
    if (busy) return;  // one request at a time: records are appended once
    busy = true;
    let m;
    try { m = await api(`/api/metrics?${q(name)}&since=${next}`); } finally { busy = false; }
    if (m.records.length) { records = records.concat(m.records); next = m.next; render(); }
    if (m.state !== state) {
      if (m.state === "finished") return route();  // reload final metrics, files, checkpoints, chat link
      state = m.state;
      head.querySelector(".state").replaceWith(badge(state));
    }
  }
  await poll();
  render();
  every(500, () => { if (state !== "finished") poll(); });
}

// ------------------------------------------------------------------ compare

async function compareView(names) {
  const data = await api("/api/compare?" + names.map(q).join("&"));
  // runs of one length read best by step; runs of different lengths as fractions of their run
  let axis = new Set(data.runs.map((r) => r.total_steps)).size > 1 ? "fraction" : "step";
  const pick = el("select", {id: "cmp-axis", onchange: (e) => { axis = e.target.value; draw(); }},
    Object.entries(AXES).map(([k, a]) => el("option", {value: k, selected: k === axis}, a.label)));
  put(view, el("h1", {}, "Compare: ", names.join(" vs ")),
    el("form", {class: "inline"}, el("label", {}, "x axis", pick),
      el("p", {class: "muted"}, data.runs.map((r) => `${r.name}: ${fmt(r.total_steps)} steps`).join(" · "))),
    chartGrid("cmp", () => draw()),
    el("h2", {}, "Config differences"),
    data.config_diff.length ? table(data.config_diff.map((r) => [r.key, ...names.map((n) => JSON.stringify(r.values[n]))]), ["key", ...names])
      : el("p", {}, "The configs are identical."));
  function draw() {
    for (const c of CHARTS) drawChart(`cmp-${c.id}`, c, data.runs.flatMap((r, i) => traces(c, r.records, r.name, i, xOf(axis, r))), axis);
  }
  draw();
}

// ------------------------------------------------------------------ data preview

async function previewView() {
  const rec = await api("/api/recipes");
  const recipe = el("select", {id: "recipe"},
    el("optgroup", {label: "built-in"}, rec.builtin.map((r) => el("option", {value: "recipe:" + r, selected: r === "quickstart"}, r))),
    rec.files.length ? el("optgroup", {label: "files"}, rec.files.map((r) => el("option", {value: "recipe:" + r}, r))) : null,
    rec.runs.length ? el("optgroup", {label: "runs (their config)"}, rec.runs.map((r) => el("option", {value: "run:" + r}, r))) : null);
  const overrides = el("input", {id: "overrides", size: 60, placeholder: "data.max_length=256 data.path=...  (key=value, space separated)"});
  const n = el("input", {id: "n", type: "number", value: 3, min: 1, max: 50, style: "width:5em"});
  const out = el("div", {id: "preview-out"});
  const go = el("button", {id: "preview-go", type: "submit"}, "Preview");
  const form = el("form", {class: "inline", onsubmit: async (e) => {
    e.preventDefault();
    go.disabled = true;
    put(out, el("p", {class: "muted"}, "tokenizing…"));
    const [kind, value] = recipe.value.split(/:(.*)/s);
    const body = {n: Number(n.value), overrides: overrides.value.split(/\s+/).filter(Boolean)};
    body[kind] = value;
    try {
      const r = await api("/api/preview", {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
      put(out, 
        el("p", {}, el("span", {class: "tok trained"}, "trained tokens"), " ", r.weighted ? el("span", {class: "tok weighted"}, "trained with a message weight ≠ 1") : null, " ",
          el("span", {class: "tok masked"}, "masked tokens (no loss)")),
        r.sequences.map((s, i) => [el("h2", {}, `sequence ${i}: rows ${s.rows.join(", ")}, ${s.tokens.length} tokens, ${s.tokens.filter((t) => t.trained).length} trained`),
          el("div", {class: "tokens"}, s.tokens.map((t) => el("span", {class: "tok " + (!t.trained ? "masked" : t.weight === 1 ? "trained" : "weighted"), title: t.trained ? `weight ${t.weight}` : "masked"}, t.text.replace(/\n/g, "↵\n"))))]),
        el("h2", {}, "Training data"), table(reportRows(r.data_report)),
        r.eval_report ? [el("h2", {}, "Eval data"), table(reportRows(r.eval_report))] : null);
    } catch (err) {
      put(out, el("p", {class: "error"}, err.message));
    } finally { go.disabled = false; }
  }}, el("label", {}, "recipe", recipe), el("label", {}, "overrides", overrides), el("label", {}, "sequences", n), go);
  put(view, el("h1", {}, "Data preview"), el("p", {class: "muted"}, "The first training sequences exactly as `sftune preview` builds them, and the dataset report."), form, out);
}

// ------------------------------------------------------------------ chat

async function streamInto(node, body) {
  const res = await fetch("/api/chat", {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
  if (!res.ok) { let m = res.statusText; try { m = (await res.json()).detail; } catch (e) { /* */ } node.classList.add("error"); node.textContent = m; return ""; }
  const reader = res.body.getReader(), decoder = new TextDecoder();
  let text = "", chunks = 0;
  for (;;) {
    const {done, value} = await reader.read();
    if (done) break;
    text += decoder.decode(value, {stream: true});
    node.textContent = text;
    node.dataset.chunks = ++chunks;
  }
  node.dataset.done = "1";
  if (!text.trim()) node.append(el("span", {class: "muted"}, JSON.stringify(text) + " (the model stopped at once)"));
  return text.replace(/\n$/, "");
}

async function chatView(name) {
  const d = await api("/api/run?" + q(name));
  const side = el("input", {type: "checkbox", id: "side"});
  const input = el("input", {id: "message", size: 70, placeholder: "a message, e.g. reverse abcd", autocomplete: "off"});
  const tokens = el("input", {id: "max-tokens", type: "number", value: 64, min: 1, max: 1024, style: "width:5em"});
  // vision-language runs: an image shown with the conversation's first message (sent as a data URL every turn)
  const picture = el("input", {type: "file", id: "image", accept: "image/*"});
  const readPicture = () => new Promise((resolve) => {
    const f = picture.files && picture.files[0];
    if (!f) { resolve([]); return; }
    const r = new FileReader();
    r.onload = () => resolve([r.result]);
    r.readAsDataURL(f);
  });
  const panels = {run: el("div", {class: "panel", id: "panel-run"}, el("b", {}, name)), base: el("div", {class: "panel", id: "panel-base", hidden: true}, el("b", {}, "base model"))};
  const history = {run: [], base: []};
  side.addEventListener("change", () => { panels.base.hidden = !side.checked; });
  const send = el("button", {id: "send", type: "submit"}, "Send");
  const form = el("form", {class: "inline", onsubmit: async (e) => {
    e.preventDefault();
    const message = input.value.trim();
    if (!message) return;
    input.value = "";
    send.disabled = true;
    const which = side.checked ? ["run", "base"] : ["run"];
    const images = await readPicture();
    await Promise.all(which.map(async (k) => {
      panels[k].append(el("div", {class: "msg user"}, message));
      const reply = el("div", {class: "msg assistant"});
      panels[k].append(reply);
      const text = await streamInto(reply, {run: name, message, history: history[k], base: k === "base", max_new_tokens: Number(tokens.value), images});
      history[k].push({role: "user", content: message}, {role: "assistant", content: text});
    }));
    send.disabled = false;
    input.focus();
  }}, el("label", {}, "message", input), el("label", {}, "max new tokens", tokens), el("label", {}, "side by side with the base model", side), el("label", {title: "vision-language runs"}, "image", picture), send,
    el("button", {type: "button", onclick: () => { history.run = []; history.base = []; picture.value = ""; for (const p of Object.values(panels)) put(p, p.firstChild); }}, "Reset"));
  put(view, el("h1", {}, "Chat with ", el("a", {href: runLink(name)}, name), " ", badge(d.state)),
    el("p", {class: "muted"}, "Prompts use the run's training format (template or chat template); replies stream as they are generated."),
    d.chat ? form : el("p", {class: "error"}, "This run has no final model yet."), el("div", {class: "panels"}, panels.run, panels.base));
  input.focus();
}

// ------------------------------------------------------------------ a new run (form generated from the config schema)

function fieldInput(f) {
  const id = "f-" + f.key.replace(".", "-");
  let input;
  if (f.kind === "bool") input = el("input", {type: "checkbox", id, checked: !!f.value});
  else if (f.kind === "choice") input = el("select", {id}, (f.nullable ? [null] : []).concat(f.choices).map((c) => el("option", {value: JSON.stringify(c), selected: c === f.value}, c === null ? "(none)" : String(c))));
  else if (f.kind === "json" || (typeof f.value === "string" && f.value.includes("\n"))) input = el("textarea", {id, rows: 1, cols: 28}, JSON.stringify(f.value));
  else input = el("input", {id, size: 18, value: f.value === null ? "" : String(f.value)});
  input.dataset.key = f.key;
  const read = () => {
    if (f.kind === "bool") return input.checked;
    if (f.kind === "choice") return JSON.parse(input.value);
    if (input.tagName === "TEXTAREA") { try { return JSON.parse(input.value); } catch (e) { return input.value; } }
    const v = input.value;
    if (v === "" && f.nullable) return null;
    if ((f.kind === "int" || f.kind === "float") && v.trim() !== "" && !isNaN(Number(v))) return Number(v);
    return v;
  };
  return {f, input, read, node: el("label", {title: f.description}, f.key.split(".")[1], input)};
}

async function newRunView() {
  const rec = await api("/api/recipes");
  const recipe = el("select", {id: "new-recipe"}, rec.builtin.map((r) => el("option", {value: r, selected: r === "quickstart"}, r)),
    rec.files.map((r) => el("option", {value: r}, r)));
  const name = el("input", {id: "new-name", value: "quickstart-ui", size: 24});
  const fieldsBox = el("div"), status = el("p", {id: "new-status"});
  let inputs = [];
  async function load() {
    const s = await api("/api/schema?recipe=" + encodeURIComponent(recipe.value));
    inputs = s.fields.map(fieldInput);
    const sections = [...new Set(s.fields.map((f) => f.section))];
    put(fieldsBox, sections.map((sec) => el("fieldset", {class: "section"}, el("legend", {}, sec),
      inputs.filter((i) => i.f.section === sec && i.f.key !== "train.output_dir").map((i) => i.node))));
  }
  recipe.addEventListener("change", load);
  const form = el("form", {onsubmit: async (e) => {
    e.preventDefault();
    const overrides = {};
    for (const i of inputs) {
      const v = i.read();
      if (JSON.stringify(v) !== JSON.stringify(i.f.value)) overrides[i.f.key] = v;
    }
    status.className = "muted";
    status.textContent = "starting… overrides: " + (Object.entries(overrides).map(([k, v]) => `${k}=${JSON.stringify(v)}`).join(" ") || "none");
    try {
      const r = await api("/api/train", {method: "POST", headers: {"Content-Type": "application/json"},
        body: JSON.stringify({recipe: recipe.value, name: name.value, overrides})});
      location.hash = runLink(r.name);
    } catch (err) { status.className = "error"; status.textContent = err.message; }
  }}, el("div", {class: "inline"}, el("label", {}, "recipe", recipe), el("label", {}, "run name (under the runs directory)", name),
    el("button", {type: "submit", id: "new-go"}, "Start training")), status, fieldsBox);
  put(view, el("h1", {}, "New run"), el("p", {class: "muted"}, "Every config key, with the recipe's values; changed ones are passed as overrides and validated as on the command line. Hover a field for its meaning."), form);
  await load();
}

// ------------------------------------------------------------------ router

async function route() {
  timers.forEach(clearInterval);
  timers = [];
  const hash = location.hash.slice(1) || "/";
  const [, page, arg] = hash.match(/^\/([^/]*)\/?(.*)$/) || [];
  try {
    if (page === "run") await runView(decodeURIComponent(arg));
    else if (page === "compare") await compareView(arg.split("|").map(decodeURIComponent));
    else if (page === "preview") await previewView();
    else if (page === "new") await newRunView();
    else if (page === "chat") await chatView(decodeURIComponent(arg));
    else await runsView();
  } catch (err) {
    put(view, el("p", {class: "error"}, String(err.message || err)));
  }
}

window.addEventListener("hashchange", route);
route();
