"""The labeling page: one self-contained HTML file (no external resources). Text from the
store is set with textContent, never as markup."""

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>patchdb label</title>
<style>
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
</style>
</head>
<body>
<h1>patchdb label</h1>
<div id="progress"></div>
<div id="error"></div>
<div id="current">
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
  <button id="undo-done">undo (u)</button></div>
<div class="box" id="previous" hidden>
  <b>Previous answer</b>: <span id="prev-what"></span>
  <div>You: <b id="prev-label"></b>. Judge: <b id="prev-judge"></b>
    <span id="prev-agree"></span></div>
  <details><summary>Judge's reasoning</summary><div class="reply" id="prev-reply"></div></details>
</div>
<script>
(function () {
  "use strict";
  var current = null;
  var busy = false;
  function el(id) { return document.getElementById(id); }
  function verdict(v) { return v === true ? "YES" : v === false ? "NO" : "unparsed"; }
  function call(method, path, body) {
    return fetch(path, {method: method, headers: {"Content-Type": "application/json"},
                        body: body === undefined ? undefined : JSON.stringify(body)})
      .then(function (r) {
        return r.json().then(function (data) {
          if (!r.ok) { throw new Error(data.error || ("HTTP " + r.status)); }
          return data;
        });
      });
  }
  function showProgress(progress, labeler) {
    el("progress").textContent = "Labeler " + labeler + " \u00b7 " + progress.map(function (p) {
      return p.grader + " " + p.labeled + "/" + p.target;
    }).join(" \u00b7 ");
  }
  function show(data) {
    showProgress(data.progress, data.labeler);
    current = data.item;
    document.body.dataset.state = current ? "asking" : "done";
    el("current").hidden = !current;
    el("done").hidden = !!current;
    if (!current) { return; }
    el("meta").textContent = "Rollout " + current.rollout_id + " \u00b7 " + current.experiment +
      " \u00b7 layer " + current.patch_layer + " \u00b7 " + current.source + " \u2192 " +
      current.target + " \u00b7 grader " + current.grader;
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
  function step(promise) {
    busy = true;
    el("error").textContent = "";
    return promise.then(function () { return call("GET", "/api/next"); })
      .then(show)
      .catch(function (e) { el("error").textContent = "Error: " + e.message; })
      .then(function () { busy = false; });
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
  step(Promise.resolve());
})();
</script>
</body>
</html>
"""
