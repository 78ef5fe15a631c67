"""A small built-in page at `/ui` for tuning experts by eye.

It lists the experts (label, type, description, keywords) with how many chat requests the router
sent to each so far (all workers, refreshed every few seconds), and has a box to type a message:
the page asks `POST /v1/route` (a dry run: nothing is generated or counted) and draws every
expert's score as a bar, with the decision and how it was reached.

One page of plain HTML, CSS and JavaScript kept in this module: no build step, nothing fetched
from another site. Its data comes from `GET /ui/state` and `POST /v1/route`, same origin, so
the API keys and the rate limit apply to them as to any request; when the server wants a key
the page asks for one and keeps it for the browser tab (sessionStorage). The Content-Security-
Policy allows only this page's own script and style and requests to this server.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

from flask import Response, current_app

from modules.config_manager import ExpertConfig
from modules.decision_cache import router_name
from modules.services import json_response, services
from modules.ops.metrics import metrics_of, route_counts

_STYLE = """
:root { --bg:#f6f7f9; --card:#fff; --ink:#1d2330; --muted:#687083; --line:#e3e6ec; --accent:#3867d6;
        --accent-soft:#dbe5fb; --win:#20a464; --win-soft:#d5f2e3; --chip:#eef0f4; }
@media (prefers-color-scheme: dark) {
  :root { --bg:#12151b; --card:#1b2029; --ink:#e6e9ef; --muted:#98a1b3; --line:#2b3240; --accent:#7aa2ff;
          --accent-soft:#25324f; --win:#3ccf8e; --win-soft:#1d3b2f; --chip:#262d3a; }
}
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink);
       font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
header { display: flex; align-items: baseline; justify-content: space-between; gap: 1rem;
         padding: 1rem 1.5rem; border-bottom: 1px solid var(--line); background: var(--card); }
h1 { margin: 0; font-size: 1.3rem; } h1 span { color: var(--muted); font-weight: 400; font-size: .95rem; }
h2 { margin: 0 0 .75rem; font-size: 1.05rem; }
main { display: grid; grid-template-columns: minmax(0, 1fr) minmax(0, 1fr); gap: 1.25rem; padding: 1.25rem 1.5rem;
       max-width: 1200px; margin: 0 auto; align-items: start; }
@media (max-width: 860px) { main { grid-template-columns: 1fr; } }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 10px; padding: 1rem 1.1rem; }
.muted, .hint, .status { color: var(--muted); font-size: .85rem; font-weight: 400; }
textarea, input { width: 100%; font: inherit; color: inherit; background: var(--bg); border: 1px solid var(--line);
                  border-radius: 8px; padding: .6rem .7rem; resize: vertical; }
.row { display: flex; align-items: center; gap: .8rem; margin-top: .6rem; }
button { font: inherit; font-weight: 600; color: #fff; background: var(--accent); border: 0; border-radius: 8px;
         padding: .5rem 1.1rem; cursor: pointer; }
