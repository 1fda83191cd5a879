// The control panel (GET /admin). Plain ES module, no build step, no library.
// Every figure comes from /api/admin/*, which checks the admin role on the server;
// this page only shows what those routes answer. Text from the server is always
// set with textContent, never parsed as HTML.

const REFRESH_MS = 5000;
const TOKEN_KEY = "voice-actors.admin-token";
const SVG_NS = "http://www.w3.org/2000/svg";
const STAGES = [
  ["first_audio", "first audio", "#2f5fd0"],
  ["stt_final", "stt final", "#1c7c43"],
  ["llm_first_token", "llm first token", "#b26a00"],
];

const $ = (id) => document.getElementById(id);
let timer = null;
let lastOverview = null;
let configShown = false;

// ------------------------------------------------------------------ helpers
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c instanceof Node ? c : String(c));
  return node;
}

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) if (v !== undefined && v !== null) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

function duration(s) {
  if (s === null || s === undefined) return "–";
  s = Math.max(0, Math.round(s));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(s / 3600)}h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
}

const clock = (t) => new Date(t * 1000).toLocaleTimeString();
const num = (v) => (v === null || v === undefined ? "–" : String(v));
const short = (id, n = 8) => (id ? String(id).slice(0, n) : "–");

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/** Thrown for an answer to a request made with a token that is no longer the
 * page's: a slow answer for the previous sign-in must not undo a newer one. */
const STALE = "client.stale_token";

