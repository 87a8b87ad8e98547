// mlx-listen viewer: draws one answer's record (window.RECORD, embedded in the page) with no
// library and no network. Every panel reads only the record; a missing part hides its panel.
"use strict";

const R = window.RECORD;

// A perceptual-ish ramp (dark blue -> teal -> yellow), for values in [0, 1].
function ramp(t) {
  t = Math.max(0, Math.min(1, t));
  const stops = [[13, 8, 135], [84, 2, 163], [139, 10, 165], [185, 50, 137], [219, 92, 104],
                 [244, 136, 73], [254, 188, 43], [240, 249, 33]];
  const x = t * (stops.length - 1), i = Math.min(stops.length - 2, Math.floor(x)), f = x - i;
  return stops[i].map((c, k) => Math.round(c + f * (stops[i + 1][k] - c)));
}
const rgb = (c) => `rgb(${c[0]},${c[1]},${c[2]})`;
const fmt = (x, d = 3) => (x === null || x === undefined || Number.isNaN(x)) ? "–" : Number(x).toFixed(d);

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v; else if (k === "style") e.style.cssText = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}

function panel(id, title, note) {
  const p = el("section", {class: "panel", id});
  p.append(el("h2", {}, title));
  if (note) p.append(el("p", {class: "note"}, note));
  document.getElementById("panels").append(p);
  return p;
}

function canvas(parent, w, h, cls = "") {
  const c = el("canvas", {width: w, height: h, class: cls});
  parent.append(c);
  return c.getContext("2d");
}

function decodeBytes(b64) {
  const s = atob(b64), out = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
  return out;
}

// -- the clip: waveform, log-mel, audio-token strip ------------------------------------------------
function drawClip() {
  const clip = R.clip;
  if (!clip) return;
  const p = panel("clip", `Audio: ${clip.name}`,
    `${fmt(clip.duration, 2)} s, ${clip.audio_tokens} audio tokens (${fmt(clip.seconds_per_token * 1000, 0)} ms each)` +
    (clip.seconds_used < clip.duration ? `; the model sees the first ${fmt(clip.seconds_used, 1)} s` : ""));
  const W = 900;
  const wave = canvas(p, W, 90, "wave");
  const env = clip.waveform, n = env.min.length;
  wave.fillStyle = "#2b6cb0";
  for (let i = 0; i < n; i++) {
    const x = i * W / n, top = 45 - env.max[i] * 44, bot = 45 - env.min[i] * 44;
    wave.fillRect(x, top, Math.max(1, W / n), Math.max(1, bot - top));
  }
  if (clip.mel) {
    const m = clip.mel, img = decodeBytes(m.data), H = m.n_mels;
    const ctx = canvas(p, m.frames, H, "mel");
    const data = ctx.createImageData(m.frames, H);
    for (let f = 0; f < m.frames; f++) {
      for (let b = 0; b < H; b++) {
        const c = ramp(img[f * H + b] / 255), o = ((H - 1 - b) * m.frames + f) * 4;
        data.data[o] = c[0]; data.data[o + 1] = c[1]; data.data[o + 2] = c[2]; data.data[o + 3] = 255;
      }
    }
    ctx.putImageData(data, 0, 0);
    ctx.canvas.style.width = W + "px";
    ctx.canvas.style.height = "128px";
  }
  const strip = canvas(p, W, 14, "strip");
  for (let t = 0; t < clip.audio_tokens; t++) {
    strip.fillStyle = t % 2 ? "#cbd5e0" : "#a0aec0";
    strip.fillRect(t * W / clip.audio_tokens, 0, W / clip.audio_tokens, 14);
  }
  p.append(el("p", {class: "caption"}, "waveform · log-mel the model reads · one cell per audio token"));
}

// -- the answer, each token coloured by its listening score ----------------------------------------
function drawAnswer() {
  const a = R.answers && R.answers.audio;
  if (!a) return;
  const lis = R.listening;
  const p = panel("answer", "Answer, coloured by the listening score",
    lis ? `mean audio attention of ${lis.heads.length} specialist heads at the position that chose each token; ` +
          `at the last prompt token ${fmt(lis.at_T, 4)}` : "no head set: tokens uncoloured");
  const q = el("p", {class: "question"}, el("b", {}, "Q: "), R.question);
  p.append(q);
  const line = el("p", {class: "tokens"});
  const vals = a.tokens.map((t) => t.listening).filter((v) => v !== null && v !== undefined);
  const lo = Math.min(...vals), hi = Math.max(...vals);
  for (const t of a.tokens) {
    const s = el("span", {class: "tok", title: `listening ${fmt(t.listening, 4)}`}, t.text);
    if (t.listening !== null && t.listening !== undefined && hi > lo) {
      const c = ramp((t.listening - lo) / (hi - lo));
      s.style.background = rgb(c);
      s.style.color = (c[0] + c[1] + c[2]) / 3 > 140 ? "#111" : "#fff";
    }
    line.append(s);
  }
  p.append(line);
  if (vals.length > 1) drawScoreLine(p, a.tokens.map((t) => t.listening), lo, hi);
}

