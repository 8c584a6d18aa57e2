"""The labeling page: one self-contained HTML file (no external resources) that carries no data;
its script fetches everything through the API. Text from the store is set with textContent,
never as markup.

The script reads the token from the page's URL (`?token=...`, as printed by `patchdb label`) and
sends it in the X-Patchdb-Token header of every call, with the session it opened on load in
X-Patchdb-Session. The server sends a Content-Security-Policy that allows exactly this style
and this script (by hash) and no other origin.
"""

import base64
import hashlib

STYLE = """
  body { font: 15px/1.45 system-ui, sans-serif; max-width: 60rem; margin: 1.5rem auto;
         padding: 0 1rem; color: #222; }
  .box { border: 1px solid #ccc; border-radius: 6px; padding: 0.6rem 0.9rem; margin: 0.7rem 0; }
  .answer { background: #f7f7f2; } #answer { white-space: pre-wrap; }
  #grader-question { white-space: pre-wrap; }
  #meta, #progress, #keys { color: #555; font-size: 0.9em; }
  #previous { background: #eef3fb; }
  #previous .reply { white-space: pre-wrap; font-size: 0.9em; color: #333; }
  .agree { color: #176b2c; } .disagree { color: #a3261b; }
  button { font-size: 1em; margin-right: 0.4rem; }
  #error { color: #a3261b; }
"""

BODY = """
<h1>patchdb label</h1>
<div id="progress"></div>
<div id="error"></div>
<div id="current" hidden>
  <div id="meta"></div>
  <div class="box"><b>Question put to the model</b><div id="question"></div></div>
  <div class="box answer"><b>The model's answer</b><div id="answer"></div></div>
  <div class="box"><b>Your question</b> (word: <span id="word"></span>)
    <div id="grader-question"></div></div>
  <div id="keys">
    <button id="yes">YES (y)</button><button id="no">NO (n)</button>
    <button id="skip">skip (s)</button><button id="undo">undo (u)</button>
  </div>
</div>
<div id="done" hidden><p>Every grader has reached its target (or nothing is left). Thank you.</p>
  <p id="elsewhere"></p>
  <button id="undo-done">undo (u)</button></div>
<div class="box" id="previous" hidden>
  <b>Previous answer</b>: <span id="prev-what"></span>
  <div>You: <b id="prev-label"></b>. Judge: <b id="prev-judge"></b>
    <span id="prev-agree"></span></div>
  <details><summary>Judge's reasoning</summary><div class="reply" id="prev-reply"></div></details>
</div>
"""

