// The page of `python -m bifit.app` (bifit/app.py documents the requests). No library, nothing fetched elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
let examples = [];

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function fetchJson(url, options) {
  const response = await fetch(url, options);
  const body = await response.json().catch(() => ({ error: `${response.status} ${response.statusText}` }));
  if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
  return body;
}

async function loadInfo() {
  const info = await fetchJson("/api/info");
  $("checkpoint").textContent = `checkpoint: ${info.checkpoint} (windows of ${info.window || "all"} frames)`;
  $("untrained").hidden = !info.untrained;
  examples = info.examples;
  for (const ex of examples) {
    const option = document.createElement("option");
    option.value = ex.name;
    option.textContent = ex.name;
    $("example").appendChild(option);
  }
}

$("example").addEventListener("change", () => {
  const ex = examples.find((e) => e.name === $("example").value);
  if (ex && !$("texts").value.trim()) $("texts").value = ex.sentences.slice(0, 2).join("\n");
});

// the per-frame scores of one sentence as a line on a canvas (0..1 on the y axis)
function plotScores(canvas, scores) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 600, h = canvas.clientHeight || 140;
  canvas.width = w * dpr;
  canvas.height = h * dpr;
  const ctx = canvas.getContext("2d");
  ctx.scale(dpr, dpr);
  const pad = 28, plotW = w - 2 * pad, plotH = h - 2 * pad;
  ctx.strokeStyle = "#999";
  ctx.strokeRect(pad, pad, plotW, plotH);
  ctx.fillStyle = "#444";
  ctx.font = "11px sans-serif";
  ctx.fillText("1", 8, pad + 4);
  ctx.fillText("0", 8, pad + plotH + 4);
  ctx.fillText("frame", pad + plotW / 2 - 14, h - 6);
  ctx.fillText("score of the chosen query", pad, pad - 8);
  ctx.strokeStyle = "#e6194b";
  ctx.lineWidth = 2;
  ctx.beginPath();
  scores.forEach((s, i) => {
    const x = pad + (scores.length > 1 ? (i / (scores.length - 1)) * plotW : plotW / 2);
    const y = pad + (1 - s) * plotH;
    if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
  });
  ctx.stroke();
}

function showResults(job) {
  const box = $("expressions");
  box.innerHTML = "";
  for (const e of job.expressions) {
    const div = document.createElement("div");
    div.className = "expression";
    const title = document.createElement("h3");
    title.textContent = `${e.text} (mean score ${e.mean_score.toFixed(3)})`;
    const video = document.createElement("video");
    Object.assign(video, { src: e.video, controls: true, loop: true, muted: true, autoplay: true, preload: "auto" });
    video.setAttribute("playsinline", "");
    const canvas = document.createElement("canvas");
    canvas.className = "scores";
    div.append(title, video, canvas);
    box.appendChild(div);
    plotScores(canvas, e.scores);
  }
  $("download").href = job.masks_zip;
  $("results").hidden = false;
}

async function upload(file) {
  setStatus(`uploading ${file.name} (${(file.size / 1e6).toFixed(1)} MB)…`);
  const body = await fetchJson(`/api/upload?name=${encodeURIComponent(file.name)}`, { method: "POST", body: file });
  return body.upload;
}

async function run() {
  $("run").disabled = true;
  $("results").hidden = true;
  try {
    const texts = $("texts").value.split("\n").map((t) => t.trim()).filter((t) => t);
    if (!texts.length) throw new Error("type a sentence first");
    const request = { texts, every: parseInt($("every").value, 10) || 1 };
    const file = $("video").files[0];
    if (file) request.upload = await upload(file);
    else if ($("example").value) request.example = $("example").value;
    else throw new Error("choose a video or an example first");
    const { job: id } = await fetchJson("/api/segment", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(request),
    });
    $("progress").hidden = false;
    for (;;) {
      const job = await fetchJson(`/api/jobs/${id}`);
      if (job.total) { $("progress").max = job.total; $("progress").value = job.done; }
      if (job.state === "failed") throw new Error(job.error);
      if (job.state === "done") {
        setStatus(`done: ${job.done} frames`);
        showResults(job);
        break;
      }
      setStatus(`${job.state}: ${job.done}${job.total ? " / " + job.total : ""} frames`);
      await new Promise((resolve) => setTimeout(resolve, 300));
    }
  } catch (err) {
    setStatus(err.message, true);
  } finally {
    $("run").disabled = false;
    $("progress").hidden = true;
  }
}

$("run").addEventListener("click", run);
loadInfo().catch((err) => setStatus(`cannot reach the server: ${err.message}`, true));
