"""The CSS and JavaScript inlined into the HTML report's pages, so they need no server and no
network.

A rollout page (patchdb.report.rollout_pages: one experiment at one patch layer) reads its data
from `<script type="application/json" id="rollout-data">` and renders every piece of text with
`textContent`, never `innerHTML`, so answers and judge replies show as the literal text they
are. Filters live in the URL hash (`#key=...&word=...&verdict=...&text=...`), so a filtered view
can be bookmarked, and a rate cell of report.html links straight to its word's rollouts.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # matplotlib is imported where a plot is drawn
    from matplotlib.figure import Figure

PLOT_DPI = 90


def png_data_uri(fig: "Figure", dpi: int = PLOT_DPI) -> str:
    """The figure as a `data:` URI of a PNG with a 256-colour palette: on these plots of thin,
    faint lines the palette shows no difference, and the image is about a third of the size of
    full colour and quicker to encode (the report page embeds one per experiment)."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    fig.set_dpi(dpi)
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())  # type: ignore[attr-defined]
    image = Image.fromarray(pixels[..., :3]).quantize(256, method=Image.Quantize.FASTOCTREE)
    buffer = io.BytesIO()
    image.save(buffer, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


CSS = """
:root { --fg: #1d2329; --muted: #5d6873; --line: #d9dee3; --bg: #ffffff; --panel: #f5f7f9;
        --yes: #1f7a3a; --no: #b3261e; --other: #8a6d00; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
       background: var(--bg); margin: 0 auto; padding: 16px 24px 48px; max-width: 1280px; }
h1 { font-size: 22px; margin: 8px 0 4px; }
h2 { font-size: 18px; margin: 28px 0 8px; border-bottom: 1px solid var(--line); padding-bottom: 4px; }
h3 { font-size: 15px; margin: 16px 0 6px; }
.muted { color: var(--muted); }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 8px 0; }
dl.facts dt { color: var(--muted); }
dl.facts dd { margin: 0; }
nav a { margin-right: 14px; }
.note { background: var(--panel); border-left: 3px solid var(--other); padding: 6px 10px; margin: 8px 0; }
.result { display: flex; flex-wrap: wrap; gap: 8px 24px; align-items: flex-start; }
figure { margin: 8px 0; flex: 0 1 760px; }
figure img { width: 100%; height: auto; border: 1px solid var(--line); }
.table-wrap { overflow-x: auto; }
table.rates { border-collapse: collapse; font-variant-numeric: tabular-nums; }
table.rates th, table.rates td { border: 1px solid var(--line); padding: 2px 8px; text-align: right; }
table.rates th { background: var(--panel); }
table.rates td a { color: inherit; text-decoration: none; display: block; }
table.rates td a:hover { text-decoration: underline; }
table.rates .band { display: block; font-size: 11px; color: var(--muted); }
table.pages caption { text-align: left; color: var(--muted); margin-bottom: 4px; }
table.pages td a { color: #1a5fb4; text-decoration: underline; }
.layers a, .layers strong { white-space: nowrap; }
#filters { display: flex; flex-wrap: wrap; gap: 8px 16px; align-items: end; background: var(--panel);
           padding: 10px; border: 1px solid var(--line); position: sticky; top: 0; z-index: 1; }
#filters label { display: flex; flex-direction: column; font-size: 12px; color: var(--muted); }
#filters select, #filters input[type=search] { font: inherit; padding: 2px 4px; min-width: 120px; }
#filters label.inline { flex-direction: row; align-items: center; gap: 4px; font-size: 13px; }
#match-count { margin: 8px 0; }
.rollout { border: 1px solid var(--line); border-radius: 4px; margin: 10px 0; padding: 8px 10px; }
.rollout .meta { display: flex; flex-wrap: wrap; gap: 4px 14px; font-size: 13px; color: var(--muted); }
.rollout .meta .key { color: var(--fg); font-weight: 600; }
.answer { white-space: pre-wrap; overflow-wrap: anywhere; background: var(--panel); padding: 6px 8px;
          margin: 6px 0; border-radius: 3px; font-family: ui-monospace, Menlo, Consolas, monospace;
          font-size: 13px; }
.grader { margin: 2px 0; }
.grader summary { cursor: pointer; }
.grader .name { display: inline-block; min-width: 190px; }
.grader .gist { color: var(--muted); }
.reply { white-space: pre-wrap; overflow-wrap: anywhere; margin: 4px 0 6px 20px; font-size: 13px; }
.badge { display: inline-block; font-size: 12px; font-weight: 700; padding: 0 6px; border-radius: 3px;
         color: #fff; background: var(--other); }
.badge.yes { background: var(--yes); }
.badge.no { background: var(--no); }
.badge.none { background: #77808a; }
button { font: inherit; }
"""

JS = r"""
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("rollout-data").textContent);
  var PAGE = 200;
  var shown = PAGE;
  var fields = ["key", "word", "verdict", "text"];
  var el = function (id) { return document.getElementById(id); };

  function node(tag, cls, text) {
    var n = document.createElement(tag);
    if (cls) { n.className = cls; }
    if (text !== undefined && text !== null) { n.textContent = String(text); }
    return n;
  }

  function fillSelect(select, values, labelOf) {
    var keep = select.value;
    while (select.options.length > 1) { select.remove(1); }
    values.forEach(function (v) {
      var o = node("option", null, labelOf ? labelOf(v) : v);
      o.value = String(v);
      select.appendChild(o);
    });
    select.value = values.map(String).indexOf(keep) >= 0 ? keep : "";
  }

  function verdictName(j) {
    if (!j) { return "not judged"; }
    if (j.verdict === true) { return "YES"; }
    if (j.verdict === false) { return "NO"; }
    return j.error ? "error" : "unparsed";
  }

  function verdictToken(j) {
    if (!j) { return "missing"; }
    if (j.verdict === true) { return "yes"; }
    if (j.verdict === false) { return "no"; }
    return "unparsed";
  }

  function matchesVerdict(r, wanted) {
    if (!wanted) { return true; }
    var parts = wanted.split(":");
    if (parts[0] === "score") {
      var s = r.score === 1 ? "pass" : r.score === 0 ? "fail" : "unscored";
      return s === parts[1];
    }
    return verdictToken(r.judgments[parts[0]]) === parts[1];
  }

  function readHash() {
    var params = new URLSearchParams(location.hash.replace(/^#/, ""));
    fields.forEach(function (f) { el("f-" + f).value = params.get(f) || ""; });
  }

  function writeHash() {
    var params = new URLSearchParams();
    fields.forEach(function (f) { if (el("f-" + f).value) { params.set(f, el("f-" + f).value); } });
    var hash = params.toString();
    history.replaceState(null, "", hash ? "#" + hash : location.pathname + location.search);
  }

  function current() {
    var f = {};
    fields.forEach(function (name) { f[name] = el("f-" + name).value; });
    var text = f.text.toLowerCase();
    return data.rollouts.filter(function (r) {
      return (!f.key || r.key === f.key) &&
        (!f.word || r.source === f.word || r.target === f.word) &&
        matchesVerdict(r, f.verdict) &&
        (!text || r.answer.toLowerCase().indexOf(text) >= 0);
    });
  }

  function renderRollout(r) {
    var card = node("article", "rollout");
    card.setAttribute("data-rollout-id", String(r.id));
    var meta = node("div", "meta");
    meta.appendChild(node("span", "experiment", r.experiment));
    meta.appendChild(node("span", "layer", data.layer_name));
    meta.appendChild(node("span", "key", r.key));
    meta.appendChild(node("span", null, "sample " + r.sample));
    meta.appendChild(node("span", null, (r.n_tokens === null ? "?" : r.n_tokens) + " tokens, " +
      (r.finish_reason || "?")));
    var score = r.score === 1 ? ["yes", "score 1"] : r.score === 0 ? ["no", "score 0"] : ["none", "unscored"];
    meta.appendChild(node("span", "badge score " + score[0], score[1]));
    card.appendChild(meta);
    card.appendChild(node("div", "answer", r.answer));
    // the experiment's graders, then any other grader that judged this answer
    data.graders.concat(Object.keys(r.judgments).filter(function (g) {
      return data.graders.indexOf(g) < 0;
    })).forEach(function (g) {
      var j = r.judgments[g];
      var box = node("details", "grader");
      box.setAttribute("data-grader", g);
      box.open = el("f-open").checked;
      var sum = node("summary");
      sum.appendChild(node("span", "name", g));
      var v = verdictName(j);
      sum.appendChild(node("span", "badge verdict " + verdictToken(j).replace("missing", "none")
        .replace("unparsed", "other"), v));
      var text = j ? (j.error || j.reply || "") : "";
      sum.appendChild(node("span", "gist", " " + text.replace(/\s+/g, " ").slice(0, 110)));
      box.appendChild(sum);
      if (j) {
        if (j.error) { box.appendChild(node("div", "reply error", "error: " + j.error)); }
        if (j.reply) { box.appendChild(node("div", "reply", j.reply)); }
      }
      card.appendChild(box);
    });
    return card;
  }

  function render() {
    var rows = current();
    var list = el("rows");
    list.textContent = "";
    rows.slice(0, shown).forEach(function (r) { list.appendChild(renderRollout(r)); });
    el("match-count").textContent = rows.length + " of " + data.rollouts.length +
      " rollouts on this page match" + (rows.length > shown ? "; showing the first " + shown : "") + ".";
    el("more").hidden = rows.length <= shown;
  }

  var keys = {};
  data.rollouts.forEach(function (r) { keys[r.key] = true; });
  fillSelect(el("f-key"), Object.keys(keys).sort());
  fillSelect(el("f-word"), data.words);
  var verdicts = ["score:pass", "score:fail", "score:unscored"];
  data.graders.forEach(function (g) {
    ["yes", "no", "unparsed", "missing"].forEach(function (v) { verdicts.push(g + ":" + v); });
  });
  fillSelect(el("f-verdict"), verdicts, function (v) {
    var p = v.split(":");
    return p[0] === "score" ? "score " + p[1] : p[0] + " " + p[1].toUpperCase();
  });
  readHash();
  render();

  fields.forEach(function (f) {
    el("f-" + f).addEventListener(f === "text" ? "input" : "change", function () {
      shown = PAGE;
      writeHash();
      render();
    });
  });
  el("f-open").addEventListener("change", render);
  el("more").addEventListener("click", function () { shown += PAGE; render(); });
  el("clear").addEventListener("click", function () {
    fields.forEach(function (f) { el("f-" + f).value = ""; });
    shown = PAGE;
    writeHash();
    render();
  });
  // A new filter in the URL hash (a bookmark, or an edited address) applies at once.
  window.addEventListener("hashchange", function () {
    shown = PAGE;
    readHash();
    render();
  });
}());
"""