button:disabled { opacity: .6; cursor: wait; }
.decision { margin: 1rem 0 .8rem; padding: .7rem .9rem; border-radius: 8px; background: var(--win-soft); }
.decision strong { font-size: 1.1rem; }
.decision.error { background: #fbe3e3; color: #8a1f1f; }
.context { margin-top: .3rem; color: var(--muted); font-size: .85rem; overflow-wrap: anywhere; }
.badge { display: inline-block; font-size: .75rem; font-weight: 600; padding: .05rem .45rem; border-radius: 999px;
         background: var(--accent-soft); color: var(--accent); margin-left: .35rem; vertical-align: middle; }
.bar-row { display: grid; grid-template-columns: 8.5rem minmax(0, 1fr) 3.4rem; align-items: center; gap: .6rem;
           margin: .35rem 0; }
.bar-label { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; font-weight: 600; }
.bar-track { height: .9rem; background: var(--chip); border-radius: 999px; overflow: hidden; }
.bar-fill { height: 100%; width: 0; background: var(--accent); border-radius: 999px; transition: width .35s ease; }
.bar-row.winner .bar-fill { background: var(--win); }
.bar-row.winner .bar-label { color: var(--win); }
.bar-value { text-align: right; font-variant-numeric: tabular-nums; color: var(--muted); font-size: .85rem; }
.expert { border-top: 1px solid var(--line); padding: .75rem 0; }
.expert:first-child { border-top: 0; padding-top: 0; }
.expert-head { display: flex; align-items: baseline; justify-content: space-between; gap: .6rem; }
.expert-name { font-weight: 700; }
.count { font-variant-numeric: tabular-nums; font-weight: 700; }
.description { margin: .2rem 0 .4rem; color: var(--muted); font-size: .9rem; }
.chips { display: flex; flex-wrap: wrap; gap: .3rem; }
.chip { background: var(--chip); border-radius: 6px; padding: .05rem .45rem; font-size: .8rem; }
.count-track { height: .35rem; background: var(--chip); border-radius: 999px; margin-top: .5rem; overflow: hidden; }
.count-fill { height: 100%; background: var(--accent); width: 0; transition: width .35s ease; }
.methods { font-size: .8rem; color: var(--muted); margin-top: .2rem; }
#auth { grid-column: 1 / -1; }
"""

_SCRIPT = r"""
"use strict";
const $ = (id) => document.getElementById(id);
const KEY = "lemoe-api-key";
const METHODS = {
  keyword: "the last message matched its keywords",
  cascade: "the last few messages together matched its keywords",
  fallback: "no single expert matched well enough: the fallback expert answers",
  direct: "the request named this expert",
  utility: "a client's task prompt (title, tags, ...): router.utility_expert answers it",
  autocomplete: "an editor's inline completion: router.autocomplete_expert answers it",
};
let experts = [];

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

function requestHeaders(json) {
  const headers = {};
  const key = sessionStorage.getItem(KEY);
  if (key) headers["Authorization"] = "Bearer " + key;
  if (json) headers["Content-Type"] = "application/json";
  return headers;
}

function errorText(data) {
  const error = data && data.error;
  return typeof error === "string" ? error : (error && error.message) || "";
}

async function call(path, body) {
  const init = body === undefined ? { headers: requestHeaders(false) }
    : { method: "POST", headers: requestHeaders(true), body: JSON.stringify(body) };
  const response = await fetch(path, init);
  if (response.status === 401) {
    $("auth").hidden = false;
    throw new Error("this server wants an API key");
  }
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(errorText(data) || "HTTP " + response.status);
  return data;
}

function renderExperts(state) {
  const list = $("experts");
  list.replaceChildren();
  const most = Math.max(1, ...state.experts.map((e) => e.routes));
  for (const expert of state.experts) {
    const item = el("div", "expert");
    item.dataset.label = expert.label;
    const head = el("div", "expert-head");
    const name = el("span", "expert-name", expert.label);
    name.append(el("span", "badge", expert.type));
    if (expert.fallback) name.append(el("span", "badge", "fallback"));
    const count = el("span", "count", String(expert.routes));
    count.title = "chat requests routed here";
    head.append(name, count);
    item.append(head, el("div", "description", expert.description || "(no description)"));
    const chips = el("div", "chips");
    for (const word of expert.keywords) chips.append(el("span", "chip", word));
    if (!expert.keywords.length) {
      chips.append(el("span", "muted", expert.fallback ? "answers what nothing else matches" : "no keywords"));
    }
    item.append(chips);
    const track = el("div", "count-track");
    const fill = el("div", "count-fill");
    fill.style.width = (100 * expert.routes / most).toFixed(1) + "%";
    track.append(fill);
    item.append(track);
    const methods = Object.entries(expert.by_method).map(([m, n]) => m + " " + n).join(" · ");
    if (methods) item.append(el("div", "methods", methods));
    list.append(item);
  }
  $("total").textContent = "· " + state.routes_total + " routed so far";
}

async function refresh() {
  try {
    const state = await call("/ui/state");
    experts = state.experts;
    renderExperts(state);
    $("status").textContent = state.experts.length + " experts · router " + state.router;
  } catch (err) {
    $("status").textContent = err.message;
  }
}

function renderDecision(result) {
  const box = $("decision");
  box.className = "decision";
  box.replaceChildren();
  const line = el("div");
  line.append("→ ", el("strong", "", result.expert), el("span", "badge", result.method),
              " score " + Number(result.score).toFixed(3));
  box.append(line, el("div", "context", METHODS[result.method] || ""));
  if (result.context_used) box.append(el("div", "context", "looked at: " + result.context_used));
  box.hidden = false;
  const bars = $("scores");
  bars.replaceChildren();
  const labels = experts.length ? experts.map((e) => e.label) : Object.keys(result.scores);
  for (const label of labels) {
    const scored = Object.prototype.hasOwnProperty.call(result.scores, label);
    const score = scored ? Number(result.scores[label]) : 0;
    const row = el("div", "bar-row" + (label === result.expert ? " winner" : ""));
    row.dataset.label = label;
    const track = el("div", "bar-track");
    const fill = el("div", "bar-fill");
    track.append(fill);
    row.append(el("span", "bar-label", label), track, el("span", "bar-value", scored ? score.toFixed(3) : "–"));
    bars.append(row);
    requestAnimationFrame(() => { fill.style.width = (100 * Math.min(1, Math.max(0, score))).toFixed(1) + "%"; });
  }
}

async function routeMessage(event) {
  event.preventDefault();
  const text = $("message").value.trim();
  if (!text) return;
  const button = $("route-button");
  button.disabled = true;
  try {
    renderDecision(await call("/v1/route", { model: "lemoe", messages: [{ role: "user", content: text }] }));
  } catch (err) {
    const box = $("decision");
    box.className = "decision error";
    box.textContent = err.message;
    box.hidden = false;
  } finally {
    button.disabled = false;
  }
}

function saveKey(event) {
  event.preventDefault();
  sessionStorage.setItem(KEY, $("api-key").value.trim());
  $("auth").hidden = true;
  refresh();
}

$("route-form").addEventListener("submit", routeMessage);
$("message").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) routeMessage(event);
});
$("auth-form").addEventListener("submit", saveKey);
refresh();
setInterval(() => { if (!document.hidden) refresh(); }, 5000);
"""

_BODY = """
<header>
  <h1>LeMoE <span>experts and routing</span></h1>
  <div id="status" class="status">loading…</div>
