"""The coordinator's live cluster page (`GET /`): one self-contained HTML page that reads the coordinator's own
`/state` and `/placement` every two seconds and draws the placement heat map (experts each server holds per
MoE layer), each server's health, local share and remote traffic, and the migrations. No build step and no
external script: it works on an air-gapped edge cluster."""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>prism-moe cluster</title>
<style>
 body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }
 h1 { font-size: 1.3em; margin: 0 0 .3em; } h2 { font-size: 1.05em; margin: 1.2em 0 .4em; }
 table { border-collapse: collapse; } th, td { padding: 3px 8px; text-align: right; }
 th:first-child, td:first-child { text-align: left; } tr:nth-child(even) { background: #f4f4f4; }
 .live { color: #187a2f; font-weight: 600; } .down { color: #b3261e; font-weight: 600; }
 #heatmap td.cell { width: 14px; height: 18px; padding: 0; border: 1px solid #fff; }
 #heatmap th { font-weight: normal; font-size: 11px; padding: 0 2px; }
 #status { color: #666; } .error { color: #b3261e; }
</style>
</head>
<body>
<h1>prism-moe cluster</h1>
<div id="summary">loading&hellip;</div>
<div id="status"></div>
<h2>Servers</h2>
<table id="servers"><thead><tr><th>server</th><th>health</th><th>local share</th><th>remote calls/s</th>
<th>peer traffic</th><th>experts held / slots</th><th>placement version</th></tr></thead><tbody></tbody></table>
<h2>Placement: experts held per MoE layer</h2>
<table id="heatmap"></table>
<h2>Migrations</h2>
<ol id="migrations"></ol>
<h2>Events</h2>
<ol id="events"></ol>
<script>
"use strict";
const pct = x => x === null || x === undefined ? "-" : (100 * x).toFixed(1) + "%";
const num = (x, d) => x === null || x === undefined ? "-" : Number(x).toFixed(d);
const bytes = x => x === null || x === undefined ? "-" : x >= 1e6 ? (x / 1e6).toFixed(1) + " MB/s"
  : (x / 1e3).toFixed(1) + " kB/s";
function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}
function drawServers(state) {
  const body = document.querySelector("#servers tbody");
  body.replaceChildren();
  for (const [name, s] of Object.entries(state.servers)) {
    const tr = el("tr", {"data-server": name});
    tr.append(el("td", {}, name));
    tr.append(el("td", {class: s.live ? "live" : "down", "data-health": s.live ? "live" : "down"},
                 s.live ? "live" : (s.seen ? "down" : "not seen")));
    tr.append(el("td", {"data-local-share": name}, pct(s.local_hit_rate)));
    tr.append(el("td", {}, num(s.remote_invocations_per_s, 1)));
    tr.append(el("td", {}, bytes(s.peer_bytes_per_s)));
    tr.append(el("td", {}, (s.experts_held ?? "-") + " / " + s.expert_slots));
    tr.append(el("td", {}, s.placement_version ?? "-"));
    body.append(tr);
  }
}
function drawHeatmap(p) {
  const t = document.querySelector("#heatmap");
  t.replaceChildren();
  const head = el("tr");
  head.append(el("th", {}, "layer"));
  for (let l = 0; l < p.num_layers; l++) head.append(el("th", {}, String(l)));
  t.append(head);
  for (const name of p.servers) {
    const tr = el("tr", {"data-server": name});
    tr.append(el("th", {}, name));
    for (let l = 0; l < p.num_layers; l++) {
      const n = (p.placement[name][String(l)] || []).length, f = n / p.num_experts;
      const td = el("td", {class: "cell", "data-layer": String(l), "data-held": String(n),
                           title: name + ", layer " + l + ": " + n + " of " + p.num_experts + " experts"});
      td.style.background = "hsl(210, 70%, " + Math.round(95 - 60 * f) + "%)";
      tr.append(td);
    }
    t.append(tr);
  }
}
function drawList(id, items, text) {
  const ol = document.querySelector(id);
  ol.replaceChildren(...items.map(x => el("li", {}, text(x))));
}
async function refresh() {
  try {
    const state = await (await fetch("state")).json();
    document.querySelector("#summary").textContent = "placement version " + (state.placement_version ?? "-") +
      " (" + state.algorithm + ")" + (state.migrating ? ", migrating" : "") + (state.error ? ", error: " + state.error : "");
    drawServers(state);
    drawList("#migrations", state.migrations.slice().reverse(), m =>
      "v" + m.from_version + " \\u2192 v" + m.to_version + " (" + m.reason + "): " + (m.ok ? "done" : m.rolled_back ?
      "rolled back" : "failed") + ", " + m.experts_loaded + " experts loaded, " + (m.bytes_moved / 1e6).toFixed(1) + " MB");
    drawList("#events", state.events.slice(-10).reverse(), e =>
      new Date(1000 * e.time).toLocaleTimeString() + " " + e.kind + (e.server ? " " + e.server : "") + ": " + e.detail);
    const r = await fetch("placement");
    if (r.ok) drawHeatmap(await r.json());
    const st = document.querySelector("#status");
    st.className = ""; st.textContent = "updated " + new Date().toLocaleTimeString();
  } catch (err) {
    const st = document.querySelector("#status");
    st.className = "error"; st.textContent = "coordinator unreachable: " + err;
  }
}
refresh();
setInterval(refresh, 2000);
</script>
</body>
</html>
"""
