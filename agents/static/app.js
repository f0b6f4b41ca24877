// vidmem live page: camera frames out as JPEG over a websocket, questions in, answers streamed back.
// Protocol (DESIGN.md): binary = one JPEG; text {"type":"ask",...}; replies ack/token/answer/event/error.
"use strict";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const token = params.get("token");  // passed on to the websocket (?token=), never stored
const MAX_SIDE = 640;  // frames are scaled down to at most this many pixels on their longer side
const MAX_BUFFERED = 1 << 20;  // skip a frame while this many bytes are still waiting to be sent

const ui = {
  state: $("state"), preview: $("preview"), grab: $("grab"), stream: $("stream"), fps: $("fps"),
  start: $("start"), stop: $("stop"), counters: $("counters"), question: $("question"), ask: $("ask"),
  answer: $("answer"), cited: $("cited"), events: $("events"), log: $("log"),
};
const live = {
  ws: null, media: null, timer: null, running: false, retry: 0, asked: 0, current: null,
  sent: 0, skipped: 0, frames: 0, dropped: 0, segments: 0,
};
window.vidmem = live;  // for debugging from the console (and for tests)

if (params.get("stream")) ui.stream.value = params.get("stream");
if (params.get("fps")) ui.fps.value = params.get("fps");

function setState(name, text) {
  ui.state.className = "state " + name;
  ui.state.textContent = text || name;
  ui.ask.disabled = name !== "connected";
  document.body.dataset.state = name;
}

function note(text, kind) {
  const li = document.createElement("li");
  li.textContent = new Date().toLocaleTimeString() + "  " + text;
  if (kind) li.className = kind;
  ui.log.prepend(li);
  while (ui.log.children.length > 50) ui.log.lastChild.remove();
}

function showCounters() {
  ui.counters.textContent = `frames sent ${live.sent} · stored ${live.frames - live.dropped} · ` +
    `dropped ${live.dropped + live.skipped} · segments ${live.segments}`;
}

// Live streams are stamped in unix seconds, recordings in seconds from their start.
function when(t) {
  if (t > 1e9) return new Date(t * 1000).toLocaleTimeString();
  const m = Math.floor(t / 60), s = (t % 60).toFixed(1).padStart(4, "0");
  return `${m}:${s}`;
}

function wsUrl() {
  const q = new URLSearchParams({ stream: ui.stream.value });
  if (token) q.set("token", token);
  return `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}/ws/live?${q}`;
}

function connect() {
  setState("connecting", "connecting…");
  const ws = new WebSocket(wsUrl());
  live.ws = ws;
  ws.onopen = () => { live.retry = 0; setState("connected"); note(`connected to stream ${ui.stream.value}`); };
  ws.onmessage = (e) => { if (typeof e.data === "string") onMessage(JSON.parse(e.data)); };
  ws.onclose = (e) => {
    if (live.ws !== ws) return;
    live.ws = null;
    setState("disconnected", e.code === 1006 ? "disconnected (refused or lost)" : `disconnected (${e.code})`);
    if (e.reason) note(`closed: ${e.reason}`, "error");
    if (live.current) finishAnswer("the connection closed before the answer", true);
    if (live.running) {  // reconnect with backoff: 1, 2, 4 ... 30 s
      const delay = Math.min(30, 2 ** live.retry++) * 1000;
      note(`reconnecting in ${delay / 1000} s`);
      setTimeout(() => { if (live.running && !live.ws) connect(); }, delay);
    }
  };
}