</header>
<main>
  <section id="auth" class="card" hidden>
    <h2>API key</h2>
    <form id="auth-form" class="row">
      <input id="api-key" type="password" autocomplete="off" placeholder="This server wants an API key">
      <button type="submit">Use key</button>
    </form>
  </section>
  <section class="card">
    <h2>Try a message</h2>
    <form id="route-form">
      <textarea id="message" rows="3" placeholder="Type what a user would ask…"></textarea>
      <div class="row">
        <button id="route-button" type="submit">Route</button>
        <span class="hint">A dry run: nothing is generated or counted. Ctrl+Enter routes too.</span>
      </div>
    </form>
    <div id="decision" class="decision" hidden></div>
    <div id="scores"></div>
  </section>
  <section class="card">
    <h2>Experts <span id="total" class="muted"></span></h2>
    <div id="experts"></div>
  </section>
</main>
"""


def _sha256_source(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


_PAGE = (f'<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
         f'<meta name="viewport" content="width=device-width, initial-scale=1">\n<title>LeMoE</title>\n'
         f"<style>{_STYLE}</style>\n</head>\n<body>{_BODY}<script>{_SCRIPT}</script>\n</body>\n</html>\n")
# Only this page's own script and style run, and it talks only to this server.
_HEADERS = {
    "Content-Security-Policy": (f"default-src 'none'; script-src {_sha256_source(_SCRIPT)}; "
                                f"style-src {_sha256_source(_STYLE)}; connect-src 'self'; base-uri 'none'; "
                                "form-action 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def ui_page() -> Response:
    return Response(_PAGE, content_type="text/html; charset=utf-8", headers=_HEADERS)


def ui_state() -> Response:
    """The experts as configured now, with the routing decisions counted so far."""
    svc = services()
    metrics = metrics_of(current_app)
    counts = route_counts(metrics) if metrics is not None else {}
    experts = [expert_view(e, counts.get(e.label, {}), e.id == svc.config.fallback_expert.id)
               for e in svc.config.experts]
    return json_response({
        "router": router_name(svc.router),
        "experts": experts,
        "routes_total": sum(e["routes"] for e in experts),
    })


def expert_view(expert: ExpertConfig, by_method: dict[str, int], fallback: bool) -> dict[str, Any]:
    return {
        "id": expert.id,
        "label": expert.label,
        "type": expert.type,
        "description": expert.description,
        "keywords": list(expert.keywords),
        "fallback": fallback,
        "routes": sum(by_method.values()),
        "by_method": by_method,
    }
