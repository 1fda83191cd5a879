// The browser voice page: sign in, pick a persona, talk (hands-free or press
// to talk) or type, hear the reply, interrupt it. Native protocol at /ws/voice
// (docs/protocol.md); no build step, no dependencies.

import { Capture, MicDeniedError, Player, INPUT_RATE, FRAME_MS } from "./audio.js";
import { createTestHook } from "./test-hook.js";

const OUTPUT_RATE = 24000;
const $ = (id) => document.getElementById(id);
const store = window.sessionStorage;

const state = {
  token: store.getItem("va.token"),
  sessionId: store.getItem("va.session"),
  persona: store.getItem("va.persona"),
  ws: null,
  open: false, // hello answered
  wanted: false, // the user wants a connection (reconnect when it drops)
  attempt: 0,
  reconnectTimer: null,
  goodbye: null, // the server's `goodbye` (it is restarting): close 1012 follows, then we resume
  mode: "off",
  pttDown: false,
  outputRate: OUTPUT_RATE,
  lastAudioTurn: null,
  cutTurns: new Set(),
  turns: new Map(),
  pendingTyped: [],
  language: "en",
};

const player = new Player();
const capture = new Capture(onMicFrame);

// ------------------------------------------------------------------ test hook
// Recordings for the browser tests, only on a page opened with ?test=1 (web/test-hook.js).
const hook = createTestHook({ player, state });

// ------------------------------------------------------------------ UI helpers
function notice(text, kind = "info") {
  const el = $("notice");
  el.textContent = text;
  el.dataset.kind = kind;
  el.hidden = !text;
}

function status(text, st) {
  const el = $("conn-status");
  el.textContent = text;
  el.dataset.state = st;
}

function showLogin(message) {
  $("app").hidden = true;
  $("login").hidden = false;
  $("logout").hidden = true;
  $("whoami").textContent = "";
  const m = $("login-message");
  m.textContent = message || "";
  m.hidden = !message;
  const local = ["localhost", "127.0.0.1", "[::1]", "::1"].includes(location.hostname);
  $("dev-login").hidden = !local;
}

function showApp() {
  $("login").hidden = true;
  $("app").hidden = false;
  $("logout").hidden = !state.token;
}

function turnView(turnId) {
  let t = state.turns.get(turnId);
  if (t) return t;
  const block = document.createElement("article");
  block.className = "turn";
  block.dataset.turn = String(turnId);
  const user = document.createElement("p");
  user.className = "user";
  const reply = document.createElement("p");
  reply.className = "reply";
  reply.lang = state.language;
  const meta = document.createElement("p");
  meta.className = "meta";
  block.append(user, reply, meta);
  $("log").append(block);
  t = { block, user, reply, meta, heard: false, replied: false };
  state.turns.set(turnId, t);
  return t;
}

function scrollLog() {
  const log = $("log");
  log.scrollTop = log.scrollHeight;
}

function typedLine(text) {
  // shown at once; bound to the turn id of the reply when it arrives
  const block = document.createElement("article");
  block.className = "turn";
  const user = document.createElement("p");
  user.className = "user typed";
  user.textContent = text;
  block.append(user);
  $("log").append(block);
  state.pendingTyped.push({ block, user });
  scrollLog();
}

function adoptTyped(turnId) {
  if (state.turns.has(turnId) || !state.pendingTyped.length) return;
  const { block, user } = state.pendingTyped.shift();
  block.dataset.turn = String(turnId);
  const reply = document.createElement("p");
  reply.className = "reply";
  reply.lang = state.language;
  const meta = document.createElement("p");
  meta.className = "meta";
  block.append(reply, meta);
  state.turns.set(turnId, { block, user, reply, meta, heard: true, replied: false });
}

