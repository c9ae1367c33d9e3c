// gist-memory RAG page. Every text from the server or the user is written with textContent (never parsed as HTML),
// and the chart is built with createElementNS, so documents, titles and answers are shown, never interpreted.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);

function el(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function fmtBytes(n) {
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return (i === 0 ? n.toFixed(0) : n.toFixed(1)) + " " + units[i];
}
const fmtMs = (s) => (s * 1000).toFixed(0) + " ms";
const fmtInt = (n) => String(Math.round(n));

function setMessage(node, text, kind) {
  node.textContent = text || "";
  node.className = "message" + (kind ? " " + kind : "");
}

// fetch JSON; a non-2xx answer becomes an Error carrying the server's {"error": ...} message
async function api(path, options) {
  let resp;
  try {
    resp = await fetch(path, options);
  } catch (e) {
    throw new Error("the server cannot be reached (" + e.message + ")");
  }
  let body = null;
  try { body = await resp.json(); } catch (e) { body = null; }
  if (!resp.ok) {
    const msg = body && body.error ? body.error : "request failed (HTTP " + resp.status + ")";
    throw new Error(msg);
  }
  return body;
}

async function refreshInfo() {
  try {
    const info = await api("/api/info");
    $("info").textContent = "model: " + info.model + " · " + info.passages + " passages in memory · uploads up to " +
      fmtBytes(info.max_upload_bytes) + " (" + info.extensions.join(", ") + ")";
  } catch (e) {
    $("info").textContent = "server unavailable: " + e.message;
  }
}

async function refreshDocs() {
  const list = $("doc-list");
  try {
    const data = await api("/api/documents");
    list.replaceChildren();
    for (const d of data.documents) {
      const li = el("li", { "data-doc": d.id });
      li.append(el("span", { class: "title" }, d.title));
      const ratio = d.ratio ? d.ratio.toFixed(1) + "x · " + d.passages + (d.passages === 1 ? " passage" : " passages")
        : d.passages + (d.passages === 1 ? " passage" : " passages");
      li.append(el("span", { class: "ratio" }, ratio));
      list.append(li);
    }
  } catch (e) {
    /* the message line already says what failed */
  }
}

function busy(button, on) { button.disabled = on; }

function describeAdded(added, rejected) {
  const parts = added.map((d) => "added " + d.title + " (" + d.passages + (d.passages === 1 ? " passage, " : " passages, ") +
    (d.ratio ? d.ratio.toFixed(1) + "x compressed" : "compressed") + ")");
  for (const r of rejected || []) parts.push("rejected " + r.error);
  return parts.join("\n");
}

$("upload-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const input = $("file-input");
  const msg = $("doc-message");
  if (!input.files.length) { setMessage(msg, "choose a .txt or .md file first", "error"); return; }
  const form = new FormData();
  for (const f of input.files) form.append("files", f, f.name);
  busy($("upload-button"), true);
  setMessage(msg, "compressing…", "");
  try {
    const res = await api("/api/upload", { method: "POST", body: form });
    setMessage(msg, describeAdded(res.added, res.rejected), res.rejected.length ? "error" : "ok");
    input.value = "";
  } catch (e) {
    setMessage(msg, e.message, "error");
  } finally {
    busy($("upload-button"), false);
    refreshDocs(); refreshInfo();
  }
});

$("paste-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const msg = $("doc-message");
  const text = $("paste-text").value;
  if (!text.trim()) { setMessage(msg, "paste some text first", "error"); return; }
  busy($("paste-button"), true);
  setMessage(msg, "compressing…", "");
  try {
    const d = await api("/api/documents", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ title: $("paste-title").value, text: text }),
    });
    setMessage(msg, describeAdded([d], []), "ok");
    $("paste-text").value = ""; $("paste-title").value = "";
  } catch (e) {
    setMessage(msg, e.message, "error");
  } finally {
    busy($("paste-button"), false);
    refreshDocs(); refreshInfo();
  }
});

$("ask-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const msg = $("ask-message");
  const question = $("question").value.trim();
  if (!question) { setMessage(msg, "type a question first", "error"); return; }
  busy($("ask-button"), true);
  setMessage(msg, "thinking…", "");
  try {
    const res = await api("/api/ask", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ question: question, full_answer: $("full-answer").checked }),
    });
    setMessage(msg, "", "");
    renderResult(res);
  } catch (e) {
    setMessage(msg, e.message, "error");
  } finally {
    busy($("ask-button"), false);
  }
});