function onMessage(m) {
  switch (m.type) {
    case "ack":
      live.frames = m.frames; live.dropped = m.dropped; live.segments = m.segments ?? live.segments;
      showCounters();
      break;
    case "token":
      if (live.current === m.id) {
        if (ui.answer.classList.contains("pending")) { ui.answer.textContent = ""; ui.answer.classList.remove("pending"); }
        ui.answer.textContent += m.text;
      }
      break;
    case "answer":
      if (live.current !== m.id) break;
      ui.answer.textContent = m.text;
      ui.cited.replaceChildren(...m.segments.map((s) => {
        const li = document.createElement("li");
        li.textContent = `${when(s.start)} – ${when(s.end)} (${s.tokens} tokens${s.level ? ", " + s.level : ""})`;
        return li;
      }));
      finishAnswer(null, false);
      note(`answered from ${m.segments.length} segments, ${m.visual_tokens} visual tokens, ` +
           `first token after ${(m.ttft_seconds ?? 0).toFixed(2)} s`);
      break;
    case "event": {
      const first = ui.events.querySelector(".empty");
      if (first) first.remove();
      const ev = m.event || m;
      const li = document.createElement("li");
      const at = ev.start_time ? when(ev.start_time) : new Date().toLocaleTimeString();
      li.textContent = `${at}  ${m.kind || m.event_type || ""} ${ev.rule || ""}: ${ev.description || ""}`.replace(/\s+/g, " ");
      ui.events.prepend(li);
      break;
    }
    case "error":
      note(`${m.code}: ${m.message}`, "error");
      if (m.id && live.current === m.id) finishAnswer(m.message, true);
      break;
  }
}

function finishAnswer(error, failed) {
  live.current = null;
  ui.answer.classList.remove("pending");
  if (failed) { ui.answer.classList.add("error"); ui.answer.textContent = error; }
  ui.ask.disabled = !(live.ws && live.ws.readyState === WebSocket.OPEN);
  document.body.dataset.answered = String(Number(document.body.dataset.answered || 0) + 1);
}

function sendFrame() {
  const ws = live.ws, video = ui.preview;
  if (!ws || ws.readyState !== WebSocket.OPEN || !video.videoWidth) return;
  if (ws.bufferedAmount > MAX_BUFFERED) { live.skipped++; showCounters(); return; }  // the network is behind
  const scale = Math.min(1, MAX_SIDE / Math.max(video.videoWidth, video.videoHeight));
  const w = Math.round(video.videoWidth * scale), h = Math.round(video.videoHeight * scale);
  ui.grab.width = w; ui.grab.height = h;
  ui.grab.getContext("2d").drawImage(video, 0, 0, w, h);
  const taken = Date.now() / 1000;
  ui.grab.toBlob((blob) => {
    if (!blob || ws.readyState !== WebSocket.OPEN) return;
    ws.send(JSON.stringify({ type: "frame", ts: taken }));
    ws.send(blob);
    live.sent++;
    showCounters();
  }, "image/jpeg", 0.8);
}

async function start(event) {
  event.preventDefault();
  if (live.running) return;
  try {
    live.media = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480 }, audio: false });
  } catch (err) {
    note(`camera unavailable: ${err.message}`, "error");
    return;
  }
  ui.preview.srcObject = live.media;
  live.running = true;
  ui.start.disabled = true; ui.stop.disabled = false; ui.stream.disabled = true;
  connect();
  live.timer = setInterval(sendFrame, 1000 / Number(ui.fps.value));
}

function stop() {
  live.running = false;
  clearInterval(live.timer);
  if (live.media) live.media.getTracks().forEach((t) => t.stop());
  if (live.ws) live.ws.close(1000, "stopped");
  ui.start.disabled = false; ui.stop.disabled = true; ui.stream.disabled = false;
}

function ask(event) {
  event.preventDefault();
  const question = ui.question.value.trim();
  if (!question || !live.ws || live.ws.readyState !== WebSocket.OPEN) return;
  live.current = `q${++live.asked}`;
  live.ws.send(JSON.stringify({ type: "ask", id: live.current, question, budget: 6000 }));
  ui.answer.className = "answer pending";
  ui.answer.textContent = "thinking…";
  ui.cited.replaceChildren();
  ui.ask.disabled = true;
}

ui.fps.addEventListener("change", () => {
  if (!live.running) return;
  clearInterval(live.timer);
  live.timer = setInterval(sendFrame, 1000 / Number(ui.fps.value));
});
$("camera-form").addEventListener("submit", start);
ui.stop.addEventListener("click", stop);
$("ask-form").addEventListener("submit", ask);
setState("disconnected");