// ------------------------------------------------------------------ HTTP
class AuthFailure extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (state.token) headers.Authorization = `Bearer ${state.token}`;
  const r = await fetch(path, { ...options, headers, cache: "no-store" });
  let body = null;
  try {
    body = await r.json();
  } catch (_) {
    /* not JSON */
  }
  if (r.status === 401) {
    const err = (body && body.error) || {};
    throw new AuthFailure(err.code || "auth.failed", err.message || "authentication failed");
  }
  if (!r.ok) {
    const err = (body && body.error) || {};
    const e = new Error(err.message || `HTTP ${r.status}`);
    e.code = err.code;
    e.status = r.status;
    throw e;
  }
  return body;
}

function authMessage(code) {
  if (code === "auth.expired" || code === "auth.token_expired") return "Your sign-in has expired. Please sign in again.";
  if (code === "auth.bad_token") return "Your sign-in is no longer valid. Please sign in again.";
  if (code === "auth.missing_token") return "Please sign in.";
  return `Please sign in again (${code}).`;
}

function signedOut(message) {
  disconnect(false);
  state.token = null;
  state.sessionId = null;
  store.removeItem("va.token");
  store.removeItem("va.session");
  showLogin(message);
}

async function afterLogin() {
  let me;
  try {
    me = await api("/api/auth/me");
  } catch (e) {
    if (e instanceof AuthFailure) return signedOut(state.token ? authMessage(e.code) : "");
    showLogin(`The server did not answer (${e.message}).`);
    return;
  }
  $("whoami").textContent = me.kind === "anonymous" ? "auth off" : `signed in as ${me.subject}`;
  showApp();
  try {
    const roles = await api("/api/roles");
    const sel = $("persona");
    sel.replaceChildren();
    for (const r of roles.roles) {
      const opt = document.createElement("option");
      opt.value = r.id;
      opt.textContent = `${r.name} (${r.id})`;
      opt.dataset.language = r.language || "en";
      opt.title = r.description || "";
      sel.append(opt);
    }
    const wanted = roles.roles.some((r) => r.id === state.persona) ? state.persona : roles.default;
    if (wanted) sel.value = wanted;
    state.persona = sel.value;
    updateLanguage();
  } catch (e) {
    if (e instanceof AuthFailure) return signedOut(authMessage(e.code));
    notice(`Could not load the personas: ${e.message}`, "error");
  }
}

function updateLanguage() {
  const opt = $("persona").selectedOptions[0];
  state.language = (opt && opt.dataset.language) || "en";
}

async function login(ev) {
  ev.preventDefault();
  const body = JSON.stringify({ username: $("username").value, password: $("password").value });
  try {
    const r = await fetch("/api/auth/login", { method: "POST", headers: { "Content-Type": "application/json" }, body });
    const data = await r.json().catch(() => ({}));
    if (!r.ok) {
      const err = data.error || {};
      const text = err.code === "auth.bad_credentials" ? "Wrong user name or password." : err.message || `HTTP ${r.status}`;
      return showLogin(text);
    }
    useToken(data.access_token);
  } catch (e) {
    showLogin(`The server did not answer (${e.message}).`);
  }
}

async function devLogin() {
  try {
    const r = await fetch("/api/auth/dev-token", { cache: "no-store" });
    const data = await r.json().catch(() => ({}));
    if (!r.ok) return showLogin((data.error && data.error.message) || `HTTP ${r.status}`);
    useToken(data.access_token);
  } catch (e) {
    showLogin(`The server did not answer (${e.message}).`);
  }
}

function useToken(token) {
  state.token = token;
  store.setItem("va.token", token);
  $("password").value = "";
  afterLogin();
}

// ------------------------------------------------------------------ socket
function wsUrl() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const q = state.token ? `?token=${encodeURIComponent(state.token)}` : "";
  return `${scheme}//${location.host}/ws/voice${q}`;
}

async function connect() {
  await player.unlock();
  state.wanted = true;
  openSocket();
}