async function api(method, path, body) {
  const used = token();
  const headers = { Authorization: `Bearer ${used}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let r;
  try {
    r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body),
                            cache: "no-store" });
  } catch (e) {
    throw new ApiError(0, "network", "the server could not be reached");
  }
  let data = null;
  try { data = await r.json(); } catch { /* not JSON: a proxy's error page */ }
  if (token() !== used) throw new ApiError(-1, STALE, "answer for a previous sign-in");
  if (!r.ok) {
    const err = (data && data.error) || {};
    throw new ApiError(r.status, err.code || `http.${r.status}`, err.message || r.statusText);
  }
  return data;
}

// ------------------------------------------------------------------ auth state
const token = () => sessionStorage.getItem(TOKEN_KEY) || "";

function setToken(value) {
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  else sessionStorage.removeItem(TOKEN_KEY);
}

function showMessage(text, kind = "error") {
  const m = $("message");
  m.textContent = text || "";
  m.className = kind === "info" ? "message info" : "message";
  m.hidden = !text;
}

function setStatus(text, kind) {
  const s = $("status");
  s.textContent = text;
  s.className = `status ${kind}`;
}

function signedOut(message) {
  stop();
  $("panel").hidden = true;
  $("login").hidden = false;
  $("sign-out").hidden = !token();
  $("who").textContent = "";
  setStatus("not signed in", "idle");
  showMessage(message);
}

function stop() {
  if (timer !== null) clearTimeout(timer);
  timer = null;
}

function schedule() {
  stop();
  timer = setTimeout(refresh, REFRESH_MS);
}

/** A refusal of the token itself: shown, and the refresh loop stops until a new
 * token. A refused token is forgotten, so a reload does not sign in with it again.
 * An answer for a previous token is dropped (handled, nothing shown). */
function onAuthError(e) {
  if (e.code === STALE) return true;
  if (e.status === 401) {
    const expired = e.code === "auth.expired";
    setToken("");
    signedOut(expired ? "Your token has expired. Sign in again."
                      : `Not signed in: the server refused the token (${e.code}). Sign in again.`);
    return true;
  }
  if (e.status === 403) {
    setToken("");
    signedOut("Signed in, but this needs the admin role.");
    return true;
  }
  return false;
}

async function start() {
  showMessage("");
  try {
    const me = await api("GET", "/api/auth/me");
    $("who").textContent = `${me.kind}:${me.subject}`;
  } catch (e) {
    if (onAuthError(e)) return;
  }
  $("login").hidden = true;
  $("sign-out").hidden = false;
  configShown = false;
  await refresh();
}

// ------------------------------------------------------------------ refresh
async function refresh() {
  stop();
  if (!token()) return signedOut("");
  try {
    const data = await api("GET", "/api/admin/overview");
    lastOverview = data;
    render(data);
    $("panel").hidden = false;
    $("login").hidden = true;
    showMessage("");
    setStatus(`live · updated ${new Date().toLocaleTimeString()}`, "live");
    if (!configShown) loadConfig();
  } catch (e) {
    if (onAuthError(e)) return;
    if (e.status === 429) {
      setStatus("rate limited · retrying", "unreachable");
    } else if (e.status === 0 || e.status >= 500) {
      setStatus("server unreachable · retrying", "unreachable");
      showMessage(`The server is unreachable (${e.message}); the figures below are from `
                  + `${lastOverview ? clock(lastOverview.time) : "never"}. Retrying every ${REFRESH_MS / 1000} s.`);
    } else {
      showMessage(`${e.code}: ${e.message}`);
    }
  }
  schedule();
}

async function loadConfig() {
  try {
    const cfg = await api("GET", "/api/admin/config");
    $("config").textContent = JSON.stringify(cfg, null, 2);
    configShown = true;
  } catch (e) {
    onAuthError(e);
  }
}

function render(data) {
  renderSessions(data.sessions);
  renderPools(data.pools);
  renderProviders(data.pools.providers || []);
  renderBreakers(data.breakers);
  renderWarm(data.warm_pool);
  renderErrors(data.errors);
  renderSeries(data.series);
}

// ------------------------------------------------------------------ sessions
function renderSessions(sessions) {
  const showWarm = $("show-warm").checked;
  const rows = sessions.sessions.filter((s) => showWarm || !s.warm);
  $("session-count").textContent = String(sessions.count);
  const body = $("sessions").tBodies[0];
  body.replaceChildren(...rows.map(sessionRow));
  $("sessions-empty").hidden = rows.length > 0;
}

function sessionRow(s) {
  const state = s.state || "unknown";
  return el("tr", { "data-session-id": s.session_id, class: s.warm ? "warm" : null },
    el("td", {}, el("code", { text: s.session_id })),
    el("td", { text: s.owner || (s.warm ? "(warm, unclaimed)" : "(unclaimed)") }),
    el("td", { text: s.persona || "–" }),
    el("td", {}, el("span", { class: `state ${state}`, text: state })),
    el("td", { text: num(s.turns) }),
    el("td", { text: duration(s.age_s) }),
    el("td", { text: duration(s.idle_s) }),
    el("td", { title: s.node_id || "" }, el("code", { text: short(s.node_id) })),
    el("td", { text: num(s.clients) }),
    el("td", {},
      el("button", { type: "button", class: "view", text: "transcript", onclick: () => showTranscript(s.session_id) }),
      el("button", { type: "button", class: "end danger", text: "end", onclick: () => endSession(s.session_id, false) }),
      el("button", { type: "button", class: "forget danger", text: "forget",
                     onclick: () => endSession(s.session_id, true) })));
}

async function showTranscript(id) {
  try {
    const t = await api("GET", `/api/admin/sessions/${encodeURIComponent(id)}`);
    $("transcript-id").textContent = id;
    $("transcript-meta").textContent =
      `${t.live ? "live" : "stored"} · ${t.owner || "no owner"} · ${t.persona || "default persona"}`;
    const items = (t.messages || []).filter((m) => m.role !== "system").map((m) =>
      el("li", {}, el("span", { class: `role ${m.role}`, text: m.role }), el("span", { class: m.content ? null : "muted", text: m.content || (m.role === "assistant" ? "(calls a tool)" : "") })));
    $("transcript").replaceChildren(...(items.length ? items : [el("li", { class: "muted", text: "no messages yet" })]));
    $("transcript-card").hidden = false;
    $("transcript-card").scrollIntoView({ block: "nearest" });
  } catch (e) {
    if (!onAuthError(e)) showMessage(`transcript of ${id}: ${e.message}`);
  }
}

async function endSession(id, forget) {
  const what = forget ? "End this session and delete its stored conversation?" : "End this session?";
  if (!window.confirm(`${what}\n${id}`)) return;
  try {
    await api(forget ? "DELETE" : "POST", `/api/admin/sessions/${encodeURIComponent(id)}${forget ? "" : "/end"}`);
    showMessage(`Session ${id} ${forget ? "ended and forgotten" : "ended"}.`, "info");
    if (forget && $("transcript-id").textContent === id) $("transcript-card").hidden = true;
  } catch (e) {
    if (!onAuthError(e)) showMessage(`${forget ? "forget" : "end"} ${id}: ${e.message}`);
  }
  await refresh();
}

// ------------------------------------------------------------------ providers
function renderPools(p) {
  const rows = [];
  for (const pool of p.pools) {
    const nodes = pool.nodes.length ? pool.nodes : [{ node: null, ok: false, error: "no pool" }];
    for (const n of nodes) {
      const lat = n.latency_ms || {};
      rows.push(el("tr", {},
        el("td", {}, el("code", { text: `${pool.kind}:${pool.provider}` })),
        el("td", { title: n.node || "" }, el("code", { text: short(n.node) })),
        el("td", {}, el("span", { class: n.ok ? "ok" : "bad", text: n.ok ? "ok" : (n.error || "down") })),
        el("td", { text: num(n.in_flight) + (n.max_concurrency ? ` / ${n.max_concurrency}` : "") }),
        el("td", { text: num(n.calls) }),
        el("td", { class: n.failures ? "warn" : null, text: num(n.failures) }),
        el("td", { text: num(lat.p50) }), el("td", { text: num(lat.p95) }), el("td", { text: num(lat.mean) })));
    }
  }
  $("pools").tBodies[0].replaceChildren(...rows);
  $("chains").textContent = "Failover chains: " + Object.entries(p.chains || {})
    .map(([k, v]) => `${k}: ${v.join(" → ")}`).join(" · ");
}

const breakerClass = (state) => (state === "closed" ? "ok" : state === "open" ? "bad" : state ? "warn" : "muted");

/** Each chain provider, summed over the live sessions (their own breakers and counters). */
function renderProviders(rows) {
  $("providers").tBodies[0].replaceChildren(...rows.map((p) => {
    const lat = p.latency_ms || {};
    let breaker = p.state || "unused";
    if (p.open_in) breaker += ` in ${p.open_in} of ${p.sessions}`;
    else if (p.half_open_in) breaker += ` (half open in ${p.half_open_in})`;
    return el("tr", { "data-provider": `${p.kind}:${p.provider}`, "data-state": p.state || "unused" },
      el("td", {}, el("code", { text: `${p.kind}:${p.provider}` })),
      el("td", { class: "muted", text: p.role || "–" }),
      el("td", {}, el("span", { class: `breaker ${breakerClass(p.state)}`, text: breaker })),
      el("td", { text: num(p.sessions) }),
      el("td", { class: "in-flight", text: num(p.in_flight) }),
      el("td", { text: num(p.calls) }),
      el("td", { class: p.failures ? "warn" : null, text: num(p.failures) }),
      el("td", { text: num(lat.mean) }), el("td", { text: num(lat.p95) }),
      el("td", { class: "wrap", text: p.last_error || "–" }));
  }));
  $("providers-empty").hidden = rows.length > 0;
}

function renderBreakers(b) {
  const entries = Object.entries(b.breakers || {});
  $("breakers").tBodies[0].replaceChildren(...entries.map(([name, s]) => el("tr", {},
    el("td", {}, el("code", { text: name })),
    el("td", {}, el("span", { class: breakerClass(s.state), text: s.state })),
    el("td", { text: num(s.consecutive_failures) }), el("td", { text: num(s.opened) }),
    el("td", { class: "wrap", text: s.last_error || "–" }))));
  $("breakers-empty").hidden = entries.length > 0;
}

function renderWarm(w) {
  const pairs = [["target (this replica)", w.target], ["ready (this replica)", w.ready],
                 ["unclaimed actors (cluster)", w.unclaimed_in_cluster]];
  $("warm").replaceChildren(...pairs.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: num(v) })]));
}

function renderErrors(e) {
  const rows = e.errors.map((x) => el("tr", {},
    el("td", { text: clock(x.ts) }), el("td", { text: x.kind }), el("td", {}, el("code", { text: x.code })),
    el("td", { class: "wrap", text: x.message || "–" }),
    el("td", {}, el("code", { text: x.session_id || "–" })), el("td", { text: num(x.turn_id) })));
  $("errors").tBodies[0].replaceChildren(...rows);
  $("errors-empty").hidden = rows.length > 0;
}

// ------------------------------------------------------------------ plots (inline SVG)
function renderSeries(series) {
  const pts = series.points || [];
  $("latency-window").textContent = `(p50 solid, p90 dashed; each point over the previous ${series.window_s} s)`;
  const latency = [];
  for (const [stage, label, color] of STAGES) {
    for (const [q, dash] of [["p50", null], ["p90", "5 4"]]) {
      latency.push({ label: `${label} ${q}`, color, dash, legend: q === "p50" ? label : null,
                     values: pts.map((p) => [p.t, p.latency_ms?.[stage]?.[q] ?? null]) });
    }
  }
  linePlot($("plot-latency"), latency, { unit: "ms" });
  linePlot($("plot-sessions"), [
    { label: "live sessions (cluster)", legend: "live sessions (cluster)", color: "#2f5fd0",
      values: pts.map((p) => [p.t, p.live_sessions]) },
    { label: "sockets (this replica)", legend: "sockets (this replica)", color: "#1c7c43", dash: "5 4",
      values: pts.map((p) => [p.t, p.sockets]) },
  ], { unit: "", integer: true });
}

function niceMax(v, integer) {
  if (!(v > 0)) return integer ? 4 : 100;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return integer ? Math.max(4, Math.ceil(m * p)) : m * p;
  return v;
}

function linePlot(root, lines, { unit, integer = false }) {
  const W = 640, H = 260, L = 52, R = 12, T = 26, B = 28;
  root.replaceChildren();
  const all = lines.flatMap((l) => l.values.filter(([, v]) => v !== null && v !== undefined));
  const times = lines.flatMap((l) => l.values.map(([t]) => t));
  if (!times.length || !all.length) {
    root.append(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "no-data" },
                    times.length ? "no turns in this window yet" : "no samples yet"));
    if (!times.length) return;
  }
  const t0 = Math.min(...times), t1 = Math.max(...times, t0 + 1);
  const yMax = niceMax(Math.max(0, ...all.map(([, v]) => v)), integer);
  const x = (t) => L + ((t - t0) / (t1 - t0)) * (W - L - R);
  const y = (v) => H - B - (v / yMax) * (H - T - B);
  for (let i = 0; i <= 4; i++) {
    const v = (yMax * i) / 4;
    root.append(svg("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid-line" }));
    root.append(svg("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end" },
                    `${integer ? Math.round(v) : Math.round(v)}${unit && i === 4 ? " " + unit : ""}`));
  }
  root.append(svg("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" }));
  root.append(svg("line", { x1: L, x2: L, y1: T, y2: H - B, class: "axis" }));
  for (const t of [t0, (t0 + t1) / 2, t1]) {
    root.append(svg("text", { x: x(t), y: H - 8, "text-anchor": t === t0 ? "start" : t === t1 ? "end" : "middle" },
                    clock(t)));
  }
  let legendX = L;
  for (const line of lines) {
    let d = "";
    let pen = false;
    for (const [t, v] of line.values) {
      if (v === null || v === undefined) { pen = false; continue; }
      d += `${pen ? "L" : "M"}${x(t).toFixed(1)},${y(v).toFixed(1)}`;
      pen = true;
      root.append(svg("circle", { cx: x(t).toFixed(1), cy: y(v).toFixed(1), r: 2.2, fill: line.color }));
    }
    if (d) {
      root.append(svg("path", { d, fill: "none", stroke: line.color, "stroke-width": 1.8,
                                "stroke-dasharray": line.dash || undefined }, undefined));
    }
    if (line.legend) {
      root.append(svg("rect", { x: legendX, y: 8, width: 12, height: 4, fill: line.color }));
      const label = svg("text", { x: legendX + 16, y: 14 }, line.legend);
      root.append(label);
      legendX += 26 + line.legend.length * 6.2;
    }
  }
}

// ------------------------------------------------------------------ wiring
document.addEventListener("DOMContentLoaded", () => {
  $("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const value = $("token").value.trim();
    if (!value) return showMessage("Paste a token first.");
    setToken(value);
    $("token").value = "";
    start();
  });
  $("login-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      const r = await fetch("/api/auth/login", {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ username: $("username").value, password: $("password").value }),
      });
      const data = await r.json().catch(() => ({}));
      if (!r.ok) return showMessage(`Log in failed: ${data.error?.message || r.statusText}`);
      $("password").value = "";
      setToken(data.access_token);
      start();
    } catch {
      showMessage("Log in failed: the server could not be reached.");
    }
  });
  $("sign-out").addEventListener("click", () => { setToken(""); signedOut(""); });
  $("show-warm").addEventListener("change", () => lastOverview && renderSessions(lastOverview.sessions));
  $("transcript-close").addEventListener("click", () => { $("transcript-card").hidden = true; });
  if (token()) start();
  else signedOut("");
});