function drawScoreLine(parent, ys, lo, hi) {
  const W = 900, H = 120, pad = 30, ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("width", W); svg.setAttribute("height", H); svg.setAttribute("class", "score");
  const x = (i) => pad + i * (W - 2 * pad) / Math.max(1, ys.length - 1);
  const y = (v) => H - pad / 2 - (v - lo) / Math.max(1e-12, hi - lo) * (H - pad);
  const pts = ys.map((v, i) => `${x(i)},${y(v)}`).join(" ");
  const line = document.createElementNS(ns, "polyline");
  line.setAttribute("points", pts); line.setAttribute("fill", "none"); line.setAttribute("stroke", "#2b6cb0");
  line.setAttribute("stroke-width", "2");
  svg.append(line);
  for (const [v, label] of [[hi, fmt(hi, 4)], [lo, fmt(lo, 4)]]) {
    const t = document.createElementNS(ns, "text");
    t.setAttribute("x", 2); t.setAttribute("y", y(v) + 4); t.setAttribute("font-size", "10");
    t.textContent = label;
    svg.append(t);
  }
  parent.append(svg);
  parent.append(el("p", {class: "caption"}, "listening score at each answer token"));
}

// -- where in the clip the answer looked ----------------------------------------------------------
function drawAttention() {
  const att = R.attention;
  if (!att || !att.data.length) return;
  const p = panel("attention", "Where in the clip each answer token looked",
    `attention of the specialist heads (mean) from each answer token onto the audio tokens, each row scaled to its own maximum`);
  const rows = att.data.length, cols = att.data[0].length, left = 90;
  const cell = Math.max(2, Math.floor((900 - left) / cols)), rh = 14;
  const ctx = canvas(p, left + cols * cell, rows * rh, "attn");
  ctx.font = "11px ui-monospace, monospace"; ctx.textBaseline = "middle";
  att.data.forEach((row, r) => {
    const mx = Math.max(...row, 1e-12);
    row.forEach((v, c) => { ctx.fillStyle = rgb(ramp(v / mx)); ctx.fillRect(left + c * cell, r * rh, cell, rh - 1); });
    ctx.fillStyle = "#2d3748";
    ctx.fillText(JSON.stringify(att.tokens[r] || "").slice(0, 12), 2, r * rh + rh / 2);
  });
  p.append(el("p", {class: "caption"}, "rows: answer tokens (top first) · columns: audio tokens, in time"));
}

// -- every head's audio mass -----------------------------------------------------------------------
function drawMass() {
  const m = R.audio_mass;
  if (!m) return;
  const p = panel("mass", "Audio attention mass, layer × head, at the last prompt token",
    "share of each head's attention on the audio tokens; specialist heads outlined");
  const L = m.data.length, H = m.data[0].length, cs = Math.max(10, Math.min(32, Math.floor(600 / Math.max(H, L))));
  const ctx = canvas(p, H * cs + 40, L * cs + 20, "massmap");
  const hi = Math.max(...m.data.flat(), 1e-12);
  m.data.forEach((row, l) => row.forEach((v, h) => {
    ctx.fillStyle = rgb(ramp(v / hi)); ctx.fillRect(36 + h * cs, l * cs, cs - 1, cs - 1);
  }));
  ctx.strokeStyle = "#e53e3e"; ctx.lineWidth = 2;
  for (const [l, h] of (m.specialist || [])) ctx.strokeRect(36 + h * cs, l * cs, cs - 1, cs - 1);
  ctx.fillStyle = "#333"; ctx.font = "10px sans-serif";
  for (let l = 0; l < L; l += Math.max(1, Math.floor(L / 8))) ctx.fillText(`L${l}`, 2, l * cs + cs / 2 + 4);
  p.append(el("p", {class: "caption"}, `max ${fmt(hi, 3)} · rows: layers · columns: heads`));
}

// -- the answers side by side ---------------------------------------------------------------------
function drawCompare() {
  const ans = R.answers;
  if (!ans) return;
  const names = Object.keys(ans);
  const p = panel("compare", "The same question, answered four ways",
    "with the audio, with equal-length silence, steered (audio–silence direction), with the specialist heads ablated");
  const table = el("table", {class: "compare"});
  const head = el("tr", {}, el("th", {}, ""), ...names.map((n) => el("th", {}, n)));
  table.append(head);
  table.append(el("tr", {}, el("td", {}, "answer"), ...names.map((n) => el("td", {class: "ans"}, ans[n].text))));
  if (R.choices) {
    const share = {};  // each condition's probabilities renormalised over the choices
    for (const n of names) {
      const lp = ans[n].option_logprobs;
      if (!lp) continue;
      const top = Math.max(...lp), e = lp.map((v) => Math.exp(v - top)), z = e.reduce((a, b) => a + b, 0);
      share[n] = e.map((v) => v / z);
    }
    R.choices.forEach((choice, i) => {
      const row = el("tr", {}, el("td", {}, choice));
      for (const n of names) {
        const lp = ans[n].option_logprobs ? ans[n].option_logprobs[i] : null;
        const q = share[n] ? share[n][i] : 0;
        const best = share[n] && q === Math.max(...share[n]);
        const bar = el("div", {class: "bar", style: `width:${Math.max(1, 100 * q)}%`});
        row.append(el("td", {class: best ? "best" : ""}, bar,
                      el("span", {}, lp === null ? "–" : `${fmt(lp, 2)} (${fmt(100 * q, 0)}%)`)));
      }
      table.append(row);
    });
    p.append(el("p", {class: "note"}, "each choice's log-probability in the prompt's answer format, and (bars) its share among the choices; the best bold"));
  }
  p.append(table);
}

function drawFooter() {
  const f = document.getElementById("provenance"), pv = R.provenance || {};
  const parts = Object.entries(pv).map(([k, v]) => `${k}: ${typeof v === "object" ? JSON.stringify(v) : v}`);
  f.textContent = parts.join(" · ");
}

function main() {
  document.getElementById("title").textContent = R.title || "mlx-listen";
  drawClip(); drawAnswer(); drawAttention(); drawMass(); drawCompare(); drawFooter();
  document.body.dataset.rendered = "yes";
}

main();