function openSocket() {
  clearTimeout(state.reconnectTimer);
  if (state.ws) return;
  const reconnecting = state.attempt > 0;
  status(reconnecting ? "reconnecting…" : "connecting…", "connecting");
  const ws = new WebSocket(wsUrl());
  ws.binaryType = "arraybuffer";
  state.ws = ws;
  ws.onopen = () => {
    const hello = {
      type: "hello",
      version: 1,
      audio: { format: "pcm16", sample_rate: INPUT_RATE, channels: 1, frame_ms: FRAME_MS },
      output: { format: "pcm16", sample_rate: OUTPUT_RATE },
    };
    if (state.persona) hello.persona = state.persona;
    if (state.sessionId) hello.session_id = state.sessionId;
    ws.send(JSON.stringify(hello));
  };
  ws.onmessage = (ev) => {
    if (ws !== state.ws) return;
    if (typeof ev.data === "string") onEvent(JSON.parse(ev.data), reconnecting);
    else onAudio(ev.data);
  };
  ws.onclose = (ev) => {
    if (ws !== state.ws) return;
    state.ws = null;
    state.open = false;
    onClosed(ev.code, ev.reason);
  };
  updateButtons();
}

function onClosed(code, reason) {
  updateButtons();
  if (code === 4401) {
    // the token expired or was refused while connecting
    signedOut(authMessage(reason || "auth.expired"));
    return;
  }
  if (!state.wanted) {
    state.goodbye = null;
    status("not connected", "idle");
    return;
  }
  if (code === 4404 && reason === "session.not_found") {
    state.sessionId = null; // not ours (any more): start a fresh session
    store.removeItem("va.session");
  } else if ([4400, 4403, 4404, 4408, 4409].includes(code)) {
    state.wanted = false;
    const why = {
      4408: "The connection was closed after a long silence. Press Connect to go on.",
      4409: "This session was taken over by another connection.",
    }[code];
    status("not connected", "idle");
    notice(why || `The server closed the connection: ${reason || code}.`, "error");
    return;
  }
  state.attempt += 1;
  if (code === 1012 || state.goodbye) {
    // an upgrade drained the server we were on (docs/protocol.md, "Server restarts"): come back
    // after its hint, jittered so a whole replica's pages do not knock at once, on whichever serves next
    const hint = Number(state.goodbye && state.goodbye.retry_after_ms);
    const base = Number.isFinite(hint) && hint >= 0 && hint <= 30000 ? hint : 500;
    const wait = Math.max(base, state.attempt > 1 ? Math.min(10000, 500 * 2 ** (state.attempt - 2)) : 0);
    const delay = wait * (0.8 + 0.4 * Math.random());
    state.goodbye = null;
    status(`server restarting — reconnecting in ${(delay / 1000).toFixed(1)} s`, "reconnecting");
    notice("The server is restarting; reconnecting and resuming the conversation…", "warn");
    state.reconnectTimer = setTimeout(openSocket, delay);
    return;
  }
  const delay = Math.min(10000, 500 * 2 ** (state.attempt - 1)) * (0.8 + 0.4 * Math.random());
  status(`connection lost — reconnecting in ${(delay / 1000).toFixed(1)} s (attempt ${state.attempt})`, "reconnecting");
  notice("The connection dropped; reconnecting and resuming the conversation…", "warn");
  state.reconnectTimer = setTimeout(openSocket, delay);
}

function disconnect(show = true) {
  state.wanted = false;
  clearTimeout(state.reconnectTimer);
  state.attempt = 0;
  if (state.ws) {
    const ws = state.ws;
    state.ws = null;
    state.open = false;
    ws.close(1000, "bye");
  }
  player.stopAll();
  if (show) status("not connected", "idle");
  updateButtons();
}

function send(obj) {
  if (state.ws && state.open) {
    state.ws.send(JSON.stringify(obj));
    hook.sent(obj);
    return true;
  }
  return false;
}

function updateButtons() {
  const on = !!state.ws;
  $("connect").hidden = on || state.wanted;
  $("disconnect").hidden = !(on || state.wanted);
}

// ------------------------------------------------------------------ server events
function stopPlayback(reason) {
  if (state.lastAudioTurn !== null) state.cutTurns.add(state.lastAudioTurn);
  const n = player.stopAll();
  hook.stop({ reason, stopped: n, turn: state.lastAudioTurn, at: performance.now() });
}