SCRIPT = """
(function () {
  "use strict";
  var token = new URLSearchParams(location.search).get("token") || "";
  var session = null;
  var current = null;
  var busy = true;
  var steps = 0;  // finished steps, for whoever watches the page (the tests)
  function el(id) { return document.getElementById(id); }
  function verdict(v) { return v === true ? "YES" : v === false ? "NO" : "unparsed"; }
  function headers(json) {
    var h = {"X-Patchdb-Token": token};
    if (session) { h["X-Patchdb-Session"] = session; }
    if (json) { h["Content-Type"] = "application/json"; }
    return h;
  }
  function call(method, path, body) {
    var init = {method: method, headers: headers(body !== undefined), cache: "no-store",
                credentials: "omit"};
    if (body !== undefined) { init.body = JSON.stringify(body); }
    return fetch(path, init).then(function (r) {
      return r.json().then(function (data) {
        if (!r.ok) { throw new Error(data.error || ("HTTP " + r.status)); }
        return data;
      });
    });
  }
  function showError(e) { el("error").textContent = "Error: " + e.message; }
  function showProgress(progress, labeler) {
    el("progress").textContent = "Labeler " + labeler + " \\u00b7 " + progress.map(function (p) {
      return p.grader + " " + p.labeled + "/" + p.target;
    }).join(" \\u00b7 ");
  }
  function show(data) {
    showProgress(data.progress, data.labeler);
    current = data.item;
    document.body.dataset.state = current ? "asking" : "done";
    el("current").hidden = !current;
    el("done").hidden = !!current;
    el("elsewhere").textContent = data.elsewhere ? data.elsewhere +
      " answer(s) are open in another tab of this page." : "";
    if (!current) { return; }
    el("meta").textContent = "Rollout " + current.rollout_id + " \\u00b7 " + current.experiment +
      " \\u00b7 layer " + current.patch_layer + " \\u00b7 " + current.source + " \\u2192 " +
      current.target + " \\u00b7 grader " + current.grader;
    el("question").textContent = current.question;
    el("answer").textContent = current.answer;
    el("word").textContent = current.word;
    el("grader-question").textContent = current.grader_question;
    document.body.dataset.rollout = current.rollout_id + ":" + current.grader;
  }
  function reveal(result) {
    el("previous").hidden = false;
    el("prev-what").textContent = "rollout " + result.rollout_id + ", " + result.grader;
    el("prev-label").textContent = verdict(result.label);
    el("prev-judge").textContent = verdict(result.judge_verdict);
    var same = result.judge_verdict === result.label;
    el("prev-agree").textContent = result.judge_verdict === null ? "" :
      (same ? "(agrees)" : "(disagrees)");
    el("prev-agree").className = same ? "agree" : "disagree";
    el("prev-reply").textContent = result.judge_reply || "(no reply stored)";
  }
  // An action, then the next answer. A refused action leaves its error on the page, and the
  // page still asks for the next answer (another tab may have taken this one).
  function step(promise) {
    busy = true;
    el("error").textContent = "";
    return promise.catch(showError)
      .then(function () { return call("GET", "/api/next"); })
      .then(show)
      .catch(showError)
      .then(function () { busy = false; document.body.dataset.steps = String(++steps); });
  }
  function label(value) {
    if (!current) { return; }
    var body = {rollout_id: current.rollout_id, grader: current.grader, label: value};
    step(call("POST", "/api/label", body).then(reveal));
  }
  function skip() {
    if (!current) { return; }
    step(call("POST", "/api/skip", {rollout_id: current.rollout_id, grader: current.grader}));
  }
  function undo() {
    step(call("POST", "/api/undo", {}).then(function () { el("previous").hidden = true; }));
  }
  document.addEventListener("keydown", function (event) {
    if (busy || event.ctrlKey || event.metaKey || event.altKey) { return; }
    var key = event.key.toLowerCase();
    if (key === "y") { label(true); }
    else if (key === "n") { label(false); }
    else if (key === "s") { skip(); }
    else if (key === "u") { undo(); }
  });
  el("yes").addEventListener("click", function () { label(true); });
  el("no").addEventListener("click", function () { label(false); });
  el("skip").addEventListener("click", skip);
  el("undo").addEventListener("click", undo);
  el("undo-done").addEventListener("click", undo);
  // A closed tab frees its answer at once (the server's reservation expiry is the fallback).
  window.addEventListener("pagehide", function () {
    if (session) {
      fetch("/api/close", {method: "POST", keepalive: true, headers: headers(true),
                           body: "{}", credentials: "omit"});
      session = null;
    }
  });
  window.addEventListener("pageshow", function (event) {
    if (event.persisted) { location.reload(); }  // back from the cache: a fresh session
  });
  step(call("POST", "/api/session", {}).then(function (data) { session = data.session; }));
})();
"""


def _hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


PAGE = (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>patchdb label</title>\n<style>{STYLE}</style>\n</head>\n<body>{BODY}"
        f"<script>{SCRIPT}</script>\n</body>\n</html>\n")

# Only this page's own style and script run; nothing loads from or posts to another origin,
# and no other site may frame the page.
CSP = (f"default-src 'none'; style-src {_hash(STYLE)}; script-src {_hash(SCRIPT)}; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