function stat(value, label) {
  const box = el("div", { class: "stat" });
  box.append(el("span", { class: "v" }, value), el("span", { class: "k" }, label));
  return box;
}

function renderResult(res) {
  $("result").hidden = false;
  $("answer").textContent = res.answer && res.answer.trim() ? res.answer : "(empty answer)";
  const fullBlock = $("full-answer-block");
  fullBlock.hidden = !res.full_answer;
  $("full-answer-text").textContent = res.full_answer || "";

  const g = res.gist, f = res.full;
  const stats = $("stats");
  stats.replaceChildren();
  stats.append(stat(res.ratio ? res.ratio.toFixed(1) + "x" : "–", "compression ratio (" + res.raw_tokens +
    " tokens → " + res.kept_rows + " rows)"));
  stats.append(stat(fmtInt(g.positions) + (f ? " / " + fmtInt(f.positions) : ""), "positions read (gist / full)"));
  stats.append(stat(fmtBytes(g.kv_bytes) + (f ? " / " + fmtBytes(f.kv_bytes) : ""), "KV memory (gist / full)"));
  stats.append(stat(fmtMs(g.ttft_s) + (f ? " / " + fmtMs(f.ttft_s) : ""), "time to first token (gist / full)"));
  renderChart(res);

  const list = $("sources");
  list.replaceChildren();
  for (const s of res.sources) {
    const li = el("li", { "data-source": s.id });
    li.append(el("span", { class: "src-title" }, s.title));
    li.append(el("span", { class: "src-score" }, "score " + Number(s.score).toFixed(2)));
    const t = s.text.length > 400 ? s.text.slice(0, 399) + "…" : s.text;
    li.append(el("span", { class: "src-text" }, t));
    list.append(li);
  }
}

// horizontal bars: for each metric, gist states (blue) above full text (grey), scaled to the larger of the two
function renderChart(res) {
  const box = $("chart");
  box.replaceChildren();
  const g = res.gist, f = res.full;
  const metrics = [
    ["KV memory", g.kv_bytes, f ? f.kv_bytes : null, fmtBytes],
    ["time to first token", g.ttft_s, f ? f.ttft_s : null, fmtMs],
    ["positions read", g.positions, f ? f.positions : null, fmtInt],
  ];
  const W = 640, left = 150, right = 70, barH = 16, gap = 4, groupH = 2 * barH + gap + 18, top = 30;
  const H = top + metrics.length * groupH + 6;
  const root = svg("svg", { viewBox: "0 0 " + W + " " + H, role: "img" });
  root.append(svg("title", {}, "KV memory and time to first token: gist states vs full text"));
  // legend
  root.append(svg("rect", { x: left, y: 6, width: 12, height: 12, class: "swatch gist" }));
  root.append(svg("text", { x: left + 18, y: 16 }, "gist states"));
  root.append(svg("rect", { x: left + 110, y: 6, width: 12, height: 12, class: "swatch full" }));
  root.append(svg("text", { x: left + 128, y: 16 }, "full text in the prompt"));
  const span = W - left - right;
  metrics.forEach(([label, gv, fv, fmt], i) => {
    const y0 = top + i * groupH;
    const max = Math.max(gv || 0, fv || 0) || 1;
    root.append(svg("text", { x: 0, y: y0 + barH + 2 }, label));
    const wg = Math.max(1, (span - 80) * (gv || 0) / max);
    root.append(svg("rect", { x: left, y: y0, width: wg, height: barH, class: "bar gist", "data-metric": label }));
    root.append(svg("text", { x: left + wg + 6, y: y0 + barH - 4 }, fmt(gv || 0)));
    if (fv !== null && fv !== undefined) {
      const wf = Math.max(1, (span - 80) * fv / max);
      root.append(svg("rect", { x: left, y: y0 + barH + gap, width: wf, height: barH, class: "bar full",
        "data-metric": label }));
      root.append(svg("text", { x: left + wf + 6, y: y0 + 2 * barH + gap - 4 }, fmt(fv)));
      if (fv > 0) {
        const pct = Math.round(100 * (gv - fv) / fv);
        root.append(svg("text", { x: W - 4, y: y0 + barH + 6, "text-anchor": "end", class: pct > 0 ? "delta worse" : "delta" },
          (pct > 0 ? "+" : "") + pct + "%"));
      }
    }
  });
  box.append(root);
}

refreshInfo();
refreshDocs();