function onEvent(msg, wasReconnecting) {
  hook.event(msg);
  const t = msg.type;
  if (t === "hello") {
    hook.hello(msg);
    state.open = true;
    state.sessionId = msg.session_id;
    store.setItem("va.session", msg.session_id);
    if (msg.audio_out && msg.audio_out.sample_rate) state.outputRate = msg.audio_out.sample_rate;
    state.attempt = 0;
    state.goodbye = null;
    status(`connected · session ${msg.session_id.slice(0, 8)}`, "connected");
    if (wasReconnecting) {
      notice(msg.resumed ? "Reconnected: the conversation was resumed." : "Reconnected (a new session started).", "info");
    } else {
      notice("");
    }
    if (state.mode === "ptt") send({ type: "listen", state: "stop", mode: "manual" });
    updateButtons();
    return;
  }
  const turnId = msg.turn_id;
  switch (t) {
    case "vad.speech_start":
      if (player.playing) stopPlayback("speech");
      $("mic-level").dataset.speech = "1";
      break;
    case "vad.speech_end":
      delete $("mic-level").dataset.speech;
      break;
    case "stt.partial": {
      const v = turnView(turnId);
      v.user.textContent = msg.text;
      v.user.classList.add("partial");
      scrollLog();
      break;
    }
    case "stt.final": {
      const v = turnView(turnId);
      v.user.textContent = msg.text;
      v.user.classList.remove("partial");
      v.heard = true;
      scrollLog();
      break;
    }
    case "llm.delta": {
      adoptTyped(turnId);
      const v = turnView(turnId);
      v.reply.textContent += msg.text;
      v.replied = true;
      scrollLog();
      break;
    }
    case "tts.start":
      if (msg.sample_rate) state.outputRate = msg.sample_rate;
      break;
    case "tts.stop":
      if (msg.reason === "interrupted") {
        state.cutTurns.add(turnId);
        if (state.lastAudioTurn === turnId && player.playing) stopPlayback("tts.stop");
        const v = state.turns.get(turnId);
        if (v) v.block.classList.add("interrupted");
      }
      break;
    case "metrics": {
      adoptTyped(turnId);
      const v = turnView(turnId);
      const parts = [];
      if (typeof msg.first_audio_ms === "number") parts.push(`first audio ${Math.round(msg.first_audio_ms)} ms`);
      if (typeof msg.stt_final_ms === "number") parts.push(`transcript ${Math.round(msg.stt_final_ms)} ms`);
      if (msg.interrupted) parts.push("interrupted");
      v.meta.textContent = parts.join(" · ");
      v.meta.dataset.firstAudioMs = msg.first_audio_ms == null ? "" : String(msg.first_audio_ms);
      break;
    }
    case "goodbye":
      // the server is restarting (an upgrade): the socket closes with 1012 next; onClosed resumes
      state.goodbye = msg;
      status("server restarting — reconnecting…", "reconnecting");
      notice("The server is restarting; reconnecting and resuming the conversation…", "warn");
      break;
    case "error":
      if (msg.code === "audio.no_speech") notice("No speech was heard in that recording.", "warn");
      else if (msg.code !== "provider.failover") notice(`${msg.message || msg.code} (${msg.code})`, "error");
      if (String(msg.code).startsWith("auth.")) state.lastAuthError = msg.code;
      break;
    default:
      break;
  }
}

function onAudio(buf) {
  if (buf.byteLength < 12) return;
  const head = new DataView(buf, 0, 12);
  if (head.getUint8(0) !== 0x56 || head.getUint8(1) !== 0x41 || head.getUint8(3) !== 1) return; // "VA", PCM16
  const turnId = head.getUint32(4, false);
  if (state.cutTurns.has(turnId)) {
    hook.dropped(); // interrupted here: never play its tail
    return;
  }
  const samples = new Int16Array(buf.slice(12, 12 + ((buf.byteLength - 12) & ~1)));
  hook.audio(turnId, samples);
  state.lastAudioTurn = turnId;
  player.enqueue(samples, state.outputRate, turnId);
}

// ------------------------------------------------------------------ microphone
function onMicFrame(frame) {
  const sending = state.mode === "handsfree" || (state.mode === "ptt" && state.pttDown);
  if (sending && state.ws && state.open) {
    state.ws.send(frame);
    hook.frame();
  }
  const s = new Int16Array(frame);
  let peak = 0;
  for (let i = 0; i < s.length; i += 4) peak = Math.max(peak, Math.abs(s[i]));
  hook.micPeak(peak);
  $("mic-level").firstElementChild.style.width = `${Math.min(100, (peak / 32768) * 160)}%`;
}

async function setMode(mode) {
  await player.unlock();
  const micMessage = $("mic-message");
  if (mode !== "off") {
    try {
      await capture.start();
      micMessage.hidden = true;
    } catch (e) {
      micMessage.textContent = e instanceof MicDeniedError ? e.message : `Microphone error: ${e.message}`;
      micMessage.hidden = false;
      document.querySelector('input[name="mode"][value="off"]').checked = true;
      mode = "off";
    }
  } else {
    await capture.stop();
  }
  const before = state.mode;
  state.mode = mode;
  $("ptt").hidden = mode !== "ptt";
  if (mode === "ptt") send({ type: "listen", state: "stop", mode: "manual" });
  else if (mode === "handsfree" && before === "ptt") send({ type: "listen", state: "start", mode: "auto" });
}

function pttStart(ev) {
  ev.preventDefault();
  if (state.mode !== "ptt" || state.pttDown) return;
  // Captured, the press lasts until the finger or button is lifted: a layout
  // shift under a still pointer (a transcript line appearing) used to end it.
  if (ev.pointerId !== undefined) ev.currentTarget.setPointerCapture(ev.pointerId);
  state.pttDown = true;
  $("ptt").classList.add("down");
  stopPlayback("ptt");
  send({ type: "listen", state: "start", mode: "manual" });
}

function pttStop() {
  if (!state.pttDown) return;
  state.pttDown = false;
  $("ptt").classList.remove("down");
  send({ type: "listen", state: "stop", mode: "manual" });
}

// ------------------------------------------------------------------ actions
function interrupt() {
  player.unlock();
  stopPlayback("interrupt");
  send({ type: "interrupt" });
}

function sendText(ev) {
  ev.preventDefault();
  const input = $("text-input");
  const text = input.value.trim();
  if (!text) return;
  player.unlock();
  if (!send({ type: "text", text })) {
    notice("Not connected: press Connect first.", "warn");
    return;
  }
  stopPlayback("text"); // a typed message interrupts the reply in progress
  typedLine(text);
  input.value = "";
}

function changePersona() {
  state.persona = $("persona").value;
  store.setItem("va.persona", state.persona);
  updateLanguage();
  if (state.ws) {
    // the session goes on (same id) in the new persona's voice
    const ws = state.ws;
    state.ws = null;
    state.open = false;
    ws.close(1000, "persona");
    player.stopAll();
    openSocket();
  }
}

function init() {
  $("login-form").addEventListener("submit", login);
  $("dev-token").addEventListener("click", devLogin);
  $("logout").addEventListener("click", () => signedOut(""));
  $("connect").addEventListener("click", connect);
  $("disconnect").addEventListener("click", () => disconnect());
  $("interrupt").addEventListener("click", interrupt);
  $("text-form").addEventListener("submit", sendText);
  $("persona").addEventListener("change", changePersona);
  for (const r of document.querySelectorAll('input[name="mode"]')) {
    r.addEventListener("change", () => r.checked && setMode(r.value));
  }
  const ptt = $("ptt");
  ptt.addEventListener("pointerdown", pttStart);
  ptt.addEventListener("pointerup", pttStop);
  ptt.addEventListener("lostpointercapture", pttStop);
  ptt.addEventListener("pointercancel", pttStop);
  ptt.addEventListener("keydown", (e) => (e.key === " " || e.key === "Enter") && !e.repeat && pttStart(e));
  ptt.addEventListener("keyup", (e) => (e.key === " " || e.key === "Enter") && pttStop());
  setInterval(() => player.tick(), 250);
  afterLogin();
}

init();
